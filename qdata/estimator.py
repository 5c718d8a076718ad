"""The qdata estimator for one node: what the node sends, what the learner reads from it, in bits.

DESIGN.md section 2, steps 1-4, for one node i with minibatch {(x_j, y_j)}_{j=1..b}, composed of
four parts, each its own module:

1. gate: scores s_j -> probabilities p_j -> mask m_j and weights a_j (:mod:`qdata.gate`, which also
   says what crosses the link for them: a b-bit bitmap and fp16 p~_j);
2. a sample codec, a :class:`~qdata.codecs.data_codec.DataCodec` of ``{'x': samples, 'y': labels}``:
   the data quantizer Q (:func:`~qdata.codecs.data_codec.from_quantizer`) beside the exact labels
   (:mod:`qdata.codecs.labels`), optionally wrapped in the learner cache
   (:func:`~qdata.codecs.cache.learner_cache`);
3. the correction C(delta_i) (:mod:`qdata.correction`), computed by the node against the samples as
   the learner will decode them;
4. learner: g_i = (1/b) sum_j a_j grad_w f(w; Q(x_j), y_j) + C(delta_i), from ``received`` and
   ``decoded_correction``; the N-node learner is :func:`qdata.methods.qdata.qdata_method`.

:func:`estimator` composes given parts; :func:`qdata.methods.qdata.qdata_estimator` builds them from a
quantizer, a gate and a compressor.

With the correction on and Q, C and the gate unbiased, E[g_i | w] = (1/b) sum_j grad_w f(w; x_j, y_j),
the node's full-precision minibatch gradient (:func:`full_gradient`). Without it the bias is at most
L_x * E||x - Q(x)||, L_x the Lipschitz constant of x -> grad_w f(w; x, y).

What crosses the link is a :class:`NodeMessage`; ``uplink_bits`` reads every bit off its payloads:
``'data'`` and ``'metadata'`` (the codes and what else Q sends, of the sent or, with a cache, fresh
rows), ``'labels'`` and ``'positions'`` (streams carrying their own counts, and the cache's bitmap
of fresh samples), ``'weights'`` and ``'mask'`` (the gate's), ``'correction'``, ``'setup'`` (a
transform code's per-node setup, in the node's first message only), and ``'total'``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from qdata import checks
from qdata import gate as gates
from qdata.codecs.data_codec import DataCodec, count_items
from qdata.codecs.ledger import Bits
from qdata.codecs.payloads import Payload, payload_bits
from qdata.correction import Correction, no_correction, weighted_mean_loss

Array = jax.Array
PyTree = Any

# The parts of a node's uplink bits, in the order they are reported.
PARTS = ("data", "labels", "weights", "metadata", "mask", "correction", "positions", "refine")


@struct.dataclass
class NodeMessage:
    """One node's uplink message: everything in it crosses the link.

    Attributes:
      samples: the sample codec's payload (``{'x': codes, 'y': label stream}``, or with a cache the
        fresh samples' payload beside the positions stream and the bitmap of fresh samples).
      weights: ``rows['prob']``, fp16 p~_j per sample (Bernoulli gate); empty otherwise.
      mask: ``arrays['bitmap']``, the b-bit bitmap of transmitted samples (rho < 1); empty otherwise.
      correction: the compressor's payload of C(delta_i); empty without a correction.
      batch: b, the batch size (static, known to both sides).
    """

    samples: Any
    weights: Payload
    mask: Payload
    correction: Payload
    batch: int = struct.field(pytree_node=False, default=0)


class NodeState(NamedTuple):
    """A node's state: its sample codec's (e.g. its record of what the learner holds) and its
    correction compressor's."""

    samples: PyTree
    correction: PyTree


class Estimator(NamedTuple):
    """The qdata estimator for one node, in the optax style (pure functions, explicit state and keys).

    Attributes:
      init: ``init(params) -> NodeState``.
      init_learner: ``init_learner() -> state``, the learner's state for this node (its cache).
      node_message: ``node_message(key, params, batch, state) -> (NodeMessage, state)``.
      received: ``(message, learner_state) -> ((x_hat, y, a), learner_state)``, the samples the
        learner reads off a message (a_j = 0 for samples not sent).
      decoded_correction: ``message -> C(delta_i)`` (None without a correction).
      uplink_bits: ``uplink_bits(message) -> dict`` of exact :class:`~qdata.codecs.ledger.Bits` by
        part (module docstring), with ``'total'``.
      learner_loss: ``(params, x_hat, y, a) -> (1/b) sum_j a_j f(w; x_hat_j, y_j)`` (b = len(y)).
      fit: ``fit(state, shard, count) -> NodeState``, the node's state fitted on its own shard
        ``{'x': (L, ...), 'y': (L,)}`` before round 0 (its sample codec's ``fit``); None when the
        sample codec has none.
    """

    init: Callable[[PyTree], NodeState]
    init_learner: Callable[[], PyTree]
    node_message: Callable[..., tuple[NodeMessage, NodeState]]
    received: Callable[..., tuple[tuple[Array, Array, Array], PyTree]]
    decoded_correction: Callable[[NodeMessage], PyTree | None]
    uplink_bits: Callable[[NodeMessage], dict]
    learner_loss: Callable[..., Array]
    fit: Callable[..., NodeState] | None = None


def full_gradient(loss_fn: Callable[..., Array]) -> Callable[..., PyTree]:
    """The full-precision reference: ``(params, x, y) -> grad_w (1/b) sum_j f(w; x_j, y_j)``.

    This is what E[g_i | w] equals with the correction on and every codec unbiased.
    """
    return jax.grad(lambda params, x, y: jnp.mean(loss_fn(params, x, y)))


def _ordered_parts(parts: dict) -> dict:
    ordered = {k: parts[k] for k in PARTS if k in parts}
    ordered.update({k: v for k, v in parts.items() if k not in ordered})
    ordered["total"] = sum(ordered.values())
    return ordered


def estimator(loss_fn: Callable[..., Array], samples: DataCodec, *, gate: gates.Gate = gates.no_gate(),
              correction: Correction = no_correction(), score_fn: Callable[..., Array] | None = None,
              check_batch: Callable | None = None,
              labels_as_sent: Callable[[Array], Array] = lambda y: y) -> Estimator:
    """One node's estimator composed of a sample codec, a gate and a correction (module docstring).

    Args:
      loss_fn: ``(params, x, y) -> (b,)`` per-sample losses f(w; x_j, y_j).
      samples: a :class:`DataCodec` of ``{'x': (b, *sample_shape), 'y': (b,)}``.
      gate: the importance gate (default every sample sent).
      correction: the correction term (default none).
      score_fn: ``(params, x, y) -> (b,)`` scores for the gate; default the per-sample loss. Only
        evaluated when the gate has rho < 1.
      check_batch: ``batch -> (x, y)``, raising ValueError for a bad batch; default
        :func:`qdata.checks.check_batch` for real-valued fp32 targets.
      labels_as_sent: ``y -> y~``, the labels as the learner will read them on the sent rows (exact
        labels: y itself; fp16 targets: y rounded). The node corrects against y~, computed here from
        y directly rather than decoded from its own label stream: the same values, and the same
        compiled arithmetic as before the recomposition (a decoded y~ changes XLA's fusion, and with
        it the correction's last bits on a multi-device mesh).
    """
    if check_batch is None:
        check_batch = functools.partial(checks.check_batch, num_classes=None, target_dtype=jnp.float32)
    if not isinstance(gate, gates.Gate):
        raise ValueError(f"gate must be a qdata.gate.Gate, got {type(gate).__name__}")
    score_fn = gates.loss_score(loss_fn) if score_fn is None else score_fn

    def init(params):
        return NodeState(samples=samples.init(), correction=correction.init(params))

    def node_message(key, params, batch, state):
        """Steps 1-3 at node i: gate, code, correct. Returns (NodeMessage, new state)."""
        x, y = check_batch(batch)
        k_gate, k_data, k_corr = jax.random.split(key, 3)
        selection = gates.select(gate, score_fn, k_gate, params, x, y)
        weights, bitmap = gates.selection_payloads(gate, selection)
        mask = selection.mask
        # Counted locally, never sent: the samples this message carries (the gate's choice).
        bitmap = bitmap.replace(info={"samples_sent": count_items(mask)})
        payload, codec_state = samples.encode(k_data, {"x": x, "y": y}, state.samples, mask, batch.get("pos"))
        # The node decodes its own message so that it uses exactly the Q(x_j) and a_j the learner
        # will use (and y~_j, the labels as sent); then delta is unbiased for what the learner misses.
        view = samples.decode(payload, codec_state, mask)
        a = gates.received_weights(gate, weights, mask)
        y_sent = labels_as_sent(y)
        corr, corr_state = correction.encode(k_corr, params, x, y, view["x"], y_sent, a, state.correction)
        message = NodeMessage(samples=payload, weights=weights, mask=bitmap, correction=corr, batch=x.shape[0])
        return message, NodeState(samples=codec_state, correction=corr_state)

    def received(message: NodeMessage, learner_state):
        """Step 4's inputs for one node, from what crossed the link only: the samples (x_hat, y, a)
        and the learner's state after the message."""
        mask = gates.received_mask(gate, message.mask, message.batch)
        learner_state = samples.receive(message.samples, learner_state, mask)
        view = samples.decode(message.samples, learner_state, mask)
        return (view["x"], view["y"], gates.received_weights(gate, message.weights, mask)), learner_state

    def uplink_bits(message: NodeMessage) -> dict:
        """Exact bits of one node's message, by part (vmap it over nodes; convert on the host)."""
        mask = gates.received_mask(gate, message.mask, message.batch)
        parts = dict(samples.bits(message.samples, mask))
        parts["weights"] = payload_bits(message.weights, mask)
        parts["mask"] = Bits.of(payload_bits(message.mask))
        parts["correction"] = Bits.of(correction.bits(message.correction))
        return _ordered_parts(parts)

    def fit(state, shard, count):
        return state._replace(samples=samples.fit(state.samples, shard, count))

    return Estimator(init=init, init_learner=samples.init, node_message=node_message, received=received,
                     decoded_correction=lambda message: correction.decode(message.correction),
                     uplink_bits=uplink_bits, learner_loss=weighted_mean_loss(loss_fn),
                     fit=None if samples.fit is None else fit)
