"""Preference optimisation on pairs from an SFT run: DPO on TRL's ``DPOTrainer`` (one base, a policy and a reference
adapter), or ORPO and SimPO on TRL's ``ORPOTrainer`` and ``CPOTrainer`` (the policy alone).

The base is loaded once. The SFT adapter is loaded onto it as PEFT's ``default`` adapter, trainable: that is the
policy. Given a ``PeftModel`` whose adapter is already trained, TRL's ``DPOTrainer`` adds a frozen copy of it named
``ref`` on the same base and runs the reference forward with that adapter active (``compute_ref_log_probs``), so
the reference is the SFT policy, never the raw base with adapters switched off. (From a full-weights SFT run the run
itself is the base and the policy a new LoRA adapter; the reference is then that base with the adapter off, which is
again the SFT model.)

We hand TRL pairs already rendered with our chat template (prompt ids, then each reply's ids), so what DPO scores is
token for token what SFT trained on. TRL computes the per-sequence log-probs summed over the reply tokens (the
prompt masked) and the loss; ``tests/loss_oracles.py`` holds the same maths as pure functions and the tests check
that TRL's loss equals ours on the same batch for every loss offered here.

``dpo.loss: orpo`` and ``simpo`` are reference-free: they score the policy's per-token mean log-probs alone, so no
``ref`` adapter is added and no reference forward runs. They stay in this stage, not stages of their own, because
everything but the trainer class is DPO's: the same pairs, rendered the same way, the same policy continuing the SFT
adapter, the same eval figures (LLaMA-Factory's ``pref_loss`` makes the same cut; KTO, whose data is unpaired, is its
own stage, ``finetune.stages.kto``).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ..config import DPOParams, DPORunConfig
from ..data import load_preferences
from ..evaluate import load_callable
from ..models import load_adapter, load_base_model, lora_config, resolve_model
from ..preference_data import chosen_conversations, reference_free_rows, tokenize_pairs_for_dpo
from ..runs import trainer_arguments
from ..trainer_config import trainer_config
from . import scaffold
from .scaffold import Stage, StageRun, Trained

POLICY_ADAPTER = "default"
"""PEFT's name for the trainable policy adapter (the one TRL's ``DPOTrainer`` trains and copies)."""
REFERENCE_ADAPTER = "ref"
"""The frozen copy of the SFT adapter that TRL's ``DPOTrainer`` adds and activates for the reference forward."""


def trl_loss(params: DPOParams) -> dict:
    """TRL's ``loss_type``, ``loss_weights`` and ``label_smoothing`` for our loss name.

    ``sigmoid``, ``ipo`` and ``hinge`` are TRL's losses of the same names (the test oracles in
    ``tests/loss_oracles.py``: ``dpo_sigmoid_loss``, ``ipo_loss`` on per-token mean log-probs, ``dpo_hinge_loss``).
    TRL 1.16 has no cDPO:
    its ``robust`` loss (Chowdhury et al. 2024) is ``R = ((1 - e) A - e B) / (1 - 2e)`` with ``A = -log s(b h)`` and
    ``B = -log s(-b h)``, while cDPO (``dpo_label_smoothed_loss`` there) is ``(1 - e) A + e B``. TRL sums
    weighted losses, and ``2 (1 - e) A - (1 - 2e) R = (1 - e) A + e B`` exactly, so cDPO is TRL's
    ``["sigmoid", "robust"]`` with weights ``[2 (1 - e), -(1 - 2e)]``.
    """
    if params.loss == "label_smoothed":
        eps = params.label_smoothing
        mapped = dict(loss_type=["sigmoid", "robust"], loss_weights=[2 * (1 - eps), -(1 - 2 * eps)], label_smoothing=eps)
    else:
        mapped = dict(loss_type=[params.loss], loss_weights=[1.0], label_smoothing=0.0)
    if params.nll_weight:
        # TRL's "sft" term: the token mean of -log pi over the chosen replies' tokens (the oracle tests/loss_oracles.py:sft_loss).
        mapped["loss_type"] = [*mapped["loss_type"], "sft"]
        mapped["loss_weights"] = [*mapped["loss_weights"], params.nll_weight]
    return mapped


def trl_arguments(cfg: DPORunConfig, output_dir: Path, has_eval: bool):
    """TRL's ``DPOConfig``: the shared trainer fields (``finetune.runs.trainer_arguments``) plus the
    preference loss. Rows already fit ``max_length`` (``tokenize_pairs_for_dpo`` cut and counted them)."""
    from trl import DPOConfig as TRLDPOConfig

    ours = dict(
        **trainer_arguments(cfg, output_dir, has_eval),
        truncation_mode="keep_start",
        padding_free=False,
        beta=cfg.dpo.beta,
        **trl_loss(cfg.dpo),
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        precompute_ref_batch_size=None,
        disable_dropout=True,  # policy and reference must score alike: at step 0 the loss is exactly log 2
        use_weighting=False,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        sync_ref_model=False,
        activation_offloading=False,
    )
    return trainer_config(TRLDPOConfig, ours, cfg.trainer)


def reference_free_arguments(cfg: DPORunConfig, output_dir: Path, has_eval: bool):
    """TRL's ``ORPOConfig`` (``dpo.loss: orpo``) or ``CPOConfig`` with ``loss_type="simpo"`` (``dpo.loss: simpo``).

    ORPO: ``beta`` is the odds-ratio weight lambda; the SFT term's weight is fixed at 1 (``DPOParams`` checks
    ``nll_weight`` says so). SimPO: ``beta`` and ``simpo_gamma`` as in the paper, ``cpo_alpha`` our ``nll_weight``
    (the token mean NLL of the chosen replies, the same term as DPO's), no label smoothing, no AlphaPO reshaping.
    """
    common = {**trainer_arguments(cfg, output_dir, has_eval),
              "remove_unused_columns": False,  # TRL's pair collator needs every column (it would turn it off itself)
              "beta": cfg.dpo.beta, "disable_dropout": True, "max_completion_length": None,
              "generate_during_eval": False, "is_encoder_decoder": False}
    if cfg.dpo.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return trainer_config(ORPOConfig, common, cfg.trainer)
    from trl.experimental.cpo import CPOConfig

    return trainer_config(CPOConfig, dict(**common, loss_type="simpo", simpo_gamma=cfg.dpo.simpo_gamma,
                                          cpo_alpha=cfg.dpo.nll_weight, label_smoothing=0.0, alpha=0.0), cfg.trainer)


def _reference_free_trainer_class(loss: str):
    """TRL's ``ORPOTrainer`` or ``CPOTrainer`` given rows already rendered with our chat template.

    The one hook changed: ``tokenize_row`` would render text columns; our rows are already TRL's tokenised layout
    (``finetune.preference_data.reference_free_rows``), so each passes through as it is.
    """
    if loss == "orpo":
        from trl.experimental.orpo import ORPOTrainer as base
    else:
        from trl.experimental.cpo import CPOTrainer as base

    class PreTokenized(base):
        def tokenize_row(self, feature, model=None):
            return feature

    PreTokenized.__name__ = PreTokenized.__qualname__ = f"PreTokenized{base.__name__}"
    return PreTokenized


def _trainer_class():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """TRL's ``DPOTrainer`` given rows already rendered with our chat template.

        The one hook changed: TRL would re-render text columns through the tokenizer's chat template; our rows carry
        ``prompt_ids``/``chosen_ids``/``rejected_ids`` from ``finetune.preference_data``, which TRL's collator, loss and
        reference-log-prob precompute consume as they are.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreTokenizedDPOTrainer


class ReferenceGapCallback(TrainerCallback):
    """Adds the policy's drift from the reference to every logged row, from TRL's implicit rewards.

    TRL logs ``rewards/chosen`` and ``rewards/rejected``, i.e. ``beta * (log pi(y|x) - log ref(y|x))`` averaged over
    the pairs. We add the log-ratios themselves (``logratio/chosen``, ``logratio/rejected``, nats per reply) and
    ``kl_gap``, their mean over both replies: a KL-like measure of how far the policy has moved from the reference
    on the preference data (0 at the start; it is measured on the data's replies, not on samples from the policy,
    so it is not a true KL and can be negative). Must run before ``RunCallback`` so ``metrics.jsonl`` gets it.
    """

    def __init__(self, beta: float):
        self.beta = beta

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        for prefix in ("", "eval_"):
            chosen, rejected = logs.get(f"{prefix}rewards/chosen"), logs.get(f"{prefix}rewards/rejected")
            if chosen is None or rejected is None:
                continue
            logs[f"{prefix}logratio/chosen"] = chosen / self.beta
            logs[f"{prefix}logratio/rejected"] = rejected / self.beta
            logs[f"{prefix}kl_gap"] = (chosen + rejected) / (2 * self.beta)


def load_policy(cfg: DPORunConfig, init_kind: str):
    """The base, loaded once, with the SFT adapter as the trainable ``default`` adapter; returns ``(model,
    peft_config)`` where ``peft_config`` is the new adapter for a full-weights init (else ``None``; a full-weights
    ``init`` is ``model.name`` once resolved)."""
    base = load_base_model(cfg.model, cfg.adapter.method)
    if init_kind == "adapter":
        return load_adapter(base, cfg.init, POLICY_ADAPTER, trainable=True), None
    return base, lora_config(cfg.adapter)


def build_trainer(cfg: DPORunConfig, model, peft_config, tokenizer, train_rows, eval_rows, output_dir, callbacks=(),
                  ref_model=None):
    """TRL's ``DPOTrainer`` on our rows; with a trained adapter in ``model`` it adds the frozen ``ref`` copy.

    ``ref_model`` (a separate, full reference model) replaces that copy; ``run`` never passes one, the memory
    benchmark does to measure what sharing the base saves (``benchmarks/dpo_memory.py``).
    """
    from datasets import Dataset

    if not cfg.dpo.uses_reference:
        if ref_model is not None:
            raise ValueError(f"dpo.loss={cfg.dpo.loss} has no reference model")
        return _reference_free_trainer_class(cfg.dpo.loss)(
            model=model,
            args=reference_free_arguments(cfg, Path(output_dir), bool(eval_rows)),
            train_dataset=Dataset.from_list(reference_free_rows(train_rows)),
            eval_dataset=Dataset.from_list(reference_free_rows(eval_rows)) if eval_rows else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
        )
    trainer = _trainer_class()(
        model=model,
        ref_model=ref_model,
        args=trl_arguments(cfg, Path(output_dir), bool(eval_rows)),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )
    return freeze_reference(trainer)


def freeze_reference(trainer):
    """The trainer with the frozen ``ref`` copy of the SFT adapter out of its optimizer's reach (DPO and KTO)."""
    for name, param in trainer.model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)  # frozen: the optimizer must never hold the reference
    return trainer


def policy_output(trainer, summary: dict) -> Trained:
    """The run's output is the policy alone: the reference is the --init run's adapter, already on disk (DPO, KTO)."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter(REFERENCE_ADAPTER)
    return Trained(summary, lambda directory: trainer.save_model(str(directory)), unwrapped.config, trainer.model)


def load_data(cfg: DPORunConfig, tokenizer, template):
    import functools

    train = functools.partial(tokenize_pairs_for_dpo,
                              rejected_to_first_difference=cfg.dpo.rejected_to_first_difference)
    return scaffold.load_rows(cfg, tokenizer, template, load_preferences, tokenize_pairs_for_dpo, train)


def train(run: StageRun) -> Trained:
    """Load the policy, measure the SFT init, train, measure the policy; the run's output is the policy alone."""
    cfg, rows = run.cfg, run.data
    model, peft_config = load_policy(cfg, run.init.kind)
    verifier = load_callable(cfg.eval.verifier) if cfg.eval.verifier and rows.eval_records else None
    eval_convs = chosen_conversations(rows.eval_records)
    generation_convs = eval_convs[: cfg.eval.num_samples] if cfg.eval.num_samples else eval_convs

    summary: dict = {"model": cfg.model.name, "resolved_model": resolve_model(cfg.model.name), "init": cfg.init}
    if verifier and cfg.eval.before_training:
        summary["init_eval_accuracy"] = scaffold.verifier_accuracy_of(run, model, generation_convs, verifier,
                                                             "the SFT init").accuracy

    # The log-ratio figures exist only where there is a reference: ORPO's and SimPO's "rewards" are beta * log pi.
    own_callbacks = [ReferenceGapCallback(cfg.dpo.beta)] if cfg.dpo.uses_reference else []
    trainer, figures = scaffold.train_with_trainer(run, lambda callbacks: build_trainer(
        cfg, model, peft_config, run.tokenizer, rows.train, rows.eval, run.output_dir, [*own_callbacks, *callbacks]))
    summary.update(loss=cfg.dpo.loss, beta=cfg.dpo.beta, reference=cfg.dpo.uses_reference, **figures)
    if rows.eval:
        metrics = trainer.evaluate()
        summary.update(
            eval_loss=scaffold.check_finite("eval loss", metrics["eval_loss"]),
            eval_reward_accuracy=metrics["eval_rewards/accuracies"],
            eval_rewards_chosen=metrics["eval_rewards/chosen"],
            eval_rewards_rejected=metrics["eval_rewards/rejected"],
            eval_reward_margin=metrics["eval_rewards/margins"],
            eval_data=rows.eval_report.as_dict(),
        )
        if cfg.dpo.uses_reference:
            summary["eval_kl_gap"] = (metrics["eval_rewards/chosen"] + metrics["eval_rewards/rejected"]) / (2 * cfg.dpo.beta)
    if verifier:
        after = scaffold.verifier_accuracy_of(run, trainer.model, generation_convs, verifier)
        summary["eval_accuracy"] = after.accuracy
        summary["eval_samples"] = after.samples

    return policy_output(trainer, summary)


def check(cfg: DPORunConfig) -> None:
    """The trainer's arguments, pass-through included, build (before the output directory is touched)."""
    arguments = reference_free_arguments if cfg.dpo.loss in ("orpo", "simpo") else trl_arguments
    arguments(cfg, Path(cfg.output_dir), cfg.data.eval is not None)


STAGE = Stage("dpo", load_data, train, check=check)


def run(cfg: DPORunConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to ``summary.json``."""
    return scaffold.run_stage(cfg, STAGE).summary
