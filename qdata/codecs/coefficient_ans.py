"""Adaptive ANS of transform codes: each coefficient its own model (issue 10, entropy coding of the codes).

DESIGN.md section 2 step 2 ("entropy-code the codes with a real coder") and section 3 (charged the
length of the bytes a real coder produced). A transform code (:mod:`qdata.codecs.transform_codec`)
sends coefficient k of every sample at its own width ``w_k`` (fitted per node, 0 for a truncated
coefficient); its codes are far from uniform (a coefficient's values cluster around its mean, the
range is its extremes), so an adaptive model of each coefficient codes them in fewer bits. The
coder and the counts are :func:`qdata.codecs.adaptive_ans.adaptive_ans`'s (Krichevsky-Trofimov
prior, both ends adding the sent codes, rescaled); here:

* **Context** of a code: its coefficient index k, with the alphabet ``2^{w_k}`` of that coefficient
  (a code of a coefficient is coded under the first ``2^{w_k}`` counts of its row). A coefficient
  with ``w_k = 0`` is not coded and costs nothing.
* **Counts**: one row per *coded* coefficient, in the order of k (row r holds the r-th coefficient
  with ``w_k > 0``: the widths are the node's, fixed from its setup on, and both ends hold them), so
  ``(min(n, S), 2^W)`` int32 for a budget of S bits a sample (every coded coefficient has at least
  one bit, and the widths sum to at most S) and ``W`` the largest width (8). At S = 400 that is
  400 KiB at each end per node, for n = 784 (Fashion-MNIST) as for n = 3,072 (CIFAR-10), where a row
  per coefficient would hold 784 KiB and 3 MiB. Per-width tables would hold less still, but the
  widths are each node's, traced under ``vmap``, so their shapes could not depend on them.
* **Message**: the sent samples' codes, coefficient-major (all samples' first coded coefficient,
  then their second, ...), one ANS stream under the counts before the message; charged
  ``32 * words`` (part ``'data'``) and a 32-bit word count (``'metadata'``) when a sample is sent.
  The setup (part ``'setup'``, round 0) and a dither seed (``'metadata'``) are the transform codec's.

The learner learns the widths from the node's setup in its first message before it reads that
message's codes, so both ends code the first message under the same (prior) counts. The learner
reads the fixed-length codes of the inner payload: lossless, training identical to ``coder='fixed'``.
"""

from __future__ import annotations

import math

import constriction
import jax
import jax.numpy as jnp
import numpy as np

from qdata import checks
from qdata.codecs import transform_codes
from qdata.codecs.adaptive_ans import SymbolModel, adaptive_ans, read_codes, stream_words
from qdata.codecs.data_codec import DataCodec
from qdata.codecs.transform_codec import TransformPayload, coefficient_codes

Array = jax.Array


def _coded(widths, rows: int, xp):
    """The coefficients in the order they are coded (those with ``w_k > 0`` first, by k; ``rows`` of
    them) and their alphabets ``2^{w_k}`` (0 past the coded ones)."""
    order = (xp.argsort(widths == 0, stable=True) if xp is jnp else np.argsort(widths == 0, kind="stable"))[:rows]
    w = widths[order]
    return order, xp.where(w > 0, 1 << w, 0)


def encode_words(codes, widths, counts) -> np.ndarray:
    """The ANS stream (uint32 words) of the codes ``(s, n)`` of s samples under ``counts``
    (coefficient-major, the coefficients of width 0 skipped). Host."""
    order, sizes = _coded(np.asarray(widths, np.int64), np.asarray(counts).shape[0], np)
    return stream_words(np.asarray(codes, np.int32)[:, order], np.arange(order.size), sizes, counts)


def decode_words(words, counts, count: int, widths) -> np.ndarray:
    """The ``count`` samples' codes ``(count, n)`` (0 where ``w_k = 0``) of a stream from
    :func:`encode_words`. Host (tests)."""
    widths = np.asarray(widths, np.int64)
    order, sizes = _coded(widths, np.asarray(counts).shape[0], np)
    coded = int(np.sum(sizes > 0))
    codes = np.zeros((int(count), widths.size), np.int32)
    coder = constriction.stream.stack.AnsCoder(np.asarray(words, np.uint32))
    if count and coded:
        read = read_codes(coder, counts, np.repeat(np.arange(coded), count), np.repeat(sizes[:coded], count))
        codes[:, order[:coded]] = np.asarray(read, np.int32).reshape(coded, int(count)).T
    if not coder.is_empty():
        raise ValueError(f"the stream holds more than {count} samples' codes under these counts")
    return codes


def coefficient_ans(inner: DataCodec, sample_shape, max_width: int = transform_codes.MAX_WIDTH) -> DataCodec:
    """``inner`` (a transform codec, :func:`qdata.codecs.transform_codec.transform_codec`, of
    samples of ``sample_shape`` with widths up to ``max_width``) with its coefficient codes charged
    as an adaptive ANS stream, each coefficient its own context (module docstring). Decoding, rows,
    ``fit`` and unbiasedness are ``inner``'s; the state is ``inner``'s beside the counts."""
    sample_shape = tuple(int(s) for s in sample_shape)
    max_width = checks.check_int(max_width, "max_width", lo=1, hi=transform_codes.MAX_WIDTH)
    example = jax.ShapeDtypeStruct((1,) + sample_shape, jnp.float32)
    shape = jax.eval_shape(lambda x: inner.encode(jax.random.PRNGKey(0), x, inner.init(), jnp.ones((1,)))[0], example)
    if not isinstance(shape, TransformPayload):
        raise ValueError("coefficient_ans codes the coefficient codes of a transform codec (transform_codec); "
                         f"this codec's payload is {type(shape).__name__}")
    rows = min(math.prod(sample_shape), 8 * shape.codes.rows["codes"].shape[1])  # K <= sum_k w_k <= S

    def symbols(payload, inner_state):
        codes, widths = coefficient_codes(payload, inner_state)
        order, sizes = _coded(widths, rows, jnp)
        return codes[:, order], jnp.arange(rows, dtype=jnp.int32), sizes

    return adaptive_ans(inner, SymbolModel(rows, 1 << max_width, symbols))
