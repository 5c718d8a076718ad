"""compress_gradients: an optax loop trains on compressed gradients, under jit, with exact bits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qdata.codecs import base
from qdata.codecs.compressors import error_feedback, fp32, powersgd, qsgd, randk, topk
from qdata.codecs.transforms import CompressGradientsState, compress_gradients


def least_squares(seed=0, n=32, d=5, sv=(1.0, 0.7)):
    """F(w) = ||A w - y||^2 / (2n) with y = A w*: F* = 0, Hessian A^T A / n with eigenvalues in
    [mu, L] = [sv[1]^2, sv[0]^2] (A built from its SVD), so every constant below is known."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.linspace(sv[0], sv[1], d) * math.sqrt(n)
    a = jnp.asarray((u * s) @ v.T, jnp.float32)
    w_star = jnp.asarray(rng.standard_normal(d), jnp.float32)
    y = a @ w_star

    def loss(w):
        return 0.5 * jnp.mean(jnp.square(a @ w - y))

    return loss, w_star, sv[0] ** 2, sv[1] ** 2


def test_qsgd_in_an_optax_chain_converges_with_exact_bits():
    loss, w_star, L, mu = least_squares()
    d = w_star.shape[0]
    levels, lr, steps = 4, 0.1, 100
    compressor = qsgd(levels)
    opt = optax.chain(compress_gradients(compressor, jax.random.key(0)), optax.sgd(lr))
    w = jnp.zeros(d)
    state = opt.init(w)

    @jax.jit
    def step(w, state):
        grads = jax.grad(loss)(w)
        updates, state = opt.update(grads, state, w)
        return optax.apply_updates(w, updates), state

    for _ in range(steps):
        w, state = step(w, state)

    # With g = H (w - w*) and E||C(g)||^2 <= (1 + omega)||g||^2, one step contracts
    # E||w - w*||^2 by at most rho = 1 - lr mu (2 - lr L (1 + omega)) (L-smooth, mu-strongly convex).
    omega = compressor.omega(d)
    rho = 1 - lr * mu * (2 - lr * L * (1 + omega))
    assert 0 < rho < 1
    start = float(jnp.sum(jnp.square(w_star)))
    bound = rho**steps * start
    # Markov: P(||w_T - w*||^2 > 100 E||w_T - w*||^2) <= 1%
    assert float(jnp.sum(jnp.square(w - w_star))) <= 100 * bound
    assert 100 * bound < 1e-2 * start  # the check is far from vacuous

    # the bits recorded are the compressor's own count of the last message
    bits_state = state[0]
    assert isinstance(bits_state, CompressGradientsState)
    payload, _ = compressor.encode(jax.random.key(1), jax.grad(loss)(w), compressor.init(w))
    assert int(bits_state.bits) == compressor.bits(payload) == base.payload_bits(payload)
    assert int(bits_state.bits) == 32 + 8 * math.ceil(d * (1 + math.ceil(math.log2(levels + 1))) / 8)


def test_updates_are_the_received_message():
    """update returns decode(encode(k, g)) with k the second half of split(state.key)."""
    grads = {"w": jnp.arange(12.0).reshape(3, 4) - 6.0, "b": jnp.ones(3)}
    key = jax.random.key(3)
    for compressor in (randk(4), qsgd(2), error_feedback(topk(2)), powersgd(1)):
        tx = compress_gradients(compressor, key)
        state = tx.init(grads)
        updates, new_state = jax.jit(tx.update)(grads, state)
        next_key, message_key = jax.random.split(key)
        payload, inner = compressor.encode(message_key, grads, compressor.init(grads))
        expected = compressor.decode(payload)
        for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        assert int(new_state.bits) == compressor.bits(payload)
        np.testing.assert_array_equal(jax.random.key_data(new_state.key), jax.random.key_data(next_key))
        for a, b in zip(jax.tree_util.tree_leaves(new_state.inner), jax.tree_util.tree_leaves(inner)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        assert int(state.bits) == 0


def test_stateful_compressor_trains_under_jit():
    """EF-top-k (biased, stateful) in an optax chain under jit: the error memory is carried, and the
    iterates obey the EF identity w_T = w_0 - lr (sum_t g_t - e_T)."""
    loss, w_star, _, _ = least_squares(seed=1)
    lr, steps = 0.1, 200
    opt = optax.chain(compress_gradients(error_feedback(topk(2)), jax.random.key(0)), optax.sgd(lr))
    w = jnp.zeros(w_star.shape)
    state = opt.init(w)

    @jax.jit
    def step(w, state):
        grads = jax.grad(loss)(w)
        updates, state = opt.update(grads, state, w)
        return optax.apply_updates(w, updates), state, grads

    grad_sum, rounding = np.zeros(w.shape), np.zeros(w.shape)
    for t in range(steps):
        w_prev = np.asarray(w, np.float64)
        w, state, grads = step(w, state)
        grad_sum += np.asarray(grads, np.float64)
        # float32 rounding per step: the EF sums (x + e, v - C(v)) and w - lr C(v)
        rounding += np.finfo(np.float32).eps * (np.abs(w_prev) + lr * 4 * (np.abs(grads) + np.abs(state[0].inner.error)))
        if t == 0:
            assert float(jnp.sum(jnp.abs(state[0].inner.error))) > 0  # top-2 of 5 left an error behind
    e_T = np.asarray(state[0].inner.error, np.float64)
    np.testing.assert_array_less(np.abs(np.asarray(w, np.float64) + lr * (grad_sum - e_T)), rounding)
    assert float(loss(w)) < float(loss(jnp.zeros(w_star.shape)))


def test_bits_of_a_billion_parameter_message_are_recorded_exactly():
    # fp32 at d = 10^9 is 32e9 bits, beyond int32; the state holds them as exact Bits (abstract
    # parameters: nothing of size d is allocated, the count is static).
    d = 10**9
    params = {"w": jax.ShapeDtypeStruct((d,), jnp.float32)}
    tx = compress_gradients(fp32(), jax.random.key(0))
    state = jax.eval_shape(tx.init, params)
    _, new_state = jax.eval_shape(tx.update, params, state)
    assert new_state.bits.units == (32 * d,) and new_state.bits.units[0] > 2**31
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="compressor"):
        compress_gradients(optax.sgd(0.1), jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        compress_gradients(qsgd(2), 0)
