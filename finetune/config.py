"""Typed run configuration: dataclasses with a docstring per field, loaded from YAML plus ``--section.key=value``.

One path for every recipe: defaults live in the dataclasses below, a YAML file (``--config``) overrides them, and
command-line overrides come last. An unknown key anywhere is an error naming the key and the nearest valid one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A user's configuration mistake; recipes print it as one line and exit with status 2."""


# Range checks, each naming the key as a user writes it (``train.per_device_batch_size``).


def check_at_least(key: str, value, low, *, optional: bool = False) -> None:
    """``value >= low`` (a finite number), or ``None`` when ``optional``."""
    if value is None and optional:
        return
    if value is None or not math.isfinite(value) or value < low:
        raise ConfigError(f"{key} must be >= {low}{' or null' if optional else ''}; got {value!r}")


def check_positive(key: str, value) -> None:
    """``value > 0`` and finite."""
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be > 0; got {value!r}")


def check_interval(key: str, value, low: float, high: float, *, closed_high: bool = True) -> None:
    """``low <= value <= high`` (``< high`` unless ``closed_high``)."""
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        raise ConfigError(f"{key} must be in [{low}, {high}{']' if closed_high else ')'}; got {value!r}")


def check_choice(key: str, value: str, choices) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        names = list(map(str, choices))
        expected = " or ".join(names) if len(names) == 2 else f"one of {', '.join(names)}"
        raise ConfigError(f"{key} must be {expected}; got {value!r}")


def check_callable_spec(key: str, spec: str | None) -> None:
    """``module:function`` in form (nothing is imported here: importing runs the module's code)."""
    if spec is None or spec == AUTO_VERIFIER:
        return
    module, sep, name = spec.partition(":")
    if not sep or not module or not name.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        raise ConfigError(f"{key} must be 'module:function' (e.g. finetune.suite:verify) or null; got {spec!r}")


# What transformers accepts, looked up only for a name outside the common ones (the lookup imports transformers).
COMMON_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
COMMON_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd", "adafactor")
COMMON_ATTENTION = ("auto", "sdpa", "eager", "sdpa_packed", "flash_attention_2", "flash_attention_3")
DTYPES = ("auto", "bfloat16", "float16", "float32")
COMMON_TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "none")
PPO_TRACKERS = COMMON_TRACKERS  # PPO is our own loop: TensorBoard ours, the others accelerate's trackers


def transformers_schedulers() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType]


def transformers_optimizers() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def transformers_attention() -> list[str]:
    """``auto``, our ``sdpa_packed``, and the backends transformers registers (``eager`` among them)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = [name for key in ALL_ATTENTION_FUNCTIONS.valid_keys() for name in key.split("|")]
    return ["auto", "sdpa_packed", *dict.fromkeys([*names, "eager"])]


def transformers_trackers() -> list[str]:
    """What transformers' ``report_to`` accepts: its integrations, ``all`` and ``none``."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return [*INTEGRATION_TO_CALLBACK, "all", "none"]


def check_report_to(key: str, trackers: list[str]) -> None:
    """Each name is a tracker transformers knows; ``none`` stands alone."""
    if not trackers:
        raise ConfigError(f"{key} must name a tracker (tensorboard, wandb, mlflow, trackio) or none; got []")
    for name in trackers:
        check_transformers_name(key, name, COMMON_TRACKERS, transformers_trackers)
    if "none" in trackers and len(trackers) > 1:
        raise ConfigError(f"{key}: none reports to no tracker, so it cannot be listed with others; got {trackers!r}")


def check_transformers_name(key: str, value: str, common, known) -> None:
    """``value`` is a common name or one of ``known()`` (a list from transformers)."""
    if value not in common:
        check_choice(key, value, known())


# ``eval.verifier`` / ``score.verifier`` default: the bundled suite's checker where the data is the bundled suite.
AUTO_VERIFIER = "auto"
SUITE_VERIFIER = "finetune.suite:verify"


def resolve_verifier(spec: str | None, data_source: str | None) -> str | None:
    """``auto`` -> ``finetune.suite:verify`` when ``data_source`` is one of the bundled suite's files, else ``None``
    (a verifier checks answers, and only the suite's answers are known to it); anything else as it is."""
    if spec != AUTO_VERIFIER:
        return spec
    return SUITE_VERIFIER if data_source and data_source.startswith("bundled:suite_") else None


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Base model: ``tiny`` (the embedded LLaMA), a local directory, or a hub id such as ``meta-llama/Meta-Llama-3-8B``."""
    dtype: str = "auto"
    """Weights and compute dtype: ``auto`` (bf16 on a GPU that has it, else float32), ``bfloat16``, ``float16``, ``float32``."""
    attn_implementation: str = "auto"
    """Attention backend: ``auto`` (FlashAttention 3 or 2 on a CUDA GPU that has it and a bf16/fp16 model, else
    ``sdpa_packed``; the choice is printed), ``sdpa_packed`` (transformers' SDPA, a packed row attending one
    conversation at a time), ``sdpa``, ``eager``, ``flash_attention_2``, ``flash_attention_3``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute. Older spelling of
    ``activation_checkpointing: full``; set from ``activation_checkpointing`` when that is given."""
    activation_checkpointing: str | None = None
    """Per decoder layer: ``none``; ``full`` (recompute the whole layer in the backward); ``selective`` (keep the
    outputs of the linear layers and attention, recompute norms, RoPE and activations: the LLaMA paper's recipe).
    ``null`` follows ``gradient_checkpointing``."""
    use_liger: bool = True
    """Liger's fused RMSNorm, RoPE and SwiGLU kernels on a CUDA GPU where liger-kernel is installed (the ``gpu``
    extra); elsewhere the model runs unfused and a line says the kernels are off."""

    def __post_init__(self):
        if not self.name:
            raise ConfigError("model.name must name a model: tiny, a local directory or a hub id")
        check_choice("model.dtype", self.dtype, DTYPES)
        if "/" not in self.attn_implementation or self.attn_implementation in COMMON_ATTENTION:  # org/repo: a hub kernel
            check_transformers_name("model.attn_implementation", self.attn_implementation, COMMON_ATTENTION,
                                    transformers_attention)
        if self.activation_checkpointing is not None:
            if self.activation_checkpointing not in ("none", "full", "selective"):
                raise ConfigError(
                    f"model.activation_checkpointing must be none, full or selective; got {self.activation_checkpointing!r}"
                )
            # Stages hand ``gradient_checkpointing`` to the trainer; selective is checkpointing with a policy on top.
            self.gradient_checkpointing = self.activation_checkpointing != "none"


@dataclass
class AdapterConfig:
    method: str = "lora"
    """``lora`` (bf16/fp32 base), ``qlora`` (base in 4-bit NF4 with double quantisation), or ``full`` (no adapter)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r (> 0)."""
    dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))
    """Modules that get LoRA: by default every linear layer of the LLaMA block. Each name must match a module of the
    model (PEFT's rule: the module's name, or its last dotted parts); one that matches nothing is an error."""

    def __post_init__(self):
        check_choice("adapter.method", self.method, ("lora", "qlora", "full"))
        check_positive("adapter.r", self.r)
        check_positive("adapter.alpha", self.alpha)
        check_interval("adapter.dropout", self.dropout, 0.0, 1.0, closed_high=False)
        if not self.target_modules or not all(self.target_modules):
            raise ConfigError(f"adapter.target_modules must list module names; got {self.target_modules!r}")


def unmatched_target_modules(target_modules: list[str], module_names: list[str]) -> list[str]:
    """The entries of ``target_modules`` that match no module, by PEFT's rule for a list: a module matches a name when
    its dotted name is that name or ends with ``.name`` (``all-linear`` matches any model with a linear layer)."""
    return [target for target in target_modules if target != "all-linear"
            and not any(name == target or name.endswith(f".{target}") for name in module_names)]


@dataclass
class DataConfig:
    train: str = "bundled:suite_messages_train.jsonl"
    """Training data: a json/jsonl/parquet/csv file, a ``datasets`` directory, a hub id, or ``bundled:FILE``."""
    eval: str | None = "bundled:suite_messages_eval.jsonl"
    """Held-out data, same forms as ``train``; ``null`` for none."""
    format: str = "auto"
    """Data format: ``auto`` (detected), ``alpaca``, ``sharegpt``, ``messages``, ``preference``, ``hh``."""
    split: str | None = None
    """Split to take from a hub id or a saved ``DatasetDict`` (default ``train``)."""
    eval_split: str | None = None
    """Split for ``eval`` when it is a hub id or ``DatasetDict`` (e.g. ``test``)."""
    template: str = "llama3"
    """Chat template: ``llama3``, ``llama2``, ``vicuna_v1.1``, ``alpaca``, ``chatml``, or ``tokenizer`` (the model's own)."""
    max_length: int = 256
    """Longest sequence in tokens; longer conversations are truncated and the truncated tokens are reported."""
    packing: bool = True
    """Pack conversations best-fit-decreasing into rows of ``max_length`` without padding, positions restarting per
    conversation so none attends to another."""
    max_train_samples: int | None = None
    """Use only the first N training records (for quick runs); at least 1, or ``null`` for all."""
    max_eval_samples: int | None = None
    """Use only the first N eval records; at least 1, or ``null`` for all."""
    skip_invalid: bool = False
    """Skip malformed records instead of stopping at the first: each is counted per reason in the printed load
    report and listed (``file:line`` or ``file[index]``, reason) in ``OUTPUT_DIR/rejects.jsonl``. Off, the first
    malformed record stops the run with one line naming file, record and field."""

    def __post_init__(self):
        check_data_sources(self)
        check_choice("data.format", self.format, ("auto", *data_formats_names()))
        check_template(self.template)
        check_at_least("data.max_length", self.max_length, 1)


def data_formats_names(kind: str = "all") -> tuple[str, ...]:
    from data_formats import FORMATS, PREFERENCE_FORMATS, UNPAIRED_FORMATS

    if kind == "unpaired":
        return UNPAIRED_FORMATS + PREFERENCE_FORMATS
    return PREFERENCE_FORMATS if kind == "preference" else FORMATS


def check_template(name: str) -> None:
    from .templates import TEMPLATES

    check_choice("data.template", name, tuple(TEMPLATES))


def check_data_sources(data) -> None:
    """``data.train`` is set; the record limits are at least 1 or null."""
    if not data.train:
        raise ConfigError("data.train must name the training data (a file, a directory, a hub id or bundled:FILE)")
    check_at_least("data.max_train_samples", data.max_train_samples, 1, optional=True)
    check_at_least("data.max_eval_samples", data.max_eval_samples, 1, optional=True)


@dataclass
class TrainConfig:
    learning_rate: float = 2e-3
    """Peak learning rate of AdamW."""
    num_epochs: float = 3.0
    """Epochs over the training data (ignored when ``max_steps`` is set)."""
    max_steps: int = -1
    """Optimizer steps to take; -1 derives them from ``num_epochs``."""
    per_device_batch_size: int = 4
    """Rows per device per micro-batch (a row is a packed sequence when packing)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. Global batch = per_device_batch_size x accumulation x processes."""
    warmup_ratio: float = 0.03
    """Fraction of steps with linear warm-up before the cosine decay."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: ``cosine``, ``linear``, ``constant``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    optim: str = "adamw_torch"
    """Optimizer name as transformers knows it; ``paged_adamw_8bit`` for QLoRA on a GPU."""
    seed: int = 42
    """Seed for initialisation, shuffling and dropout: the same seed repeats a CPU run exactly."""
    logging_steps: int = 5
    """Log every N optimizer steps."""
    save_steps: int = 100
    """Write a checkpoint every N optimizer steps."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (the newest)."""
    eval_steps: int | None = None
    """Evaluate the loss every N steps; ``null`` evaluates only at the end."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the trainer logs its figures besides ``metrics.jsonl``: any of transformers' trackers (``tensorboard``,
    ``wandb``, ``mlflow``, ``trackio``, ...; several as a list or ``a,b``), or ``none``. Each but TensorBoard needs
    its package (``pip install 'finetune[trackers]'`` for W&B; ``pip install mlflow`` or ``trackio``) and reads its
    own environment (``WANDB_PROJECT``, ``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``, ...)."""

    def __post_init__(self):
        check_report_to("train.report_to", self.report_to)
        check_interval("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0, closed_high=False)
        check_positive("train.learning_rate", self.learning_rate)
        check_positive("train.num_epochs", self.num_epochs)
        if self.max_steps != -1:
            check_at_least("train.max_steps (-1 for num_epochs)", self.max_steps, 1)
        check_at_least("train.per_device_batch_size", self.per_device_batch_size, 1)
        check_at_least("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_at_least("train.weight_decay", self.weight_decay, 0)
        check_positive("train.max_grad_norm", self.max_grad_norm)
        check_at_least("train.logging_steps", self.logging_steps, 1)
        check_at_least("train.save_steps", self.save_steps, 1)
        check_at_least("train.save_total_limit", self.save_total_limit, 1, optional=True)
        check_at_least("train.eval_steps", self.eval_steps, 1, optional=True)
        check_transformers_name("train.lr_scheduler", self.lr_scheduler, COMMON_SCHEDULERS, transformers_schedulers)
        check_transformers_name("train.optim", self.optim, COMMON_OPTIMIZERS, transformers_optimizers)
        # A NaN shows up in the logged loss; logging at every save step means no checkpoint is written after one.
        if self.logging_steps <= 0 or self.save_steps % self.logging_steps:
            raise ConfigError(
                f"train.save_steps ({self.save_steps}) must be a multiple of train.logging_steps ({self.logging_steps})"
            )


@dataclass
class EvalConfig:
    verifier: str | None = AUTO_VERIFIER
    """``module:function`` taking (prompt, response) -> bool, for verifier accuracy of greedy answers; ``null`` for
    none; ``auto``: the bundled suite's ``finetune.suite:verify`` when the eval data is the bundled suite, else none.
    Loading it imports that module, which runs its code: a config can run code (see docs/configs.md). It is only
    ever taken from the config you pass, never from a run directory's saved ``config.yaml``."""
    max_new_tokens: int = 32
    """Longest generated answer when measuring verifier accuracy."""
    num_samples: int | None = 200
    """Eval prompts to generate answers for (``null`` for all)."""
    batch_size: int = 32
    """Prompts generated together."""
    before_training: bool = True
    """Also measure the untrained model, to report before and after."""

    def __post_init__(self):
        check_callable_spec("eval.verifier", self.verifier)
        check_at_least("eval.max_new_tokens", self.max_new_tokens, 1)
        check_at_least("eval.num_samples", self.num_samples, 1, optional=True)
        check_at_least("eval.batch_size", self.batch_size, 1)


@dataclass
class RunConfig:
    """Fields every stage has."""

    output_dir: str = "runs/sft"
    """Where the run writes config, metrics, checkpoints and the final adapter."""
    resume: bool = False
    """Continue the run in ``output_dir`` from its newest complete checkpoint (from the start if it has none)."""
    overwrite: bool = False
    """Replace the previous run in ``output_dir``: only a run or export directory that holds none of this run's
    inputs; it is moved aside, removed once this run finishes and put back if this run fails."""


@dataclass
class SFTRunConfig(RunConfig):
    """Supervised fine-tuning (``recipes/sft.py``)."""

    init: str | None = None
    """A finished SFT run to continue (e.g. ``runs/sft``): its LoRA adapter is trained further, with its shape, or its
    full weights become the base. ``null`` starts from ``model.name``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Pass-through: any other field of the TRL trainer's own arguments (``trl.SFTConfig``, which extends transformers'
    ``TrainingArguments``), e.g. ``save_strategy: epoch`` or ``--trainer.push_to_hub=true``. Checked against that
    dataclass before the run starts; a field this config already sets (``learning_rate`` is
    ``train.learning_rate``) is refused, naming ours (table in docs/configs.md)."""

    def __post_init__(self):
        if self.adapter.method == "qlora" and self.model.dtype == "float16":
            raise ConfigError("adapter.method=qlora trains in bf16 or fp32 compute; set model.dtype to auto or bfloat16")
        self.eval.verifier = resolve_verifier(self.eval.verifier, self.data.eval)


@dataclass
class PreferenceDataConfig:
    """Preference pairs (a prompt, a chosen and a rejected reply) for the reward model and DPO."""

    train: str = "bundled:suite_preference_train.jsonl"
    """Training pairs: a json/jsonl/parquet/csv file, a ``datasets`` directory, a hub id, or ``bundled:FILE``."""
    eval: str | None = "bundled:suite_preference_eval.jsonl"
    """Held-out pairs, same forms as ``train``; ``null`` for none."""
    format: str = "auto"
    """Preference format: ``auto`` (detected), ``preference`` (prompt/chosen/rejected, TRL's), or ``hh`` (Anthropic
    HH transcripts)."""
    split: str | None = None
    """Split to take from a hub id or a saved ``DatasetDict`` (default ``train``)."""
    eval_split: str | None = None
    """Split for ``eval`` when it is a hub id or ``DatasetDict`` (e.g. ``test_prefs``)."""
    template: str = "llama3"
    """Chat template: ``llama3``, ``llama2``, ``vicuna_v1.1``, ``alpaca``, ``chatml``, or ``tokenizer``. With
    ``init``, it must be the template that run trained with."""
    max_length: int = 256
    """Longest prompt + reply in tokens. A pair whose prompt alone leaves no room for a reply is skipped; a longer
    reply is cut to fit (DPO) or its pair skipped (reward model, which reads its score at the last token). Both are
    counted and reported."""
    max_train_samples: int | None = None
    """Use only the first N training pairs (for quick runs); at least 1, or ``null`` for all."""
    max_eval_samples: int | None = None
    """Use only the first N eval pairs; at least 1, or ``null`` for all."""
    skip_invalid: bool = False
    """Skip malformed records instead of stopping at the first: each is counted per reason in the printed load
    report and listed (``file:line`` or ``file[index]``, reason) in ``OUTPUT_DIR/rejects.jsonl``. Off, the first
    malformed record stops the run with one line naming file, record and field."""

    def __post_init__(self):
        check_data_sources(self)
        check_choice("data.format", self.format, ("auto", *data_formats_names("preference")))
        check_template(self.template)
        check_at_least("data.max_length", self.max_length, 2)  # a prompt token and a reply token


@dataclass
class RewardTrainConfig(TrainConfig):
    """Training settings with the reward model's defaults (tuned on the tiny suite; see docs/preference.md)."""

    learning_rate: float = 3e-4
    """Peak learning rate of AdamW (1e-3 fitted the train pairs and generalised worse on the tiny suite)."""
    num_epochs: float = 40.0
    """Epochs over the training pairs (ignored when ``max_steps`` is set)."""
    per_device_batch_size: int = 16
    """Pairs per device per micro-batch (each pair is two sequences, chosen and rejected)."""
    logging_steps: int = 25
    """Log every N optimizer steps."""
    save_steps: int = 500
    """Write a checkpoint every N optimizer steps."""


@dataclass
class DPOTrainConfig(TrainConfig):
    """Training settings with DPO's defaults: a small learning rate and one epoch (DPO moves a policy fast)."""

    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    num_epochs: float = 1.0
    """Epochs over the training pairs (ignored when ``max_steps`` is set)."""
    per_device_batch_size: int = 4
    """Pairs per device per micro-batch (each pair is two sequences, chosen and rejected)."""
    logging_steps: int = 25
    """Log every N optimizer steps."""


@dataclass
class RewardRunConfig(RunConfig):
    """Bradley-Terry reward model: backbone + LoRA adapter + scalar head on preference pairs (``recipes/reward.py``)."""

    output_dir: str = "runs/reward"
    """Where the run writes config, metrics, checkpoints and the final adapter with its scalar head."""
    init: str | None = None
    """Run directory to start from (an SFT output, e.g. ``runs/sft``): its LoRA adapter initialises the reward
    adapter, or its full weights become the backbone. ``null`` starts from ``model.name``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Pass-through: any other field of the TRL trainer's own arguments (``trl.RewardConfig``, which extends transformers'
    ``TrainingArguments``), e.g. ``save_strategy: epoch`` or ``--trainer.push_to_hub=true``. Checked against that
    dataclass before the run starts; a field this config already sets (``learning_rate`` is
    ``train.learning_rate``) is refused, naming ours (table in docs/configs.md)."""

    def __post_init__(self):
        if self.adapter.method == "full":
            raise ConfigError("the reward model trains a LoRA adapter and a scalar head; set adapter.method to lora or qlora")
        if self.adapter.method == "qlora" and self.model.dtype == "float16":
            raise ConfigError("adapter.method=qlora trains in bf16 or fp32 compute; set model.dtype to auto or bfloat16")


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "label_smoothed", "orpo", "simpo")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
"""Losses of the DPO stage that score the policy alone: no reference adapter is built for them."""
PER_TOKEN_MEAN_LOSSES = ("ipo", "orpo", "simpo")
"""Losses of the DPO stage that score a reply by its per-token mean log-prob rather than the sum."""


@dataclass
class DPOParams:
    """The preference objective on pairs, and its reference (none for ``orpo`` and ``simpo``)."""

    loss: str = "sigmoid"
    """``sigmoid`` (DPO, Rafailov et al. 2023), ``ipo`` (Azar et al. 2023, on per-token mean log-probs), ``hinge``
    (SLiC-HF, Zhao et al. 2023), ``label_smoothed`` (cDPO: DPO with labels assumed flipped with probability
    ``label_smoothing``); or, with no reference model, ``orpo`` (Hong et al. 2024: an SFT term plus an odds-ratio
    term, TRL's ``ORPOTrainer``) and ``simpo`` (Meng et al. 2024: length-normalised log-likelihood margin against a
    target ``simpo_gamma``, TRL's ``CPOTrainer``)."""
    beta: float = 0.1
    """Strength of the pull towards the reference (the SFT policy): smaller lets the policy move further. For
    ``orpo`` the odds-ratio term's weight lambda (0.1 in the paper); for ``simpo`` the reward scale (2 to 2.5 in the
    paper)."""
    label_smoothing: float = 0.0
    """Assumed label-flip probability for ``loss: label_smoothed``, in (0, 0.5); 0 for the other losses."""
    simpo_gamma: float = 0.0
    """SimPO's target reward margin gamma (``loss: simpo`` only; the paper uses 0.5 to 1.5, the shipped SimPO configs
    1.0); 0 for the other losses."""
    precompute_ref_log_probs: bool = False
    """Compute every pair's reference log-probs in one pass before training, so training runs no reference forward
    (not for ``orpo``/``simpo``, which have no reference)."""
    nll_weight: float = 0.2
    """Add this times the chosen replies' token-mean negative log-likelihood to the loss (RPO, Pang et al. 2024;
    Llama 3 uses 0.2), so the chosen reply's likelihood does not fall while the margin grows; 0 for plain DPO. For
    ``simpo`` the same term (CPO-SimPO; 0 is the paper's SimPO). ``orpo`` has its own SFT term of weight 1, over the
    whole chosen sequence, prompt included, as the ORPO authors' code and TRL compute it: set 1."""
    rejected_to_first_difference: bool = False
    """Score each training pair's rejected reply only up to and including its first token that differs from the
    chosen reply (the error; the shared prefix cancels in the margin), not the tokens after it, which are often
    right words again or a run-on repeating them (Step-DPO's first wrong step, Lai et al. 2024). The chosen reply
    and the eval pairs stay whole; the cut pairs are counted in ``train_data``. For pairs that share a prefix (the
    model's own samples of short checkable answers): on the tiny pipeline's it kept the test-set accuracy DPO
    otherwise lost (docs/results/pipeline.md). Free-form replies usually differ from their first token, which would
    then be all DPO scores of the rejected one. Only for losses that sum the log-probs (``sigmoid``, ``hinge``,
    ``label_smoothed``): with a per-token mean the shared tokens do not cancel (ORPO and SimPO with it lost 0.5 and
    1.5 points on the bundled pairs)."""

    def __post_init__(self):
        if self.nll_weight < 0:
            raise ConfigError(f"dpo.nll_weight must be >= 0; got {self.nll_weight}")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss must be one of {', '.join(DPO_LOSSES)}; got {self.loss!r}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive; got {self.beta}")
        if self.loss == "label_smoothed" and not 0.0 < self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.loss=label_smoothed needs dpo.label_smoothing in (0, 0.5); got {self.label_smoothing}")
        if self.loss != "label_smoothed" and self.label_smoothing != 0.0:
            raise ConfigError(f"dpo.label_smoothing applies only to dpo.loss=label_smoothed (loss is {self.loss!r})")
        if self.simpo_gamma < 0:
            raise ConfigError(f"dpo.simpo_gamma must be >= 0; got {self.simpo_gamma}")
        if self.loss != "simpo" and self.simpo_gamma != 0.0:
            raise ConfigError(f"dpo.simpo_gamma applies only to dpo.loss=simpo (loss is {self.loss!r})")
        if self.loss in REFERENCE_FREE_LOSSES and self.precompute_ref_log_probs:
            raise ConfigError(f"dpo.precompute_ref_log_probs: dpo.loss={self.loss} has no reference model")
        if self.rejected_to_first_difference and self.loss in PER_TOKEN_MEAN_LOSSES:
            raise ConfigError(f"dpo.rejected_to_first_difference needs a loss that sums a reply's log-probs (sigmoid, "
                              f"hinge, label_smoothed); dpo.loss={self.loss} averages them per token, so the tokens "
                              "the replies share no longer cancel and a cut rejected reply scores like its prefix")
        if self.loss == "orpo" and self.nll_weight != 1.0:
            raise ConfigError("dpo.loss=orpo has its own SFT term of weight 1 (over the whole chosen sequence, as TRL's "
                              f"ORPOTrainer computes it): set dpo.nll_weight=1 (got {self.nll_weight})")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares the policy with a frozen reference (the SFT adapter)."""
        return self.loss not in REFERENCE_FREE_LOSSES


@dataclass
class DPORunConfig(RunConfig):
    """Preference optimisation on pairs from an SFT run (``recipes/dpo.py``): DPO and its variants with the SFT
    policy frozen as the reference, or ORPO and SimPO with no reference."""

    output_dir: str = "runs/dpo"
    """Where the run writes config, metrics, checkpoints and the final policy adapter."""
    init: str | None = None
    """The SFT run to start from (required), e.g. ``runs/sft``: the policy is a trainable copy of its adapter and the
    reference the same adapter frozen, both on one base (``orpo`` and ``simpo`` build no reference). A full-weights SFT
    run becomes the base instead, with a new LoRA adapter as the policy."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    dpo: DPOParams = field(default_factory=DPOParams)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Pass-through: any other field of the TRL trainer's own arguments (``trl.DPOConfig``, which extends transformers'
    ``TrainingArguments``), e.g. ``save_strategy: epoch`` or ``--trainer.push_to_hub=true``. Checked against that
    dataclass before the run starts; a field this config already sets (``learning_rate`` is
    ``train.learning_rate``) is refused, naming ours (table in docs/configs.md)."""

    def __post_init__(self):
        if not self.init:
            raise ConfigError("dpo needs --init DIR: the SFT run to start from (e.g. --init runs/sft)")
        if self.adapter.method == "full":
            raise ConfigError("dpo trains a LoRA adapter on one shared base; set adapter.method to lora or qlora")
        if self.adapter.method == "qlora" and self.model.dtype == "float16":
            raise ConfigError("adapter.method=qlora trains in bf16 or fp32 compute; set model.dtype to auto or bfloat16")
        self.eval.verifier = resolve_verifier(self.eval.verifier, self.data.eval)


@dataclass
class UnpairedDataConfig(PreferenceDataConfig):
    """KTO's data: completions each labelled desirable or not, or preference pairs split into one of each."""

    format: str = "auto"
    """``auto`` (detected), ``unpaired`` (prompt/completion/label, TRL's unpaired preference format), or a pair
    format, ``preference`` or ``hh``, whose pairs each become a desirable (chosen) and an undesirable (rejected)
    example."""
    max_length: int = 256
    """Longest prompt + completion in tokens. An example whose prompt alone leaves no room is skipped; a longer
    completion is cut to fit. Both are counted and reported."""
    max_train_samples: int | None = None
    """Use only the first N training records (a pair is one record, two examples); at least 1, or ``null``."""

    def __post_init__(self):
        check_data_sources(self)
        check_choice("data.format", self.format, ("auto", *data_formats_names("unpaired")))
        check_template(self.template)
        check_at_least("data.max_length", self.max_length, 2)


@dataclass
class KTOTrainConfig(DPOTrainConfig):
    """Training settings with KTO's defaults: DPO's, with twice the rows per micro-batch, since a row is one
    sequence, not a pair (the same sequences per step as DPO on the same pairs)."""

    per_device_batch_size: int = 8
    """Examples per device per micro-batch; at least 2: KTO's reference point pairs each prompt with another
    example's completion of the same micro-batch."""


@dataclass
class KTOParams:
    """The KTO objective (Ethayarajh et al. 2024) and its reference."""

    beta: float = 0.1
    """Sharpness of the value function, and the strength of the pull towards the reference (the SFT policy)."""
    desirable_weight: float = 1.0
    """lambda_D: weight of the desirable examples' loss. With unbalanced data the paper keeps
    ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """lambda_U: weight of the undesirable examples' loss."""
    precompute_ref_log_probs: bool = False
    """Compute every example's reference log-probs (and those of its mismatched KL pairing) in one pass before
    training, so training runs no reference forward."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"kto.beta must be positive; got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"kto.{name} must be positive; got {getattr(self, name)}")


@dataclass
class KTORunConfig(RunConfig):
    """Kahneman-Tversky optimisation from an SFT run on unpaired data, the SFT policy frozen as the reference
    (``recipes/kto.py``)."""

    output_dir: str = "runs/kto"
    """Where the run writes config, metrics, checkpoints and the final policy adapter."""
    init: str | None = None
    """The SFT run to start from (required), e.g. ``runs/sft``: the policy is a trainable copy of its adapter and the
    reference the same adapter frozen, both on one base. A full-weights SFT run becomes the base instead, with a new
    LoRA adapter as the policy."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: UnpairedDataConfig = field(default_factory=UnpairedDataConfig)
    train: KTOTrainConfig = field(default_factory=KTOTrainConfig)
    kto: KTOParams = field(default_factory=KTOParams)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Pass-through: any other field of the TRL trainer's own arguments (``trl.KTOConfig``, which extends
    transformers' ``TrainingArguments``), checked against that dataclass before the run starts; a field this config
    already sets is refused, naming ours (table in docs/configs.md)."""

    def __post_init__(self):
        if not self.init:
            raise ConfigError("kto needs --init DIR: the SFT run to start from (e.g. --init runs/sft)")
        if self.adapter.method == "full":
            raise ConfigError("kto trains a LoRA adapter on one shared base; set adapter.method to lora or qlora")
        if self.adapter.method == "qlora" and self.model.dtype == "float16":
            raise ConfigError("adapter.method=qlora trains in bf16 or fp32 compute; set model.dtype to auto or bfloat16")
        if self.train.per_device_batch_size < 2:
            raise ConfigError("train.per_device_batch_size must be at least 2 for kto: its reference point pairs each "
                              f"prompt with another example's completion in the micro-batch (got "
                              f"{self.train.per_device_batch_size})")
        self.eval.verifier = resolve_verifier(self.eval.verifier, self.data.eval)


@dataclass
class SamplingParams:
    """How responses are sampled (``finetune.generation``): batched, with a KV cache, stopping at the template's
    end-of-turn tokens."""

    num_samples: int = 4
    """Responses sampled per prompt (K)."""
    max_new_tokens: int = 32
    """Longest response in tokens; a response that reaches it without an end-of-turn token is cut there."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (then every sample of a prompt is the same)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p (1 keeps all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 keeps all). In PPO the policy is then the softmax over those k logits:
    its log-probs, the reference's and the entropy are taken over each position's rollout top k."""
    batch_size: int = 64
    """Sequences generated together per process."""
    seed: int = 0
    """Sampling seed (each process adds its index): the same seed repeats the samples on CPU."""

    def __post_init__(self):
        if self.num_samples < 1:
            raise ConfigError(f"sampling.num_samples must be at least 1; got {self.num_samples}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0; got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1]; got {self.top_p}")
        check_at_least("sampling.max_new_tokens", self.max_new_tokens, 1)
        check_at_least("sampling.batch_size", self.batch_size, 1)
        check_at_least("sampling.top_k (0 keeps all)", self.top_k, 0)


@dataclass
class ScoreConfig:
    """What scores a response (``finetune.scorers``): a verifier, a reward model, or the weighted sum of both."""

    verifier: str | None = AUTO_VERIFIER
    """``module:function`` taking (prompt, response) and returning a bool or a number; ``null`` for none; ``auto``:
    the bundled suite's ``finetune.suite:verify`` when the prompts (``data.train``) are the bundled suite's, else
    none. Loading it imports that module, which runs its code: a config can run code (see docs/configs.md). It is
    only ever taken from the config you pass, never from a run directory's saved ``config.yaml``."""
    verifier_weight: float = 1.0
    """Weight of the verifier's score in the sum."""
    reward_model: str | None = None
    """A finished reward run (``recipes/reward.py``'s output_dir, e.g. ``runs/reward``); ``null`` for none."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score in the sum."""

    def __post_init__(self):
        check_callable_spec("score.verifier", self.verifier)
        if not math.isfinite(self.verifier_weight) or not math.isfinite(self.reward_model_weight):
            raise ConfigError("score.verifier_weight and score.reward_model_weight must be finite numbers")

    def resolve(self, prompts: str | None) -> None:
        """Resolve ``verifier: auto`` against the prompts' source; then a verifier or a reward model must be left."""
        self.verifier = resolve_verifier(self.verifier, prompts)
        if not self.verifier and not self.reward_model:
            raise ConfigError("score needs a verifier, a reward_model or both (score.verifier / score.reward_model)")


@dataclass
class RejectionParams:
    """Which samples are kept, and the preference pairs written beside them."""

    selection: str = "best"
    """``best``: each prompt's highest-scoring sample (Llama 2); ``threshold``: every sample scoring at least
    ``threshold``."""
    threshold: float = 1.0
    """Lowest kept score for ``selection: threshold``."""
    min_score: float | None = None
    """With ``selection: best``, keep a prompt's best sample only if it scores at least this (e.g. 1 with a verifier,
    so a wrong best answer is not trained on); ``null`` keeps every prompt's best."""
    preference_pairs: bool = True
    """Also write ``pairs.jsonl``: each prompt's best against its worst sample (Llama 3 style; the worst of those whose
    text differs from the best's beyond surrounding whitespace), a preference dataset for ``recipes/dpo.py``."""
    min_margin: float = 0.0
    """A pair is written only if best - worst exceeds this (prompts whose samples all score alike give none)."""
    keep_unverified: bool = False
    """Also keep (and fine-tune on) samples the verifier failed (its score 0 or less). By default they are never
    kept, whatever else scores them: a prompt whose samples all fail keeps nothing. No effect without a verifier."""

    def __post_init__(self):
        check_choice("rejection.selection", self.selection, ("best", "threshold"))
        check_at_least("rejection.min_margin", self.min_margin, 0)


# The suite's prompts for rejection sampling and PPO: new ones where the task families allow, not the SFT train
# prompts the SFT model has learned the answers to (``finetune.suite.rl_split``).
RL_PROMPTS = "bundled:suite_messages_rl.jsonl"


@dataclass
class RejectionSamplingDataConfig(DataConfig):
    """The prompts to sample, and the settings the kept samples are then trained with."""

    train: str = RL_PROMPTS
    """The prompts to sample (replies after the last user turn are ignored): a json/jsonl/parquet/csv file, a
    ``datasets`` directory, a hub id, or ``bundled:FILE``. The kept samples are trained on with the other ``data``
    settings."""


@dataclass
class RejectionSamplingParams(SamplingParams):
    """Sampling with rejection sampling's defaults, tuned on the tiny suite: 8 samples at temperature 0.7 over the
    top 20 tokens verified 46% of the SFT model's samples right (docs/rl.md)."""

    num_samples: int = 8
    """Responses sampled per prompt (K)."""
    max_new_tokens: int = 16
    """Longest response in tokens; a response that reaches it without an end-of-turn token is cut there."""
    temperature: float = 0.7
    """Softmax temperature; 0 is greedy (then every sample of a prompt is the same)."""
    top_k: int = 20
    """Keep only the k most likely tokens (0 keeps all)."""
    batch_size: int = 256
    """Sequences generated together per process."""


@dataclass
class RejectionSamplingTrainConfig(TrainConfig):
    """The fine-tune on the kept samples: SFT's settings, without warm-up (it continues a trained adapter)."""

    warmup_ratio: float = 0.0
    """Fraction of steps with linear warm-up before the cosine decay."""


@dataclass
class RejectionSamplingRunConfig(RunConfig):
    """Rejection sampling from an SFT run: K samples per prompt, scored; the best kept and fine-tuned on with the SFT
    stage (``recipes/rejection_sampling.py``)."""

    output_dir: str = "runs/rejection_sampling"
    """Where the run writes config, samples, kept samples, pairs and summary; the fine-tuned model goes to
    ``OUTPUT_DIR/sft``."""
    init: str | None = None
    """The SFT run to sample from and fine-tune further (required), e.g. ``runs/sft``."""
    generate_only: bool = False
    """Write the samples, kept samples and pairs, and stop before fine-tuning."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: RejectionSamplingDataConfig = field(default_factory=RejectionSamplingDataConfig)
    sampling: RejectionSamplingParams = field(default_factory=RejectionSamplingParams)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    rejection: RejectionParams = field(default_factory=RejectionParams)
    train: RejectionSamplingTrainConfig = field(default_factory=RejectionSamplingTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Pass-through: any other field of the TRL trainer's own arguments (``trl.SFTConfig, for the fine-tune on the kept samples``, which extends transformers'
    ``TrainingArguments``), e.g. ``save_strategy: epoch`` or ``--trainer.push_to_hub=true``. Checked against that
    dataclass before the run starts; a field this config already sets (``learning_rate`` is
    ``train.learning_rate``) is refused, naming ours (table in docs/configs.md)."""

    def __post_init__(self):
        if not self.init:
            raise ConfigError("rejection sampling needs --init DIR: the SFT run to sample from (e.g. --init runs/sft)")
        if self.adapter.method == "full":
            raise ConfigError("rejection sampling fine-tunes an adapter (the LoRA SFT run's, or a new one on full SFT weights); "
                              "set adapter.method to lora or qlora")
        if self.adapter.method == "qlora" and self.model.dtype == "float16":
            raise ConfigError("adapter.method=qlora trains in bf16 or fp32 compute; set model.dtype to auto or bfloat16")
        self.score.resolve(self.data.train)
        self.eval.verifier = resolve_verifier(self.eval.verifier, self.data.eval)


@dataclass
class PromptDataConfig:
    """Prompts to sample from: each conversation up to its last user turn (a reply after it is ignored)."""

    train: str = RL_PROMPTS
    """Prompts for the rollouts: a json/jsonl/parquet/csv file, a ``datasets`` directory, a hub id, or
    ``bundled:FILE``."""
    eval: str | None = "bundled:suite_messages_eval.jsonl"
    """Held-out conversations for verifier accuracy before and after; ``null`` for none."""
    format: str = "auto"
    """Data format: ``auto`` (detected), ``alpaca``, ``sharegpt``, ``messages``, ``hh``."""
    split: str | None = None
    """Split to take from a hub id or a saved ``DatasetDict`` (default ``train``)."""
    eval_split: str | None = None
    """Split for ``eval`` when it is a hub id or ``DatasetDict``."""
    template: str = "llama3"
    """Chat template; it must be the one the ``init`` run trained with."""
    max_prompt_length: int = 128
    """Longest prompt in tokens; longer prompts are skipped and counted."""
    max_train_samples: int | None = None
    """Use only the first N prompts; at least 1, or ``null`` for all."""
    max_eval_samples: int | None = None
    """Use only the first N eval conversations; at least 1, or ``null`` for all."""
    skip_invalid: bool = False
    """Skip malformed records instead of stopping at the first: each is counted per reason in the printed load
    report and listed (``file:line`` or ``file[index]``, reason) in ``OUTPUT_DIR/rejects.jsonl``. Off, the first
    malformed record stops the run with one line naming file, record and field."""

    def __post_init__(self):
        check_data_sources(self)
        check_choice("data.format", self.format, ("auto", *data_formats_names()))
        check_template(self.template)
        check_at_least("data.max_prompt_length", self.max_prompt_length, 1)


@dataclass
class PPOSamplingParams(SamplingParams):
    """Sampling with PPO's defaults, tuned on the tiny suite: on-policy over the top 3 tokens (the full
    distribution's tail is noise: 7% right at temperature 0.7), 16 tokens per response."""

    max_new_tokens: int = 16
    """Longest response in tokens; a response that reaches it without an end-of-turn token is cut there."""
    top_k: int = 3
    """Keep only the k most likely tokens (0 keeps all). The policy is then the softmax over those k logits: its
    log-probs, the reference's and the entropy are taken over each position's rollout top k."""
    batch_size: int = 128
    """Sequences generated together per process."""


@dataclass
class PPOParams:
    """The PPO loop: rollouts, the KL penalty, GAE and the clipped updates (``finetune.losses``)."""

    num_iterations: int = 240
    """Rollout-and-update iterations (240 is about 4.7 passes over the suite's 1,635 prompts; 40 gained nothing)."""
    rollout_batch_size: int = 32
    """Prompts per iteration over all processes (each process samples its share, ``sampling.num_samples`` each)."""
    mini_batch_size: int = 32
    """Responses per process per optimizer step."""
    ppo_epochs: int = 2
    """Passes over each iteration's responses."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the policy and value adapters and the value head (constant after warm-up)."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps with a linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (policy and value together)."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon of the policy loss."""
    clip_range_value: float = 0.2
    """Clip of the value update around the rollout's values."""
    value_loss_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.1
    """KL penalty coefficient (its starting value when ``adaptive_kl``)."""
    adaptive_kl: bool = False
    """Steer the coefficient towards ``kl_target`` (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 1.0
    """KL to the reference (nats per response) the adaptive controller steers towards."""
    kl_horizon: float = 10000.0
    """Responses it takes the adaptive controller to move the coefficient by about the clipped error."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (mean kept) before GAE."""
    missing_stop_penalty: float | None = None
    """Subtracted from the score of a response that never produced an end-of-turn token; ``null`` for none."""
    seed: int = 42
    """Seed for the value head, prompt order and minibatch shuffling."""
    save_every: int = 10
    """Write ``checkpoint-N/`` (the trainable adapters and value head, optimizer, KL coefficient, RNG states and the
    metrics so far; ``--resume`` continues from the newest) every N iterations and after the last; 0 for none."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (the newest); ``null`` keeps all."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where each iteration's figures go besides ``metrics.jsonl``: ``tensorboard`` (written as transformers writes
    it for the other stages), ``wandb``, ``mlflow``, ``trackio`` (through accelerate's trackers; each needs its
    package: ``pip install 'finetune[trackers]'`` for W&B), several as a list, or ``none``."""

    def __post_init__(self):
        check_report_to("ppo.report_to", self.report_to)
        for name in self.report_to:
            check_choice("ppo.report_to", name, PPO_TRACKERS)
        if self.save_every < 0 or (self.save_total_limit is not None and self.save_total_limit < 1):
            raise ConfigError(f"ppo.save_every must be >= 0 and ppo.save_total_limit >= 1 or null; got "
                              f"{self.save_every} and {self.save_total_limit}")
        if min(self.num_iterations, self.rollout_batch_size, self.mini_batch_size, self.ppo_epochs) < 1:
            raise ConfigError("ppo.num_iterations, rollout_batch_size, mini_batch_size and ppo_epochs must be >= 1")
        if self.learning_rate <= 0 or self.kl_coef < 0 or self.clip_range <= 0 or self.clip_range_value <= 0:
            raise ConfigError("ppo.learning_rate, clip_range, clip_range_value must be positive and kl_coef >= 0")
        if self.adaptive_kl and self.kl_target <= 0:
            raise ConfigError(f"ppo.kl_target must be positive with adaptive_kl; got {self.kl_target}")
        check_interval("ppo.warmup_ratio", self.warmup_ratio, 0.0, 1.0, closed_high=False)
        check_interval("ppo.gamma", self.gamma, 0.0, 1.0)
        check_interval("ppo.lam", self.lam, 0.0, 1.0)
        check_at_least("ppo.value_loss_coef", self.value_loss_coef, 0)
        check_at_least("ppo.weight_decay", self.weight_decay, 0)
        check_positive("ppo.max_grad_norm", self.max_grad_norm)
        check_positive("ppo.kl_horizon", self.kl_horizon)
        check_at_least("ppo.missing_stop_penalty", self.missing_stop_penalty, 0, optional=True)


@dataclass
class PPORunConfig(RunConfig):
    """PPO from an SFT run with a critic: policy, reference, value and reward as adapters on one base
    (``recipes/ppo.py``)."""

    output_dir: str = "runs/ppo"
    """Where the run writes config, metrics, summary, the policy adapter (at the top) and the value adapter and
    head (``value/``)."""
    init: str | None = None
    """The SFT run to start from (required), e.g. ``runs/sft``: the policy is a trainable copy of its adapter, the
    reference the same adapter frozen."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    sampling: PPOSamplingParams = field(default_factory=PPOSamplingParams)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ppo: PPOParams = field(default_factory=PPOParams)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if not self.init:
            raise ConfigError("ppo needs --init DIR: the SFT run to start from (e.g. --init runs/sft)")
        if self.adapter.method == "full":
            raise ConfigError("ppo trains adapters on one shared base; set adapter.method to lora or qlora")
        if self.adapter.method == "qlora" and self.model.dtype == "float16":
            raise ConfigError("adapter.method=qlora trains in bf16 or fp32 compute; set model.dtype to auto or bfloat16")
        if self.sampling.temperature <= 0 or self.sampling.top_p != 1.0:
            raise ConfigError(
                "ppo samples from the policy itself: set sampling.temperature > 0 and sampling.top_p=1 (top_k works: "
                "the policy is then the softmax over the k largest logits; nucleus sampling is not supported)"
            )
        if self.resume and not self.ppo.save_every:
            raise ConfigError("--resume needs checkpoints; ppo.save_every=0 writes none")
        self.score.resolve(self.data.train)
        self.eval.verifier = resolve_verifier(self.eval.verifier, self.data.eval)


@dataclass
class GRPOSamplingParams(PPOSamplingParams):
    """Sampling with GRPO's defaults: PPO's (on-policy over the top 3 tokens, 16 tokens per response) with a group of
    8 responses per prompt, so a prompt the model answers right half the time gives both signs of advantage."""

    num_samples: int = 8
    """Responses sampled per prompt: the group (G, at least 2) each response's advantage is taken against."""

    def __post_init__(self):
        super().__post_init__()
        check_at_least("sampling.num_samples (the group size)", self.num_samples, 2)


ADVANTAGES = ("group", "leave_one_out")
KL_MODES = ("loss", "reward")


@dataclass
class GRPOParams:
    """The critic-free loop (``finetune.stages.grpo``): G responses per prompt, an advantage from the rest of the
    group instead of a value head, the clipped policy loss and a KL to the reference (``finetune.losses``)."""

    advantage: str = "group"
    """``group``: GRPO's, the score minus the group's mean (divided by its std with ``scale_advantages``; Shao et al.
    2024); ``leave_one_out``: RLOO's, the score minus the mean of the group's other scores (Ahmadian et al. 2024)."""
    scale_advantages: bool = True
    """Divide ``group`` advantages by the group's std (GRPO); false keeps only the mean (Dr. GRPO). Must be false
    with ``leave_one_out`` (RLOO's advantage is unscaled)."""
    kl_mode: str = "loss"
    """Where the KL to the reference goes: ``loss``: ``kl_coef`` times the per-token ``k3`` estimate added to the
    loss (GRPO); ``reward``: ``kl_coef`` times the response's summed per-token ``k1`` taken off its score before the
    advantage (the per-token penalty of RLOO and PPO)."""
    kl_coef: float = 0.04
    """KL coefficient (beta; 0 for none)."""
    num_iterations: int = 30
    """Rollout-and-update iterations (30 are about 0.3 passes over the suite's 1,635 prompts, 16 a time; on the tiny
    suite 60 at learning rate 5e-5 gained no more than 30 at 1e-4: docs/results/rl.md)."""
    rollout_batch_size: int = 16
    """Prompts per iteration over all processes (each process samples its share, ``sampling.num_samples`` each;
    a prompt's whole group on one process)."""
    mini_batch_size: int = 16
    """Responses per process per optimizer step."""
    epochs: int = 2
    """Passes over each iteration's responses (1: every update is on-policy up to the iteration's earlier steps)."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the policy adapter (constant after warm-up)."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps with a linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    clip_range: float = 0.2
    """Ratio clip epsilon of the policy loss."""
    missing_stop_penalty: float | None = None
    """Subtracted from the score of a response that never produced an end-of-turn token; ``null`` for none."""
    seed: int = 42
    """Seed for the prompt order and minibatch shuffling."""
    save_every: int = 10
    """Write ``checkpoint-N/`` (the policy adapter, optimizer, RNG states; ``--resume`` continues from the newest)
    every N iterations and after the last; 0 for none."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (the newest); ``null`` keeps all."""

    def __post_init__(self):
        check_choice("grpo.advantage", self.advantage, ADVANTAGES)
        check_choice("grpo.kl_mode", self.kl_mode, KL_MODES)
        if self.advantage == "leave_one_out" and self.scale_advantages:
            raise ConfigError("grpo.scale_advantages divides by the group's std (GRPO's advantage); RLOO's "
                              "leave-one-out advantage is unscaled: set grpo.scale_advantages=false")
        for key in ("num_iterations", "rollout_batch_size", "mini_batch_size", "epochs"):
            check_at_least(f"grpo.{key}", getattr(self, key), 1)
        check_positive("grpo.learning_rate", self.learning_rate)
        check_positive("grpo.clip_range", self.clip_range)
        check_positive("grpo.max_grad_norm", self.max_grad_norm)
        check_at_least("grpo.kl_coef", self.kl_coef, 0)
        check_at_least("grpo.weight_decay", self.weight_decay, 0)
        check_interval("grpo.warmup_ratio", self.warmup_ratio, 0.0, 1.0, closed_high=False)
        check_at_least("grpo.missing_stop_penalty", self.missing_stop_penalty, 0, optional=True)
        check_at_least("grpo.save_every", self.save_every, 0)
        check_at_least("grpo.save_total_limit", self.save_total_limit, 1, optional=True)


@dataclass
class GRPORunConfig(RunConfig):
    """GRPO (or RLOO) from an SFT run, without a critic: policy, reference and (optionally) reward as adapters on one
    base (``recipes/grpo.py``)."""

    output_dir: str = "runs/grpo"
    """Where the run writes config, metrics, rollouts, summary and the policy adapter."""
    init: str | None = None
    """The SFT run to start from (required), e.g. ``runs/sft``: the policy is a trainable copy of its adapter, the
    reference the same adapter frozen (never the base with adapters off)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    sampling: GRPOSamplingParams = field(default_factory=GRPOSamplingParams)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    grpo: GRPOParams = field(default_factory=GRPOParams)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        stage = "rloo" if isinstance(self, RLOORunConfig) else "grpo"
        if not self.init:
            raise ConfigError(f"{stage} needs --init DIR: the SFT run to start from (e.g. --init runs/sft)")
        if self.adapter.method == "full":
            raise ConfigError(f"{stage} trains an adapter on one shared base; set adapter.method to lora or qlora")
        if self.adapter.method == "qlora" and self.model.dtype == "float16":
            raise ConfigError("adapter.method=qlora trains in bf16 or fp32 compute; set model.dtype to auto or bfloat16")
        if self.sampling.temperature <= 0 or self.sampling.top_p != 1.0:
            raise ConfigError(
                f"{stage} samples from the policy itself: set sampling.temperature > 0 and sampling.top_p=1 (top_k "
                "works: the policy is then the softmax over the k largest logits; nucleus sampling is not supported)"
            )
        if self.resume and not self.grpo.save_every:
            raise ConfigError("--resume needs checkpoints; grpo.save_every=0 writes none")
        self.score.resolve(self.data.train)
        self.eval.verifier = resolve_verifier(self.eval.verifier, self.data.eval)


@dataclass
class RLOOParams(GRPOParams):
    """GRPO's loop with RLOO's defaults (Ahmadian et al. 2024): the leave-one-out baseline, unscaled, and the KL as
    a per-token penalty in the reward."""

    advantage: str = "leave_one_out"
    """``group``: GRPO's, the score minus the group's mean (divided by its std with ``scale_advantages``; Shao et al.
    2024); ``leave_one_out``: RLOO's, the score minus the mean of the group's other scores (Ahmadian et al. 2024)."""
    scale_advantages: bool = False
    """Divide ``group`` advantages by the group's std (GRPO); false keeps only the mean (Dr. GRPO). Must be false
    with ``leave_one_out`` (RLOO's advantage is unscaled)."""
    kl_mode: str = "reward"
    """Where the KL to the reference goes: ``loss``: ``kl_coef`` times the per-token ``k3`` estimate added to the
    loss (GRPO); ``reward``: ``kl_coef`` times the response's summed per-token ``k1`` taken off its score before the
    advantage (the per-token penalty of RLOO and PPO)."""
    kl_coef: float = 0.05
    """KL coefficient (beta; 0 for none)."""


@dataclass
class RLOORunConfig(GRPORunConfig):
    """RLOO from an SFT run: the GRPO stage with RLOO's defaults (``recipes/rloo.py``, or ``recipes/grpo.py
    --grpo.advantage=leave_one_out --grpo.scale_advantages=false --grpo.kl_mode=reward``)."""

    output_dir: str = "runs/rloo"
    """Where the run writes config, metrics, rollouts, summary and the policy adapter."""
    grpo: RLOOParams = field(default_factory=RLOOParams)


# ---------------------------------------------------------------------------------------------------------------
# The rounds pipeline (``recipes/pipeline.py``)

PIPELINE_STYLES = ("llama3", "llama2")
GATE_METRICS = ("accuracy", "win_rate", "eval_loss")
AVERAGE_COMBINATIONS = ("cat", "svd")
PIPELINE_SET_KEYS = ("output_dir", "init", "resume", "overwrite")
"""Stage options the pipeline sets itself: a stage's ``overrides`` may not name them."""


@dataclass
class PipelineStageConfig:
    """One stage of a round: the stage's own YAML and overrides on top of it, run with the stage's own code."""

    config: str = ""
    """The stage's config file (a path, relative to the current directory or to the checkout), as its own recipe
    takes with ``--config``."""
    overrides: list[str] = field(default_factory=list)
    """``--section.key=value`` overrides applied after ``config`` (``output_dir``, ``init``, ``resume`` and
    ``overwrite`` are the pipeline's and may not be given)."""

    def check(self, name: str) -> None:
        if not self.config:
            raise ConfigError(f"{name}.config must name the stage's config file")
        for override in self.overrides:
            key = override.lstrip("-").partition("=")[0]
            if not override.startswith("--") or "=" not in override:
                raise ConfigError(f"{name}.overrides: {override!r} must look like --section.key=value")
            if key in PIPELINE_SET_KEYS:
                raise ConfigError(f"{name}.overrides: --{key} is set by the pipeline (each stage's run directory and "
                                  "start point); remove it")


@dataclass
class PipelineSFTStage(PipelineStageConfig):
    """The SFT run the first round starts from, when ``init`` is not given (``OUTPUT_DIR/round-0/sft``)."""

    config: str = "recipes/configs/tiny/sft_lora.yaml"
    """The stage's config file (a path, relative to the current directory or to the checkout)."""
    overrides: list[str] = field(default_factory=lambda: ["--data.max_train_samples=700"])
    """As for any stage; the default trains on a seed set, the first 700 of the bundled suite's 2,188 answers, and
    leaves the rest to the rounds' verified samples (from SFT on all of them the rounds have nothing to learn on
    the tiny suite; see docs/pipeline.md)."""


@dataclass
class PipelineRewardStage(PipelineStageConfig):
    """Step 1 of a round: train or refresh the reward model on the preference data gathered so far."""

    enabled: bool = False
    """Train a reward model each round (``OUTPUT_DIR/round-N/reward``) on ``data.train`` of its config plus every
    earlier round's best-against-worst pairs; rejection sampling then scores with it (added to the verifier, if
    any) and the gate can use ``win_rate``. Off: the samples are scored by the rejection-sampling config's
    verifier alone."""
    config: str = "recipes/configs/tiny/reward_lora.yaml"
    """The stage's config file (a path, relative to the current directory or to the checkout)."""


@dataclass
class PipelineRejectionStage(PipelineStageConfig):
    """Steps 2 and 3 of a round: K samples per prompt from the current model, scored; the kept ones fine-tuned on
    with the SFT stage (``OUTPUT_DIR/round-N/rejection_sampling/sft``)."""

    config: str = "recipes/configs/tiny/rejection_sampling.yaml"
    """The stage's config file (a path, relative to the current directory or to the checkout)."""
    overrides: list[str] = field(default_factory=lambda: ["--sampling.temperature=0.4"])
    """As for any stage; the default samples cooler than ``rejection_sampling.yaml`` (0.7), which gives DPO cleaner
    rejected replies from the tiny pipeline's seed-set model (see docs/pipeline.md)."""


@dataclass
class PipelineDPOStage(PipelineStageConfig):
    """Step 4 of a Llama 3 round: DPO on the round's best-against-worst pairs of the model's own samples, the
    reference being this round's SFT model."""

    config: str = "recipes/configs/tiny/dpo_lora.yaml"
    """The stage's config file; its ``data.train`` is replaced by the round's ``pairs.jsonl``."""
    overrides: list[str] = field(default_factory=lambda: ["--dpo.nll_weight=2.0",
                                                          "--dpo.rejected_to_first_difference=true"])
    """As for any stage; the default keeps the chosen replies' likelihood up harder than ``dpo_lora.yaml`` does for
    the bundled pairs (the model's own pairs with 0.2 lowered the tiny round's accuracy), and scores each rejected
    reply only to its first token that differs from the chosen one (the words after it are mostly right ones;
    scored as rejected, they cost the tiny round 1.25 test points). See docs/pipeline.md."""


@dataclass
class PipelinePPOStage(PipelineStageConfig):
    """Step 4 of a Llama 2 round (``style: llama2``): PPO from this round's SFT model."""

    config: str = "recipes/configs/tiny/ppo_lora.yaml"
    """The stage's config file."""


@dataclass
class AverageConfig:
    """Step 5: average several runs of the round's last stage (DPO, or PPO for ``style: llama2``)."""

    runs: int = 2
    """Runs of the last stage, seeds ``seed``, ``seed + 1``, ...; their LoRA weight deltas are averaged. 1: no
    averaging (unless ``checkpoints``), that one run is the round's model."""
    combination: str = "svd"
    """How the mean of the merged deltas ``mean_i(B_i A_i alpha/r)`` becomes one adapter (PEFT's
    ``add_weighted_adapter``): ``cat`` stacks the runs' factors, exact, of rank ``runs x r`` (the rank then grows
    every round); ``svd`` re-factors the mean delta into rank ``rank`` by SVD (the relative error is recorded).
    Averaging the A and B factors themselves would not be the mean of the models."""
    rank: int | None = None
    """Rank of the ``svd`` adapter; ``null``: the runs' own rank, so every round continues an adapter of one shape."""
    checkpoints: int = 0
    """``0``: each run contributes its final adapter. ``N > 0``: each run contributes its last N saved checkpoints
    (the DPO trainer's ``checkpoint-STEP/`` directories, which hold its adapter) instead, and the round's model is
    the mean of all of them (Llama 3 averages checkpoints as well as runs): ``runs: 1`` with ``checkpoints: 3``
    averages one run's last three checkpoints. The DPO stage must keep and write that many (``train.save_total_limit``
    null or >= N; with ``train.max_steps``, ``max_steps / save_steps`` >= N): checked before anything runs.
    ``style: llama2`` has none to average (PPO's checkpoints hold its training state, not an adapter)."""

    def __post_init__(self):
        check_at_least("average.runs", self.runs, 1)
        check_choice("average.combination", self.combination, AVERAGE_COMBINATIONS)
        check_at_least("average.rank", self.rank, 1, optional=True)
        check_at_least("average.checkpoints", self.checkpoints, 0)


@dataclass
class GateConfig:
    """Step 6: the round's model replaces the incumbent only if it beats it on held-out figures by ``margin``."""

    metric: str = "accuracy"
    """What decides: ``accuracy`` (verifier accuracy of greedy answers; needs a verifier), ``win_rate`` (the round's
    reward model prefers the candidate's greedy answer to the incumbent's on more than half the prompts, plus the
    margin; needs ``reward.enabled``), or ``eval_loss`` (held-out loss, lower is better). The others are measured
    and recorded where they can be."""
    margin: float = 0.0
    """How much better the candidate must be: accuracy or win rate above the incumbent's (or 0.5) by more than this;
    eval loss below the incumbent's by more than this."""
    max_p_value: float | None = 0.05
    """With ``accuracy`` or ``win_rate``, the gain must also be more than chance: on the prompts where the candidate
    and the incumbent differ (one right and the other wrong; or one answer scored above the other), the one-sided
    sign test must give at most this p-value. 200 prompts move 0.5 points each, and two models a point apart differ
    on a handful; ``null`` decides on the margin alone. ``eval_loss`` compares means, with no such test."""
    data: str = "bundled:suite_messages_eval.jsonl"
    """Held-out conversations (a prompt and its reference reply) the figures are measured on."""
    split: str | None = None
    """Split to take from a hub id or a saved ``DatasetDict`` (default ``train``)."""
    max_samples: int | None = None
    """Use only the first N conversations; ``null`` for all."""
    verifier: str | None = AUTO_VERIFIER
    """``module:function`` checking an answer; ``auto``: the suite's verifier for the bundled suite, else none."""
    max_new_tokens: int = 32
    """Longest greedy answer."""
    batch_size: int = 32
    """Prompts generated together."""

    def __post_init__(self):
        check_choice("gate.metric", self.metric, GATE_METRICS)
        check_at_least("gate.margin", self.margin, 0)
        if self.max_p_value is not None and not 0 < self.max_p_value <= 1:
            raise ConfigError(f"gate.max_p_value must be in (0, 1] or null, got {self.max_p_value}")
        if not self.data:
            raise ConfigError("gate.data must name held-out conversations")
        check_at_least("gate.max_samples", self.max_samples, 1, optional=True)
        check_callable_spec("gate.verifier", self.verifier)
        check_at_least("gate.max_new_tokens", self.max_new_tokens, 1)
        check_at_least("gate.batch_size", self.batch_size, 1)


@dataclass
class PipelineRunConfig(RunConfig):
    """Rounds of post-training, Llama 3 style (reward model, rejection sampling, SFT on the kept samples, DPO on
    the model's own pairs, averaging, an evaluation gate) or Llama 2 style (PPO instead of DPO), each stage run with
    its own recipe's code into ``OUTPUT_DIR/round-N/STAGE`` (``recipes/pipeline.py``)."""

    output_dir: str = "runs/pipeline"
    """Where the pipeline writes its rounds (``round-N/``, each with a ``manifest.json``), ``summary.json``,
    ``summary.md`` and ``figures.png``."""
    init: str | None = None
    """A finished SFT run the first round starts from; ``null`` trains one with ``sft`` into
    ``OUTPUT_DIR/round-0/sft``."""
    rounds: int = 2
    """Rounds to run; each starts from the model the previous one promoted."""
    style: str = "llama3"
    """``llama3``: rejection sampling, SFT, DPO on the model's own pairs, averaging, gate; ``llama2``: rejection
    sampling, SFT, PPO, averaging, gate."""
    seed: int = 0
    """Seeds of every stage: rejection sampling's ``sampling.seed`` and ``train.seed``, and the averaged runs' seeds
    (``seed``, ``seed + 1``, ...). Another seed repeats the whole pipeline on other samples and orders."""
    sft: PipelineSFTStage = field(default_factory=PipelineSFTStage)
    reward: PipelineRewardStage = field(default_factory=PipelineRewardStage)
    rejection_sampling: PipelineRejectionStage = field(default_factory=PipelineRejectionStage)
    dpo: PipelineDPOStage = field(default_factory=PipelineDPOStage)
    ppo: PipelinePPOStage = field(default_factory=PipelinePPOStage)
    average: AverageConfig = field(default_factory=AverageConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        check_at_least("rounds", self.rounds, 1)
        check_choice("style", self.style, PIPELINE_STYLES)
        check_at_least("seed", self.seed, 0)
        for name in ("sft", "reward", "rejection_sampling", "dpo", "ppo"):
            getattr(self, name).check(name)
        self.gate.verifier = resolve_verifier(self.gate.verifier, self.gate.data)
        if self.gate.metric == "accuracy" and not self.gate.verifier:
            raise ConfigError(f"gate.metric accuracy needs a verifier and {self.gate.data} has none; set "
                              "gate.verifier, or gate.metric to eval_loss or win_rate")
        if self.gate.metric == "win_rate" and not self.reward.enabled:
            raise ConfigError("gate.metric win_rate needs a reward model: set reward.enabled to true")
        if self.average.checkpoints and self.style == "llama2":
            raise ConfigError("average.checkpoints averages DPO's checkpoint adapters; style llama2's PPO checkpoints "
                              "hold its training state, not an adapter: set average.checkpoints to 0")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (parsed from source; shown by ``--help``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass).lstrip())
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and, for strings from the command line, convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is dict:  # a pass-through section: its keys are checked against the trainer's own dataclass later
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping of keys to values; got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if not value.startswith("[") else yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list; got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string; got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, list(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            # A section the file gives is built from its class, whose defaults are the stage's (one place).
            kwargs[key] = from_dict(tp, value or {}, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The resolved config as plain data (what ``config.yaml`` in a run directory holds)."""
    return dataclasses.asdict(config)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
    node[leaf] = value


def _help(cls: type, prefix: str = "") -> list[str]:
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += _help(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{prefix}{f.name}={default!r}\n      {docs.get(f.name, '')}")
    return lines


def parse_args(cls: type, argv: list[str] | None = None) -> Any:
    """Parse ``--config FILE``, ``--output_dir DIR``, ``--resume``, ``--overwrite`` and ``--a.b=c`` into ``cls``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"{cls.__doc__ or cls.__name__}\n\nOptions (YAML keys, or --section.key=value):\n" + "\n".join(_help(cls)))
        raise SystemExit(0)
    tree: dict = {}
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if key in ("resume", "overwrite", "generate_only"):
                value = "true"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
        if key == "config":
            path = Path(value)
            if not path.is_file():
                raise ConfigError(f"--config: no such file {value}")
            tree = _merge(tree, load_config_file(path))
        else:
            # YAML parsing gives ints, bools and nulls; strings like 1e-4 are converted by the field's type.
            overrides.append((key, yaml.safe_load(value) if value != "" else ""))
        i += 1
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return from_dict(cls, tree)


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (lines are 1-based)."""

    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        first_lines: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first_lines:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, first_lines[key])
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_config_file(path: Path) -> dict:
    """The mapping a config file holds; a duplicate key or invalid YAML is a ``ConfigError`` naming file and line."""
    try:
        with path.open() as f:
            loaded = yaml.load(f, Loader=UniqueKeyLoader) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}, line {e.line}: duplicate key {e.key!r} (first on line {e.first_line}); give each "
                          "key once") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(cls: type, path: str | Path) -> Any:
    """Load one YAML file into ``cls`` (used by tests that check every shipped config)."""
    return parse_args(cls, ["--config", str(path)])


# Stage name -> its config class; a shipped YAML's file name starts with its stage (``sft_qlora.yaml``,
# ``rejection_sampling.yaml``).
STAGE_CONFIGS: dict[str, type] = {
    "sft": SFTRunConfig,
    "reward": RewardRunConfig,
    "dpo": DPORunConfig,
    "kto": KTORunConfig,
    "rejection_sampling": RejectionSamplingRunConfig,
    "ppo": PPORunConfig,
    "grpo": GRPORunConfig,
    "rloo": RLOORunConfig,
    "pipeline": PipelineRunConfig,
}


def stage_of(path: str | Path) -> str:
    """The stage a shipped YAML belongs to: the longest stage name its file name equals or starts with, then ``_``."""
    stem = Path(path).stem
    matches = [s for s in STAGE_CONFIGS if stem == s or stem.startswith(f"{s}_")]
    if not matches:
        raise ConfigError(f"{path}: file name should start with a stage ({', '.join(STAGE_CONFIGS)})")
    return max(matches, key=len)


def config_class_for(path: str | Path) -> type:
    """The config class of a shipped YAML, from the stage its file name starts with."""
    return STAGE_CONFIGS[stage_of(path)]
