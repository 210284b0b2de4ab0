"""GRPO's and RLOO's advantages and GRPO's loss (``finetune.losses``): numbers worked out by hand in each docstring,
and TRL's own lines on the same scores.

TRL computes these inline in its trainers (``GRPOTrainer._generate_and_score_completions`` and ``_compute_loss``,
``RLOOTrainer._generate_and_score_completions``), not as functions, so the oracles below are those lines copied as
they are from TRL 1.16 (``trl/trainer/grpo_trainer.py`` and ``rloo_trainer.py``), with TRL's own ``nanstd`` (a
function: called, not copied). TRL marks an unscorable completion with a NaN reward; ours passes ``valid=False``.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from finetune.losses import (
    GROUP_STD_EPS,
    group_advantages,
    grpo_policy_loss,
    kl_k3,
    leave_one_out_advantages,
    sequence_kl_penalty,
)

# ---------------------------------------------------------------------------------------------------------------
# Hand-worked


def test_group_advantages_mean_and_std_within_each_group():
    """Two prompts, G = 4. Group 1 scores 1, 0, 0, 1: mean 0.5, deviations +-0.5, unbiased variance
    4 * 0.25 / 3 = 1/3, std 0.577350; advantage +-0.5 / (0.577350 + 1e-4) = +-0.865876. Group 2 scores 1, 1, 1, 1:
    every deviation 0, std 0, advantage 0 (not NaN: the eps)."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert_close(group_advantages(scores, 4), torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert abs(a - 0.865876) < 1e-6


def test_group_advantages_without_scaling_keep_only_the_mean():
    """``scale=False`` (Dr. GRPO): scores 3, 1 | 2, 2 -> 3 - 2, 1 - 2 | 0, 0."""
    assert_close(group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2, scale=False),
                 torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_group_advantages_leave_invalid_responses_out_of_their_group():
    """Scores 2, 0, 5, 1 with the 5 invalid: the group is 2, 0, 1, mean 1, deviations 1, -1, 0, unbiased variance
    2 / 2 = 1, std 1; advantages 1 / 1.0001, -1 / 1.0001, 0 (invalid), 0. A second group whose only valid response
    is its first (3; the 7 invalid) has nothing to compare with: 0, 0."""
    scores = torch.tensor([2.0, 0.0, 5.0, 1.0, 3.0, 7.0, 7.0, 7.0])
    valid = torch.tensor([True, True, False, True, True, False, False, False])
    a = 1 / (1 + GROUP_STD_EPS)
    assert_close(group_advantages(scores, 4, valid=valid), torch.tensor([a, -a, 0.0, 0.0, 0, 0, 0, 0]))


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    """Scores 1, 0, 0, 1: a 1's baseline is (0 + 0 + 1) / 3 = 1/3, advantage 2/3; a 0's is 2/3, advantage -2/3
    (= G / (G - 1) * (r - mean) = 4/3 * +-0.5). Scores 4, 4: 0, 0."""
    assert_close(leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 4.0, 4.0, 4.0, 4.0]), 4),
                 torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0]))


def test_leave_one_out_baseline_averages_the_valid_others_only():
    """Scores 2, 0, 5, 1 with the 5 invalid: 2 - (0 + 1) / 2 = 1.5; 0 - (2 + 1) / 2 = -1.5; 0 (invalid);
    1 - (2 + 0) / 2 = 0. A group with a single valid response (3) has no baseline: 0."""
    scores = torch.tensor([2.0, 0.0, 5.0, 1.0, 3.0, 7.0, 7.0, 7.0])
    valid = torch.tensor([True, True, False, True, True, False, False, False])
    assert_close(leave_one_out_advantages(scores, 4, valid=valid), torch.tensor([1.5, -1.5, 0.0, 0.0, 0, 0, 0, 0]))


def test_group_advantages_refuse_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), 2)


def test_sequence_kl_penalty_sums_k1_over_the_response_tokens():
    """Scores 1, 0. Row 1: log pi - log ref = -1 + 1.5, -2 + 1 = 0.5, -1, sum -0.5; row 2: 0 on its one token (the
    second is padding: its -3 does not count). With beta 0.1: 1 - 0.1 * -0.5 = 1.05, and 0."""
    rewards, kl = sequence_kl_penalty(torch.tensor([1.0, 0.0]), torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]),
                                      torch.tensor([[-1.5, -1.0], [-0.5, -3.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
                                      0.1)
    assert_close(rewards, torch.tensor([1.05, 0.0]))
    assert_close(kl, torch.tensor([-0.5, 0.0]))


def test_grpo_loss_at_ratio_one_is_minus_the_mean_advantage_per_response():
    """Ratio 1, reference = policy (KL 0): the loss is the mean over responses of -A_i averaged over each one's
    tokens: advantages 1 and -2 (2 and 1 tokens) -> (-1 + 2) / 2 = 0.5, whatever the lengths."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    loss, clip_fraction, kl, approx_kl = grpo_policy_loss(logprobs, logprobs, logprobs, torch.tensor([1.0, -2.0]),
                                                          torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 0.2, 0.1)
    assert_close(loss, torch.tensor(0.5))
    assert clip_fraction == 0 and kl == 0 and approx_kl == 0


def test_grpo_loss_clips_the_ratio_and_adds_the_k3_kl_to_the_reference():
    """One response, advantage 1, two tokens. Ratios 1.5 and 1: the first clipped to 1.2, surrogate -1.2, -1.
    ref - log pi = log 2, 0: k3 = 2 - 1 - log 2 = 0.306853, 0. beta 0.1: per token -1.2 + 0.0306853, -1; mean
    -1.0846574. The clip acts on 1 of 2 tokens; the mean k3 is 0.153426."""
    logprobs = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(1.5) + math.log(2.0), 0.0]])
    loss, clip_fraction, kl, _ = grpo_policy_loss(logprobs, torch.zeros(1, 2), ref, torch.tensor([1.0]),
                                                  torch.ones(1, 2), 0.2, 0.1)
    assert_close(loss, torch.tensor(-1.0846574), rtol=0, atol=1e-6)
    assert_close(clip_fraction, torch.tensor(0.5))
    assert_close(kl, torch.tensor((1 - math.log(2)) / 2))
    loss.backward()  # the clipped token has no surrogate gradient, only the KL's: d k3 / d logp = 1 - ref/pi = -1
    assert_close(logprobs.grad, torch.tensor([[0.1 * -1.0 / 2, -1.0 / 2]]))


# ---------------------------------------------------------------------------------------------------------------
# TRL's lines on the same scores


def trl_grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """``GRPOTrainer._generate_and_score_completions``, ``multi_objective_aggregation == "sum_then_normalize"``
    (trl/trainer/grpo_trainer.py, TRL 1.16, lines 2765-2810), one reward function; NaN = unscorable."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages


def trl_rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``RLOOTrainer._generate_and_score_completions`` (trl/trainer/rloo_trainer.py, TRL 1.16, lines 1675-1699),
    ``normalize_advantages=False`` (its default); NaN = unscorable."""
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)  # (num_prompts, 1)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)  # (num_prompts, 1)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)  # (num_prompts, num_generations)
    baselines = baselines.view(-1)  # Flatten back to match rewards shape
    advantages = rewards - baselines
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages


def trl_rloo_kl_reward(rewards, old_per_token_logps, ref_per_token_logps, completion_mask, beta):
    """``RLOOTrainer``'s KL in the reward (rloo_trainer.py, TRL 1.16, lines 1664-1673)."""
    per_token_kl = old_per_token_logps - ref_per_token_logps
    kl = (per_token_kl * completion_mask).sum(-1)
    return rewards - beta * kl


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, epsilon, beta):
    """``GRPOTrainer._compute_loss``, ``loss_type="grpo"``, token-level importance sampling, one accumulation step
    (grpo_trainer.py, TRL 1.16, lines 3055-3160)."""
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def random_scores(seed: int, num_prompts=6, group_size=4):
    """Scores with ties (a verifier's 0/1 and equal groups) and some unscorable responses."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (num_prompts * group_size,), generator=g).float()
    scores[: group_size] = 1.0  # one group of equal scores
    valid = torch.rand(num_prompts * group_size, generator=g) > 0.2
    valid[group_size : 2 * group_size] = torch.tensor([True] + [False] * (group_size - 1))  # a lone valid response
    return scores, valid


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_equal_trls_grpo(seed, scale):
    scores, valid = random_scores(seed)
    trl = trl_grpo_advantages(torch.where(valid, scores, torch.nan), 4, "group" if scale else "none")
    assert_close(group_advantages(scores, 4, scale=scale, valid=valid), trl)


@pytest.mark.parametrize("seed", range(5))
def test_leave_one_out_advantages_equal_trls_rloo(seed):
    scores, valid = random_scores(seed)
    assert_close(leave_one_out_advantages(scores, 4, valid=valid),
                 trl_rloo_advantages(torch.where(valid, scores, torch.nan), 4))
    scores = scores + torch.randn(len(scores), generator=torch.Generator().manual_seed(seed))  # no unscorable ones
    assert_close(leave_one_out_advantages(scores, 4), trl_rloo_advantages(scores, 4))


def test_kl_in_the_reward_and_grpo_loss_equal_trls():
    g = torch.Generator().manual_seed(0)
    logprobs, old, ref = (-torch.rand(6, 5, generator=g) * 3 for _ in range(3))
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    scores = torch.rand(6, generator=g)
    assert_close(sequence_kl_penalty(scores, old, ref, mask, 0.05)[0], trl_rloo_kl_reward(scores, old, ref, mask, 0.05))
    advantages = group_advantages(scores, 3)
    for beta in (0.0, 0.04):
        ours = grpo_policy_loss(logprobs, old, ref, advantages, mask, 0.2, beta)[0]
        assert_close(ours, trl_grpo_loss(logprobs, old, ref, advantages, mask, 0.2, beta))
    assert_close(kl_k3(logprobs, ref), torch.exp(ref - logprobs) - (ref - logprobs) - 1)
