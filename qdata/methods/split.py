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

Bits per node and round, read off the payloads: uplink ``b * (activation bits) + b ceil(log2 C)``
(labels, packed in bytes) ``+ 32 d_low`` (the lower layers); downlink ``32 b m`` (the activation
gradients, m values a sample at the cut) ``+ 32 d_low`` (the average). The model broadcast is not sent:
the nodes never need the learner's layers. The evaluated model is the composed one, the averaged
lower layers and the learner's upper layers (``model_params``).

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
from qdata.codecs.payloads import EmptyState
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
    """A model cut after its first ``cut`` layers: ``lower(w_low, x) -> a``, ``upper(w_up, a) -> logits``."""

    lower_names: tuple[str, ...]
    upper_names: tuple[str, ...]
    lower: Callable[[PyTree, jax.Array], jax.Array]
    upper: Callable[[PyTree, jax.Array], jax.Array]

    def split(self, params: PyTree) -> tuple[dict, dict]:
        return ({k: params[k] for k in self.lower_names}, {k: params[k] for k in self.upper_names})

    def join(self, lower: PyTree, upper: PyTree) -> dict:
        return {**lower, **upper}


def _chain(layers) -> Callable:
    def apply(params, h):
        for name, layer in layers:
            h = layer(params[name], h)
        return h

    return apply


def check_cut(model: nn.Module, cut) -> int:
    """``cut`` checked against ``model``: the node holds layers 1..cut, the learner at least one."""
    layers = model_layers(model)
    names = ", ".join(name for name, _ in layers)
    if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= len(layers) - 1:
        span = f"in 1..{len(layers) - 1}" if len(layers) > 1 else "impossible: there is nothing to split"
        raise ValueError(f"split_cut={cut!r}: the model {type(model).__name__} has {len(layers)} layer(s) "
                         f"({names}); the node holds the first split_cut of them and the learner the rest, so "
                         f"split_cut must be an integer {span}")
    return cut


def cut_model(model: nn.Module, cut: int) -> ModelCut:
    """``model`` cut after layer ``cut`` (checked by :func:`check_cut`)."""
    layers = model_layers(model)
    cut = check_cut(model, cut)
    return ModelCut(tuple(n for n, _ in layers[:cut]), tuple(n for n, _ in layers[cut:]),
                    _chain(layers[:cut]), _chain(layers[cut:]))


# ----------------------------------------------------------------------------------------------
# The method.


class SplitNode(NamedTuple):
    """A node's state: its lower layers, its optimizer's state for them, this round's inputs (kept
    between its first message and the reply, for the backward pass)."""

    lower: PyTree
    opt_state: PyTree
    x: jax.Array


class SplitLearner(NamedTuple):
    """The learner's share serving one node: that node's gradient of its loss in the upper layers
    (this round), and the average of the lower layers it last replied (what evaluation composes)."""

    upper_grad: PyTree
    lower: PyTree


def _to_each(tree: PyTree, count: int) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (count,) + a.shape), tree)


def _one_part(name: str):
    def bits(message: Payload) -> dict:
        count = Bits.of(payload_bits(message))
        return {name: count, "total": count}

    return bits


def _activation_codec(bits: int | None):
    """``(encode(key, a) -> Payload, decode(Payload) -> a^)``: fp32 rows, or per-sample-range codes."""
    if bits is None:
        return (lambda key, a: Payload(rows={"activations": a.astype(jnp.float32)}),
                lambda payload: payload.rows["activations"])
    quantizer = quantizers.per_sample_range(bits)
    return quantizer.encode, quantizer.decode


def _node_side(cut: ModelCut, optimizer, encode, labels, sample_shape, batch_size):
    """Steps 1 and 3 of the module docstring (and the node's taking of the average)."""

    def init_node(params):
        lower, _ = cut.split(params)
        return SplitNode(lower, optimizer.init(lower), jnp.zeros((batch_size,) + tuple(sample_shape), jnp.float32))

    def node_message(key, params, batch, state):
        del params  # the node computes with its own lower layers only
        a = cut.lower(state.lower, batch["x"])
        stream, _ = labels.encode(None, batch["y"], EmptyState(), jnp.ones(batch["y"].shape, jnp.int32))
        return {"activations": encode(key, a), "labels": stream}, state._replace(x=batch["x"])

    def step_lower(key, params, reply, state):
        del key, params
        _, backward = jax.vjp(lambda w: cut.lower(w, state.x), state.lower)
        (grads,) = backward(reply.arrays["activation_gradients"])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lower)
        lower = optax.apply_updates(state.lower, updates)
        return Payload(arrays={"lower_layers": lower}), state._replace(lower=lower, opt_state=opt_state)

    def take_average(key, params, reply, state):
        del key, params
        return Payload(arrays={}), state._replace(lower=reply.arrays["lower_layers"])

    return init_node, node_message, step_lower, take_average


def _learner_side(cut: ModelCut, decode, labels):
    """Steps 2 and 4 of the module docstring."""

    def upper_loss(upper, a, y):
        return jnp.mean(models.cross_entropy(cut.upper(upper, a), y))

    def reply_gradients(params, messages, learner_state, total):
        del total  # each node's reply is its own
        a = jax.vmap(decode)(messages["activations"])
        y = jax.vmap(lambda s: labels.decode(s, EmptyState(), jnp.ones(a.shape[1], jnp.int32)))(messages["labels"])
        upper_grad, grad_a = jax.vmap(jax.grad(upper_loss, argnums=(0, 1)), in_axes=(None, 0, 0))(params, a, y)
        reply = Payload(arrays={"activation_gradients": grad_a.astype(jnp.float32)})
        return reply, learner_state._replace(upper_grad=upper_grad)

    def reply_average(params, messages, learner_state, total):
        del params
        count = jax.tree_util.tree_leaves(learner_state.lower)[0].shape[0]
        nodes = total(jnp.ones((count,), jnp.float32))
        mean = jax.tree_util.tree_map(lambda s: s / nodes, total(messages.arrays["lower_layers"]))
        lower = _to_each(mean, count)
        return Payload(arrays={"lower_layers": lower}), learner_state._replace(lower=lower)

    def learner_gradient(params, messages, learner_state):
        del params, messages  # g was formed in the first reply, from the activations
        return jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), learner_state.upper_grad), learner_state

    return reply_gradients, reply_average, learner_gradient


def split_learning(model: nn.Module, cut: int, optimizer: optax.GradientTransformation, *, num_classes: int,
                   sample_shape, batch_size: int, bits: int | None = None) -> Method:
    """Parallel split learning (module docstring) as a :class:`Method`.

    Args:
      model: a chain of layers (:func:`model_layers`), e.g. ``models.make_model("mlp", 10)``.
      cut: K, the number of layers at the node (1..L-1; refused otherwise, before any work).
      optimizer: the optimizer each node runs on its lower layers (the run's: the learner runs the
        same on the upper layers).
      num_classes: C, for the labels' width ``ceil(log2 C)``.
      sample_shape, batch_size: the shape of one sample and b, for the node state's room for a batch.
      bits: None sends the activations in fp32; B in 1..16 through the per-sample-range quantizer.

    Returns:
      A :class:`Method` named ``split:K`` (``split:K:B`` with quantized activations), with two
      exchanges (activation gradients; the averaged lower layers) and ``needs_params=False``.
    """
    cut_of = cut_model(model, cut)
    encode, decode = _activation_codec(bits)
    labels = label_codecs.class_labels(num_classes)
    init_node, node_message, step_lower, take_average = _node_side(cut_of, optimizer, encode, labels,
                                                                   sample_shape, batch_size)
    reply_gradients, reply_average, learner_gradient = _learner_side(cut_of, decode, labels)

    def init_learner(params, num_nodes):
        lower, upper = cut_of.split(params)
        return _to_each(SplitLearner(jax.tree_util.tree_map(jnp.zeros_like, upper), lower), num_nodes)

    def uplink_bits(message):
        parts = {"activations": Bits.of(payload_bits(message["activations"])),
                 "labels": labels.bits(message["labels"], None)["labels"]}
        return {**parts, "total": parts["activations"] + parts["labels"]}

    def gradient_reply_bits(params):
        a = jax.eval_shape(lambda p: cut_of.lower(cut_of.split(p)[0], jnp.zeros((batch_size,) + tuple(sample_shape))),
                           params)
        return payload_bits(Payload(arrays={"activation_gradients": jax.ShapeDtypeStruct(a.shape, jnp.float32)}))

    def average_reply_bits(params):
        lower = jax.tree_util.tree_map(lambda w: jax.ShapeDtypeStruct(jnp.shape(w), jnp.float32), cut_of.split(params)[0])
        return payload_bits(Payload(arrays={"lower_layers": lower}))

    exchanges = (Exchange(reply_gradients, step_lower, _one_part("lower_layers"), gradient_reply_bits),
                 Exchange(reply_average, take_average, lambda m: {"total": Bits.of(payload_bits(m))},
                          average_reply_bits))
    return Method(f"split:{cut}" + (f":{bits}" if bits else ""), init_node, init_learner, node_message,
                  learner_gradient, uplink_bits, needs_params=False, exchanges=exchanges,
                  learner_params=lambda params: cut_of.split(params)[1],
                  model_params=lambda upper, learner_state: cut_of.join(
                      jax.tree_util.tree_map(lambda a: a[0], learner_state.lower), upper))
