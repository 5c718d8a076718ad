"""The round loop: nodes simulated with ``vmap``, spread over devices with ``shard_map``, hosts with
``jax.distributed``.

One program serves every scale. The N nodes are laid along a 1-D device mesh axis ``'nodes'``
(N/D nodes per device, ``vmap`` within a device); a mesh of one device is the single-device
simulation. Each round, inside ``shard_map``:

1. every node draws its minibatch from its own shard of the training set and computes its message
   (``method.node_message``), and its exact uplink bits (``method.uplink_bits``);
2. the messages (the packed payloads: codes in bytes or uint32 words, fp16 weights, ...) are
   ``all_gather``-ed over the mesh axis, so the collective moves the compressed bytes and nothing else;
3. the learner, replicated on every device, turns the N messages into g (``method.learner_gradient``)
   and applies the optax update.

Several rounds run inside one compiled ``lax.scan``. Over several processes the same program runs
after :func:`initialize_distributed` (gloo collectives on CPU); the mesh then spans every process's
devices. Keys are derived from (seed, round, global node index), so the result does not depend on
how nodes are placed on devices.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qdata.codecs.base import Payload
from qdata.data import sample_batch
from qdata.methods.base import Method

PyTree = Any
AXIS = "nodes"


class TrainState(NamedTuple):
    """Everything a run carries from round to round (all arrays; checkpointed as is)."""

    params: PyTree
    opt_state: PyTree
    node_states: PyTree  # leading axis: nodes
    learner_state: PyTree
    key: jax.Array  # raw uint32[2] key
    round: jax.Array  # int32 scalar: rounds done


def node_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``'nodes'`` over the first ``num_devices`` global devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in 1..{len(devices)} (devices visible), got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           local_device_count: int | None = None) -> None:
    """Join a multi-process run (one call per process, before any other JAX work).

    On CPU the cross-process collectives go over gloo. ``local_device_count`` forces that many
    CPU devices in this process (it sets ``jax_num_cpu_devices``).
    """
    # Must run before the backend starts; the setting only concerns CPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def put(mesh: Mesh, tree: PyTree, spec: P) -> PyTree:
    """Place host values on the mesh as global arrays (works across processes: every process passes
    the same full value and keeps the pieces its devices hold)."""
    sharding = NamedSharding(mesh, spec)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(one, tree)


def fetch(tree: PyTree) -> PyTree:
    """Bring (replicated or sharded) global arrays back to this host as numpy."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def init_state(method: Method, optimizer: optax.GradientTransformation, params: PyTree,
               num_nodes: int, seed: int) -> TrainState:
    """The state before round 0 (host values; :func:`place_state` puts it on a mesh)."""
    node_state = method.init_node(params)
    node_states = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_nodes,) + jnp.shape(a)), node_state)
    return TrainState(params=params, opt_state=optimizer.init(params), node_states=node_states,
                      learner_state=method.init_learner(params, num_nodes), key=jax.random.PRNGKey(seed),
                      round=jnp.zeros((), jnp.int32))


def state_specs(state: TrainState) -> TrainState:
    """Partition specs: node states split over the mesh axis, everything else replicated."""
    rep = lambda t: jax.tree_util.tree_map(lambda _: P(), t)
    return TrainState(params=rep(state.params), opt_state=rep(state.opt_state),
                      node_states=jax.tree_util.tree_map(lambda _: P(AXIS), state.node_states),
                      learner_state=rep(state.learner_state), key=P(), round=P())


def place_state(mesh: Mesh, state: TrainState) -> TrainState:
    specs = state_specs(state)
    return jax.tree_util.tree_map(lambda x, s: put(mesh, x, s), state, specs,
                                  is_leaf=lambda x: isinstance(x, P))


def make_rounds(method: Method, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                batch_size: int, num_rounds: int, state_template: TrainState,
                available: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
    """Compile ``num_rounds`` rounds of ``method`` into one function.

    Args:
      available: for streaming nodes, ``available(counts, round) -> counts_now``: how many of each
        node's samples have arrived (see :func:`qdata.data.available_counts`); nodes draw only among
        those. None: all data is there from the start.

    Returns:
      ``run(state, index, count, x_train, y_train) -> (state, bits, diagnostics)`` where ``bits`` is
      a dict of int32 arrays of shape (num_rounds, N): each node's exact uplink bits per round, part
      by part; ``diagnostics`` likewise holds the encoders' local counts (e.g. ``clipped`` values).
    """
    specs = state_specs(state_template)

    def body(state: TrainState, index, count, x_train, y_train):
        n_local = index.shape[0]
        first = jax.lax.axis_index(AXIS) * n_local
        node_ids = first + jnp.arange(n_local)

        def one_round(carry, _):
            params, opt_state, node_states, learner_state, key, rnd = carry
            round_key = jax.random.fold_in(key, rnd)
            node_keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(node_ids)
            # Each device's nodes hold their own copy of w: without this cast, jax.grad inside
            # shard_map would sum the nodes' gradients over devices (the transpose of a broadcast).
            node_params = jax.lax.pcast(params, (AXIS,), to="varying")

            def one_node(k, rows, n_rows, node_state):
                k_batch, k_message = jax.random.split(k)
                ids, pos = sample_batch(k_batch, rows, n_rows, batch_size)
                batch = {"x": x_train[ids], "y": y_train[ids], "id": ids, "pos": pos}
                message, node_state = method.node_message(k_message, node_params, batch, node_state)
                message, diagnostics = split_diagnostics(message)
                return message, node_state, method.uplink_bits(message), diagnostics

            count_now = count if available is None else available(count, rnd)
            messages, node_states, bits, diagnostics = jax.vmap(one_node)(node_keys, index, count_now, node_states)
            # What crosses between devices (and hosts) is the packed payload, nothing larger; the
            # ledger's counts and the encoders' diagnostics are gathered beside it for the report.
            messages = jax.lax.all_gather(messages, AXIS, tiled=True, to="invarying")
            bits, diagnostics = jax.lax.all_gather((bits, diagnostics), AXIS, tiled=True, to="invarying")
            grads, learner_state = method.learner_gradient(params, messages, learner_state)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, node_states, learner_state, key, rnd + 1), (bits, diagnostics)

        carry = (state.params, state.opt_state, state.node_states, state.learner_state, state.key, state.round)
        carry, (bits, diagnostics) = jax.lax.scan(one_round, carry, None, length=num_rounds)
        return TrainState(*carry), bits, diagnostics

    sharded = jax.shard_map(
        body, mesh=mesh,
        in_specs=(specs, P(AXIS), P(AXIS), P(), P()),
        out_specs=(specs, P(), P()),
    )
    return jax.jit(sharded, donate_argnums=(0,))


def split_diagnostics(message: PyTree) -> tuple[PyTree, dict]:
    """Take the encoders' local diagnostics (``Payload.info``: e.g. how many values were clipped) out
    of a message, so they never cross a link, and sum them by name (int32)."""
    totals: dict = {}

    def strip(node):
        if isinstance(node, Payload):
            for name, value in node.info.items():
                totals[name] = totals.get(name, 0) + jnp.sum(jnp.asarray(value, jnp.int32))
            return node.replace(info={})
        return node

    message = jax.tree_util.tree_map(strip, message, is_leaf=lambda n: isinstance(n, Payload))
    return message, totals


def check_nodes_fit(num_nodes: int, mesh: Mesh) -> None:
    d = mesh.devices.size
    if num_nodes % d:
        raise ValueError(f"num_nodes={num_nodes} must be a multiple of the number of devices ({d})")


def downlink_bits_per_round(method: Method, params: PyTree) -> int:
    """Bits of the model broadcast to one node in one round: 32*d if the node needs the model."""
    if not method.needs_params:
        return 0
    return 32 * int(sum(math.prod(jnp.shape(p)) for p in jax.tree_util.tree_leaves(params)))
