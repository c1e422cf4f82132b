"""PPO arithmetic (GAE, clipped surrogate, value loss, KL estimators, entropy) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from safevlm_hf.layerwise.ppo_math import (
    clipped_policy_loss,
    compute_gae,
    entropy_from_logits,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    value_loss,
)


def test_gae_matches_hand_computation_with_variable_lengths():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after two tokens
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: d2 = 2 - 0.1 = 1.9; d1 = 0 + 0.9*0.1 - 0.2 = -0.11; d0 = 1 + 0.9*0.2 - 0.5 = 0.68
    #        A2 = 1.9; A1 = -0.11 + 0.72*1.9 = 1.258; A0 = 0.68 + 0.72*1.258 = 1.58576
    # Row 1: the padded step (reward 7, value 9.9) is outside the episode: d1 = 1 - 0.4 = 0.6; A1 = 0.6;
    #        d0 = 0.5 + 0.9*0.4 - 0.3 = 0.56; A0 = 0.56 + 0.72*0.6 = 0.992
    expected = torch.tensor([[1.58576, 1.258, 1.9], [0.992, 0.6, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_gae_with_gamma_and_lambda_one_is_monte_carlo_return_minus_value():
    rewards = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, -1.0, 2.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[4.0, 4.0, 3.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[3.5, 5.0, 1.0, 0.0]]))


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_kl_estimators_match_hand_values():
    logprobs = torch.log(torch.tensor([0.5, 0.2]))
    ref_logprobs = torch.log(torch.tensor([0.25, 0.2]))
    k1 = kl_per_token(logprobs, ref_logprobs, "k1")
    k3 = kl_per_token(logprobs, ref_logprobs, "k3")
    torch.testing.assert_close(k1, torch.tensor([math.log(2.0), 0.0]))
    # k3 = (q/p - 1) - log(q/p) with q/p = 0.5: -0.5 + log 2
    torch.testing.assert_close(k3, torch.tensor([-0.5 + math.log(2.0), 0.0]))
    # k3 is never negative, even where k1 is
    assert float(kl_per_token(torch.tensor([-2.0]), torch.tensor([-1.0]), "k3")) >= 0
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logprobs, ref_logprobs, "k2")


def test_per_token_rewards_put_the_score_on_the_last_real_token_and_penalise_kl():
    logprobs = torch.tensor([[0.1, 0.2, 5.0], [0.3, 9.0, 9.0], [0.0, 0.0, 0.0]])
    ref_logprobs = torch.zeros(3, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, -2.0, 5.0])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1 + 1.0, 0.0], [-0.15 - 2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_clipped_policy_loss_matches_hand_values_and_cuts_gradients_where_clipped():
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_(True)  # ratios 1.5, 0.5, 1.0
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    out = clipped_policy_loss(logprobs, old, advantages, torch.ones(1, 3), clip_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1, 1) = 1
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3)
    assert float(out.clip_fraction) == pytest.approx(1 / 3)
    assert float(out.approx_kl) == pytest.approx((0.5 * math.log(1.5) ** 2 + 0.5 * math.log(0.5) ** 2) / 3)
    out.loss.backward()
    assert logprobs.grad[0, 0] == 0  # clipped: no gradient
    assert logprobs.grad[0, 1] == pytest.approx(-0.5 / 3)  # d(-A * exp(lp))/dlp = -A * ratio, averaged

    masked = clipped_policy_loss(logprobs.detach(), old, advantages, torch.tensor([[1.0, 1.0, 0.0]]), clip_eps=0.2)
    assert float(masked.loss) == pytest.approx((-1.2 - 0.5) / 2)
    assert float(masked.clip_fraction) == pytest.approx(0.5)


def test_value_loss_clipped_and_unclipped():
    values = torch.tensor([[1.0, 2.0]])
    old_values = torch.tensor([[0.5, 2.0]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, fraction = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: unclipped (1-2)^2 = 1; clipped value 0.7 -> (0.7-2)^2 = 1.69, the larger; token 1: 1
    assert float(loss) == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert float(fraction) == pytest.approx(0.5)
    loss, fraction = value_loss(values, old_values, returns, mask, clip_range=None)
    assert float(loss) == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert float(fraction) == 0


def test_entropy_logprobs_and_masked_helpers():
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 4)), torch.full((2,), math.log(4.0)))
    # a banned token (-inf logit) contributes nothing and produces no NaN
    banned = torch.tensor([0.0, 0.0, float("-inf")])
    torch.testing.assert_close(entropy_from_logits(banned), torch.tensor(math.log(2.0)))
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(logprobs_from_logits(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))

    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert float(masked_mean(values, mask)) == pytest.approx(2.0)
    assert float(masked_mean(values, torch.zeros(4))) == 0.0
    # mean 2, unbiased variance 1 -> (-1, 0, 1); padding stays 0
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
