"""Tests of qdata.gate: water-filling, the three gates and the two scores."""

import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

from qdata.gate import (
    bernoulli_gate, gradient_norm_score, loss_score, no_gate, top_fraction_gate, water_fill,
)


def reference_water_fill(scores, budget):
    """Independent float64 solution: bisection on tau for sum_j min(1, s_j / tau) = budget.

    When fewer scores are positive than the budget, the limit of water-filling s + eps (positives
    saturated, the rest of the budget spread evenly over zeros), as documented in water_fill.
    """
    s = np.asarray(scores, np.float64)
    b = s.size
    if budget >= b:
        return np.ones(b)
    positive = s > 0
    if positive.sum() <= budget:
        return np.where(positive, 1.0, (budget - positive.sum()) / (b - positive.sum()))
    lo, hi = 0.0, s.max() * b / budget + 1.0  # sum(min(1, s/tau)) is decreasing in tau
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(1.0, s / mid).sum() > budget:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, s / hi)


# Scores with ties and zeros: drawn from a small pool of values, sometimes all from {0}.
score_values = st.sampled_from([0.0, 0.0, 1e-3, 0.5, 1.0, 1.0, 2.0, 7.5, 100.0])
score_lists = st.one_of(
    st.lists(score_values, min_size=1, max_size=48),
    st.lists(st.floats(0.0, 1e3, allow_nan=False, width=32), min_size=1, max_size=48),
)


@given(scores=score_lists, rho=st.floats(0.01, 1.0), floor=st.sampled_from([0.0, 0.0, 0.1]))
def test_water_fill_sums_to_budget_and_matches_reference(scores, rho, floor):
    b = len(scores)
    budget = rho * b
    p = np.asarray(jax.jit(water_fill, static_argnums=2)(jnp.asarray(scores, jnp.float32), budget, floor))
    assert p.shape == (b,)
    assert np.all(p >= 0) and np.all(p <= 1)
    # float32 sums of b <= 48 terms each <= 1: rounding below 1e-5 * b (eps_32 = 1.2e-7, times b terms
    # and the budget's own rounding to float32).
    assert abs(p.sum() - budget) <= 1e-5 * b
    ref = reference_water_fill(scores, budget)
    ref = (1 - floor) * ref + floor * budget / b
    # Same tolerance argument per entry: each p_j = s_j * R / S in float32 (relative 1e-5).
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)
    # Ties get equal probabilities; larger scores never get smaller ones.
    s = np.asarray(scores, np.float32)
    order = np.argsort(s, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-6)
    for v in np.unique(s):
        assert np.ptp(p[s == v]) <= 1e-6
    if floor > 0:
        assert np.all(p >= floor * budget / b * (1 - 1e-6))


def test_water_fill_degenerate_scores():
    b = 8
    # All zero: uniform budget / b.
    np.testing.assert_allclose(water_fill(jnp.zeros(b), 3.0), np.full(b, 3 / 8), rtol=1e-6)
    # Two positives, budget 4: both saturate, the remaining 2 spread over the 6 zeros.
    s = jnp.array([0, 5.0, 0, 0, 1.0, 0, 0, 0])
    np.testing.assert_allclose(water_fill(s, 4.0), [1 / 3, 1, 1 / 3, 1 / 3, 1, 1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    # All tied: uniform, whatever the value.
    np.testing.assert_allclose(water_fill(jnp.full(b, 2.5), 2.0), np.full(b, 0.25), rtol=1e-6)
    # One dominant score saturates; the rest share in proportion.
    p = np.asarray(water_fill(jnp.array([100.0, 1.0, 1.0, 2.0]), 2.0))
    np.testing.assert_allclose(p, [1.0, 0.25, 0.25, 0.5], rtol=1e-6)


def test_water_fill_bad_input():
    with pytest.raises(ValueError, match="budget"):
        water_fill(jnp.ones(4), 5.0)
    with pytest.raises(ValueError, match="budget"):
        water_fill(jnp.ones(4), 0.0)
    with pytest.raises(ValueError, match="scores"):
        water_fill(jnp.array([1.0, jnp.nan]), 1.0)
    with pytest.raises(ValueError, match="scores"):
        water_fill(jnp.array([1.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="floor"):
        water_fill(jnp.ones(4), 1.0, floor=1.0)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
@pytest.mark.parametrize("factory", [bernoulli_gate, top_fraction_gate])
def test_gate_rejects_bad_rho(factory, bad):
    with pytest.raises(ValueError, match="rho"):
        factory(bad)


def test_gate_rejects_nan_scores():
    with pytest.raises(ValueError, match="scores"):
        bernoulli_gate(0.5).select(jax.random.key(0), jnp.array([1.0, jnp.inf]))


@pytest.mark.parametrize("gate", [no_gate(), bernoulli_gate(1.0), top_fraction_gate(1.0)])
def test_rho_one_transmits_everything_with_unit_weight(gate):
    scores = jax.random.exponential(jax.random.key(1), (16,))
    for seed in range(3):
        sel = jax.jit(gate.select)(jax.random.key(seed), scores)
        np.testing.assert_array_equal(sel.mask, np.ones(16))
        np.testing.assert_array_equal(sel.weight, np.ones(16))
    assert gate.rho == 1.0


def test_bernoulli_gate_is_unbiased():
    # Scores spanning three decades, a zero, and ties, so p~ covers saturated, mid and small values.
    scores = jnp.array([0.0, 0.01, 0.05, 0.2, 0.2, 0.5, 1.0, 3.0, 10.0, 50.0, 0.3, 0.7])
    b, rho, draws = scores.size, 0.4, 40_000
    gate = bernoulli_gate(rho)
    keys = jax.random.split(jax.random.key(2), draws)
    sel = jax.jit(jax.vmap(gate.select, in_axes=(0, None)))(keys, scores)
    p = np.asarray(sel.prob[0], np.float64)
    assert np.all(np.asarray(sel.prob) == p)  # p~ depends on the scores only
    assert np.all(p > 0)  # the floor keeps the zero score alive
    # The sent probability is fp16, and the mask/weight agree with it.
    np.testing.assert_array_equal(p, p.astype(np.float16).astype(np.float64))
    w = np.asarray(sel.weight, np.float64)
    m = np.asarray(sel.mask, np.float64)
    np.testing.assert_allclose(w, m / p, rtol=1e-6)
    # a_j has mean 1 and variance (1 - p)/p; the mean of `draws` i.i.d. copies is within 5 standard
    # errors sqrt((1 - p) / (p * draws)) of 1 (plus 1e-6 for float32 1/p~).
    se = np.sqrt((1 - p) / (p * draws))
    assert np.all(np.abs(w.mean(0) - 1.0) <= 5 * se + 1e-6), (w.mean(0), se)
    # The expected count is sum p~ = rho * b up to fp16 rounding (relative 2^-11 per entry), and the
    # mean count is within 5 standard errors of it (Var = sum p (1 - p)).
    assert abs(p.sum() - rho * b) <= 2.0**-11 * rho * b + 1e-5 * b
    count_se = np.sqrt(np.sum(p * (1 - p)) / draws)
    assert abs(m.sum(1).mean() - p.sum()) <= 5 * count_se


def test_bernoulli_gate_prefers_high_scores():
    scores = jnp.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
    sel = bernoulli_gate(0.25, floor=0.0).select(jax.random.key(0), scores)
    # Budget 2: 128 saturates (128 > tau = 127), the other seven share the remaining 1 in proportion
    # to their scores (p = s / 127).
    expected = np.array([1, 2, 4, 8, 16, 32, 64, 0]) / 127.0
    expected[-1] = 1.0
    np.testing.assert_allclose(sel.prob, expected.astype(np.float16), rtol=0)


@given(
    b=st.integers(1, 40),
    rho=st.floats(0.01, 1.0),
    tie_pool=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_top_fraction_sends_exactly_ceil_rho_b(b, rho, tie_pool, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, tie_pool, size=b).astype(np.float32)  # small pool: many ties
    gate = top_fraction_gate(rho)
    sel = jax.jit(gate.select)(jax.random.key(0), jnp.asarray(scores))
    mask = np.asarray(sel.mask)
    count = math.ceil(Fraction(repr(rho)) * b)
    assert mask.sum() == count
    np.testing.assert_array_equal(sel.weight, mask)
    if count < b:
        assert scores[mask == 1].min() >= scores[mask == 0].max()
    assert not gate.unbiased


def test_top_fraction_count_is_exact_for_decimal_rho():
    # The binary floats of 0.1, 0.2, 0.8 lie above their decimals: rho * b must still be read as
    # the decimal says (hand-computed counts, not the code's own formula).
    sel = top_fraction_gate(0.3).select(jax.random.key(0), jnp.arange(10.0))
    np.testing.assert_array_equal(sel.mask, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    for rho, b, expected in [(0.1, 10, 1), (0.1, 100, 10), (0.2, 5, 1), (0.8, 10, 8), (0.9, 10, 9), (0.15, 20, 3),
                             (0.7, 10, 7), (0.25, 3, 1), (1.0, 7, 7)]:
        sel = top_fraction_gate(rho).select(jax.random.key(0), jnp.arange(float(b)))
        assert int(np.asarray(sel.mask).sum()) == expected, (rho, b)


class MLP(nn.Module):
    hidden: int = 12
    classes: int = 5

    @nn.compact
    def __call__(self, x, features=False):
        h = nn.tanh(nn.Dense(self.hidden)(x))
        h = nn.tanh(nn.Dense(self.hidden)(h))
        logits = nn.Dense(self.classes, name="head")(h)
        return (logits, h) if features else logits


def _loss_on_logits(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def test_gradient_norm_score_equals_slow_last_layer_gradient_norm():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (9, 6))
    y = jax.random.randint(jax.random.key(1), (9,), 0, 5)
    params = model.init(jax.random.key(2), x)

    def logits_and_features(params, x):
        return model.apply(params, x, features=True)

    score = jax.jit(gradient_norm_score(logits_and_features, _loss_on_logits))(params, x, y)

    # Slow way: one jax.grad per sample w.r.t. the head's kernel and bias.
    def one_loss(head, xj, yj):
        p = {"params": {**params["params"], "head": head}}
        return _loss_on_logits(model.apply(p, xj[None]), yj[None])[0]

    slow = []
    for j in range(x.shape[0]):
        g = jax.grad(one_loss)(params["params"]["head"], x[j], y[j])
        slow.append(np.sqrt(sum(float(jnp.sum(l**2)) for l in jax.tree_util.tree_leaves(g))))
    # Same quantity in float32 through different reductions: relative 1e-5.
    np.testing.assert_allclose(score, slow, rtol=1e-5)
    assert np.all(np.asarray(slow) > 0)


def test_loss_score_is_the_per_sample_loss():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (7, 6))
    y = jax.random.randint(jax.random.key(1), (7,), 0, 5)
    params = model.init(jax.random.key(2), x)

    def per_sample_loss(params, x, y):
        return _loss_on_logits(model.apply(params, x), y)

    s = jax.jit(loss_score(per_sample_loss))(params, x, y)
    np.testing.assert_allclose(s, per_sample_loss(params, x, y), rtol=1e-6)
    for j in range(7):
        np.testing.assert_allclose(s[j], per_sample_loss(params, x[j : j + 1], y[j : j + 1])[0], rtol=1e-5)
