"""Adaptive ANS of a codec's integer codes, inside the jitted round: the coder and the counts both ends keep.

DESIGN.md section 3: entropy-coded data is charged the length of the bytes a real coder produced,
plus the model it needs. The coder is constriction's ANS (``constriction.stream.stack.AnsCoder``,
R. Bamler, https://github.com/bamler-lab/constriction); the model is *adaptive*: each code is coded
under the frequencies, within its context, of the codes the learner has already received from this
node. Both ends hold those counts (the node codec's state and the learner's mirror of it), so no
model crosses the link; what the model costs while it is still learning shows in the coded length
of the first messages. What a code's context is, and its alphabet, is the :class:`SymbolModel`'s:
the neighbours of a pixel code (:mod:`qdata.codecs.context_ans`), the index of a transform
coefficient (:mod:`qdata.codecs.coefficient_ans`).

* **Counts**: int32 ``(contexts, alphabet)``, held as ``2 c + 1`` (the Krichevsky-Trofimov prior
  1/2); after each message both ends add 2 per code of its sent samples, and halve (keeping them
  odd) a context whose counts sum past ``RESCALE_AT``, as adaptive coders do: no overflow in any run.
  A code of alphabet ``a`` is coded under the first ``a`` counts of its context.
* **Message**: the sent samples' codes, position-major (all samples' first code, then their
  second, ...) so that a decoder may rebuild each context from the codes it has decoded, skipping
  the positions of alphabet 0 (nothing to send), coded into one ANS stream of uint32 words under the
  counts before the message. Charged: ``32 * words`` (part ``'data'``) and a 32-bit word count
  (``'metadata'``) when at least one sample is sent.

In the round the learner reads the fixed-length codes of the inner payload (the codes the stream
decodes to, as the host decoders show in the tests) and the ledger charges the stream's length,
which a ``jax.pure_callback`` to the host coder returns (``vmap_method="sequential"``: one call per
node). The codes are lossless: training is exactly that of the fixed-length codes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import constriction
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata.codecs.data_codec import DataCodec
from qdata.codecs.ledger import Bits

Array = jax.Array
RESCALE_AT = 1 << 24  # a context whose counts sum past this is halved (int32 never overflows)
_FAMILY = constriction.stream.model.Categorical(perfect=False)  # leaky: every symbol stays codable


class SymbolModel(NamedTuple):
    """What the adaptive coder codes of a payload.

    ``contexts`` and ``alphabet``: the shape of the counts. ``symbols(payload, inner_state)`` (jittable)
    gives, for the b items of a payload, ``(codes, ctx, sizes)``, each ``(b, m)`` int32 in the order
    they are coded: the codes, their contexts (rows of the counts) and their alphabets (a code lies in
    ``0..sizes - 1``; 0: nothing to code); ``inner_state`` is the inner codec's state after the
    message (what both ends hold once it is received)."""

    contexts: int
    alphabet: int
    symbols: Callable[[Any, Any], tuple[Array, Array, Array]]


@struct.dataclass
class CodedPayload:
    """The inner codec's payload (its fixed-length codes, which the stream decodes to) and the
    length in uint32 words of the ANS stream of its sent rows, as the host coder wrote it."""

    inner: Any
    words: Array


def probabilities(counts, ctx, sizes) -> np.ndarray:
    """Each code's distribution ``(len, max size)`` float64: its context's counts over its alphabet. Host."""
    sizes = np.asarray(sizes)
    top = int(sizes.max()) if sizes.size else 1
    table = np.asarray(counts, np.float64)[np.asarray(ctx), :top]
    table = np.where(np.arange(top)[None, :] < sizes[:, None], table, 0.0)
    return table / table.sum(axis=-1, keepdims=True)


def stream_words(codes, ctx, sizes, counts) -> np.ndarray:
    """The ANS stream (uint32 words) of the codes ``(s, m)`` of s samples, position-major, each under
    its context's counts over its alphabet (positions of size 0 skipped). Host."""
    codes, ctx, sizes = (np.asarray(a, np.int32) for a in np.broadcast_arrays(codes, ctx, sizes))
    keep = sizes.T.ravel() > 0
    if not keep.any():
        return np.zeros((0,), np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(codes.T).ravel()[keep], _FAMILY,
                         probabilities(counts, ctx.T.ravel()[keep], sizes.T.ravel()[keep]))
    return coder.get_compressed()


def read_codes(coder, counts, ctx, sizes) -> np.ndarray:
    """The next ``len(ctx)`` codes off ``coder`` (a ``constriction`` AnsCoder over a stream of
    :func:`stream_words`), each under its context's counts over its alphabet. Host (decoders)."""
    return coder.decode(_FAMILY, probabilities(counts, ctx, sizes))


def add_codes(counts: Array, codes: Array, ctx: Array, sizes: Array, sent: Array) -> Array:
    """The counts after a message: 2 more per code of the sent items, then any context whose counts
    sum past ``RESCALE_AT`` halved and kept odd (module docstring)."""
    coded = (sent > 0)[:, None] & (jnp.broadcast_to(sizes, codes.shape) > 0)
    ctx = jnp.broadcast_to(ctx, codes.shape)
    counts = counts.at[ctx.ravel(), codes.ravel()].add(2 * coded.astype(jnp.int32).ravel())
    full = jnp.sum(counts, axis=1, keepdims=True) > RESCALE_AT
    return jnp.where(full, (counts >> 1) | 1, counts)


def _host_words(codes, ctx, sizes, sent, counts):
    rows = np.asarray(sent) > 0
    return np.int32(stream_words(np.asarray(codes)[rows], np.asarray(ctx)[rows], np.asarray(sizes)[rows],
                                 counts).size)


def adaptive_ans(inner: DataCodec, model: SymbolModel) -> DataCodec:
    """``inner`` with the codes ``model`` reads off its payloads charged as an adaptive ANS stream
    (module docstring). Decoding, rows, unbiasedness and ``fit`` are ``inner``'s; the state is
    ``{"inner": inner's, "counts": (contexts, alphabet) int32}``."""

    def symbols(payload, inner_state):
        codes, ctx, sizes = model.symbols(payload, inner_state)
        return codes, jnp.broadcast_to(ctx, codes.shape), jnp.broadcast_to(sizes, codes.shape)

    def init():
        return {"inner": inner.init(), "counts": jnp.ones((model.contexts, model.alphabet), jnp.int32)}

    def encode(key, x, state, sent, pos=None):
        payload, inner_state = inner.encode(key, x, state["inner"], sent, pos)
        codes, ctx, sizes = symbols(payload, inner_state)
        words = jax.pure_callback(_host_words, jax.ShapeDtypeStruct((), jnp.int32), codes, ctx, sizes, sent,
                                  state["counts"], vmap_method="sequential")
        new = {"inner": inner_state, "counts": add_codes(state["counts"], codes, ctx, sizes, sent)}
        return CodedPayload(inner=payload, words=words), new

    def receive(payload, state, sent):
        inner_state = inner.receive(payload.inner, state["inner"], sent)
        return {"inner": inner_state, "counts": add_codes(state["counts"], *symbols(payload.inner, inner_state), sent)}

    def bits(payload, sent):
        parts = dict(inner.bits(payload.inner, sent))
        parts.pop("data")  # the fixed-length codes are not sent: the stream is
        any_sent = jnp.any(sent > 0).astype(jnp.int32)
        parts["data"] = Bits.count(payload.words, 32)
        parts["metadata"] = Bits.of(parts.get("metadata", Bits.of(0))) + Bits.count(any_sent, 32)
        return parts

    def fit(state, x, count):
        return {**state, "inner": inner.fit(state["inner"], x, count)}

    return DataCodec(init=init, encode=encode, receive=receive,
                     decode=lambda payload, state, sent: inner.decode(payload.inner, state["inner"], sent),
                     bits=bits, rows=lambda payload, sent: inner.rows(payload.inner, sent),
                     decode_rows=lambda payload, rows, state, sent: inner.decode_rows(payload.inner, rows, state["inner"], sent),
                     unbiased=inner.unbiased, fit=None if inner.fit is None else fit)
