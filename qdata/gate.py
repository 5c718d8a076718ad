"""The importance gate: which samples of a node's minibatch cross the link, and with what weight.

DESIGN.md section 2, step 1. Each sample j of the minibatch gets a score s_j >= 0 (its loss, or the
norm of its last-layer gradient). The gate turns the scores into transmission probabilities

    p_j = min(1, s_j / tau),   tau chosen so that sum_j p_j = rho * b      (water-filling)

and sends sample j when m_j = 1. The learner weighs a transmitted sample by a_j = m_j / p_j, so that
E[a_j] = 1 and (1/b) sum_j a_j grad f(w; x_j, y_j) is an unbiased estimate of the minibatch gradient
(importance sampling; Horvitz and Thompson 1952; for SGD, Zhao and Zhang 2015, Katharopoulos and
Fleuret 2018).

Shapes follow optax: a factory takes the hyper-parameters and returns a :class:`Gate`, a NamedTuple of a
pure ``select(key, scores) -> Selection`` and static facts about it (``rho``, ``unbiased``,
``weighted``).

What crosses the link for the weights (a choice, stated once here and used by
:mod:`qdata.estimator`): the node rounds p_j to fp16 *before* drawing m_j, draws
m_j ~ Bernoulli(p~_j) with that rounded p~_j, and sends p~_j (16 bits) for the transmitted rows. Both
sides compute a_j = 1 / p~_j in float32 from the same fp16 number, so node and learner agree bit for
bit and E[a_j] = p~_j * (1 / p~_j) = 1 holds up to float32 rounding of the reciprocal, not merely up to
fp16 rounding of 1/p_j. The price is that sum_j p~_j equals rho * b only up to fp16 rounding
(relative 2^-11 per sample).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qdata import checks
from qdata.codecs.packing import pack_codes, unpack_codes
from qdata.codecs.payloads import Payload

Array = jax.Array

# Smallest positive fp16 (a subnormal, 2^-24): a positive p_j that fp16 would round to 0 is sent as this
# instead, so that a sample with p_j > 0 keeps p~_j > 0 and the gate stays unbiased.
_FP16_TINY = float(np.float16(2.0**-24))


class Selection(NamedTuple):
    """The gate's decision for one minibatch.

    Attributes:
      mask: (b,) float32 in {0, 1}; m_j = 1 when sample j is transmitted.
      weight: (b,) float32, a_j = m_j / p_j (Bernoulli gate) or m_j (no gate, top fraction).
      prob: (b,) float32, the probability p_j with which sample j was drawn (for the Bernoulli gate the
        fp16-rounded p~_j that is also sent; for deterministic gates 0 or 1).
    """

    mask: Array
    weight: Array
    prob: Array


class Gate(NamedTuple):
    """A gate in the optax style.

    Attributes:
      select: ``select(key, scores) -> Selection`` for scores of shape (b,), all >= 0.
      unbiased: whether E[a_j] = 1 for every sample (Bernoulli gate, no gate).
      rho: the budget fraction in (0, 1]; on average rho * b samples are sent. rho = 1 sends every
        sample with a_j = 1, whatever the gate.
      weighted: whether the weights a_j vary and must cross the link (the learner cannot infer them
        from the mask alone).
    """

    select: Callable[[jax.Array, Array], Selection]
    unbiased: bool
    rho: float
    weighted: bool = False


# ----------------------------------------------------------------------------------------------
# Scores.


def loss_score(per_sample_loss: Callable[..., Array]) -> Callable[..., Array]:
    """Score s_j = f(w; x_j, y_j), the per-sample loss.

    Args:
      per_sample_loss: ``(params, x, y) -> (b,)`` losses.

    Returns:
      ``score_fn(params, x, y) -> (b,)``, the losses with gradients stopped (a score is a decision, not
      a quantity to differentiate).
    """

    def score_fn(params, x, y):
        return jax.lax.stop_gradient(per_sample_loss(params, x, y))

    return score_fn


def gradient_norm_score(
    logits_and_features: Callable[..., tuple[Array, Array]],
    loss_on_logits: Callable[[Array, Array], Array],
) -> Callable[..., Array]:
    """Score s_j = the exact norm of sample j's gradient w.r.t. the last (dense) layer.

    With z_j = W h_j + c the logits and g_j = d f_j / d z_j, the last layer's gradient is
    (g_j h_j^T, g_j), whose Frobenius norm is ||g_j||_2 * sqrt(||h_j||_2^2 + 1). That is what this
    returns. DESIGN.md writes the cheap bound ||g_j|| * (||h_j|| + 1), which is within a factor sqrt(2)
    of it and gives the same ranking only approximately; the exact value costs the same.

    All rows g_j come from one backward pass: jax.grad of sum_j f_j w.r.t. the (b, C) logits matrix,
    whose row j is g_j because f_j depends on row j only (no per-sample parameter gradients). This
    assumes no coupling across the batch in the logits (e.g. no batch norm in training mode).

    Args:
      logits_and_features: ``(params, x) -> (logits (b, C), h (b, F))``, h the input of the last layer.
      loss_on_logits: ``(logits, y) -> (b,)`` per-sample losses.

    Returns:
      ``score_fn(params, x, y) -> (b,)``.
    """

    def score_fn(params, x, y):
        logits, h = logits_and_features(params, x)
        logits = jax.lax.stop_gradient(logits)
        h = jax.lax.stop_gradient(h)
        g = jax.grad(lambda z: jnp.sum(loss_on_logits(z, y)))(logits)
        g_norm = jnp.linalg.norm(g.reshape(g.shape[0], -1), axis=-1)
        h_sq = jnp.sum(jnp.square(h.reshape(h.shape[0], -1)), axis=-1)
        return g_norm * jnp.sqrt(h_sq + 1.0)

    return score_fn


# ----------------------------------------------------------------------------------------------
# Water-filling.


def water_fill(scores: Array, budget, floor: float = 0.0) -> Array:
    """Transmission probabilities p_j = min(1, s_j / tau) with sum_j p_j = budget.

    Closed form, jit-able, O(b log b): sort the scores in decreasing order s_(1) >= ... >= s_(b). With
    the k largest saturated (p = 1), the rest share the remaining budget R_k = budget - k in proportion
    to their scores, tau_k = S_k / R_k with S_k = s_(k+1) + ... + s_(b). The answer is the smallest k
    with R_k > 0 and s_(k+1) <= tau_k (the largest unsaturated score does not exceed tau); for it, every
    saturated score exceeds tau, so the solution is consistent and unique. Ties are handled exactly
    (tied scores never straddle the boundary).

    Zero scores: when fewer samples have a positive score than the budget, no finite tau exists; the
    result is then the limit of water-filling s + epsilon as epsilon -> 0: every positive-score sample
    is saturated and the remaining budget is spread evenly over the zero-score samples (all-zero
    scores give the uniform p_j = budget / b). Otherwise zero-score samples get p_j = 0, which keeps
    the gate unbiased when a zero score means a zero gradient (the gradient-norm score; a non-negative
    loss at 0 is at its minimum), but not for arbitrary scores: ``floor`` then mixes in the uniform
    distribution (defensive importance sampling, Hesterberg 1995),

        p_j <- (1 - floor) * p_j + floor * budget / b,

    which keeps sum_j p_j = budget, p_j <= 1 and p_j >= floor * budget / b > 0.

    Args:
      scores: (b,) non-negative scores (negative values are treated as 0).
      budget: the expected number of transmitted samples, rho * b, in (0, b].
      floor: mixing weight of the uniform distribution, in [0, 1).

    Returns:
      (b,) float32 probabilities in [0, 1] summing to ``budget`` up to float32 rounding.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (b,), got {scores.shape}")
    checks.check_finite(scores, "scores")
    if checks.is_concrete(scores) and np.any(np.asarray(scores) < 0):
        raise ValueError("scores must be non-negative")
    floor = float(floor)
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    b = scores.shape[0]
    if checks.is_concrete(budget):
        bval = float(budget)
        if not (0.0 < bval <= b):
            raise ValueError(f"budget must be in (0, b] = (0, {b}], got {bval}")
    budget = jnp.asarray(budget, jnp.float32)

    s = jnp.maximum(scores.astype(jnp.float32), 0.0)
    desc = -jnp.sort(-s)
    # tail[k] = S_k = sum of desc[k:], summed from the small end so small scores are not lost.
    tail = jnp.cumsum(desc[::-1])[::-1]
    k = jnp.arange(b, dtype=jnp.float32)
    remaining = budget - k
    feasible = (remaining > 0) & (desc * remaining <= tail)
    # The smallest feasible k; one always exists (k = ceil(budget) - 1 has 0 < R_k <= 1 and
    # s_(k+1) * R_k <= s_(k+1) <= S_k), so argmax over the boolean finds it.
    k_star = jnp.argmax(feasible)
    r_star = budget - k_star.astype(jnp.float32)
    s_star = tail[k_star]
    n_star = (b - k_star).astype(jnp.float32)
    positive_tail = s_star > 0
    ratio = r_star / jnp.where(positive_tail, s_star, 1.0)
    p = jnp.where(positive_tail, jnp.minimum(1.0, s * ratio), jnp.where(s > 0, 1.0, r_star / n_star))
    if floor > 0.0:
        p = (1.0 - floor) * p + floor * budget / b
    # budget = b: every p_j is exactly 1 (the general formula could land one ulp below).
    return jnp.where(budget >= b, jnp.ones_like(p), jnp.clip(p, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Gates.


def _check_scores(scores) -> Array:
    scores = jnp.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (b,), got {scores.shape}")
    checks.check_finite(scores, "scores")
    return scores


def no_gate() -> Gate:
    """Send every sample, a_j = 1 (rho = 1). Neither weights nor a mask need to cross the link."""

    def select(key, scores):
        del key
        scores = _check_scores(scores)
        ones = jnp.ones(scores.shape, jnp.float32)
        return Selection(mask=ones, weight=ones, prob=ones)

    return Gate(select=select, unbiased=True, rho=1.0, weighted=False)


def bernoulli_gate(rho: float, floor: float = 1e-3) -> Gate:
    """Importance gate: m_j ~ Bernoulli(p_j), a_j = m_j / p_j, so E[a_j] = 1 (unbiased).

    p_j comes from :func:`water_fill` with budget rho * b, so E[sum_j m_j] = rho * b. As explained in
    the module docstring, p_j is rounded to fp16 (the number that is sent) before m_j is drawn, and
    a_j = 1 / p~_j is computed from that same number on both sides: the gate is unbiased up to float32
    rounding of the reciprocal. A positive p_j that fp16 would flush to 0 is sent as 2^-24.

    Args:
      rho: budget fraction in (0, 1].
      floor: uniform mixing weight in [0, 1), see :func:`water_fill`. The default 1e-3 keeps p_j > 0
        for every sample whatever the score, at a negligible cost in budget allocation; 0 gives the
        pure p_j = min(1, s_j / tau) of DESIGN.md.

    Returns:
      A :class:`Gate` with ``unbiased=True``, ``weighted=True``.
    """
    rho = checks.check_fraction(rho, "rho")
    floor = float(floor)
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1), got {floor}")

    def select(key, scores):
        scores = _check_scores(scores)
        b = scores.shape[0]
        p = water_fill(scores, rho * b, floor)
        sent_p = p.astype(jnp.float16)
        sent_p = jnp.where((p > 0) & (sent_p == 0), jnp.float16(_FP16_TINY), sent_p).astype(jnp.float32)
        mask = (jax.random.uniform(key, (b,), jnp.float32) < sent_p).astype(jnp.float32)
        weight = jnp.where(mask > 0, 1.0 / jnp.where(sent_p > 0, sent_p, 1.0), 0.0)
        return Selection(mask=mask, weight=weight, prob=sent_p)

    return Gate(select=select, unbiased=True, rho=rho, weighted=True)


def top_fraction_count(rho: float, b: int) -> int:
    """ceil(rho * b) for rho as written in decimal: Fraction(repr(rho)), since the binary float of 0.1
    is slightly above 1/10 and its exact value would make ceil(0.1 * 10) = 2."""
    return max(1, min(b, math.ceil(Fraction(repr(float(rho))) * b))) if b > 0 else 0


def top_fraction_gate(rho: float) -> Gate:
    """Deterministic gate: send the ceil(rho * b) highest scores, a_j = 1.

    BIASED: samples with low scores are never sent, and nothing reweighs the others, so the estimate is
    the gradient of a different (score-dependent) minibatch. Ties are broken by position (lowest index
    first), so exactly ceil(rho * b) samples are sent.

    Args:
      rho: budget fraction in (0, 1].

    Returns:
      A :class:`Gate` with ``unbiased=False``, ``weighted=False``.
    """
    rho = checks.check_fraction(rho, "rho")

    def select(key, scores):
        del key
        scores = _check_scores(scores)
        b = scores.shape[0]
        count = top_fraction_count(rho, b)
        _, idx = jax.lax.top_k(scores.astype(jnp.float32), count)
        mask = jnp.zeros((b,), jnp.float32).at[idx].set(1.0)
        return Selection(mask=mask, weight=mask, prob=mask)

    return Gate(select=select, unbiased=False, rho=rho, weighted=False)


# ----------------------------------------------------------------------------------------------
# What crosses the link for a selection, and what the learner reads back.


def select(gate: Gate, score_fn: Callable[..., Array], key, params, x: Array, y: Array) -> Selection:
    """The gate's selection for a batch; the scores are computed only when the gate can drop samples
    (rho < 1): with rho = 1 every sample is sent with a_j = 1."""
    if gate.rho < 1.0:
        return gate.select(key, score_fn(params, x, y))
    ones = jnp.ones((x.shape[0],), jnp.float32)
    return Selection(mask=ones, weight=ones, prob=ones)


def selection_payloads(gate: Gate, selection: Selection) -> tuple[Payload, Payload]:
    """``(weights, mask)`` as sent: fp16 p~_j of the transmitted rows (a weighted gate with rho < 1;
    see the module docstring), and the b-bit bitmap of transmitted samples (rho < 1). Empty
    payloads where nothing needs to be sent."""
    mask = selection.mask
    gated = gate.rho < 1.0
    weights = Payload()
    if gated and gate.weighted:
        weights = Payload(rows={"prob": jnp.where(mask > 0, selection.prob, 0.0).astype(jnp.float16)})
    bitmap = Payload(arrays={"bitmap": pack_codes(mask.astype(jnp.uint32), 1)}) if gated else Payload()
    return weights, bitmap


def received_mask(gate: Gate, bitmap: Payload, b: int) -> Array:
    """m_j as the learner reads it off the bitmap (all ones when rho = 1: nothing was sent)."""
    if gate.rho >= 1.0:
        return jnp.ones((b,), jnp.float32)
    return unpack_codes(bitmap.arrays["bitmap"], 1, b).astype(jnp.float32)


def received_weights(gate: Gate, weights: Payload, mask: Array) -> Array:
    """a_j as both sides compute it from what was sent: 1 / p~_j for a weighted gate, else m_j."""
    if not (gate.rho < 1.0 and gate.weighted):
        return mask.astype(jnp.float32)
    p = weights.rows["prob"].astype(jnp.float32)
    return jnp.where(mask > 0, 1.0 / jnp.where(p > 0, p, 1.0), 0.0)
