"""Training losses as pure functions over log-probs, scores and values, one function per variant.

No model, trainer or config object goes in; the recipes compute log-probs with ``finetune.logprobs`` and call these.

Return convention (every function returns a tuple, documented per function):

- Sequence-level losses (the DPO family, Bradley-Terry) return per-example losses ``[B]`` first, and the caller
  takes ``.mean()``, as torchtune does: ``(losses, chosen_rewards, rejected_rewards)`` for preference losses, with
  the rewards detached (they are for logging).
- Token-level losses (SFT, PPO policy and value) return a scalar first, because their normaliser is a token count
  (over the accumulated batch for SFT, over masked response tokens for PPO), not the number of sequences; a
  per-example ``[B]`` that the caller averages would weight short and long sequences differently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finetune.logprobs import masked_mean, shift_for_causal_lm, token_logprobs

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "dpo_hinge_loss",
    "dpo_label_smoothed_loss",
    "dpo_sigmoid_loss",
    "gae",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
]


# --------------------------------------------------------------------------------------------------------------------
# SFT


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
# Reward model


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pairwise Bradley-Terry loss for reward modelling: ``-log sigmoid(r_c - r_r - margin)``.

    Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
    https://arxiv.org/abs/2203.02155 (Eq. 1); the optional margin is Llama 2's (Touvron et al. 2023,
    https://arxiv.org/abs/2307.09288, Eq. 2), larger for pairs the annotators rated as clearly different.

    Args:
        chosen_scores: ``[B]`` scalar rewards of the chosen responses.
        rejected_scores: ``[B]`` scalar rewards of the rejected responses.
        margin: optional ``[B]`` (or broadcastable) margin the chosen score must exceed the rejected one by.

    Returns:
        ``(losses, accuracy)``: ``[B]`` per-pair losses, and the detached scalar fraction of pairs with
        ``chosen > rejected`` strictly (ties count as wrong; the margin does not enter).
    """
    diff = chosen_scores - rejected_scores
    logits = diff if margin is None else diff - margin
    accuracy = (diff.detach() > 0).float().mean()
    return -F.logsigmoid(logits), accuracy


# --------------------------------------------------------------------------------------------------------------------
# PPO: advantages, clipped objectives, KL penalty
#
# Shapes: [B, T] over response tokens, right-padded; ``mask`` is 1 on real response tokens. Conventions follow
# "The N Implementation Details of RLHF with PPO" (Huang et al. 2024,
# https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/).


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over right-padded response tokens.

    Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    https://arxiv.org/abs/1506.02438 (Eq. 16): ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, computed backwards. The episode ends at each row's last real token, so
    the value after it is 0 and nothing flows back from padding. Call under ``torch.no_grad()`` (or with detached
    inputs): advantages and returns are targets, not part of the graph.

    Args:
        rewards: ``[B, T]`` per-token rewards (see ``per_token_rewards``).
        values: ``[B, T]`` value-head estimates ``V_t`` for the same tokens.
        mask: ``[B, T]`` 1 on real response tokens, 0 on right padding.
        gamma: discount (1.0 in RLHF practice).
        lam: GAE lambda (0.95 in RLHF practice).

    Returns:
        ``(advantages, returns)``, each ``[B, T]``, with ``returns = advantages + values``; both 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        # Multiplying by the next token's mask ends the episode at the last real token.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate objective, as a loss averaged over response tokens.

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347 (Eq. 7):
    per token ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` with ``ratio = exp(logprobs - old_logprobs)``,
    then the masked mean over all response tokens of the batch.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: ``[B, T]`` log-probs under the policy that generated the rollout (detached).
        advantages: ``[B, T]`` advantages (usually ``masked_whiten``-ed ``gae`` output).
        mask: ``[B, T]`` 1 on real response tokens.
        clip_range: ``eps``, e.g. 0.2.

    Returns:
        ``(loss, clip_fraction, approx_kl)``: scalar loss; the detached fraction of tokens where the clipped term is
        the one used; the detached ``k3`` estimate of ``KL(old || new)`` on the rollout tokens
        (``kl_k3(old_logprobs, logprobs)``, the statistic CleanRL and stable-baselines log).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_k3(old_logprobs, logprobs), mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.

    ``V_clip = old_values + clip(values - old_values, -eps, eps)`` keeps the value head near the rollout's
    estimates, as in OpenAI's baselines PPO2 and ``lm-human-preferences`` (see the N implementation details post).

    Args:
        values: ``[B, T]`` current value-head outputs (with grad).
        old_values: ``[B, T]`` value-head outputs at rollout time (detached).
        returns: ``[B, T]`` targets, ``gae``'s returns.
        mask: ``[B, T]`` 1 on real response tokens.
        clip_range_value: ``eps`` for the value clip, e.g. 0.2.

    Returns:
        ``(loss, clip_fraction)``: scalar loss, and the detached fraction of tokens where the clipped error is the
        larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction


# KL estimators, per token, for samples drawn from the policy p: http://joschu.net/blog/kl-approx.html.
# With r = ref(x) / p(x): k1 = -log r (unbiased, high variance, can be negative), k2 = (log r)^2 / 2 (biased, low
# variance), k3 = (r - 1) - log r (unbiased, low variance, always >= 0).


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k1 = logp - ref_logp``, the naive estimator of ``KL(p || ref)`` on tokens sampled from ``p``.

    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.

    Args:
        logprobs: ``[...]`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``[...]`` log-probs of the same tokens under the reference.

    Returns:
        ``[...]`` per-token estimates.
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k2 = 0.5 * (logp - ref_logp)^2``: biased, low-variance estimator of ``KL(p || ref)``.

    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.

    Args:
        logprobs: ``[...]`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``[...]`` log-probs of the same tokens under the reference.

    Returns:
        ``[...]`` per-token estimates, >= 0.
    """
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k3 = (exp(ref_logp - logp) - 1) - (ref_logp - logp)``: unbiased, low-variance, non-negative.

    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.

    Args:
        logprobs: ``[...]`` log-probs of the sampled tokens under the policy that sampled them.
        ref_logprobs: ``[...]`` log-probs of the same tokens under the reference.

    Returns:
        ``[...]`` per-token estimates, >= 0.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def per_token_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """RLHF reward per response token: a KL penalty at every token plus the reward model's score at the last one.

    ``r_t = -kl_coef * (logp_t - ref_logp_t)``, and ``r_T += score`` at each row's last real token (Ziegler et al.
    2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, Eq. 2).

    Args:
        scores: ``[B]`` reward-model scores of the whole responses.
        logprobs: ``[B, T]`` log-probs of the response tokens under the rollout policy.
        ref_logprobs: ``[B, T]`` log-probs of the same tokens under the reference model.
        mask: ``[B, T]`` 1 on real response tokens; every row needs at least one (a row with none gets no score).
        kl_coef: KL penalty coefficient (the controller's ``value``).

    Returns:
        ``(rewards, kl)``, each ``[B, T]``: the per-token rewards and the per-token ``k1`` KL, both 0 on padding.
    """
    mask_bool = mask.bool()
    kl = torch.where(mask_bool, kl_k1(logprobs, ref_logprobs), torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    seq_len = mask.shape[1]
    # Index of the last 1 in each row (the last real token), whatever the padding side.
    last = seq_len - 1 - mask_bool.flip(dims=[1]).int().argmax(dim=1)
    has_tokens = mask_bool.any(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards, kl


class AdaptiveKLController:
    """Adaptive KL coefficient: a proportional controller that steers the measured KL towards ``target``.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", https://arxiv.org/abs/1909.08593:
    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``.

    Args:
        init_kl_coef: starting coefficient.
        target: KL (nats per sequence, or whatever unit ``update`` is fed) to steer towards.
        horizon: how many samples it takes to move ``beta`` by a factor of about ``e``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Move ``value`` after a batch of ``n_steps`` samples whose mean KL was ``current_kl``; returns it."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant KL coefficient with the same interface as ``AdaptiveKLController``.

    Args:
        kl_coef: the coefficient, returned unchanged by ``update``.
    """

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """No-op; returns ``value``."""
        return self.value
