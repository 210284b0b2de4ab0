"""The losses the toolkit computes itself, as pure functions over scores, log-probs and values.

No model, trainer or config object goes in. Each has a runtime caller: ``bradley_terry_loss`` gives the reward
model's held-out loss and accuracy (``finetune.reward_model``), and the PPO functions (``gae``, ``ppo_policy_loss``,
``ppo_value_loss``, ``per_token_rewards``, the KL controllers) are the PPO stage's update, and the critic-free ones
(``group_advantages``, ``leave_one_out_advantages``, ``sequence_kl_penalty``, ``grpo_policy_loss``) the GRPO/RLOO
stage's. The SFT, DPO and reward
training losses are TRL's (``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer``); the paper formulas that check TRL
computes them are test oracles in ``tests/loss_oracles.py``, not library code.

Return convention (every function returns a tuple, documented per function): ``bradley_terry_loss`` returns
per-pair losses ``[B]`` first and the caller takes ``.mean()``; the PPO losses return a scalar first, because their
normaliser is the count of masked response tokens, not the number of sequences (a per-example ``[B]`` that the
caller averages would weight short and long responses differently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finetune.logprobs import masked_mean

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "gae",
    "group_advantages",
    "grpo_policy_loss",
    "leave_one_out_advantages",
    "kl_k1",
    "kl_k3",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_kl_penalty",
]


# --------------------------------------------------------------------------------------------------------------------
# Reward model


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise Bradley-Terry loss for reward modelling: ``-log sigmoid(r_c - r_r)``.

    Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
    https://arxiv.org/abs/2203.02155 (Eq. 1). TRL's ``RewardTrainer`` computes the same loss in training (tested in
    ``tests/integration/test_reward.py``); this function gives the held-out loss and accuracy over every eval pair
    (``finetune.reward_model``), which the trainer's batched eval does not report exactly.

    Args:
        chosen_scores: ``[B]`` scalar rewards of the chosen responses.
        rejected_scores: ``[B]`` scalar rewards of the rejected responses.

    Returns:
        ``(losses, accuracy)``: ``[B]`` per-pair losses, and the detached scalar fraction of pairs with
        ``chosen > rejected`` strictly (ties count as wrong).
    """
    diff = chosen_scores - rejected_scores
    accuracy = (diff.detach() > 0).float().mean()
    return -F.logsigmoid(diff), accuracy


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
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_range)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clip_fraction = masked_mean(clipped.float(), mask)
        approx_kl = masked_mean(kl_k3(old_logprobs, logprobs), mask)
    return loss, clip_fraction, approx_kl


def clipped_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                      clip_range: float) -> tuple[Tensor, Tensor]:
    """Per-token PPO clipped surrogate, as a loss: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``.

    The term ``ppo_policy_loss`` (PPO) and ``grpo_policy_loss`` (GRPO, RLOO) average, each with its own normaliser.

    Args:
        logprobs: ``[B, T]`` log-probs under the current policy (with grad).
        old_logprobs: ``[B, T]`` log-probs under the rollout policy (detached).
        advantages: ``[B, T]``, or ``[B, 1]`` for one advantage per sequence (broadcast over its tokens).
        clip_range: ``eps``.

    Returns:
        ``(per_token_loss, clipped)``: ``[B, T]`` losses, and the ``[B, T]`` bool of tokens where the clipped term is
        the one used.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), clipped > unclipped


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
# With r = ref(x) / p(x): k1 = -log r (unbiased, high variance, can be negative) is the reward's KL penalty
# (per_token_rewards), as in Ziegler et al.; k3 = (r - 1) - log r (unbiased, low variance, always >= 0) is the
# logged approx_kl between the rollout policy and the updated one.


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


# --------------------------------------------------------------------------------------------------------------------
# Critic-free policy gradients: GRPO and RLOO
#
# G responses are sampled for each prompt, laid out ``i * G + j`` (``finetune.rollout.sample_groups``); the baseline
# of a response is computed from the other responses to the same prompt instead of a value head. ``valid`` marks the
# responses that count (a False one, e.g. unscorable, is left out of its group's statistics and gets advantage 0),
# as TRL's trainers treat a NaN reward.

GROUP_STD_EPS = 1e-4
"""Added to a group's standard deviation before dividing, as TRL's ``GRPOTrainer`` does: a group of equal scores
(std 0) gets advantage 0, not NaN."""


def _groups(scores: Tensor, group_size: int, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    if scores.ndim != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be [num_prompts * group_size]; got shape {tuple(scores.shape)} and group_size "
                         f"{group_size}")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    return scores.view(-1, group_size), valid.view(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, scale: bool = True, valid: Tensor | None = None,
                     eps: float = GROUP_STD_EPS) -> Tensor:
    """GRPO's group-relative advantage: each response's score minus its group's mean, divided by the group's std.

    Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300 (section 4.1.2, outcome supervision):
    ``A_i = (r_i - mean(r)) / std(r)`` over the ``G`` responses to one prompt, the same for every token of response
    ``i``. The std is the unbiased one (Bessel's ``G - 1``), plus ``eps``, as TRL computes it; ``scale=False`` keeps
    only the mean (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783, TRL's ``scale_rewards="none"``).

    Args:
        scores: ``[num_prompts * G]`` scores, laid out ``i * G + j``.
        group_size: ``G``.
        scale: divide by the group's std.
        valid: ``[num_prompts * G]`` bool, the responses that count (None: all).
        eps: added to the std.

    Returns:
        ``[num_prompts * G]`` advantages; 0 for an invalid response, for a group whose valid scores are all equal,
        and for a response that is its group's only valid one.
    """
    grouped, ok = _groups(scores, group_size, valid)
    count = ok.sum(dim=1, keepdim=True)
    zero = torch.zeros_like(grouped)
    mean = torch.where(ok, grouped, zero).sum(dim=1, keepdim=True) / count.clamp(min=1)
    advantages = torch.where(ok, grouped - mean, zero)
    if scale:
        variance = (advantages ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        advantages = advantages / (variance.sqrt() + eps)
    return torch.where(ok & (count > 1), advantages, zero).view(-1)


def leave_one_out_advantages(scores: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """RLOO's advantage: each response's score minus the mean score of the other responses to its prompt.

    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", https://openreview.net/forum?id=r1lgTGL5DE;
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback", https://arxiv.org/abs/2402.14740 (Eq. 6): ``A_i = r_i - 1/(G-1) * sum_{j != i} r_j``, which equals
    ``G/(G-1) * (r_i - mean(r))``. The baseline does not depend on ``r_i``, so the estimate stays unbiased.

    Args:
        scores: ``[num_prompts * G]`` scores, laid out ``i * G + j``.
        group_size: ``G``.
        valid: ``[num_prompts * G]`` bool, the responses that count (None: all); the baseline averages the valid
            others only.

    Returns:
        ``[num_prompts * G]`` advantages; 0 for an invalid response and for one with no valid sibling.
    """
    grouped, ok = _groups(scores, group_size, valid)
    zero = torch.zeros_like(grouped)
    kept = torch.where(ok, grouped, zero)
    others = ok.sum(dim=1, keepdim=True) - 1
    baseline = (kept.sum(dim=1, keepdim=True) - kept) / others.clamp(min=1)
    return torch.where(ok & (others > 0), grouped - baseline, zero).view(-1)


def sequence_kl_penalty(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                        kl_coef: float) -> tuple[Tensor, Tensor]:
    """The score less the KL penalty summed over the response's tokens: ``r - kl_coef * sum_t (logp_t - ref_logp_t)``.

    The per-token ``k1`` penalty of ``per_token_rewards`` with nothing to discount it (no critic, ``gamma = 1``):
    summed over the sequence, it is the reward the group baseline is then taken on (RLOO, Ahmadian et al. 2024,
    https://arxiv.org/abs/2402.14740, section 3; TRL's ``RLOOTrainer`` with ``beta > 0``).

    Args:
        scores: ``[B]`` scores.
        logprobs: ``[B, T]`` rollout policy's log-probs of the response tokens.
        ref_logprobs: ``[B, T]`` the reference's.
        mask: ``[B, T]`` 1 on response tokens.
        kl_coef: ``beta``.

    Returns:
        ``(rewards, kl)``: ``[B]`` penalised scores, and the ``[B]`` summed ``k1`` KL of each response.
    """
    kl = (kl_k1(logprobs, ref_logprobs) * mask).sum(dim=1)
    return scores - kl_coef * kl, kl


def grpo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                     clip_range: float, kl_coef: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GRPO's objective as a loss: the clipped surrogate plus ``kl_coef`` times the ``k3`` KL to the reference, per
    token, averaged over each response's tokens and then over the responses.

    Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300 (Eq. 3 and 4):
    ``1/G sum_i 1/|o_i| sum_t [min(ratio A_i, clip(ratio) A_i) - beta * D_KL]`` with
    ``D_KL = ref/pi - log(ref/pi) - 1`` (``kl_k3`` of the current policy, so it is differentiated). TRL's
    ``GRPOTrainer`` with ``loss_type="grpo"``. With ``kl_coef = 0`` it is the loss of RLOO with the KL in the
    reward (``sequence_kl_penalty``), a per-token ratio clipped as in PPO.

    Args:
        logprobs: ``[B, T]`` current policy's log-probs (with grad).
        old_logprobs: ``[B, T]`` rollout policy's (detached).
        ref_logprobs: ``[B, T]`` the reference's (detached); unused when ``kl_coef`` is 0.
        advantages: ``[B]`` one advantage per response (``group_advantages`` / ``leave_one_out_advantages``).
        mask: ``[B, T]`` 1 on response tokens.
        clip_range: ``eps``.
        kl_coef: ``beta`` (0 for no KL term).

    Returns:
        ``(loss, clip_fraction, kl, approx_kl)``: the scalar loss; detached: the fraction of response tokens where the
        clip acts, the mean per-token ``k3`` KL to the reference, and ``k3`` of the rollout policy to the current one.
    """
    mask = mask.to(logprobs.dtype)
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages.unsqueeze(1), clip_range)
    kl = kl_k3(logprobs, ref_logprobs) if kl_coef else torch.zeros_like(logprobs)
    per_token = per_token + kl_coef * kl
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        clip_fraction = masked_mean(clipped.float(), mask)
        approx_kl = masked_mean(kl_k3(old_logprobs, logprobs), mask)
        mean_kl = masked_mean(kl.detach(), mask)
    return loss, clip_fraction, mean_kl, approx_kl
