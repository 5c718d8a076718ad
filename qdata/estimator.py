"""The qdata estimator for one node: what the node sends, what the learner computes from it, in bits.

DESIGN.md section 2, steps 1-4, for one node i with minibatch {(x_j, y_j)}_{j=1..b}:

1. gate: scores s_j -> probabilities p_j -> mask m_j and weights a_j (:mod:`qdata.gate`);
2. data quantizer Q: the node sends Q(x_j) and y_j (ceil(log2 C) bits for a label of C classes, or a
   real-valued target as an fp32/fp16 value) for the transmitted samples;
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
  Real-valued targets (``num_classes=None``, regression) travel the same way as values of
  ``target_dtype`` (fp32 by default, or fp16): the stream is an fp32/fp16 array holding the m
  transmitted targets first, and its prefix is exactly 32 m (16 m) bits. Targets are sent exactly
  as the learner uses them: the node computes its correction against the same rounded y~_j.
* ``weights``: p~_j in fp16 for the transmitted samples (Bernoulli gate only; both sides compute
  a_j = 1 / p~_j, see :mod:`qdata.gate`).
* ``mask``: with a gate (rho < 1), a b-bit bitmap telling the learner which samples arrived (also what
  a cache keyed by sample id needs). With rho = 1 every sample arrives and nothing is sent.
* ``correction``: the compressor's payload of delta_i.
* ``positions`` (with a cache only): each transmitted sample's position in the node's shard
  (ceil(log2 cache_size) bits) and a b-bit bitmap of the *fresh* ones, those the learner has not
  received before.

The learner-side cache (``cache_size`` set). The learner keeps, per node, the quantized rows and
labels it has received, keyed by the sample's position in the node's shard; the node keeps the
same rows (what it sent) and a bitmap of what the learner holds. A transmitted sample already
held is sent as its position alone: no codes, no label. Both sides then use the *same* Q(x_j) as
when it was first sent, so the correction delta_i (computed at the node against that Q(x_j))
still makes g_i unbiased; without a correction the quantized dataset is fixed once received.
Quantizers with per-message side information (subtractive dither's seed) cannot be cached.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata.codecs import base
from qdata.codecs.base import Compressor, EmptyState, Payload, Quantizer
from qdata.codecs.ledger import Bits
from qdata.gate import Gate, Selection, loss_score, no_gate

Array = jax.Array
PyTree = Any


@struct.dataclass
class NodeMessage:
    """One node's uplink message: everything in it crosses the link.

    Attributes:
      data: quantized samples, the quantizer's payload (rows of untransmitted samples zeroed).
      labels: ``arrays['labels']``, the transmitted labels packed at ceil(log2 C) bits (real targets:
        values of the target dtype), in sample order, at the front of the stream (the rest is zero
        padding that is not sent).
      weights: ``rows['prob']``, fp16 p~_j per sample (Bernoulli gate); empty otherwise.
      mask: ``arrays['bitmap']``, the b-bit bitmap of transmitted samples (rho < 1); empty otherwise.
      correction: the compressor's payload of C(delta_i); empty without a correction.
    """

    data: Payload
    labels: Payload
    weights: Payload
    mask: Payload
    correction: Payload
    positions: Payload = struct.field(default_factory=Payload)


class NodeCache(NamedTuple):
    """The node's record of what the learner holds: the rows it sent, and which positions."""

    rows: PyTree  # the quantizer's payload rows, (cache_size, ...)
    sent: Array  # (cache_size,) bool


class CachedState(NamedTuple):
    """Node state of an estimator with a cache: the correction's state and the node's cache."""

    correction: PyTree
    cache: NodeCache


class LearnerCache(NamedTuple):
    """One node's samples as held by the learner: quantized rows and labels, by shard position."""

    rows: PyTree  # (cache_size, ...)
    labels: Array  # (cache_size,) int32 labels, or real targets in the estimator's target dtype


class LabelMeta(NamedTuple):
    """Static side of a stream (labels or positions): batch size b, code width w = ceil(log2 C), C.

    For real-valued targets ``num_classes`` is None, ``dtype`` names the float type the values travel
    in ('float32' or 'float16') and ``width`` is its bit size (32 or 16).
    """

    batch: int
    width: int
    num_classes: int | None
    dtype: str | None = None


class Estimator(NamedTuple):
    """The qdata estimator for one node, in the optax style (pure functions, explicit state and keys).

    Attributes:
      init: ``init(params) -> state``, the correction compressor's state (EmptyState without one).
      node_message: ``node_message(key, params, batch, state) -> (NodeMessage, state)``.
      learner_gradient: ``learner_gradient(params, message) -> grads`` (a pytree like params), g_i.
      uplink_bits: ``uplink_bits(message) -> dict`` of exact :class:`~qdata.codecs.ledger.Bits`:
        'data', 'labels', 'weights', 'metadata', 'mask', 'correction', 'positions' and 'total'.
      init_cache: with a cache, ``init_cache() -> LearnerCache``, the learner's empty cache for one node.
      learner_gradient_cached: with a cache, ``(params, message, cache) -> (grads, cache)``; the
        learner fills the cache from the fresh rows, then reads every transmitted row from it.
      received: ``(message, cache=None) -> ((x_hat, y, a), cache)``, the samples the learner reads
        off a message (a_j = 0 for samples not sent; y int32 labels, or real targets in the target
        dtype); with ``learner_loss`` and
        ``decoded_correction`` this lets a learner of N nodes take one backward pass over all N*b
        samples instead of N (see :mod:`qdata.methods.qdata`).
      decoded_correction: ``message -> C(delta_i)`` (None without a correction).
      learner_loss: ``(params, x_hat, y, a) -> (1/b) sum_j a_j f(w; x_hat_j, y_j)`` (b = len(y)).
    """

    init: Callable[[PyTree], PyTree]
    node_message: Callable[..., tuple[NodeMessage, PyTree]]
    learner_gradient: Callable[[PyTree, NodeMessage], PyTree]
    uplink_bits: Callable[[NodeMessage], dict]
    init_cache: Callable[..., Any] | None = None
    learner_gradient_cached: Callable[..., tuple[PyTree, Any]] | None = None
    received: Callable[..., tuple[tuple[Array, Array, Array], Any]] | None = None
    decoded_correction: Callable[[NodeMessage], PyTree | None] | None = None
    learner_loss: Callable[..., Array] | None = None


def full_gradient(loss_fn: Callable[..., Array]) -> Callable[..., PyTree]:
    """The full-precision reference: ``(params, x, y) -> grad_w (1/b) sum_j f(w; x_j, y_j)``.

    This is what E[g_i | w] equals with the correction on and every codec unbiased.
    """
    return jax.grad(lambda params, x, y: jnp.mean(loss_fn(params, x, y)))


def _stream_prefix_bits(count: Array, width: int) -> Bits:
    """Bits of the prefix of a :func:`base.pack_codes` stream that holds its first ``count`` codes.

    The stream's words are ``code_dtype(width)`` (uint8 for widths that do not fill a word), so the
    prefix is ``ceil(count * width / word)`` whole words. A stream of real targets (fp32 or fp16
    values, ``width`` 32 or 16) has one value per word: exactly ``count * width`` bits. Returned as
    that number of words times the word's bits (an exact :class:`Bits`).
    """
    word = np.dtype(base.code_dtype(width)).itemsize * 8
    # ceil(count w / word) without forming count * w, which leaves int32 long before the word count
    # does: with g = gcd(w, word), count = q (word/g) + r gives q (w/g) + ceil(r (w/g) / (word/g)).
    g = math.gcd(width, word)
    w, per = width // g, word // g
    count = jnp.asarray(count, jnp.int32)
    q, r = count // per, count % per
    return Bits.count(q * w + (r * w + per - 1) // per, word)


def _keep_rows(payload: Payload, mask: Array) -> Payload:
    """Zero the rows of untransmitted samples, so that what the learner reads is what was sent."""

    def keep(a):
        m = mask.reshape((-1,) + (1,) * (a.ndim - 1)) > 0
        return jnp.where(m, a, jnp.zeros_like(a))

    return payload.replace(rows=jax.tree_util.tree_map(keep, payload.rows))


TARGET_DTYPES = ("float32", "float16")


def _check_batch(batch, num_classes: int | None, target_dtype=None) -> tuple[Array, Array]:
    """(x, y) of a checked batch; for real targets (``num_classes`` None) y in float32 or wider."""
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("batch must be a dict with keys 'x' (b, *sample_shape) and 'y' (b,)")
    x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"batch['x'] must be a float array of shape (b, *sample_shape), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"batch['y'] must have shape (b,) = ({x.shape[0]},) to match batch['x'], got {y.shape}")
    if num_classes is None:
        return x, _check_targets(x, y, target_dtype)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"batch['y'] must hold integer labels, got dtype {y.dtype}")
    base.check_finite(x, "batch['x']")
    if base.is_concrete(y):
        yv = np.asarray(y)
        if yv.size and (yv.min() < 0 or yv.max() >= num_classes):
            raise ValueError(f"batch['y'] labels must be in 0..{num_classes - 1}, got range {yv.min()}..{yv.max()}")
    return x, y


def _check_target_dtype(value) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in TARGET_DTYPES:
        raise ValueError(f"target_dtype must be one of {TARGET_DTYPES}, got {value!r}")
    return dtype


def _check_targets(x: Array, y: Array, target_dtype) -> Array:
    # Integer targets (counts, ordinal scores) are real values too: taken as float32.
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)):
        raise ValueError(f"batch['y'] must hold real-valued targets (float or integer), got dtype {y.dtype}")
    y = y if jnp.issubdtype(y.dtype, jnp.floating) else y.astype(jnp.float32)
    base.check_finite(x, "batch['x']")
    base.check_finite(y, "batch['y']")
    if base.is_concrete(y) and y.size:
        # A target beyond the wire type's range would arrive as inf.
        top, largest = float(np.max(np.abs(np.asarray(y, np.float64)))), float(jnp.finfo(target_dtype).max)
        if top > largest:
            raise ValueError(f"batch['y'] targets must fit target_dtype {np.dtype(target_dtype).name} "
                             f"(|y| <= {largest:g}), got max |y| = {top:g}")
    return y


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
    num_classes: int | None,
    target_dtype=None,
    gate: Gate = no_gate(),
    correction: Compressor | None = None,
    score_fn: Callable[..., Array] | None = None,
    cache_size: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> Estimator:
    """Build the qdata node message, learner gradient and bit ledger (DESIGN.md section 2).

    Args:
      loss_fn: ``(params, x, y) -> (b,)`` per-sample losses f(w; x_j, y_j).
      quantizer: the data quantizer Q (:mod:`qdata.codecs.quantizers`).
      num_classes: C; labels are integers in 0..C-1 and travel at ceil(log2 C) bits. None for
        real-valued targets (regression): ``batch['y']`` is then a float (b,) array (integer arrays
        are taken as real values, cast), sent as ``target_dtype`` values, 8 * itemsize bits each.
      target_dtype: with ``num_classes=None``, the type the targets travel and are cached in:
        ``jnp.float32`` (default; exact for float32 targets) or ``jnp.float16`` (half the bits; the
        learner then sees y rounded to fp16, which the correction, when on, compensates: the node
        corrects against the rounded y). Must be left None with integer labels.
      gate: the importance gate (default :func:`qdata.gate.no_gate`, every sample sent).
      correction: the vector compressor C of the gradient-difference correction; None to send none.
      score_fn: ``(params, x, y) -> (b,)`` scores for the gate; default the per-sample loss. Only
        evaluated when the gate has rho < 1.
      cache_size: turn on the learner-side cache (module docstring) for nodes holding up to this
        many samples; ``batch['pos']`` (b,) must then give each sample's position in the node's shard.
      sample_shape: the shape of one sample; required with ``cache_size``.

    Returns:
      An :class:`Estimator`. With the correction on and ``quantizer``, ``correction`` and ``gate`` all
      unbiased, ``E[learner_gradient(params, node_message(key, params, batch, state)[0])]`` equals
      ``full_gradient(loss_fn)(params, batch['x'], batch['y'])``.
    """
    real_targets = num_classes is None
    if real_targets:
        target_dtype = _check_target_dtype(jnp.float32 if target_dtype is None else target_dtype)
    else:
        num_classes = base.check_int(num_classes, "num_classes", lo=1)
        if target_dtype is not None:
            raise ValueError("target_dtype is for real-valued targets (num_classes=None); integer labels "
                             f"travel at ceil(log2 C) bits, got target_dtype={target_dtype!r} with num_classes={num_classes}")
    if not all(hasattr(quantizer, name) for name in ("encode", "decode", "bits")):
        raise ValueError(f"quantizer must be a base.Quantizer (encode, decode, bits), got {type(quantizer).__name__}")
    if not isinstance(gate, Gate):
        raise ValueError(f"gate must be a qdata.gate.Gate, got {type(gate).__name__}")
    if correction is not None and not isinstance(correction, Compressor):
        raise ValueError(f"correction must be a base.Compressor or None, got {type(correction).__name__}")
    cached = cache_size is not None
    if cached:
        cache_size = base.check_int(cache_size, "cache_size", lo=1)
        if sample_shape is None:
            raise ValueError("sample_shape is required with cache_size (the cache holds quantized samples)")
        sample_shape = tuple(int(s) for s in sample_shape)
        template = jax.eval_shape(quantizer.encode, jax.random.PRNGKey(0), jnp.zeros((1,) + sample_shape))
        if template.arrays:
            raise ValueError(
                f"this quantizer sends per-message side information ({sorted(template.arrays)}), so its "
                "codes cannot be cached and decoded later; use a quantizer without it (e.g. stochastic "
                "rounding or per-sample ranges) or cache_size=None")
        row_template = template.rows
        pos_width = base.index_width(cache_size)
    if score_fn is None:
        score_fn = loss_score(loss_fn)
    if real_targets:
        width = target_dtype.itemsize * 8
        label_meta = lambda b: LabelMeta(b, width, None, target_dtype.name)
    else:
        width = base.index_width(num_classes)
        label_meta = lambda b: LabelMeta(b, width, num_classes)
    label_dtype = target_dtype if real_targets else jnp.int32
    gated = gate.rho < 1.0
    sends_weights = gated and gate.weighted

    def weighted_mean_loss(params, x, y, a):
        # a_j = 0 rows are masked out of the sum so that an odd decoded value there cannot leak in.
        losses = loss_fn(params, x, y)
        return jnp.sum(jnp.where(a > 0, a * losses, 0.0)) / x.shape[0]

    def init(params):
        corr_state = correction.init(params) if correction is not None else EmptyState()
        if not cached:
            return corr_state
        rows = jax.tree_util.tree_map(lambda t: jnp.zeros((cache_size,) + t.shape[1:], t.dtype), row_template)
        return CachedState(corr_state, NodeCache(rows=rows, sent=jnp.zeros((cache_size,), bool)))

    def init_cache():
        rows = jax.tree_util.tree_map(lambda t: jnp.zeros((cache_size,) + t.shape[1:], t.dtype), row_template)
        return LearnerCache(rows=rows, labels=jnp.zeros((cache_size,), label_dtype))

    def _ordered(values: Array, keep: Array) -> Array:
        # Kept values first, in sample order (stable sort on "not kept"), zeros after them.
        order = jnp.argsort(1 - keep.astype(jnp.int32), stable=True)
        return jnp.where(keep[order] > 0, values[order], 0)

    def _ordered_stream(values: Array, keep: Array, bits_each: int) -> Array:
        return base.pack_codes(_ordered(values, keep), bits_each)

    def _label_stream(y_sent: Array, keep: Array) -> Array:
        # Real targets are sent as values of the wire type (already cast), not packed codes.
        return _ordered(y_sent, keep) if real_targets else _ordered_stream(y_sent, keep, width)

    def _scatter_rows(table, rows, pos, keep):
        # Rows not kept are sent out of range and dropped by the scatter.
        where = jnp.where(keep > 0, pos, jax.tree_util.tree_leaves(table)[0].shape[0])
        return jax.tree_util.tree_map(lambda t, r: t.at[where].set(r.astype(t.dtype), mode="drop"), table, rows)

    def _gather_rows(table, pos):
        return jax.tree_util.tree_map(lambda t: t[pos], table)

    def node_message(key, params, batch, state):
        """Steps 1-3 at node i: gate, quantize, correct. Returns (NodeMessage, new state).

        Shapes and dtypes of ``batch`` are checked always (also under jit); NaN/inf in ``batch['x']``
        and labels outside 0..C-1 (real targets: NaN/inf, or beyond the target dtype's range) only
        when the values are concrete (not traced).
        """
        x, y = _check_batch(batch, num_classes, target_dtype)
        # y as the learner will read it: real targets rounded to the wire type (exact for fp32).
        y_sent = y.astype(target_dtype) if real_targets else y
        b = x.shape[0]
        k_gate, k_data, k_corr = jax.random.split(key, 3)

        if gated:
            sel = gate.select(k_gate, score_fn(params, x, y))
        else:
            ones = jnp.ones((b,), jnp.float32)
            sel = Selection(mask=ones, weight=ones, prob=ones)
        mask = sel.mask

        encoded = quantizer.encode(k_data, x)
        positions = Payload()
        if cached:
            corr_state, node_cache = state
            if "pos" not in batch:
                raise ValueError("batch['pos'] (each sample's position in the node's shard) is required with a cache")
            pos = jnp.asarray(batch["pos"], jnp.int32)
            # Fresh: transmitted, not yet at the learner, and the first transmitted copy in this batch.
            earlier = jnp.tril(pos[:, None] == pos[None, :], k=-1) & (mask[None, :] > 0)
            fresh = ((mask > 0) & ~node_cache.sent[pos] & ~jnp.any(earlier, axis=1)).astype(jnp.float32)
            node_cache = NodeCache(rows=_scatter_rows(node_cache.rows, encoded.rows, pos, fresh),
                                   sent=node_cache.sent.at[jnp.where(fresh > 0, pos, cache_size)].set(True, mode="drop"))
            # Every transmitted sample is used as the learner holds it: as first sent.
            encoded = encoded.replace(rows=_gather_rows(node_cache.rows, pos))
            positions = Payload(arrays={"positions": _ordered_stream(pos, mask, pos_width),
                                        "fresh": base.pack_codes(fresh.astype(jnp.uint32), 1)},
                                meta=LabelMeta(b, pos_width, cache_size))
        else:
            corr_state = state
            fresh = mask

        data = _keep_rows(encoded, fresh)
        labels = Payload(arrays={"labels": _label_stream(y_sent, fresh)}, meta=label_meta(b))
        weights = Payload(rows={"prob": jnp.where(mask > 0, sel.prob, 0.0).astype(jnp.float16)}) if sends_weights else Payload()
        bitmap = Payload(arrays={"bitmap": base.pack_codes(mask.astype(jnp.uint32), 1)}) if gated else Payload()

        if correction is not None:
            # The node decodes its own message so that it uses exactly the Q(x_j), y~_j and a_j the
            # learner will use; then delta is unbiased for what the learner misses.
            x_hat = _decoded(_keep_rows(encoded, mask), mask)
            a = _weights_from(weights, mask)
            g_x = jax.grad(weighted_mean_loss)(params, x, y, a)
            g_q = jax.grad(weighted_mean_loss)(params, x_hat, y_sent, a)
            delta = jax.tree_util.tree_map(jnp.subtract, g_x, g_q)
            corr, corr_state = correction.encode(k_corr, delta, corr_state)
        else:
            corr = Payload()
        message = NodeMessage(data=data, labels=labels, weights=weights, mask=bitmap, correction=corr,
                              positions=positions)
        state = CachedState(corr_state, node_cache) if cached else corr_state
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

    def _fresh_mask(message: NodeMessage, mask: Array) -> Array:
        if not cached:
            return mask
        return base.unpack_codes(message.positions.arrays["fresh"], 1, mask.shape[0]).astype(jnp.float32)

    def _unstream(stream: Payload, key: str, keep: Array) -> Array:
        """Row j's value from a stream holding the kept rows' values in order (0 elsewhere): int32
        codes, or for real targets values of the target dtype."""
        meta: LabelMeta = stream.meta
        if meta.dtype is not None:
            values = stream.arrays[key]
        else:
            values = base.unpack_codes(stream.arrays[key], meta.width, meta.batch).astype(jnp.int32)
        position = jnp.cumsum(keep.astype(jnp.int32)) - 1
        return jnp.where(keep > 0, values[jnp.clip(position, 0, meta.batch - 1)], 0)

    def received(message: NodeMessage, cache: LearnerCache | None = None):
        """What the learner reads off one node's message: the samples as (x_hat, y, a), a_j = 0 for
        samples not sent, and, with a cache, the cache after storing the fresh rows (every
        transmitted sample is then read from the cache). Returns ``((x_hat, y, a), cache)``."""
        mask = _received_mask(message)
        if cached:
            fresh = _fresh_mask(message, mask)
            pos = _unstream(message.positions, "positions", mask)
            labels = _unstream(message.labels, "labels", fresh)
            cache = LearnerCache(
                rows=_scatter_rows(cache.rows, message.data.rows, pos, fresh),
                labels=cache.labels.at[jnp.where(fresh > 0, pos, cache_size)].set(labels, mode="drop"),
            )
            data = message.data.replace(rows=_gather_rows(cache.rows, pos))
            y = jnp.where(mask > 0, cache.labels[pos], 0)
        else:
            data, y = message.data, _unstream(message.labels, "labels", mask)
        return (_decoded(data, mask), y, _weights_from(message.weights, mask)), cache

    def decoded_correction(message: NodeMessage):
        """C(delta_i) as the learner decodes it, or None without a correction."""
        return correction.decode(message.correction) if correction is not None else None

    def _gradient(params, message, samples):
        g = jax.grad(weighted_mean_loss)(params, *samples)
        if correction is not None:
            g = jax.tree_util.tree_map(lambda u, v: u + v.astype(u.dtype), g, decoded_correction(message))
        return g

    def learner_gradient(params, message: NodeMessage):
        """Step 4 for one node: g_i = (1/b) sum_j a_j grad_w f(w; Q(x_j), y_j) + C(delta_i), read
        from what crossed the link only (bitmap, codes, label stream, fp16 p~_j, correction)."""
        if cached:
            raise ValueError("this estimator has a cache: use learner_gradient_cached(params, message, cache)")
        samples, _ = received(message)
        return _gradient(params, message, samples)

    def learner_gradient_cached(params, message: NodeMessage, cache: LearnerCache):
        """Step 4 with the learner's cache of this node's samples: store the fresh rows and labels,
        then read every transmitted sample from the cache. Returns (g_i, cache)."""
        samples, cache = received(message, cache)
        return _gradient(params, message, samples), cache

    def uplink_bits(message: NodeMessage) -> dict:
        """Exact bits of one node's message, part by part, read off the packed arrays: a dict of
        :class:`~qdata.codecs.ledger.Bits` (vmap it over nodes, as :func:`base.payload_bits` counts
        one node at a time; convert on the host with ``int`` or ``ledger.host_total``)."""
        mask = _received_mask(message)
        fresh = _fresh_mask(message, mask)
        sent = jnp.sum(mask > 0, dtype=jnp.int32)
        quantizer_bits = Bits.of(quantizer.bits(message.data, fresh))
        codes = base.payload_bits(_code_rows(message.data), fresh)
        bits = {
            "data": codes,
            "labels": _stream_prefix_bits(jnp.sum(fresh > 0, dtype=jnp.int32), message.labels.meta.width),
            "weights": base.payload_bits(message.weights, mask),
            # What the quantizer sends besides the codes: per-sample ranges of transmitted rows, a seed.
            "metadata": quantizer_bits - codes,
            "mask": Bits.of(base.payload_bits(message.mask)),
            "correction": Bits.of(correction.bits(message.correction) if correction is not None else 0),
        }
        if cached:
            # Positions of the transmitted samples (a stream prefix) and the b-bit bitmap of fresh ones.
            bits["positions"] = (_stream_prefix_bits(sent, pos_width)
                                 + base.array_bits(message.positions.arrays["fresh"]))
        bits["total"] = sum(bits.values())
        return bits

    return Estimator(init=init, node_message=node_message, learner_gradient=learner_gradient,
                     uplink_bits=uplink_bits, init_cache=init_cache if cached else None,
                     learner_gradient_cached=learner_gradient_cached if cached else None,
                     received=received, decoded_correction=decoded_correction, learner_loss=weighted_mean_loss)
