"""recipes/ppo.py --resume after a real SIGKILL: the resumed run's figures at every iteration equal those of a run that
was never interrupted, metrics.jsonl holds each iteration once, and a half-written checkpoint is never loaded."""

import json
import sys
from pathlib import Path

import pytest
from factories import QUICK
from recipe_processes import checkpoint_complete, run_to_end, run_until

from finetune.runs import CHECKPOINT_COMPLETE, read_metrics

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "ppo.py"
# Adaptive KL with a short horizon, so the coefficient moves every iteration and its checkpointed value matters.
ARGS = [*QUICK, "--data.eval=null", "--ppo.num_iterations=4", "--ppo.save_every=2", "--ppo.save_total_limit=null",
        "--ppo.adaptive_kl=true", "--ppo.kl_target=0.01", "--ppo.kl_horizon=20", "--ppo.whiten_rewards=true",
        "--score.verifier=toy_verifiers:short_answer"]
FIGURES = ("score", "kl", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "kl_coef",
           "learning_rate", "optimizer_steps")


def command(sft, out, *extra):
    return [sys.executable, RECIPE, "--init", sft, "--output_dir", out, *ARGS, *extra]


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    from factories import make_sft_run
    from safetensors.torch import load_file

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
    assert all((killed / c / CHECKPOINT_COMPLETE).is_file() for c in ("checkpoint-2", "checkpoint-4"))
    assert not list(killed.glob(".checkpoint-*"))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["optimizer_steps"] == expected[-1]["optimizer_steps"]


def test_loop_checkpoint_restores_weights_optimizer_scheduler_and_every_random_stream(tmp_path):
    """finetune.training_loop's checkpoint, on a two-parameter module (one frozen): after loading, the trainable
    weights, the optimizer's moments, the scheduler, the global RNGs and the loop's own generator are where they were
    at the save, so the next draws and the next step equal an uninterrupted run's; the frozen weight is not saved."""
    import random

    import numpy as np
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from finetune.config import ConfigError
    from finetune.training_loop import load_checkpoint, save_checkpoint

    def build():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        module[1].requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        accelerator = Accelerator(cpu=True)
        return (accelerator, *accelerator.prepare(module, optimizer, scheduler), torch.Generator().manual_seed(7))

    def step(module, optimizer, scheduler, generator):
        x = torch.randn(4, 3, generator=generator) + torch.rand(1).item() + random.random() + np.random.rand()
        module(x).pow(2).mean().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()

    accelerator, module, optimizer, scheduler, generator = build()
    step(module, optimizer, scheduler, generator)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    path = save_checkpoint(tmp_path, 1, accelerator, module, generator, {"iteration": 1}, keep=None)
    assert set(load_file(path / "trainable.safetensors")) == {"0.weight", "0.bias"}, "the frozen layer is not saved"
    step(module, optimizer, scheduler, generator)
    expected = [p.detach().clone() for p in module.parameters()], scheduler.get_last_lr()

    accelerator, module, optimizer, scheduler, generator = build()
    torch.rand(5), random.random(), np.random.rand()  # streams moved on: the checkpoint must put them back
    assert load_checkpoint(path, accelerator, module, generator) == {"iteration": 1, "num_processes": 1}
    step(module, optimizer, scheduler, generator)
    for got, want in zip(module.parameters(), expected[0]):
        assert torch.equal(got.detach(), want)
    assert scheduler.get_last_lr() == expected[1]

    other = torch.nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="trainable tensors of .* are not this run's"):
        load_checkpoint(path, accelerator, other, generator)
