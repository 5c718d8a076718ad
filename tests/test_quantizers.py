"""Data quantizers: shapes, exact bits, determinism, unbiasedness, variance, error bounds, clipping, checks.

Statistical tolerances (stated where used) come from each quantizer's own variance: the mean of M
independent decodes is within 5 standard errors of x, the standard error taken from the bound
Var[Q(x)_i] <= Delta^2 / 4 per coordinate; mean squared errors are within 5 standard errors of
their exact expectation, the standard error of a sum over coordinates bounded by the sum of the
coordinates' standard deviations (Minkowski), which holds whatever the dependence between coordinates.
A 5-sigma miss has probability below 6e-7 per coordinate, and the runs are seeded, so the tests do
not flake; a test at the end checks that the same criterion does catch a biased quantizer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from qdata.codecs import base, quantizers
from qdata.codecs.quantizers import (
    QuantizerMeta, nearest_rounding, per_sample_range, stochastic_rounding, subtractive_dither,
)

FIXED = ["stochastic_rounding", "nearest_rounding", "subtractive_dither"]
KINDS = FIXED + ["per_sample_range", "per_sample_range_nearest"]
UNBIASED = ["stochastic_rounding", "subtractive_dither", "per_sample_range"]
F32_EPS = 2.0**-23


def make(kind: str, bits: int, lo: float = 0.0, hi: float = 1.0, **kw):
    if kind == "per_sample_range":
        return per_sample_range(bits, **kw)
    if kind == "per_sample_range_nearest":
        return per_sample_range(bits, rounding="nearest", **kw)
    return getattr(quantizers, kind)(bits, lo, hi, **kw)


def steps(q, payload, bits: int) -> np.ndarray:
    """Delta as a (b, 1) array: the fixed step, or each sample's step from its sent range."""
    b = payload.rows["codes"].shape[0]
    if q.delta is not None:
        return np.full((b, 1), q.delta)
    lo = np.asarray(payload.rows["lo"], np.float64)
    hi = np.asarray(payload.rows["hi"], np.float64)
    return ((hi - lo) / (2**bits - 1))[:, None]


def extra_bits(kind: str, b: int) -> int:
    """Metadata sent beside the codes: the dither seed (uint32) or two fp16 range ends per sample."""
    return {"subtractive_dither": 32, "per_sample_range": 32 * b, "per_sample_range_nearest": 32 * b}.get(kind, 0)


def float_slack(lo: float, hi: float) -> float:
    """Float32 rounding of u = (x - lo) / Delta and of lo + Delta * code: a few ulps of the range's scale."""
    return 8 * F32_EPS * (abs(lo) + abs(hi) + (hi - lo))


def decode_draws(q, x, m: int, seed: int = 0) -> np.ndarray:
    """M independent decodes of x (keys split from ``seed``), shape (M, *x.shape), float64."""
    keys = jax.random.split(jax.random.key(seed), m)
    out = jax.jit(jax.vmap(lambda k: q.decode(q.encode(k, x))))(keys)
    return np.asarray(out, np.float64)


def in_range_batch(seed: int, shape: tuple, lo: float, hi: float) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(lo, hi, size=shape), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, exact bits, error bounds.


@given(
    kind=st.sampled_from(KINDS), bits=st.integers(1, 16), b=st.integers(1, 3),
    sample_shape=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    lo=st.floats(-10, 10), width=st.floats(1e-2, 100), seed=st.integers(0, 2**31),
)
def test_round_trip_shape_bits_and_error_bound(kind, bits, b, sample_shape, lo, width, seed):
    hi = lo + width
    x = in_range_batch(seed, (b, *sample_shape), lo, hi)
    q = make(kind, bits, lo, hi)
    payload = q.encode(jax.random.key(seed), x)
    x_hat = q.decode(payload)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype

    n = math.prod(sample_shape)
    assert payload.rows["codes"].shape == (b, base.packed_size(n, bits, words=True))
    leaves = jax.tree_util.tree_leaves((payload.arrays, payload.rows))
    assert q.bits(payload) == sum(l.size * l.dtype.itemsize * 8 for l in leaves)
    assert q.bits(payload) == b * math.ceil(n * bits / 8) * 8 + extra_bits(kind, b)
    assert int(payload.info["clipped"]) == 0

    # |Q(x) - x| < Delta for stochastic rounding (one of the two neighbouring levels), <= Delta / 2
    # for nearest rounding and for subtractive dither (uniform error on [-Delta/2, Delta/2]).
    delta = steps(q, payload, bits)
    half = kind in ("nearest_rounding", "subtractive_dither", "per_sample_range_nearest")
    bound = delta * (0.5 if half else 1.0)
    err = np.abs(np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)).reshape(b, n)
    assert np.all(err <= bound + float_slack(lo, hi))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_keeps_dtype_and_shape(kind, dtype):
    x = in_range_batch(0, (3, 2, 4, 5), 0.0, 1.0).astype(dtype)
    q = make(kind, 5)
    payload = q.encode(jax.random.key(1), x)
    x_hat = q.decode(payload)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert payload.meta == QuantizerMeta(payload.meta.kind, 5, payload.meta.lo, payload.meta.hi, (2, 4, 5),
                                         jnp.dtype(dtype).name)
    hash(payload.meta)  # static metadata must be hashable (it is a jit cache key)
    err = np.abs(np.asarray(x_hat, np.float32) - np.asarray(x, np.float32))
    assert np.all(err <= 1 / 31 + 2 * float(jnp.finfo(dtype).eps))


@pytest.mark.parametrize("kind", KINDS)
def test_same_key_same_payload(kind):
    x = in_range_batch(3, (4, 50), 0.0, 1.0)
    q = make(kind, 3)
    p1, p2 = q.encode(jax.random.key(7), x), jax.jit(q.encode)(jax.random.key(7), x)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(q.decode(p1), jax.jit(q.decode)(p2))
    p3 = q.encode(jax.random.key(8), x)
    random_codes = kind in ("stochastic_rounding", "subtractive_dither", "per_sample_range")
    # 200 coordinates strictly between levels: two keys give identical codes with probability ~0.
    assert np.array_equal(p1.rows["codes"], p3.rows["codes"]) != random_codes


def test_quantizer_attributes():
    delta = 2.0 / 15
    assert stochastic_rounding(4, -1, 1)[3:] == (True, delta)
    assert nearest_rounding(4, -1, 1)[3:] == (False, delta)
    assert subtractive_dither(4, -1, 1)[3:] == (True, delta)
    assert per_sample_range(4)[3:] == (True, None)
    assert per_sample_range(4, rounding="nearest")[3:] == (False, None)


def test_bits_with_mask_counts_only_sent_samples():
    x = in_range_batch(0, (5, 33), 0.0, 1.0)
    for kind in KINDS:
        q = make(kind, 3)
        payload = q.encode(jax.random.key(0), x)
        mask = jnp.array([1, 0, 1, 1, 0])
        per_sample = math.ceil(33 * 3 / 8) * 8 + extra_bits(kind, 1) * (kind.startswith("per_sample"))
        fixed = 32 if kind == "subtractive_dither" else 0
        assert int(q.bits(payload, mask)) == fixed + 3 * per_sample
        assert int(jax.jit(q.bits)(payload, mask)) == fixed + 3 * per_sample
        assert q.bits(payload) == fixed + 5 * per_sample


# ----------------------------------------------------------------------------------------------
# Statistics: unbiasedness, variance, dither.

M = 4000


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
@pytest.mark.parametrize("kind", UNBIASED)
def test_unbiased(kind, bits):
    lo, hi = -1.5, 2.5
    x = in_range_batch(bits, (4, 16), lo, hi)
    q = make(kind, bits, lo, hi)
    delta = steps(q, q.encode(jax.random.key(0), x), bits)  # (b, 1)
    mean = decode_draws(q, x, M).mean(axis=0)
    # Var[Q(x)_i] <= Delta^2 / 4 per coordinate (E||Q(x)-x||^2 <= n Delta^2 / 4), so the mean of M
    # decodes has standard error at most Delta / (2 sqrt(M)); allow 5 of them plus float32 rounding.
    tol = 5 * delta / (2 * math.sqrt(M)) + float_slack(lo, hi)
    assert np.all(np.abs(mean - np.asarray(x, np.float64)) <= tol)


def test_unbiasedness_criterion_detects_bias():
    # Nearest rounding of x = lo + (k + 0.3) Delta has bias -0.3 Delta, far beyond 5 standard errors.
    bits, lo, hi = 4, 0.0, 1.0
    delta = (hi - lo) / 15
    x = jnp.asarray(lo + (np.arange(8)[None, :] % 14 + 0.3) * delta, jnp.float32)
    mean = decode_draws(nearest_rounding(bits, lo, hi), x, 200).mean(axis=0)
    tol = 5 * delta / (2 * math.sqrt(200)) + float_slack(lo, hi)
    assert np.all(np.abs(mean - np.asarray(x, np.float64)) > tol)


@pytest.mark.parametrize("bits", [1, 4, 12])
@pytest.mark.parametrize("kind", ["stochastic_rounding", "per_sample_range"])
def test_stochastic_rounding_mean_squared_error(kind, bits):
    lo, hi = 0.0, 3.0
    x = in_range_batch(10 + bits, (4, 32), lo, hi)
    q = make(kind, bits, lo, hi)
    delta = steps(q, q.encode(jax.random.key(0), x), bits)  # (b, 1)
    x64 = np.asarray(x, np.float64)
    lo_j = lo if q.delta is not None else np.asarray(q.encode(jax.random.key(0), x).rows["lo"], np.float64)[:, None]
    f = np.mod((x64 - lo_j) / delta, 1.0)
    # Coordinate i errs by (1 - f) Delta w.p. f and by -f Delta w.p. 1 - f:
    # E e^2 = f (1 - f) Delta^2 <= Delta^2 / 4 and E e^4 = f (1 - f) ((1 - f)^3 + f^3) Delta^4.
    e2 = f * (1 - f) * delta**2
    e4 = f * (1 - f) * ((1 - f) ** 3 + f**3) * delta**4
    sq = ((decode_draws(q, x, M) - x64) ** 2).sum(axis=(1, 2))  # ||Q(x) - x||^2 per draw
    # sd of the sum over coordinates <= sum of their sds (Minkowski, any dependence); 5 SEs of M draws.
    tol = 5 * np.sqrt(np.maximum(e4 - e2**2, 0)).sum() / math.sqrt(M) + x.size * float_slack(lo, hi) * delta.max()
    assert abs(sq.mean() - e2.sum()) <= tol
    bound = (x.shape[1] * delta[:, 0] ** 2 / 4).sum()  # sum over samples of n Delta_j^2 / 4
    assert sq.mean() <= bound + tol


@pytest.mark.parametrize("bits", [2, 8])
def test_subtractive_dither_error_is_uniform_and_independent_of_x(bits):
    lo, hi = -1.0, 1.0
    q = subtractive_dither(bits, lo, hi)
    delta = q.delta
    levels = 2**bits - 1
    k = np.arange(32) % (levels + 1)
    groups = {  # x on a level (SR would have zero error), halfway (SR: Delta^2/4), random
        "on_level": lo + k * delta,
        "halfway": lo + (np.minimum(k, levels - 1) + 0.5) * delta,
        "random": np.random.default_rng(bits).uniform(lo, hi, size=32),
    }
    x = jnp.asarray(np.stack(list(groups.values())), jnp.float32)  # (3 samples, 32)
    err = decode_draws(q, x, M) - np.asarray(x, np.float64)  # (M, 3, 32)
    slack = float_slack(lo, hi)
    assert np.all(np.abs(err) <= delta / 2 + slack)
    # Error uniform on [-Delta/2, Delta/2]: mean 0 (sd Delta/sqrt(12) per coordinate), E e^2 = Delta^2/12
    # with Var e^2 = Delta^4/80 - Delta^4/144 = Delta^4/180; 5 SEs over M draws (and 32 coordinates
    # for e^2, whose average has sd at most Delta^2/sqrt(180) by Minkowski).
    assert np.all(np.abs(err.mean(axis=0)) <= 5 * delta / math.sqrt(12 * M) + slack)
    for j in range(3):
        msq = (err[:, j, :] ** 2).mean()
        assert abs(msq - delta**2 / 12) <= 5 * delta**2 / math.sqrt(180 * M) + 2 * slack * delta


def test_rounding_noise_is_uncorrelated_across_coordinates_and_keys():
    # x halfway between levels: stochastic rounding errs by +-Delta/2 with probability 1/2 each. With
    # independent coordinates the sample correlation of n pairs has sd 1/sqrt(n); allow 5.
    n = 2**16
    q = stochastic_rounding(4, 0.0, 1.0)
    x = jnp.full((1, n), 7.5 / 15, jnp.float32)
    signs = [np.sign(np.asarray(q.decode(q.encode(jax.random.key(s), x)), np.float64) - 0.5)[0] for s in (0, 1)]
    assert np.all(np.abs(signs[0]) == 1)
    tol = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 64, 3072):
        assert abs(np.mean(signs[0][:-lag] * signs[0][lag:])) <= tol * math.sqrt(n / (n - lag))
    assert abs(np.mean(signs[0] * signs[1])) <= tol
    assert abs(np.mean(signs[0])) <= tol


# ----------------------------------------------------------------------------------------------
# Per-sample range.


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_per_sample_range_metadata(rounding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 40)) * np.array([1, 10, 1e-3, 300, 0.1, 1])[:, None] + 0.1234567,
                    jnp.float32)
    q = per_sample_range(6, rounding=rounding)
    payload = q.encode(jax.random.key(0), x)
    lo, hi = payload.rows["lo"], payload.rows["hi"]
    assert lo.dtype == jnp.float16 and hi.dtype == jnp.float16 and lo.shape == hi.shape == (6,)
    # Rounded outward: the sent range covers every value, and is the tightest fp16 range that does.
    x64 = np.asarray(x, np.float64)
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    assert np.all(lo64 <= x64.min(axis=1)) and np.all(hi64 >= x64.max(axis=1))
    assert np.all(np.asarray(jnp.nextafter(lo, jnp.float16(np.inf)), np.float64) > x64.min(axis=1))
    assert np.all(np.asarray(jnp.nextafter(hi, jnp.float16(-np.inf)), np.float64) < x64.max(axis=1))
    assert int(payload.info["clipped"]) == 0
    x_hat = np.asarray(q.decode(payload), np.float64)
    delta = (hi64 - lo64)[:, None] / 63
    assert np.all(np.abs(x_hat - x64) <= delta * (1.0 if rounding == "stochastic" else 0.5) + 1e-6 * np.abs(x64))


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_per_sample_range_constant_and_float32_range(rounding):
    x = jnp.array([[0.5] * 7, [-3.0] * 7, [0.1] * 7], jnp.float32)
    q = per_sample_range(4, rounding=rounding)
    payload = q.encode(jax.random.key(0), x)
    x_hat = np.asarray(q.decode(payload))
    assert np.all(np.isfinite(x_hat))
    np.testing.assert_array_equal(x_hat[:2], np.asarray(x[:2]))  # exactly representable: lo = hi, no step
    assert np.all(np.abs(x_hat[2] - 0.1) <= 2 * float(jnp.finfo(jnp.float16).eps) * 0.1)
    q32 = per_sample_range(4, rounding=rounding, range_dtype=jnp.float32)
    p32 = q32.encode(jax.random.key(0), x)
    assert p32.rows["lo"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q32.decode(p32)), np.asarray(x))
    assert q32.bits(p32) == 3 * (math.ceil(7 * 4 / 8) * 8 + 64)


# ----------------------------------------------------------------------------------------------
# Clipping.


@pytest.mark.parametrize("kind", FIXED)
def test_clipping_is_counted_never_wrapped(kind):
    lo, hi = 0.0, 1.0
    x = jnp.array([[-5.0, -0.01, 0.0, 0.3, 1.0, 1.01, 7.0, 0.5]], jnp.float32)
    q = make(kind, 4, lo, hi)
    payload = q.encode(jax.random.key(0), x)
    assert int(payload.info["clipped"]) == 4
    assert int(jax.jit(q.encode)(jax.random.key(0), x).info["clipped"]) == 4
    x_hat = np.asarray(q.decode(payload))
    margin = q.delta / 2 if kind == "subtractive_dither" else 0.0
    assert np.all(x_hat >= lo - margin - 1e-6) and np.all(x_hat <= hi + margin + 1e-6)
    if kind != "subtractive_dither":  # clipped to the end levels exactly
        np.testing.assert_allclose(x_hat[0, [0, 1, 5, 6]], [lo, lo, hi, hi], atol=1e-6)
    clean = q.encode(jax.random.key(0), jnp.clip(x, lo, hi))
    assert int(clean.info["clipped"]) == 0


@pytest.mark.parametrize("kind", FIXED)
def test_on_clip_error(kind):
    x = jnp.array([[-5.0, 0.2, 7.0], [0.1, 0.2, 3.0]], jnp.float32)
    q = make(kind, 4, 0.0, 1.0, on_clip="error")
    with pytest.raises(ValueError, match="3 value"):
        q.encode(jax.random.key(0), x)
    # Traced under jit the values are unknown: the count is reported instead of raised.
    assert int(jax.jit(q.encode)(jax.random.key(0), x).info["clipped"]) == 3
    q.encode(jax.random.key(0), jnp.clip(x, 0.0, 1.0))  # in range: no error


def test_per_sample_range_clips_beyond_fp16():
    x = jnp.array([[1e5, 0.0, 1.0], [-7e4, 2.0, 1.0]], jnp.float32)
    payload = per_sample_range(8).encode(jax.random.key(0), x)
    assert int(payload.info["clipped"]) == 2
    assert np.all(np.isfinite(np.asarray(payload.rows["hi"], np.float32)))
    with pytest.raises(ValueError, match="2 value"):
        per_sample_range(8, on_clip="error").encode(jax.random.key(0), x)
    p32 = per_sample_range(8, range_dtype=jnp.float32).encode(jax.random.key(0), x)
    assert int(p32.info["clipped"]) == 0


# ----------------------------------------------------------------------------------------------
# Bad input.


BAD_HYPERPARAMETERS = [
    (lambda f: f(0, 0.0, 1.0), "bits"),
    (lambda f: f(17, 0.0, 1.0), "bits"),
    (lambda f: f(2.0, 0.0, 1.0), "bits"),
    (lambda f: f(True, 0.0, 1.0), "bits"),
    (lambda f: f("4", 0.0, 1.0), "bits"),
    (lambda f: f(4, 1.0, 1.0), "lo"),
    (lambda f: f(4, 2.0, 1.0), "lo"),
    (lambda f: f(4, float("nan"), 1.0), "lo"),
    (lambda f: f(4, 0.0, float("inf")), "hi"),
    (lambda f: f(4, "zero", 1.0), "lo"),
    (lambda f: f(4, 0.0, None), "hi"),
    (lambda f: f(4, 0.0, 1.0, on_clip="ignore"), "on_clip"),
]


@pytest.mark.parametrize("case", range(len(BAD_HYPERPARAMETERS)))
@pytest.mark.parametrize("kind", FIXED)
def test_bad_hyperparameters_raise_at_factory_time(kind, case):
    call, word = BAD_HYPERPARAMETERS[case]
    with pytest.raises(ValueError, match=word):
        call(getattr(quantizers, kind))


@pytest.mark.parametrize("kwargs, word", [
    ({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"bits": 3.5}, "bits"),
    ({"bits": 4, "rounding": "up"}, "rounding"), ({"bits": 4, "range_dtype": jnp.int8}, "range_dtype"),
    ({"bits": 4, "range_dtype": "not-a-dtype"}, "range_dtype"), ({"bits": 4, "on_clip": "wrap"}, "on_clip"),
])
def test_per_sample_range_bad_hyperparameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        per_sample_range(**kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_x_raises(kind):
    q = make(kind, 4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="leading axis"):
        q.encode(key, jnp.ones((5,)))
    with pytest.raises(ValueError, match="leading axis"):
        q.encode(key, jnp.float32(1.0))
    with pytest.raises(ValueError, match="NaN or inf"):
        q.encode(key, jnp.array([[0.1, jnp.nan]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        q.encode(key, jnp.array([[0.1], [jnp.inf]]))
    with pytest.raises(ValueError, match="floating"):
        q.encode(key, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="leading axis"):
        jax.jit(q.encode)(key, jnp.ones((5,)))  # shape checks are static, so they hold under jit too
    other = make("nearest_rounding" if kind != "nearest_rounding" else "stochastic_rounding", 4)
    with pytest.raises(ValueError, match="payload"):
        q.decode(other.encode(key, jnp.ones((2, 3)) * 0.5))


# ----------------------------------------------------------------------------------------------
# jit and vmap over nodes.


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_nodes_matches_each_node(kind):
    nodes, b, n = 3, 4, 10
    x = in_range_batch(5, (nodes, b, n), -0.2, 1.2)  # some values out of [0, 1]
    q = make(kind, 5)
    keys = jax.random.split(jax.random.key(2), nodes)
    mask = jnp.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])

    @jax.jit
    def round_trip(keys, x, mask):
        payload = jax.vmap(q.encode)(keys, x)
        return payload, jax.vmap(q.decode)(payload), jax.vmap(q.bits)(payload, mask)

    payload, x_hat, bits = round_trip(keys, x, mask)
    assert x_hat.shape == x.shape
    for i in range(nodes):
        own = q.encode(keys[i], x[i])
        np.testing.assert_array_equal(payload.rows["codes"][i], own.rows["codes"])
        np.testing.assert_array_equal(x_hat[i], q.decode(own))
        assert int(payload.info["clipped"][i]) == int(own.info["clipped"])
        assert int(bits[i]) == int(q.bits(own, mask[i]))


@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=6, max_size=6),
       rows=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_min_max_on_integer_keys_matches_numpy(values, rows, seed):
    # The range check and per-sample ranges reduce integer keys that order as the floats do; every
    # finite value (and +-inf, -0.0, subnormals, the extremes) must come back exactly.
    rng = np.random.default_rng(seed)
    x = rng.permutation(np.array(values * rows, np.float32)).reshape(rows, 6)
    lo, hi = quantizers._min_max(jnp.asarray(x), (1,))
    np.testing.assert_array_equal(np.asarray(lo), x.min(axis=1))
    np.testing.assert_array_equal(np.asarray(hi), x.max(axis=1))
    lo, hi = quantizers._min_max(jnp.asarray(x), (0, 1))
    assert float(lo) == x.min() and float(hi) == x.max()


@pytest.mark.parametrize("kind", KINDS)
def test_tuned_and_enclosed_compilations_agree(kind):
    # A codec called on its own compiles with base.codec_compiler_options (512-bit vectors on
    # AVX-512 CPUs); traced inside another jit, vmap or a closure over concrete arrays it compiles with
    # the enclosing computation. Both must give the same payload bit for bit: node and learner may
    # sit in differently compiled programs.
    x = in_range_batch(4, (6, 77), -0.1, 1.1)  # odd length, a few values clipped
    q, key = make(kind, 4), jax.random.key(3)
    own = q.encode(key, x)
    closed = jax.jit(lambda: q.encode(key, x))()  # concrete arguments inside a trace
    mapped = jax.vmap(q.encode)(key[None], x[None])
    for other in (closed, jax.tree_util.tree_map(lambda a: a[0], mapped)):
        for a, b in zip(jax.tree_util.tree_leaves(own), jax.tree_util.tree_leaves(other)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(q.decode(own), jax.jit(lambda: q.decode(own))())


def test_codec_compiler_options_are_valid_here():
    options = base.codec_compiler_options()
    assert isinstance(options, dict)
    if jax.default_backend() != "cpu":
        assert options == {}
    # Whatever they are, XLA accepts them on this machine.
    np.testing.assert_array_equal(jax.jit(lambda a: a + 1, compiler_options=options)(jnp.arange(3)), [1, 2, 3])


# ----------------------------------------------------------------------------------------------
# The benchmark must keep running.


def test_bench_codecs_quick():
    from experiments import bench_codecs

    rows = bench_codecs.main(["--quick", "--repeats", "1"])
    data = [r for r in rows if r["kind"] == "data"]
    assert len(data) == len(bench_codecs.QUANTIZERS) * 2
    for r in data:
        assert r["ratio"] > 0 and np.isfinite(r["mb_per_s"]) and isinstance(r["meets_target"], bool)
        bits = 4 if "B=4" in r["codec"] else 8
        extra = {"subtractive_dither": 32 / 8, "per_sample_range": 32}.get(r["codec"].split("(")[0], 0)
        assert r["bits"] == math.ceil(256 * bits / 8) * 8 + extra  # quick mode: 8 samples of 256
    # The script skips what is missing or broken; here every compressor that exists must have run.
    from qdata.codecs import compressors

    ran = {r["codec"] for r in rows if r["kind"] == "vector"}
    expected = {name for name, (attr, _) in bench_codecs.COMPRESSORS.items() if hasattr(compressors, attr)}
    assert ran == expected
    assert all(r["ratio"] > 0 and r["bits"] > 0 for r in rows if r["kind"] == "vector")



def _fixed_point_codes(x, bits, seed, rows, cols, model):
    """The documented construction of stochastic rounding's codes, in numpy (lo = 0, Delta = 1)."""
    if bits in (1, 2, 4, 8):
        fbits = 16 if bits < 8 else 15
        w = np.asarray(base.counter_bits(seed, (rows, cols // 2)), np.uint64)
        r = np.stack([w & 0xFFFF, w >> 16], axis=-1).reshape(rows, cols) >> (16 - fbits)
        scaled = x.astype(np.float64) * 2.0**fbits
        t = (np.rint(scaled) if model == "round" else np.floor(scaled)).astype(np.uint64)
    else:
        fbits = 24
        r = np.asarray(base.counter_bits(seed, (rows, cols)), np.uint64) >> 8
        t = np.floor(x.astype(np.float64) * 2.0**fbits).astype(np.uint64)
    return (t + r) >> fbits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_stochastic_rounding_fixed_point_resolution(bits):
    # The documented construction, checked code by code: with seed = jax.random.bits(key) and words
    # w = base.counter_bits(seed, ...), code = (t + r) >> F with r uniform on 0..2^F - 1, so
    # P(round up) = frac(t / 2^F) exactly. For B in {1, 2, 4, 8}: coordinates 2i, 2i + 1 of a row
    # take the low and high halves of word i (their top F bits), F = 16 (15 at B = 8) and
    # t = round(u 2^F) (half to even); the bias is within 2^-(F+1) Delta either way. Otherwise
    # F = 24, t = floor(u 2^24) and r = w >> 8, one word per coordinate; the bias is in
    # (-2^-24 Delta, 0].
    levels = 2**bits - 1
    rows, cols = 128, 8192  # 1M coordinates: a floor-for-round slip changes a code with prob. 2^-17 each
    rng = np.random.default_rng(bits)
    # lo = 0, hi = levels: Delta = 1 and u = x exactly. Fractions on and off the 2^-16 grid, halfway
    # between two grid points (ties: half to even), and 2^-18 (rounds to 0: never rounded up at F = 16).
    frac = np.concatenate([rng.integers(0, 2**16, 2048) / 2.0**16, rng.uniform(0, 1, 5120),
                           (rng.integers(0, 2**16 - 1, 1020) + 0.5) / 2.0**16, [2.0**-18] * 4])
    x = np.minimum(rng.integers(0, levels, (rows, cols)) + frac, levels).astype(np.float32)
    key = jax.random.key(11)
    q = stochastic_rounding(bits, 0.0, float(levels))
    codes = np.rint(np.asarray(q.decode(q.encode(key, jnp.asarray(x))), np.float64)).astype(np.uint64)
    seed = jax.random.bits(key, (), jnp.uint32)
    np.testing.assert_array_equal(codes, _fixed_point_codes(x, bits, seed, rows, cols, "round"))
    if bits in (1, 2, 4, 8):
        np.testing.assert_array_equal(codes[:, -4:], np.floor(x[:, -4:]))
        # The check can tell the rounding of t apart: truncating instead would change some codes.
        assert np.any(codes != _fixed_point_codes(x, bits, seed, rows, cols, "floor"))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_subtractive_dither_construction_and_error_range(bits):
    # Dither draws one 24-bit word per coordinate, r = counter_bits(seed) >> 8 with
    # seed = jax.random.bits(key): code = (floor(u 2^24) + r) >> 24 and the decoder subtracts
    # U = r / 2^24, which keeps the error within [-Delta/2, Delta/2].
    levels = 2**bits - 1
    rows, cols = 64, 4096
    rng = np.random.default_rng(100 + bits)
    frac = np.concatenate([rng.uniform(0, 1, 2048), (rng.integers(0, 2**16 - 1, 2044) + 0.5) / 2.0**16,
                           [0.0, 2.0**-18, 1 - 2.0**-18, 0.5]])
    x = np.minimum(rng.integers(0, levels, (rows, cols)) + frac, levels).astype(np.float32)
    key = jax.random.key(5)
    q = subtractive_dither(bits, 0.0, float(levels))
    payload = q.encode(key, jnp.asarray(x))
    codes = np.asarray(base.unpack_codes(payload.rows["codes"], bits, cols), np.uint64)
    seed = jax.random.bits(key, (), jnp.uint32)
    r = np.asarray(base.counter_bits(seed, (rows, cols)), np.uint64) >> np.uint64(8)
    t = np.floor(x.astype(np.float64) * 2.0**24).astype(np.uint64)
    np.testing.assert_array_equal(codes, (t + r) >> np.uint64(24))
    x_hat = np.asarray(q.decode(payload), np.float64)
    np.testing.assert_allclose(x_hat, codes - r / 2.0**24 + 0.5, rtol=0, atol=levels * 2.0**-22)
    err = x_hat - x.astype(np.float64)
    assert np.abs(err).max() <= 0.5 + levels * 2.0**-22  # Delta = 1


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("kind", FIXED)
def test_clip_count_every_width_odd_length_and_vmap(kind, bits):
    # For B in {1, 2, 4} the out-of-range test is fused into the packing (padded to whole bytes for
    # an odd length); the count must match a direct count for every width, eagerly, under jit and
    # per node under vmap (node 0 in range: the exact count must then not run or must give 0).
    lo, hi = -1.0, 2.0
    x = np.array(in_range_batch(bits, (3, 2, 13), lo, hi))
    x[1, 0, 12], x[1, 1, 0], x[2, 1, 5] = hi + 1e-3, lo - 4.0, hi + 9.0  # last coordinate: the padded byte
    expect = ((x < lo) | (x > hi)).sum(axis=(1, 2))
    q = make(kind, bits, lo, hi)
    keys = jax.random.split(jax.random.key(4), 3)
    for i in range(3):
        assert int(q.encode(keys[i], jnp.asarray(x[i])).info["clipped"]) == expect[i]
        assert int(jax.jit(q.encode)(keys[i], jnp.asarray(x[i])).info["clipped"]) == expect[i]
    batched = jax.jit(jax.vmap(q.encode))(keys, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(batched.info["clipped"]), expect)
