"""Supervised fine-tuning with LoRA, QLoRA or full weights, on TRL's ``SFTTrainer``.

We hand TRL pre-tokenised rows whose labels come from our chat template (loss on assistant tokens only), and let it
do best-fit-decreasing packing, padding-free batching with restarted position ids, and the token-mean loss over the
whole accumulated batch (transformers passes ``num_items_in_batch`` to the model's loss). What we add around it:
the run directory contract, counted truncation, verifier accuracy before and after, and crash-safe resume.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..config import ConfigError, SFTConfig
from ..data import load_conversations, tokenize_conversations
from ..evaluate import eval_loss, load_callable, verifier_accuracy
from ..models import (
    load_adapter,
    load_base_model,
    load_tokenizer,
    lora_config,
    resolve_model,
)
from ..models import (
    resolve_init as resolve_adapter_init,
)
from ..runs import (
    NonFiniteLossCallback,
    NonFiniteLossError,
    RunCallback,
    discard_incomplete_checkpoints,
    plot_loss,
    prepare_output_dir,
    process_state,
    train_resumable,
    trainer_arguments,
    two_column_table,
    write_config,
    write_summary,
)
from ..templates import get_template, save_with_template


def trl_arguments(cfg: SFTConfig, output_dir: Path, has_eval: bool):
    """TRL's ``SFTConfig``: the shared trainer fields (``finetune.runs.trainer_arguments``) plus packing."""
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(
        **trainer_arguments(cfg, output_dir, has_eval),
        packing=cfg.data.packing,
        packing_strategy="bfd",
        padding_free=cfg.data.packing,
        eval_packing=cfg.data.packing,
        shuffle_dataset=False,
    )


def resolve_init(cfg: SFTConfig) -> tuple[SFTConfig, str | None]:
    """:func:`finetune.models.resolve_init`, refusing to continue a LoRA run with full fine-tuning:
    ``(cfg, init kind or None)``."""
    cfg, kind, _ = resolve_adapter_init(cfg)
    if kind == "adapter" and cfg.adapter.method == "full":
        raise ConfigError(f"--init {cfg.init} is a LoRA run; continue it with adapter.method lora or qlora")
    return cfg, kind
def load_model(cfg: SFTConfig, init_kind: str | None):
    """The model to train and the ``peft_config`` for TRL: a new adapter on ``model.name`` (or on a full-weights
    ``init``), or the ``init`` run's adapter loaded trainable (then ``peft_config`` is ``None``)."""
    if init_kind == "adapter":
        base = load_base_model(cfg.model, cfg.adapter.method)
        return load_adapter(base, cfg.init, trainable=True), None
    if init_kind == "full":
        return load_base_model(dataclasses.replace(cfg.model, name=cfg.init), cfg.adapter.method), lora_config(cfg.adapter)
    return load_base_model(cfg.model, cfg.adapter.method), lora_config(cfg.adapter)


def run(cfg: SFTConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to ``summary.json``."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    state = process_state()
    main = state.is_main_process
    cfg, init_kind = resolve_init(cfg)  # a bad --init fails before anything is written
    output_dir = prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, main)
    state.wait_for_everyone()
    if cfg.resume and main:
        for path in discard_incomplete_checkpoints(output_dir):
            print(f"discarded incomplete checkpoint {path}")
    state.wait_for_everyone()
    if main:
        write_config(output_dir, cfg)
    set_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model.name)
    template = get_template(cfg.data.template, tokenizer)
    train_convs = load_conversations(cfg.data.train, cfg.data.format, cfg.data.split, cfg.data.max_train_samples)
    train_rows, train_report = tokenize_conversations(train_convs, template, tokenizer, cfg.data.max_length)
    eval_convs, eval_rows, eval_report = [], [], None
    if cfg.data.eval:
        eval_convs = load_conversations(cfg.data.eval, cfg.data.format, cfg.data.eval_split, cfg.data.max_eval_samples)
        eval_rows, eval_report = tokenize_conversations(eval_convs, template, tokenizer, cfg.data.max_length)
    if main:
        print(train_report.describe("train data"))
        if eval_report:
            print(eval_report.describe("eval data"))
    if not train_rows:
        raise ConfigError(f"no training rows left from {cfg.data.train}: {train_report.describe('train data')}")

    model, peft_config = load_model(cfg, init_kind)
    verifier = load_callable(cfg.eval.verifier) if cfg.eval.verifier and eval_convs else None
    generation_convs = eval_convs[: cfg.eval.num_samples] if cfg.eval.num_samples else eval_convs

    summary: dict = {"model": cfg.model.name, "resolved_model": resolve_model(cfg.model.name)}
    if cfg.init:
        summary["init"] = cfg.init
    if eval_rows and cfg.eval.before_training:
        summary["base_eval_loss"] = eval_loss(model, eval_rows, tokenizer.pad_token_id, cfg.train.per_device_batch_size)
    if verifier and cfg.eval.before_training:
        before = verifier_accuracy(
            model, tokenizer, template, generation_convs, verifier, cfg.eval.max_new_tokens, cfg.eval.batch_size
        )
        summary["base_eval_accuracy"] = before.accuracy
        if main:
            print(f"verifier accuracy before training: {before.accuracy:.3f} on {before.num_prompts} eval prompts")

    nan_guard = NonFiniteLossCallback()
    trainer = SFTTrainer(
        model=model,
        args=trl_arguments(cfg, output_dir, bool(eval_rows)),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[RunCallback(output_dir), nan_guard],
    )
    train_figures = train_resumable(trainer, output_dir, cfg.resume, nan_guard, main, train_report)

    summary.update(train_figures)
    if eval_rows:
        summary["eval_loss"] = eval_loss(
            trainer.model, eval_rows, tokenizer.pad_token_id, cfg.train.per_device_batch_size
        )
        summary["eval_data"] = eval_report.as_dict()
        if not math.isfinite(summary["eval_loss"]):
            raise NonFiniteLossError(f"eval loss is {summary['eval_loss']}")
    if verifier:
        after = verifier_accuracy(
            trainer.model, tokenizer, template, generation_convs, verifier, cfg.eval.max_new_tokens, cfg.eval.batch_size
        )
        summary["eval_accuracy"] = after.accuracy
        summary["eval_samples"] = after.samples

    trainer.save_model(str(output_dir))
    if main:
        save_with_template(tokenizer, template, output_dir, model_config=trainer.model.config)
        write_summary(output_dir, summary)
        plot_loss(output_dir)
    state.wait_for_everyone()
    return summary


def before_after_table(summary: dict) -> str:
    """The eval figures before and after training, as the recipe prints them at the end."""
    rows = [("eval loss", "base_eval_loss", "eval_loss"), ("verifier accuracy", "base_eval_accuracy", "eval_accuracy")]
    return two_column_table(("before", "after"), [(label, summary.get(before), summary.get(after))
                                                  for label, before, after in rows
                                                  if before in summary or after in summary])
