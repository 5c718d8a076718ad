"""The methods layer: the learner's one-pass gradient over N nodes equals the mean of the per-node g_i."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdata.codecs import randk, stochastic_rounding
from qdata.gate import bernoulli_gate
from qdata.methods import qdata_method
from qdata.methods.qdata import qdata_estimator
from tests.one_node import one_node_gradient
from tests.test_cache import B, C, SHARD, _setup

NODES = 3


@pytest.mark.parametrize("cache", [False, True])
def test_one_backward_pass_equals_mean_of_node_estimates(cache):
    est, loss_fn, params, sx, sy = _setup(correction=randk(20), gate=bernoulli_gate(0.6))
    if not cache:
        est = qdata_estimator(loss_fn, stochastic_rounding(4, 0.0, 1.0), num_classes=C, correction=randk(20),
                              gate=bernoulli_gate(0.6))
    method = qdata_method(est)
    rng = np.random.default_rng(0)
    pos = jnp.asarray(rng.integers(0, SHARD, (NODES, B)), jnp.int32)
    batches = {"x": sx[pos], "y": sy[pos], "pos": pos, "id": pos}
    node_states = jax.jit(jax.vmap(lambda _: est.init(params)))(jnp.arange(NODES))
    keys = jax.random.split(jax.random.PRNGKey(4), NODES)
    messages, _ = jax.jit(jax.vmap(est.node_message, in_axes=(0, None, 0, 0)))(keys, params, batches, node_states)
    learner_state = method.init_learner(params, NODES)
    g, _ = jax.jit(method.learner_gradient)(params, messages, learner_state)
    per_node, _ = jax.jit(jax.vmap(functools.partial(one_node_gradient, est), in_axes=(None, 0, 0)))(
        params, messages, learner_state)
    for u, v in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(per_node)):
        np.testing.assert_allclose(u, np.mean(v, axis=0), rtol=1e-5, atol=1e-6)
    assert np.asarray(jax.tree_util.tree_leaves(g)[0]).shape == jax.tree_util.tree_leaves(params)[0].shape


def test_encoder_diagnostics_are_taken_out_of_the_message():
    """Payload.info (e.g. the clipped count) is local to the encoder: the engine strips it before the
    message crosses a link and reports the sums beside the ledger."""
    from qdata.engine import split_diagnostics

    q = stochastic_rounding(4, 0.0, 1.0)
    x = jnp.asarray([[0.5, 1.5, -2.0], [0.1, 0.2, 3.0]], jnp.float32)
    message = {"a": q.encode(jax.random.PRNGKey(0), x), "b": q.encode(jax.random.PRNGKey(1), x[:1])}
    stripped, counts = jax.jit(split_diagnostics)(message)
    assert int(counts["clipped"]) == 3 + 2
    assert stripped["a"].info == {} and stripped["b"].info == {}
    np.testing.assert_array_equal(stripped["a"].rows["codes"], message["a"].rows["codes"])
