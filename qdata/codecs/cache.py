"""The learner cache, as a wrapper of any data codec: a sample crosses the link once.

``learner_cache(inner, size, example)`` returns a :class:`~qdata.codecs.data_codec.DataCodec` with
the interface of ``inner``. Both ends keep the same :class:`CacheState`: the inner codec's per-item
rows (``inner.rows``, e.g. a quantizer's packed codes and the label) of every sample the learner has
received, keyed by the sample's position in the node's shard (``pos``), and which positions are held.
A sent sample that the learner already holds travels as its position alone: no codes, no label.

What crosses the link (:class:`CachedPayload`):

* ``inner``: the inner codec's payload for the *fresh* samples only (sent, not held, and the first
  sent copy of a position in the batch), charged by the inner codec for those rows;
* ``positions``: each sent sample's position, ``ceil(log2 size)`` bits, a
  :class:`~qdata.codecs.streams.Stream`, plus ``fresh``, the b-bit bitmap of the fresh samples:
  together the ``'positions'`` part.

Every sent sample is then decoded from the held rows, at the node as at the learner, so both use the
*same* Q(x_j) as when it was first sent: a correction the node computes against that Q(x_j) keeps the
estimate unbiased; without one the quantized dataset is fixed once received.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from qdata import checks
from qdata.codecs.data_codec import DataCodec
from qdata.codecs.packing import index_width, pack_codes, unpack_codes
from qdata.codecs.payloads import array_bits
from qdata.codecs.streams import Stream, code_stream, read_stream, stream_bits

Array = jax.Array
PyTree = Any


class CacheState(NamedTuple):
    """What one end knows the learner holds of one node: the inner codec's state, its rows by shard
    position ``(size, ...)``, and which positions are held ``(size,)`` bool."""

    inner: PyTree
    rows: PyTree
    held: Array


@struct.dataclass
class CachedPayload:
    """The inner codec's payload of the fresh samples, the sent samples' positions and the packed
    bitmap of the fresh ones."""

    inner: Any
    positions: Stream
    fresh: Array


def _scatter(table, rows, pos, keep):
    # Rows not kept are sent out of range and dropped by the scatter.
    where = jnp.where(keep > 0, pos, jax.tree_util.tree_leaves(table)[0].shape[0])
    return jax.tree_util.tree_map(lambda t, r: t.at[where].set(r.astype(t.dtype), mode="drop"), table, rows)


def _gather(table, pos):
    return jax.tree_util.tree_map(lambda t: t[pos], table)


def first_sent_copies(pos: Array, sent: Array) -> Array:
    """(b,) bool: sent, and the first sent copy of its position in this batch."""
    earlier = jnp.tril(pos[:, None] == pos[None, :], k=-1) & (sent[None, :] > 0)
    return (sent > 0) & ~jnp.any(earlier, axis=1)


def _fresh(pos: Array, sent: Array, held: Array) -> Array:
    """Sent, not yet held, and the first sent copy of its position in this batch."""
    return (first_sent_copies(pos, sent) & ~held[pos]).astype(jnp.float32)


def _store(state: CacheState, rows, pos: Array, fresh: Array, inner_state) -> CacheState:
    size = state.held.shape[0]
    held = state.held.at[jnp.where(fresh > 0, pos, size)].set(True, mode="drop")
    return CacheState(inner=inner_state, rows=_scatter(state.rows, rows, pos, fresh), held=held)


def learner_cache(inner: DataCodec, size: int, example: PyTree) -> DataCodec:
    """``inner`` with the learner-side cache (module docstring) for nodes of up to ``size`` samples.

    Args:
      inner: the data codec whose rows are cached (its ``rows`` must accept its payloads).
      size: the most samples a node holds; positions are ``0..size-1``.
      example: an input batch of ``inner`` (arrays or ``jax.ShapeDtypeStruct``, any batch size),
        for the shapes of the rows the cache holds.

    Returns:
      A :class:`DataCodec` whose ``encode`` needs ``pos``; its state is a :class:`CacheState`.
    """
    size = checks.check_int(size, "cache_size", lo=1)
    width = index_width(size)
    row_template = _row_template(inner, example)

    def init():
        rows = jax.tree_util.tree_map(lambda t: jnp.zeros((size,) + t.shape[1:], t.dtype), row_template)
        return CacheState(inner=inner.init(), rows=rows, held=jnp.zeros((size,), bool))

    def encode(key, x, state, sent, pos=None):
        if pos is None:
            raise ValueError("batch['pos'] (each sample's position in the node's shard) is required with a cache")
        pos = jnp.asarray(pos, jnp.int32)
        fresh = _fresh(pos, sent, state.held)
        payload, inner_state = inner.encode(key, x, state.inner, fresh, pos)
        state = _store(state, inner.rows(payload, fresh), pos, fresh, inner_state)
        bitmap = pack_codes(fresh.astype(jnp.uint32), 1)
        return CachedPayload(inner=payload, positions=code_stream(pos, sent, width), fresh=bitmap), state

    def fresh_of(payload, sent):
        return unpack_codes(payload.fresh, 1, sent.shape[0]).astype(jnp.float32)

    def receive(payload, state, sent):
        fresh = fresh_of(payload, sent)
        pos = read_stream(payload.positions, sent)
        inner_state = inner.receive(payload.inner, state.inner, fresh)
        return _store(state, inner.rows(payload.inner, fresh), pos, fresh, inner_state)

    def decode_rows(payload, rows, state, sent):
        return inner.decode_rows(payload.inner, rows, state.inner, sent)

    def decode(payload, state, sent):
        return decode_rows(payload, _gather(state.rows, read_stream(payload.positions, sent)), state, sent)

    def fit(state, x, count):
        return state._replace(inner=inner.fit(state.inner, x, count))

    def bits(payload, sent):
        parts = inner.bits(payload.inner, fresh_of(payload, sent))
        return {**parts, "positions": stream_bits(payload.positions) + array_bits(payload.fresh)}

    def rows(payload, sent):
        raise ValueError("a cached codec cannot be cached again")

    return DataCodec(init=init, encode=encode, receive=receive, decode=decode, bits=bits, rows=rows,
                     decode_rows=decode_rows, unbiased=inner.unbiased, fit=None if inner.fit is None else fit)


def _row_template(inner: DataCodec, example: PyTree):
    """Shapes and dtypes of ``inner``'s rows for ``example`` (without running it)."""

    def rows(x):
        b = jax.tree_util.tree_leaves(x)[0].shape[0]
        sent = jnp.ones((b,), jnp.float32)
        payload, _ = inner.encode(jax.random.PRNGKey(0), x, inner.init(), sent, jnp.zeros((b,), jnp.int32))
        return inner.rows(payload, sent)

    return jax.eval_shape(rows, example)
