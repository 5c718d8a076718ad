"""A stream: the values of the items a message sends, in item order, carrying its own count.

Labels and cache positions travel this way. Of a batch of b items, the m that are sent put their
values at the front of one array, in item order: integer codes packed at ``width`` bits each
(:func:`~qdata.codecs.packing.pack_codes`, in uint8/uint16/uint32 words), or real values, one per
float32/float16 word. The array keeps room for all b (static shapes for ``jit``); only the prefix of
whole words holding the m values is sent:

    bits = ceil(m * width / word) * word,   word = the array's element size in bits.

The count m rides in the stream (:attr:`Stream.count`), so :func:`stream_bits` reads every number
it needs off the payload itself. The count is not charged: the receiver knows it before it reads
the stream, as the number of ones in a bitmap it has already received (the gate's, or the cache's
bitmap of fresh samples), and reading the values back needs that bitmap anyway (:func:`read_stream`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata.codecs.ledger import Bits
from qdata.codecs.packing import pack_codes, unpack_codes

Array = jax.Array


class StreamMeta(NamedTuple):
    """Static side of a stream, known to both ends: room for ``length`` values of ``width`` bits;
    ``dtype`` names the float type of real values ('float32', 'float16'), None for packed codes."""

    length: int
    width: int
    dtype: str | None = None


@struct.dataclass
class Stream:
    """A stream payload (module docstring).

    Attributes:
      values: the packed codes (or real values) of the sent items first, zero padding after them.
      count: int32 scalar, the number m of values sent.
      meta: the :class:`StreamMeta`.
    """

    values: Array
    count: Array
    meta: StreamMeta = struct.field(pytree_node=False)


def _front(values: Array, keep: Array) -> Array:
    # Kept values first, in item order (stable sort on "not kept"), zeros after them.
    order = jnp.argsort(1 - keep.astype(jnp.int32), stable=True)
    return jnp.where(keep[order] > 0, values[order], 0)


def code_stream(codes: Array, keep: Array, width: int) -> Stream:
    """The stream of the integer ``codes`` (b,) of the items with ``keep`` 1, packed at ``width`` bits."""
    count = jnp.sum(keep > 0, dtype=jnp.int32)
    return Stream(pack_codes(_front(codes, keep), width), count, StreamMeta(codes.shape[0], width))


def value_stream(values: Array, keep: Array) -> Stream:
    """The stream of the real ``values`` (b,) of the items with ``keep`` 1, in their own float type."""
    count = jnp.sum(keep > 0, dtype=jnp.int32)
    dtype = np.dtype(values.dtype)
    return Stream(_front(values, keep), count, StreamMeta(values.shape[0], dtype.itemsize * 8, dtype.name))


def read_stream(stream: Stream, keep: Array) -> Array:
    """Item j's value (int32 codes, or the real values' type) where ``keep`` is 1, 0 elsewhere."""
    meta = stream.meta
    if meta.dtype is not None:
        values = stream.values
    else:
        values = unpack_codes(stream.values, meta.width, meta.length).astype(jnp.int32)
    position = jnp.cumsum(keep.astype(jnp.int32)) - 1
    return jnp.where(keep > 0, values[jnp.clip(position, 0, meta.length - 1)], 0)


def prefix_bits(count: Array, width: int, word: int) -> Bits:
    """Bits of the whole ``word``-bit words that hold the first ``count`` values of ``width`` bits."""
    # ceil(count w / word) without forming count * w, which leaves int32 long before the word count
    # does: with g = gcd(w, word), count = q (word/g) + r gives q (w/g) + ceil(r (w/g) / (word/g)),
    # and q (w/g) words are charged as q units of (w/g) words, since that product too can pass 2^31.
    g = math.gcd(width, word)
    w, per = width // g, word // g
    count = jnp.asarray(count, jnp.int32)
    q, r = count // per, count % per
    return Bits.count(q, w * word) + Bits.count((r * w + per - 1) // per, word)


def stream_bits(stream: Stream) -> Bits:
    """Exact bits of ``stream`` as sent: the prefix of words holding its ``count`` values."""
    return prefix_bits(stream.count, stream.meta.width, np.dtype(stream.values.dtype).itemsize * 8)
