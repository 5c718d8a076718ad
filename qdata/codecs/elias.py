"""Elias omega ("recursive") integer codes and QSGD's Elias coding of its messages.

Alistarh et al. (2017), section 3.2, send a QSGD vector as its norm followed by, for each nonzero
entry, the Elias-coded run of zeros before it, its sign and its Elias-coded level. Per bucket, the
stream here is::

    norm (fp32, 32 bits) | omega(nnz + 1) | nnz x [ omega(gap) | sign (1 bit) | omega(level) ]

with ``gap`` the distance from the previous nonzero of the bucket (from position -1 for the first:
gap >= 1) and ``nnz`` the bucket's count of nonzero levels, so the decoder knows where each bucket
ends. Elias omega (Elias 1975) codes n >= 1 as: the binary forms of n, of its length minus one, of
that one's length minus one, ..., most significant group first, then a 0.

The stream is variable-length, so it is not formed inside the jitted round: the learner there reads
the fixed-length payload that :func:`qdata.codecs.compressors.qsgd` produces, and the ledger charges
:func:`qsgd_elias_bits`, the exact length of the stream :func:`encode_qsgd` writes from that same
payload (jit-able, counted in closed form from the levels, as exact :class:`~qdata.codecs.ledger.Bits`). :func:`encode_qsgd` and
:func:`decode_qsgd` are the host-side coder; the tests check that the decoded stream gives back the
payload's norms, levels and signs, and that its length equals :func:`qsgd_elias_bits`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdata.codecs import base
from qdata.codecs.ledger import Bits

_MAX_OMEGA = 42  # the longest omega code of an int32 (n = 2^31 - 1)
_DEPTH = 5  # omega's recursion for n < 2^32: n -> floor(log2 n) <= 31 -> <= 4 -> <= 2 -> 1


def _floor_log2(n: jax.Array) -> jax.Array:
    return 31 - jax.lax.clz(n.astype(jnp.int32))


def omega_length(n: jax.Array) -> jax.Array:
    """Bits of the Elias omega code of each ``n >= 1`` (int32, jit-able): 1 for the final 0, plus
    ``floor(log2 m) + 1`` for each group m = n, floor(log2 n), ... while m > 1."""
    n = jnp.asarray(n, jnp.int32)
    length = jnp.ones_like(n)
    for _ in range(_DEPTH):
        more = n > 1
        log = _floor_log2(jnp.maximum(n, 1))
        length = length + jnp.where(more, log + 1, 0)
        n = jnp.where(more, log, 1)
    return length


def omega_bits(n: int) -> str:
    """The Elias omega code of ``n >= 1`` as a string of '0'/'1' (host)."""
    if n < 1:
        raise ValueError(f"Elias omega codes integers >= 1, got {n}")
    code = "0"
    while n > 1:
        group = format(n, "b")
        code = group + code
        n = len(group) - 1
    return code


def read_omega(bits: str, at: int) -> tuple[int, int]:
    """Read one Elias omega code from ``bits`` at position ``at``; return ``(n, next position)``."""
    n = 1
    while True:
        if at >= len(bits):
            raise ValueError("the stream ends inside an Elias omega code")
        if bits[at] == "0":
            return n, at + 1
        group = bits[at:at + n + 1]
        if len(group) < n + 1:
            raise ValueError("the stream ends inside an Elias omega code")
        n, at = int(group, 2), at + n + 1


def _levels_and_signs(payload) -> tuple[jax.Array, jax.Array]:
    meta = payload.meta
    d = meta.spec.size
    codes = base.unpack_codes(payload.arrays["codes"], meta.width, d)
    return (codes >> 1).astype(jnp.int32), (codes & 1).astype(jnp.int32)


def _length_bits(lengths: jax.Array, where: jax.Array) -> Bits:
    """Sum of ``lengths`` over ``where`` as exact :class:`Bits`: a count per code length (every
    omega code of an int32 is at most 42 bits), so no int32 sum of bits is formed. The counts are one
    histogram (codes left out go to bin 0): one pass over the message, not one per length."""
    counts = jnp.bincount(jnp.where(where, lengths, 0).reshape(-1), length=_MAX_OMEGA + 1)
    total = Bits.of(0)
    for length in range(1, _MAX_OMEGA + 1):
        total = total + Bits.count(counts[length].astype(jnp.int32), length)
    return total


def qsgd_elias_bits(payload) -> Bits:
    """Exact bits of the Elias stream of one QSGD message (module docstring), as :class:`Bits`
    (exact at any size, jit-able)."""
    meta = payload.meta
    level, _ = _levels_and_signs(payload)
    d, b = meta.spec.size, meta.bucket
    nb = -(-d // b)
    level = jnp.pad(level, (0, nb * b - d)).reshape(nb, b)
    nonzero = level > 0
    position = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32), (nb, b))
    seen = jax.lax.cummax(jnp.where(nonzero, position, -1), axis=1)
    previous = jnp.concatenate([jnp.full((nb, 1), -1, jnp.int32), seen[:, :-1]], axis=1)
    gaps = _length_bits(omega_length(jnp.maximum(position - previous, 1)), nonzero)
    levels = _length_bits(omega_length(jnp.maximum(level, 1)), nonzero)
    signs = Bits.count(jnp.sum(nonzero, dtype=jnp.int32), 1)
    counts = omega_length(jnp.sum(nonzero, axis=1, dtype=jnp.int32) + 1)
    heads = Bits.of(32 * nb) + _length_bits(counts, jnp.ones_like(counts, bool))
    return gaps + levels + signs + heads


def encode_qsgd(payload) -> tuple[bytes, int]:
    """The Elias stream of one QSGD message (host): ``(bytes, number of bits)``, zero-padded to
    whole bytes."""
    meta = payload.meta
    level, sign = (np.asarray(a) for a in _levels_and_signs(payload))
    norms = np.asarray(payload.arrays["norms"], np.float32)
    out = []
    for k, start in enumerate(range(0, meta.spec.size, meta.bucket)):
        lv, sg = level[start:start + meta.bucket], sign[start:start + meta.bucket]
        out.append(format(int(norms[k].view(np.uint32)), "032b"))
        where = np.flatnonzero(lv)
        out.append(omega_bits(len(where) + 1))
        previous = -1
        for p in where:
            out.append(omega_bits(int(p - previous)) + str(int(sg[p])) + omega_bits(int(lv[p])))
            previous = p
    bits = "".join(out)
    padded = bits + "0" * (-len(bits) % 8)
    return int(padded, 2).to_bytes(len(padded) // 8, "big") if padded else b"", len(bits)


def decode_qsgd(data: bytes, nbits: int, meta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an Elias stream back (host): ``(norms, levels, signs)`` of the d coordinates.

    A truncated or malformed stream (fewer bytes than ``nbits``, a norm, code or sign cut short, a
    count or gap that leaves its bucket, a level above s, bits left over) is a ValueError saying which.
    """
    if not isinstance(data, (bytes, bytearray)) or isinstance(nbits, bool) or not isinstance(nbits, int):
        raise ValueError(f"decode_qsgd takes the stream's bytes and its bit count, got {type(data).__name__} "
                         f"and {nbits!r}")
    if not 0 <= nbits <= 8 * len(data):
        raise ValueError(f"the stream claims {nbits} bits but holds {8 * len(data)} (a truncated stream)")
    bits = format(int.from_bytes(data, "big"), f"0{len(data) * 8}b")[:nbits] if data else ""
    d, b = meta.spec.size, meta.bucket
    norms, level, sign = [], np.zeros(d, np.int64), np.zeros(d, np.int64)
    at = 0
    for start in range(0, d, b):
        end = min(start + b, d)
        if at + 32 > nbits:
            raise ValueError(f"the stream ends inside the norm of the bucket at coordinate {start}")
        norms.append(np.uint32(int(bits[at:at + 32], 2)).view(np.float32))
        count, at = read_omega(bits, at + 32)
        if count - 1 > end - start:
            raise ValueError(f"the bucket at coordinate {start} claims {count - 1} nonzeros, it has {end - start} coordinates")
        position = start - 1
        for _ in range(count - 1):
            gap, at = read_omega(bits, at)
            position += gap
            if position >= end or at >= nbits:
                raise ValueError(f"a gap leaves the bucket at coordinate {start}, or the stream ends in a sign")
            sign[position] = int(bits[at])
            level[position], at = read_omega(bits, at + 1)
            if level[position] > meta.levels:
                raise ValueError(f"level {level[position]} at coordinate {position} is above s = {meta.levels}")
    if at != nbits:
        raise ValueError(f"the stream has {nbits} bits, the message read ends at {at}")
    return np.asarray(norms, np.float32), level, sign
