"""The output directory of a run: what it holds, how it is created, resumed and reported.

Every stage leaves the same things: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, the adapter or model, the
tokenizer with its chat template, TensorBoard events, ``loss.png`` and ``checkpoint-N/`` directories. A checkpoint
counts as complete only once the trainer has finished writing it and a marker file has been renamed into place, so
a run killed half-way through a save is never resumed from the half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from transformers import TrainerCallback

from .config import ConfigError, to_dict

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so a reader sees either the old content or all of the new, never part of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def process_state():
    """accelerate's process state, created CPU-aware: a plain ``PartialState()`` made before the trainer's
    ``Accelerator`` would pin every CPU process to a non-distributed state and break CPU DDP."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def trainer_arguments(cfg, output_dir: Path, has_eval: bool) -> dict:
    """The ``TrainingArguments`` fields every TRL trainer we compose (SFT, DPO, reward) shares, set explicitly from
    ``cfg.train`` / ``cfg.model`` so TRL's defaults (bf16, gradient checkpointing on) never decide for us silently.
    Each stage adds its own fields and hands the union to its TRL config class."""
    import torch

    from .models import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype)
    train, eval_every = cfg.train, cfg.train.eval_steps
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.per_device_batch_size,
        per_device_eval_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_epochs,
        max_steps=train.max_steps,
        warmup_steps=train.warmup_ratio,  # below 1 transformers reads it as a ratio of the total steps
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if (has_eval and eval_every) else "no",
        eval_steps=eval_every,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.model.gradient_checkpointing else None,
        report_to=["tensorboard"],
        logging_nan_inf_filter=False,  # the default logs a NaN loss as 0, hiding it from NonFiniteLossCallback
        save_only_model=False,
        dataset_num_proc=None,
        remove_unused_columns=True,
        max_length=cfg.data.max_length,
    )


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, is_main_process: bool = True) -> Path:
    """Create ``output_dir``; refuse a non-empty one unless resuming or overwriting (never silently clobber a run)."""
    path = Path(output_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    non_empty = path.is_dir() and any(path.iterdir())
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} exists and is not a directory")
    if resume and latest_complete_checkpoint(path) is None:
        raise ConfigError(f"--resume: no complete checkpoint-N/ in {path} to resume from")
    if non_empty and not resume:
        if not overwrite:
            raise ConfigError(
                f"output_dir {path} is not empty; pass --resume to continue that run or --overwrite to replace it"
            )
        if is_main_process:
            shutil.rmtree(path)
    if is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """All ``checkpoint-N`` directories, oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for child in Path(output_dir).iterdir():
            m = _CHECKPOINT.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose completion marker exists (half-written ones are ignored)."""
    for _, path in reversed(checkpoints(output_dir)):
        if (path / COMPLETE_MARKER).is_file():
            return path
    return None


def discard_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Remove checkpoints newer than the latest complete one (the remains of a crash during a save)."""
    latest = latest_complete_checkpoint(output_dir)
    latest_step = int(_CHECKPOINT.match(latest.name).group(1)) if latest else -1
    removed = []
    for step, path in checkpoints(output_dir):
        if step > latest_step or not (path / COMPLETE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def whole_run_train_loss(train_result, log_history: list[dict], resumed_from: Path | None) -> float:
    """The mean training loss over every optimizer step of the run, resumed or not.

    transformers' ``training_loss`` averages over the steps of this ``train()`` call only, so after ``--resume`` it
    leaves out the steps before the checkpoint. Those are in the log history the checkpoint restored: each logged
    ``loss`` is the mean over the steps since the previous log. Exact when ``logging_steps`` divides
    ``save_steps``; otherwise the steps between the checkpoint's last log and the checkpoint count at the mean of
    the logged ones.
    """
    if resumed_from is None:
        return train_result.training_loss
    start = int(_CHECKPOINT.match(Path(resumed_from).name).group(1))
    logged = sorted((row["step"], row["loss"]) for row in log_history if "loss" in row and row["step"] <= start)
    if not logged or start == 0:
        return train_result.training_loss
    total, previous = 0.0, 0
    for step, loss in logged:
        total += loss * (step - previous)
        previous = step
    before = total / previous * start
    after = train_result.training_loss * (train_result.global_step - start)
    return (before + after) / max(train_result.global_step, 1)


def write_config(output_dir: Path, config) -> None:
    atomic_write_text(Path(output_dir) / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))


def write_summary(output_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(output_dir) / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")


def two_column_table(headings: tuple[str, str], rows: list[tuple[str, object, object]]) -> str:
    """The figures a recipe prints at the end: a label and two values per row (``-`` where one is missing), under
    ``headings`` such as ``("before", "after")``."""

    def cell(value) -> str:
        return f"{value:>10.4f}" if isinstance(value, float) else f"{'-':>10}"

    lines = [f"{'':<20}{headings[0]:>10}{headings[1]:>10}"]
    lines += [f"{label:<20}{cell(first)}{cell(second)}" for label, first, second in rows]
    return "\n".join(lines)


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(output_dir: Path) -> Path | None:
    """``loss.png``: training loss per step, eval loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(Path(output_dir).name)
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(output_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class RunCallback(TrainerCallback):
    """Writes ``metrics.jsonl``, marks checkpoints complete, and stops on a non-finite loss.

    Logged rows carry ``step``, ``loss``, ``learning_rate`` and ``tokens_per_second`` (tokens of the inputs seen
    since the previous log, divided by the wall time since then; TRL's ``num_tokens`` counts them).
    """

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self._last_time: float | None = None
        self._last_tokens: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            if isinstance(value, (int, float)):
                row[key] = value
        now = time.perf_counter()
        if "num_tokens" in logs:
            tokens = float(logs["num_tokens"])
            if self._last_tokens is not None and self._last_time is not None and now > self._last_time:
                row["tokens_per_second"] = (tokens - self._last_tokens) / (now - self._last_time)
            elif state.global_step and self._last_time is not None and now > self._last_time:
                row["tokens_per_second"] = tokens / (now - self._last_time)
            self._last_tokens, self._last_time = tokens, now
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self.output_dir / f"checkpoint-{state.global_step}"
        if path.is_dir():
            atomic_write_text(path / COMPLETE_MARKER, json.dumps({"step": state.global_step}))


class NonFiniteLossCallback(TrainerCallback):
    """Stop at the first logged NaN/inf loss or gradient norm, without saving: the last checkpoint stays the last
    good one. (Trainers must log with ``logging_nan_inf_filter=False``, or transformers hides a NaN loss as 0.)"""

    def __init__(self):
        self.bad_step: int | None = None
        self.bad_value: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value) and self.bad_step is None:
                self.bad_step, self.bad_value = state.global_step, f"{key} {value}"
        if self.bad_step is not None:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
        return control


def train_resumable(trainer, output_dir: Path, resume: bool, nan_guard: NonFiniteLossCallback, is_main_process: bool,
                    train_report) -> dict:
    """Run a composed TRL trainer: from the newest complete checkpoint when ``resume``, stopping with a one-line
    error when ``nan_guard`` saw a non-finite loss (nothing saved; the last good checkpoint is named). Returns the
    summary's training figures: ``train_loss`` (over the whole run, resumed or not), ``train_steps``,
    ``train_seconds`` and ``train_data`` (``train_report``, what was kept, cut and skipped)."""
    resume_from = latest_complete_checkpoint(output_dir) if resume else None
    if resume_from and is_main_process:
        print(f"resuming from {resume_from}")
    started = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - started
    if nan_guard.bad_step is not None:
        last_good = latest_complete_checkpoint(output_dir)
        raise NonFiniteLossError(
            f"{nan_guard.bad_value} at step {nan_guard.bad_step}; stopped without saving. "
            f"Last good checkpoint: {last_good or 'none'}. Lower train.learning_rate or check the data."
        )
    return dict(
        train_loss=whole_run_train_loss(train_result, trainer.state.log_history, resume_from),
        train_steps=train_result.global_step,
        train_seconds=train_seconds,
        train_data=train_report.as_dict(),
    )
