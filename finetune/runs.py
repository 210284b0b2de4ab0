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
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import TrainerCallback

from .config import ConfigError, to_dict
from .run_dir import CHECKPOINT_COMPLETE, CHECKPOINT_NAME


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
    Each stage adds its own fields and hands the union, with the config's ``trainer`` pass-through section, to
    ``finetune.trainer_config.trainer_config`` (which refuses a pass-through key that one of these already sets)."""
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
        save_total_limit=None,  # RunCallback rotates, after the new checkpoint's marker is in place
        eval_strategy="steps" if (has_eval and eval_every) else "no",
        eval_steps=eval_every,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        # transformers 5 names it activation checkpointing; the old gradient_checkpointing names warn on every run
        activation_checkpointing=cfg.model.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.model.gradient_checkpointing else None,
        report_to=list(train.report_to),
        logging_nan_inf_filter=False,  # the default logs a NaN loss as 0, hiding it from NonFiniteLossCallback
        save_only_model=False,
        dataset_num_proc=None,
        remove_unused_columns=True,
        max_length=cfg.data.max_length,
    )


def project_root() -> Path:
    """The directory holding this package (the checkout, or site-packages when installed)."""
    return Path(__file__).resolve().parent.parent


def _holds(directory: Path, path: Path) -> bool:
    return path == directory or path.is_relative_to(directory)


def check_replaceable(path: Path, inputs: dict[str, str] | None = None) -> None:
    """Refuse to replace ``path`` (``--overwrite``, or restarting an unfinished run) unless it is one of our run or
    export directories and holds nothing this run or this machine's user still needs.

    Raises:
        ConfigError: ``path`` is the current directory or a parent of it, holds the project, holds one of
            ``inputs`` (``{"data.train": path, ...}``: the run's own data, init run, reward run or base model), or is
            not a run or export directory.
    """
    from .run_dir import is_export_directory, is_run_directory

    resolved = path.resolve()
    refuse = f"--overwrite: refusing to replace {path}"
    if _holds(resolved, Path.cwd().resolve()):
        raise ConfigError(f"{refuse}: it is the current directory or one of its parents")
    if _holds(resolved, project_root()):
        raise ConfigError(f"{refuse}: it holds the finetune project itself ({project_root()})")
    for name, value in (inputs or {}).items():
        if value and Path(value).exists() and _holds(resolved, Path(value).resolve()):
            raise ConfigError(f"{refuse}: it holds this run's own input {name}={value}")
    if not (is_run_directory(path) or is_export_directory(path)):
        raise ConfigError(f"{refuse}: it is not a run directory (no config.yaml or run.json) nor an export; remove it "
                          f"yourself or choose another --output_dir")


def run_inputs(cfg) -> dict[str, str]:
    """The paths a stage config reads (data, the init run, the reward run, a local base model), by config key."""
    found = {}
    for key in ("init", "model.name", "data.train", "data.eval", "score.reward_model"):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str) and value:
            found[key] = value
    return found


@dataclass
class OutputDir:
    """A run's output directory, prepared. With ``--overwrite`` the previous run is moved aside (``replaced``), not
    deleted: :meth:`commit` removes it once this run has finished, :meth:`abandon` puts it back if this run fails."""

    path: Path
    action: str
    """``create`` (new or empty), ``restart`` (an unfinished run with nothing to resume, replaced), ``replace``
    (``--overwrite``) or ``resume``."""
    replaced: Path | None = None

    def commit(self) -> None:
        if self.replaced is not None:
            shutil.rmtree(self.replaced.parent, ignore_errors=True)
            self.replaced = None

    def abandon(self) -> None:
        """This run failed: with ``--overwrite``, the previous run comes back in place of this one's remains."""
        if self.replaced is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self.replaced, self.path)
            shutil.rmtree(self.replaced.parent, ignore_errors=True)
            print(f"the previous run in {self.path} is restored (this run failed)", file=sys.stderr)
            self.replaced = None


def plan_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, inputs: dict[str, str] | None = None,
                    has_progress=None) -> str:
    """What preparing ``output_dir`` will do (see :attr:`OutputDir.action`), decided before anything changes, the
    same on every process. ``has_progress(path)``: whether an unfinished run there has something to resume
    (default: a complete checkpoint); without it, a plain rerun restarts it without asking.

    Raises:
        ConfigError: a contradiction, a non-empty directory without ``--resume``/``--overwrite``, ``--resume`` of
            something that is no run, or a directory :func:`check_replaceable` refuses.
    """
    from .run_dir import RunDir, is_run_directory

    path = Path(output_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} exists and is not a directory")
    empty = not path.exists() or not any(path.iterdir())
    if resume:
        if empty or not is_run_directory(path):
            raise ConfigError(f"--resume: {path} holds no run to resume (no config.yaml or run.json)")
        return "resume"
    if empty:
        return "create"
    progress = has_progress or (lambda p: latest_complete_checkpoint(p) is not None)
    if is_run_directory(path) and not RunDir.read(path).finished and not progress(path):
        check_replaceable(path, inputs)
        return "restart"
    if not overwrite:
        raise ConfigError(
            f"output_dir {path} is not empty; pass --resume to continue that run or --overwrite to replace it"
        )
    check_replaceable(path, inputs)
    return "replace"


def apply_output_dir(output_dir: str | Path, action: str, is_main_process: bool = True,
                     report_checkpoint: bool = True) -> OutputDir:
    """Carry out :func:`plan_output_dir`'s ``action`` (the main process changes the file system). A resume says
    when there is no checkpoint to continue from, unless ``report_checkpoint`` is off: a run whose progress is not
    (only) its checkpoints, the pipeline's finished stages or rejection sampling's samples, says what it reuses."""
    path = Path(output_dir)
    prepared = OutputDir(path, action)
    if not is_main_process:
        return prepared
    if action == "replace":
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.replaced-", dir=path.resolve().parent))
        os.replace(path, aside / path.name)
        prepared.replaced = aside / path.name
        print(f"--overwrite: the previous run is in {aside} until this one finishes")
    elif action == "restart":
        shutil.rmtree(path)
    elif action == "resume":
        for removed in discard_incomplete_checkpoints(path):
            print(f"discarded incomplete checkpoint {removed}")
        latest = latest_complete_checkpoint(path)
        if latest is None and report_checkpoint:
            print(f"--resume: no complete checkpoint in {path}; starting from the beginning")
        rewind_metrics(path, checkpoint_step(latest) if latest else 0)
    path.mkdir(parents=True, exist_ok=True)
    return prepared


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, is_main_process: bool = True,
                       inputs: dict[str, str] | None = None) -> OutputDir:
    """:func:`plan_output_dir` then :func:`apply_output_dir`, for one process."""
    return apply_output_dir(output_dir, plan_output_dir(output_dir, resume, overwrite, inputs), is_main_process)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.match(Path(path).name).group(1))


def rewind_metrics(output_dir: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (the checkpoint a resumed run continues from): the steps
    after it are run again and logged again, once."""
    path = Path(output_dir) / "metrics.jsonl"
    if path.exists():
        kept = [row for row in read_metrics(output_dir) if row.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, its completion marker first, so a kill half-way leaves an incomplete one (ignored)."""
    (Path(path) / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, output_dir: Path) -> None:
    """Move everything in ``staging`` (the final model or adapter, tokenizer, generation config, written there
    first) into ``output_dir``, one rename per entry, then remove ``staging``: a reader never sees a half-written
    file, and ``run.json`` says ``finished`` only after this."""
    for entry in sorted(Path(staging).iterdir()):
        target = Path(output_dir) / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    Path(staging).rmdir()


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """All ``checkpoint-N`` directories, oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for child in Path(output_dir).iterdir():
            m = CHECKPOINT_NAME.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
    return sorted(found)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` directories whose completion marker exists, oldest first (half-written ones left out)."""
    return [path for _, path in checkpoints(output_dir) if (path / CHECKPOINT_COMPLETE).is_file()]


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose completion marker exists (half-written ones are ignored)."""
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def discard_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Remove checkpoints newer than the latest complete one (the remains of a crash during a save)."""
    latest = latest_complete_checkpoint(output_dir)
    latest_step = checkpoint_step(latest) if latest else -1
    removed = []
    for step, path in checkpoints(output_dir):
        if step > latest_step or not (path / CHECKPOINT_COMPLETE).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for staging in Path(output_dir).glob(".final-staging*"):  # the remains of a kill while publishing
        shutil.rmtree(staging, ignore_errors=True)
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
    start = int(CHECKPOINT_NAME.match(Path(resumed_from).name).group(1))
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


def eval_points(rows: list[dict], summary: dict | None) -> list[tuple[int, float]]:
    """The eval-loss curve: the trainer's evaluations in ``rows`` (``eval_loss`` every ``train.eval_steps`` or as
    ``trainer.eval_strategy`` says), plus the stage's own measurements in ``summary``: the model before training
    (``base_eval_loss`` or ``init_eval_loss``) at step 0 and the trained one (``eval_loss``) at the last step. So a
    run with eval data has an eval curve even when the trainer itself never evaluated. One point per step, the
    trainer's where both measured it (a metrics file written before resume rewound it may repeat steps)."""
    points = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    summary = summary if rows else {}  # no rows: no trainer ran in this directory (rejection sampling's top level)
    before = summary.get("base_eval_loss", summary.get("init_eval_loss"))
    if isinstance(before, (int, float)):
        points.setdefault(0, before)
    last_step = summary.get("train_steps") or max((r["step"] for r in rows if "loss" in r), default=None)
    if isinstance(summary.get("eval_loss"), (int, float)) and last_step is not None:
        points.setdefault(last_step, summary["eval_loss"])
    return sorted(points.items())


def plot_loss(output_dir: Path, summary: dict | None = None) -> Path | None:
    """``loss.png``: training loss per step, and the eval loss wherever it was measured (:func:`eval_points`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(output_dir)
    # One point per step, the latest row's (a metrics file written before resume rewound it may repeat steps).
    train = sorted({r["step"]: r["loss"] for r in rows if "loss" in r}.items())
    evals = eval_points(rows, summary)
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


def log_line(logs: dict, step: int, max_steps: int) -> str:
    """A trainer's log row as one line a person reads, instead of transformers' dict of strings::

        step 20/120  loss 1.234  grad_norm 0.85  learning_rate 1.95e-03  epoch 0.31
        step 20/120  eval  loss 1.310  runtime 0.30 s
        done: 120 steps in 95.2 s  train_loss 1.402

    Rates and learning rates get an exponent, other floats four significant digits; ``total_flos`` and the
    per-second throughput figures transformers adds are left out (``metrics.jsonl`` keeps every figure)."""
    def number(key: str, value) -> str:
        if isinstance(value, bool) or not isinstance(value, float):
            return str(value)
        return f"{value:.2e}" if key == "learning_rate" or (value and abs(value) < 1e-3) else f"{value:.4g}"

    logs = {k: v for k, v in logs.items() if k != "total_flos" and not k.endswith("_per_second")}
    if "train_runtime" in logs:
        rest = "  ".join(f"{k} {number(k, v)}" for k, v in logs.items() if k not in ("train_runtime", "epoch"))
        return f"done: {step} steps in {logs['train_runtime']:.1f} s  {rest}".rstrip()
    where = f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"
    if any(k.startswith("eval_") for k in logs):
        runtime = logs.pop("eval_runtime", None)
        parts = [f"{k.removeprefix('eval_')} {number(k, v)}" for k, v in logs.items() if k.startswith("eval_")]
        parts += [f"runtime {runtime:.2f} s"] if isinstance(runtime, (int, float)) else []
        return f"{where}  eval  " + "  ".join(parts)
    return f"{where}  " + "  ".join(f"{k} {number(k, v)}" for k, v in logs.items())


def readable_logs(trainer) -> None:
    """Swap ``trainer``'s progress bar (or its printer, with ``disable_tqdm``) for one that writes :func:`log_line`
    instead of a dict of strings: the same bar, the same place, one overridden hook."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ReadableProgressCallback(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(log_line(logs, state.global_step, state.max_steps))

    class ReadablePrinterCallback(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs:
                print(log_line(logs, state.global_step, state.max_steps))

    for old, new in ((ProgressCallback, ReadableProgressCallback), (PrinterCallback, ReadablePrinterCallback)):
        if trainer.pop_callback(old) is not None:
            trainer.add_callback(new)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class RunCallback(TrainerCallback):
    """Writes ``metrics.jsonl``, marks checkpoints complete and rotates them.

    Logged rows carry ``step``, ``loss``, ``learning_rate`` and ``tokens_per_second`` (tokens of the inputs seen
    since the previous log, divided by the wall time since then; TRL's ``num_tokens`` counts them). After each save
    the new checkpoint's marker goes in first and only then are checkpoints beyond the newest ``keep`` removed
    (the trainer's own ``save_total_limit`` would remove them before the marker exists, so a kill there would
    leave nothing to resume from; :func:`trainer_arguments` turns it off).
    """

    def __init__(self, output_dir: Path, keep: int | None = None):
        self.output_dir = Path(output_dir)
        self.keep = keep
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
            atomic_write_text(path / CHECKPOINT_COMPLETE, json.dumps({"step": state.global_step}))
            rotate_checkpoints(self.output_dir, self.keep)


def rotate_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints (none when ``keep`` is None), and incomplete ones older
    than the newest complete one (a rotation killed half-way); returns those removed."""
    complete = complete_checkpoints(output_dir)
    old = complete[:-keep] if keep else []
    if complete:
        newest = checkpoint_step(complete[-1])
        old += [path for step, path in checkpoints(output_dir) if step < newest and path not in complete]
    for path in old:
        remove_checkpoint(path)
    return old


DIVERGENCE_FACTOR, DIVERGENCE_MARGIN = 2.0, 3.0
"""A logged training loss has diverged when it is above both ``DIVERGENCE_FACTOR`` times the run's lowest logged
loss so far and that lowest loss plus ``DIVERGENCE_MARGIN`` nats: far outside the noise of a healthy run (a loss
that doubles and climbs 3 nats), yet reached by a run whose weights blew up."""


def diverged(loss: float, lowest: float | None) -> bool:
    return lowest is not None and loss > max(DIVERGENCE_FACTOR * lowest, lowest + DIVERGENCE_MARGIN)


class NonFiniteLossCallback(TrainerCallback):
    """Stop at the first logged NaN/inf loss or gradient norm, or diverged loss (:func:`diverged`), without saving.

    It also keeps ``last_good_step``, the last logged step whose figures were finite and not diverged: the weights of
    a checkpoint at step ``c`` are first used by step ``c + 1``, so only checkpoints before ``last_good_step`` are
    known good (:func:`train_resumable` names the newest). Trainers must log with ``logging_nan_inf_filter=False``,
    or transformers hides a NaN loss as 0.
    """

    def __init__(self):
        self.bad_step: int | None = None
        self.bad_value: str | None = None
        self.last_good_step = 0
        self.lowest_loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts from the history its checkpoint restored.
        for row in state.log_history:
            if "loss" in row and row["step"] <= state.global_step and math.isfinite(row["loss"]):
                self.lowest_loss = min(row["loss"], self.lowest_loss if self.lowest_loss is not None else math.inf)
        self.last_good_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.bad_step is None:
            for key in ("loss", "grad_norm"):
                value = logs.get(key)
                if value is not None and not math.isfinite(value):
                    self.bad_step, self.bad_value = state.global_step, f"{key} {value}"
                    break
            loss = logs.get("loss")
            if self.bad_step is None and loss is not None and diverged(loss, self.lowest_loss):
                self.bad_step = state.global_step
                self.bad_value = f"loss {loss:.4g} diverged (lowest so far {self.lowest_loss:.4g})"
            if self.bad_step is None and loss is not None:
                self.lowest_loss = loss if self.lowest_loss is None else min(self.lowest_loss, loss)
                self.last_good_step = state.global_step
        if self.bad_step is not None:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
        return control


def last_good_checkpoint(output_dir: Path, last_good_step: int) -> Path | None:
    """The newest complete checkpoint from before ``last_good_step`` (see :class:`NonFiniteLossCallback`)."""
    good = [path for path in complete_checkpoints(output_dir) if checkpoint_step(path) < last_good_step]
    return good[-1] if good else None


def keep_checkpoints_before(output_dir: Path, last_good_step: int, is_main_process: bool) -> Path | None:
    """After a blow-up: the last good checkpoint (:func:`last_good_checkpoint`), with every newer one unmarked (by
    the main process) so ``--resume`` continues from it, not from weights trained past the last good figures."""
    last_good = last_good_checkpoint(output_dir, last_good_step)
    if is_main_process:
        for step, path in checkpoints(output_dir):
            if last_good is None or step > checkpoint_step(last_good):
                (path / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
    return last_good


def stop_on_non_finite(figures: dict[str, float], iteration: int, output_dir: Path, is_main_process: bool,
                       learning_rate_key: str) -> None:
    """The stop of a loop of our own (PPO, GRPO) at its first iteration with a NaN or infinite figure: one line that
    names the last good checkpoint, newer ones unmarked. Iteration ``n``'s rollout ran on checkpoint ``n - 1``'s
    weights, so only checkpoints before ``n - 1`` are known good (as :class:`NonFiniteLossCallback` reasons)."""
    bad = {k: v for k, v in figures.items() if not math.isfinite(v)}
    if not bad:
        return
    last_good = keep_checkpoints_before(output_dir, iteration - 1, is_main_process)
    raise NonFiniteLossError(f"iteration {iteration}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())}; "
                             f"stopped without saving. Last good checkpoint: {last_good or 'none'}. "
                             f"Lower {learning_rate_key}.")


def train_resumable(trainer, output_dir: Path, resume: bool, nan_guard: NonFiniteLossCallback, is_main_process: bool,
                    train_report) -> dict:
    """Run a composed TRL trainer: from the newest complete checkpoint when ``resume``, stopping with a one-line
    error when ``nan_guard`` saw a non-finite or diverged loss, or the optimizer step overflowed (a learning rate
    beyond float range): nothing saved, the last good checkpoint named, and newer ones unmarked so ``--resume``
    continues from it. Returns the summary's training figures: ``train_loss`` (over the whole run, resumed or not),
    ``train_steps``, ``train_seconds`` and ``train_data`` (``train_report``, what was kept, cut and skipped)."""
    resume_from = latest_complete_checkpoint(output_dir) if resume else None
    if resume_from and is_main_process:
        print(f"resuming from {resume_from}")
    started = time.perf_counter()
    try:
        train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        nan_guard.bad_step = trainer.state.global_step + 1
        nan_guard.bad_value = f"the optimizer step overflowed ({' '.join(str(e).split())})"
        train_result = None
    train_seconds = time.perf_counter() - started
    if nan_guard.bad_step is not None:
        last_good = keep_checkpoints_before(output_dir, nan_guard.last_good_step, is_main_process)
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
