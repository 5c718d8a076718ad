"""Bit packing: B-bit integer codes into the bytes (or uint32 words) that would be sent."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def code_dtype(width: int):
    """The container of a packed code stream: whole words for 8/16/32 bits, bytes otherwise."""
    return {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}.get(width, jnp.uint8)


def word_packable(count: int, width: int) -> bool:
    """Whether ``count`` codes of ``width`` bits fill whole uint32 words (``pack_codes(words=True)``)."""
    return width in (1, 2, 4, 8) and (count * width) % 32 == 0


def flags_fuse(count: int, width: int, words: bool = False) -> bool:
    """Whether :func:`pack_codes` reduces its ``flags`` in the packing pass itself (widths 1, 2, 4 in
    bytes, and any width that fills uint32 words with ``words=True``); otherwise they cost a
    reduction of their own."""
    return (words and word_packable(count, width)) or width in (1, 2, 4)


def packed_size(count: int, width: int, words: bool = False) -> int:
    """Number of container elements holding ``count`` codes of ``width`` bits."""
    if words and word_packable(count, width):
        return count * width // 32
    if width in (8, 16, 32):
        return count
    return -(-count * width // 8)


def pack_codes(codes: Array, width: int, flags: Array | None = None, *, words: bool = False):
    """Pack the last axis of integer ``codes`` (each < 2**width) into a dense stream.

    Widths 8, 16, 32 use uint8/uint16/uint32 words; 1, 2 and 4 put 8, 4 and 2 codes in a byte; any
    other width is a little-endian bit stream padded to a whole byte. Leading axes are kept, so a
    batch of samples packs row by row and a gate can drop whole rows.

    With ``words=True``, a row whose codes fill whole 32-bit words (:func:`word_packable`: widths 1, 2,
    4, 8 and ``count * width`` a multiple of 32) is stored as uint32 words instead: the same bits
    (code ``i`` at bit ``i * width`` of the row, little-endian, so viewed as bytes the stream is
    identical) and the same size, in a container that unpacks without a byte-to-word pass. Other rows
    are packed as without it.

    Args:
      codes: integer array, each entry < 2**width.
      width: bits per code, 1..32.
      flags: optional boolean array of ``codes``' shape. If given, whether any flag is set is also
        returned; where :func:`flags_fuse` it is reduced in the same pass as the packing (a
        separate reduction over ``codes``' shape costs about as much as the packing on CPU).
      words: use uint32 words where the row fills them (see above).

    Returns:
      Array of shape ``codes.shape[:-1] + (packed_size(codes.shape[-1], width, words),)``; with
      ``flags``, the pair ``(packed, any_flag)`` with ``any_flag`` a boolean scalar.
    """
    if not 1 <= width <= 32:
        raise ValueError(f"width must be in 1..32, got {width}")
    if flags is not None and tuple(flags.shape) != tuple(codes.shape):
        raise ValueError(
            f"flags must have the shape of codes {tuple(codes.shape)}, got {tuple(flags.shape)}")
    codes = codes.astype(jnp.uint32)
    lead, count = codes.shape[:-1], codes.shape[-1]
    if words and word_packable(count, width):
        per = 32 // width
        c = codes.reshape(*lead, count // per, per) << (jnp.arange(per, dtype=jnp.uint32) * width)
        if flags is None:
            return jax.lax.reduce(c, jnp.uint32(0), jax.lax.bitwise_or, (c.ndim - 1,))
        f = flags.astype(jnp.uint8).reshape(*lead, count // per, per)
        packed, hit = jax.lax.reduce((c, f), (jnp.uint32(0), jnp.uint8(0)),
                                     lambda a, b: (a[0] | b[0], a[1] | b[1]), (c.ndim - 1,))
        return packed, jnp.max(hit, initial=0) > 0
    if flags is not None and flags_fuse(count, width):
        per = 8 // width
        pad = [(0, 0)] * len(lead) + [(0, (-count) % per)]
        c = jnp.pad(codes, pad).reshape(*lead, -1, per)
        f = jnp.pad(flags.astype(jnp.uint8), pad).reshape(*lead, -1, per)
        c = (c << (jnp.arange(per, dtype=jnp.uint32) * width)).astype(jnp.uint8)
        # One variadic reduction ORs the disjoint bit fields into bytes and the flags into a byte per
        # packed byte; XLA emits it as one loop over the codes.
        packed, hit = jax.lax.reduce((c, f), (jnp.uint8(0), jnp.uint8(0)),
                                     lambda a, b: (a[0] | b[0], a[1] | b[1]), (c.ndim - 1,))
        return packed, jnp.max(hit, initial=0) > 0
    if flags is not None:
        return pack_codes(codes, width), jnp.any(flags)
    if width in (8, 16, 32):
        return codes.astype(code_dtype(width))
    if 8 % width == 0:
        per = 8 // width
        pad = (-count) % per
        c = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, per)
        shifts = (jnp.arange(per, dtype=jnp.uint32) * width)
        return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32).astype(jnp.uint8)
    bits = (codes[..., None] >> jnp.arange(width, dtype=jnp.uint32)) & 1
    bits = bits.reshape(*lead, count * width)
    pad = (-count * width) % 8
    bits = jnp.pad(bits, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, 8)
    return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32).astype(jnp.uint8)


def unpack_codes(packed: Array, width: int, count: int) -> Array:
    """Inverse of :func:`pack_codes` (either container): the last axis back to ``count`` uint32 codes."""
    lead = packed.shape[:-1]
    if packed.dtype == jnp.uint32 and width < 32:
        if not word_packable(count, width) or packed.shape[-1] != count * width // 32:
            raise ValueError(f"uint32 words of shape {tuple(packed.shape)} do not hold {count} codes of "
                             f"{width} bits")
        shifts = jnp.arange(32 // width, dtype=jnp.uint32) * width
        return ((packed[..., None] >> shifts) & ((1 << width) - 1)).reshape(*lead, count)
    if packed.shape[-1] < packed_size(count, width):  # a truncated payload, not zeros to pad it with
        raise ValueError(f"a packed stream of {packed.shape[-1]} elements is too short for {count} codes "
                         f"of {width} bits (needs {packed_size(count, width)})")
    if width in (8, 16, 32):
        return packed.astype(jnp.uint32)
    if 8 % width == 0:
        # Read the bytes four at a time as little-endian uint32 words and split each word into its
        # 32 / width codes: the minor axis of the result then has a fixed length that XLA vectorizes
        # well (several times faster on CPU than splitting single bytes).
        p = packed.astype(jnp.uint8)
        pad = (-p.shape[-1]) % 4
        if pad:
            p = jnp.pad(p, [(0, 0)] * len(lead) + [(0, pad)])
        words = jax.lax.bitcast_convert_type(p.reshape(*lead, -1, 4), jnp.uint32)
        shifts = jnp.arange(32 // width, dtype=jnp.uint32) * width
        c = (words[..., None] >> shifts) & ((1 << width) - 1)
        c = c.reshape(*lead, -1)
        return c if c.shape[-1] == count else c[..., :count]
    p = packed.astype(jnp.uint32)
    bits = ((p[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1).reshape(*lead, -1)[..., : count * width]
    bits = bits.reshape(*lead, count, width)
    return jnp.sum(bits << jnp.arange(width, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def index_width(d: int) -> int:
    """Bits of one index into a vector of length d: ceil(log2 d), at least 1."""
    return max(1, math.ceil(math.log2(d))) if d > 1 else 1
