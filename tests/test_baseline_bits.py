"""Every baseline of the lineups on a tiny configuration, its bits both ways against a hand count.

The model: w (4 x 3) and b (3): d = 15, an index takes ceil(log2 15) = 4 bits. One node, one message
through the method as the engine calls it (``node_message`` then ``uplink_bits``)."""

import jax
import jax.numpy as jnp
import pytest

from qdata import engine
from qdata.codecs import ledger
from qdata.config import make_compressor
from qdata.methods import gradient_compression, powersgd_allreduce, sgd

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros(3)}
BATCH = {"x": jnp.linspace(-2.0, 2.0, 20).reshape(5, 4), "y": jnp.asarray([0, 1, 2, 1, 0])}


def _loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y]


def _uplink(method):
    message, _ = method.node_message(jax.random.PRNGKey(0), PARAMS, BATCH, method.init_node(PARAMS))
    return ledger.host_total(method.uplink_bits(message)["total"])


# spec: (uplink by hand, its arithmetic)
HAND = {
    "fp16": (240, "16 x 15"),
    "topk:3": (112, "3 fp32 values + 3 indices of 4 bits = 96 + 12, packed into 2 bytes: 96 + 16"),
    "ef:topk:3": (112, "as topk:3: error feedback sends the same format"),
    "qsgd:2:8": (112, "2 buckets of 8: 2 fp32 norms + 15 codes of 1 + ceil(log2 3) = 3 bits = 45, 6 bytes: 64 + 48"),
    "terngrad": (64, "1 fp32 scale + 15 ternary codes of 2 bits = 30, 4 bytes: 32 + 32"),
    "sign": (48, "1 fp32 scale + 15 sign bits, 2 bytes: 32 + 16"),
    "powersgd:2": (544, "w: rank min(2, 4, 3) = 2, P 4 x 2 and Q 3 x 2 in fp32 = 448; b 3 fp32 = 96"),
}


@pytest.mark.parametrize("spec", sorted(HAND))
def test_gradient_compressor_bits_by_hand(spec):
    method = gradient_compression(_loss, make_compressor(spec, 15))
    assert _uplink(method) == HAND[spec][0], HAND[spec][1]
    assert engine.downlink_bits_per_round(method, PARAMS) == 32 * 15  # the model, 480


def test_sgd_bits_by_hand():
    method = sgd(_loss)
    assert _uplink(method) == 32 * 15 == engine.downlink_bits_per_round(method, PARAMS)


def test_powersgd_as_published_bits_by_hand():
    """Up: P (4 x 2) and b (3), then Q_i (3 x 2): 32 x 17 = 544. Down: P^ (4 x 2), then Q (3 x 2) and
    the mean of b (3): 544; no model."""
    method = powersgd_allreduce(_loss, 2)
    state = method.init_node(PARAMS)
    message, state = method.node_message(jax.random.PRNGKey(0), PARAMS, BATCH, state)
    up = ledger.host_total(method.uplink_bits(message)["total"])
    stacked = jax.tree_util.tree_map(lambda a: a[None], message)
    total = lambda tree: jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), tree)
    learner = method.init_learner(PARAMS, 1)
    nodes = jax.tree_util.tree_map(lambda a: a[None], state)
    for exchange in method.exchanges:
        replies, learner = exchange.reply(PARAMS, stacked, learner, total)
        stacked, nodes = jax.vmap(exchange.answer, in_axes=(None, None, 0, 0))(jax.random.PRNGKey(0), PARAMS,
                                                                                  replies, nodes)
        up += ledger.host_total(exchange.answer_bits(jax.tree_util.tree_map(lambda a: a[0], stacked))["total"])
    assert up == 544
    assert engine.downlink_bits_per_round(method, PARAMS) == 544
