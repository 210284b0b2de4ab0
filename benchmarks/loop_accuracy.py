"""Verifier accuracy on the bundled suite: the SFT model, then rejection sampling, PPO and DPO from it, over seeds.

    python benchmarks/loop_accuracy.py                         # SFT once, then RS, PPO, DPO for seeds 0 1 2 (CPU: ~35 min)
    python benchmarks/loop_accuracy.py --sft runs/sft --seeds 0 1 2 --methods dpo
    python benchmarks/loop_accuracy.py --smoke                 # every step end to end in minutes, tiny overrides
    python benchmarks/loop_accuracy.py --pipeline              # the rounds pipeline over seeds 0 1 2 (~10 core-min a seed)

``--pipeline`` (methods ``pipeline``, ``llama2`` and ``dpo``; runs under ``runs/bench-pipeline``) trains the
pipeline's starting SFT run as the bare pipeline does (``sft_lora.yaml`` with ``pipeline.yaml``'s ``sft.overrides``:
the seed set), and SFT on all the answers as the reference, then runs ``recipes/pipeline.py`` with
``recipes/configs/tiny/pipeline.yaml`` from the seed-set run, ``--seed`` changed: two Llama 3 rounds (rejection
sampling, SFT on the kept samples, DPO on the model's own pairs over two seeds, their average, the gate), one Llama 2
round (rejection sampling, SFT, PPO at :data:`LLAMA2_PPO_ITERATIONS` iterations), and DPO on the bundled pairs for
the comparison. Its results go to ``loop_accuracy_pipeline_cpu.json`` and ``.md``, with each claimed ordering
checked (:func:`orderings`) and the seconds of each step of a round.

Every run is the shipped recipe with the shipped tiny config (``recipes/configs/tiny/sft_lora.yaml``,
``rejection_sampling.yaml``, ``ppo_lora.yaml``, ``dpo_lora.yaml``), all from the same SFT run, the suite's verifier
as the score / reward, and only the seeds changed: ``--sampling.seed`` and ``--train.seed`` (RS),
``--sampling.seed`` and ``--ppo.seed`` (PPO), ``--train.seed`` (DPO). Accuracy is the fraction of the 200 held-out
suite prompts whose greedy answer the verifier accepts. Reported per method: each seed's accuracy, the mean, the
spread (max - min); for PPO the KL to the reference at the last iteration and its largest value over the run; for
DPO the held-out pairs' reward accuracy (chosen scored above rejected) and ``kl_gap``. Results go to
``benchmarks/results/loop_accuracy_cpu.json`` and ``.md`` (``--smoke``: ``loop_accuracy_cpu_smoke.*``, not
figures); the runs stay under ``--runs`` (default ``runs/bench-loop``, ``runs/bench-loop-smoke``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "recipes" / "configs" / "tiny"
METHODS = ("rs", "ppo", "dpo", "pipeline", "llama2")
PIPELINE_METHODS = ["pipeline", "llama2", "dpo"]
LLAMA2_PPO_ITERATIONS = 40
"""PPO iterations of the Llama 2 round (the shipped 240 take ~8 minutes a seed on an idle machine; 40 are ~0.8
passes over the prompts, what 2 shared cores allow)."""


def pipeline_overrides(stage: str) -> list[str]:
    """``recipes/configs/tiny/pipeline.yaml``'s overrides of that stage."""
    return (yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())[stage] or {}).get("overrides") or []


def shipped_overrides(stage: str, *extra: str) -> str:
    """``--STAGE.overrides=[...]``: the pipeline's shipped overrides of that stage, then ``extra`` (a list given on
    the command line replaces the config's, so the shipped ones are read, not repeated)."""
    return f"--{stage}.overrides=[{', '.join([*pipeline_overrides(stage), *extra])}]"


PIPELINE_BUDGET = [
    shipped_overrides("rejection_sampling", "--eval.verifier=null"),
    shipped_overrides("dpo", "--eval.verifier=null"),
]
"""The pipeline's budget here: the shipped one (rejection sampling on all 1,635 prompts), with the stages' own
before/after accuracy off (the gate measures every model of a round on the same 200 prompts)."""
EVAL_PROMPTS, SMOKE_EVAL_PROMPTS = 200, 8
# --smoke: each recipe a few steps on a few prompts, so the whole loop (and this script) is checked in minutes.
SMOKE_EVAL = [f"--data.max_eval_samples={SMOKE_EVAL_PROMPTS}", f"--eval.num_samples={SMOKE_EVAL_PROMPTS}",
              "--eval.max_new_tokens=8"]
SMOKE = {
    "sft": ["--train.max_steps=2", "--data.max_train_samples=16", *SMOKE_EVAL],
    # A 2-step SFT answers nothing right, so the smoke run keeps every sample (threshold 0, unverified ones too) to
    # reach the fine-tune.
    "rejection_sampling": ["--data.max_train_samples=16", "--sampling.num_samples=2",
                           "--rejection.selection=threshold", "--rejection.threshold=0.0",
                           "--rejection.keep_unverified=true",
                           "--train.max_steps=2", *SMOKE_EVAL],
    "ppo": ["--ppo.num_iterations=2", "--ppo.rollout_batch_size=4", "--ppo.mini_batch_size=4", "--ppo.ppo_epochs=1",
            *SMOKE_EVAL],
    "dpo": ["--train.max_steps=2", "--data.max_train_samples=16", *SMOKE_EVAL],
    "pipeline": ["--rounds=1", "--gate.max_samples=8", "--gate.max_new_tokens=8",
                 "--rejection_sampling.overrides=[--data.max_train_samples=16, --sampling.num_samples=2, "
                 "--rejection.selection=threshold, --rejection.threshold=0.0, --rejection.keep_unverified=true, "
                 "--train.max_steps=2, " + ", ".join(SMOKE_EVAL) + "]",
                 "--dpo.overrides=[--train.max_steps=2, " + ", ".join(SMOKE_EVAL) + "]",
                 "--ppo.overrides=[--ppo.num_iterations=2, --ppo.rollout_batch_size=4, --ppo.mini_batch_size=4, "
                 "--ppo.ppo_epochs=1, " + ", ".join(SMOKE_EVAL) + "]"],
}
SMOKE["llama2"] = SMOKE["pipeline"]
CONFIG_FILES = {"sft": "sft_lora.yaml", "rejection_sampling": "rejection_sampling.yaml", "ppo": "ppo_lora.yaml",
                "dpo": "dpo_lora.yaml", "pipeline": "pipeline.yaml", "llama2": "pipeline.yaml"}
RECIPES = {"llama2": "pipeline"}
"""The recipe a method runs, where its name is not a recipe's."""
SEED_ARGS = {
    "rejection_sampling": ["--sampling.seed={seed}", "--train.seed={seed}"],
    "ppo": ["--sampling.seed={seed}", "--ppo.seed={seed}"],
    "dpo": ["--train.seed={seed}"],
    "pipeline": ["--seed={seed}", *PIPELINE_BUDGET],
    "llama2": ["--seed={seed}", *PIPELINE_BUDGET, "--style=llama2", "--rounds=1", "--average.runs=1",
               f"--ppo.overrides=[--ppo.num_iterations={LLAMA2_PPO_ITERATIONS}, --eval.verifier=null]"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["rs", "ppo", "dpo"],
                        help="what to run from the SFT model: rs (rejection sampling), ppo, dpo (the default "
                             "three), pipeline (Llama 3 rounds), llama2 (a Llama 2 round)")
    parser.add_argument("--sft", help="an existing SFT run to start from (default: train one with sft_lora.yaml, "
                                      "with --pipeline and the pipeline's sft overrides: its seed set)")
    parser.add_argument("--runs", help="where the runs go (default runs/bench-loop, with --pipeline runs/bench-pipeline, "
                                       "with --smoke runs/bench-loop-smoke)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --runs instead of rerunning")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps and prompts per run: checks the loop end to end; results *_smoke.*")
    parser.add_argument("--pipeline", action="store_true",
                        help=f"the rounds pipeline: methods {' '.join(PIPELINE_METHODS)}; results "
                             "loop_accuracy_pipeline_cpu.*")
    args = parser.parse_args(argv)
    if args.pipeline:
        args.methods = PIPELINE_METHODS
    args.methods = [m for m in METHODS if m in args.methods]  # fixed order, no repeats
    if args.runs is None:
        args.runs = str(ROOT / "runs" / ("bench-loop-smoke" if args.smoke else
                                         "bench-pipeline" if args.pipeline else "bench-loop"))
    return args


def recipe_args(name: str, out: Path, init: Path | None = None, seed: int | None = None,
                smoke: bool = False, extra: list[str] = ()) -> list[str]:
    """The command-line arguments of ``recipes/NAME.py`` for one run: the shipped tiny config, ``--init``, the
    seed overrides, ``extra``, and with ``smoke`` the tiny overrides last (they win)."""
    args = ["--config", str(CONFIGS / CONFIG_FILES[name]), "--output_dir", str(out), "--overwrite"]
    if init is not None:
        args += ["--init", str(init)]
    if seed is not None:
        args += [a.format(seed=seed) for a in SEED_ARGS[name]]
    return args + list(extra) + (SMOKE[name] if smoke else [])


def recipe(name: str, args: list[str], log: Path, reuse: bool = False) -> dict:
    """Run ``recipes/NAME.py`` in one process (OMP_NUM_THREADS=1), its output in ``log``; returns its summary. With
    ``reuse``, a run whose ``summary.json`` exists (it finished) is read instead of run again."""
    out = Path(args[args.index("--output_dir") + 1])
    if reuse and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    script = RECIPES.get(name, name)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{script}.py"), *args], env=env, cwd=ROOT,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"recipes/{script}.py failed (exit {proc.returncode}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def shown(path: Path) -> str:
    """``path`` as a results file records it: relative to the checkout when inside it (no machine's own prefix)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    return {"values": values, "mean": mean, "spread": max(values) - min(values), "min": min(values), "max": max(values)}


def summarise(sft: dict, sft_run: str, seeds: list[int], eval_prompts: int, rs: list[dict] = (),
              ppo: list[dict] = (), dpo: list[dict] = ()) -> dict:
    """The results JSON from the runs' summaries (one per seed for each method that ran; PPO's also carry
    ``max_kl`` and ``first_score`` from its ``metrics.jsonl``)."""
    result = {"device": "cpu", "seeds": seeds, "eval_prompts": eval_prompts, "sft_run": sft_run,
              "sft": {"eval_accuracy": sft["eval_accuracy"]}}
    if rs:
        result["rejection_sampling"] = {
            "eval_accuracy": stats([r["eval_accuracy"] for r in rs]),
            "mean_score_all": stats([r["mean_score_all"] for r in rs]),
            "mean_score_kept": stats([r["mean_score_kept"] for r in rs]),
            "kept_samples": [r["kept_samples"] for r in rs],
            "prompts_kept_nothing": [r["prompts_kept_nothing"] for r in rs],
            "wall_seconds": [r.get("wall_seconds") for r in rs],
        }
    if ppo:
        result["ppo"] = {
            "eval_accuracy": stats([r["eval_accuracy"] for r in ppo]),
            "final_kl": stats([r["final_kl"] for r in ppo]),
            "max_kl": stats([r["max_kl"] for r in ppo]),
            "final_score": stats([r["final_score"] for r in ppo]),
            "first_score": stats([r["first_score"] for r in ppo]),
            "wall_seconds": [r.get("wall_seconds") for r in ppo],
        }
    if dpo:
        result["dpo"] = {
            "eval_accuracy": stats([r["eval_accuracy"] for r in dpo]),
            "eval_reward_accuracy": stats([r["eval_reward_accuracy"] for r in dpo]),
            "eval_kl_gap": stats([r["eval_kl_gap"] for r in dpo]),
            "wall_seconds": [r.get("wall_seconds") for r in dpo],
        }
    return result


def table(result: dict) -> str:
    """The results as a markdown table and a line of detail per method; methods absent from ``result`` are left
    out (``--methods``)."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [
        f"Verifier accuracy on the {result['eval_prompts']} held-out suite prompts (greedy answers), tiny LLaMA, "
        f"CPU, seeds {seeds}",
        "",
        "| model | accuracy per seed | mean | spread (max - min) |",
        "|---|---|---:|---:|",
        f"| SFT (`sft_lora.yaml`, one run) | {pct(result['sft']['eval_accuracy'])} | "
        f"{pct(result['sft']['eval_accuracy'])} | - |",
    ]
    names = {"rejection_sampling": "rejection sampling (`rejection_sampling.yaml`)", "ppo": "PPO (`ppo_lora.yaml`)",
             "dpo": "DPO (`dpo_lora.yaml`)"}
    for key, name in names.items():
        if key in result:
            acc = result[key]["eval_accuracy"]
            lines.append(f"| {name} | {', '.join(pct(v) for v in acc['values'])} | {pct(acc['mean'])} | "
                         f"{pct(acc['spread'])} |")
    lines.append("")
    if "rejection_sampling" in result:
        rs = result["rejection_sampling"]
        lines.append(
            f"Rejection sampling: mean score of all samples {rs['mean_score_all']['mean']:.3f}, of the kept ones "
            f"{rs['mean_score_kept']['mean']:.3f}; kept {rs['kept_samples']} samples, prompts that kept nothing "
            f"{rs['prompts_kept_nothing']}.")
    if "ppo" in result:
        ppo = result["ppo"]
        lines.append(
            f"PPO: KL to the reference at the last iteration {ppo['final_kl']['mean']:.2f} nats per response (largest "
            f"over the runs {ppo['max_kl']['max']:.2f}); rollout score {ppo['first_score']['mean']:.3f} at the first "
            f"iteration, {ppo['final_score']['mean']:.3f} at the last.")
    if "dpo" in result:
        dpo = result["dpo"]
        reward_acc = dpo["eval_reward_accuracy"]
        lines.append(
            f"DPO: held-out pairs' reward accuracy {', '.join(f'{v:.3f}' for v in reward_acc['values'])} (mean "
            f"{reward_acc['mean']:.3f}, spread {reward_acc['spread']:.3f}); kl_gap to the reference "
            f"{dpo['eval_kl_gap']['mean']:.2f} nats per reply.")
    return "\n".join(lines).rstrip()


def pipeline_result(sft: dict, sft_run: str, seeds: list[int], eval_prompts: int, pipelines: list[Path],
                    llama2: list[Path], dpo: list[dict], sft_all: dict | None = None) -> dict:
    """The pipeline's figures by round over seeds, from each pipeline's round manifests (``round-N/manifest.json``):
    per round the model it started from, rejection sampling's fine-tune, the DPO (or PPO) runs, their average,
    the model after the gate, and where the round's seconds went."""

    def read(out: Path) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(out.glob("round-*/manifest.json"),
                                                            key=lambda p: int(p.parent.name.split("-")[1]))]

    def acc(manifest: dict, name: str) -> float | None:
        return (manifest.get("figures", {}).get(name) or {}).get("accuracy")

    def by_round(runs: list[list[dict]], last: str) -> list[dict]:
        rounds = []
        for index in range(1, len(runs[0])):
            ms = [run[index] for run in runs]
            runs_of_last = [[acc(m, name) for name in m["figures"] if name.startswith(f"{last}_")] for m in ms]
            entry = {
                "round": index,
                "start": stats([acc(m, "incumbent") for m in ms]),
                "rejection_sampling": stats([acc(m, "rejection_sampling") for m in ms]),
                last: stats([sum(r) / len(r) for r in runs_of_last]) if all(runs_of_last) else None,
                f"{last}_runs": runs_of_last,
                "candidate": stats([acc(m, "candidate") for m in ms]),
                "after_gate": stats([acc(m, "candidate") if m["promoted"] else acc(m, "incumbent") for m in ms]),
                "promoted": [m["promoted"] for m in ms],
                "reasons": [m["reason"] for m in ms],
                "seconds": [m.get("seconds", {}) for m in ms],
            }
            if all("average" in m["figures"] for m in ms):
                entry["average"] = stats([acc(m, "average") for m in ms])
                entry["average_vs_runs"] = [acc(m, "average") - sum(r) / len(r) for m, r in zip(ms, runs_of_last)]
            rounds.append(entry)
        return rounds

    llama3 = [read(out) for out in pipelines]
    result = {"device": "cpu", "seeds": seeds, "eval_prompts": eval_prompts, "sft_run": sft_run,
              "base": stats([acc(run[0], "base") for run in llama3]), "sft": stats([acc(run[0], "sft") for run in llama3]),
              "llama3_rounds": by_round(llama3, "dpo")}
    if llama2:
        result["llama2_rounds"] = by_round([read(out) for out in llama2], "ppo")
    if dpo:
        result["dpo_bundled"] = stats([r["eval_accuracy"] for r in dpo])
    if sft_all:
        result["sft_all_answers"] = stats([sft_all["eval_accuracy"]])
    result["orderings"] = orderings(result)
    return result


def beats(a: dict, b: dict) -> tuple[bool, str]:
    """Whether mean ``a`` exceeds mean ``b`` by more than the larger spread, and the figures that say so."""
    gap, spread = a["mean"] - b["mean"], max(a["spread"], b["spread"])
    return gap > spread, f"{100 * a['mean']:.1f}% vs {100 * b['mean']:.1f}% (gap {100 * gap:+.1f}, spread {100 * spread:.1f})"


def paired(a: dict, b: dict) -> tuple[bool, str]:
    """:func:`beats`, with each seed's own gain appended: two models of one seed share its samples, so the per-seed
    gain shows what the spread between seeds hides."""
    held, detail = beats(a, b)
    gains = ", ".join(f"{100 * (x - y):+.2f}" for x, y in zip(a["values"], b["values"]))
    return held, f"{detail}; per seed {gains}"


def orderings(result: dict) -> list[dict]:
    """Each ordering the issue claims, whether it held on these runs, and the figures (means over seeds; "by more
    than the spread" is the gap between means against the larger max - min)."""
    checks = []

    def check(claim: str, held: bool, detail: str) -> None:
        checks.append({"claim": claim, "held": bool(held), "detail": detail})

    rounds = result["llama3_rounds"]
    check("base < SFT", *beats(result["sft"], result["base"]))
    if rounds:
        check("round 1 (after the gate) above SFT, by more than the spread", *beats(rounds[0]["after_gate"], result["sft"]))
    if len(rounds) > 1:
        held, detail = beats(rounds[1]["after_gate"], rounds[0]["after_gate"])
        refused = [not p for p in rounds[1]["promoted"]]
        if not held and all(refused):
            held, detail = True, f"the gate refused round 2 on every seed ({'; '.join(rounds[1]['reasons'])})"
        check("round 2 above round 1 by more than the spread, or the gate refused it", held, detail)
    for r in rounds:
        n = r["round"]
        check(f"round {n}: SFT model it started from < rejection sampling", *paired(r["rejection_sampling"], r["start"]))
        if r.get("dpo"):
            check(f"round {n}: DPO on own pairs above the SFT model it started from (rejection sampling's)",
                  *paired(r["dpo"], r["rejection_sampling"]))
            if "dpo_bundled" in result and n == 1:
                check("DPO on own pairs (round 1) above DPO on the bundled pairs", *beats(r["dpo"], result["dpo_bundled"]))
        if "average_vs_runs" in r:
            gaps = r["average_vs_runs"]
            check(f"round {n}: averaged model at least as good as the mean of its runs (every seed)",
                  all(g >= 0 for g in gaps), "average - mean of runs: " + ", ".join(f"{100 * g:+.2f}" for g in gaps))
    for r in result.get("llama2_rounds", []):
        if r.get("ppo"):
            check(f"Llama 2 round {r['round']}: PPO above SFT", *beats(r["ppo"], result["sft"]))
            check(f"Llama 2 round {r['round']}: PPO above the rejection-sampling model it started from (not claimed)",
                  *paired(r["ppo"], r["rejection_sampling"]))
    return checks


def pipeline_table(result: dict) -> str:
    """The pipeline's figures by round as markdown, the orderings that held or did not, and a round's seconds."""
    pct = lambda s: f"{100 * s['mean']:.1f}% ± {100 * s['spread'] / 2:.1f}" if s else "-"  # noqa: E731
    per_seed = lambda s: ", ".join(f"{100 * v:.1f}" for v in s["values"]) if s else "-"  # noqa: E731
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [f"Verifier accuracy on the {result['eval_prompts']} held-out suite prompts (greedy answers), tiny LLaMA, "
             f"CPU, pipeline seeds {seeds}: mean ± half the spread (max - min), then each seed's figure.", "",
             "| round | model | accuracy | per seed |", "|---|---|---:|---|",
             f"| 0 | base (tiny, no adapter) | {pct(result['base'])} | {per_seed(result['base'])} |"]
    if "sft_all_answers" in result:
        lines.append(f"| - | reference: SFT on all the labelled answers (`sft_lora.yaml`) | "
                     f"{pct(result['sft_all_answers'])} | {per_seed(result['sft_all_answers'])} |")
    lines.append(f"| 0 | SFT on the pipeline's seed set (its start, one run) | {pct(result['sft'])} | "
                 f"{per_seed(result['sft'])} |")
    if "dpo_bundled" in result:
        lines.append(f"| 1 | DPO on the bundled pairs, from SFT | {pct(result['dpo_bundled'])} | "
                     f"{per_seed(result['dpo_bundled'])} |")
    for style, key, last in (("Llama 3", "llama3_rounds", "dpo"), ("Llama 2", "llama2_rounds", "ppo")):
        for r in result.get(key, []):
            n = r["round"]
            lines.append(f"| {n} | {style}: rejection sampling + SFT on the kept samples | "
                         f"{pct(r['rejection_sampling'])} | {per_seed(r['rejection_sampling'])} |")
            name = "DPO on its own pairs (mean of the runs)" if last == "dpo" else "PPO"
            lines.append(f"| {n} | {style}: {name} | {pct(r.get(last))} | {per_seed(r.get(last))} |")
            if "average" in r:
                lines.append(f"| {n} | {style}: average of the runs | {pct(r['average'])} | {per_seed(r['average'])} |")
            promoted = sum(bool(p) for p in r["promoted"])
            lines.append(f"| {n} | {style}: after the gate ({promoted}/{len(r['promoted'])} promoted) | "
                         f"{pct(r['after_gate'])} | {per_seed(r['after_gate'])} |")
    lines += ["", "| claimed ordering | held | figures |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {'yes' if c['held'] else 'no'} | {c['detail']} |" for c in result["orderings"]]
    for key, style in (("llama3_rounds", "Llama 3"), ("llama2_rounds", "Llama 2")):
        for r in result.get(key, []):
            steps: dict[str, list[float]] = {}
            for seconds in r["seconds"]:
                for step, value in seconds.items():
                    step = " ".join(w for w in step.split() if not w.isdigit() and w != "seed")
                    steps.setdefault(step, []).append(value)
            total = sum(sum(v) for v in steps.values()) / len(r["seconds"])
            parts = ", ".join(f"{step} {sum(v) / len(r['seconds']):.0f} s" for step, v in steps.items())
            lines.append("")
            lines.append(f"{style} round {r['round']}: {total:.0f} s a seed ({parts}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)

    if args.sft:
        sft_dir = Path(args.sft)
        sft = json.loads((sft_dir / "summary.json").read_text())
    else:
        sft_dir = runs / "sft"
        # The pipeline starts from SFT on its seed set, as the bare pipeline does.
        extra = pipeline_overrides("sft") if args.pipeline else []
        sft = recipe("sft", recipe_args("sft", sft_dir, smoke=args.smoke, extra=extra), runs / "sft.log", args.reuse)
    print(f"SFT: verifier accuracy {sft['eval_accuracy']:.3f}", flush=True)
    sft_all = None
    if args.pipeline:  # the reference: SFT on every labelled answer, stage 1's default
        sft_all = recipe("sft", recipe_args("sft", runs / "sft-all", smoke=args.smoke), runs / "sft-all.log", args.reuse)
        print(f"SFT on all answers: verifier accuracy {sft_all['eval_accuracy']:.3f}", flush=True)

    rs, ppo, dpo = [], [], []
    for seed in args.seeds:
        if "rs" in args.methods:
            out = runs / f"rs-seed{seed}"
            rs.append(recipe("rejection_sampling", recipe_args("rejection_sampling", out, sft_dir, seed, args.smoke),
                             runs / f"rs-seed{seed}.log", args.reuse))
            r = rs[-1]
            print(f"RS seed {seed}: {r['init_eval_accuracy']:.3f} -> {r['eval_accuracy']:.3f} "
                  f"(mean score all {r['mean_score_all']:.3f}, kept {r['mean_score_kept']:.3f}, "
                  f"{r['kept_samples']} kept, {r['prompts_kept_nothing']} prompts kept nothing)", flush=True)
        if "ppo" in args.methods:
            out = runs / f"ppo-seed{seed}"
            ppo.append(recipe("ppo", recipe_args("ppo", out, sft_dir, seed, args.smoke), runs / f"ppo-seed{seed}.log",
                              args.reuse))
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            ppo[-1]["max_kl"] = max(m["kl"] for m in metrics)
            ppo[-1]["first_score"] = metrics[0]["score"]
            r = ppo[-1]
            print(f"PPO seed {seed}: {r['init_eval_accuracy']:.3f} -> {r['eval_accuracy']:.3f} "
                  f"(final KL {r['final_kl']:.2f}, max KL {r['max_kl']:.2f})", flush=True)
        if "dpo" in args.methods:
            out = runs / f"dpo-seed{seed}"
            dpo.append(recipe("dpo", recipe_args("dpo", out, sft_dir, seed, args.smoke), runs / f"dpo-seed{seed}.log",
                              args.reuse))
            r = dpo[-1]
            print(f"DPO seed {seed}: {r['init_eval_accuracy']:.3f} -> {r['eval_accuracy']:.3f} "
                  f"(reward accuracy {r['eval_reward_accuracy']:.3f}, kl_gap {r['eval_kl_gap']:.2f})", flush=True)

    pipelines, llama2 = [], []
    for seed in args.seeds:
        for method, outs in (("pipeline", pipelines), ("llama2", llama2)):
            if method in args.methods:
                out = runs / f"{method}-seed{seed}"
                summary = recipe(method, recipe_args(method, out, sft_dir, seed, args.smoke), runs / f"{method}-seed{seed}.log",
                                 args.reuse)
                outs.append(out)
                print(f"{method} seed {seed}: " + "; ".join(
                    f"round {row['round']} {'promoted' if row['promoted'] else 'kept the incumbent'}"
                    for row in summary["rounds"][1:]), flush=True)
    eval_prompts = SMOKE_EVAL_PROMPTS if args.smoke else EVAL_PROMPTS
    if pipelines:
        result = pipeline_result(sft, shown(sft_dir), args.seeds, eval_prompts, pipelines, llama2, dpo, sft_all)
        text = pipeline_table(result)
        write_report(RESULTS / f"loop_accuracy_pipeline_cpu{'_smoke' if args.smoke else ''}.json", result, text)
        print(text)
        return
    result = summarise(sft, shown(sft_dir), args.seeds, eval_prompts, rs, ppo, dpo)
    result["methods"] = args.methods
    text = table(result)
    write_report(RESULTS / f"loop_accuracy_cpu{'_smoke' if args.smoke else ''}.json", result, text)
    print(text)


if __name__ == "__main__":
    main()
