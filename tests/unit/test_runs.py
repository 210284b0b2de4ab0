"""The run directory contract: what --overwrite may replace, resume and restart, complete-checkpoint detection and
rotation, the NaN and divergence guard, and reading a run back (finetune.run_dir)."""

import json
import math
import os

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune.config import ConfigError, SFTRunConfig
from finetune.run_dir import RunDir, open_run, write_run_state
from finetune.runs import (
    CHECKPOINT_COMPLETE,
    NonFiniteLossCallback,
    NonFiniteLossError,
    RunCallback,
    discard_incomplete_checkpoints,
    diverged,
    last_good_checkpoint,
    latest_complete_checkpoint,
    plan_output_dir,
    prepare_output_dir,
    read_metrics,
    stop_on_non_finite,
    whole_run_train_loss,
    write_config,
)


def make_run(path, status="finished", checkpoints=(), metrics_steps=()):
    """A run directory as the scaffold leaves it: config.yaml, run.json, metrics rows, complete checkpoints."""
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, SFTRunConfig(output_dir=str(path)))
    write_run_state(path, "sft", "running")
    if status == "finished":
        write_run_state(path, "sft", "finished", "adapter")
    for step in checkpoints:
        (path / f"checkpoint-{step}").mkdir()
        (path / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text("{}")
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in metrics_steps))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Preparing the output directory


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="not empty; pass --resume .* or --overwrite"):
        prepare_output_dir(run, resume=False, overwrite=False)
    assert (run / "config.yaml").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "old.txt").write_text("someone's file")
    with pytest.raises(ConfigError, match="not a run directory"):
        prepare_output_dir(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "old.txt").read_text() == "someone's file"


def test_overwrite_accepts_an_export_directory(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export_metadata.json").write_text("{}")
    assert plan_output_dir(tmp_path / "export", resume=False, overwrite=True) == "replace"


def test_overwrite_refuses_the_current_directory_and_its_parents(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match="current directory"):
        plan_output_dir(".", resume=False, overwrite=True)
    (run / "work").mkdir()
    monkeypatch.chdir(run / "work")
    with pytest.raises(ConfigError, match="current directory or one of its parents"):
        plan_output_dir(run, resume=False, overwrite=True)


def test_overwrite_refuses_a_parent_of_the_project(monkeypatch):
    from finetune.runs import project_root

    # From / the project's parent is neither the current directory nor one of its parents (a checkout under /tmp
    # would otherwise be refused by that rule first, whatever tmp_path is).
    monkeypatch.chdir("/")
    with pytest.raises(ConfigError, match="holds the finetune project"):
        plan_output_dir(project_root().parent, resume=False, overwrite=True)


@pytest.mark.parametrize("key", ["data.train", "data.eval", "init"])
def test_overwrite_refuses_a_run_holding_this_runs_own_inputs(tmp_path, key):
    """The data (or the run to start from) inside the output directory, or the output directory a parent of them:
    replacing it would delete what the run is about to read."""
    run = make_run(tmp_path / "run")
    inside = run / "data" / "train.jsonl"
    inside.parent.mkdir()
    inside.write_text("{}\n")
    with pytest.raises(ConfigError, match=f"holds this run's own input {key}="):
        plan_output_dir(run, resume=False, overwrite=True, inputs={key: str(inside)})
    with pytest.raises(ConfigError, match=f"holds this run's own input {key}="):
        plan_output_dir(tmp_path / "run", resume=False, overwrite=True, inputs={key: str(tmp_path / "run")})
    assert inside.is_file()


def test_overwrite_moves_the_old_run_aside_until_the_new_one_finishes(tmp_path):
    run = make_run(tmp_path / "run", checkpoints=[2])
    (run / "adapter_model.safetensors").write_text("old weights")
    prepared = prepare_output_dir(run, resume=False, overwrite=True)
    assert prepared.action == "replace" and run.is_dir() and not any(run.iterdir())
    assert (prepared.replaced / "adapter_model.safetensors").read_text() == "old weights"
    aside = prepared.replaced.parent
    prepared.commit()
    assert not aside.exists() and sorted(os.listdir(tmp_path)) == ["run"]


def test_a_failed_overwrite_puts_the_old_run_back(tmp_path):
    run = make_run(tmp_path / "run", checkpoints=[2])
    (run / "adapter_model.safetensors").write_text("old weights")
    prepared = prepare_output_dir(run, resume=False, overwrite=True)
    (run / "config.yaml").write_text("the failed run's")
    prepared.abandon()
    assert (run / "adapter_model.safetensors").read_text() == "old weights"
    assert (run / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file() and RunDir.read(run).finished
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_an_unfinished_run_with_nothing_to_resume_is_restarted_without_asking(tmp_path):
    """A run killed before (or while) writing its first checkpoint: a plain rerun replaces it."""
    run = make_run(tmp_path / "run", status="running", metrics_steps=[1, 2])
    (run / "checkpoint-2").mkdir()  # half-written: no marker
    prepared = prepare_output_dir(run, resume=False, overwrite=False)
    assert prepared.action == "restart" and not any(run.iterdir())


def test_an_unfinished_run_with_a_checkpoint_needs_resume_or_overwrite(tmp_path):
    run = make_run(tmp_path / "run", status="running", checkpoints=[2])
    with pytest.raises(ConfigError, match="not empty; pass --resume"):
        plan_output_dir(run, resume=False, overwrite=False)


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(ConfigError, match="holds no run to resume"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no run to resume"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False)


def test_resume_rewinds_metrics_to_the_checkpoint(tmp_path):
    """The killed run logged steps 1-5 after checkpoint-4; the resumed run logs 5 again, so the file keeps 1-4."""
    run = make_run(tmp_path / "run", status="running", checkpoints=[2, 4], metrics_steps=[1, 2, 3, 4, 5])
    (run / "checkpoint-6").mkdir()
    prepare_output_dir(run, resume=True, overwrite=False)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert not (run / "checkpoint-6").exists()


def test_resume_without_a_complete_checkpoint_starts_from_the_beginning(tmp_path, capsys):
    """A kill during the very first checkpoint: --resume accepts the directory and starts afresh."""
    run = make_run(tmp_path / "run", status="running", metrics_steps=[1, 2])
    (run / "checkpoint-2").mkdir()
    assert prepare_output_dir(run, resume=True, overwrite=False).action == "resume"
    assert "starting from the beginning" in capsys.readouterr().out
    assert read_metrics(run) == [] and not (run / "checkpoint-2").exists()


def test_half_written_checkpoint_is_never_resumed_from(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / CHECKPOINT_COMPLETE).write_text("{}")
    (tmp_path / "checkpoint-4" / CHECKPOINT_COMPLETE).write_text("{}")
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


# ---------------------------------------------------------------------------------------------------------------
# Rotation: the new checkpoint's marker before any old checkpoint goes


def test_rotation_marks_the_new_checkpoint_before_removing_the_old(tmp_path, monkeypatch):
    """save_total_limit=1: at the save of step 4, checkpoint-4 is marked complete first; if the process dies while
    checkpoint-2 is being removed (simulated: the removal raises), checkpoint-4 is already resumable."""
    import shutil

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / CHECKPOINT_COMPLETE).write_text("{}")
    callback = RunCallback(tmp_path, keep=1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])

    def killed(path, *a, **k):
        raise KeyboardInterrupt("killed while removing " + str(path))

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        callback.on_save(args, TrainerState(global_step=4), TrainerControl())
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert not (tmp_path / "checkpoint-2" / CHECKPOINT_COMPLETE).exists(), "its marker goes first"
    monkeypatch.undo()
    callback.on_save(args, TrainerState(global_step=4), TrainerControl())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


# ---------------------------------------------------------------------------------------------------------------
# Divergence and the last good checkpoint


def test_divergence_is_twice_the_lowest_loss_and_three_nats_above_it():
    """Lowest 1.0: 4.0 is the threshold (max(2 * 1, 1 + 3)); lowest 5.0: 10.0 (max(10, 8))."""
    assert not diverged(4.0, 1.0) and diverged(4.01, 1.0)
    assert not diverged(10.0, 5.0) and diverged(10.01, 5.0)
    assert not diverged(1e9, None)


def test_the_guard_keeps_the_last_good_step_and_stops_on_divergence(tmp_path):
    guard = NonFiniteLossCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    control = TrainerControl()
    for step, loss in ((1, 3.0), (2, 2.0), (3, 2.5)):
        guard.on_log(args, TrainerState(global_step=step), control, logs={"loss": loss})
    assert guard.last_good_step == 3 and guard.bad_step is None and not control.should_training_stop
    guard.on_log(args, TrainerState(global_step=4), control, logs={"loss": 5.5})
    assert guard.bad_step == 4 and "diverged" in guard.bad_value and control.should_training_stop
    assert guard.last_good_step == 3


def test_last_good_checkpoint_is_before_the_last_good_step(tmp_path):
    """Checkpoint c's weights are first used by step c + 1: with the last good log at step 4, checkpoint-4 is
    unproven and checkpoint-3 is the last good one."""
    for step in (2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text("{}")
    assert last_good_checkpoint(tmp_path, 4).name == "checkpoint-3"
    assert last_good_checkpoint(tmp_path, 2) is None


def test_rl_loop_stop_names_the_checkpoint_before_the_last_finite_iteration_and_unmarks_the_rest(tmp_path):
    """PPO and GRPO stop at their first iteration with a NaN figure. Iteration 4's rollout ran on checkpoint-3's
    weights, so checkpoint-2 is the last good one and checkpoint-3 is unmarked: --resume continues from
    checkpoint-2."""
    for step in (2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text("{}")
    stop_on_non_finite({"kl": 0.1, "grad_norm": 2.0}, 4, tmp_path, True, "ppo.learning_rate")  # finite: goes on
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-3"
    with pytest.raises(NonFiniteLossError) as stop:
        stop_on_non_finite({"kl": 0.1, "grad_norm": math.nan}, 4, tmp_path, True, "ppo.learning_rate")
    assert str(stop.value) == (f"iteration 4: non-finite grad_norm nan; stopped without saving. Last good "
                               f"checkpoint: {tmp_path / 'checkpoint-2'}. Lower ppo.learning_rate.")
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert (tmp_path / "checkpoint-3").is_dir()  # kept, to look at, but not resumed from


# ---------------------------------------------------------------------------------------------------------------
# Reading a run back


def test_run_dir_reads_kind_base_template_and_whether_it_finished(tmp_path):
    run = make_run(tmp_path / "run", status="running")
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "elsewhere"}))
    (run / "adapter_model.bin").write_bytes(b"")
    read = RunDir.read(run)
    assert read.kind == "adapter" and read.base_model == "tiny" and read.template == "llama3"
    assert read.stage == "sft" and not read.finished
    with pytest.raises(ConfigError, match="did not finish"):
        open_run(run)
    write_run_state(run, "sft", "finished", "adapter")
    assert open_run(run).finished
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished" and state["kind"] == "adapter" and state["started"] <= state["finished"]


def test_a_checkpoint_reads_as_its_runs_adapter_with_the_runs_config(tmp_path):
    """A DPO trainer's checkpoint-STEP/ holds the adapter and trainer state; its base, template and tokenizer are the
    run's. It counts as finished once its completion marker is there, whatever the run's own state."""
    from finetune.run_dir import is_checkpoint_directory

    run = make_run(tmp_path / "run", status="running", checkpoints=[4])
    (run / "checkpoint-6").mkdir()  # being written: no marker yet
    for step in (4, 6):
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
        (run / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"")
    read = RunDir.read_checkpoint(run / "checkpoint-4")
    assert read.kind == "adapter" and read.base_model == "tiny" and read.template == "llama3" and read.finished
    assert read.run_path == run and read.files_path == run and read.state["checkpoint"] == 4
    assert not RunDir.read_checkpoint(run / "checkpoint-6").finished
    assert RunDir.read_any(run / "checkpoint-4") == read and RunDir.read_any(run).files_path == run
    assert is_checkpoint_directory(run / "checkpoint-4") and not is_checkpoint_directory(run)
    (tmp_path / "checkpoint-2").mkdir()  # not inside a run
    assert not is_checkpoint_directory(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigError, match="not a checkpoint-STEP directory of a run"):
        RunDir.read_checkpoint(tmp_path / "checkpoint-2")


def test_a_model_directory_without_run_json_is_taken_as_it_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    read = open_run(tmp_path)
    assert read.kind == "full" and read.finished and read.config == {}


def test_export_chat_and_the_reward_scorer_refuse_a_run_that_did_not_finish(tmp_path):
    """A run killed or failed after its adapter files appeared (run.json still says running) is not exported,
    chatted with or scored with; once finished, export reads it."""
    from finetune.chat import load_chat_model
    from finetune.export import ExportError, inspect_run
    from finetune.reward_model import load_reward_model

    run = make_run(tmp_path / "run", status="running")
    (run / "adapter_config.json").write_text("{}")
    (run / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="did not finish"):
        inspect_run(run)
    with pytest.raises(ExportError, match="did not finish"):
        load_chat_model(str(run))
    with pytest.raises(ConfigError, match="did not finish"):
        load_reward_model(run)
    write_run_state(run, "sft", "finished", "adapter")
    assert inspect_run(run).has_adapter
