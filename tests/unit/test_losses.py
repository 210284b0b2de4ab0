"""Tests for finetune.losses and the test oracles of tests/loss_oracles.py: three-element examples worked out by hand
in each docstring, plus invariants; and TRL's SFT loss equal to the oracle on a real batch."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loss_oracles import dpo_hinge_loss, dpo_label_smoothed_loss, dpo_sigmoid_loss, ipo_loss, sft_loss
from torch.testing import assert_close

from finetune.losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    gae,
    kl_k1,
    kl_k3,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)

# --------------------------------------------------------------------------------------------------------------------
# SFT (oracle)


def test_sft_loss_hand_worked():
    """Vocab 3, every position has p = (1/2, 1/4, 1/4). Labels [7, 0, 1, -100]: after the shift, position 0 scores
    token 0 (-ln 1/2 = ln 2), position 1 scores token 1 (ln 4 = 2 ln 2), position 2 scores -100 (skipped).
    Token sum 3 ln 2 = 2.0794 over 2 tokens: 1.5 ln 2 = 1.0397. With num_items_in_batch=6: 0.5 ln 2 = 0.3466."""
    logits = torch.tensor([0.5, 0.25, 0.25]).log().expand(1, 4, 3)
    labels = torch.tensor([[2, 0, 1, -100]])
    loss, num_tokens = sft_loss(logits, labels)
    assert_close(loss, torch.tensor(1.5 * LN2))
    assert num_tokens.item() == 2
    loss, _ = sft_loss(logits, labels, num_items_in_batch=6)
    assert_close(loss, torch.tensor(0.5 * LN2))


def test_sft_loss_batch_1_accumulation_4_equals_batch_4_accumulation_1():
    """Four rows with 5, 1, 3 and 0 trained tokens. One batch of 4 and four micro-batches of 1 whose losses are
    divided by the global token count (9) and summed give the same loss and the same gradient; averaging the four
    micro-batches' own token means does not (it over-weights the 1-token row)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 7, requires_grad=True)
    labels = torch.randint(0, 7, (4, 6))
    for row, start in enumerate([1, 5, 3, 6]):
        labels[row, :start] = -100
    full_loss, full_tokens = sft_loss(logits, labels)
    (full_grad,) = torch.autograd.grad(full_loss, logits)

    micro = [(logits[i : i + 1], labels[i : i + 1]) for i in range(4)]
    num_items = sum(sft_loss(lg, lb)[1] for lg, lb in micro)
    assert num_items.item() == full_tokens.item() == 9
    accumulated = sum(sft_loss(lg, lb, num_items_in_batch=num_items)[0] for lg, lb in micro)
    (accumulated_grad,) = torch.autograd.grad(accumulated, logits)
    assert_close(accumulated, full_loss)
    assert_close(accumulated_grad, full_grad)

    mean_of_means = sum(sft_loss(lg, lb)[0] for lg, lb in micro) / 4
    assert not torch.allclose(mean_of_means, full_loss)


# --------------------------------------------------------------------------------------------------------------------
# DPO family (oracles)


def preference_batch(chosen_logratios, rejected_logratios):
    """(policy_chosen, policy_rejected, reference_chosen, reference_rejected) with the given policy - reference
    log-ratios on top of arbitrary reference log-probs (only the differences matter)."""
    reference_chosen = torch.tensor([-3.0, -4.0, -5.0])
    reference_rejected = torch.tensor([-2.0, -6.0, -7.0])
    policy_chosen = (reference_chosen + torch.tensor(chosen_logratios)).requires_grad_()
    policy_rejected = (reference_rejected + torch.tensor(rejected_logratios)).requires_grad_()
    return policy_chosen, policy_rejected, reference_chosen, reference_rejected


def test_dpo_sigmoid_loss_hand_worked():
    """beta = 0.5. Chosen log-ratios [1, ln 3, -ln 3], rejected [1, -ln 3, ln 3], so h = [0, 2 ln 3, -2 ln 3] and
    beta * h = [0, ln 3, -ln 3]. sigmoid of those is [1/2, 3/4, 1/4], so
    losses = [ln 2, ln 4/3, ln 4] = [0.6931, 0.2877, 1.3863];
    chosen rewards 0.5 * [1, ln 3, -ln 3] = [0.5, 0.5493, -0.5493], rejected [0.5, -0.5493, 0.5493]."""
    batch = preference_batch([1.0, LN3, -LN3], [1.0, -LN3, LN3])
    losses, chosen_rewards, rejected_rewards = dpo_sigmoid_loss(*batch, beta=0.5)
    assert_close(losses, torch.tensor([LN2, math.log(4 / 3), math.log(4)]))
    assert_close(chosen_rewards, torch.tensor([0.5, 0.5 * LN3, -0.5 * LN3]))
    assert_close(rejected_rewards, torch.tensor([0.5, -0.5 * LN3, 0.5 * LN3]))
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_sigmoid_loss_matches_trl_formula():
    """TRL 1.16 computes the sigmoid loss inside ``DPOTrainer._compute_loss`` (it needs a model and an accelerator,
    so it cannot be called standalone). The lines below are copied from ``trl/trainer/dpo_trainer.py`` (1.16.x:
    lines 1350-1355, 1383, 1388, 1582-1583, for the default ``f_divergence_type == "reverse_kl"``), and the test
    first checks they are still in the installed file, so a TRL change that alters the formula fails here."""
    trl_lines = [
        "chosen_logratios = chosen_logps - ref_chosen_logps",
        "rejected_logratios = rejected_logps - ref_rejected_logps",
        "chosen_scores = chosen_logratios",
        "rejected_scores = rejected_logratios",
        "delta_score = chosen_scores - rejected_scores",
        "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
        "chosen_rewards = self.beta * chosen_logratios.detach()",
        "rejected_rewards = self.beta * rejected_logratios.detach()",
    ]
    spec = importlib.util.find_spec("trl")  # locates the package without importing it (importing TRL takes seconds)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed")
    source = Path(spec.submodule_search_locations[0], "trainer", "dpo_trainer.py").read_text()
    source_lines = {line.strip() for line in source.splitlines()}
    assert [line for line in trl_lines if line not in source_lines] == []

    torch.manual_seed(0)
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = -20 * torch.rand(4, 3)
    beta = 0.1
    # TRL's lines, with self.beta -> beta:
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = chosen_logratios
    rejected_scores = rejected_logratios
    delta_score = chosen_scores - rejected_scores
    per_sequence_loss = -F.logsigmoid(beta * delta_score)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()

    ours = dpo_sigmoid_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    assert_close(ours, (per_sequence_loss, chosen_rewards, rejected_rewards))


def test_dpo_label_smoothed_loss_hand_worked():
    """beta = 0.5, eps = 0.25, the inputs of the sigmoid test: beta * h = [0, ln 3, -ln 3],
    log sigmoid(beta h) = [ln 1/2, ln 3/4, ln 1/4], log sigmoid(-beta h) = [ln 1/2, ln 1/4, ln 3/4].
    loss = -(3/4) log sigmoid(beta h) - (1/4) log sigmoid(-beta h):
    [ln 2, (3/4) ln 4/3 + (1/4) ln 4, (3/4) ln 4 + (1/4) ln 4/3] = [ln 2, 2 ln 2 - (3/4) ln 3, 2 ln 2 - (1/4) ln 3]
    = [0.6931, 0.5623, 1.1116]. eps = 0 gives the sigmoid loss; eps >= 0.5 is rejected."""
    batch = preference_batch([1.0, LN3, -LN3], [1.0, -LN3, LN3])
    losses, chosen_rewards, rejected_rewards = dpo_label_smoothed_loss(*batch, beta=0.5, label_smoothing=0.25)
    assert_close(losses, torch.tensor([LN2, 2 * LN2 - 0.75 * LN3, 2 * LN2 - 0.25 * LN3]))
    assert_close(chosen_rewards, torch.tensor([0.5, 0.5 * LN3, -0.5 * LN3]))
    assert_close(rejected_rewards, torch.tensor([0.5, -0.5 * LN3, 0.5 * LN3]))
    assert_close(dpo_label_smoothed_loss(*batch, beta=0.5, label_smoothing=0.0), dpo_sigmoid_loss(*batch, beta=0.5))
    with pytest.raises(ValueError):
        dpo_label_smoothed_loss(*batch, beta=0.5, label_smoothing=0.5)


def test_ipo_loss_hand_worked():
    """beta = 0.5, so the target gap is 1 / (2 * 0.5) = 1. Chosen log-ratios [1, 2, 0], rejected [0, -1, 0]:
    h = [1, 3, 0], losses (h - 1)^2 = [0, 4, 1]; rewards 0.5 * ratios: chosen [0.5, 1, 0], rejected [0, -0.5, 0]."""
    batch = preference_batch([1.0, 2.0, 0.0], [0.0, -1.0, 0.0])
    losses, chosen_rewards, rejected_rewards = ipo_loss(*batch, beta=0.5)
    assert_close(losses, torch.tensor([0.0, 4.0, 1.0]))
    assert_close(chosen_rewards, torch.tensor([0.5, 1.0, 0.0]))
    assert_close(rejected_rewards, torch.tensor([0.0, -0.5, 0.0]))


def test_dpo_hinge_loss_hand_worked():
    """beta = 0.5. Chosen log-ratios [1, 2, -1], rejected [0, -2, 1]: h = [1, 4, -2], beta h = [0.5, 2, -1],
    losses relu(1 - beta h) = [0.5, 0, 2]; rewards chosen [0.5, 1, -0.5], rejected [0, -1, 0.5]."""
    batch = preference_batch([1.0, 2.0, -1.0], [0.0, -2.0, 1.0])
    losses, chosen_rewards, rejected_rewards = dpo_hinge_loss(*batch, beta=0.5)
    assert_close(losses, torch.tensor([0.5, 0.0, 2.0]))
    assert_close(chosen_rewards, torch.tensor([0.5, 1.0, -0.5]))
    assert_close(rejected_rewards, torch.tensor([0.0, -1.0, 0.5]))


# --------------------------------------------------------------------------------------------------------------------
# Reward model


def test_bradley_terry_loss_hand_worked():
    """chosen [0.5, ln 3, 0], rejected [0.5, 0, ln 3]: differences [0, ln 3, -ln 3], sigmoid [1/2, 3/4, 1/4],
    losses [ln 2, ln 4/3, ln 4] = [0.6931, 0.2877, 1.3863]; accuracy 1/3 (the tie counts as wrong)."""
    losses, accuracy = bradley_terry_loss(torch.tensor([0.5, LN3, 0.0]), torch.tensor([0.5, 0.0, LN3]))
    assert_close(losses, torch.tensor([LN2, math.log(4 / 3), math.log(4)]))
    assert_close(accuracy, torch.tensor(1 / 3))


# --------------------------------------------------------------------------------------------------------------------
# PPO


def test_gae_hand_worked():
    """gamma = 1, lam = 0.5, T = 3.
    Row 0 (3 real tokens): rewards [0, 0, 4], values [1, 2, 3]. Backwards, with V after the last token = 0:
    t=2: delta = 4 + 0 - 3 = 1, A = 1; t=1: delta = 0 + 3 - 2 = 1, A = 1 + 0.5 * 1 = 1.5;
    t=0: delta = 0 + 2 - 1 = 1, A = 1 + 0.5 * 1.5 = 1.75. Returns A + V = [2.75, 3.5, 4].
    Row 1 (2 real tokens, then padding holding junk 9s): rewards [0, 2, 9], values [1, 1, 9].
    t=1: delta = 2 + 0 - 1 = 1, A = 1; t=0: delta = 0 + 1 - 1 = 0, A = 0 + 0.5 * 1 = 0.5. Returns [1.5, 2, 0]."""
    rewards = torch.tensor([[0.0, 0.0, 4.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert_close(advantages, torch.tensor([[1.75, 1.5, 1.0], [0.5, 1.0, 0.0]]))
    assert_close(returns, torch.tensor([[2.75, 3.5, 4.0], [1.5, 2.0, 0.0]]))


def test_gae_matches_python_reverse_loop_on_ragged_masks():
    """Random rewards and values, rows with 7, 1, 4 and 5 real tokens (junk in the padding), gamma 0.99, lam 0.95,
    against the textbook loop in plain Python floats."""
    torch.manual_seed(0)
    gamma, lam = 0.99, 0.95
    lengths = [7, 1, 4, 5]
    rewards, values = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
    advantages, returns = gae(rewards, values, mask, gamma, lam)

    expected_adv = torch.zeros(4, 7, dtype=torch.float64)
    for b, length in enumerate(lengths):
        r, v = rewards[b].tolist(), values[b].tolist()
        last = 0.0
        for t in reversed(range(length)):
            next_value = v[t + 1] if t + 1 < length else 0.0
            last = r[t] + gamma * next_value - v[t] + gamma * lam * last
            expected_adv[b, t] = last
    assert_close(advantages, expected_adv)
    assert_close(returns, (expected_adv + values) * mask)


def test_ppo_policy_loss_hand_worked():
    """clip_range 0.2; three real tokens and one padding token (junk). Ratios exp(logp - old) = [1, 1.5, 0.5],
    advantages [1, 2, 1]. Per token max(-A r, -A clip(r, 0.8, 1.2)):
    t0: max(-1, -1) = -1; t1: max(-3, -2 * 1.2 = -2.4) = -2.4 (clipped); t2: max(-0.5, -0.8) = -0.5 (not clipped:
    the pessimistic bound is the unclipped term). loss = (-1 - 2.4 - 0.5) / 3 = -1.3, clip fraction 1/3.
    approx_kl = mean((r - 1) - ln r) = (0 + (0.5 - ln 1.5) + (ln 2 - 0.5)) / 3 = ln(4/3) / 3 = 0.0959.
    Gradient w.r.t. logp: -A r / 3 where unclipped, 0 where clipped or padded: [-1/3, 0, -1/6, 0]."""
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    logprobs = (old_logprobs + torch.tensor([[0.0, math.log(1.5), -LN2, 5.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, 2.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    assert_close(loss, torch.tensor(-1.3))
    assert_close(clip_fraction, torch.tensor(1 / 3))
    assert_close(approx_kl, torch.tensor(math.log(4 / 3) / 3))
    loss.backward()
    assert_close(logprobs.grad, torch.tensor([[-1 / 3, 0.0, -1 / 6, 0.0]]))


def test_ppo_value_loss_hand_worked():
    """clip_range_value 0.2, old values 0, one padding token (junk).
    t0: V = 0.1, R = 0: unclipped 0.01, V_clip = 0.1, clipped 0.01 -> 0.01.
    t1: V = 0.5, R = 1: unclipped 0.25, V_clip = 0.2, clipped 0.64 -> 0.64 (clipped).
    t2: V = -0.5, R = 0: unclipped 0.25, V_clip = -0.2, clipped 0.04 -> 0.25.
    loss = 0.5 * (0.01 + 0.64 + 0.25) / 3 = 0.15, clip fraction 1/3."""
    values = torch.tensor([[0.1, 0.5, -0.5, 9.0]])
    returns = torch.tensor([[0.0, 1.0, 0.0, -9.0]])
    loss, clip_fraction = ppo_value_loss(values, torch.zeros(1, 4), returns, torch.tensor([[1, 1, 1, 0]]), 0.2)
    assert_close(loss, torch.tensor(0.15))
    assert_close(clip_fraction, torch.tensor(1 / 3))


def test_kl_estimators_hand_worked():
    """logp = [-1, -1, -2], ref = [-1, -1 + ln 2, -2 - ln 2], so d = ref - logp = [0, ln 2, -ln 2].
    k1 = -d = [0, -0.6931, 0.6931];
    k3 = (e^d - 1) - d = [0, 1 - ln 2, -1/2 + ln 2] = [0, 0.3069, 0.1931]."""
    logp = torch.tensor([-1.0, -1.0, -2.0])
    ref = torch.tensor([-1.0, -1.0 + LN2, -2.0 - LN2])
    assert_close(kl_k1(logp, ref), torch.tensor([0.0, -LN2, LN2]))
    assert_close(kl_k3(logp, ref), torch.tensor([0.0, 1 - LN2, LN2 - 0.5]))


def test_per_token_rewards_hand_worked():
    """kl_coef 0.1, scores [2, -1].
    Row 0, 3 real tokens, logp - ref = [1, 0, -1]: kl [1, 0, -1], rewards -0.1 * kl + score at t=2 =
    [-0.1, 0, 0.1 + 2] = [-0.1, 0, 2.1].
    Row 1, 2 real tokens then padding, logp - ref = [0.5, 2, 7 (junk)]: kl [0.5, 2, 0],
    rewards [-0.05, -0.2 - 1, 0] = [-0.05, -1.2, 0]."""
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    logprobs = ref + torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert_close(kl, torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.1, 0.0, 2.1], [-0.05, -1.2, 0.0]]))


def test_adaptive_kl_controller_hand_worked():
    """init 0.2, target 6, horizon 10000, 256 samples per update.
    KL 6.6: error 6.6/6 - 1 = 0.1, value 0.2 * (1 + 0.1 * 256/10000) = 0.2 * 1.00256 = 0.200512.
    KL 9: error 0.5 clipped to 0.2, multiplier 1 + 0.2 * 0.0256 = 1.00512 -> 0.200512 * 1.00512.
    KL 3: error -0.5 clipped to -0.2, multiplier 0.99488 -> 0.200512 * 1.00512 * 0.99488."""
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert controller.update(6.6, n_steps=256) == pytest.approx(0.200512)
    assert controller.update(torch.tensor(9.0), n_steps=256) == pytest.approx(0.200512 * 1.00512)
    controller.update(3.0, n_steps=256)
    assert controller.value == pytest.approx(0.200512 * 1.00512 * 0.99488)


def test_fixed_kl_controller():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, n_steps=256) == controller.value == 0.05
