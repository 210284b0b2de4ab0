"""What a hand-written accelerate training loop (PPO; GRPO, RLOO next) shares with the stages TRL trains: the same
``metrics.jsonl`` rows and TensorBoard events, and ``checkpoint-N/`` directories that ``--resume`` picks up by the
same completion marker (``finetune.runs``).

- :class:`MetricsLog` appends one JSON row per step to ``metrics.jsonl`` (what ``runs.read_metrics`` and
  ``runs.plot_loss`` read) and writes the row's figures to TensorBoard as transformers' ``TensorBoardCallback``
  does for SFT, DPO and reward runs: under ``runs/<date>_<host>/`` (or ``$TENSORBOARD_LOGGING_DIR``), tags ``train/<key>`` (``eval/<key>`` for
  ``eval_`` keys), at the row's ``step``; W&B, MLflow and trackio get the same tags through accelerate's trackers.
- :func:`save_checkpoint` / :func:`load_checkpoint`: the trainable tensors by name, accelerate's own state
  (``Accelerator.save_state``: the prepared optimizer and scheduler, every process's Python, NumPy, torch and
  device RNG states), a per-process generator of the loop's own (e.g. the minibatch shuffle), the loop's progress
  as JSON and a copy of ``metrics.jsonl``. Built in a staging directory, marked complete, renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import ConfigError
from .runs import CHECKPOINT_COMPLETE, atomic_write_text, rotate_checkpoints

TRAINABLE_FILE, PROGRESS_FILE, METRICS_FILE = "trainable.safetensors", "progress.json", "metrics.jsonl"


ACCELERATE_TRACKERS = ("wandb", "mlflow", "trackio")
"""The trackers a hand-written loop reaches through accelerate's own (``Accelerator(log_with=...)``); TensorBoard is
written here, in transformers' layout, so every stage's events sit in the same place."""


def accelerate_trackers(report_to: list[str]) -> list[str]:
    """The entries of a ``report_to`` list that go through accelerate (``Accelerator(log_with=...)``)."""
    return [name for name in report_to if name in ACCELERATE_TRACKERS]


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as ``section.key`` -> value, lists as text (what every tracker stores as a parameter)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


class MetricsLog:
    """``metrics.jsonl`` and the trackers of ``report_to`` for one run, written by the main process only (the others
    hold a log that writes nothing, so a loop calls it unconditionally).

    TensorBoard is written here; W&B, MLflow and trackio through ``accelerator``'s trackers, which the loop's
    ``Accelerator`` was made with (``log_with=accelerate_trackers(report_to)``): they are started here with
    ``config`` as the run's parameters and ended by :meth:`close`."""

    def __init__(self, output_dir: Path, is_main_process: bool, report_to: list[str] = ("tensorboard",),
                 accelerator=None, config: dict | None = None, project: str = "finetune"):
        self.path = Path(output_dir) / METRICS_FILE
        self.is_main_process = is_main_process
        self.writer = None
        self.accelerator = accelerator if accelerator is not None and accelerate_trackers(list(report_to)) else None
        if is_main_process and "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations.integration_utils import default_logdir

            # transformers' TensorBoardCallback's directory, its environment override included
            self.writer = SummaryWriter(os.getenv("TENSORBOARD_LOGGING_DIR") or str(Path(output_dir) / default_logdir()))
        if self.accelerator is not None:
            self.accelerator.init_trackers(project, config=flat_config(config or {}))

    def log(self, row: dict) -> None:
        """Append ``row`` (which holds ``step``) to ``metrics.jsonl`` and its other numbers to the trackers, tagged
        ``train/<key>`` (``eval/<key>`` for ``eval_`` keys) as transformers tags them."""
        if not self.is_main_process:
            return
        from transformers.integrations.integration_utils import rewrite_logs

        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        figures = rewrite_logs({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})
        if self.writer is not None:
            for tag, value in figures.items():
                self.writer.add_scalar(tag, value, row["step"])
            self.writer.flush()
        if self.accelerator is not None:
            self.accelerator.log(figures, step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None


def process_sum(accelerator):
    """``tensor -> its sum over every process`` (an all-reduce), for statistics that must not depend on the number
    of processes (``finetune.logprobs.masked_whiten``'s); None with one process. Tensors go to the accelerator's
    device for the collective (NCCL needs CUDA tensors) and come back."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), "sum").to(t.device)


def _trainable_tensors(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, step: int, accelerator, trainable: torch.nn.Module, generator: torch.Generator,
                    progress: dict, keep: int | None) -> Path:
    """Write ``checkpoint-STEP/`` (called by every process, after the step's metrics row).

    It is built in ``.checkpoint-STEP.staging/`` (a name ``--resume`` never matches), marked complete, then renamed
    into place, so a process killed at any point leaves either no ``checkpoint-STEP`` or a whole one. Holds every
    trainable tensor of ``trainable`` (the unwrapped module) by name, ``Accelerator.save_state``'s files without the
    model weights (the frozen base is not saved again), each process's ``generator`` state, ``progress`` and the
    number of processes as JSON, and a copy of ``metrics.jsonl``. Afterwards only the newest ``keep`` complete
    checkpoints are kept (all when None)."""
    from safetensors.torch import save_file

    main = accelerator.is_main_process
    final, staging = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.staging"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    accelerator.wait_for_everyone()
    # Only the trainable tensors are saved (below): accelerate gets no model weights to write.
    hook = accelerator.register_save_state_pre_hook(lambda models, weights, directory: weights.clear())
    try:
        accelerator.save_state(str(staging))
    finally:
        hook.remove()
    torch.save(generator.get_state(), staging / f"generator_{accelerator.process_index}.pt")
    if main:  # the weights are the same on every process (DDP keeps them in step)
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable_tensors(trainable).items()},
                  staging / TRAINABLE_FILE)
        (staging / PROGRESS_FILE).write_text(json.dumps({**progress, "num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()  # every process's files are written before the checkpoint counts
    if main:
        atomic_write_text(staging / CHECKPOINT_COMPLETE, json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        rotate_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator, trainable: torch.nn.Module, generator: torch.Generator) -> dict:
    """Load what :func:`save_checkpoint` wrote into the freshly built and prepared run (every process); returns its
    progress. Refuses a checkpoint of another number of processes (each process's random streams are its own) or
    of other trainable tensors."""
    from accelerate.utils import RNG_STATE_NAME
    from safetensors.torch import load_file

    progress = json.loads((path / PROGRESS_FILE).read_text())
    if progress["num_processes"] != accelerator.num_processes:
        raise ConfigError(f"--resume: {path} was written by {progress['num_processes']} processes, this run has "
                          f"{accelerator.num_processes}; resume with the same number (the random streams are per process)")
    saved = load_file(path / TRAINABLE_FILE)
    params = _trainable_tensors(trainable)
    if saved.keys() != params.keys():
        raise ConfigError(f"--resume: the trainable tensors of {path} are not this run's (adapter or model changed?): "
                          f"{sorted(saved.keys() ^ params.keys())[:3]}")
    rng_file = path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    if not rng_file.is_file():  # accelerate would go on without it, and the run would not continue as it would have
        raise ConfigError(f"--resume: {path} has no {rng_file.name}; it is not a checkpoint of this loop")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    hook = accelerator.register_load_state_pre_hook(lambda models, directory: models.clear())
    try:
        accelerator.load_state(str(path))  # optimizer, scheduler, then the RNG states
    finally:
        hook.remove()
    generator.set_state(torch.load(path / f"generator_{accelerator.process_index}.pt", weights_only=True))
    return progress
