"""Adaptive context-model ANS of a quantizer's pixel codes (the model of :mod:`qdata.codecs.adaptive_ans`).

DESIGN.md section 3: entropy-coded data is charged the length of the bytes a real coder produced,
plus the model it needs. The coder and the counts both ends keep are
:func:`qdata.codecs.adaptive_ans.adaptive_ans`'s; this module is the context of a pixel code, as in
the context-modelling image coders (JBIG's template contexts, CALIC, the LOCO-I/JPEG-LS context
counts): each code is coded under the frequencies, within its context, of the codes the learner has
already received from this node, so no model crosses the link.

* **Context** of a code: the codes of its causal neighbours in the sample's spatial layout (left,
  above, above-left, each in the same channel; zero outside the image), their top ``CONTEXT_BITS``
  bits each, so at most ``2^(3 * CONTEXT_BITS)`` contexts whatever B. A sample of one axis is a row.
* **Counts**: int32 ``(contexts, 2^B)``, Krichevsky-Trofimov prior, rescaled
  (:mod:`qdata.codecs.adaptive_ans`).
* **Message**: the sent samples' codes, position-major (all samples' first code, then their second,
  ...) so the decoder can rebuild each context from the codes it has decoded, coded into one ANS
  stream of uint32 words under the counts before the message. Charged: ``32 * words`` (part
  ``'data'``) and a 32-bit word count (``'metadata'``) when at least one sample is sent.

In the round the learner reads the fixed-length codes of the inner payload (the codes the stream
decodes to: :func:`decode_words` shows it in the tests). The codes are lossless: training is
exactly that of the fixed-length codes.
"""

from __future__ import annotations

import math

import constriction
import jax
import jax.numpy as jnp
import numpy as np

from qdata import checks
from qdata.codecs.adaptive_ans import RESCALE_AT, CodedPayload, SymbolModel, adaptive_ans, read_codes, stream_words
from qdata.codecs.data_codec import DataCodec
from qdata.codecs.packing import unpack_codes

Array = jax.Array
DATA_CODERS = ("fixed", "ans")  # how a qdata node's data codes cross the link: fixed length, or adaptive ANS
CONTEXT_BITS = 4  # bits of each neighbour in the context
MAX_BITS = 8  # B above this would need a (contexts, 2^B) table too large to hold per node
__all__ = ["CONTEXT_BITS", "CodedPayload", "DATA_CODERS", "MAX_BITS", "RESCALE_AT", "context_ans", "contexts",
           "decode_words", "encode_words", "num_contexts"]


def _layout(sample_shape) -> tuple[int, int, int]:
    """(H, W, C) of a sample: images (H, W[, C]), a vector as one row."""
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 1:
        return 1, shape[0], 1
    return shape[0], shape[1], math.prod(shape[2:])


def contexts(codes, sample_shape, bits: int, xp=jnp):
    """Context index of every code, ``(b, n)`` int32, from its left, upper and upper-left
    neighbours' top ``CONTEXT_BITS`` bits (module docstring). ``xp`` is jnp or np."""
    h, w, c = _layout(sample_shape)
    shift = max(0, bits - CONTEXT_BITS)
    top = (codes.reshape(codes.shape[0], h, w, c) >> shift).astype(xp.int32)
    pad = xp.pad(top, ((0, 0), (1, 0), (1, 0), (0, 0)))
    left, up, upleft = pad[:, 1:, :-1], pad[:, :-1, 1:], pad[:, :-1, :-1]
    levels = 1 << min(bits, CONTEXT_BITS)
    return ((left * levels + up) * levels + upleft).reshape(codes.shape[0], h * w * c)


def num_contexts(bits: int) -> int:
    return 1 << (3 * min(bits, CONTEXT_BITS))


def encode_words(codes, counts, sample_shape, bits: int) -> np.ndarray:
    """The ANS stream (uint32 words) of ``codes`` (s, n), position-major, under ``counts``. Host."""
    codes = np.asarray(codes, np.int32)
    return stream_words(codes, contexts(codes, sample_shape, bits, xp=np), 1 << bits, counts)


def decode_words(words, counts, count: int, sample_shape, bits: int) -> np.ndarray:
    """The ``count`` samples' codes ``(count, n)`` of a stream from :func:`encode_words`, decoded
    position by position, each context rebuilt from the codes already decoded. Host (tests)."""
    h, w, c = _layout(sample_shape)
    codes = np.zeros((int(count), h * w * c), np.int32)
    sizes = np.full((int(count),), 1 << bits)
    # An empty stream is a valid one (ANS codes a run of the first symbol in no words at all).
    coder = constriction.stream.stack.AnsCoder(np.asarray(words, np.uint32))
    for k in range(h * w * c):  # raster order: every neighbour of position k precedes it
        codes[:, k] = read_codes(coder, counts, contexts(codes, sample_shape, bits, xp=np)[:, k], sizes)
    if not coder.is_empty():
        raise ValueError(f"the stream holds more than {count} samples' codes under these counts")
    return codes


def context_ans(inner: DataCodec, bits: int, sample_shape) -> DataCodec:
    """``inner`` (a quantizer's codec, :func:`~qdata.codecs.data_codec.from_quantizer`, whose payload
    carries ``rows['codes']`` of ``bits``-bit codes) with its codes charged as an adaptive
    context-model ANS stream (module docstring). Decoding, rows and unbiasedness are ``inner``'s;
    the state is ``inner``'s beside the counts."""
    bits = checks.check_int(bits, "bits", lo=1, hi=MAX_BITS)
    sample_shape = tuple(int(s) for s in sample_shape)
    n = math.prod(sample_shape)

    def symbols(payload, inner_state):
        del inner_state
        if "codes" not in getattr(payload, "rows", {}):
            raise ValueError("context_ans codes a quantizer payload with rows['codes']; got "
                             f"{type(payload).__name__} with rows {sorted(getattr(payload, 'rows', {}))}")
        codes = unpack_codes(payload.rows["codes"], bits, n).astype(jnp.int32)
        return codes, contexts(codes, sample_shape, bits), jnp.int32(1 << bits)

    return adaptive_ans(inner, SymbolModel(num_contexts(bits), 1 << bits, symbols))
