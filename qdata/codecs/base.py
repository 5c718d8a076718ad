"""What crosses a link: the payload, the two codec shapes, bit packing and argument checks.

Every message in qdata is a :class:`Payload`: a pytree of *packed* arrays (uint8/uint16/uint32 codes,
fp16/fp32 scalars) exactly as they would be put on the wire, plus static metadata that both sides know
in advance (shapes, dtypes, the tree structure of the model) and that is therefore never counted.
The bit count of a payload is read off the arrays' own sizes (``size * itemsize * 8``), never from a
formula, so the ledger cannot drift from what the code actually sends.

Two codec shapes, in the optax style (a factory returns a NamedTuple of pure functions):

* :class:`Quantizer` for data samples: ``encode(key, x) -> Payload`` with ``x`` of shape
  ``(b, *sample_shape)`` (samples on the leading axis), ``decode(payload) -> x_hat`` and
  ``bits(payload, mask=None)`` (a Python int, or with a mask a :class:`ledger.Bits`). Per-sample
  arrays live in ``payload.rows`` (leading axis b), so a gate that sends only some samples is
  charged only for their rows.
* :class:`Compressor` for vectors and pytrees of parameters (the correction term, gradient
  compression): ``init(params) -> state``, ``encode(key, tree, state) -> (payload, state)``,
  ``decode(payload) -> tree`` and ``bits(payload)``. Stateless compressors use :class:`EmptyState`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata.codecs.ledger import Bits

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any


@struct.dataclass
class Payload:
    """A message as it crosses the link.

    Attributes:
      arrays: per-message arrays that are sent (dict of packed arrays).
      rows: per-sample arrays that are sent, each with the sample axis first; under a gate only the
        rows of transmitted samples count.
      meta: static metadata known to both sides before the message (shapes, dtypes, tree structure,
        hyper-parameters). Never sent, never counted. Must be hashable.
      info: local diagnostics of the encoder (e.g. how many values were clipped). Never sent, never
        counted; the decoder must not read it.
    """

    arrays: dict = struct.field(default_factory=dict)
    rows: dict = struct.field(default_factory=dict)
    meta: Any = struct.field(pytree_node=False, default=None)
    info: dict = struct.field(default_factory=dict)


def array_bits(x) -> int:
    """Exact bits of one packed array as sent: ``size * itemsize * 8`` (a static Python int)."""
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize * 8


def payload_bits(payload: Payload, mask: Array | None = None):
    """Exact uplink bits of ``payload``.

    Args:
      payload: the message (its arrays may be ``jax.ShapeDtypeStruct``: only shapes are read).
      mask: optional 0/1 vector over the sample axis of ``payload.rows``; only rows with mask 1 are
        counted (a gated message). Leading batch axes (e.g. from ``vmap`` over nodes) are not
        supported here: count per node, inside the vmap.

    Returns:
      A Python int when ``mask`` is None (sizes are static); else a :class:`ledger.Bits`, the static
      bits of ``payload.arrays`` plus the number of rows sent times the static bits of one row, so
      that no int32 product is formed (4,096 ImageNet samples at 4 bits exceed 2^31 bits).
    """
    fixed = sum(array_bits(a) for a in jax.tree_util.tree_leaves(payload.arrays))
    row_leaves = jax.tree_util.tree_leaves(payload.rows)
    if mask is None:
        return fixed + sum(array_bits(a) for a in row_leaves)
    per_row = sum(array_bits(a) // a.shape[0] for a in row_leaves)
    sent = jnp.sum(jnp.asarray(mask) > 0, dtype=jnp.int32)
    return Bits.of(fixed) + Bits.count(sent, per_row)


class Quantizer(NamedTuple):
    """A data-sample codec. ``encode(key, x)`` with samples on the leading axis of ``x``.

    ``unbiased`` says whether ``E[decode(encode(key, x))] = x`` for values inside the range;
    ``delta`` is the step ``Delta = (hi - lo) / (2^B - 1)`` of a dataset-wide range (None when the
    range is per sample and travels with the payload).
    """

    encode: Callable[[PRNGKey, Array], Payload]
    decode: Callable[[Payload], Array]
    bits: Callable[..., Any]
    unbiased: bool = False
    delta: float | None = None


class EmptyState(NamedTuple):
    """State of a stateless compressor."""


class Compressor(NamedTuple):
    """A vector/pytree codec with optional state (warm starts, error memory).

    ``init(params) -> state``; ``encode(key, tree, state) -> (payload, new_state)``;
    ``decode(payload) -> tree`` with the structure, shapes and dtypes of the encoded tree;
    ``bits(payload) -> int``. ``unbiased`` says whether ``E[decode(encode(key, x))] = x``.
    """

    init: Callable[[PyTree], PyTree]
    encode: Callable[[PRNGKey, PyTree, PyTree], tuple[Payload, PyTree]]
    decode: Callable[[Payload], PyTree]
    bits: Callable[[Payload], int]
    unbiased: bool = False
    # Relative variance bound of an unbiased compressor as a function of d:
    # E||C(x) - x||^2 <= omega(d) * ||x||^2. None where no bound is claimed (biased compressors).
    omega: Callable[[int], float] | None = None


# ----------------------------------------------------------------------------------------------
# Flattening pytrees to one vector, with a hashable spec that can ride in Payload.meta.


class TreeSpec(NamedTuple):
    """Static description of a pytree of arrays: enough to rebuild it from a flat vector."""

    treedef: Any
    shapes: tuple
    dtypes: tuple

    @property
    def size(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


def tree_spec(tree: PyTree) -> TreeSpec:
    """The :class:`TreeSpec` of ``tree`` without concatenating its leaves (for per-leaf codecs)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return TreeSpec(treedef, tuple(tuple(l.shape) for l in leaves), tuple(jnp.dtype(l.dtype).name for l in leaves))


def flatten(tree: PyTree) -> tuple[Array, TreeSpec]:
    """Concatenate the leaves of ``tree`` into one float32 vector of length d."""
    leaves, spec = jax.tree_util.tree_leaves(tree), tree_spec(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.float32), spec
    vec = jnp.concatenate([jnp.ravel(l).astype(jnp.float32) for l in leaves])
    return vec, spec


def unflatten(vec: Array, spec: TreeSpec) -> PyTree:
    """Inverse of :func:`flatten`."""
    leaves, start = [], 0
    for shape, dtype in zip(spec.shapes, spec.dtypes):
        size = math.prod(shape)
        leaves.append(vec[start : start + size].reshape(shape).astype(dtype))
        start += size
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


# ----------------------------------------------------------------------------------------------
# Bit packing: B-bit codes into the bytes that would be sent.


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


# ----------------------------------------------------------------------------------------------
# Cheap counter-based random words (for rounding and dither, where one draw per coordinate is needed).

_WEYL = 0x9E3779B9  # 2^32 / golden ratio, odd: c -> c * _WEYL is a bijection of uint32
_COLUMN_TABLE_MAX = 1 << 16  # largest last axis whose Weyl offsets are embedded as a constant table


def _mix32(h: Array) -> Array:
    """lowbias32 (C. Wellons, hash-prospector): a bijective uint32 mixer with near-ideal avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def counter_bits(seed: Array, shape: tuple[int, ...]) -> Array:
    """uint32 random words of ``shape`` from one uint32 ``seed``, several times cheaper than threefry.

    Word ``c`` (row-major position) is ``mix(c * phi + seed)`` (mod 2^32) with ``phi = 0x9E3779B9``
    and ``mix`` the bijection lowbias32. For each position the map ``seed -> word`` is a bijection of
    uint32, so under a uniformly random ``seed`` every word is *exactly* uniform on 0..2^32-1 and the
    words of independent seeds are independent: expectations over the seed (unbiasedness, mean
    squared error) are exact. Words at different positions of one call are decorrelated by the
    mixer only (two seeds give the same sequence shifted by ``(seed' - seed) / phi`` positions):
    good enough for rounding noise and dither, not a cryptographic or general-purpose generator.
    Both ends of a link can regenerate the words from the seed, so a shared dither costs 32 bits.

    Args:
      seed: uint32 scalar (e.g. ``jax.random.bits(key, (), jnp.uint32)``).
      shape: static output shape, fewer than 2^32 elements.

    Returns:
      uint32 array of ``shape``.
    """
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"counter_bits draws fewer than 2^32 words, got shape {shape}")
    seed = jnp.asarray(seed, jnp.uint32)
    n = shape[-1] if shape else 1
    if len(shape) < 2 or n > _COLUMN_TABLE_MAX:
        c = jax.lax.iota(jnp.uint32, size).reshape(shape)
        return _mix32(c * jnp.uint32(_WEYL) + seed)
    # Same words, cheaper: c * phi = row * (n phi) + col * phi (mod 2^32), with col * phi a small
    # constant table and row * (n phi) + seed formed once per row, so no per-word multiply remains
    # before the mixer.
    col = jnp.asarray((np.arange(n, dtype=np.uint64) * _WEYL % 2**32).astype(np.uint32))
    rows = math.prod(shape[:-1])
    row = jax.lax.iota(jnp.uint32, rows) * jnp.uint32(n * _WEYL % 2**32) + seed
    return _mix32(row[:, None] + col).reshape(shape)


# ----------------------------------------------------------------------------------------------
# How the codecs' own jitted functions are compiled.


@functools.cache
def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def codec_compiler_options() -> dict:
    """XLA options for the codecs' jitted encode/decode (``jax.jit(..., compiler_options=...)``).

    On the CPU backend the quantizers are compute bound (hash, round, pack every coordinate): where
    the CPU has AVX-512, ``xla_cpu_prefer_vector_width=512`` (XLA's default is 256) makes the 4-bit
    round trip about 1.3-1.5x faster (``experiments/bench_codecs.py``). Elsewhere, no options.
    (``xla_cpu_enable_fast_min_max`` was measured too: it slows XLA's min/max reductions 4x.)

    The options apply to an executable as a whole: they take effect when a codec is called on its
    own (``q.encode(key, x)``), not when it is traced inside an enclosing ``jax.jit``, which compiles
    with that jit's options (pass these there too if wanted, as the benchmark does). A new dict each
    call.
    """
    if jax.default_backend() == "cpu" and _cpu_has_avx512():
        return {"xla_cpu_prefer_vector_width": 512}
    return {}


def codec_jit(fn: Callable) -> Callable:
    """``jax.jit(fn)``, compiled with :func:`codec_compiler_options` when called at top level.

    JAX accepts compiler options on a top-level jit only, so a call with traced arguments (inside an
    enclosing ``jit``, ``vmap``, ``grad``) goes to the plain ``jax.jit(fn)`` and is compiled with
    the enclosing computation.
    """
    plain = jax.jit(fn)
    options = codec_compiler_options()
    if not options:
        return plain
    tuned = jax.jit(fn, compiler_options=options)

    @functools.wraps(fn)
    def call(*args):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args)):
            return plain(*args)
        try:
            return tuned(*args)
        except ValueError as err:  # concrete arguments, but inside another trace
            if "compiler_options" not in str(err):
                raise
            return plain(*args)

    return call


# ----------------------------------------------------------------------------------------------
# Argument checks: raised at construction or before any work, naming the argument.


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 16:
        raise ValueError(f"{name} must be an integer in 1..16, got {bits!r}")
    return int(bits)


def check_int(value: int, name: str, lo: int = 1, hi: int | None = None) -> int:
    """An integer hyper-parameter in ``lo..hi`` (``hi`` None: no upper bound); bools are refused."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if ok and (int(value) < lo or (hi is not None and int(value) > hi)):
        ok = False
    if not ok:
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def check_range(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"the quantizer range needs finite lo < hi, got lo={lo}, hi={hi}")
    return lo, hi


def check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer inside jit/vmap/grad)."""
    return not any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves(x))


def check_finite(x: PyTree, name: str = "x") -> None:
    """Raise ValueError if a concrete ``x`` holds NaN or inf. Tracers are skipped (checked upstream)."""
    if not is_concrete(x):
        return
    for leaf in jax.tree_util.tree_leaves(x):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise ValueError(f"{name} contains {bad} NaN or inf value(s)")
