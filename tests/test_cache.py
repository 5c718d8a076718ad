"""The learner-side cache: a sample crosses the link once, and the estimate stays exact/unbiased."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qdata import engine
from qdata.codecs import fp32, stochastic_rounding, subtractive_dither
from qdata.codecs.packing import unpack_codes
from qdata.estimator import full_gradient
from qdata.gate import bernoulli_gate
from qdata.methods.qdata import qdata_estimator
from tests.one_node import one_node_gradient

B, N_FEATURES, C, SHARD = 12, 16, 5, 20


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(jnp.tanh(nn.Dense(8)(x)))


def _setup(**kw):
    model = _Net()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, N_FEATURES)))["params"]

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)

    rng = np.random.default_rng(0)
    shard_x = jnp.asarray(rng.random((SHARD, N_FEATURES)), jnp.float32)
    shard_y = jnp.asarray(rng.integers(0, C, SHARD), jnp.int32)
    est = qdata_estimator(loss_fn, stochastic_rounding(4, 0.0, 1.0), num_classes=C, cache_size=SHARD,
                          sample_shape=(N_FEATURES,), **kw)
    return est, loss_fn, params, shard_x, shard_y


def _batch(shard_x, shard_y, pos):
    pos = jnp.asarray(pos, jnp.int32)
    return {"x": shard_x[pos], "y": shard_y[pos], "pos": pos}


def test_cached_samples_cost_only_their_positions():
    est, _, params, sx, sy = _setup()
    node, cache = est.init(params), est.init_learner()
    node_message, learner = jax.jit(est.node_message), jax.jit(functools.partial(one_node_gradient, est))
    pos = np.arange(B) % 7  # duplicates inside the batch: each sample's codes travel once
    msg, node = node_message(jax.random.PRNGKey(1), params, _batch(sx, sy, pos), node)
    bits = est.uplink_bits(msg)
    fresh = len(set(pos.tolist()))
    assert int(bits["data"]) == fresh * 8 * (N_FEATURES * 4 // 8)
    assert int(bits["labels"]) == 8 * -(-fresh * 3 // 8)  # ceil(log2 5) = 3 bits per label
    # positions: B of ceil(log2 20) = 5 bits, in whole bytes, plus the B-bit bitmap of fresh samples
    assert int(bits["positions"]) == 8 * -(-B * 5 // 8) + 8 * -(-B // 8)
    g1, cache = learner(params, msg, cache)

    # The same samples again with a new key: no codes and no labels, only positions.
    msg2, node = node_message(jax.random.PRNGKey(2), params, _batch(sx, sy, pos), node)
    bits2 = est.uplink_bits(msg2)
    assert int(bits2["data"]) == 0 and int(bits2["labels"]) == 0
    assert int(bits2["total"]) == int(bits2["positions"])
    # The local counts (never sent): B samples sent, of which none coded again.
    counts = engine.split_diagnostics(msg2)[1]
    assert int(counts["samples_sent"]) == B and int(counts["samples_coded"]) == 0
    assert int(engine.split_diagnostics(msg)[1]["samples_coded"]) == fresh
    assert not np.any(np.asarray(msg2.samples.inner["x"].rows["codes"]))  # nothing else travels
    g2, cache = learner(params, msg2, cache)
    # ... and the learner, reading its cache, computes the same estimate as from the first message.
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gated", [False, True])
def test_exact_correction_with_cache_recovers_the_full_gradient(gated):
    """With an fp32 correction the estimate must equal the weighted full-precision gradient exactly,
    also for samples read from the cache: that holds only if node and learner use the same cached
    Q(x_j) (a node correcting against a fresh Q(x_j) would leave an error of size L_x ||Q - Q'||)."""
    kw = {"correction": fp32()}
    if gated:
        kw["gate"] = bernoulli_gate(0.5)
    est, loss_fn, params, sx, sy = _setup(**kw)
    node, cache = est.init(params), est.init_learner()
    node_message, learner = jax.jit(est.node_message), jax.jit(functools.partial(one_node_gradient, est))
    rng = np.random.default_rng(3)
    transmitted = set()
    for step in range(4):
        pos = rng.integers(0, SHARD, B)
        batch = _batch(sx, sy, pos)
        msg, node = node_message(jax.random.PRNGKey(10 + step), params, batch, node)
        g, cache = learner(params, msg, cache)
        mask = np.asarray(unpack_codes(msg.mask.arrays["bitmap"], 1, B)) if gated else np.ones(B)
        transmitted |= set(pos[mask > 0].tolist())
        if gated:  # the reference: (1/b) sum_j a_j grad f(x_j), a_j read back from what was sent
            p = np.asarray(msg.weights.rows["prob"], np.float32)
            a = jnp.asarray(np.where(mask > 0, 1.0 / np.where(p > 0, p, 1.0), 0.0), jnp.float32)
            ref = jax.grad(lambda w: jnp.sum(a * loss_fn(w, batch["x"], batch["y"])) / B)(params)
        else:
            ref = full_gradient(loss_fn)(params, batch["x"], batch["y"])
        for u, v in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    # Node and learner agree on what the learner holds: exactly the samples ever transmitted.
    assert set(np.flatnonzero(np.asarray(node.samples.held)).tolist()) == transmitted


def test_cache_refuses_quantizers_with_per_message_side_information():
    with pytest.raises(ValueError, match="seed"):
        qdata_estimator(lambda p, x, y: jnp.zeros(x.shape[0]), subtractive_dither(4, 0.0, 1.0), num_classes=2,
                        cache_size=8, sample_shape=(3,))
    with pytest.raises(ValueError, match="sample_shape"):
        qdata_estimator(lambda p, x, y: jnp.zeros(x.shape[0]), stochastic_rounding(4, 0.0, 1.0), num_classes=2,
                        cache_size=8)
