"""Entropy coding of data codes with a real coder: constriction's ANS, its model sent and charged.

DESIGN.md section 3: entropy-coded data is charged "the length of the coded bytes a real coder
produced (and the tests decode), plus the model it needs". The coder is ``constriction``
(R. Bamler, https://github.com/bamler-lab/constriction, Rust with Python bindings): its stack coder
``constriction.stream.stack.AnsCoder`` (asymmetric numeral systems, Duda 2009) with one
``Categorical`` model per code column.

* **Model** (:func:`fit_categorical`), sent once per node and charged once (:func:`model_bits`): for
  each column ``k`` (a pixel, or a transform coefficient with alphabet ``2^w_k``), the frequencies of
  its codes on the node's data, quantized to uint16 ``q_s = floor(p_s (2^16 - 1 - A_k)) + 1`` (every
  symbol keeps a nonzero probability, so any code can be sent). The payload is
  ``arrays['freq']``, all columns' tables end to end, ``16 sum_k A_k`` bits.
* **Message** (:meth:`EntropyCoder.encode`): the codes of a batch's transmitted samples, (b, K),
  coded into one stream of uint32 words; bits = ``32 * len(words)``, the real compressed length
  (:meth:`EntropyCoder.bits`). The learner knows b (it reads the count off the gate's or stream's
  own payload) and decodes the words back to the exact codes (:meth:`EntropyCoder.decode`).

This runs on the host (numpy), not under ``jax.jit``. A jitted round would keep the fixed-length
payload for the computation (decode is the same: the codes are identical) and charge the coded
length through :func:`coded_bits_callback`, a ``jax.pure_callback`` that hands the codes to the
host coder and returns the exact coded bits as an int32 (a :func:`jax.vmap` over nodes calls it
once per node, ``vmap_method="sequential"``).

:func:`cross_entropy_bits` gives ``-sum log2 p(code)`` under the model: an *estimate* of the coded
length (ANS comes within a few words of it), to print beside the coded bits, labelled as such.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import constriction
import jax
import jax.numpy as jnp
import numpy as np

from qdata.codecs import Payload, payload_bits, unpack_codes

_FREQ_BITS = 16


class EntropyMeta(NamedTuple):
    """Static description of a model (never sent): the alphabet size of each code column."""

    alphabet: tuple


def _check_codes(codes, alphabet) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(alphabet):
        raise ValueError(f"codes must have shape (b, {len(alphabet)}) to match the alphabet, got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or np.any(codes.max(axis=0) >= np.asarray(alphabet))):
        raise ValueError("codes must lie in 0..alphabet[k]-1 in every column k")
    return codes.astype(np.int32)


def fit_categorical(codes, alphabet) -> Payload:
    """The per-column categorical model of ``codes`` (N, K), quantized to uint16 frequencies.

    Args:
      codes: integer codes of the node's samples, one column per pixel or coefficient.
      alphabet: K alphabet sizes (``2^w_k``), each in 1..2^15.

    Returns:
      The model :class:`Payload` (``arrays['freq']`` uint16, ``meta`` :class:`EntropyMeta`).
    """
    alphabet = tuple(int(a) for a in alphabet)
    if not alphabet or min(alphabet) < 1 or max(alphabet) > 1 << (_FREQ_BITS - 1):
        raise ValueError(f"alphabet must be K sizes in 1..{1 << (_FREQ_BITS - 1)}, got {alphabet[:8]}...")
    codes = _check_codes(codes, alphabet)
    tables = []
    for k, size in enumerate(alphabet):
        p = np.bincount(codes[:, k], minlength=size) / max(1, codes.shape[0])
        tables.append(np.floor(p * ((1 << _FREQ_BITS) - 1 - size)).astype(np.int64) + 1)
    freq = np.concatenate(tables).astype(np.uint16)
    return Payload(arrays={"freq": jnp.asarray(freq)}, meta=EntropyMeta(alphabet))


def model_bits(model: Payload) -> int:
    """Exact bits of the model, read off its arrays (sent once per node)."""
    return payload_bits(model)


def _probabilities(model: Payload) -> list[np.ndarray]:
    if not isinstance(model.meta, EntropyMeta):
        raise ValueError(f"model must come from fit_categorical, its meta is {type(model.meta).__name__}")
    freq = np.asarray(model.arrays["freq"], np.float64)
    edges = np.cumsum((0,) + model.meta.alphabet)
    return [freq[a:b] / freq[a:b].sum() for a, b in zip(edges[:-1], edges[1:])]


class EntropyCoder(NamedTuple):
    """Host-side coder of one model: ``encode(codes) -> words``, ``decode(words, count) -> codes``,
    ``bits(words) -> int`` (``32 * len(words)``), ``alphabet`` (the K sizes)."""

    encode: Callable[[np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray, int], np.ndarray]
    bits: Callable[[np.ndarray], int]
    alphabet: tuple


def entropy_coder(model: Payload) -> EntropyCoder:
    """The ANS coder of ``model``; both sides build it from the model payload alone."""
    probs = _probabilities(model)
    alphabet = model.meta.alphabet
    # A one-symbol column carries no information and is not coded.
    models = [constriction.stream.model.Categorical(p, perfect=False) if p.size > 1 else None for p in probs]

    def encode(codes) -> np.ndarray:
        codes = _check_codes(codes, alphabet)
        coder = constriction.stream.stack.AnsCoder()
        # A stack: the last column pushed is the first popped, so push them in reverse order.
        for k in range(len(models) - 1, -1, -1):
            if alphabet[k] > 1:
                coder.encode_reverse(np.ascontiguousarray(codes[:, k]), models[k])
        return coder.get_compressed()

    def decode(words, count: int) -> np.ndarray:
        coder = constriction.stream.stack.AnsCoder(np.asarray(words, np.uint32))
        codes = np.zeros((int(count), len(models)), np.int32)
        for k, m in enumerate(models):
            if alphabet[k] > 1:
                codes[:, k] = coder.decode(m, int(count))
        if not coder.is_empty():
            raise ValueError("the coded words hold more than count samples of this model")
        return codes

    def bits(words) -> int:
        return 32 * int(np.asarray(words).size)

    return EntropyCoder(encode, decode, bits, alphabet)


def coded_bits(coder: EntropyCoder, codes, mask=None) -> int:
    """Exact coded bits of one message: the transmitted rows of ``codes`` (``mask`` 0/1 over rows,
    None for all) ANS-coded into one stream, ``32 * len(words)``. ``codes`` are a payload's codes
    (:func:`quantizer_codes`, ``transform_codes.payload_codes``). Host only; see the module
    docstring (and :func:`coded_bits_callback`) for a jitted round."""
    codes = np.asarray(codes)
    if mask is not None:
        codes = codes[np.asarray(mask) > 0]
    return coder.bits(coder.encode(codes))


def cross_entropy_bits(model: Payload, codes) -> float:
    """``-sum log2 p(code)`` under the model: an estimate of the coded length (not a coded length)."""
    probs = _probabilities(model)
    codes = _check_codes(codes, model.meta.alphabet)
    return float(-sum(np.log2(p[codes[:, k]]).sum() for k, p in enumerate(probs)))


def coded_bits_callback(coder: EntropyCoder) -> Callable[[jax.Array], jax.Array]:
    """``f(codes) -> int32`` exact coded bits of (b, K) codes, callable inside ``jax.jit`` and ``vmap``.

    A ``jax.pure_callback`` to the host coder; the words themselves stay on the host (a simulation
    only needs their length: the codes the learner decodes are the fixed-length payload's codes).
    """

    def host(codes):
        return np.int32(coded_bits(coder, codes))

    def f(codes):
        return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.int32), codes, vmap_method="sequential")

    return f


def quantizer_codes(payload: Payload) -> np.ndarray:
    """The (b, n) integer codes of a fixed-length pixel quantizer's payload (``rows['codes']``)."""
    meta = payload.meta
    bits, shape = getattr(meta, "bits", None), getattr(meta, "sample_shape", None)
    if bits is None or shape is None or "codes" not in payload.rows:
        raise ValueError("payload must come from a qdata.codecs quantizer (meta with bits and sample_shape)")
    return np.asarray(unpack_codes(payload.rows["codes"], bits, math.prod(shape)))
