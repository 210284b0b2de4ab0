"""Oracles: the SFT and DPO losses as the papers write them, to check that TRL computes them.

Nothing in ``finetune`` calls these. TRL's ``SFTTrainer`` and ``DPOTrainer`` compute the SFT and DPO losses at run
time (through their fused, chunked LM head, which never builds the full logits), and ``finetune.stages.dpo.trl_loss``
only maps our loss names onto TRL's ``loss_type``/``loss_weights``. Keeping a second, library copy of the same maths
would give two sources of truth, one of which changes nothing about training. So the paper's formulas live here, as
pure functions over log-probs:

- ``tests/unit/test_losses.py`` pins each one with three-element examples worked out by hand;
- ``tests/integration/test_dpo.py`` checks that TRL's loss on a real batch equals the oracle over log-probs we compute ourselves
  (each ``dpo.loss`` variant, and the ``dpo.nll_weight`` term against ``sft_loss``).

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
