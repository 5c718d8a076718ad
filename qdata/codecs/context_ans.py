"""Adaptive context-model ANS of a quantizer's data codes, inside the jitted round.

DESIGN.md section 3: entropy-coded data is charged the length of the bytes a real coder produced,
plus the model it needs. Here the coder is constriction's ANS (``constriction.stream.stack.AnsCoder``,
R. Bamler, https://github.com/bamler-lab/constriction) and the model is *adaptive*, as in the
context-modelling image coders (JBIG's template contexts, CALIC, the LOCO-I/JPEG-LS context
counts): each code is coded under the frequencies, within its context, of the codes the learner
has already received from this node. Both ends hold those counts (they are the node codec's state
and the learner's mirror of it), so no model crosses the link; what the model costs while it is
still learning shows in the coded length of the first messages.

* **Context** of a code: the codes of its causal neighbours in the sample's spatial layout (left,
  above, above-left, each in the same channel; zero outside the image), their top ``CONTEXT_BITS``
  bits each, so at most ``2^(3 * CONTEXT_BITS)`` contexts whatever B. A sample of one axis is a row.
* **Counts**: int32 ``(contexts, 2^B)``, held as ``2 c + 1`` (the Krichevsky-Trofimov prior 1/2);
  after each message both ends add 2 per code of its sent samples, and halve (keeping them odd) a
  context whose counts sum past ``RESCALE_AT``, as adaptive coders do: no overflow in any run.
* **Message**: the sent samples' codes, position-major (all samples' first code, then their second,
  ...) so the decoder can rebuild each context from the codes it has decoded, coded into one ANS
  stream of uint32 words under the counts before the message. Charged: ``32 * words`` (part
  ``'data'``) and a 32-bit word count (``'metadata'``) when at least one sample is sent.

In the round the learner reads the fixed-length codes of the inner payload (the codes the stream
decodes to: :func:`decode_words` shows it in the tests) and the ledger charges the stream's length,
which a ``jax.pure_callback`` to the host coder returns (``vmap_method="sequential"``: one call per
node). The codes are lossless: training is exactly that of the fixed-length codes.
"""

from __future__ import annotations

import math
from typing import Any

import constriction
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata import checks
from qdata.codecs.data_codec import DataCodec
from qdata.codecs.ledger import Bits
from qdata.codecs.packing import unpack_codes

Array = jax.Array
DATA_CODERS = ("fixed", "ans")  # how a qdata node's data codes cross the link: B bits each, or this coder
CONTEXT_BITS = 4  # bits of each neighbour in the context
MAX_BITS = 8  # B above this would need a (contexts, 2^B) table too large to hold per node
RESCALE_AT = 1 << 24  # a context whose counts sum past this is halved (int32 never overflows)
_FAMILY = constriction.stream.model.Categorical(perfect=False)


@struct.dataclass
class CodedPayload:
    """The inner codec's payload (its fixed-length codes, which the stream decodes to) and the
    length in uint32 words of the ANS stream of its sent rows, as the host coder wrote it."""

    inner: Any
    words: Array


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


def _probabilities(counts, ctx) -> np.ndarray:
    table = np.asarray(counts, np.float64)[np.asarray(ctx)]
    return table / table.sum(axis=-1, keepdims=True)


def encode_words(codes, counts, sample_shape, bits: int) -> np.ndarray:
    """The ANS stream (uint32 words) of ``codes`` (s, n), position-major, under ``counts``. Host."""
    codes = np.asarray(codes, np.int32)
    if codes.shape[0] == 0:
        return np.zeros((0,), np.uint32)
    ctx = contexts(codes, sample_shape, bits, xp=np)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(codes.T).ravel(), _FAMILY,
                         _probabilities(counts, ctx.T.ravel()))
    return coder.get_compressed()


def decode_words(words, counts, count: int, sample_shape, bits: int) -> np.ndarray:
    """The ``count`` samples' codes ``(count, n)`` of a stream from :func:`encode_words`, decoded
    position by position, each context rebuilt from the codes already decoded. Host (tests)."""
    h, w, c = _layout(sample_shape)
    codes = np.zeros((int(count), h * w * c), np.int32)
    # An empty stream is a valid one (ANS codes a run of the first symbol in no words at all).
    coder = constriction.stream.stack.AnsCoder(np.asarray(words, np.uint32))
    for k in range(h * w * c):  # raster order: every neighbour of position k precedes it
        ctx = contexts(codes, sample_shape, bits, xp=np)[:, k]
        codes[:, k] = coder.decode(_FAMILY, _probabilities(counts, ctx))
    if not coder.is_empty():
        raise ValueError(f"the stream holds more than {count} samples' codes under these counts")
    return codes


def _host_words(codes, sent, counts, sample_shape, bits):
    rows = np.asarray(codes)[np.asarray(sent) > 0]
    return np.int32(encode_words(rows, counts, sample_shape, bits).size)


def context_ans(inner: DataCodec, bits: int, sample_shape) -> DataCodec:
    """``inner`` (a quantizer's codec, :func:`~qdata.codecs.data_codec.from_quantizer`, whose payload
    carries ``rows['codes']`` of ``bits``-bit codes) with its codes charged as an adaptive
    context-model ANS stream (module docstring). Decoding, rows and unbiasedness are ``inner``'s;
    the state is ``inner``'s beside the counts."""
    bits = checks.check_int(bits, "bits", lo=1, hi=MAX_BITS)
    sample_shape = tuple(int(s) for s in sample_shape)
    n = math.prod(sample_shape)

    def codes_of(payload):
        if "codes" not in getattr(payload, "rows", {}):
            raise ValueError("context_ans codes a quantizer payload with rows['codes']; got "
                             f"{type(payload).__name__} with rows {sorted(getattr(payload, 'rows', {}))}")
        return unpack_codes(payload.rows["codes"], bits, n).astype(jnp.int32)

    def update(counts, payload, sent):
        codes = codes_of(payload)
        ctx = contexts(codes, sample_shape, bits)
        add = jnp.broadcast_to(2 * (sent > 0).astype(jnp.int32)[:, None], codes.shape)
        counts = counts.at[ctx.ravel(), codes.ravel()].add(add.ravel())
        full = jnp.sum(counts, axis=1, keepdims=True) > RESCALE_AT
        return jnp.where(full, (counts >> 1) | 1, counts)

    def init():
        return {"inner": inner.init(), "counts": jnp.ones((num_contexts(bits), 1 << bits), jnp.int32)}

    def encode(key, x, state, sent, pos=None):
        payload, inner_state = inner.encode(key, x, state["inner"], sent, pos)
        host = lambda c, s, k: _host_words(c, s, k, sample_shape, bits)
        words = jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.int32), codes_of(payload), sent,
                                  state["counts"], vmap_method="sequential")
        new = {"inner": inner_state, "counts": update(state["counts"], payload, sent)}
        return CodedPayload(inner=payload, words=words), new

    def receive(payload, state, sent):
        inner_state = inner.receive(payload.inner, state["inner"], sent)
        return {"inner": inner_state, "counts": update(state["counts"], payload.inner, sent)}

    def bits_of(payload, sent):
        parts = dict(inner.bits(payload.inner, sent))
        parts.pop("data")  # the fixed-length codes are not sent: the stream is
        any_sent = jnp.any(sent > 0).astype(jnp.int32)
        parts["data"] = Bits.count(payload.words, 32)
        parts["metadata"] = Bits.of(parts.get("metadata", Bits.of(0))) + Bits.count(any_sent, 32)
        return parts

    return DataCodec(init=init, encode=encode, receive=receive,
                     decode=lambda payload, state, sent: inner.decode(payload.inner, state["inner"], sent),
                     bits=bits_of, rows=lambda payload, sent: inner.rows(payload.inner, sent),
                     decode_rows=lambda payload, rows, state, sent: inner.decode_rows(payload.inner, rows, state["inner"], sent),
                     unbiased=inner.unbiased)
