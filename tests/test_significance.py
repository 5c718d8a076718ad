"""Gaia's significance filter (Hsieh et al. 2017): the rule against a numpy transcription, the bits by
hand on a tiny model, what is refused, and training on digits against SGD."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdata import results as qresults
from qdata.codecs import ledger
from qdata.config import RunConfig, make_compressor
from qdata.methods import significance_filter
from qdata.run import train


def _loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y]


def _tiny():
    rng = np.random.default_rng(3)
    params = {"b": jnp.zeros(3), "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}  # d = 18
    batches = [{"x": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                "y": jnp.asarray(rng.integers(0, 3, size=4), jnp.int32)} for _ in range(3)]
    return params, batches


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("threshold,lr", [(0.01, 0.1), (0.5, 0.1), (2.0, 0.05)])
def test_rounds_follow_the_rule_and_bits_match_a_hand_count(threshold, lr):
    params, batches = _tiny()
    method = significance_filter(_loss, threshold, lr)
    state = method.init_node(params)
    node_message = jax.jit(method.node_message)
    w = _flat(params)
    acc = np.zeros(18)
    d, width = 18, 5  # ceil(log2 18) = 5 bits an index
    counts = []
    for batch in batches:
        g = _flat(jax.grad(lambda p: jnp.mean(_loss(p, batch["x"], batch["y"])))(params))
        acc = acc + g
        significant = lr * np.abs(acc) > threshold * np.abs(w)
        message, state = node_message(jax.random.PRNGKey(0), params, batch, state)
        m = int(significant.sum())
        counts.append(m)
        bits = {k: ledger.host_total(v) for k, v in method.uplink_bits(message).items()}
        # The count (one int32), m indices of 5 bits packed into bytes, m fp32 values.
        assert bits == {"count": 32, "indices": 8 * math.ceil(m * width / 8), "values": 32 * m,
                        "total": 32 + 8 * math.ceil(m * width / 8) + 32 * m}
        stacked = jax.tree_util.tree_map(lambda a: a[None], message)
        g_hat, _ = method.learner_gradient(params, stacked, ())
        np.testing.assert_allclose(_flat(g_hat), np.where(significant, acc, 0.0), rtol=1e-5, atol=1e-7)
        acc = np.where(significant, 0.0, acc)
        np.testing.assert_allclose(np.asarray(state.accumulated), acc, rtol=1e-5, atol=1e-7)
    assert counts[0] >= 3  # the zero biases are significant from the first round
    if threshold >= 0.5:
        assert max(counts) < d  # and at these thresholds some weights wait


def test_nothing_is_lost_what_is_sent_plus_the_accumulator_is_every_gradient():
    params, batches = _tiny()
    method = significance_filter(_loss, 1.0, 0.1)
    state, sent, total = method.init_node(params), np.zeros(18), np.zeros(18)
    for batch in batches * 3:
        total += _flat(jax.grad(lambda p: jnp.mean(_loss(p, batch["x"], batch["y"])))(params))
        message, state = method.node_message(jax.random.PRNGKey(0), params, batch, state)
        sent += _flat(method.learner_gradient(params, jax.tree_util.tree_map(lambda a: a[None], message), ())[0])
    np.testing.assert_allclose(sent + np.asarray(state.accumulated), total, rtol=1e-5, atol=1e-6)
    assert np.any(np.asarray(state.accumulated) != 0)  # some of it is still waiting at the node


@pytest.mark.parametrize("bad", [0, -0.01, math.nan, math.inf, True, "0.01"])
def test_bad_threshold_or_learning_rate_is_refused(bad):
    with pytest.raises(ValueError, match="threshold"):
        significance_filter(_loss, bad, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        significance_filter(_loss, 0.01, bad)


@pytest.mark.parametrize("kwargs,named", [
    (dict(compressor="significance:0"), "threshold"),
    (dict(compressor="significance:x"), "threshold"),
    (dict(compressor="significance"), "significance:S"),
    (dict(compressor="ef:significance:0.01"), "error feedback"),
    (dict(compressor="significance:0.01", error_feedback=True), "error feedback"),
])
def test_bad_specs_are_refused(kwargs, named):
    with pytest.raises(ValueError, match=named):
        RunConfig(method="gradient", **kwargs)


def test_it_is_a_method_not_a_correction():
    with pytest.raises(ValueError, match="is a method"):
        RunConfig(method="qdata", correction="significance:0.01")
    with pytest.raises(ValueError, match="is a method"):
        make_compressor("significance:0.01", 100)


def test_trains_on_digits_close_to_sgd_with_fewer_bits(tmp_path):
    common = dict(dataset="digits", model="mlp:64", num_nodes=4, batch_size=32, rounds=80, eval_every=40,
                  checkpoint_every=0, lr=0.1)
    sgd = train(RunConfig(method="sgd", **common), tmp_path / "sgd")
    sig = train(RunConfig(method="gradient", compressor="significance:0.05", **common), tmp_path / "sig")
    header, rounds = qresults.load(tmp_path / "sig")
    d = header["model"]["params"]
    assert header["method"] == "significance:0.05"
    assert header["downlink_bits_per_node_per_round"] == 32 * d  # the nodes need the model
    assert sig["test_accuracy"] >= sgd["test_accuracy"] - 0.03, (sig["test_accuracy"], sgd["test_accuracy"])
    assert sig["cumulative_uplink_bits_per_node"] < 0.25 * sgd["cumulative_uplink_bits_per_node"]
    parts = rounds[-1]["cumulative_uplink_bits"]
    assert parts["total"] == parts["count"] + parts["indices"] + parts["values"]
    assert parts["count"] == 32 * 4 * 80
