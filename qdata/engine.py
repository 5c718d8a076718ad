"""The round: nodes simulated on devices with ``shard_map``, hosts with ``jax.distributed``.

One program serves every scale. The N nodes are laid along a 1-D device mesh axis ``'nodes'``
(N/D nodes per device); a mesh of one device is the single-device simulation. Each device holds
only its own nodes' data (in the source dtype, e.g. uint8 pixels), their node states, and the
learner's share that serves them (e.g. its cache of their samples). One round, inside ``shard_map``:

1. every node draws its minibatch from its own shard and computes its message
   (``method.node_message``) and its exact uplink bits (``method.uplink_bits``);
2. the messages (the packed payloads: codes in bytes or uint32 words, fp16 weights, ...) are handed
   to the learner's share on the same device: what the ledger counts is exactly this payload;
3. the learner, data-parallel over the devices, turns its share of the messages into its share of
   g (``method.learner_gradient``), the shares are averaged by a ``pmean`` of the d-sized gradient
   (the learner's own data parallelism, inside the learner, not a link, not charged), and every
   device applies the same optax update.

Rounds are driven from the host, one compiled round per call (:func:`make_round`): on XLA:CPU a
round inside a ``lax.scan`` runs 7-14x slower than the same round called from the host (the loop
body loses XLA:CPU's fast convolution and copy paths; measured in ``experiments/bench_step.py``),
and on an accelerator the host loop costs one asynchronous dispatch a round. Within a device the
nodes are either ``vmap``-ed or unrolled (``node_map``): ``vmap`` turns N per-node convolution
gradients into one grouped convolution, which XLA:CPU runs 2-3x slower than N plain ones, so on CPU
a convolutional model's nodes are unrolled (up to :data:`UNROLL_MAX` of them a device; beyond
that compile time grows), a dense model's stay ``vmap``-ed (:func:`unrolls_nodes`).

Over several processes the same program runs after :func:`initialize_distributed` (gloo
collectives on CPU); the mesh then spans every process's devices. Keys are derived from (seed,
round, global node index), so results do not depend on how nodes are placed on devices.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qdata import faults as qfaults
from qdata import integrity as qintegrity
from qdata.codecs.base import Payload
from qdata.data import sample_batch
from qdata.methods.base import Method

PyTree = Any
AXIS = "nodes"
NODE_MAPS = ("auto", "vmap", "unroll")
UNROLL_MAX = 16  # most nodes per device that "auto" unrolls on CPU
LINK_COUNTS = ("answered", "rejected")  # the learner's per-node counts of a round with a Link
REPLY_BITS = "reply_bits"  # diagnostics key: each node's replies' bits this round, when they vary by round


class TrainState(NamedTuple):
    """Everything a run carries from round to round (all arrays; checkpointed as is)."""

    params: PyTree
    opt_state: PyTree
    node_states: PyTree  # leading axis: nodes
    learner_state: PyTree  # leading axis: nodes (the learner's share serving each node)
    key: jax.Array  # raw uint32[2] key
    round: jax.Array  # int32 scalar: rounds done


class NodeShards(NamedTuple):
    """Each node's training data as a padded rectangle, sharded over the mesh by node.

    Attributes:
      x: (N, L, *sample_shape) samples in the dataset's source dtype (uint8 pixels stay uint8);
        ``x[i, :count[i]]`` are node i's samples in arrival order, the padding repeats its first one.
      y: (N, L) int32 labels.
      index: (N, L) int32 rows of the training set (the sample ids).
      count: (N,) int32 samples per node.
    """

    x: Any
    y: Any
    index: Any
    count: Any


def node_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``'nodes'`` over the first ``num_devices`` global devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in 1..{len(devices)} (devices visible), got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           local_device_count: int | None = None, heartbeat_seconds: int = 100) -> None:
    """Join a multi-process run (one call per process, before any other JAX work).

    On CPU the cross-process collectives go over gloo. ``local_device_count`` forces that many
    CPU devices in this process (it sets ``jax_num_cpu_devices``). ``heartbeat_seconds``: JAX's own
    timeout for a silent peer, after which it aborts the process (:mod:`qdata.peers` words the
    error before that).
    """
    # Must run before the backend starts; the setting only concerns CPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_seconds)


def put(mesh: Mesh, tree: PyTree, spec: P) -> PyTree:
    """Place host values on the mesh as global arrays (works across processes: every process passes
    the same full value and keeps the pieces its devices hold)."""
    sharding = NamedSharding(mesh, spec)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(one, tree)


def place_shards(mesh: Mesh, x_train, y_train, index, count) -> NodeShards:
    """Put each node's samples on the device that simulates it, and only there.

    Args:
      x_train, y_train: the training set on the host, x in its source dtype.
      index, count: the partition as :func:`qdata.data.stack_nodes` gives it.

    Each device (and each process) gathers only the rows of its own nodes: no device holds the
    whole training set, and no float copy of it is made.
    """
    index, count = np.asarray(index, np.int32), np.asarray(count, np.int32)
    sharding = NamedSharding(mesh, P(AXIS))

    def by_node(source):
        shape = index.shape + source.shape[1:]
        return jax.make_array_from_callback(shape, sharding, lambda idx: source[index[idx[:2]]])

    return NodeShards(x=by_node(np.asarray(x_train)), y=by_node(np.asarray(y_train, np.int32)),
                      index=put(mesh, index, P(AXIS)), count=put(mesh, count, P(AXIS)))


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
    held = params if method.learner_params is None else method.learner_params(params)  # the learner's part
    return TrainState(params=held, opt_state=optimizer.init(held), node_states=node_states,
                      learner_state=method.init_learner(params, num_nodes), key=jax.random.PRNGKey(seed),
                      round=jnp.zeros((), jnp.int32))


def model_params(method: Method, state: TrainState) -> PyTree:
    """The model the run evaluates: the learner's parameters, or, for a method whose nodes hold part
    of the model (split learning), the model it composes (``method.model_params``)."""
    if method.model_params is None:
        return state.params
    return jax.jit(method.model_params)(state.params, state.learner_state, state.node_states)


def fit_nodes(method: Method, mesh: Mesh, state: TrainState, shards: NodeShards, *, to_float=None,
              node_map: str = "auto") -> TrainState:
    """``state`` with each node's state fitted on its own shard (``method.fit_node``, e.g. a transform
    code's setup; unchanged when the method has none), inside ``shard_map`` as the round is: each
    device fits its own nodes, ``vmap``-ed or unrolled (:func:`unrolls_nodes`)."""
    if method.fit_node is None:
        return state
    to_float = to_float or (lambda x: x.astype(jnp.float32))
    specs = state_specs(state).node_states

    def fit(node_states, shards: NodeShards):
        one = lambda x, y, n, s: method.fit_node(s, {"x": to_float(x), "y": y}, n)
        args = (shards.x, shards.y, shards.count, node_states)
        return _map_nodes(one, args, unrolls_nodes(node_map, shards.count.shape[0], state.params))

    sharded = jax.shard_map(fit, mesh=mesh, in_specs=(specs, P(AXIS)), out_specs=specs)
    return state._replace(node_states=jax.jit(sharded)(state.node_states, shards))


def state_specs(state: TrainState) -> TrainState:
    """Partition specs: node states and the learner's per-node shares split over the mesh axis, the
    model, the optimizer state, the key and the round counter replicated."""
    rep = lambda t: jax.tree_util.tree_map(lambda _: P(), t)
    by_node = lambda t: jax.tree_util.tree_map(lambda _: P(AXIS), t)
    return TrainState(params=rep(state.params), opt_state=rep(state.opt_state),
                      node_states=by_node(state.node_states), learner_state=by_node(state.learner_state),
                      key=P(), round=P())


def place_state(mesh: Mesh, state: TrainState) -> TrainState:
    specs = state_specs(state)
    return jax.tree_util.tree_map(lambda x, s: put(mesh, x, s), state, specs,
                                  is_leaf=lambda x: isinstance(x, P))


def unrolls_nodes(node_map: str, nodes_per_device: int, params: PyTree = None) -> bool:
    """Whether a device's nodes are unrolled (True) or ``vmap``-ed (False); see the module docstring.

    ``"auto"`` unrolls on CPU, for a convolutional model (a parameter of 3 or more axes: a kernel),
    up to :data:`UNROLL_MAX` nodes a device. Dense models stay ``vmap``-ed: their batched matmuls are
    fast, and unrolled SGD nodes of the digits MLP measured 2x slower a round (13 ms against 7 ms).
    """
    if node_map not in NODE_MAPS:
        raise ValueError(f"node_map must be one of {NODE_MAPS}, got {node_map!r}")
    if node_map == "auto":
        convolutional = any(jnp.ndim(p) >= 3 for p in jax.tree_util.tree_leaves(params))
        return jax.default_backend() == "cpu" and convolutional and nodes_per_device <= UNROLL_MAX
    return node_map == "unroll"


def _map_nodes(fn: Callable, args: tuple, unroll: bool):
    """``fn`` over the leading (node) axis of ``args``: ``vmap``, or one call per node, stacked."""
    if not unroll:
        return jax.vmap(fn)(*args)
    count = jax.tree_util.tree_leaves(args)[0].shape[0]
    outs = [fn(*jax.tree_util.tree_map(lambda a: a[i], args)) for i in range(count)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)


def _node_ids(n_local: int) -> jax.Array:
    """The global indices of this device's nodes."""
    return jax.lax.axis_index(AXIS) * n_local + jnp.arange(n_local)


def _node_keys(state: TrainState, n_local: int, step: int) -> jax.Array:
    """This device's nodes' keys for message ``step`` of the round (0: the first message), derived
    from (seed, round, global node index) so they do not depend on the placement."""
    node_ids = _node_ids(n_local)
    round_key = jax.random.fold_in(state.key, state.round)
    if step:  # folded with a value no node index takes (indices count up from 0)
        round_key = jax.random.fold_in(round_key, 2**32 - step)
    return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(node_ids)


def _varying_params(state: TrainState):
    # Each node (and learner share) holds its own copy of w: without this cast, jax.grad inside
    # shard_map would sum the gradients over devices (the transpose of a broadcast).
    return jax.lax.pcast(state.params, (AXIS,), to="varying")


def _sum_over_nodes(tree: PyTree) -> PyTree:
    """Sum a per-node tree (leading axis: this device's nodes) over all nodes of the mesh."""
    return jax.lax.psum(jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), tree), AXIS)


def _sum_over_answers(answered: jax.Array):
    """:func:`_sum_over_nodes` over the nodes whose messages the learner took (``answered``, this
    device's nodes): a missing node's slot counts as zero, so ``total(ones)`` counts the answers."""
    def total(tree: PyTree) -> PyTree:
        return _sum_over_nodes(jax.tree_util.tree_map(lambda a: _where_nodes(answered, a, jnp.zeros_like(a)), tree))
    return total


def _where_nodes(mask: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per node (leading axis), ``new`` where ``mask`` else ``old``."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b),
                                  new, old)


def _exchange_phases(method: Method, node_map: str):
    """Per :class:`~qdata.methods.base.Exchange`, its learner step ``reply(state, messages, answered=None)
    -> (replies, state)`` (with ``answered``, over the answering nodes only) and its node step
    ``answer(state, replies) -> (messages, state, bits)``."""
    steps = []
    for step, exchange in enumerate(method.exchanges, start=1):
        def reply(state: TrainState, messages, answered=None, exchange=exchange):
            total = _sum_over_nodes if answered is None else _sum_over_answers(answered)
            replies, learner_state = exchange.reply(_varying_params(state), messages, state.learner_state, total)
            return replies, state._replace(learner_state=learner_state)

        def answer(state: TrainState, replies, exchange=exchange, step=step):
            n_local = jax.tree_util.tree_leaves(state.node_states)[0].shape[0]
            params = _varying_params(state)

            def one_node(k, reply, node_state):
                message, node_state = exchange.answer(k, params, reply, node_state)
                message, _ = split_diagnostics(message)  # local diagnostics never cross the link
                return message, node_state, exchange.answer_bits(message)

            args = (_node_keys(state, n_local, step), replies, state.node_states)
            messages, node_states, bits = _map_nodes(one_node, args, unrolls_nodes(node_map, n_local, state.params))
            return messages, state._replace(node_states=node_states), bits

        steps.append((reply, answer))
    return steps


def _round_phases(method: Method, optimizer: optax.GradientTransformation, batch_size: int,
                  available, to_float, node_map: str):
    """The round's phases as functions of one device's share (inside ``shard_map``).

    ``nodes(state, shards) -> (messages, node_states, bits, diagnostics)``: step 1, every local
    node's message. ``exchanges``: the learner's replies and the nodes' answers within the round
    (:func:`_exchange_phases`). ``learner(state, messages, node_states) -> state``: steps 2-3, the
    learner's share of g, its ``pmean`` over devices, the optax update.
    """
    to_float = to_float or (lambda x: x.astype(jnp.float32))

    def nodes(state: TrainState, shards: NodeShards):
        n_local = shards.count.shape[0]
        params = _varying_params(state)
        count = shards.count if available is None else available(shards.count, state.round)

        def one_node(k, node_id, x, y, index, n, node_state):
            k_batch, k_message = jax.random.split(k)
            ids, pos = sample_batch(k_batch, index, n, batch_size)
            batch = {"x": to_float(x[pos]), "y": y[pos], "id": ids, "pos": pos, "node": node_id, "round": state.round}
            message, node_state = method.node_message(k_message, params, batch, node_state)
            message, diagnostics = split_diagnostics(message)
            return message, node_state, method.uplink_bits(message), diagnostics

        args = (_node_keys(state, n_local, 0), _node_ids(n_local), shards.x, shards.y, shards.index, count,
                state.node_states)
        return _map_nodes(one_node, args, unrolls_nodes(node_map, n_local, state.params))

    def learner(state: TrainState, messages, node_states):
        # The payloads go to the learner's share on this device; its gradient shares are averaged
        # over the devices (equal node counts per device, so this is the mean over nodes).
        grads, learner_state = method.learner_gradient(_varying_params(state), messages, state.learner_state)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, node_states, learner_state, state.key, state.round + 1)

    return nodes, _exchange_phases(method, node_map), learner


class Link(NamedTuple):
    """What happens between the nodes and the learner (issue 12): the fault schedule
    (:mod:`qdata.faults`) and whether every message is sealed and checked (:mod:`qdata.integrity`)."""

    faults: qfaults.FaultSchedule = qfaults.FaultSchedule()
    integrity: bool = False

    @property
    def on(self) -> bool:
        return bool(self.faults.rules) or self.integrity


def _transmit(link: Link, name: str, state: TrainState, messages, bits: dict, sending, bits_of):
    """This device's nodes' messages across the link: sealed (with integrity), damaged as the fault
    schedule says, checked at the learner. Returns ``(messages, bits, ok)``: the messages as
    received, the bits charged (the header's part ``'integrity'`` added; nothing for a node that
    does not send) and whether the learner accepts each message."""
    node_ids = _node_ids(sending.shape[0])

    def one(message, node_bits, node_id):
        if not jax.tree_util.tree_leaves(message):  # an empty answer: nothing crosses
            return message, node_bits, jnp.bool_(True)
        if not link.integrity:
            message, _ = qfaults.damage(link.faults, state.key, state.round, node_id, message, jnp.uint32(0))
            return message, node_bits, jnp.bool_(True)
        ident = qintegrity.identity(message, name)
        sealed = qintegrity.seal(message, ident, node_bits["total"])
        (header, body), arrived = qfaults.damage(link.faults, state.key, state.round, node_id,
                                                 (sealed.header, sealed.body), sealed.arrived)
        ok = qintegrity.verify(qintegrity.Sealed(header, body, arrived), ident, lambda m: bits_of(m)["total"])
        head = qintegrity.header_bits(sealed)
        return body, {**node_bits, "integrity": head, "total": node_bits["total"] + head}, ok

    messages, bits, ok = jax.vmap(one)(messages, bits, node_ids)
    bits = jax.tree_util.tree_map(lambda c: jnp.where(sending, c, jnp.zeros_like(c)), bits)
    return messages, bits, ok


def _masked_learner(method: Method, optimizer: optax.GradientTransformation, node_map: str):
    """Steps 2-3 over the answering nodes only: ``learner(state, messages, node_states, answered)``.

    The method's ``learner_gradient`` is taken node by node (its g is a mean over nodes of per-node
    terms, :mod:`qdata.methods.base`), and g is their mean over the nodes that answered, across
    devices: unbiased over the data present. A missing node's learner state is kept; with no answer
    at all the model and the optimizer state stay as they were."""

    def learner(state: TrainState, messages, node_states, answered):
        params = _varying_params(state)

        def one(message, learner_state):
            alone = lambda t: jax.tree_util.tree_map(lambda a: a[None], t)
            g, learner_state = method.learner_gradient(params, alone(message), alone(learner_state))
            return g, jax.tree_util.tree_map(lambda a: a[0], learner_state)

        args = (messages, state.learner_state)
        grads, learner_state = _map_nodes(one, args, unrolls_nodes(node_map, answered.shape[0], state.params))
        count = jax.lax.psum(jnp.sum(answered, dtype=jnp.int32), AXIS)
        total = _sum_over_answers(answered)(grads)
        grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1).astype(g.dtype), total)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        took = count > 0
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(took, a, b), new, old)
        params = keep(optax.apply_updates(state.params, updates), state.params)
        learner_state = _where_nodes(answered, learner_state, state.learner_state)
        return TrainState(params, keep(opt_state, state.opt_state), node_states, learner_state, state.key,
                          state.round + 1)

    return learner


def _faulty_body(method: Method, optimizer, node_map: str, link: Link, nodes, exchanges):
    """The round of :func:`make_round` with a :class:`Link`: who sends (the fault schedule), what
    arrives and passes the checks, and the learner over the answers. A node that does not send, or
    whose message is rejected, keeps its state of the round's start (a rejection is NACKed)."""
    learner = _masked_learner(method, optimizer, node_map)

    def body(state: TrainState, shards: NodeShards):
        sending = qfaults.sends(link.faults, state.key, state.round, _node_ids(shards.count.shape[0]))
        start = state.node_states
        messages, node_states, bits, diagnostics = nodes(state, shards)
        messages, bits, ok = _transmit(link, method.name, state, messages, bits, sending, method.uplink_bits)
        answered, rejected = sending & ok, (sending & ~ok).astype(jnp.int32)
        state = state._replace(node_states=node_states)
        for (reply, answer), exchange in zip(exchanges, method.exchanges):
            replies, state = reply(state, messages, answered)
            messages, state, more = answer(state, replies)
            messages, more, ok = _transmit(link, method.name, state, messages, more, sending, exchange.answer_bits)
            rejected, answered = rejected + (answered & ~ok), answered & ok
            bits = _add_bits(bits, more)
        node_states = _where_nodes(answered, state.node_states, start)
        diagnostics = {k: jnp.where(sending, v, 0) for k, v in diagnostics.items()}
        diagnostics.update(answered=answered.astype(jnp.int32), rejected=rejected)
        return learner(state, messages, node_states, answered), bits, diagnostics

    return body


def _add_bits(bits: dict, more: dict) -> dict:
    """A node's uplink parts over the messages of one round, summed by name."""
    out = dict(bits)
    for name, value in more.items():
        out[name] = out[name] + value if name in out else value
    return out


def make_round(method: Method, optimizer: optax.GradientTransformation, mesh: Mesh, *,
               batch_size: int, state_template: TrainState,
               available: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
               to_float: Callable[[jax.Array], jax.Array] | None = None, node_map: str = "auto",
               link: Link = Link()):
    """Compile one round of ``method`` (the module docstring's three steps) into one function.

    Args:
      available: for streaming nodes, ``available(counts, round) -> counts_now``: how many of each
        node's samples have arrived (see :func:`qdata.data.available_counts`); nodes draw only among
        those. None: all data is there from the start.
      to_float: turns stored samples (e.g. uint8 pixels) into the float values the method sees
        (:meth:`qdata.data.Dataset.to_float`); default a cast to float32.
      node_map: ``"vmap"``, ``"unroll"`` or ``"auto"`` (see :func:`unrolls_nodes`).
      link: faulty nodes and links and the integrity check (:class:`Link`; default none of them:
        every node answers every round, as in the module docstring).

    Returns:
      ``run(state, shards) -> (state, bits, diagnostics)`` for :class:`NodeShards` ``shards``:
      ``bits`` is a dict of each node's exact uplink bits this round, part by part: each a
      :class:`~qdata.codecs.ledger.Bits` with counts of leading axis N (exact on the host at any scale),
      ``diagnostics`` likewise holds the encoders' local counts (e.g. ``clipped`` values); with
      ``link.on`` also the learner's :data:`LINK_COUNTS`: ``answered`` (1 where the node's messages
      were applied) and ``rejected`` (its messages the integrity check refused); for a method whose
      replies vary by round (:func:`replies_vary`) also :data:`REPLY_BITS`, each node's downlink
      replies this round (a :class:`~qdata.codecs.ledger.Bits`, read off the replies).
    """
    specs = state_specs(state_template)
    unrolls_nodes(node_map, 1)  # checks node_map before any work
    varying = replies_vary(method)
    if varying and link.on:
        raise ValueError(f"{method.name}: replies that vary by round are not charged under a Link (faults or "
                         "integrity): its account charges each reply at a fixed size")
    nodes, exchanges, learner = _round_phases(method, optimizer, batch_size, available, to_float, node_map)

    def body(state: TrainState, shards: NodeShards):
        messages, node_states, bits, diagnostics = nodes(state, shards)
        state = state._replace(node_states=node_states)
        down = []  # each node's replies' bits, read off them, when they vary by round
        for (reply, answer), exchange in zip(exchanges, method.exchanges):
            replies, state = reply(state, messages)
            if varying:
                down.append(jax.vmap(exchange.sent_bits)(replies))
            messages, state, more = answer(state, replies)
            bits = _add_bits(bits, more)
        if varying:
            diagnostics = {**diagnostics, REPLY_BITS: sum(down)}
        return learner(state, messages, state.node_states), bits, diagnostics

    if link.on:
        body = _faulty_body(method, optimizer, node_map, link, nodes, exchanges)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(specs, P(AXIS)), out_specs=(specs, P(AXIS), P(AXIS)))
    return jax.jit(sharded, donate_argnums=(0,))


def _median_seconds(fn: Callable, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_phases(method: Method, optimizer: optax.GradientTransformation, mesh: Mesh, state: TrainState,
                shards: NodeShards, *, batch_size: int, repeats: int = 5, **kwargs) -> dict:
    """Median wall seconds of a round's node phases (all nodes' messages and answers) and learner
    phases (its replies, g and the update), each compiled on its own from the same functions the
    round is made of, on ``state`` (not modified). ``kwargs`` as for :func:`make_round`."""
    specs = state_specs(state)
    nodes, exchanges, learner = _round_phases(method, optimizer, batch_size, kwargs.get("available"),
                                              kwargs.get("to_float"), kwargs.get("node_map", "auto"))
    shard = functools.partial(jax.shard_map, mesh=mesh)
    node_fn = jax.jit(shard(nodes, in_specs=(specs, P(AXIS)), out_specs=P(AXIS)))
    messages, node_states, _, _ = node_fn(state, shards)
    seconds = {"node_seconds": _median_seconds(node_fn, state, shards, repeats=repeats), "learner_seconds": 0.0}
    state = state._replace(node_states=node_states)
    for reply, answer in exchanges:
        reply_fn = jax.jit(shard(reply, in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), specs)))
        answer_fn = jax.jit(shard(answer, in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), specs, P(AXIS))))
        seconds["learner_seconds"] += _median_seconds(reply_fn, state, messages, repeats=repeats)
        replies, state = reply_fn(state, messages)
        seconds["node_seconds"] += _median_seconds(answer_fn, state, replies, repeats=repeats)
        messages, state, _ = answer_fn(state, replies)
    learner_fn = jax.jit(shard(learner, in_specs=(specs, P(AXIS), P(AXIS)), out_specs=specs))
    seconds["learner_seconds"] += _median_seconds(learner_fn, state, messages, state.node_states, repeats=repeats)
    return seconds


def run_rounds(one_round: Callable, state: TrainState, shards: NodeShards, num_rounds: int):
    """``num_rounds`` calls of a compiled :func:`make_round`, driven from the host.

    Returns:
      ``(state, bits, diagnostics)`` with the per-round ``bits`` and ``diagnostics`` stacked on the
      host: dicts of numpy arrays of shape (num_rounds, N).
    """
    per_round = []
    for _ in range(num_rounds):
        state, bits, diagnostics = one_round(state, shards)
        per_round.append((bits, diagnostics))  # stays on device: no host sync between rounds
    bits, diagnostics = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *fetch(per_round))
    return state, bits, diagnostics


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


def replies_vary(method: Method) -> bool:
    """Whether the method's replies vary by round (its exchanges read their bits off each reply,
    ``Exchange.sent_bits``): the downlink is then charged round by round (:data:`REPLY_BITS`)."""
    given = [exchange.sent_bits is not None for exchange in method.exchanges]
    if any(given) and not all(given):
        raise ValueError(f"{method.name}: every exchange reads its reply's bits off the reply (sent_bits), or none")
    return any(given)


def downlink_parts(method: Method, params: PyTree) -> tuple[int, int]:
    """Bits sent to one node in one round: ``(model broadcast, replies)``, the broadcast 32*d if the
    node needs the model (else 0), the replies those of the round's
    :class:`~qdata.methods.base.Exchange` steps (for replies that vary by round, :func:`replies_vary`,
    their sizes when sent: the most a node gets in a round; the run charges what was sent)."""
    replies = sum(int(exchange.reply_bits(params)) for exchange in method.exchanges)
    if not method.needs_params:
        return 0, replies
    return 32 * int(sum(math.prod(jnp.shape(p)) for p in jax.tree_util.tree_leaves(params))), replies


def downlink_bits_per_round(method: Method, params: PyTree) -> int:
    """Bits sent to one node in one round: the model broadcast (32*d if the node needs the model)
    and the learner's replies within the round (:class:`~qdata.methods.base.Exchange`)."""
    return sum(downlink_parts(method, params))
