"""The run directory contract: refusal to clobber, complete-checkpoint detection, NaN guard."""

import math

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune.config import ConfigError
from finetune.runs import (
    COMPLETE_MARKER,
    NonFiniteLossCallback,
    discard_incomplete_checkpoints,
    latest_complete_checkpoint,
    prepare_output_dir,
    whole_run_train_loss,
)


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "old.txt").write_text("previous run")
    with pytest.raises(ConfigError, match="not empty; pass --resume .* or --overwrite"):
        prepare_output_dir(tmp_path, resume=False, overwrite=False)
    assert (tmp_path / "old.txt").exists()
    prepare_output_dir(tmp_path, resume=False, overwrite=True)
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False)


def test_half_written_checkpoint_is_never_resumed_from(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).write_text("{}")
    # checkpoint-6 was being written when the process died: no marker.
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"
    removed = discard_incomplete_checkpoints(tmp_path)
    assert [p.name for p in removed] == ["checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_stops_without_saving(tmp_path, bad):
    guard = NonFiniteLossCallback()
    control = TrainerControl(should_save=True)
    state = TrainerState(global_step=7)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    guard.on_log(args, state, control, logs={"loss": 1.5})
    assert not control.should_training_stop and guard.bad_step is None
    guard.on_log(args, state, control, logs={"loss": bad})
    assert control.should_training_stop and not control.should_save
    assert guard.bad_step == 7


def test_non_finite_gradient_norm_also_stops(tmp_path):
    guard = NonFiniteLossCallback()
    control = TrainerControl(should_save=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    guard.on_log(args, TrainerState(global_step=2), control, logs={"loss": 6.9, "grad_norm": math.nan})
    assert control.should_training_stop and not control.should_save
    assert guard.bad_value == "grad_norm nan"


def test_whole_run_train_loss_folds_in_the_steps_before_the_checkpoint():
    """Losses 4, 3 (steps 1-2, logged at step 2), 2, 1 (steps 3-4, logged at 4), checkpoint at 4, then steps 5-6 at a
    mean of 0.5 after the resume. transformers reports 0.5 (this call's steps); the run's mean is (7 + 3 + 1) / 6."""
    from types import SimpleNamespace

    history = [{"step": 2, "loss": 3.5}, {"step": 4, "loss": 1.5}, {"step": 4, "eval_loss": 9.0}]
    resumed = SimpleNamespace(training_loss=0.5, global_step=6)
    assert whole_run_train_loss(resumed, [*history, {"step": 6, "loss": 0.5}], "out/checkpoint-4") == pytest.approx(
        11 / 6)
    straight = SimpleNamespace(training_loss=11 / 6, global_step=6)
    assert whole_run_train_loss(straight, history, None) == 11 / 6
