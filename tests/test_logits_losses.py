"""Each output divergence against an independent NumPy formula, plus gradients, T^2 and TRL equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_distill.signals.logits import (
    LOGITS_LOSSES,
    TOKEN_LOSSES,
    forward_kl,
    generalized_jsd,
    logits_divergence,
    logits_mse,
    reverse_kl,
    sampled_token_kl,
    total_variation,
)

#: the divergences of two distributions (the sampled-token estimator reads a token too: its own tests below)
DIVERGENCES = [kind for kind in LOGITS_LOSSES if kind not in TOKEN_LOSSES]


def _np_softmax(z, t):
    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _np_kl(p, q):
    return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), axis=-1)


def _reference(kind, s, t, temperature=1.0, beta=0.5):
    """Written from the definitions, in float64 NumPy, independently of the library."""
    if kind == "mse":
        return np.mean((np.asarray(s, np.float64) - np.asarray(t, np.float64)) ** 2, axis=-1)
    ps, pt = _np_softmax(s, temperature), _np_softmax(t, temperature)
    if kind == "forward_kl":
        return _np_kl(pt, ps)
    if kind == "reverse_kl":
        return _np_kl(ps, pt)
    if kind == "tvd":
        return 0.5 * np.abs(pt - ps).sum(axis=-1)
    if kind == "jsd":
        if beta == 0:
            return _np_kl(pt, ps)
        if beta == 1:
            return _np_kl(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * _np_kl(pt, m) + (1 - beta) * _np_kl(ps, m)
    if kind == "uld":  # one vocabulary: the L1 distance of the two distributions sorted in decreasing order
        return np.abs(-np.sort(-ps, axis=-1) + np.sort(-pt, axis=-1)).sum(axis=-1)
    if kind == "hybrid":  # one vocabulary: every token is matched, so the JSD alone (probabilities here >> 1e-8)
        return _reference("jsd", s, t, temperature, beta)
    raise AssertionError(kind)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 11, generator=g) * 3, torch.randn(7, 11, generator=g) * 3


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_matches_independent_formula(kind, temperature, logits):
    s, t = logits
    got = logits_divergence(s, t, kind, temperature, jsd_beta=0.3, scale_by_temperature_squared=False)
    want = _reference(kind, s.numpy(), t.numpy(), temperature, beta=0.3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert got.shape == (7,)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_for_identical_logits_and_positive_otherwise(kind, logits):
    s, t = logits
    assert torch.allclose(logits_divergence(s, s.clone(), kind, 2.0), torch.zeros(7), atol=1e-6)
    assert (logits_divergence(s, t, kind, 2.0) > 1e-4).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_temperature_squared_factor(kind, logits):
    s, t = logits
    plain = logits_divergence(s, t, kind, 3.0, scale_by_temperature_squared=False)
    scaled = logits_divergence(s, t, kind, 3.0, scale_by_temperature_squared=True)
    torch.testing.assert_close(scaled, 9.0 * plain)


def test_mse_ignores_temperature(logits):
    s, t = logits
    torch.testing.assert_close(logits_divergence(s, t, "mse", 5.0), logits_mse(s, t))
    torch.testing.assert_close(logits_mse(s, t), ((s - t) ** 2).mean(-1))


def test_jsd_endpoints_are_the_two_kls(logits):
    s, t = logits
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0, temperature=2.0), forward_kl(s, t, 2.0))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0, temperature=2.0), reverse_kl(s, t, 2.0))
    # symmetric JSD at beta = 0.5 is bounded by log 2
    assert (generalized_jsd(s, t, 0.5) <= np.log(2) + 1e-6).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_matches_finite_differences(kind):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: logits_divergence(x, t, kind, 1.7, jsd_beta=0.4).sum(), (s,), eps=1e-6, atol=1e-5
    )


def test_forward_kl_gradient_is_softened_probability_gap():
    """d/dz_s [T^2 KL(p_t||p_s)] = T (p_s - p_t): checked against a hand derivation."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    T = 2.5
    logits_divergence(s, t, "forward_kl", T).sum().backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
    torch.testing.assert_close(s.grad, expected)


def test_half_precision_inputs_are_compared_in_float32(logits):
    s, t = logits
    got = forward_kl(s.bfloat16(), t.bfloat16(), 2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, forward_kl(s.bfloat16().float(), t.bfloat16().float(), 2.0))


def test_total_variation_bounds(logits):
    s, t = logits
    tvd = total_variation(s, t)
    assert ((tvd >= 0) & (tvd <= 1)).all()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_jsd_equals_trl_generalized_jsd_loss(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 6, 13, generator=g), torch.randn(2, 6, 13, generator=g)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    labels[0, :2] = -100
    labels[1, 4:] = -100
    trl = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    mask = labels != -100
    ours = generalized_jsd(s[mask], t[mask], beta, temperature).sum() / mask.sum()
    torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-7)


def test_sampled_token_estimator_value_and_gradient_by_hand():
    """Value: r = log p_s(y) - log p_t(y) at T; gradient wrt z_s: r * (onehot(y) - p_s) / T (the policy-gradient
    loss -A log p_s(y) with the advantage A = -r held constant), by hand; zero for identical models."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 2])
    T = 1.5
    value = logits_divergence(s, t, "sampled_token", T, tokens=y, scale_by_temperature_squared=False)
    p_s, p_t = _np_softmax(s.detach().numpy(), T), _np_softmax(t.numpy(), T)
    rows = np.arange(4)
    r = np.log(p_s[rows, y.numpy()]) - np.log(p_t[rows, y.numpy()])
    np.testing.assert_allclose(value.detach().numpy(), r, rtol=1e-12)
    value.sum().backward()
    expected = r[:, None] * (np.eye(6)[y.numpy()] - p_s) / T
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sampled_token_kl(s.detach(), s.detach(), y), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="pass `tokens`"):
        logits_divergence(s, t, "sampled_token")
