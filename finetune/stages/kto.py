"""Kahneman-Tversky optimisation from an SFT run, on TRL's ``KTOTrainer``: one base, a policy and a reference adapter.

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) needs no pairs: each completion is labelled desirable
or undesirable on its own (``data_formats`` reads TRL's unpaired format, or splits preference pairs into one of
each). Its own stage, not a ``dpo.loss``, because its data, rows, batch layout and figures are not DPO's: rows are
single sequences, the reference point is estimated from mismatched (prompt, completion) pairs within a micro-batch,
and there is no pairwise accuracy. The model side is DPO's: the SFT adapter is the trainable ``default`` adapter,
and ``KTOTrainer``, given that ``PeftModel``, adds a frozen copy named ``ref`` on the same base for the reference
forward (``finetune.stages.dpo.load_policy``), so the reference is the SFT policy, never the raw base.

TRL computes the loss; ``tests/loss_oracles.py`` (``kto_loss``, ``kto_reference_point``) holds the paper's formula and
``tests/integration/test_kto.py`` checks TRL's loss equals it on a real batch.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..config import KTORunConfig
from ..data import load_unpaired
from ..evaluate import load_callable
from ..models import resolve_model
from ..preference_data import desirable_conversations, tokenize_unpaired_for_kto
from ..runs import trainer_arguments
from ..trainer_config import trainer_config
from . import scaffold
from .dpo import ReferenceGapCallback, freeze_reference, load_policy, policy_output
from .scaffold import Stage, StageRun, Trained


def trl_arguments(cfg: KTORunConfig, output_dir: Path, has_eval: bool):
    """TRL's ``KTOConfig``: the shared trainer fields plus KTO's. Sequential sampling is what TRL requires for its
    KL estimate (each example's mismatched completion is the previous example's in the same micro-batch, fixed when
    the dataset is prepared); the rows are shuffled once in :func:`load_data` instead."""
    from trl import KTOConfig

    return trainer_config(KTOConfig, dict(
        **trainer_arguments(cfg, output_dir, has_eval),
        train_sampling_strategy="sequential",
        loss_type="kto",
        beta=cfg.kto.beta,
        desirable_weight=cfg.kto.desirable_weight,
        undesirable_weight=cfg.kto.undesirable_weight,
        precompute_ref_log_probs=cfg.kto.precompute_ref_log_probs,
        precompute_ref_batch_size=None,
        disable_dropout=True,  # policy and reference must score alike at step 0
        sync_ref_model=False,
        activation_offloading=False,
    ), cfg.trainer)


def _trainer_class():
    from trl import KTOTrainer

    class PreTokenizedKTOTrainer(KTOTrainer):
        """TRL's ``KTOTrainer`` given rows already rendered with our chat template.

        The one hook changed: TRL's ``_prepare_dataset`` would render text columns; our rows carry ``prompt_ids``,
        ``completion_ids`` and ``label`` (``finetune.preference_data.tokenize_unpaired_for_kto``). What it would add
        on top is kept as TRL does it: each row's ``KL_completion_ids`` is the previous row's completion within each
        run of ``per_device_train_batch_size`` rows (the last row's for the first), the mismatched pairs the
        reference point is estimated from.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset

            def add_kl_completion_ids(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)

    return PreTokenizedKTOTrainer


def build_trainer(cfg: KTORunConfig, model, peft_config, tokenizer, train_rows, eval_rows, output_dir, callbacks=()):
    """TRL's ``KTOTrainer`` on our rows; with a trained adapter in ``model`` it adds the frozen ``ref`` copy."""
    from datasets import Dataset

    trainer = _trainer_class()(
        model=model,
        args=trl_arguments(cfg, Path(output_dir), bool(eval_rows)),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )
    return freeze_reference(trainer)


def load_data(cfg: KTORunConfig, tokenizer, template):
    """Examples tokenised, then the training rows shuffled once with ``train.seed``: split pairs arrive as (chosen,
    rejected) of one prompt side by side, and TRL's mismatched KL pairing (each row with the previous row's
    completion, sampled in order) would otherwise pair a prompt with its own other reply."""
    loaded = scaffold.load_rows(cfg, tokenizer, template, load_unpaired, tokenize_unpaired_for_kto)
    random.Random(cfg.train.seed).shuffle(loaded.data.train)
    return loaded


def train(run: StageRun) -> Trained:
    """Load the policy, measure the SFT init, train, measure the policy; the run's output is the policy alone."""
    cfg, rows = run.cfg, run.data
    model, peft_config = load_policy(cfg, run.init.kind)
    verifier = load_callable(cfg.eval.verifier) if cfg.eval.verifier and rows.eval_records else None
    eval_convs = desirable_conversations(rows.eval_records)
    generation_convs = eval_convs[: cfg.eval.num_samples] if cfg.eval.num_samples else eval_convs

    summary: dict = {"model": cfg.model.name, "resolved_model": resolve_model(cfg.model.name), "init": cfg.init,
                     "train_data": rows.train_report.as_dict()}
    if verifier and cfg.eval.before_training:
        summary["init_eval_accuracy"] = scaffold.verifier_accuracy_of(run, model, generation_convs, verifier,
                                                                      "the SFT init").accuracy

    trainer, figures = scaffold.train_with_trainer(run, lambda callbacks: build_trainer(
        cfg, model, peft_config, run.tokenizer, rows.train, rows.eval, run.output_dir,
        [ReferenceGapCallback(cfg.kto.beta), *callbacks]))
    summary.update(loss="kto", beta=cfg.kto.beta, **figures)
    if rows.eval:
        metrics = trainer.evaluate()
        summary.update(
            eval_loss=scaffold.check_finite("eval loss", metrics["eval_loss"]),
            eval_rewards_desirable=metrics.get("eval_rewards/chosen"),
            eval_rewards_undesirable=metrics.get("eval_rewards/rejected"),
            eval_reward_margin=metrics.get("eval_rewards/margins"),
            eval_kl=metrics.get("eval_kl"),
            eval_data=rows.eval_report.as_dict(),
        )
    if verifier:
        after = scaffold.verifier_accuracy_of(run, trainer.model, generation_convs, verifier)
        summary["eval_accuracy"] = after.accuracy
        summary["eval_samples"] = after.samples

    return policy_output(trainer, summary)


def check(cfg: KTORunConfig) -> None:
    """The trainer's arguments, pass-through included, build (before the output directory is touched)."""
    trl_arguments(cfg, Path(cfg.output_dir), cfg.data.eval is not None)


STAGE = Stage("kto", load_data, train, check=check)


def run(cfg: KTORunConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to ``summary.json``."""
    return scaffold.run_stage(cfg, STAGE).summary
