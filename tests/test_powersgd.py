"""PowerSGD as published (Vogels et al. 2019): one round against a numpy transcription of the
paper's Algorithms 1-2, its bits both ways by hand, the engine's replies across devices, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdata import engine
from qdata.codecs import ledger
from qdata.config import RunConfig, make_compressor
from qdata.methods import powersgd_allreduce
from tests.subprocess_json import run_json


def _loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y]


def _drive(method, params, batches, rounds):
    """The round by hand, one device: messages, each reply and its answers, the learner's g."""
    node_states = jax.vmap(lambda _: method.init_node(params))(jnp.arange(len(batches[0]["y"])))
    learner_state = method.init_learner(params, len(batches[0]["y"]))
    total = lambda tree: jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), tree)
    key = jax.random.PRNGKey(0)
    grads, up = [], []
    for batch in batches[:rounds]:
        messages, node_states = jax.vmap(method.node_message, in_axes=(None, None, 0, 0))(key, params, batch, node_states)
        bits = [int(ledger.host_total(method.uplink_bits(jax.tree_util.tree_map(lambda a: a[0], messages))["total"]))]
        for exchange in method.exchanges:
            replies, learner_state = exchange.reply(params, messages, learner_state, total)
            messages, node_states = jax.vmap(exchange.answer, in_axes=(None, None, 0, 0))(key, params, replies, node_states)
            one = jax.tree_util.tree_map(lambda a: a[0], messages)
            bits.append(int(ledger.host_total(exchange.answer_bits(one)["total"])))
        g, learner_state = method.learner_gradient(params, messages, learner_state)
        grads.append(g)
        up.append(sum(bits))
    return grads, up


def _reference(params, batches, q0, rank, error_feedback=True):
    """Algorithms 1-2 of the paper in float64 numpy: P = sum_i M_i Q, P^ = orth(P),
    Q = mean_i M_i^T P^, update P^ Q^T; e_i = M_i - P^ Q_i^T; the bias averaged exactly."""
    nodes = len(batches[0]["y"])
    e = [np.zeros(params["w"].shape) for _ in range(nodes)]
    q = np.asarray(q0, np.float64)
    out = []
    for batch in batches:
        g = [jax.grad(lambda p: jnp.mean(_loss(p, batch["x"][i], batch["y"][i])))(params) for i in range(nodes)]
        m = [np.asarray(g[i]["w"], np.float64) + e[i] for i in range(nodes)]
        p_hat, _ = np.linalg.qr(sum(mi @ q for mi in m))
        qs = [mi.T @ p_hat for mi in m]
        q = sum(qs) / nodes
        if error_feedback:
            e = [mi - p_hat @ qi.T for mi, qi in zip(m, qs)]
        out.append({"w": p_hat @ q.T, "b": np.mean([np.asarray(gi["b"]) for gi in g], axis=0)})
    return out


def _batches(rounds, nodes=3, b=5, n=4, classes=3):
    rng = np.random.default_rng(0)
    return [{"x": jnp.asarray(rng.normal(size=(nodes, b, n)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, classes, size=(nodes, b)), jnp.int32)} for _ in range(rounds)]


@pytest.mark.parametrize("error_feedback", [True, False])
def test_rounds_follow_the_published_algorithm(error_feedback):
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    method = powersgd_allreduce(_loss, 2, error_feedback=error_feedback)
    batches = _batches(3)
    grads, up = _drive(method, params, batches, 3)
    q0 = method.init_node(params).q[0]
    for got, want in zip(grads, _reference(params, batches, q0, 2, error_feedback)):
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["b"], want["b"], rtol=1e-5, atol=1e-7)
    # By hand, w is 4 x 3 (r = 2), b has 3 entries: up P (4 x 2) + b (3) in fp32, then Q_i (3 x 2);
    # down P^ (4 x 2), then Q (3 x 2) and the mean of b.
    assert up == [32 * (8 + 3 + 6)] * 3
    assert engine.downlink_bits_per_round(method, params) == 32 * (8 + 6 + 3)


def test_the_update_is_the_rank_r_projection_when_nodes_agree():
    """Every node holding the same M: the update is P^ P^T M, the one-step power iteration of M."""
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    batch = _batches(1, nodes=1)[0]
    same = {k: jnp.repeat(v, 2, axis=0) for k, v in batch.items()}
    (g,), _ = _drive(powersgd_allreduce(_loss, 1), params, [same], 1)
    m = np.asarray(jax.grad(lambda p: jnp.mean(_loss(p, batch["x"][0], batch["y"][0])))(params)["w"])
    q0 = np.asarray(powersgd_allreduce(_loss, 1).init_node(params).q[0])
    p_hat = np.linalg.qr(m @ q0)[0]
    np.testing.assert_allclose(g["w"], p_hat @ p_hat.T @ m, rtol=1e-4, atol=1e-6)


def test_is_a_method_not_a_compressor():
    with pytest.raises(ValueError, match="method"):
        make_compressor("powersgd_allreduce:2", 100)
    with pytest.raises(ValueError, match="method"):
        make_compressor("ef:powersgd_allreduce:2", 100)


_DEVICES_SCRIPT = r"""
import os, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
from qdata import engine
from qdata.config import RunConfig
from qdata.run import Experiment
cfg = RunConfig(method="gradient", compressor="powersgd_allreduce:2", error_feedback=True, num_nodes=4,
                batch_size=8, lr=0.1)
exp = Experiment(cfg)
shards_of, out = {}, {}
for devices in (1, 4):
    mesh = engine.node_mesh(devices)
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    state = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params, 4, 0))
    one = engine.make_round(exp.method, exp.optimizer, mesh, batch_size=8, state_template=state,
                            to_float=exp.dataset.to_float)
    state, bits, _ = engine.run_rounds(one, state, shards, 3)
    out[devices] = {"params": [np.asarray(p).tolist() for p in jax.tree_util.tree_leaves(engine.fetch(state.params))],
                    "bits": np.asarray(bits["total"]).tolist()}
    if devices == 4:
        phases = engine.time_phases(exp.method, exp.optimizer, mesh, state, shards, batch_size=8, repeats=1,
                                    to_float=exp.dataset.to_float)
        out["phases"] = sorted(phases)
print(json.dumps(out))
"""


def test_four_devices_equal_one_device():
    """The replies' sums run across devices (the learner's own reduction): 4 devices train as 1."""
    out = run_json(_DEVICES_SCRIPT)
    one, four = out["1"], out["4"]
    assert one["bits"] == four["bits"]
    for a, b in zip(one["params"], four["params"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert out["phases"] == ["learner_seconds", "node_seconds"]


def test_trains_on_digits(tmp_path):
    from qdata.run import train

    config = RunConfig(method="gradient", compressor="powersgd_allreduce:2", error_feedback=True, num_nodes=4,
                       batch_size=32, rounds=60, eval_every=60, checkpoint_every=0, lr=0.1, momentum=0.9)
    last = train(config, tmp_path / "run")
    assert last["test_accuracy"] > 0.85
    header = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert header["method"] == "powersgd_allreduce:2"
    assert header["downlink_bits_per_node_per_round"] == last["uplink_bits_last_round_per_node"]["total"]
