"""The benchmark scripts' pure parts: argument parsing, the runs they launch, and their results tables, on fake
summaries (milliseconds; the benchmarks themselves are ``make bench``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str, monkeypatch):
    # The scripts run as ``python benchmarks/NAME.py`` and import their neighbours (``peak_memory``) by name.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_loop_accuracy_arguments(monkeypatch):
    loop = load("loop_accuracy", monkeypatch)
    args = loop.parse_args([])
    assert args.methods == ["rs", "ppo", "dpo"] and args.seeds == [0, 1, 2] and not args.smoke
    assert args.runs.endswith("bench-loop")
    args = loop.parse_args(["--methods", "dpo", "rs", "dpo", "--smoke", "--sft", "runs/sft"])
    assert args.methods == ["rs", "dpo"] and args.sft == "runs/sft" and args.runs.endswith("bench-loop-smoke")
    with pytest.raises(SystemExit):
        loop.parse_args(["--methods", "grpo"])
    args = loop.parse_args(["--pipeline"])
    assert args.methods == ["dpo", "pipeline", "llama2"] and args.runs.endswith("bench-pipeline")


def test_loop_accuracy_recipe_args(monkeypatch, tmp_path):
    loop = load("loop_accuracy", monkeypatch)
    full = loop.recipe_args("dpo", tmp_path / "dpo", tmp_path / "sft", seed=2)
    assert full[:2] == ["--config", str(loop.CONFIGS / "dpo_lora.yaml")]
    assert full[full.index("--init") + 1] == str(tmp_path / "sft") and "--train.seed=2" in full
    assert not any(a.startswith("--train.max_steps") for a in full)
    smoke = loop.recipe_args("dpo", tmp_path / "dpo", tmp_path / "sft", seed=2, smoke=True)
    assert smoke[: len(full)] == full and smoke[len(full):] == loop.SMOKE["dpo"]  # overrides last: they win
    ppo = loop.recipe_args("ppo", tmp_path / "ppo", tmp_path / "sft", seed=1)
    assert "--ppo.seed=1" in ppo and "--sampling.seed=1" in ppo
    assert "--init" not in loop.recipe_args("sft", tmp_path / "sft")
    # The pipeline's start: the seed set its YAML ships, as the bare pipeline trains it.
    seed_set = loop.recipe_args("sft", tmp_path / "sft", extra=loop.pipeline_overrides("sft"))
    assert seed_set[-1] == "--data.max_train_samples=700"
    assert loop.shipped_overrides("dpo", "--eval.verifier=null") == (
        "--dpo.overrides=[--dpo.nll_weight=2.0, --dpo.rejected_to_first_difference=true, --eval.verifier=null]")


def test_loop_accuracy_table(monkeypatch):
    loop = load("loop_accuracy", monkeypatch)
    dpo = [{"eval_accuracy": a, "eval_reward_accuracy": r, "eval_kl_gap": -0.5}
           for a, r in ((0.08, 0.785), (0.09, 0.82), (0.095, 0.78))]
    result = loop.summarise({"eval_accuracy": 0.065}, "runs/sft", [0, 1, 2], 200, dpo=dpo)
    assert result["dpo"]["eval_accuracy"]["mean"] == pytest.approx(0.0883333)
    assert result["dpo"]["eval_accuracy"]["spread"] == pytest.approx(0.015)
    text = loop.table(result)
    assert "| DPO (`dpo_lora.yaml`) | 8.0%, 9.0%, 9.5% | 8.8% | 1.5% |" in text
    assert "| SFT (`sft_lora.yaml`, one run) | 6.5% | 6.5% | - |" in text
    assert "reward accuracy 0.785, 0.820, 0.780 (mean 0.795, spread 0.040)" in text
    assert "PPO" not in text and "Rejection" not in text  # methods that did not run are left out

    rs = [{"eval_accuracy": 0.095, "mean_score_all": 0.05, "mean_score_kept": 1.0, "kept_samples": 811,
           "prompts_kept_nothing": 1787}]
    ppo = [{"eval_accuracy": 0.08, "final_kl": 0.3, "max_kl": 1.3, "final_score": 0.1, "first_score": 0.13}]
    text = loop.table(loop.summarise({"eval_accuracy": 0.065}, "runs/sft", [0], 200, rs, ppo, dpo[:1]))
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["| SFT (`sft_lora.yaml`, one run)", "| rejection sampling (`rejection_sampling.yaml`)",
                    "| PPO (`ppo_lora.yaml`)", "| DPO (`dpo_lora.yaml`)"]


def test_dpo_memory_table(monkeypatch):
    mem = load("dpo_memory", monkeypatch)
    regimes = {
        "none": {"sft": {"peak_mb": 300.0}, "dpo_shared": {"peak_mb": 400.0}, "dpo_full_reference": {"peak_mb": 600.0}},
        "full": {"sft": {"peak_mb": 250.0}, "dpo_shared": {"peak_mb": 270.0}, "dpo_full_reference": {"peak_mb": 480.0}},
    }
    result = mem.summarise(regimes, "cpu", 52_000_000, 4, 3, "2.13.0")
    assert result["regimes"]["none"]["ratio_to_sft"]["dpo_shared"] == pytest.approx(4 / 3)
    assert not result["regimes"]["none"]["goal_met"] and result["regimes"]["full"]["goal_met"]
    text = mem.table(result)
    assert "| DPO with a second full reference model | 600 | 2.00 | 480 | 1.92 |" in text
    assert "Activation checkpointing none: DPO (shared base) / SFT **1.33** (goal <= 1.15: **not met**)" in text
    assert "Activation checkpointing full: DPO (shared base) / SFT **1.08** (goal <= 1.15: met)" in text
    assert "/ DPO with a full reference 0.56" in text  # 270 / 480
    assert "| SFT on the chosen and the rejected replies (DPO's sequences, no reference) | - | - | - | - |" in text


def test_sft_throughput_packs_to_the_baselines_step_count(monkeypatch):
    # Worked by hand: lengths 5, 4, 3, 3, 2, 2, 1 (20 tokens) into 3 rows need rows of 7 (5+2, 4+3, 3+2+1):
    # at 6, best-fit decreasing makes 5+1, 4+2, 3+3, 2 = 4 rows.
    bench = load("sft_throughput", monkeypatch)
    lengths = [3, 5, 2, 4, 1, 3, 2]
    assert bench.packed_row_length(lengths, rows=3, longest=5) == 7
    # Never below the longest conversation (train or eval), so nothing is cut, even if fewer rows would do.
    assert bench.packed_row_length(lengths, rows=7, longest=5) == 5
    assert bench.packed_row_length(lengths, rows=7, longest=9) == 9
    assert bench.packed_row_length(lengths, rows=1, longest=5) == 20


def test_sft_throughput_padding_efficiency_and_table(monkeypatch):
    # Lengths 3, 5, 2 | 4, 1, 3 | 2 in batches of 3 pad to 15 + 12 + 2 = 29 tokens, 20 of them real.
    bench = load("sft_throughput", monkeypatch)
    assert bench.padding_efficiency([3, 5, 2, 4, 1, 3, 2], 3) == 20 / 29
    arm = {"real_tokens_per_second": 300.0, "optimizer_steps": 10, "train_seconds": 1.0, "peak_rss_mib": 100.0,
           "eval_loss": 1.5, "packed_row_length": 64}
    results = {"device": "CPU", "model": "tiny", "epochs": 1.0, "datasets": {"multiturn": {
        "conversations": 7, "min_tokens": 1, "max_tokens": 5, "padding_efficiency": 20 / 29,
        "arms": {"ours": arm, "trl_defaults": {**arm, "real_tokens_per_second": 150.0, "packed_row_length": None}}}}}
    text = bench.table(results)
    assert "multiturn: 7 conversations of 1-5 tokens (batches of 8 are 69% real tokens); ours packs 64-token rows" in text
    assert "| real tokens / s | 300 | 150 | 2.00 |" in text


def test_loop_accuracy_smoke_configs_parse_and_rejection_sampling_keeps_wrong_answers(monkeypatch, tmp_path):
    # The smoke SFT answers nothing right; its rejection sampling must still keep samples to reach the fine-tune
    # (the shipped config keeps only verified ones, and once made the smoke run stop there).
    from finetune.config import DPORunConfig, PPORunConfig, RejectionSamplingRunConfig, SFTRunConfig, parse_args
    from finetune.stages.rejection_sampling import select

    loop = load("loop_accuracy", monkeypatch)
    classes = {"sft": SFTRunConfig, "rejection_sampling": RejectionSamplingRunConfig, "ppo": PPORunConfig, "dpo": DPORunConfig}
    configs = {name: parse_args(cls, loop.recipe_args(name, tmp_path / name, None if name == "sft" else tmp_path,
                                                      seed=None if name == "sft" else 0, smoke=True))
               for name, cls in classes.items()}
    rs = configs["rejection_sampling"]
    wrong = [{"prompt_index": 0, "sample": k, "score": 0.0, "scores": {rs.score.verifier: 0.0}, "response": f"wrong {k}"}
             for k in range(2)]
    kept, _ = select(wrong, rs.rejection, rs.score.verifier)
    assert len(kept) == 2


def test_loop_accuracy_pipeline_table_checks_each_claimed_ordering(monkeypatch, tmp_path):
    """Two seeds of a one-round pipeline, hand-made manifests: SFT 80%, RS 82/84, DPO runs (85, 87) and (86, 88),
    average 87/86, promoted on both seeds. Means: RS 83 > SFT 80 by 3 > spread 2; DPO 86.5 > RS 83 by 3.5 > spread 1;
    average - mean of runs: +1 and -1 (not at least as good on seed 1); after the gate 86.5 vs SFT 80: gap 6.5 > 1."""
    loop = load("loop_accuracy", monkeypatch)
    outs = []
    for seed, (rs, runs, average) in enumerate([(0.82, (0.85, 0.87), 0.87), (0.84, (0.86, 0.88), 0.86)]):
        out = tmp_path / f"pipeline-seed{seed}"
        for n, manifest in enumerate([
            {"round": 0, "figures": {"base": {"accuracy": 0.05}, "sft": {"accuracy": 0.80}}},
            {"round": 1, "promoted": True, "reason": "better", "seconds": {"rejection_sampling": 50, "dpo seed 10": 30},
             "figures": {"incumbent": {"accuracy": 0.80}, "rejection_sampling": {"accuracy": rs},
                         "dpo_1": {"accuracy": runs[0]}, "dpo_2": {"accuracy": runs[1]},
                         "average": {"accuracy": average}, "candidate": {"accuracy": average}}},
        ]):
            (out / f"round-{n}").mkdir(parents=True)
            (out / f"round-{n}" / "manifest.json").write_text(json.dumps(manifest))
        outs.append(out)
    result = loop.pipeline_result({}, "runs/sft", [0, 1], 200, outs, [], [{"eval_accuracy": 0.79}, {"eval_accuracy": 0.78}],
                                  sft_all={"eval_accuracy": 0.9})
    held = {c["claim"]: c["held"] for c in result["orderings"]}
    assert held["round 1: SFT model it started from < rejection sampling"]
    assert held["round 1: DPO on own pairs above the SFT model it started from (rejection sampling's)"]
    assert held["DPO on own pairs (round 1) above DPO on the bundled pairs"]
    assert not held["round 1: averaged model at least as good as the mean of its runs (every seed)"]
    assert held["round 1 (after the gate) above SFT, by more than the spread"]
    detail = {c["claim"]: c["detail"] for c in result["orderings"]}
    assert detail["round 1: DPO on own pairs above the SFT model it started from (rejection sampling's)"].endswith(
        "; per seed +4.00, +3.00")  # DPO 86 over RS 82 on seed 0, 87 over 84 on seed 1
    text = loop.pipeline_table(result)
    assert "| 1 | Llama 3: DPO on its own pairs (mean of the runs) | 86.5% ± 0.5 | 86.0, 87.0 |" in text
    assert "| 1 | Llama 3: after the gate (2/2 promoted) | 86.5% ± 0.5 | 87.0, 86.0 |" in text
    assert "Llama 3 round 1: 80 s a seed (rejection_sampling 50 s, dpo 30 s)." in text
    assert "| - | reference: SFT on all the labelled answers (`sft_lora.yaml`) | 90.0% ± 0.0 | 90.0 |" in text
    assert text.index("reference: SFT on all") < text.index("SFT on the pipeline's seed set")


def test_pipeline_test_set_finds_each_seeds_models_and_pairs_the_steps(monkeypatch, tmp_path):
    bench = load("pipeline_test_set", monkeypatch)
    for d in ("pipeline-seed0/round-1/dpo/seed-10", "pipeline-seed0/round-1/dpo/seed-11",
              "llama2-seed0/round-1/ppo/seed-10"):
        (tmp_path / d).mkdir(parents=True)
    found = bench.models(tmp_path, 0)
    assert found["round 1: DPO run 2"] == tmp_path / "pipeline-seed0/round-1/dpo/seed-11"
    assert found["Llama 2 round 1: PPO"] == tmp_path / "llama2-seed0/round-1/ppo/seed-10"
    assert found["round 1: average"] == tmp_path / "pipeline-seed0/round-1/average"

    def seed(rs, dpo1, dpo2, avg):
        return {"SFT on the seed set (start)": 0.80, "round 1: rejection sampling + SFT": rs,
                "round 1: DPO run 1": dpo1, "round 1: DPO run 2": dpo2, "round 1: average": avg}

    res = bench.result({0: seed(0.88, 0.86, 0.87, 0.87), 1: seed(0.89, 0.88, 0.88, 0.885)})
    assert res["rows"]["round 1: DPO"] == pytest.approx([0.865, 0.88])
    steps = {s["step"]: s for s in res["steps"]}
    rs = steps["SFT on the seed set -> round 1 rejection sampling"]
    assert rs["held"] and rs["gap"] == pytest.approx(0.085) and rs["spread"] == pytest.approx(0.01)
    dpo = steps["round 1 rejection sampling -> its DPO (mean of the runs)"]
    assert not dpo["held"] and dpo["per_seed"] == pytest.approx([-0.015, -0.01])
    assert "round 1 -> round 2 (averages)" not in steps  # no round 2 here
    text = bench.table(res)
    assert "| round 1: DPO | 87.25% | 86.50, 88.00 |" in text
    assert "| round 1 rejection sampling -> its DPO (mean of the runs) | -1.25 | 1.50 | no | -1.50, -1.00 |" in text
