# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""The arithmetic of clip-PPO for language models, token by token.

Every function takes `(batch, response_length)` tensors and a `mask` of the same shape (1 for real response tokens,
0 for padding after the end of a response). Responses are right-padded: a row's valid tokens are a prefix. These are
the pieces of the PPO objective (Schulman et al. 2017) as used for RLHF (Ziegler et al. 2019; Ouyang et al. 2022):

* per-token rewards = `-kl_coef * KL_t(policy || reference)`, plus the sequence score on the last real token;
* advantages from generalised advantage estimation (GAE, Schulman et al. 2016);
* the clipped surrogate policy loss, the (optionally clipped) value loss, the policy entropy.

They are plain tensor functions (no model, no optimizer) so that each one can be checked against hand-computed values.
No well-kept library ships them for masked variable-length sequences any more (TRL 1.x dropped its PPO trainer), so
they are written out here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


KLEstimator = Literal["k1", "k3"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1 (over `dim`, or over everything)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1; 0 where the mask is empty (instead of NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise `values` to unit variance (and zero mean if `shift_mean`) over the masked-in entries.

    Padding positions are returned as 0. The variance is the unbiased (Bessel-corrected) one when more than one entry
    is masked in.
    """
    mean = masked_mean(values, mask)
    centered = (values - mean) * mask
    count = mask.sum()
    variance = (centered**2).sum() / (count - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded response tokens.

    `delta_t = r_t + gamma * V_{t+1} - V_t` and `A_t = delta_t + gamma * lam * A_{t+1}`, where the value and the
    advantage after a row's last real token are 0 (the episode ends there). Returns `(advantages, returns)` with
    `returns = advantages + values`; both are 0 on padding.
    """
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(
            f"compute_gae needs rewards, values and mask of one shape; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)} and {tuple(mask.shape)}."
        )
    mask = mask.to(values.dtype)
    length = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[..., 0])
    next_value = torch.zeros_like(values[..., 0])
    for t in reversed(range(length)):
        # A padded position t+1 carries neither value nor advantage back into t.
        keep_next = mask[..., t + 1] if t + 1 < length else torch.zeros_like(next_value)
        delta = rewards[..., t] + gamma * next_value * keep_next - values[..., t]
        advantage = (delta + gamma * lam * next_advantage * keep_next) * mask[..., t]
        advantages[..., t] = advantage
        next_advantage, next_value = advantage, values[..., t]
    returns = (advantages + values) * mask
    return advantages, returns


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probabilities of the sampled tokens.

    * `"k1"`: `log p - log q` (unbiased, may be negative per token);
    * `"k3"`: `(q/p - 1) - log(q/p)` (unbiased, never negative, lower variance) - Schulman, "Approximating KL
      divergence" (2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL estimator {estimator!r}; use 'k1' or 'k3'.")


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLHF reward shaping: `-kl_coef * KL_t` on every real token, plus the row's `score` on its last real token.

    Returns `(rewards, kl)`, both `(batch, length)` and 0 on padding. A row without any real token gets no score.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=-1).long()
    has_tokens = lengths > 0
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows[has_tokens], last[has_tokens]] += scores.to(rewards.dtype)[has_tokens]
    return rewards, kl


@dataclass
class PolicyLossOutput:
    """The clipped surrogate loss and its diagnostics (all scalars)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> PolicyLossOutput:
    """PPO's clipped surrogate, as a loss to minimise.

    `ratio = exp(logprobs - old_logprobs)`; per token `max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`, averaged
    over real tokens. `clip_fraction` is the share of real tokens where the clipped term was the larger one (the
    gradient is cut); `approx_kl` is `mean(0.5 * (log ratio)^2)`, the usual early-stopping monitor.
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLossOutput(loss=loss, clip_fraction=clip_fraction.detach(), approx_kl=approx_kl.detach())


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`0.5 * mean((V - R)^2)` over real tokens; with `clip_range`, the pessimistic max with the clipped estimate
    `old_V + clip(V - old_V, -c, c)` (as in OpenAI baselines' PPO2).

    Returns `(loss, clip_fraction)`; the fraction is the share of tokens where the clipped error was the larger one.
    """
    mask = mask.to(values.dtype)
    error = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(error, mask), values.new_zeros(())
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > error).to(values.dtype), mask)
    return loss, clip_fraction.detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position: `logsumexp(z) - sum(softmax(z) * z)`."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    # Tokens masked out with -inf have probability 0 and contribute 0 (not 0 * -inf = NaN).
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - weighted.sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each `tokens[..., t]` under `logits[..., t, :]` (computed in float32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


__all__ = [
    "KLEstimator",
    "PolicyLossOutput",
    "clipped_policy_loss",
    "compute_gae",
    "entropy_from_logits",
    "kl_per_token",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "per_token_rewards",
    "value_loss",
]
