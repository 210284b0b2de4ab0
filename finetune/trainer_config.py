"""The TRL trainer's own arguments: ours, set from the run config, plus the user's pass-through ``trainer`` section.

SFT, reward and DPO runs (and rejection sampling's fine-tune) train on a TRL trainer whose config dataclass
(``SFTConfig``, ``RewardConfig``, ``DPOConfig``, each extending transformers' ``TrainingArguments``) has some two
hundred fields. The run config names the twenty or so a run is about (``train.*``, ``model.dtype``, ...); every other
field passes through from the ``trainer`` section (YAML ``trainer: {save_strategy: epoch}`` or
``--trainer.save_strategy=epoch``), checked here against that dataclass before the run starts:

- a key that is no field of the dataclass is an error naming the nearest field;
- a key that one of our fields already sets is refused, naming ours (:data:`OUR_FIELDS`): one place for each
  setting, so a YAML never holds two learning rates of which one silently loses;
- a key the toolkit fixes because the run directory depends on it is refused with the reason (:data:`FIXED`);
- the few defaults we only pin so TRL's own never decide silently may be overridden (:data:`OVERRIDABLE`);
- the values are then checked by building the dataclass itself: what it refuses is a one-line config error.
"""

from __future__ import annotations

import dataclasses
import difflib

from .config import ConfigError

OUR_FIELDS: dict[str, str] = {
    "output_dir": "output_dir",
    "resume_from_checkpoint": "--resume",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.num_epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_ratio",
    "lr_scheduler_type": "train.lr_scheduler",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "optim": "train.optim",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "eval_steps": "train.eval_steps",
    "report_to": "train.report_to",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "activation_checkpointing": "model.activation_checkpointing",
    "activation_checkpointing_kwargs": "model.activation_checkpointing",
    "gradient_checkpointing": "model.activation_checkpointing",
    "gradient_checkpointing_kwargs": "model.activation_checkpointing",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "padding_free": "data.packing",
    "eval_packing": "data.packing",
    "beta": "dpo.beta",
    "loss_type": "dpo.loss",
    "loss_weights": "dpo.loss and dpo.nll_weight",
    "label_smoothing": "dpo.label_smoothing",
    "precompute_ref_log_probs": "dpo.precompute_ref_log_probs",
}
"""Trainer field -> the run-config key that sets it (refused as a pass-through key)."""

FIXED: dict[str, str] = {
    "logging_nan_inf_filter": "off, so a NaN loss reaches the non-finite-loss guard instead of being logged as 0",
    "save_only_model": "off: --resume needs the optimizer and scheduler state in each checkpoint",
    "use_cpu": "chosen from the machine (the CPU where there is no CUDA GPU)",
    "remove_unused_columns": "the rows are already tokenised to the trainer's columns",
    "packing_strategy": "bfd, the best-fit-decreasing packing data.packing describes",
    "shuffle_dataset": "off: the trainer's sampler shuffles, seeded by train.seed",
    "truncation_mode": "keep_start: the pairs were cut to data.max_length and counted when tokenised",
    "disable_dropout": "on: policy and reference (or the two replies) must be scored alike",
    "sync_ref_model": "off: the reference is the frozen SFT adapter",
    "ld_alpha": "unset: DPO's loss is dpo.loss",
    "f_divergence_type": "reverse_kl: DPO's loss is dpo.loss",
    "use_weighting": "off: DPO's loss is dpo.loss",
}
"""Trainer fields the toolkit fixes because its run directory, resume or losses depend on them, with the reason."""

OVERRIDABLE = frozenset({"eval_strategy", "dataset_num_proc", "activation_offloading", "center_rewards_coefficient",
                         "pad_to_multiple_of", "precompute_ref_batch_size"})
"""Fields we set only to pin TRL's default (or derive: ``eval_strategy`` is ``steps`` with ``train.eval_steps``, else
``no``); a pass-through value replaces ours."""


def trainer_config(config_class: type, ours: dict, passthrough: dict, report_to_key: str = "train.report_to"):
    """``config_class(**ours, **passthrough)`` once ``passthrough`` (the ``trainer`` section) is checked (module
    docstring) and every tracker in ``ours["report_to"]`` is installed.

    Raises:
        ConfigError: an unknown, duplicated or fixed key, a tracker that is not installed, or a value the trainer's
            dataclass refuses.
    """
    name = f"{config_class.__module__.split('.')[0]}.{config_class.__name__}"
    fields = [f.name for f in dataclasses.fields(config_class) if f.init]
    for key in passthrough:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            suggestion = (OUR_FIELDS.get(close[0]) or f"trainer.{close[0]}") if close else None
            hint = f"; did you mean '{suggestion}'?" if suggestion else f" (trainer.* are the fields of {name})"
            raise ConfigError(f"unknown config key 'trainer.{key}': not a field of {name}{hint}")
        if key in OUR_FIELDS:
            raise ConfigError(f"trainer.{key} is set by {OUR_FIELDS[key]}; set that instead")
        if key in FIXED:
            raise ConfigError(f"trainer.{key} is fixed by the toolkit: {FIXED[key]}")
        if key in ours and key not in OVERRIDABLE:
            raise ConfigError(f"trainer.{key} is fixed by the toolkit for this stage; leave it out")
    check_trackers_installed(report_to_key, ours.get("report_to") or [])
    passthrough = {key: yaml_no_as_text(config_class, key, value) for key, value in passthrough.items()}
    try:
        return config_class(**{**ours, **passthrough})
    except (ValueError, TypeError) as error:
        given = ", ".join(f"trainer.{key}={value!r}" for key, value in passthrough.items()) or "the run config"
        raise ConfigError(f"{name} refused {given}: {' '.join(str(error).split())}") from None


def check_trackers_installed(key: str, report_to: list[str]) -> None:
    """Each tracker in ``report_to`` (other than ``none`` and ``all``) has its package installed."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    for tracker in report_to:
        if tracker not in ("none", "all") and tracker not in available:
            install = "'finetune[trackers]'" if tracker == "wandb" else tracker
            raise ConfigError(f"{key}: {tracker} is not installed (pip install {install})")


def yaml_no_as_text(config_class: type, key: str, value):
    """``no``/``yes`` back as text for a field that takes no boolean: YAML reads a bare ``save_strategy: no`` (and
    ``--trainer.save_strategy=no``) as ``False``, while transformers' strategies spell it ``"no"``."""
    import types
    import typing

    if not isinstance(value, bool):
        return value
    annotation = typing.get_type_hints(config_class).get(key)
    accepted = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return value if bool in accepted or annotation is None or annotation is typing.Any else ("yes" if value else "no")
