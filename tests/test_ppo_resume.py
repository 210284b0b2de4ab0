"""recipes/ppo.py --resume after a real SIGKILL: the resumed run's figures at every iteration equal those of a run that
was never interrupted, metrics.jsonl holds each iteration once, and a half-written checkpoint is never loaded."""

import json
import sys
from pathlib import Path

import pytest
from recipe_processes import checkpoint_complete, run_to_end, run_until
from test_ppo import QUICK

from finetune.runs import COMPLETE_MARKER, read_metrics

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "ppo.py"
# Adaptive KL with a short horizon, so the coefficient moves every iteration and its checkpointed value matters.
ARGS = [*QUICK, "--data.eval=null", "--ppo.num_iterations=4", "--ppo.save_every=2", "--ppo.save_total_limit=null",
        "--ppo.adaptive_kl=true", "--ppo.kl_target=0.01", "--ppo.kl_horizon=20", "--ppo.whiten_rewards=true",
        "--score.verifier=test_ppo:short_answer"]
FIGURES = ("score", "kl", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "kl_coef",
           "learning_rate", "optimizer_steps")


def command(sft, out, *extra):
    return [sys.executable, RECIPE, "--init", sft, "--output_dir", out, *ARGS, *extra]


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file
    from test_dpo import make_sft_run

    sft = make_sft_run(tmp_path / "sft")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(sft, straight))
    run_until(command(sft, killed), checkpoint_complete(killed, 2))
    assert not (killed / "summary.json").exists()
    # The remains of a crash during the next save: an unmarked checkpoint-3 and a staging directory.
    (killed / "checkpoint-3").mkdir()
    (killed / ".checkpoint-4.staging").mkdir()

    output = run_to_end(command(sft, killed, "--resume"))
    assert "resuming from" in output and "checkpoint-2 (iteration 2 of 4)" in output
    assert "discarded incomplete checkpoint" in output and "checkpoint-3" in output

    rows, expected = read_metrics(killed), read_metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], "each iteration logged once"
    assert expected[0]["kl_coef"] != expected[-1]["kl_coef"], "the adaptive KL coefficient moved"
    for row, want in zip(rows, expected):
        assert {k: row[k] for k in FIGURES} == pytest.approx({k: want[k] for k in FIGURES}, rel=1e-6, abs=1e-9), row["step"]
    rollouts = [json.loads(line) for line in (killed / "rollouts.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rollouts] == [r["iteration"] for r in map(json.loads, (straight / "rollouts.jsonl").open())]
    assert [r["response"] for r in rollouts] == [json.loads(line)["response"] for line in (straight / "rollouts.jsonl").open()]
    # The final weights agree too, and both runs ended with a complete checkpoint of the last iteration.
    for name in ("adapter_model.safetensors", "value/value_head.safetensors"):
        a, b = load_file(killed / name), load_file(straight / name)
        assert a.keys() == b.keys() and all(a[k].allclose(b[k], rtol=1e-5, atol=1e-7) for k in a), name
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((killed / c / COMPLETE_MARKER).is_file() for c in ("checkpoint-2", "checkpoint-4"))
    assert not list(killed.glob(".checkpoint-*"))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["optimizer_steps"] == expected[-1]["optimizer_steps"]
