"""Streaming nodes draw only the samples that have arrived: the sample ids every node draws in every
round, read off the messages of a method that sends them, against the arrival schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qdata import data, engine
from qdata.codecs.ledger import Bits
from qdata.methods import Method


def _id_method() -> Method:
    """A real method whose message is the minibatch's sample ids and positions (its learner
    does nothing): what the nodes drew, exactly as the engine handed it to them."""
    return Method("ids", lambda p: (), lambda p, n: (),
                  lambda key, params, batch, state: ({"id": batch["id"], "pos": batch["pos"]}, state),
                  lambda params, messages, state: (jax.tree_util.tree_map(jnp.zeros_like, params), state),
                  lambda m: {"total": Bits.of(32 * m["id"].size)}, needs_params=False)


def test_nodes_draw_only_arrived_samples_each_round():
    rng = np.random.default_rng(0)
    indices = [rng.permutation(60)[:40], rng.permutation(np.arange(60, 120))[:30]]
    index, count = data.stack_nodes(indices)
    x, y = np.zeros((120, 2), np.float32), np.zeros(120, np.int32)
    mesh = engine.node_mesh(1)
    shards = engine.place_shards(mesh, x, y, index, count)
    method, opt = _id_method(), optax.sgd(0.1)
    params = {"w": jnp.zeros(2)}
    state = engine.place_state(mesh, engine.init_state(method, opt, params, 2, seed=0))
    available = functools.partial(data.available_counts, start_fraction=0.1, arrival_rounds=20)
    seen = []

    # The round's own node phase (the function make_round compiles first), to read its messages.
    nodes, _, _ = engine._round_phases(method, opt, 16, available, None, "auto")
    by_node = jax.sharding.PartitionSpec(engine.AXIS)
    node_phase = jax.jit(jax.shard_map(nodes, mesh=mesh, in_specs=(engine.state_specs(state), by_node),
                                       out_specs=by_node))
    one_round = engine.make_round(method, opt, mesh, batch_size=16, state_template=state, available=available)
    table = data.streaming_counts(count, 30, start_fraction=0.1, arrival_rounds=20)
    for t in range(30):
        messages, _, _, _ = node_phase(state, shards)
        ids, pos = np.asarray(messages["id"]), np.asarray(messages["pos"])
        for i in range(2):
            arrived = set(index[i, : table[t, i]].tolist())
            assert set(ids[i].tolist()) <= arrived, (t, i)
            np.testing.assert_array_equal(ids[i], index[i, pos[i]])
        seen.append(pos.max(axis=1))
        state, _, _ = one_round(state, shards)
    assert int(engine.fetch(state.round)) == 30
    seen = np.array(seen)
    # Not vacuous: round 0 stays within the first 10% (4 and 3 samples), the last rounds reach far beyond.
    assert (seen[0] < table[0]).all() and (seen[-5:].max(axis=0) >= np.array([30, 20])).all()
