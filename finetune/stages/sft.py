"""Supervised fine-tuning with LoRA, QLoRA or full weights, on TRL's ``SFTTrainer``.

We hand TRL pre-tokenised rows whose labels come from our chat template (loss on assistant tokens only), and let it
do best-fit-decreasing packing, padding-free batching with restarted position ids, and the token-mean loss over the
whole accumulated batch (transformers passes ``num_items_in_batch`` to the model's loss). What we add around it:
the run directory contract, counted truncation, verifier accuracy before and after, and crash-safe resume.
"""

from __future__ import annotations

from pathlib import Path

from ..config import SFTRunConfig
from ..data import load_conversations, tokenize_conversations
from ..evaluate import eval_loss, load_callable
from ..models import load_adapter, load_base_model, lora_config, resolve_model
from ..runs import trainer_arguments, two_column_table
from ..trainer_config import trainer_config
from . import scaffold
from .scaffold import Stage, StageRun, Trained


def trl_arguments(cfg: SFTRunConfig, output_dir: Path, has_eval: bool):
    """TRL's ``SFTConfig``: the shared trainer fields (``finetune.runs.trainer_arguments``) plus packing, and the
    config's ``trainer`` pass-through section (``finetune.trainer_config``)."""
    from trl import SFTConfig as TRLSFTConfig

    ours = dict(
        **trainer_arguments(cfg, output_dir, has_eval),
        packing=cfg.data.packing,
        packing_strategy="bfd",
        padding_free=cfg.data.packing,
        eval_packing=cfg.data.packing,
        shuffle_dataset=False,
    )
    return trainer_config(TRLSFTConfig, ours, cfg.trainer)


def load_model(cfg: SFTRunConfig, init_kind: str | None):
    """The model to train and the ``peft_config`` for TRL: a new adapter on ``model.name`` (a full-weights ``init``
    is ``model.name`` once resolved), or the ``init`` run's adapter loaded trainable (then ``peft_config`` is
    ``None``)."""
    base = load_base_model(cfg.model, cfg.adapter.method)
    if init_kind == "adapter":
        return load_adapter(base, cfg.init, trainable=True), None
    return base, lora_config(cfg.adapter)


def load_data(cfg: SFTRunConfig, tokenizer, template):
    return scaffold.load_rows(cfg, tokenizer, template, load_conversations, tokenize_conversations)


def train(run: StageRun) -> Trained:
    """Build the model, measure it before, train, measure it after."""
    from trl import SFTTrainer

    cfg, rows = run.cfg, run.data
    model, peft_config = load_model(cfg, run.init.kind if run.init else None)
    verifier = load_callable(cfg.eval.verifier) if cfg.eval.verifier and rows.eval_records else None
    generation_convs = rows.eval_records[: cfg.eval.num_samples] if cfg.eval.num_samples else rows.eval_records

    summary: dict = {"model": cfg.model.name, "resolved_model": resolve_model(cfg.model.name)}
    if cfg.init:
        summary["init"] = cfg.init
    if rows.eval and cfg.eval.before_training:
        summary["base_eval_loss"] = eval_loss(model, rows.eval, run.tokenizer.pad_token_id, cfg.train.per_device_batch_size)
    if verifier and cfg.eval.before_training:
        summary["base_eval_accuracy"] = scaffold.verifier_accuracy_of(run, model, generation_convs, verifier,
                                                             "the model before training").accuracy

    trainer, figures = scaffold.train_with_trainer(run, lambda callbacks: SFTTrainer(
        model=model, args=trl_arguments(cfg, run.output_dir, bool(rows.eval)), peft_config=peft_config,
        callbacks=callbacks, **scaffold.trainer_inputs(run)))
    summary.update(figures)
    if rows.eval:
        loss = eval_loss(trainer.model, rows.eval, run.tokenizer.pad_token_id, cfg.train.per_device_batch_size)
        summary["eval_loss"] = scaffold.check_finite("eval loss", loss)
        summary["eval_data"] = rows.eval_report.as_dict()
    if verifier:
        after = scaffold.verifier_accuracy_of(run, trainer.model, generation_convs, verifier)
        summary["eval_accuracy"] = after.accuracy
        summary["eval_samples"] = after.samples
    return Trained(summary, lambda directory: trainer.save_model(str(directory)), trainer.model.config, trainer.model)


def check(cfg: SFTRunConfig) -> None:
    """The trainer's arguments, pass-through included, build (before the output directory is touched)."""
    trl_arguments(cfg, Path(cfg.output_dir), cfg.data.eval is not None)


STAGE = Stage("sft", load_data, train, check=check)


def run(cfg: SFTRunConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to ``summary.json``."""
    return scaffold.run_stage(cfg, STAGE).summary


def before_after_table(summary: dict) -> str:
    """The eval figures before and after training, as the recipe prints them at the end."""
    rows = [("eval loss", "base_eval_loss", "eval_loss"), ("verifier accuracy", "base_eval_accuracy", "eval_accuracy")]
    return two_column_table(("before", "after"), [(label, summary.get(before), summary.get(after))
                                                  for label, before, after in rows
                                                  if before in summary or after in summary])
