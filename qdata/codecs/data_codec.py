"""A data codec with state, the shape the estimator composes, and the plug for stateless quantizers.

A :class:`DataCodec` codes a batch of b items (samples, labels, or pairs of them) of which the
items with ``sent`` 1 cross the link; ``sent`` (b,) 0/1 is known to both ends from a bitmap that
the layer owning it charges (the gate's, or a cache's bitmap of fresh samples), so the codec
neither sends nor charges it. In the optax style, a factory returns pure functions and the state
is passed in and out:

* ``init() -> state``;
* ``encode(key, x, state, sent, pos=None) -> (payload, state)``: ``x`` with the items on the
  leading axis; ``pos`` (b,) int32 each item's position in the node's shard, the key under which a
  cache holds it (ignored by codecs that keep no per-item state);
* ``receive(payload, state, sent) -> state``: the learner's mirror of ``encode``'s state update, so
  that after a message both ends hold the same state;
* ``decode(payload, state, sent) -> x_hat``: zero for items not sent; ``state`` is the state *after*
  the message (what ``encode`` or ``receive`` returned), so node and learner decode alike;
* ``bits(payload, sent) -> dict[str, Bits]``: the exact bits of the payload by part, read off its
  packed arrays (parts: ``'data'`` and ``'metadata'`` for samples, ``'labels'``, ``'positions'``);
* ``rows(payload, sent)`` and ``decode_rows(payload, rows, state, sent)``: the per-item form of a
  payload (leading axis b) and the decoding from it under ``state`` (as for ``decode``),
  ``decode = decode_rows(payload, rows(payload, sent), state, sent)``; what a cache
  (:func:`qdata.codecs.cache.learner_cache`) stores and reads;
* ``fit`` (optional, None for most codecs): ``fit(state, x_shard, count) -> state``, the node's
  state fitted on its own shard before round 0 (``x_shard`` (L, ...) of which the first ``count``
  rows are the node's), for a codec whose encoder depends on the node's data (a transform code's
  setup, :mod:`qdata.codecs.transform_codec`); the engine runs it per node
  (:func:`qdata.engine.fit_nodes`). The learner's state starts at ``init()`` and learns the
  setup from the messages, through ``receive``.

:func:`from_quantizer` makes one of any stateless :class:`~qdata.codecs.payloads.Quantizer`
(``encode(key, x) -> Payload``, ``decode(payload)``, ``bits(payload, mask)``); :func:`joint` codes
several inputs side by side (samples and their labels).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from qdata.codecs.ledger import Bits
from qdata.codecs.payloads import EmptyState, Payload, Quantizer, payload_bits

Array = jax.Array
PyTree = Any


class DataCodec(NamedTuple):
    """A data codec with state (module docstring). ``unbiased``: ``E[decode] = x`` on sent items."""

    init: Callable[[], PyTree]
    encode: Callable[..., tuple[Any, PyTree]]
    receive: Callable[[Any, PyTree, Array], PyTree]
    decode: Callable[[Any, PyTree, Array], PyTree]
    bits: Callable[[Any, Array], dict]
    rows: Callable[[Any, Array], PyTree]
    decode_rows: Callable[[Any, PyTree, PyTree, Array], PyTree]
    unbiased: bool = False
    fit: Callable[[PyTree, PyTree, Array], PyTree] | None = None


def keep_rows(payload: Payload, sent: Array) -> Payload:
    """Zero the rows of items not sent, so that what the learner reads is what was sent."""

    def keep(a):
        m = sent.reshape((-1,) + (1,) * (a.ndim - 1)) > 0
        return jnp.where(m, a, jnp.zeros_like(a))

    return payload.replace(rows=jax.tree_util.tree_map(keep, payload.rows))


def mask_items(x: Array, sent: Array) -> Array:
    """``x`` where ``sent`` is 1, zeros elsewhere (items on the leading axis)."""
    m = sent.reshape((-1,) + (1,) * (x.ndim - 1)) > 0
    return jnp.where(m, x, jnp.zeros_like(x))


def code_rows(payload: Payload) -> Payload:
    """The rows of a quantizer payload that hold the sample codes: ``rows['codes']`` by the quantizer
    contract (:mod:`qdata.codecs.quantizers`); for a quantizer without that key, its unsigned-integer
    rows (packed code words), everything else (ranges, seeds) being metadata."""
    if "codes" in payload.rows:
        return Payload(rows={"codes": payload.rows["codes"]})
    rows = {k: v for k, v in payload.rows.items() if jnp.issubdtype(v.dtype, jnp.unsignedinteger)}
    return Payload(rows=rows)


def count_items(sent: Array) -> Array:
    """How many items ``sent`` marks, for ``Payload.info`` counts (local, never sent): the samples a
    message carries, or whose codes it carries (with a cache, the fresh ones)."""
    return jnp.sum(sent > 0, dtype=jnp.int32)


def stateless_receive(payload, state, sent):
    """``receive`` of a codec without state: the state is unchanged."""
    del payload, sent
    return state


def from_quantizer(quantizer: Quantizer) -> DataCodec:
    """The :class:`DataCodec` of a stateless quantizer Q: samples in, Q's payload out.

    The payload is Q's, all b rows kept (static shapes), the rows of samples not sent zeroed; only
    the sent rows are charged: ``'data'`` the rows of codes, ``'metadata'`` the rest of what Q
    sends (per-sample ranges of sent rows, a per-message seed). Rows (for a cache) are Q's
    ``payload.rows``; a quantizer with per-message arrays (subtractive dither's seed) has none that a
    cache could decode later, and ``rows`` refuses it.
    """
    if not all(hasattr(quantizer, name) for name in ("encode", "decode", "bits")):
        raise ValueError(f"quantizer must be a base.Quantizer (encode, decode, bits), got {type(quantizer).__name__}")

    def encode(key, x, state, sent, pos=None):
        del pos
        payload = keep_rows(quantizer.encode(key, x), sent)
        return payload.replace(info={**payload.info, "samples_coded": count_items(sent)}), state

    def decode(payload, state, sent):
        del state
        return mask_items(quantizer.decode(payload), sent)

    def bits(payload, sent):
        codes = payload_bits(code_rows(payload), sent)
        # What the quantizer sends besides the codes: per-sample ranges of sent rows, a seed.
        return {"data": codes, "metadata": Bits.of(quantizer.bits(payload, sent)) - codes}

    def rows(payload, sent):
        del sent
        if payload.arrays:
            raise ValueError(
                f"this quantizer sends per-message side information ({sorted(payload.arrays)}), so its "
                "codes cannot be cached and decoded later; use a quantizer without it (e.g. stochastic "
                "rounding or per-sample ranges) or cache_size=None")
        return payload.rows

    def decode_rows(payload, rows, state, sent):
        del state
        return mask_items(quantizer.decode(payload.replace(rows=rows)), sent)

    return DataCodec(init=EmptyState, encode=encode, receive=stateless_receive, decode=decode, bits=bits,
                     rows=rows, decode_rows=decode_rows, unbiased=bool(getattr(quantizer, "unbiased", False)))


def _component_keys(key, names):
    # The first component draws with the key itself (so a codec keeps its randomness when joined
    # with deterministic ones, such as exact labels); the others with keys folded from it.
    return {name: key if i == 0 else jax.random.fold_in(key, i) for i, name in enumerate(names)}


def _merge_bits(parts: list[dict]) -> dict:
    merged = {}
    for part in parts:
        overlap = set(merged) & set(part)
        if overlap:
            raise ValueError(f"joined codecs charge the same parts {sorted(overlap)}")
        merged.update(part)
    return merged


def joint(**codecs: DataCodec) -> DataCodec:
    """Codecs side by side: ``x``, state and payload are dicts with the codecs' names as keys (the
    items, e.g. samples ``x`` and labels ``y``, share the leading axis and ``sent``). Bits are the
    union of the codecs' parts (their names must differ)."""
    names = tuple(codecs)

    def init():
        return {n: codecs[n].init() for n in names}

    def encode(key, x, state, sent, pos=None):
        keys = _component_keys(key, names)
        out = {n: codecs[n].encode(keys[n], x[n], state[n], sent, pos) for n in names}
        return {n: out[n][0] for n in names}, {n: out[n][1] for n in names}

    def each(method):
        return lambda payload, state, sent: {n: getattr(codecs[n], method)(payload[n], state[n], sent) for n in names}

    def bits(payload, sent):
        return _merge_bits([codecs[n].bits(payload[n], sent) for n in names])

    def rows(payload, sent):
        return {n: codecs[n].rows(payload[n], sent) for n in names}

    def decode_rows(payload, rows, state, sent):
        return {n: codecs[n].decode_rows(payload[n], rows[n], state[n], sent) for n in names}

    def fit(state, x, count):
        # The components with a fit each fit on their own input (samples on ``x['x']``).
        return {n: state[n] if codecs[n].fit is None else codecs[n].fit(state[n], x[n], count) for n in names}

    fits = any(c.fit is not None for c in codecs.values())
    return DataCodec(init=init, encode=encode, receive=each("receive"), decode=each("decode"), bits=bits,
                     rows=rows, decode_rows=decode_rows, unbiased=all(c.unbiased for c in codecs.values()),
                     fit=fit if fits else None)
