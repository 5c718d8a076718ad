"""Packing codes of *different* widths into one byte stream per sample.

A transform code gives coefficient ``k`` its own width ``w_k`` bits (0 for a truncated
coefficient). The codes of one sample are laid end to end as a little-endian bit stream: code ``k``
occupies bits ``s_k .. s_k + w_k - 1`` with ``s_k = w_0 + ... + w_{k-1}``, its least significant
bit first, and the stream is padded with zeros to a whole byte. A sample therefore costs exactly
``8 * ceil(sum_k w_k / 8)`` bits, read off the packed array (:func:`qdata.codecs.base.payload_bits`).

The widths are static (numpy), known to both sides from the codec's setup; packing and unpacking
are pure jittable functions of the codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MAX_WIDTH = 16


def check_widths(widths) -> np.ndarray:
    """``widths`` as a 1-D int64 numpy array of values in 0..16, or ValueError naming the argument."""
    w = np.asarray(widths)
    if w.ndim != 1 or w.size == 0 or not np.issubdtype(w.dtype, np.integer):
        raise ValueError(f"widths must be a non-empty 1-D integer array, got {w.dtype} of shape {w.shape}")
    if w.min() < 0 or w.max() > MAX_WIDTH:
        raise ValueError(f"widths must lie in 0..{MAX_WIDTH}, got values in {int(w.min())}..{int(w.max())}")
    return w.astype(np.int64)


def stream_bits(widths) -> int:
    """Bits of one packed row: ``8 * ceil(sum(widths) / 8)``."""
    return 8 * (-(-int(check_widths(widths).sum()) // 8))


def _layout(widths: np.ndarray):
    """Static gather tables: for every bit of the stream, its code and its position in the code."""
    source = np.repeat(np.arange(widths.size), widths)
    shift = np.concatenate([np.arange(w) for w in widths]) if widths.sum() else np.zeros(0, np.int64)
    return source, shift


def pack_widths(codes: Array, widths) -> Array:
    """Pack ``codes`` of shape ``(b, K)`` (code ``k`` < ``2**widths[k]``) into ``(b, ceil(sum w / 8))`` uint8.

    Coefficients of width 0 contribute nothing (their codes are ignored).
    """
    widths = check_widths(widths)
    if codes.ndim != 2 or codes.shape[1] != widths.size:
        raise ValueError(f"codes must have shape (b, {widths.size}) to match widths, got {tuple(codes.shape)}")
    source, shift = _layout(widths)
    total = int(widths.sum())
    b = codes.shape[0]
    if total == 0:
        return jnp.zeros((b, 0), jnp.uint8)
    bits = (codes.astype(jnp.uint32)[:, source] >> jnp.asarray(shift, jnp.uint32)) & 1
    bits = jnp.pad(bits, ((0, 0), (0, (-total) % 8))).reshape(b, -1, 8)
    return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32).astype(jnp.uint8)


def unpack_widths(packed: Array, widths) -> Array:
    """Inverse of :func:`pack_widths`: ``(b, bytes)`` uint8 back to ``(b, K)`` uint32 codes (0 where w_k = 0)."""
    widths = check_widths(widths)
    total = int(widths.sum())
    b = packed.shape[0]
    if packed.ndim != 2 or packed.shape[1] != -(-total // 8):
        raise ValueError(f"packed must have shape (b, {-(-total // 8)}) for widths summing to {total} bits, "
                         f"got {tuple(packed.shape)}")
    if total == 0:
        return jnp.zeros((b, widths.size), jnp.uint32)
    bits = (packed.astype(jnp.uint32)[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1
    bits = bits.reshape(b, -1)
    # Each code gathers up to max(w) bits from its start; bits beyond its width are masked off.
    top = int(widths.max())
    start = np.concatenate([[0], np.cumsum(widths)[:-1]])
    offset = np.arange(top)
    index = np.minimum(start[:, None] + offset, bits.shape[1] - 1)
    keep = (offset[None, :] < widths[:, None]).astype(np.uint32)
    weight = jnp.asarray(keep << offset[None, :].astype(np.uint32), jnp.uint32)
    return jnp.sum(bits[:, index] * weight, axis=-1, dtype=jnp.uint32)


def pack_varying(codes: Array, widths: Array, num_bytes: int) -> Array:
    """:func:`pack_widths` for widths known only at run time (a traced (K,) int array, as each
    node's fitted widths are under ``vmap``): ``(b, K)`` codes into a fixed ``(b, num_bytes)``
    uint8 row, the same bit layout, zero padding after ``sum_k w_k`` bits (which must be at
    most ``8 num_bytes``: the caller's allocation guarantees it)."""
    widths = jnp.asarray(widths, jnp.int32)
    ends = jnp.cumsum(widths)
    p = jnp.arange(8 * num_bytes, dtype=jnp.int32)
    k = jnp.searchsorted(ends, p, side="right")  # the code holding stream bit p (K past the end)
    kc = jnp.minimum(k, widths.shape[0] - 1)
    shift = (p - (ends[kc] - widths[kc])).astype(jnp.uint32)
    bits = (codes.astype(jnp.uint32)[:, kc] >> shift) & (k < widths.shape[0]).astype(jnp.uint32)
    bits = bits.reshape(codes.shape[0], num_bytes, 8)
    return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32).astype(jnp.uint8)


def unpack_varying(packed: Array, widths: Array, max_width: int) -> Array:
    """Inverse of :func:`pack_varying`: ``(b, bytes)`` uint8 to ``(b, K)`` uint32 codes (0 where
    ``w_k = 0``), each width at most ``max_width`` (static)."""
    widths = jnp.asarray(widths, jnp.int32)
    bits = ((packed.astype(jnp.uint32)[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1).reshape(packed.shape[0], -1)
    offset = jnp.arange(max_width, dtype=jnp.int32)
    index = jnp.minimum((jnp.cumsum(widths) - widths)[:, None] + offset, bits.shape[1] - 1)
    weight = (offset[None, :] < widths[:, None]).astype(jnp.uint32) << offset[None, :].astype(jnp.uint32)
    return jnp.sum(bits[:, index] * weight, axis=-1, dtype=jnp.uint32)
