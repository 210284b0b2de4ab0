"""A run directory as its readers see it: what a finished run holds, and the one ``--init`` resolution.

Every stage writes its output directory through :mod:`finetune.stages.scaffold`; every reader (a stage's ``--init``,
PPO's ``--score.reward_model``, ``finetune.reward_model.load_reward_model``, ``finetune export`` and ``finetune chat``)
reads it through :class:`RunDir`:

- ``kind``: ``"adapter"`` (a PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``),
  ``"full"`` (a model: ``config.json`` + ``model*.safetensors`` or ``pytorch_model*.bin``) or ``None`` (neither,
  e.g. a rejection-sampling run, whose model is in its ``sft/``);
- ``config``: the resolved ``config.yaml`` the run wrote (empty for a model directory made elsewhere);
- ``base_model``, ``template``, ``method`` and the adapter's shape;
- ``finished``: ``run.json`` (:data:`RUN_STATE`) says ``"status": "finished"``. The scaffold writes it with
  ``"running"`` when the run starts and rewrites it with ``"finished"`` after everything else, so a run that was
  killed or failed is never taken for a finished one. A directory without ``run.json`` (a merged export, a model
  downloaded elsewhere, a test's hand-made run) is taken as it is.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError

RUN_STATE = "run.json"
"""``{"stage", "status": "running" | "finished", "started", "finished", "kind"}``; see the module docstring."""
CONFIG_FILE = "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHT_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")
MODEL_WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")
EXPORT_METADATA = "export_metadata.json"
"""What ``finetune export`` writes into every export directory."""
CHECKPOINT_COMPLETE = "checkpoint_complete.json"
"""The marker a ``checkpoint-STEP/`` gets once it is whole (written last; ``finetune.runs``)."""
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def run_kind(path: str | Path) -> str | None:
    """What a directory holds: ``"adapter"``, ``"full"`` or ``None`` (missing, or neither). The one definition every
    reader uses."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() and any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        return "adapter"
    if (path / "config.json").is_file() and any(any(path.glob(p)) for p in MODEL_WEIGHT_PATTERNS):
        return "full"
    return None


def is_run_directory(path: str | Path) -> bool:
    """Whether ``path`` is a run directory of this toolkit, finished or not (it has ``run.json`` or ``config.yaml``)."""
    path = Path(path)
    return (path / RUN_STATE).is_file() or (path / CONFIG_FILE).is_file()


def is_checkpoint_directory(path: str | Path) -> bool:
    """Whether ``path`` is a ``checkpoint-STEP/`` inside a run directory."""
    path = Path(path)
    return bool(CHECKPOINT_NAME.match(path.name)) and path.is_dir() and is_run_directory(path.parent)


def is_export_directory(path: str | Path) -> bool:
    """Whether ``path`` is what ``finetune export`` wrote."""
    return (Path(path) / EXPORT_METADATA).is_file()


def _read_mapping(path: Path, what: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the run's {what}: {' '.join(str(e).split())}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run's {what} is not a mapping")
    return data


def write_run_state(output_dir: str | Path, stage: str, status: str, kind: str | None = None) -> None:
    """Record in ``run.json`` that the run of ``stage`` is ``running`` or ``finished`` (atomically)."""
    from .runs import atomic_write_text

    path = Path(output_dir) / RUN_STATE
    previous = {}
    if status == "finished" and path.is_file():
        previous = json.loads(path.read_text())
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    state = {"stage": stage, "status": status, "started": previous.get("started", now)}
    if status == "finished":
        state.update(finished=now, kind=kind)
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")


def same_model(a: str, b: str) -> bool:
    """Whether two ``model.name`` values name the same weights (``tiny``, a directory however spelt, or a hub id)."""
    from .models import resolve_model

    def key(name: str) -> str:
        resolved = resolve_model(name)
        return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved

    return key(a) == key(b)


@dataclass(frozen=True)
class RunDir:
    """A run (or model) directory, read once; see the module docstring."""

    path: Path
    """The directory as given."""
    kind: str | None
    config: dict = field(default_factory=dict)
    """The resolved ``config.yaml`` (empty when there is none)."""
    state: dict = field(default_factory=dict)
    """``run.json`` (empty when there is none)."""
    run_path: Path | None = None
    """For a checkpoint (:meth:`read_checkpoint`): the run directory it is a ``checkpoint-STEP/`` of."""

    @classmethod
    def read(cls, path: str | Path) -> RunDir:
        path = Path(path)
        config = _read_mapping(path / CONFIG_FILE, "config.yaml") if (path / CONFIG_FILE).is_file() else {}
        state = _read_mapping(path / RUN_STATE, RUN_STATE) if (path / RUN_STATE).is_file() else {}
        return cls(path, run_kind(path), config, state)

    @classmethod
    def read_checkpoint(cls, path: str | Path) -> RunDir:
        """A run's ``checkpoint-STEP/`` read as a run of its own: ``kind`` from what the checkpoint holds (a DPO or
        SFT trainer's checkpoint holds the adapter), ``config`` (base, template, method) from the run's
        ``config.yaml``, and ``finished`` when the checkpoint is complete (its marker is written last); the run's
        tokenizer and template are in :attr:`files_path`."""
        path = Path(path)
        if not is_checkpoint_directory(path):
            raise ConfigError(f"{path}: not a checkpoint-STEP directory of a run")
        run = cls.read(path.parent)
        status = "finished" if (path / CHECKPOINT_COMPLETE).is_file() else "running"
        state = {**run.state, "status": status, "checkpoint": int(CHECKPOINT_NAME.match(path.name).group(1))}
        return cls(path, run_kind(path), run.config, state, path.parent)

    @classmethod
    def read_any(cls, path: str | Path) -> RunDir:
        """:meth:`read_checkpoint` for a ``checkpoint-STEP/`` of a run, else :meth:`read`."""
        return cls.read_checkpoint(path) if is_checkpoint_directory(path) else cls.read(path)

    @property
    def files_path(self) -> Path:
        """Where the run's tokenizer, chat template and generation config are: the run's directory (for a checkpoint
        its run's, whose ``checkpoint-STEP/`` also holds optimizer and trainer state)."""
        return self.run_path or self.path

    @property
    def finished(self) -> bool:
        return not self.state or self.state.get("status") == "finished"

    @property
    def stage(self) -> str | None:
        return self.state.get("stage")

    @property
    def init(self) -> str | None:
        return self.config.get("init")

    @property
    def model_name(self) -> str | None:
        return (self.config.get("model") or {}).get("name")

    @property
    def template(self) -> str | None:
        return (self.config.get("data") or {}).get("template")

    @property
    def method(self) -> str | None:
        """``lora``, ``qlora`` or ``full`` as the run's config says (``None`` without one)."""
        return (self.config.get("adapter") or {}).get("method")

    @property
    def base_model(self) -> str | None:
        """The weights an adapter run trained on: its ``init`` when that was a full fine-tune (the stage put a new
        adapter on those weights), else its ``model.name``, else what ``adapter_config.json`` names."""
        if self.init and run_kind(self.init) == "full":
            return self.init
        if self.model_name:
            return self.model_name
        if self.kind == "adapter":
            return _read_mapping(self.path / ADAPTER_CONFIG, ADAPTER_CONFIG).get("base_model_name_or_path")
        return None

    def lora_config(self):
        """The ``peft.LoraConfig`` an adapter run saved."""
        from peft import LoraConfig

        return LoraConfig.from_pretrained(str(self.path))

    def adapter_shape(self) -> dict:
        """``r``, ``alpha``, ``dropout`` and ``target_modules`` of the saved adapter, as :class:`AdapterConfig` has them."""
        try:
            saved = self.lora_config()
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"{self.path}/{ADAPTER_CONFIG}: cannot read it: {' '.join(str(e).split())}") from None
        modules = saved.target_modules or []
        return dict(r=saved.r, alpha=saved.lora_alpha, dropout=saved.lora_dropout,
                    target_modules=[modules] if isinstance(modules, str) else sorted(modules))

    def check_adapter_weights(self, option: str) -> None:
        """The saved adapter's weights open (a truncated file does not) and every LoRA matrix has the saved rank."""
        from safetensors import SafetensorError, safe_open

        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            return  # a .bin adapter: torch reads it when it is loaded
        r = self.adapter_shape()["r"]
        try:
            with safe_open(str(weights), "pt") as f:
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"{option} {self.path}: cannot read {ADAPTER_WEIGHTS} ({' '.join(str(e).split())}); "
                              f"is the file complete?") from None
        for key, shape in shapes.items():
            rank = shape[0] if "lora_A" in key else shape[1] if "lora_B" in key else r
            if rank != r:
                raise ConfigError(f"{option} {self.path}: {key} has rank {rank} but {ADAPTER_CONFIG} says r={r}")

    def check_matches(self, model_name: str, template: str, option: str) -> None:
        """An adapter trained on one base is meaningless on another, and a template other than the one the run learned
        would change every prompt: both mismatches are one-line ``ConfigError``s."""
        base = self.base_model
        if self.kind == "adapter" and base and not same_model(base, model_name):
            raise ConfigError(f"{option} {self.path} trained an adapter on {base!r} but model.name is {model_name!r}; "
                              f"pass --model.name={base}")
        if self.template and self.template != template:
            raise ConfigError(f"{option} {self.path} was trained with template {self.template!r} but data.template is "
                              f"{template!r}; pass --data.template={self.template}")


def open_run(run_dir: str | Path, option: str = "--init") -> RunDir:
    """A finished run holding a model or an adapter, to start from or to load.

    Raises:
        ConfigError: ``run_dir`` is missing, holds neither, or did not finish (one line, named after ``option``).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{option} {run_dir}: no such directory (pass the output_dir of a finished run)")
    run = RunDir.read(path)
    if not run.finished:
        raise ConfigError(f"{option} {run_dir}: that run did not finish ({RUN_STATE} says "
                          f"{run.state.get('status')!r}); resume it with --resume, or pass a finished run")
    if run.kind is None:
        raise ConfigError(f"{option} {run_dir}: not a finished run (no {ADAPTER_WEIGHTS} or model weights); pass the "
                          f"output_dir of a finished run")
    if run.kind == "adapter":
        run.check_adapter_weights(option)
    return run


def resolve_init(cfg, option: str = "--init"):
    """The one ``--init`` resolution, for every stage: check the run to start from against this run's base and
    template, and return ``(cfg, init run or None, adapter fields that changed)``.

    From an adapter run the new run continues that adapter, so it takes the adapter's shape (r, alpha, dropout,
    target modules); continuing it with full fine-tuning is refused. From a full-weights run those weights are the
    base: ``model.name`` becomes the run's directory. A bad ``--init`` fails here, before anything is written.
    """
    if not getattr(cfg, "init", None):
        return cfg, None, []
    init = open_run(cfg.init, option)
    init.check_matches(cfg.model.name, cfg.data.template, option)
    if init.kind == "full":
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(cfg.init))), init, []
    if cfg.adapter.method == "full":
        raise ConfigError(f"{option} {cfg.init} is a LoRA run; continue it with adapter.method lora or qlora")
    shape = init.adapter_shape()
    current = dict(r=cfg.adapter.r, alpha=cfg.adapter.alpha, dropout=cfg.adapter.dropout,
                   target_modules=sorted(cfg.adapter.target_modules))
    changed = [key for key in shape if shape[key] != current[key]]
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, **shape)), init, changed


def open_reward_run(run_dir: str | Path, model_name: str, template: str, option: str = "--score.reward_model") -> RunDir:
    """A finished reward run whose adapter can go on the base ``model_name`` with ``template`` (PPO's reward role)."""
    run = open_run(run_dir, option)
    if run.kind != "adapter":
        raise ConfigError(f"{option} {run_dir}: not a reward run (no adapter with a scalar head)")
    base = run.base_model
    if base and not same_model(base, model_name):
        raise ConfigError(f"{option} {run_dir} was trained on {base}, not on this run's base {model_name}; its adapter "
                          f"cannot share this base")
    run.check_matches(model_name, template, option)
    return run
