"""Split learning: the node holds the lower layers up to a cut, the learner the rest.

Vepakomma, Gupta, Swedish and Raskar, "Split learning for health: Distributed deep learning without
sharing raw patient data", arXiv:1812.00564 (2018), and Gupta and Raskar, "Distributed learning of deep
neural network over multiple agents", J. Network and Computer Applications 116 (2018): the model is cut
after layer K (``cut``); node i holds layers 1..K, ``w_low``, the learner layers K+1..L, ``w_up``. The
*parallel* variant here, every node every round with the lower layers averaged through the learner,
is Thapa, Chamikara, Camtepe and Sun, "SplitFed: When Federated Learning Meets Split Learning",
AAAI 2022 (SplitFedV1). One round, node i with minibatch (x_j, y_j), j = 1..b:

1. node i: activations ``a_j = low(w_low_i; x_j)`` at the cut; sends them (fp32, or through the
   per-sample-range quantizer at B bits, :func:`qdata.codecs.quantizers.per_sample_range`: unbiased
   stochastic rounding, each sample's min and max in fp16) and its labels (``ceil(log2 C)`` bits each);
2. learner: ``F_i(w_up) = (1/b) sum_j f(up(w_up; a^_j), y_j)`` on the received ``a^``; keeps
   ``grad_{w_up} F_i`` and replies ``G_i = dF_i / d a^`` (b x activation size, fp32);
3. node i: backpropagates ``G_i`` through its lower layers, ``g_i = J_low(x)^T G_i`` (the gradient of
   F_i in w_low, exactly, when the activations went in fp32), takes one step of the run's optimizer
   on its own ``w_low_i`` (its state kept at the node) and sends the new ``w_low_i`` (fp32);
4. learner: replies the mean over the nodes of the ``w_low_i`` (fp32), which every node takes as its
   lower layers; the learner's optimizer steps ``w_up`` with ``(1/N) sum_i grad_{w_up} F_i``.

With fp32 activations and the same optimizer at both ends, a round is one step of data-parallel
training of the whole model (the chain rule splits the gradient; for SGD with momentum the average of
the nodes' steps is the step on the averaged gradient, momentum being linear); the test checks it.
The nodes average weights only, not their optimizer states (SplitFed's choice); for Adam the
average of the nodes' steps is not the step on the averaged gradient.

Bits per node and round, read off the payloads: uplink ``b * (activation bits)`` (fp32: ``32 m``;
B bits: ``8 ceil(m B / 8) + 32``) ``+ 8 ceil(b ceil(log2 C) / 8)`` (the labels, packed in bytes)
``+ 32 d_low`` (the lower layers); downlink ``32 b m`` (the activation
gradients, m values a sample at the cut) ``+ 32 d_low`` (the average). The model broadcast is not sent:
the nodes never need the learner's layers. The evaluated model is the composed one, the averaged
lower layers and the learner's upper layers (``model_params``).

**U-shaped** (Vepakomma et al. 2018, "U-shaped configurations for split learning without label
sharing"; ``top`` = H >= 1): the node also holds the model's last H layers, ``head``, and the labels,
which never leave it. Step 2 becomes: the learner replies the top activations ``z = up(w_up; a^)``;
the node answers ``dF_i / dz`` (its loss on ``head(w_head; z)``, fp32) and keeps its head layers'
gradient; the learner replies ``G_i = J_up(a^)^T dF_i/dz`` and keeps its own layers'. Step 3 steps the
node's lower and head layers together; step 4 averages both. Uplink: the activations, ``32 b m_z``
(the top gradients) and ``32 (d_low + d_head)``; downlink: ``32 b m_z`` (the top activations),
``32 b m`` and ``32 (d_low + d_head)``.

Faulty nodes (``faults``) are refused by the config: the learner's record of the average, which
evaluation composes, assumes every node answers.

**Sequential** (:func:`sequential_split_learning`; Vepakomma et al. 2018, Gupta and Raskar 2018): the
nodes take turns, round robin (``turn`` = R rounds each); only the active node sends and is sent
anything, and at its turn's end its lower layers and their optimizer state go to the next node via the
learner. Its bits vary by node and round: its messages and replies are :class:`Sent` (charged where
they cross, read off the payload), and its exchanges give ``Exchange.sent_bits``, so the run charges
the downlink round by round. The nodes know the schedule (``batch['node']``, ``batch['round']``).

Models are cut between layers of a chain: the MLP (its dense layers) and the small CNN (its conv
stages, then its dense layers); other models are refused with an error.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qdata import models
from qdata.codecs import labels as label_codecs
from qdata.codecs import quantizers
from qdata.codecs.base import Payload, payload_bits
from qdata.codecs.ledger import Bits
from qdata.codecs.payloads import EmptyState, Sent
from qdata.methods.base import Exchange, Method

PyTree = Any


# ----------------------------------------------------------------------------------------------
# The model as a chain of layers, cut in two.


def _dense(flatten: bool, relu: bool) -> Callable:
    def layer(p, h):
        h = h.reshape(h.shape[0], -1) if flatten else h
        h = nn.Dense(p["kernel"].shape[-1]).apply({"params": p}, h)
        return nn.relu(h) if relu else h

    return layer


def _conv_stage(p, h):
    """One stage of :class:`qdata.models.SmallCNN`: 3x3 conv, ReLU, 2x2 max-pool."""
    h = nn.relu(nn.Conv(p["kernel"].shape[-1], p["kernel"].shape[:2]).apply({"params": p}, h))
    return nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")


def model_layers(model: nn.Module) -> tuple[tuple[str, Callable], ...]:
    """``model`` as a chain of layers ``(name, fn(layer_params, h) -> h)``, ``name`` the layer's entry
    in the params; composed in order they compute ``model.apply`` (the tests check it)."""
    if isinstance(model, models.MLP):
        k = len(model.hidden)
        return tuple((f"Dense_{i}", _dense(flatten=i == 0, relu=i < k)) for i in range(k + 1))
    if isinstance(model, models.SmallCNN):
        stages = tuple((f"Conv_{i}", _conv_stage) for i in range(len(model.channels)))
        return stages + (("Dense_0", _dense(True, True)), ("Dense_1", _dense(False, False)))
    if isinstance(model, models.LogisticRegression):
        return (("Dense_0", _dense(True, False)),)
    raise ValueError(f"split learning cuts a chain of layers (models mlp, mlp:WIDTHS, cnn); "
                     f"{type(model).__name__} is not one (its residual blocks have no single cut activation)")


class ModelCut(NamedTuple):
    """A model cut in two or three: the node holds its first layers (``lower``) and, U-shaped, its last
    ones (``head``); the learner the layers between (``upper``). ``lower(w_node, x) -> a`` at the cut,
    ``upper(w_learner, a)``: the logits, or U-shaped the top activations z, ``head(w_node, z) -> logits``
    (the identity without a head). ``w_node`` is the node's part, lower and head layers together."""

    node_names: tuple[str, ...]
    learner_names: tuple[str, ...]
    lower: Callable[[PyTree, jax.Array], jax.Array]
    upper: Callable[[PyTree, jax.Array], jax.Array]
    head: Callable[[PyTree, jax.Array], jax.Array]

    def split(self, params: PyTree) -> tuple[dict, dict]:
        """``(node part, learner part)`` of the whole model's params."""
        return ({k: params[k] for k in self.node_names}, {k: params[k] for k in self.learner_names})

    def join(self, node: PyTree, learner: PyTree) -> dict:
        return {**node, **learner}


def _chain(layers) -> Callable:
    def apply(params, h):
        for name, layer in layers:
            h = layer(params[name], h)
        return h

    return apply


def check_cut(model: nn.Module, cut, top=0) -> tuple[int, int]:
    """``(cut, top)`` checked against ``model``: the node holds layers 1..cut (and U-shaped the last
    ``top``), the learner at least one layer between them."""
    layers = model_layers(model)
    names = ", ".join(name for name, _ in layers)
    bad = lambda v, lo: isinstance(v, bool) or not isinstance(v, int) or v < lo
    if bad(top, 0) or bad(cut, 1) or cut + top > len(layers) - 1:
        most = len(layers) - 1 - (top if not bad(top, 0) else 0)
        span = f"in 1..{most}" if most >= 1 else "impossible: there is nothing to split"
        raise ValueError(f"split_cut={cut!r}, split_top={top!r}: the model {type(model).__name__} has {len(layers)} "
                         f"layer(s) ({names}); the node holds the first split_cut of them (and the last split_top, "
                         f"an integer >= 0), the learner at least one between, so split_cut must be an integer {span}")
    return cut, top


def cut_model(model: nn.Module, cut: int, top: int = 0) -> ModelCut:
    """``model`` cut after layer ``cut`` and, with ``top`` > 0, before its last ``top`` layers
    (checked by :func:`check_cut`)."""
    layers = model_layers(model)
    cut, top = check_cut(model, cut, top)
    lower, middle, head = layers[:cut], layers[cut:len(layers) - top], layers[len(layers) - top:]
    return ModelCut(tuple(n for n, _ in lower + head), tuple(n for n, _ in middle), _chain(lower), _chain(middle),
                    _chain(head))


# ----------------------------------------------------------------------------------------------
# The method: what both variants share.


class SplitNode(NamedTuple):
    """A node's state: its layers (lower, and U-shaped head), its optimizer's state for them, this
    round's batch (kept between its messages, for the backward pass) and, U-shaped, the gradient of
    its loss in its head layers, kept until the lower layers' gradient comes."""

    layers: PyTree
    opt_state: PyTree
    x: jax.Array
    y: jax.Array
    head_grad: PyTree


class SplitLearner(NamedTuple):
    """The learner's share serving one node: that node's gradient of its loss in the learner's layers
    (this round), the average of the node layers it last replied (what evaluation composes) and,
    U-shaped, the activations it received this round (for its backward pass)."""

    upper_grad: PyTree
    node_layers: PyTree
    a: jax.Array


def _to_each(tree: PyTree, count: int) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (count,) + a.shape), tree)


def _one_part(name: str):
    def bits(message: Payload) -> dict:
        count = Bits.of(payload_bits(message))
        return {name: count, "total": count} if name else {"total": count}

    return bits


def _activation_codec(bits: int | None):
    """``(encode(key, a) -> Payload, decode(Payload) -> a^)``: fp32 rows, or per-sample-range codes."""
    if bits is None:
        return (lambda key, a: Payload(rows={"activations": a.astype(jnp.float32)}),
                lambda payload: payload.rows["activations"])
    quantizer = quantizers.per_sample_range(bits)
    return quantizer.encode, quantizer.decode


def _mean_loss(logits, y):
    return jnp.mean(models.cross_entropy(logits, y))


def _shared(cut: ModelCut, optimizer, encode, sample_shape, batch_size, u_shaped: bool):
    """The node's first message, its lower layers' step, the learner's average, its g (module docstring)."""

    def init_node(params):
        node, _ = cut.split(params)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, node)
        return SplitNode(node, optimizer.init(node), jnp.zeros((batch_size,) + tuple(sample_shape), jnp.float32),
                         jnp.zeros((batch_size,), jnp.int32), zeros)

    def node_message(key, params, batch, state):
        del params  # the node computes with its own layers only
        return {"activations": encode(key, cut.lower(state.layers, batch["x"]))}, state._replace(x=batch["x"],
                                                                                                  y=batch["y"])

    def step_lower(key, params, reply, state):
        del key, params
        _, backward = jax.vjp(lambda w: cut.lower(w, state.x), state.layers)
        (grads,) = backward(reply.arrays["activation_gradients"])
        if u_shaped:  # the two backward passes touch disjoint layers: their sum is the node's gradient
            grads = jax.tree_util.tree_map(jnp.add, grads, state.head_grad)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.layers)
        layers = optax.apply_updates(state.layers, updates)
        return Payload(arrays={"node_layers": layers}), state._replace(layers=layers, opt_state=opt_state)

    def take_average(key, params, reply, state):
        del key, params
        return Payload(arrays={}), state._replace(layers=reply.arrays["node_layers"])

    def reply_average(params, messages, learner_state, total):
        del params
        count = jax.tree_util.tree_leaves(messages.arrays["node_layers"])[0].shape[0]
        nodes = total(jnp.ones((count,), jnp.float32))
        mean = jax.tree_util.tree_map(lambda s: s / nodes, total(messages.arrays["node_layers"]))
        layers = _to_each(mean, count)
        return Payload(arrays={"node_layers": layers}), learner_state._replace(node_layers=layers)

    def learner_gradient(params, messages, learner_state):
        del params, messages  # g was formed in a reply, from what the nodes sent
        return jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), learner_state.upper_grad), learner_state

    return init_node, node_message, step_lower, take_average, reply_average, learner_gradient


# ----------------------------------------------------------------------------------------------
# The two variants' own exchanges.


def _label_exchange(cut: ModelCut, decode, labels, step_lower, gradient_bits):
    """Labels at the learner: the reply is the loss's gradient in the received activations."""

    def reply_gradients(params, messages, learner_state, total):
        del total  # each node's reply is its own
        a = jax.vmap(decode)(messages["activations"])
        y = jax.vmap(lambda s: labels.decode(s, EmptyState(), jnp.ones(a.shape[1], jnp.int32)))(messages["labels"])
        loss = lambda w, a, y: _mean_loss(cut.upper(w, a), y)
        upper_grad, grad_a = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0))(params, a, y)
        reply = Payload(arrays={"activation_gradients": grad_a.astype(jnp.float32)})
        return reply, learner_state._replace(upper_grad=upper_grad)

    return (Exchange(reply_gradients, step_lower, _one_part("node_layers"), gradient_bits),)


def _u_exchanges(cut: ModelCut, decode, step_lower, top_bits, gradient_bits):
    """Labels at the node (U-shaped): the learner replies the top activations z, the node answers
    its loss's gradient in z, the learner replies the gradient in the activations it received."""

    def reply_top(params, messages, learner_state, total):
        del total
        a = jax.vmap(decode)(messages["activations"])
        z = jax.vmap(cut.upper, in_axes=(None, 0))(params, a)
        return Payload(arrays={"top_activations": z.astype(jnp.float32)}), learner_state._replace(a=a)

    def step_head(key, params, reply, state):
        del key, params
        loss = lambda w, z: _mean_loss(cut.head(w, z), state.y)
        head_grad, grad_z = jax.grad(loss, argnums=(0, 1))(state.layers, reply.arrays["top_activations"])
        return Payload(arrays={"top_gradients": grad_z}), state._replace(head_grad=head_grad)

    def reply_gradients(params, messages, learner_state, total):
        del total

        def one(a, grad_z):
            _, backward = jax.vjp(cut.upper, params, a)
            return backward(grad_z)

        upper_grad, grad_a = jax.vmap(one)(learner_state.a, messages.arrays["top_gradients"])
        reply = Payload(arrays={"activation_gradients": grad_a.astype(jnp.float32)})
        return reply, learner_state._replace(upper_grad=upper_grad)

    return (Exchange(reply_top, step_head, _one_part("top_gradients"), top_bits),
            Exchange(reply_gradients, step_lower, _one_part("node_layers"), gradient_bits))


def split_learning(model: nn.Module, cut: int, optimizer: optax.GradientTransformation, *, num_classes: int,
                   sample_shape, batch_size: int, bits: int | None = None, top: int = 0) -> Method:
    """Parallel split learning (module docstring) as a :class:`Method`; U-shaped with ``top`` > 0
    (sequential: :func:`sequential_split_learning`).

    Args:
      model: a chain of layers (:func:`model_layers`), e.g. ``models.make_model("mlp", 10)``.
      cut: K, the number of layers at the node (checked with ``top`` before any work, :func:`check_cut`).
      optimizer: the optimizer each node runs on its layers (the run's: the learner runs the same on its).
      num_classes: C, for the labels' width ``ceil(log2 C)``.
      sample_shape, batch_size: the shape of one sample and b, for the node state's room for a batch.
      bits: None sends the activations in fp32; B in 1..16 through the per-sample-range quantizer.
      top: 0, the labels go to the learner; H >= 1, U-shaped: the node also holds the last H layers and
        the labels, which never leave it.

    Returns:
      A :class:`Method` named ``split:K`` (``split_u:K:H`` U-shaped; ``:Bbit`` with quantized
      activations) with ``needs_params=False``; its exchanges: the activation gradients (U-shaped:
      the top activations, then the activation gradients) and the average of the node layers.
    """
    cut_of = cut_model(model, cut, top)
    encode, decode = _activation_codec(bits)
    labels = label_codecs.class_labels(num_classes)
    init_node, node_message, step_lower, take_average, reply_average, learner_gradient = _shared(
        cut_of, optimizer, encode, sample_shape, batch_size, top > 0)
    x = jax.ShapeDtypeStruct((batch_size,) + tuple(sample_shape), jnp.float32)
    a_shape = lambda p: jax.eval_shape(cut_of.lower, cut_of.split(p)[0], x)
    fp32_bits = lambda name, shape: payload_bits(Payload(arrays={name: jax.ShapeDtypeStruct(shape, jnp.float32)}))
    gradient_bits = lambda p: fp32_bits("activation_gradients", a_shape(p).shape)

    def average_bits(params):
        node = jax.tree_util.tree_map(lambda w: jax.ShapeDtypeStruct(jnp.shape(w), jnp.float32),
                                      cut_of.split(params)[0])
        return payload_bits(Payload(arrays={"node_layers": node}))

    def init_learner(params, num_nodes):
        node, upper = cut_of.split(params)
        a = jnp.zeros((batch_size,) + a_shape(params).shape[1:], jnp.float32) if top else jnp.zeros(())
        return _to_each(SplitLearner(jax.tree_util.tree_map(jnp.zeros_like, upper), node, a), num_nodes)

    if top:
        top_bits = lambda p: fp32_bits("top_activations",
                                       jax.eval_shape(cut_of.upper, cut_of.split(p)[1], a_shape(p)).shape)
        exchanges = _u_exchanges(cut_of, decode, step_lower, top_bits, gradient_bits)
        first, uplink_bits = node_message, lambda m: _one_part("activations")(m["activations"])
    else:
        exchanges = _label_exchange(cut_of, decode, labels, step_lower, gradient_bits)
        first, uplink_bits = _with_labels(node_message, labels), _label_bits(labels)
    exchanges += (Exchange(reply_average, take_average, _one_part(None), average_bits),)
    name = (f"split_u:{cut}:{top}" if top else f"split:{cut}") + (f":{bits}bit" if bits else "")
    return Method(name, init_node, init_learner, first, learner_gradient, uplink_bits, needs_params=False,
                  exchanges=exchanges, learner_params=lambda params: cut_of.split(params)[1],
                  model_params=lambda upper, learner_state, node_states: cut_of.join(
                      jax.tree_util.tree_map(lambda a: a[0], learner_state.node_layers), upper))


def _with_labels(node_message, labels):
    """The first message with the labels (``ceil(log2 C)`` bits each), for the learner's loss."""

    def message(key, params, batch, state):
        out, state = node_message(key, params, batch, state)
        stream, _ = labels.encode(None, batch["y"], EmptyState(), jnp.ones(batch["y"].shape, jnp.int32))
        return {**out, "labels": stream}, state

    return message


def _label_bits(labels):
    def bits(message):
        parts = {"activations": Bits.of(payload_bits(message["activations"])),
                 "labels": labels.bits(message["labels"], None)["labels"]}
        return {**parts, "total": parts["activations"] + parts["labels"]}

    return bits


# ----------------------------------------------------------------------------------------------
# The sequential variant: the nodes take turns, the lower layers handed from node to node.


class SequentialNode(NamedTuple):
    """A node's state in the sequential variant: its copy of the lower layers and of their optimizer
    state (current while it trains, and after a hand-off reaches it), this round's batch, whether this
    round is its turn (``active``), the round (``round``) and the rounds done when it last trained
    (``trained``, 0 if never: the node evaluation reads the current lower layers from)."""

    layers: PyTree
    opt_state: PyTree
    x: jax.Array
    y: jax.Array
    active: jax.Array
    round: jax.Array
    trained: jax.Array


class SequentialLearner(NamedTuple):
    """The learner's share serving one node: the active node's gradient in the learner's layers this
    round (the same in every share), the index of the node it serves and the rounds done."""

    upper_grad: PyTree
    node: jax.Array
    round: jax.Array


def _sent_bits(bits_of):
    """Bits of a :class:`Sent` message, part by part: the body's where it crosses, 0 where not."""

    def bits(message: Sent) -> dict:
        parts = {k: Bits.of(v).times(message.sent) for k, v in bits_of(message.body).items() if k != "total"}
        return {**parts, "total": sum(parts.values())}

    return bits


def _where(flag, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag > 0, a, b), new, old)


def _masked(sent: jax.Array, tree: PyTree) -> PyTree:
    """A per-node tree (leading node axis) zero where the node's message did not cross."""
    return jax.tree_util.tree_map(lambda a: jnp.where(sent.reshape(sent.shape + (1,) * (a.ndim - 1)) > 0, a,
                                                      jnp.zeros_like(a)), tree)


def _sent_reply_bits(reply: Sent) -> Bits:
    """A :class:`Sent` reply's bits: the body's where it crosses, 0 where not."""
    return Bits.of(payload_bits(reply.body)).times(reply.sent)


def _turn_message(cut: ModelCut, encode, labels, turn_node):
    """``(node_message, uplink_bits)``: the node's activations and labels, which cross in its turn only
    (a :class:`Sent`); its state keeps the batch, whether it is active and the round."""

    def node_message(key, params, batch, state):
        del params
        active = (turn_node(batch["round"]) == batch["node"]).astype(jnp.int32)
        stream, _ = labels.encode(None, batch["y"], EmptyState(), jnp.ones(batch["y"].shape, jnp.int32))
        body = {"activations": encode(key, cut.lower(state.layers, batch["x"])), "labels": stream}
        return Sent(body, active), state._replace(x=batch["x"], y=batch["y"], active=active, round=batch["round"])

    def body_bits(body):
        return {"activations": payload_bits(body["activations"]), "labels": labels.bits(body["labels"], None)["labels"]}

    return node_message, _sent_bits(body_bits)


def _turn_gradient_exchange(cut: ModelCut, decode, labels, optimizer, hands_off, a_shape) -> Exchange:
    """The active node's exchange: the learner replies the loss's gradient in the node's activations
    (keeping the one in its own layers); the node steps its lower layers and, at its turn's end, answers
    them and their optimizer state (the hand-off's uplink). The other nodes are sent and answer nothing."""

    def reply_gradients(params, messages, learner_state, total):
        sent = messages.sent
        a = jax.vmap(decode)(messages.body["activations"])
        y = jax.vmap(lambda s: labels.decode(s, EmptyState(), jnp.ones(a.shape[1], jnp.int32)))(
            messages.body["labels"])
        # Only what crossed is read, and one backward pass through the learner's layers per device: on
        # the active node's activations and labels where it sits (a sum with zeros, so exact), on zeros
        # elsewhere, and those replies are masked out.
        a, y = jax.tree_util.tree_map(lambda t: jnp.sum(t, axis=0), _masked(sent, (a, y)))
        loss = lambda w, a, y: _mean_loss(cut.upper(w, a), y)
        upper_grad, grad_a = jax.grad(loss, argnums=(0, 1))(params, a, y)
        count = sent.shape[0]
        active_grad = total(_masked(sent, _to_each(upper_grad, count)))  # the one active node's, wherever it sits
        grad_a = _masked(sent, _to_each(grad_a.astype(jnp.float32), count))
        reply = Sent(Payload(arrays={"activation_gradients": grad_a}), sent)
        return reply, learner_state._replace(upper_grad=_to_each(active_grad, count))

    def step_lower(key, params, reply, state):
        del key, params
        _, backward = jax.vjp(lambda w: cut.lower(w, state.x), state.layers)
        (grads,) = backward(reply.body.arrays["activation_gradients"])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.layers)
        layers = _where(state.active, optax.apply_updates(state.layers, updates), state.layers)
        opt_state = _where(state.active, opt_state, state.opt_state)
        hand = (state.active * hands_off(state.round)).astype(jnp.int32)
        message = Sent(Payload(arrays={"node_layers": layers, "node_optimizer": opt_state}), hand)
        trained = jnp.where(state.active > 0, state.round + 1, state.trained)
        return message, state._replace(layers=layers, opt_state=opt_state, trained=trained)

    def handoff_bits(payload):
        return {name: payload_bits(Payload(arrays={name: payload.arrays[name]})) for name in payload.arrays}

    def gradient_bits(params):
        return payload_bits(Payload(arrays={"activation_gradients": jax.ShapeDtypeStruct(a_shape(params).shape,
                                                                                         jnp.float32)}))

    return Exchange(reply_gradients, step_lower, _sent_bits(handoff_bits), gradient_bits, _sent_reply_bits)


def _handoff_exchange(cut: ModelCut, optimizer, turn_node) -> Exchange:
    """The hand-off's downlink: the learner replies the finishing node's lower layers and optimizer
    state to the next node in the schedule, which takes them as its own; the others keep theirs."""

    def reply_handoff(params, messages, learner_state, total):
        del params
        sent = messages.sent
        handed = total(sent) > 0  # the finishing node sent its layers this round
        body = total(_masked(sent, messages.body.arrays))  # exactly the one sender's
        to_next = jnp.logical_and(handed, learner_state.node == turn_node(learner_state.round + 1))
        reply = Sent(Payload(arrays=_to_each(body, sent.shape[0])), to_next.astype(jnp.int32))
        return reply, learner_state

    def take_handoff(key, params, reply, state):
        del key, params
        layers = _where(reply.sent, reply.body.arrays["node_layers"], state.layers)
        opt_state = _where(reply.sent, reply.body.arrays["node_optimizer"], state.opt_state)
        return Payload(arrays={}), state._replace(layers=layers, opt_state=opt_state)

    def handoff_size(params):
        node = jax.tree_util.tree_map(lambda w: jax.ShapeDtypeStruct(jnp.shape(w), jnp.float32), cut.split(params)[0])
        state = jax.eval_shape(optimizer.init, node)
        return payload_bits(Payload(arrays={"node_layers": node, "node_optimizer": state}))

    return Exchange(reply_handoff, take_handoff, _one_part(None), handoff_size, _sent_reply_bits)


def sequential_split_learning(model: nn.Module, cut: int, optimizer: optax.GradientTransformation, *,
                              num_classes: int, sample_shape, batch_size: int, num_nodes: int,
                              bits: int | None = None, turn: int = 1) -> Method:
    """Sequential split learning (Vepakomma et al. 2018; Gupta and Raskar 2018) as a :class:`Method`.

    The nodes take turns, round robin: rounds ``k R .. k R + R - 1`` (``R = turn``) are node
    ``k mod N``'s. In its round the active node sends its activations (fp32 or B bits, as the parallel
    variant) and labels; the learner computes the loss on its layers, keeps their gradient (its
    optimizer steps them with it) and replies the activations' gradients; the node backpropagates
    them and steps its lower layers with the run's optimizer. At the last round of its turn (N > 1)
    the node hands its lower layers *and their optimizer state* (the momentum trace of SGD, Adam's
    moments: nothing with plain SGD, momentum 0) to the next node **via the learner**, the only
    links being node-learner (a star): one uplink from the finishing node, one downlink to the next,
    both in that round. So the run is one model trained in turn: with fp32 activations, ``R`` rounds
    of node i's batches are ``R`` steps of the run's optimizer on the whole model (the tests check
    it against SGD stepping on node ``(t // R) mod N``'s batch). The other nodes send nothing and
    are sent nothing (:class:`qdata.codecs.payloads.Sent`: their messages and replies count 0 bits).
    The schedule is known to every node in advance (its index and the round, ``batch['node']``,
    ``batch['round']``).

    Bits in a round, read off the payloads: the active node up ``b * (activation bits) + 8 ceil(b
    ceil(log2 C) / 8)``, down ``32 b m``; at a turn's end, the finishing node up and the next node
    down ``32 d_low`` plus the optimizer state's bits (``32 d_low`` more for SGD with momentum); every
    other node 0. The replies vary by round (``Exchange.sent_bits``), so the run charges the downlink
    round by round. The evaluated model composes the current lower layers (those of the node that
    trained last, which after a hand-off are the copy the next node holds) with the learner's.

    Not built: the U-shaped variant in turns, peer-to-peer hand-offs, faulty nodes or checked messages.

    Args:
      model, cut, optimizer, num_classes, sample_shape, batch_size, bits: as :func:`split_learning`.
      num_nodes: N, the nodes in the schedule.
      turn: R >= 1, rounds per turn; the hand-off is paid once per turn.

    Returns:
      A :class:`Method` named ``split_seq:K`` (``:tR`` with R > 1; ``:Bbit`` with quantized
      activations), ``needs_params=False``; its exchanges: the activation gradients, the hand-off.
    """
    cut_of = cut_model(model, cut)
    encode, decode = _activation_codec(bits)
    labels = label_codecs.class_labels(num_classes)
    turn_node = lambda t: (t // turn) % num_nodes
    hands_off = lambda t: jnp.logical_and(num_nodes > 1, t % turn == turn - 1)  # this round ends a turn
    x_shape = jax.ShapeDtypeStruct((batch_size,) + tuple(sample_shape), jnp.float32)
    a_shape = lambda p: jax.eval_shape(cut_of.lower, cut_of.split(p)[0], x_shape)

    def init_node(params):
        node, _ = cut_of.split(params)
        zero = jnp.zeros((), jnp.int32)
        return SequentialNode(node, optimizer.init(node), jnp.zeros(x_shape.shape, jnp.float32),
                              jnp.zeros((batch_size,), jnp.int32), zero, zero, zero)

    def init_learner(params, count):
        _, upper = cut_of.split(params)
        return SequentialLearner(_to_each(jax.tree_util.tree_map(jnp.zeros_like, upper), count),
                                 jnp.arange(count, dtype=jnp.int32), jnp.zeros((count,), jnp.int32))

    def learner_gradient(params, messages, learner_state):
        del params, messages  # g was formed in the first reply, from the active node's activations
        g = jax.tree_util.tree_map(lambda u: jnp.mean(u, axis=0), learner_state.upper_grad)
        return g, learner_state._replace(round=learner_state.round + 1)

    def model_params(upper, learner_state, node_states):
        del learner_state
        last = jnp.argmax(node_states.trained)  # the node that trained last holds the current layers
        return cut_of.join(jax.tree_util.tree_map(lambda a: a[last], node_states.layers), upper)

    node_message, uplink_bits = _turn_message(cut_of, encode, labels, turn_node)
    exchanges = (_turn_gradient_exchange(cut_of, decode, labels, optimizer, hands_off, a_shape),
                 _handoff_exchange(cut_of, optimizer, turn_node))
    name = f"split_seq:{cut}" + (f":t{turn}" if turn > 1 else "") + (f":{bits}bit" if bits else "")
    return Method(name, init_node, init_learner, node_message, learner_gradient, uplink_bits,
                  needs_params=False, exchanges=exchanges, learner_params=lambda params: cut_of.split(params)[1],
                  model_params=model_params)
