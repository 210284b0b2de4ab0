"""The KTO, ORPO and SimPO oracles (tests/loss_oracles.py) on three-element examples worked out by hand in each
docstring. The tests that TRL's trainers compute the same losses on a real batch are in tests/integration/."""

import math

import torch
from loss_oracles import kto_loss, kto_reference_point, log1mexp, orpo_odds_ratio_loss, simpo_loss
from torch.testing import assert_close

LN2, LN3, LN4 = math.log(2.0), math.log(3.0), math.log(4.0)


def test_log1mexp_on_both_sides_of_its_branch():
    """log(1 - exp(x)): x = -ln 2 gives ln(1/2) = -0.6931, x = -ln 4 gives ln(3/4) = -0.2877 (the log1p branch), and
    x = -1e-3 gives ln(1 - e^-0.001) = ln(0.00099950) = -6.9083 (the expm1 branch, where 1 - exp(x) cancels)."""
    x = torch.tensor([-LN2, -LN4, -1e-3], dtype=torch.float64)
    assert_close(log1mexp(x), torch.tensor([-LN2, math.log(0.75), math.log(-math.expm1(-1e-3))], dtype=torch.float64))


def test_orpo_odds_ratio_hand_worked():
    """Per-token mean log-probs, lambda = 0.1. odds(P) = P / (1 - P): P = 1/2 has odds 1, P = 1/4 has odds 1/3.
    Pair 1: chosen 1/2, rejected 1/4: log odds ratio ln 3, loss -0.1 ln sigmoid(ln 3) = -0.1 ln(3/4) = 0.02877.
    Pair 2: both 1/2: log odds ratio 0, loss 0.1 ln 2 = 0.06931.
    Pair 3: chosen 1/4, rejected 1/2: log odds ratio -ln 3, loss -0.1 ln(1/4) = 0.1 ln 4 = 0.13863.
    Rewards are lambda * logp: chosen [-0.1 ln 2, -0.1 ln 2, -0.1 ln 4]."""
    chosen = torch.tensor([-LN2, -LN2, -LN4])
    rejected = torch.tensor([-LN4, -LN2, -LN2])
    losses, chosen_rewards, rejected_rewards = orpo_odds_ratio_loss(chosen, rejected, lam=0.1)
    assert_close(losses, torch.tensor([0.1 * math.log(4 / 3), 0.1 * LN2, 0.1 * LN4]))
    assert_close(chosen_rewards, 0.1 * chosen)
    assert_close(rejected_rewards, 0.1 * rejected)


def test_orpo_pushes_the_chosen_odds_up_and_the_rejected_down():
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    orpo_odds_ratio_loss(chosen, rejected, lam=0.1)[0].sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_simpo_hand_worked():
    """beta = 2, gamma = ln 2, per-token mean log-probs. Pair 1: chosen -ln 2, rejected -ln 4: beta * (ln 2) - ln 2 =
    ln 2, loss -ln sigmoid(ln 2) = -ln(2/3) = ln 1.5 = 0.40547. Pair 2: equal: 0 - ln 2, loss -ln sigmoid(-ln 2) =
    -ln(1/3) = ln 3 = 1.09861 (the margin gamma is missed by all of it). Pair 3: chosen -ln 4, rejected -ln 2:
    -2 ln 2 - ln 2 = -ln 8, loss -ln(1/9) = ln 9 = 2.19722. Rewards beta * logp: chosen [-2 ln 2, -2 ln 2, -2 ln 4]."""
    chosen = torch.tensor([-LN2, -LN2, -LN4])
    rejected = torch.tensor([-LN4, -LN2, -LN2])
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta=2.0, gamma=LN2)
    assert_close(losses, torch.tensor([math.log(1.5), LN3, math.log(9.0)]))
    assert_close(chosen_rewards, 2 * chosen)
    assert_close(rejected_rewards, 2 * rejected)


def test_simpo_without_margin_is_a_length_normalised_bradley_terry():
    """gamma = 0, beta = 2, pair 1 above: -ln sigmoid(2 ln 2) = -ln(4/5) = ln 1.25 = 0.22314."""
    losses, _, _ = simpo_loss(torch.tensor([-LN2]), torch.tensor([-LN4]), beta=2.0, gamma=0.0)
    assert_close(losses, torch.tensor([math.log(1.25)]))


def test_kto_reference_point_hand_worked():
    """Mismatched-pair log-ratios [ln 3 + 1, ln 3 - 1] average to ln 3 = 1.0986; ratios averaging below 0 ([-1, 0.5],
    mean -0.25) clamp to 0 (KL cannot be negative)."""
    assert_close(kto_reference_point(torch.tensor([LN3 + 1 - 5, LN3 - 1 - 6]), torch.tensor([-5.0, -6.0])),
                 torch.tensor(LN3))
    assert kto_reference_point(torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 0.0])).item() == 0.0


def test_kto_loss_hand_worked():
    """beta = 1, lambda_D = 1, lambda_U = 2. Log-ratios r = policy - reference = [ln 3, ln 3, 0], labels
    [desirable, undesirable, desirable].
    With z_0 = 0: desirable r = ln 3: 1 - sigmoid(ln 3) = 1 - 3/4 = 0.25; undesirable r = ln 3:
    2 * (1 - sigmoid(-ln 3)) = 2 * 3/4 = 1.5; desirable r = 0: 1 - 1/2 = 0.5.
    With z_0 = ln 3: desirable r = ln 3 sits on the reference point: 0.5; undesirable: 2 * 0.5 = 1.0; desirable r = 0:
    1 - sigmoid(-ln 3) = 0.75. Rewards beta * r = [ln 3, ln 3, 0] either way."""
    reference = torch.tensor([-5.0, -6.0, -7.0])
    policy = reference + torch.tensor([LN3, LN3, 0.0])
    desirable = torch.tensor([True, False, True])
    losses, rewards = kto_loss(policy, reference, desirable, 0.0, beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    assert_close(losses, torch.tensor([0.25, 1.5, 0.5]))
    assert_close(rewards, torch.tensor([LN3, LN3, 0.0]))
    losses, _ = kto_loss(policy, reference, desirable, torch.tensor(LN3), beta=1.0, desirable_weight=1.0,
                         undesirable_weight=2.0)
    assert_close(losses, torch.tensor([0.5, 1.0, 0.75]))


def test_kto_raises_desirable_and_lowers_undesirable_likelihood():
    policy = torch.tensor([-3.0, -3.0], requires_grad=True)
    kto_loss(policy, torch.tensor([-3.0, -3.0]), torch.tensor([True, False]), 0.0, beta=0.1)[0].sum().backward()
    assert policy.grad[0].item() < 0 < policy.grad[1].item()
