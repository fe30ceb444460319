"""The divergences of log-probability vectors that the output terms share (one vocabulary, or the matched tokens of
two)."""

from __future__ import annotations

import math

import torch


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per row, with 0 * log 0 = 0 (a NaN p stays NaN: never dropped)."""
    p = log_p.exp()
    terms = torch.where(p == 0, 0.0, p * (log_p - log_q))
    return terms.sum(dim=-1)


def jsd_from_log_probs(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD per row (GKD, Agarwal et al. 2024, eq. 1): ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``
    with ``m = beta * p_t + (1 - beta) * p_s``; beta = 0 is KL(p_t || p_s), beta = 1 KL(p_s || p_t)."""
    if beta == 0:
        return kl_from_log_probs(log_t, log_s)
    if beta == 1:
        return kl_from_log_probs(log_s, log_t)
    # log m = log((1 - beta) p_s + beta p_t), elementwise (a logsumexp over a stacked pair is ~10x slower on CPU)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return beta * kl_from_log_probs(log_t, log_m) + (1 - beta) * kl_from_log_probs(log_s, log_m)


def tvd_from_log_probs(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """Total variation distance per row: 0.5 * sum_v |p_t - p_s|."""
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)


def sampled_token_estimate(log_s: torch.Tensor, log_t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The sampled-token estimator of reverse KL per row (on-policy distillation: Thinking Machines 2025, Qwen3):
    value ``r = log p_s(y) - log p_t(y)`` at the token y that followed (sampled from the student: E_y[r] =
    KL(p_s || p_t)), gradient that of the policy-gradient loss ``-A * log p_s(y)`` with the advantage ``A = -r`` held
    constant, whose expectation over ``y ~ p_s`` is the gradient of KL(p_s || p_t). Only ``p_t(y)`` is read from the
    teacher."""
    index = tokens.long().unsqueeze(-1)
    picked_s = log_s.gather(-1, index).squeeze(-1)
    r = (picked_s - log_t.gather(-1, index).squeeze(-1)).detach()
    return r + r * (picked_s - picked_s.detach())
