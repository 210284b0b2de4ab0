"""``report_to`` beyond TensorBoard, offline: W&B in offline mode writes its run files for an SFT run (through
transformers' callback, with trainer fields passed through) and for a PPO run (our own loop, through accelerate's
trackers). Skipped where wandb is not installed (``pip install 'finetune[trackers]'``; ``make install`` does)."""

import json
from pathlib import Path

import pytest
import recipe_runs

from finetune.config import PPORunConfig, SFTRunConfig, parse_args
from finetune.runs import eval_points, read_metrics

wandb = pytest.importorskip("wandb")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B writes under ``tmp_path/wandb`` and never reaches the network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "finetune-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # W&B reads its settings (WANDB_DIR) once per process: start from this test's
    yield tmp_path / "wandb"
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def offline_runs(directory: Path) -> list[Path]:
    """The W&B offline runs written under ``directory``, each with its ``run-ID.wandb`` log of the run."""
    return [run for run in sorted(directory.glob("offline-run-*")) if list(run.glob("run-*.wandb"))]


def logged(run: Path, key: str) -> bool:
    """Whether the W&B offline run logged the metric ``key``: its name is in the run's record log
    (``run-ID.wandb``, the protobuf records ``wandb sync`` uploads later)."""
    return key.encode() in next(run.glob("run-*.wandb")).read_bytes()


def test_sft_reports_to_tensorboard_and_wandb_with_trainer_fields_passed_through(tmp_path, wandb_offline):
    out = tmp_path / "sft"
    argv = ["--output_dir", str(out), "--data.max_train_samples=32", "--data.max_eval_samples=8",
            "--eval.num_samples=4", "--train.max_steps=2", "--train.logging_steps=1", "--train.save_steps=1",
            "--train.report_to=tensorboard,wandb", "--trainer.save_strategy=no", "--trainer.logging_first_step=true"]
    assert recipe_runs.run_recipe("sft", SFTRunConfig, argv) == 0
    if wandb.run is not None:
        wandb.finish()
    (run,) = offline_runs(wandb_offline)
    assert logged(run, "train/loss") and logged(run, "train/learning_rate") and not logged(run, "train/kl")
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard stays on beside W&B"
    assert not list(out.glob("checkpoint-*")), "trainer.save_strategy=no reached the trainer: no checkpoint"
    summary = json.loads((out / "summary.json").read_text())
    # No train.eval_steps, so the trainer never evaluated; loss.png's eval curve is the stage's before and after.
    assert eval_points(read_metrics(out), summary) == [(0, summary["base_eval_loss"]), (2, summary["eval_loss"])]


def test_ppo_reports_to_wandb_through_accelerates_trackers(tmp_path, wandb_offline):
    from factories import QUICK, make_sft_run

    from finetune.stages import ppo

    sft_run = make_sft_run(tmp_path / "sft_run")
    cfg = parse_args(PPORunConfig, ["--init", str(sft_run), "--output_dir", str(tmp_path / "ppo"), *QUICK,
                                    "--ppo.num_iterations=1", "--ppo.ppo_epochs=1", "--eval.before_training=false",
                                    "--eval.num_samples=4", "--ppo.report_to=wandb"])
    ppo.train(cfg)
    (run,) = offline_runs(wandb_offline)
    assert all(logged(run, key) for key in ("train/score", "train/kl", "train/policy_loss"))
    assert not list((tmp_path / "ppo").glob("runs/*/events.out.tfevents.*")), "report_to=wandb alone: no TensorBoard"
    assert len(read_metrics(tmp_path / "ppo")) == 1  # metrics.jsonl is written whatever the trackers
