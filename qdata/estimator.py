"""The qdata estimator for one node: what the node sends, what the learner computes from it, in bits.

DESIGN.md section 2, steps 1-4, for one node i with minibatch {(x_j, y_j)}_{j=1..b}:

1. gate: scores s_j -> probabilities p_j -> mask m_j and weights a_j (:mod:`qdata.gate`);
2. data quantizer Q: the node sends Q(x_j) and y_j (ceil(log2 C) bits) for the transmitted samples;
3. correction (optional): delta_i = (1/b) sum_j a_j (grad_w f(w; x_j, y_j) - grad_w f(w; Q(x_j), y_j)),
   from two a-weighted batched backward passes, sent as C(delta_i) through a vector compressor C;
4. learner: g_i = (1/b) sum_j a_j grad_w f(w; Q(x_j), y_j) + C(delta_i). Averaging g_i over the N
   nodes is the caller's job (:mod:`qdata.methods`).

With the correction on and Q, C and the gate unbiased, E[g_i | w] = (1/b) sum_j grad_w f(w; x_j, y_j),
the node's full-precision minibatch gradient (:func:`full_gradient`). Without it the bias is at most
L_x * E||x - Q(x)||, L_x the Lipschitz constant of x -> grad_w f(w; x, y).

What crosses the link is a :class:`NodeMessage`, every field a :class:`~qdata.codecs.base.Payload`
of packed arrays; :func:`qdata_estimator`'s ``uplink_bits`` reads the bits off those arrays:

* ``data``: the quantizer's payload, all b rows kept (static shapes for jit), the rows of samples that
  are not transmitted zeroed so that nothing the learner reads depends on them; only transmitted rows
  are counted.
* ``labels``: the labels of the transmitted samples, in order, packed at ceil(log2 C) bits each into
  one stream (:func:`~qdata.codecs.base.pack_codes`); the node sends the prefix of the stream that
  holds them, ``ceil(m * w / word) * word`` bits for m labels of w bits in words of ``word`` bits.
* ``weights``: p~_j in fp16 for the transmitted samples (Bernoulli gate only; both sides compute
  a_j = 1 / p~_j, see :mod:`qdata.gate`).
* ``mask``: with a gate (rho < 1), a b-bit bitmap telling the learner which samples arrived (also what
  a cache keyed by sample id needs). With rho = 1 every sample arrives and nothing is sent.
* ``correction``: the compressor's payload of delta_i.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata.codecs import base
from qdata.codecs.base import Compressor, EmptyState, Payload, Quantizer
from qdata.gate import Gate, Selection, loss_score, no_gate

Array = jax.Array
PyTree = Any


@struct.dataclass
class NodeMessage:
    """One node's uplink message: everything in it crosses the link.

    Attributes:
      data: quantized samples, the quantizer's payload (rows of untransmitted samples zeroed).
      labels: ``arrays['labels']``, the transmitted labels packed at ceil(log2 C) bits, in sample order,
        at the front of the stream (the rest is zero padding that is not sent).
      weights: ``rows['prob']``, fp16 p~_j per sample (Bernoulli gate); empty otherwise.
      mask: ``arrays['bitmap']``, the b-bit bitmap of transmitted samples (rho < 1); empty otherwise.
      correction: the compressor's payload of C(delta_i); empty without a correction.
    """

    data: Payload
    labels: Payload
    weights: Payload
    mask: Payload
    correction: Payload


class LabelMeta(NamedTuple):
    """Static side of the label stream: batch size b, code width w = ceil(log2 C), classes C."""

    batch: int
    width: int
    num_classes: int


class Estimator(NamedTuple):
    """The qdata estimator for one node, in the optax style (pure functions, explicit state and keys).

    Attributes:
      init: ``init(params) -> state``, the correction compressor's state (EmptyState without one).
      node_message: ``node_message(key, params, batch, state) -> (NodeMessage, state)``.
      learner_gradient: ``learner_gradient(params, message) -> grads`` (a pytree like params), g_i.
      uplink_bits: ``uplink_bits(message) -> dict`` of int32 scalars: 'data', 'labels', 'weights',
        'metadata', 'mask', 'correction' and 'total'.
    """

    init: Callable[[PyTree], PyTree]
    node_message: Callable[..., tuple[NodeMessage, PyTree]]
    learner_gradient: Callable[[PyTree, NodeMessage], PyTree]
    uplink_bits: Callable[[NodeMessage], dict]


def full_gradient(loss_fn: Callable[..., Array]) -> Callable[..., PyTree]:
    """The full-precision reference: ``(params, x, y) -> grad_w (1/b) sum_j f(w; x_j, y_j)``.

    This is what E[g_i | w] equals with the correction on and every codec unbiased.
    """
    return jax.grad(lambda params, x, y: jnp.mean(loss_fn(params, x, y)))


def _stream_prefix_bits(count: Array, width: int) -> Array:
    """Bits of the prefix of a :func:`base.pack_codes` stream that holds its first ``count`` codes.

    The stream's words are ``code_dtype(width)`` (uint8 for widths that do not fill a word), so the
    prefix is ``ceil(count * width / word)`` whole words.
    """
    word = np.dtype(base.code_dtype(width)).itemsize * 8
    count = jnp.asarray(count, jnp.int32)
    return ((count * width + word - 1) // word) * word


def _keep_rows(payload: Payload, mask: Array) -> Payload:
    """Zero the rows of untransmitted samples, so that what the learner reads is what was sent."""

    def keep(a):
        m = mask.reshape((-1,) + (1,) * (a.ndim - 1)) > 0
        return jnp.where(m, a, jnp.zeros_like(a))

    return payload.replace(rows=jax.tree_util.tree_map(keep, payload.rows))


def _check_batch(batch, num_classes: int) -> tuple[Array, Array]:
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("batch must be a dict with keys 'x' (b, *sample_shape) and 'y' (b,)")
    x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"batch['x'] must be a float array of shape (b, *sample_shape), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"batch['y'] must have shape (b,) = ({x.shape[0]},) to match batch['x'], got {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"batch['y'] must hold integer labels, got dtype {y.dtype}")
    base.check_finite(x, "batch['x']")
    if base.is_concrete(y):
        yv = np.asarray(y)
        if yv.size and (yv.min() < 0 or yv.max() >= num_classes):
            raise ValueError(f"batch['y'] labels must be in 0..{num_classes - 1}, got range {yv.min()}..{yv.max()}")
    return x, y


def _code_rows(payload: Payload) -> Payload:
    """The rows of a quantizer payload that hold the sample codes: ``rows['codes']`` by the quantizer
    contract (:mod:`qdata.codecs.quantizers`); for a quantizer without that key, its unsigned-integer
    rows (packed code words), everything else (ranges, seeds) being metadata."""
    if "codes" in payload.rows:
        return Payload(rows={"codes": payload.rows["codes"]})
    rows = {k: v for k, v in payload.rows.items() if jnp.issubdtype(v.dtype, jnp.unsignedinteger)}
    return Payload(rows=rows)


def qdata_estimator(
    loss_fn: Callable[..., Array],
    quantizer: Quantizer,
    *,
    num_classes: int,
    gate: Gate = no_gate(),
    correction: Compressor | None = None,
    score_fn: Callable[..., Array] | None = None,
) -> Estimator:
    """Build the qdata node message, learner gradient and bit ledger (DESIGN.md section 2).

    Args:
      loss_fn: ``(params, x, y) -> (b,)`` per-sample losses f(w; x_j, y_j).
      quantizer: the data quantizer Q (:mod:`qdata.codecs.quantizers`).
      num_classes: C; labels travel at ceil(log2 C) bits.
      gate: the importance gate (default :func:`qdata.gate.no_gate`, every sample sent).
      correction: the vector compressor C of the gradient-difference correction; None to send none.
      score_fn: ``(params, x, y) -> (b,)`` scores for the gate; default the per-sample loss. Only
        evaluated when the gate has rho < 1.

    Returns:
      An :class:`Estimator`. With the correction on and ``quantizer``, ``correction`` and ``gate`` all
      unbiased, ``E[learner_gradient(params, node_message(key, params, batch, state)[0])]`` equals
      ``full_gradient(loss_fn)(params, batch['x'], batch['y'])``.
    """
    num_classes = base.check_int(num_classes, "num_classes", lo=1)
    if not all(hasattr(quantizer, name) for name in ("encode", "decode", "bits")):
        raise ValueError(f"quantizer must be a base.Quantizer (encode, decode, bits), got {type(quantizer).__name__}")
    if not isinstance(gate, Gate):
        raise ValueError(f"gate must be a qdata.gate.Gate, got {type(gate).__name__}")
    if correction is not None and not isinstance(correction, Compressor):
        raise ValueError(f"correction must be a base.Compressor or None, got {type(correction).__name__}")
    if score_fn is None:
        score_fn = loss_score(loss_fn)
    width = base.index_width(num_classes)
    gated = gate.rho < 1.0
    sends_weights = gated and gate.weighted

    def weighted_mean_loss(params, x, y, a):
        # a_j = 0 rows are masked out of the sum so that an odd decoded value there cannot leak in.
        losses = loss_fn(params, x, y)
        return jnp.sum(jnp.where(a > 0, a * losses, 0.0)) / x.shape[0]

    def init(params):
        return correction.init(params) if correction is not None else EmptyState()

    def node_message(key, params, batch, state):
        """Steps 1-3 at node i: gate, quantize, correct. Returns (NodeMessage, new correction state).

        Shapes and dtypes of ``batch`` are checked always (also under jit); NaN/inf in ``batch['x']``
        and labels outside 0..C-1 only when the values are concrete (not traced).
        """
        x, y = _check_batch(batch, num_classes)
        b = x.shape[0]
        k_gate, k_data, k_corr = jax.random.split(key, 3)

        if gated:
            sel = gate.select(k_gate, score_fn(params, x, y))
        else:
            ones = jnp.ones((b,), jnp.float32)
            sel = Selection(mask=ones, weight=ones, prob=ones)
        mask = sel.mask

        data = _keep_rows(quantizer.encode(k_data, x), mask)

        # Transmitted labels first, in sample order (stable sort on "not sent"), zeros after them.
        order = jnp.argsort(1 - mask.astype(jnp.int32), stable=True)
        sent_labels = jnp.where(mask[order] > 0, y[order], 0)
        labels = Payload(
            arrays={"labels": base.pack_codes(sent_labels, width)}, meta=LabelMeta(b, width, num_classes)
        )

        weights = Payload(rows={"prob": jnp.where(mask > 0, sel.prob, 0.0).astype(jnp.float16)}) if sends_weights else Payload()
        bitmap = Payload(arrays={"bitmap": base.pack_codes(mask.astype(jnp.uint32), 1)}) if gated else Payload()

        if correction is not None:
            # The node decodes its own message so that it uses exactly the Q(x_j) and a_j the learner
            # will use; then delta is unbiased for what the learner misses.
            x_hat = _decoded(data, mask)
            a = _weights_from(weights, mask)
            g_x = jax.grad(weighted_mean_loss)(params, x, y, a)
            g_q = jax.grad(weighted_mean_loss)(params, x_hat, y, a)
            delta = jax.tree_util.tree_map(jnp.subtract, g_x, g_q)
            corr, state = correction.encode(k_corr, delta, state)
        else:
            corr = Payload()
        message = NodeMessage(data=data, labels=labels, weights=weights, mask=bitmap, correction=corr)
        return message, state

    def _decoded(data: Payload, mask: Array) -> Array:
        x_hat = quantizer.decode(data)
        m = mask.reshape((-1,) + (1,) * (x_hat.ndim - 1)) > 0
        return jnp.where(m, x_hat, jnp.zeros_like(x_hat))

    def _weights_from(weights: Payload, mask: Array) -> Array:
        if not sends_weights:
            return mask.astype(jnp.float32)
        p = weights.rows["prob"].astype(jnp.float32)
        return jnp.where(mask > 0, 1.0 / jnp.where(p > 0, p, 1.0), 0.0)

    def _received_mask(message: NodeMessage) -> Array:
        b = message.labels.meta.batch
        if not gated:
            return jnp.ones((b,), jnp.float32)
        return base.unpack_codes(message.mask.arrays["bitmap"], 1, b).astype(jnp.float32)

    def _received_labels(message: NodeMessage, mask: Array) -> Array:
        meta: LabelMeta = message.labels.meta
        stream = base.unpack_codes(message.labels.arrays["labels"], meta.width, meta.batch).astype(jnp.int32)
        position = jnp.cumsum(mask.astype(jnp.int32)) - 1
        return jnp.where(mask > 0, stream[jnp.clip(position, 0, meta.batch - 1)], 0)

    def learner_gradient(params, message: NodeMessage):
        """Step 4 for one node: g_i = (1/b) sum_j a_j grad_w f(w; Q(x_j), y_j) + C(delta_i), read
        from what crossed the link only (bitmap, codes, label stream, fp16 p~_j, correction)."""
        mask = _received_mask(message)
        x_hat = _decoded(message.data, mask)
        y = _received_labels(message, mask)
        a = _weights_from(message.weights, mask)
        g = jax.grad(weighted_mean_loss)(params, x_hat, y, a)
        if correction is not None:
            g = jax.tree_util.tree_map(lambda u, v: u + v.astype(u.dtype), g, correction.decode(message.correction))
        return g

    def uplink_bits(message: NodeMessage) -> dict:
        """Exact bits of one node's message, part by part, read off the packed arrays (int32 scalars;
        vmap it over nodes, as :func:`base.payload_bits` counts one node at a time)."""
        mask = _received_mask(message)
        sent = jnp.sum(mask > 0).astype(jnp.int32)
        quantizer_bits = jnp.asarray(quantizer.bits(message.data, mask), jnp.int32)
        codes = jnp.asarray(base.payload_bits(_code_rows(message.data), mask), jnp.int32)
        bits = {
            "data": codes,
            "labels": _stream_prefix_bits(sent, message.labels.meta.width),
            "weights": jnp.asarray(base.payload_bits(message.weights, mask), jnp.int32),
            # What the quantizer sends besides the codes: per-sample ranges of transmitted rows, a seed.
            "metadata": quantizer_bits - codes,
            "mask": jnp.asarray(base.payload_bits(message.mask), jnp.int32),
            "correction": jnp.asarray(correction.bits(message.correction) if correction is not None else 0, jnp.int32),
        }
        bits["total"] = sum(bits.values())
        return bits

    return Estimator(init=init, node_message=node_message, learner_gradient=learner_gradient, uplink_bits=uplink_bits)
