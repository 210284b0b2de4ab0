"""The losses the toolkit computes itself, as pure functions over scores, log-probs and values.

No model, trainer or config object goes in. Each has a runtime caller: ``bradley_terry_loss`` gives the reward
model's held-out loss and accuracy (``finetune.reward_model``), and the PPO functions (``gae``, ``ppo_policy_loss``,
``ppo_value_loss``, ``per_token_rewards``, the KL controllers) are the PPO stage's update. The SFT, DPO and reward
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
    "kl_k1",
    "kl_k3",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
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
