"""The one interface every training method implements.

A round t of any method (DESIGN.md section 1): the learner broadcasts w_t, every node i computes a
message from its minibatch and sends it (uplink), the learner turns the N messages into one gradient
estimate g and applies an optax update. A :class:`Method` says exactly those three things:

* ``node_message(key, params, batch, node_state) -> (message, node_state)``: what node i computes and
  sends. ``batch`` is ``{'x': (b, *sample_shape), 'y': (b,), 'id': (b,), 'pos': (b,), 'node': (),
  'round': ()}`` where ``id`` is the sample's row in the training set and ``pos`` its position in the
  node's shard (used only by methods that cache samples at the learner), ``node`` the node's global
  index i and ``round`` the round t (int32 scalars, known to every node: used only by a method whose
  nodes follow a schedule, sequential split learning's turns).
* ``learner_gradient(params, messages, learner_state) -> (g, learner_state)``: ``messages`` is the
  stack of the N node messages (leading node axis) as received; only what crossed the link is used.
  ``learner_state`` (from ``init_learner(params, num_nodes)``) is what the learner keeps between
  rounds, e.g. its cache of received samples.
* ``uplink_bits(message) -> dict[str, Bits]``: the exact bits of one node's message, part by part,
  read off the packed payload, each a :class:`qdata.codecs.ledger.Bits` (exact at any size, under
  jit and vmap; converted on the host by ``ledger.host_total`` / ``ledger.add_totals``); must
  contain ``'total'``, the sum of the other parts.

``needs_params`` says whether nodes need the model each round (downlink bits are charged only then).
``fit_node`` (None for most methods): ``fit_node(node_state, shard, count) -> node_state``, node i's
state fitted on its own shard ``{'x': (L, ...), 'y': (L,)}`` (its first ``count`` rows) before round
0, e.g. a transform code's setup; the engine runs it per node (:func:`qdata.engine.fit_nodes`).

With faulty nodes or checked messages (:class:`qdata.engine.Link`) the engine takes
``learner_gradient`` node by node, on one-node slices of the messages and the learner state, and
averages g over the nodes that answered: so a method's g must be the mean over nodes of a per-node
term (as for qdata and gradient compression), or the same for every node (as PowerSGD's, formed from
its replies). An exchange's ``total`` then sums over the answering nodes only.

A method may also talk back within the round: each :class:`Exchange` in ``exchanges`` is a learner
reply to every node, computed from the latest messages, and each node's answer to it, which becomes
the latest message (Vogels et al.'s two all-reduces in PowerSGD; split learning's activation
gradients). The round is then: messages, reply 1, answers 1, ..., reply k, answers k, and
``learner_gradient`` on the last answers. Uplink bits are summed over every message a node sends in
the round; each reply is downlink, charged per node.

A method whose nodes hold part of the model (split learning's lower layers) says which part the
learner holds, ``learner_params(params) -> held`` (the tree its optimizer updates and
``learner_gradient`` returns g for; default: all of it), and which model is evaluated,
``model_params(held, learner_state, node_states) -> params`` (default: the learner's own parameters;
``node_states`` with the leading node axis, for a method whose current node layers are held by the
node that trained last, sequential split learning: a measurement, not a link).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

PyTree = Any


class Exchange(NamedTuple):
    """A learner reply within the round and each node's answer to it.

    * ``reply(params, messages, learner_state, total) -> (replies, learner_state)``: from this
      device's share of the latest messages (leading node axis), the reply to each of its nodes
      (leading node axis). ``total(tree)`` sums a per-node tree (leading node axis) over all N
      nodes, across devices: the learner's own reduction, not a link.
    * ``answer(key, params, reply, node_state) -> (message, node_state)``: node i's next message
      (it may be empty: a node that only takes the reply in).
    * ``answer_bits(message) -> dict[str, Bits]``: its exact uplink bits, ``'total'`` included.
    * ``reply_bits(params) -> int``: the exact bits of one node's reply (its shapes are fixed).
    * ``sent_bits(reply) -> Bits`` (None for most methods): for replies that only some nodes get in
      some rounds (sequential split learning's turns, a :class:`qdata.codecs.payloads.Sent`), the exact
      bits of node i's reply this round, read off it; the engine then charges the downlink round by
      round from the replies (:data:`qdata.engine.REPLY_BITS`), and ``reply_bits`` is a reply's size
      when it is sent. Every exchange of a method has one, or none has.
    """

    reply: Callable[..., tuple[PyTree, PyTree]]
    answer: Callable[..., tuple[PyTree, PyTree]]
    answer_bits: Callable[[PyTree], dict]
    reply_bits: Callable[[PyTree], int]
    sent_bits: Callable[[PyTree], Any] | None = None


class Method(NamedTuple):
    """A training method: node side, learner side and its bit ledger."""

    name: str
    init_node: Callable[[PyTree], PyTree]
    init_learner: Callable[[PyTree, int], PyTree]
    node_message: Callable[..., tuple[PyTree, PyTree]]
    learner_gradient: Callable[..., tuple[PyTree, PyTree]]
    uplink_bits: Callable[[PyTree], dict]
    needs_params: bool = True
    exchanges: tuple = ()  # Exchange, in order
    learner_params: Callable[[PyTree], PyTree] | None = None  # None: the learner holds the whole model
    model_params: Callable[[PyTree, PyTree, PyTree], PyTree] | None = None  # None: evaluate the learner's params
    fit_node: Callable[..., PyTree] | None = None
