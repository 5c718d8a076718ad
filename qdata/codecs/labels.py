"""Labels as they travel: exactly, as a stream of the sent samples' labels (DESIGN.md section 2, step 2).

* :func:`class_labels`: integer labels in 0..C-1, ``ceil(log2 C)`` bits each, packed into one
  :class:`~qdata.codecs.streams.Stream`: m labels of w bits cost ``8 ceil(m w / 8)`` bits (whole bytes;
  whole uint16/uint32 words for w = 16, 32).
* :func:`real_targets`: real-valued targets (regression) as values of ``dtype`` (fp32, exact for
  float32 targets, or fp16: half the bits, the learner then sees y rounded to fp16): exactly 32 m
  (16 m) bits.

Both are stateless :class:`~qdata.codecs.data_codec.DataCodec`s with ``'labels'`` as their one part;
their per-item rows (what a cache keeps) are the decoded labels themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdata.codecs.data_codec import DataCodec, stateless_receive
from qdata.codecs.packing import index_width
from qdata.codecs.payloads import EmptyState
from qdata.codecs.streams import code_stream, read_stream, stream_bits, value_stream

Array = jax.Array


def _stream_codec(encode) -> DataCodec:
    def decode(stream, state, sent):
        del state
        return read_stream(stream, sent)

    def rows(stream, sent):
        return read_stream(stream, sent)

    def decode_rows(stream, rows, state, sent):
        del stream, state
        return jnp.where(sent > 0, rows, 0)

    return DataCodec(init=EmptyState, encode=encode, receive=stateless_receive, decode=decode,
                     bits=lambda stream, sent: {"labels": stream_bits(stream)}, rows=rows,
                     decode_rows=decode_rows, unbiased=True)


def class_labels(num_classes: int) -> DataCodec:
    """Integer labels in 0..C-1 (C = ``num_classes``) at ``ceil(log2 C)`` bits each, exactly."""
    width = index_width(num_classes)

    def encode(key, y, state, sent, pos=None):
        del key, pos
        return code_stream(y, sent, width), state

    return _stream_codec(encode)


def real_targets(dtype) -> DataCodec:
    """Real-valued targets sent as values of ``dtype`` (float32 or float16); decoded in that type."""
    dtype = np.dtype(dtype)

    def encode(key, y, state, sent, pos=None):
        del key, pos
        return value_stream(y.astype(dtype), sent), state

    return _stream_codec(encode)
