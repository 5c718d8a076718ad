"""Vector compressors: unbiasedness and variance against their own bounds, exact bits, structure,
top-k / fp32 exactness, PowerSGD reconstruction and warm start, error-feedback telescoping, vmap/jit
and bad input.

Statistical checks use M independent messages of one input x and state their tolerance from the
variance they expect: the mean of M unbiased draws has E||mean - x||^2 <= omega(d) ||x||^2 / M, so
we require ||mean - x|| <= 5 sqrt(omega(d) ||x||^2 / M) ("5 standard errors"; by the CLT the left
side is a weighted chi-square with that mean, exceeding 25x its mean has probability < 1e-6).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdata.codecs import base
from qdata.codecs.compressors import (
    ErrorFeedbackState, PowerSGDState, error_feedback, fp16, fp32, powersgd, qsgd, qsgd_entropy_bits,
    randk, scaled_sign, terngrad, topk,
)

DRAWS = 4000  # M messages per statistical check
EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------------------------
# Inputs.


@st.composite
def trees(draw, max_leaves=3, max_dim=5, dtypes=("float32",)):
    """A dict pytree of 1..max_leaves float leaves of ndim 0..3 (at least one coordinate > 1)."""
    n_leaves = draw(st.integers(1, max_leaves))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(n_leaves):
        shape = tuple(draw(st.lists(st.integers(1, max_dim), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(dtypes))
        tree[f"leaf{i}"] = jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)
    if base.flatten(tree)[0].shape[0] < 2:
        tree["extra"] = jnp.asarray(scale * rng.standard_normal((3,)), dtype=jnp.float32)
    return tree


def flat(tree) -> np.ndarray:
    return np.asarray(base.flatten(tree)[0], dtype=np.float64)


def decoded_draws(compressor, tree, m=DRAWS, seed=0) -> np.ndarray:
    """(m, d) array: decode(encode(key_j, tree)) for m independent keys, flattened (one jit+vmap)."""
    state = compressor.init(tree)

    def one(key, x):
        payload, _ = compressor.encode(key, x, state)
        return base.flatten(compressor.decode(payload))[0]

    keys = jax.random.split(jax.random.key(seed), m)
    return np.asarray(jax.jit(jax.vmap(one, in_axes=(0, None)))(keys, tree), dtype=np.float64)


def bias_and_tolerance(compressor, tree, omega: float, m=DRAWS):
    """||mean of m decodes - x|| and 5 standard errors sqrt(omega ||x||^2 / m)."""
    x = flat(tree)
    mean = decoded_draws(compressor, tree, m).mean(axis=0)
    return float(np.linalg.norm(mean - x)), 5.0 * math.sqrt(omega * float(x @ x) / m)


def sent_bits(payload) -> int:
    """Independent count: size * itemsize * 8 over the packed arrays (concrete or abstract)."""
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize * 8
                   for a in jax.tree_util.tree_leaves(payload.arrays)))


def packed_bytes(count: int, width: int) -> int:
    return -(-count * width // 8)


# ----------------------------------------------------------------------------------------------
# Unbiasedness and variance.


@settings(max_examples=8)
@given(tree=trees(), data=st.data(), mode=st.sampled_from(["sent", "seed"]))
def test_randk_unbiased_and_variance_exact(tree, data, mode):
    x = flat(tree)
    d = x.size
    k = data.draw(st.integers(1, d), label="k")
    c = randk(k, indices=mode)
    assert c.unbiased and c.omega(d) == pytest.approx(d / k - 1)
    samples = decoded_draws(c, tree)
    err, tol = float(np.linalg.norm(samples.mean(0) - x)), 5.0 * math.sqrt(c.omega(d) * (x @ x) / DRAWS)
    assert err <= tol + 1e-6 * np.linalg.norm(x)  # + float32 rounding of d/k * x_i when omega = 0
    # E||C(x) - x||^2 = (d/k - 1)||x||^2 exactly; the empirical mean of the M squared errors is within
    # 5 standard errors, the standard error estimated from the M squared errors themselves.
    sq = np.sum((samples - x) ** 2, axis=1)
    expected = (d / k - 1) * (x @ x)
    assert abs(sq.mean() - expected) <= 5 * sq.std(ddof=1) / math.sqrt(DRAWS) + 1e-5 * (x @ x)


@settings(max_examples=8)
@given(tree=trees(), levels=st.integers(1, 8), bucket=st.one_of(st.none(), st.integers(1, 7)))
def test_qsgd_unbiased_and_variance(tree, levels, bucket):
    x = flat(tree)
    d = x.size
    c = qsgd(levels, bucket_size=bucket)
    b = min(bucket or d, d)
    omega = c.omega(d)
    assert c.unbiased and omega == pytest.approx(min(b / levels**2, math.sqrt(b) / levels))
    samples = decoded_draws(c, tree)
    assert np.linalg.norm(samples.mean(0) - x) <= 5.0 * math.sqrt(omega * (x @ x) / DRAWS) + 1e-5 * np.linalg.norm(x)
    # Exact variance: coordinate i in bucket B is norm_B/s times a Bernoulli(p_i) offset,
    # p_i = frac(s |x_i| / norm_B), so E||Q(x) - x||^2 = sum_i (norm_B / s)^2 p_i (1 - p_i).
    pad = (-d) % b
    xb = np.pad(x, (0, pad)).reshape(-1, b)
    norms = np.linalg.norm(xb, axis=1, keepdims=True)
    ratio = np.divide(levels * np.abs(xb), norms, out=np.zeros_like(xb), where=norms > 0)
    p = ratio - np.floor(ratio)
    exact = float(np.sum((norms / levels) ** 2 * p * (1 - p)))
    assert exact <= omega * (x @ x) * (1 + 1e-9)  # Lemma 3.1 of Alistarh et al. holds on this x
    sq = np.sum((samples - x) ** 2, axis=1)
    se = sq.std(ddof=1) / math.sqrt(DRAWS)
    assert abs(sq.mean() - exact) <= 5 * se + 1e-5 * (x @ x)
    assert sq.mean() <= omega * (x @ x) + 5 * se + 1e-5 * (x @ x)


@settings(max_examples=8)
@given(tree=trees())
def test_terngrad_unbiased_and_variance(tree):
    x = flat(tree)
    d = x.size
    c = terngrad()
    assert c.unbiased and c.omega(d) == pytest.approx(math.sqrt(d) - 1)
    samples = decoded_draws(c, tree)
    assert np.linalg.norm(samples.mean(0) - x) <= 5.0 * math.sqrt(c.omega(d) * (x @ x) / DRAWS) + 1e-5 * np.linalg.norm(x)
    # Exact variance s_t ||x||_1 - ||x||^2 with s_t = max|x_i|; it never exceeds (sqrt(d) - 1)||x||^2.
    exact = np.max(np.abs(x)) * np.sum(np.abs(x)) - x @ x
    assert exact <= c.omega(d) * (x @ x) * (1 + 1e-9)
    sq = np.sum((samples - x) ** 2, axis=1)
    assert abs(sq.mean() - exact) <= 5 * sq.std(ddof=1) / math.sqrt(DRAWS) + 1e-5 * (x @ x)


@pytest.mark.parametrize("make", [lambda: topk(1), scaled_sign], ids=["topk", "scaled_sign"])
def test_bias_check_has_power(make):
    """The unbiasedness check above rejects a biased compressor, even at its loosest tolerance."""
    biased = make()
    rng = np.random.default_rng(3)
    tree = {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}
    err, tol = bias_and_tolerance(biased, tree, omega=randk(1).omega(8))
    assert err > tol
    assert not biased.unbiased and biased.omega is None


# ----------------------------------------------------------------------------------------------
# Exact bits: the payload's packed arrays, base.payload_bits and the closed form all agree.


def expected_bits(name: str, d: int, **hp) -> int:
    """Closed forms of the module docstring (w = ceil(log2 d))."""
    w = base.index_width(d)
    if name == "fp32":
        return 32 * d
    if name == "fp16":
        return 16 * d
    if name in ("randk_sent", "topk"):
        return 32 * hp["k"] + 8 * packed_bytes(hp["k"], w)
    if name == "randk_seed":
        return 32 * hp["k"] + 32
    if name == "qsgd":
        b = min(hp["bucket"] or d, d)
        width = 1 + math.ceil(math.log2(hp["levels"] + 1))
        return 32 * math.ceil(d / b) + 8 * packed_bytes(d, width)
    if name == "terngrad":
        return 32 + 8 * packed_bytes(d, 2)
    if name == "scaled_sign":
        return 32 + 8 * packed_bytes(d, 1)
    raise KeyError(name)


@given(tree=trees(max_dim=9), data=st.data())
def test_bits_exact(tree, data):
    """Bits depend on shapes only, so most cases trace abstractly (jax.eval_shape: no compile);
    test_vmap_over_nodes_matches_per_node checks the same counts on concrete payloads."""
    d = flat(tree).size
    k = data.draw(st.integers(1, d), label="k")
    levels = data.draw(st.sampled_from([1, 2, 3, 4, 7, 8, 15, 16, 255]), label="levels")
    bucket = data.draw(st.one_of(st.none(), st.integers(1, 40)), label="bucket")
    cases = {
        "fp32": (fp32(), {}), "fp16": (fp16(), {}),
        "randk_sent": (randk(k), {"k": k}), "randk_seed": (randk(k, indices="seed"), {"k": k}),
        "topk": (topk(k), {"k": k}),
        "qsgd": (qsgd(levels, bucket_size=bucket), {"levels": levels, "bucket": bucket}),
        "terngrad": (terngrad(), {}), "scaled_sign": (scaled_sign(), {}),
    }
    for name, (c, hp) in cases.items():
        payload, _ = jax.eval_shape(c.encode, jax.random.key(1), tree, c.init(tree))
        bits = c.bits(payload)
        assert isinstance(bits, int)
        assert bits == base.payload_bits(payload) == sent_bits(payload) == expected_bits(name, d, **hp), name
        # error feedback sends the inner compressor's payload: same bits
        ef = error_feedback(c)
        assert ef.bits(jax.eval_shape(ef.encode, jax.random.key(1), tree, ef.init(tree))[0]) == bits, name


@settings(max_examples=10)
@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4),
       rank=st.integers(1, 4))
def test_powersgd_bits_exact(shapes, rank):
    tree = {f"l{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
    c = powersgd(rank)
    payload, _ = jax.eval_shape(c.encode, jax.random.key(0), tree, jax.eval_shape(c.init, tree))
    expected = 0
    for s in shapes:
        if len(s) >= 2:
            m, n = math.prod(s[:-1]), s[-1]  # output channels last, as flax lays kernels out
            expected += 32 * (m + n) * min(rank, m, n)
        else:
            expected += 32 * math.prod(s)
    assert c.bits(payload) == base.payload_bits(payload) == sent_bits(payload) == expected


@settings(max_examples=6)
@given(tree=trees(max_dim=9))
def test_qsgd_entropy_estimate(tree):
    """The entropy estimate is the empirical level entropy, never above the fixed-length count."""
    x = flat(tree)
    d, levels = x.size, 4
    c = qsgd(levels)
    payload, _ = jax.jit(c.encode)(jax.random.key(2), tree, c.init(tree))
    decoded = flat(jax.jit(c.decode)(payload))
    norm = float(np.asarray(payload.arrays["norms"])[0])
    lv = np.rint(np.abs(decoded) * levels / norm).astype(int) if norm > 0 else np.zeros(d, int)
    counts = np.bincount(lv, minlength=levels + 1)
    p = counts[counts > 0] / d
    reference = 32 + d * float(-(p * np.log2(p)).sum()) + int(np.count_nonzero(lv))
    estimate = float(jax.jit(qsgd_entropy_bits)(payload))
    assert estimate == pytest.approx(reference, rel=1e-5, abs=1e-3)
    assert estimate <= c.bits(payload)


# ----------------------------------------------------------------------------------------------
# Structure, determinism and exactness.


ALL = {
    "fp32": fp32, "fp16": fp16, "randk_sent": lambda: randk(2), "randk_seed": lambda: randk(2, indices="seed"),
    "topk": lambda: topk(2), "qsgd": lambda: qsgd(3, bucket_size=4), "terngrad": terngrad,
    "scaled_sign": scaled_sign, "powersgd": lambda: powersgd(2), "ef_topk": lambda: error_feedback(topk(2)),
    "ef_powersgd": lambda: error_feedback(powersgd(1)),
}


@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=3)
@given(tree=trees(dtypes=("float32", "bfloat16", "float16")))
def test_structure_and_determinism(name, tree):
    c = ALL[name]()
    encode, decode = jax.jit(c.encode), jax.jit(c.decode)
    state = c.init(tree)
    payload, _ = encode(jax.random.key(5), tree, state)
    out = decode(payload)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
        assert a.shape == b.shape and a.dtype == b.dtype
    again, _ = encode(jax.random.key(5), tree, state)
    for a, b in zip(jax.tree_util.tree_leaves(payload.arrays), jax.tree_util.tree_leaves(again.arrays)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert payload.meta == again.meta


def test_randomized_compressors_use_the_key():
    tree = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(64), jnp.float32)}
    for c in (randk(8), randk(8, indices="seed"), qsgd(2), terngrad()):
        roundtrip = jax.jit(lambda key: c.decode(c.encode(key, tree, c.init(tree))[0]))
        assert not np.array_equal(flat(roundtrip(jax.random.key(0))), flat(roundtrip(jax.random.key(1))))


@settings(max_examples=10)
@given(tree=trees(max_dim=9), data=st.data())
def test_topk_keeps_largest_exactly(tree, data):
    x = flat(tree)
    d = x.size
    k = data.draw(st.integers(1, d), label="k")
    c = topk(k)
    out = flat(jax.jit(lambda t: c.decode(c.encode(jax.random.key(0), t, c.init(t))[0]))(tree))
    kept = np.flatnonzero(out)
    # the kept values are x's, unscaled, and no dropped magnitude exceeds a kept one
    np.testing.assert_array_equal(out[kept], x[kept])
    assert kept.size == np.count_nonzero(x[np.argsort(-np.abs(x), kind="stable")[:k]])
    dropped = np.setdiff1d(np.arange(d), kept)
    if dropped.size and kept.size:
        assert np.max(np.abs(x[dropped])) <= np.min(np.abs(x[kept]))
    np.testing.assert_array_equal(np.sort(np.abs(out))[::-1][:k], np.sort(np.abs(x))[::-1][:k])


@settings(max_examples=8)
@given(tree=trees(dtypes=("float32", "bfloat16", "float16")))
def test_fp32_exact_and_fp16_rounds(tree):
    c = fp32()
    out = jax.jit(c.decode)(c.encode(jax.random.key(0), tree, c.init(tree))[0])
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    h = fp16()
    got = flat(jax.jit(h.decode)(h.encode(jax.random.key(0), tree, h.init(tree))[0]))
    want = np.clip(flat(tree), -65504, 65504).astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(got, want)


def test_fp16_is_biased_and_saturates():
    tree = {"w": jnp.asarray([1.0 + 2.0**-12, 1e6, -1e6, 0.1], jnp.float32)}
    h = fp16()
    out = flat(h.decode(h.encode(jax.random.key(0), tree, h.init(tree))[0]))
    assert out[0] == 1.0 and out[0] != flat(tree)[0]  # deterministic rounding: E[C(x)] != x
    assert np.all(np.isfinite(out)) and out[1] == 65504 and out[2] == -65504


# ----------------------------------------------------------------------------------------------
# PowerSGD.


@settings(max_examples=10)
@given(m=st.integers(1, 7), n=st.integers(1, 7), extra=st.integers(0, 2), seed=st.integers(0, 1000))
def test_powersgd_full_rank_reconstructs(m, n, extra, seed):
    rng = np.random.default_rng(seed)
    tree = {"w": jnp.asarray(rng.standard_normal((m, n)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32)}
    c = powersgd(min(m, n) + extra)
    encode = jax.jit(c.encode)
    state = c.init(tree)
    for _ in range(3):  # warm-started rounds on a fixed matrix
        payload, state = encode(jax.random.key(0), tree, state)
    out = c.decode(payload)
    w = np.asarray(tree["w"])
    assert np.linalg.norm(np.asarray(out["w"]) - w) <= 1e-4 * np.linalg.norm(w)
    np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(tree["b"]))  # small leaves sent as is


def test_powersgd_low_rank_converges_to_best_approximation():
    """Warm-started rounds on a fixed M run subspace iteration: P Q^T -> best rank-r approximation."""
    rng = np.random.default_rng(0)
    m, n, r = 12, 9, 2
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sigma = np.array([8.0, 5.0] + [1.0 / (i + 1) for i in range(n - 2)])  # gap sigma_3 / sigma_2 = 1/5
    mat = (u * sigma) @ v.T
    tree = {"conv": jnp.asarray(mat.reshape(3, 4, n), jnp.float32)}  # ndim 3: seen as (3*4, 9)
    c = powersgd(r, seed=1)
    encode = jax.jit(c.encode)
    state = c.init(tree)
    for _ in range(20):  # subspace error shrinks like (1/5)^t
        payload, state = encode(jax.random.key(0), tree, state)
    out = np.asarray(c.decode(payload)["conv"]).reshape(m, n)
    best = math.sqrt(float(np.sum(sigma[r:] ** 2)))
    assert np.linalg.norm(out - mat) == pytest.approx(best, rel=1e-3)


def test_powersgd_state_is_carried():
    """encode uses the Q in its state, and returns Q' = M^T P as the next state (the one it sent)."""
    rng = np.random.default_rng(1)
    mat = rng.standard_normal((6, 5)).astype(np.float32)
    tree = {"w": jnp.asarray(mat)}
    c = powersgd(2, seed=3)
    state0 = c.init(tree)
    assert isinstance(state0, PowerSGDState) and state0.q[0].shape == (5, 2)
    np.testing.assert_array_equal(np.asarray(state0.q[0]), np.asarray(c.init(tree).q[0]))  # seeded
    payload1, state1 = c.encode(jax.random.key(0), tree, state0)
    np.testing.assert_array_equal(np.asarray(state1.q[0]), np.asarray(payload1.arrays["q"][0]))
    for prev in (state0, state1):
        payload, _ = c.encode(jax.random.key(0), tree, prev)
        # reference: projection of M on the span of M Q_prev
        basis, _ = np.linalg.qr(mat.astype(np.float64) @ np.asarray(prev.q[0], np.float64))
        np.testing.assert_allclose(np.asarray(c.decode(payload)["w"]), basis @ basis.T @ mat, rtol=1e-4, atol=1e-4)
    p2, _ = c.encode(jax.random.key(0), tree, state1)
    assert not np.allclose(np.asarray(p2.arrays["p"][0]), np.asarray(payload1.arrays["p"][0]))


# ----------------------------------------------------------------------------------------------
# Error feedback.


@pytest.mark.parametrize("make", [lambda: topk(2), scaled_sign, lambda: randk(3), lambda: qsgd(1),
                                  lambda: powersgd(1), terngrad],
                         ids=["topk", "scaled_sign", "randk", "qsgd", "powersgd", "terngrad"])
def test_error_feedback_telescopes(make):
    """sum_{t<T} C(v_t) = T x - e_T for a constant input x (e_0 = 0): EF loses nothing for good."""
    rng = np.random.default_rng(4)
    tree = {"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32), "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    x = flat(tree)
    inner, c = make(), error_feedback(make())

    @jax.jit
    def step(t, state):
        v = base.flatten(jax.tree_util.tree_map(jnp.add, tree, state.error))[0]
        payload, state = c.encode(jax.random.fold_in(jax.random.key(0), t), tree, state)
        return v, base.flatten(c.decode(payload))[0], state, base.flatten(state.error)[0]

    state = c.init(tree)
    assert isinstance(state, ErrorFeedbackState)
    T, total, rounding = 30, np.zeros_like(x), np.zeros_like(x)
    for t in range(T):
        v, sent, state, e_next = (np.asarray(a, np.float64) if i != 2 else a for i, a in enumerate(step(t, state)))
        total += sent
        # float32 rounds v_t = x + e_t and e_{t+1} = v_t - C(v_t) once each: at most eps/2 of each
        rounding += EPS32 * (np.abs(v) + np.abs(e_next))
    e_T = flat(state.error)
    np.testing.assert_array_less(np.abs(total + e_T - T * x), rounding + 1e-30)
    assert np.linalg.norm(total - T * x) <= np.linalg.norm(e_T) + np.linalg.norm(rounding)
    # the EF payload has the inner compressor's format
    p_inner, _ = jax.jit(inner.encode)(jax.random.key(9), tree, inner.init(tree))
    p_ef, _ = jax.jit(c.encode)(jax.random.key(9), tree, c.init(tree))
    assert p_ef.meta == p_inner.meta
    assert jax.tree_util.tree_structure(p_ef.arrays) == jax.tree_util.tree_structure(p_inner.arrays)
    for a, b in zip(jax.tree_util.tree_leaves(p_ef.arrays), jax.tree_util.tree_leaves(p_inner.arrays)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # e_0 = 0: the first message is C(x)


# ----------------------------------------------------------------------------------------------
# vmap over nodes, under jit.


@pytest.mark.parametrize("name", sorted(ALL))
def test_vmap_over_nodes_matches_per_node(name):
    c = ALL[name]()
    nodes = 3
    rng = np.random.default_rng(6)
    stacked = {"w": jnp.asarray(rng.standard_normal((nodes, 4, 3)), jnp.float32),
               "b": jnp.asarray(rng.standard_normal((nodes, 5)), jnp.float32)}
    per_node = [jax.tree_util.tree_map(lambda a: a[i], stacked) for i in range(nodes)]
    states = [c.init(t) for t in per_node]
    keys = jax.random.split(jax.random.key(7), nodes)
    stack = lambda xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)
    payloads, new_states = jax.jit(jax.vmap(c.encode))(keys, stacked, stack(states))
    decoded = jax.jit(jax.vmap(c.decode))(payloads)
    encode, decode = jax.jit(c.encode), jax.jit(c.decode)
    for i in range(nodes):
        p_i, s_i = encode(keys[i], per_node[i], states[i])
        mine = jax.tree_util.tree_map(lambda a: a[i], payloads)
        assert c.bits(mine) == c.bits(p_i) == sent_bits(p_i)
        for a, b in zip(jax.tree_util.tree_leaves(mine.arrays), jax.tree_util.tree_leaves(p_i.arrays)):
            if jnp.issubdtype(a.dtype, jnp.integer):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(flat(jax.tree_util.tree_map(lambda a: a[i], decoded)),
                                   flat(decode(p_i)), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[i], new_states)),
                        jax.tree_util.tree_leaves(s_i)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("factory, match", [
    (lambda: randk(0), "k"), (lambda: randk(-3), "k"), (lambda: randk(2.5), "k"), (lambda: randk(True), "k"),
    (lambda: randk(2, indices="bits"), "indices"), (lambda: topk(0), "k"),
    (lambda: qsgd(0), "levels"), (lambda: qsgd(2**31), "levels"), (lambda: qsgd(4, bucket_size=0), "bucket_size"),
    (lambda: powersgd(0), "rank"), (lambda: powersgd(2, seed=-1), "seed"),
    (lambda: error_feedback("topk"), "compressor"),
])
def test_bad_hyper_parameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_k_larger_than_d():
    tree = {"w": jnp.ones((2, 3))}  # d = 6
    for c in (randk(7), randk(7, indices="seed"), topk(7)):
        with pytest.raises(ValueError, match=r"k must be in 1\.\.d"):
            c.init(tree)
        with pytest.raises(ValueError, match=r"k must be in 1\.\.d"):
            jax.jit(c.encode)(jax.random.key(0), tree, base.EmptyState())  # shapes are static: trace time
    assert randk(6).encode(jax.random.key(0), tree, randk(6).init(tree))[0].arrays["values"].shape == (6,)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input(name, bad):
    c = ALL[name]()
    good = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    tree = {"w": jnp.ones((3, 4)).at[1, 2].set(bad), "b": jnp.ones(4)}
    with pytest.raises(ValueError, match="tree"):
        c.encode(jax.random.key(0), tree, c.init(good))


def test_powersgd_state_mismatch():
    c = powersgd(2)
    with pytest.raises(ValueError, match="state"):
        c.encode(jax.random.key(0), {"w": jnp.ones((4, 4))}, c.init({"w": jnp.ones((4, 5))}))
