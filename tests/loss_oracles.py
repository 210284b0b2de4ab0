"""Oracles: the SFT, DPO, KTO, ORPO and SimPO losses as the papers write them, to check that TRL computes them.

Nothing in ``finetune`` calls these. TRL's ``SFTTrainer``, ``DPOTrainer``, ``KTOTrainer``, ``ORPOTrainer`` and
``CPOTrainer`` (SimPO) compute these losses at run
time (through their fused, chunked LM head, which never builds the full logits), and ``finetune.stages.dpo.trl_loss``
only maps our loss names onto TRL's ``loss_type``/``loss_weights``. Keeping a second, library copy of the same maths
would give two sources of truth, one of which changes nothing about training. So the paper's formulas live here, as
pure functions over log-probs:

- ``tests/unit/test_losses.py`` pins each one with three-element examples worked out by hand;
- ``tests/integration/test_dpo.py`` checks that TRL's loss on a real batch equals the oracle over log-probs we compute ourselves
  (each ``dpo.loss`` variant, and the ``dpo.nll_weight`` term against ``sft_loss``);
- ``tests/integration/test_reference_free_losses.py`` does the same for ``dpo.loss: orpo`` and ``simpo``, and
  ``tests/integration/test_kto.py`` for the KTO stage.

The losses the toolkit computes itself (Bradley-Terry for the reward model's eval figures, PPO's GAE, clipped
policy and value losses, KL penalty) are in ``finetune.losses``.

Return convention: the DPO family returns per-example losses ``[B]`` first, and the caller takes ``.mean()``, as
torchtune does: ``(losses, chosen_rewards, rejected_rewards)``, the rewards detached. ``sft_loss`` returns a scalar
first, because its normaliser is the token count of the accumulated batch, not the number of sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finetune.logprobs import shift_for_causal_lm, token_logprobs

# --------------------------------------------------------------------------------------------------------------------
# SFT (TRL: SFTTrainer's loss; DPOTrainer's "sft" term)


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Next-token cross entropy summed over trained tokens and divided by the token count of the global batch.

    The causal shift is done here (``labels`` are the input ids with non-trained positions set to ``ignore_index``,
    as for a Hugging Face causal LM). Dividing each micro-batch's token *sum* by the number of trained tokens in the
    whole accumulated batch (what transformers' ``Trainer`` passes as ``num_items_in_batch``) makes the accumulated
    gradient the gradient of the token mean over the whole batch, so "batch 1 x accumulation 4" equals "batch 4 x
    accumulation 1". Averaging each micro-batch's own token mean would instead over-weight micro-batches with few
    trained tokens.

    Args:
        logits: ``[B, T, V]`` model output.
        labels: ``[B, T]`` unshifted labels.
        num_items_in_batch: trained (non-ignored, post-shift) tokens in the whole accumulated batch; None divides by
            this batch's own count (plain token mean).
        ignore_index: label value of positions that are not trained.

    Returns:
        ``(loss, num_tokens)``: scalar float32 loss, and the scalar count of trained tokens in this batch (sum these
        over the micro-batches of a step to get ``num_items_in_batch``).
    """
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels)
    nll_sum = -token_logprobs(shifted_logits, shifted_labels, ignore_index).sum()
    num_tokens = (shifted_labels != ignore_index).sum()
    denominator = num_tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return nll_sum / denominator, num_tokens


# --------------------------------------------------------------------------------------------------------------------
# Preference optimisation on policy / reference log-probs (DPO family)


def _dpo_logits_and_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``h = (pi_c - ref_c) - (pi_r - ref_r)`` and the detached implicit rewards ``beta * (pi - ref)``."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    return h, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization: ``-log sigmoid(beta * h)``.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    https://arxiv.org/abs/2305.18290 (Eq. 7), with
    ``h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))``. Same as TRL's ``loss_type="sigmoid"``.

    Args:
        policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the policy
            (``finetune.logprobs.sequence_logprobs``).
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        reference_chosen_logps: ``[B]`` chosen responses under the frozen reference model.
        reference_rejected_logps: ``[B]`` rejected responses under the reference.
        beta: KL-regularisation strength (0.1 is the usual default).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are ``beta * (policy - reference)``,
        detached.
    """
    h, chosen_rewards, rejected_rewards = _dpo_logits_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return -F.logsigmoid(beta * h), chosen_rewards, rejected_rewards


def dpo_label_smoothed_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Conservative DPO (cDPO): DPO when each preference label is flipped with probability ``label_smoothing``.

    ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``: the binary cross entropy of
    ``sigmoid(beta * h)`` against the smoothed target ``1 - eps``. Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO", https://ericmitchell.ai/cdpo.pdf. This is TRL's ``sigmoid`` loss with
    ``label_smoothing > 0`` (TRL < 1.0) and its ``aot`` weighting; it is NOT TRL's ``robust`` loss (Chowdhury et al.
    2024, https://arxiv.org/abs/2403.00409), which subtracts the flipped term and divides by ``1 - 2 eps``.
    ``label_smoothing=0`` gives ``dpo_sigmoid_loss``.

    Args:
        policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        reference_chosen_logps: ``[B]`` chosen responses under the reference model.
        reference_rejected_logps: ``[B]`` rejected responses under the reference.
        beta: KL-regularisation strength.
        label_smoothing: assumed label-flip probability ``eps`` in ``[0, 0.5)``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards detached.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _dpo_logits_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Identity Preference Optimisation: ``(h - 1 / (2 * beta)) ** 2``.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    https://arxiv.org/abs/2310.12036 (Eq. 17, with ``beta`` the paper's ``tau``). It regresses the log-ratio gap
    onto a fixed target instead of pushing it to infinity, so it does not over-fit deterministic preferences.

    Pass PER-TOKEN AVERAGED log-probs (``sequence_logprobs(..., average=True)``), not sums: with sums the squared loss
    grows with response length. TRL 1.16 does the same (``trl/trainer/dpo_trainer.py``, ``loss_type == "ipo"``: it
    divides the summed log-ratios by the completion length, a normalisation the IPO authors confirmed), and since
    policy and reference score the same tokens, averaging each log-prob equals averaging the log-ratio. The returned
    rewards are then per-token too.

    Args:
        policy_chosen_logps: ``[B]`` per-token mean log-probs of the chosen responses under the policy.
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        reference_chosen_logps: ``[B]`` chosen responses under the reference model, averaged the same way.
        reference_rejected_logps: ``[B]`` rejected responses under the reference, averaged the same way.
        beta: regularisation strength; the target log-ratio gap is ``1 / (2 * beta)``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards detached.
    """
    h, chosen_rewards, rejected_rewards = _dpo_logits_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards


def dpo_hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss on the reference-normalised log-ratio gap (SLiC-HF): ``relu(1 - beta * h)``.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", https://arxiv.org/abs/2305.10425
    (the rank calibration loss), in the reference-normalised form of TRL's ``loss_type="hinge"``; ``1 / beta`` plays the
    role of the margin ``delta``.

    Args:
        policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        reference_chosen_logps: ``[B]`` chosen responses under the reference model.
        reference_rejected_logps: ``[B]`` rejected responses under the reference.
        beta: inverse margin.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards detached.
    """
    h, chosen_rewards, rejected_rewards = _dpo_logits_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return torch.relu(1 - beta * h), chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------------------------------------------------
# Reference-free preference losses on per-token mean log-probs (TRL: ORPOTrainer, CPOTrainer loss_type="simpo")


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, computed without cancellation on either side of ``-ln 2`` (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    lam: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term: ``-lam * log sigmoid(log odds(y_c|x) - log odds(y_r|x))``.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    https://arxiv.org/abs/2403.07691 (Eqs. 4-7): ``odds(y|x) = P(y|x) / (1 - P(y|x))`` with ``P`` the per-token mean
    likelihood, so ``log odds = logp - log(1 - exp(logp))``. The whole ORPO loss is an SFT term plus this term's mean;
    the SFT term of TRL's ``ORPOTrainer`` (as in the ORPO authors' code) is the token mean of ``-log pi`` over the
    whole chosen sequence, prompt included: ``sft_loss`` with every non-padding token as a label.

    Args:
        policy_chosen_logps: ``[B]`` per-token MEAN log-probs of the chosen replies (``average=True``), each < 0.
        policy_rejected_logps: ``[B]`` same for the rejected replies.
        lam: weight of the odds-ratio term (TRL's ``beta``; 0.1 in the paper).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are ``lam * logp`` (what TRL logs),
        detached.
    """
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        log1mexp(policy_chosen_logps) - log1mexp(policy_rejected_logps)
    )
    losses = -lam * F.logsigmoid(log_odds)
    return losses, lam * policy_chosen_logps.detach(), lam * policy_rejected_logps.detach()


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: ``-log sigmoid(beta * (logp_c - logp_r) - gamma)`` on per-token mean log-probs, no reference model.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734 (Eq. 6): the implicit reward is the length-normalised log-likelihood scaled by
    ``beta``, and ``gamma`` is the target reward margin. TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and
    ``cpo_alpha=0`` (with ``cpo_alpha > 0`` it adds that times the chosen replies' token-mean NLL, ``sft_loss``).

    Args:
        policy_chosen_logps: ``[B]`` per-token MEAN log-probs of the chosen replies under the policy.
        policy_rejected_logps: ``[B]`` same for the rejected replies.
        beta: reward scale (2.0 to 2.5 in the paper).
        gamma: target reward margin (0.5 to 1.5 in the paper).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards ``beta * logp``, detached.
    """
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


# --------------------------------------------------------------------------------------------------------------------
# KTO on unpaired examples (TRL: KTOTrainer, loss_type="kto")


def kto_reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z_0``: the batch's mean ``log pi - log ref`` on MISMATCHED (prompt, completion)
    pairs, clamped at 0 and detached (an estimate of ``KL(pi || ref)``; Ethayarajh et al. 2024, Sec. 4.1).

    Args:
        policy_kl_logps: ``[B]`` summed log-probs of each prompt paired with another example's completion.
        reference_kl_logps: ``[B]`` same under the reference.

    Returns:
        Scalar ``z_0 >= 0``.
    """
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Kahneman-Tversky Optimisation: each completion alone is pushed above (desirable) or below (undesirable) the
    reference point, through a sigmoid value function.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    https://arxiv.org/abs/2402.01306 (Eq. 8): with ``r = log pi(y|x) - log ref(y|x)``, the loss of a desirable
    completion is ``lambda_D * (1 - sigmoid(beta * (r - z_0)))`` and of an undesirable one
    ``lambda_U * (1 - sigmoid(beta * (z_0 - r)))``; the batch loss is the mean over all examples.

    Args:
        policy_logps: ``[B]`` summed log-probs of each completion under the policy.
        reference_logps: ``[B]`` same under the reference.
        desirable: ``[B]`` bool, the example's label.
        reference_point: ``z_0`` (``kto_reference_point``), a scalar.
        beta: value-function sharpness (0.1 in the paper).
        desirable_weight: ``lambda_D``.
        undesirable_weight: ``lambda_U``.

    Returns:
        ``(losses, rewards)``, each ``[B]``; rewards ``beta * r``, detached.
    """
    logratios = policy_logps - reference_logps
    desirable = desirable.bool()
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - reference_point)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - logratios)))
    return torch.where(desirable, chosen, rejected), beta * logratios.detach()
