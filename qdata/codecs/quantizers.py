"""Data quantizers Q: B-bit codes for data samples (DESIGN.md section 2, step 2; section 3).

A node sends ``Q(x_j)`` instead of the sample ``x_j in R^n``. Every factory here returns a
:class:`payloads.Quantizer` ``(encode, decode, bits, unbiased, delta)``:

* ``encode(key, x) -> Payload`` with ``x`` of shape ``(b, *sample_shape)``, samples on the leading
  axis. Each coordinate becomes an integer code in ``0..2^B-1``; the codes of a sample are packed
  with :func:`packing.pack_codes` into ``payload.rows['codes']`` of shape
  ``(b, packed_size(n, B, words=True))``: uint32 words when a row fills whole words (B = 1, 2, 4, 8
  and ``n B`` a multiple of 32, as for images), otherwise 8, 4, 2 codes per byte for B = 1, 2, 4,
  uint8/uint16 words for B = 8, 16 and a bit stream for other B; either way sample ``j`` costs
  exactly ``8 * ceil(n B / 8)`` bits.
* ``decode(payload) -> x_hat`` of the shape and dtype of ``x``.
* ``bits(payload, mask=None)``: :func:`payloads.payload_bits`, read off the packed arrays (a Python
  int); with a 0/1 ``mask`` over samples only the transmitted rows count, and the count is an exact
  :class:`~qdata.codecs.ledger.Bits` (rows sent times bits per row, never an int32 product).

The range ``[lo, hi]`` is either dataset-wide (a hyper-parameter both sides know, never sent) with
step ``Delta = (hi - lo) / (2^B - 1)``, or per sample (:func:`per_sample_range`: each sample's
min and max travel as metadata). With ``u = (x - lo) / Delta`` in ``[0, 2^B - 1]``:

================================  ======================================  =========================
quantizer                          code and decode                         error
================================  ======================================  =========================
:func:`stochastic_rounding`        ``floor(u + U)``, ``lo + Delta code``   ``E[Q(x)] = x``,
                                                                           ``E||Q(x)-x||^2 <= n Delta^2/4``
:func:`nearest_rounding`           ``round(u)``, ``lo + Delta code``       ``|Q(x)-x| <= Delta/2``, biased
:func:`subtractive_dither`         ``round(u + U - 1/2)``,                 uniform on ``[-Delta/2, Delta/2]``,
                                   ``lo + Delta (code - (U - 1/2))``       independent of ``x``
================================  ======================================  =========================

with ``U ~ U[0, 1)`` independent per coordinate. Stochastic rounding is the standard unbiased
quantizer (e.g. the per-coordinate step of QSGD, Alistarh et al. 2017); subtractive dither is
Schuchman (1964) and Gray & Stockham (1993), "Dithered quantizers", IEEE Trans. Inf. Theory 39(3).

Values outside ``[lo, hi]`` are clipped to the range (never wrapped around the code space) and
counted in ``payload.info['clipped']`` (an int32, never sent). With ``on_clip="error"``, a concrete
``x`` with out-of-range values raises ``ValueError``; under ``jax.jit``/``jax.vmap`` the values are
traced, so the count is reported instead and the caller must check it.

Randomness. The uniforms come from :func:`randomness.counter_bits`, 32-bit words from a 32-bit seed drawn
from ``key`` with ``jax.random.bits``: one word per coordinate, except for stochastic rounding with
``B in {1, 2, 4, 8}`` (also within :func:`per_sample_range`), where coordinates ``2i`` and ``2i + 1``
take the low and high 16 bits of word ``i`` (half the hashing; the halves of a uniform word are
uniform and independent). Each word is exactly uniform over the seed, so the statements above hold
exactly in expectation over ``key``, up to the resolution of ``U`` below; it is several times cheaper
than drawing every word with threefry. The rounding itself runs in fixed point with ``F`` fractional
bits: ``code = (t + r) >> F`` with ``t`` the integer ``u 2^F`` and ``r`` an ``F``-bit uniform word, so
``P(round up) = frac(t / 2^F)`` exactly.

* Paired 16-bit uniforms, ``F = 16`` for ``B <= 4`` and ``F = 15`` at ``B = 8`` (the top 15 bits of
  the half), so that ``u 2^F < 2^23``: ``t = round(u 2^F)`` (half to even), obtained without a
  float-to-integer conversion as the low bits of ``u 2^F + 2^23``; rounding then adds a bias of at
  most ``2^-(F+1) Delta`` per coordinate either way (``2^-17 Delta``; ``2^-16 Delta`` at ``B = 8``,
  where float32's own resolution of ``u`` near its top, ``2^-16``, is no finer). Nearest rounding takes
  ``round(u)`` the same way (identical to ``jnp.round``).
* ``F = 24`` otherwise: ``t = floor(u 2^24)`` (for ``B <= 8``, where ``u 2^24 < 2^32``, computed in one
  uint32 as ``(floor(u 2^24) + r) >> 24``), a bias in ``(-2^-24 Delta, 0]``.

Computation is in float32 (float64 for float64 input), so ``u`` itself carries float32 rounding, about
``2^-24 (|lo| + |hi|)``. The encode and decode functions compile with
:func:`compile_options.codec_compiler_options` when called at top level (512-bit vectors on AVX-512 CPUs).

Everything runs under ``jax.jit`` (hyper-parameters are static Python values fixed by the factory)
and under ``jax.vmap`` over a leading node axis (count bits per node, inside the vmap).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qdata import checks
from qdata.codecs import compile_options, packing, payloads, randomness
from qdata.codecs.payloads import Payload, Quantizer

Array = jax.Array

ON_CLIP = ("count", "error")
ROUNDING = ("stochastic", "nearest")

# Fractional bits of the fixed-point rounding; 24 is float32's mantissa, so nothing finer exists.
_FRAC_BITS = 24
# Stochastic rounding for B = 1, 2, 4, 8 (2^B - 1 levels) draws 16-bit uniforms, two per hashed word
# (:func:`_uniform16`): measured faster there, where the packing groups codes in pairs or more.
_PAIRED_LEVELS = (1, 3, 15, 255)


def _paired_frac_bits(levels: int) -> int:
    """F for the paired 16-bit uniforms: 16, or 15 at B = 8 so that ``levels 2^F < 2^23``."""
    return 16 if levels < 128 else 15



class QuantizerMeta(NamedTuple):
    """Static record of a quantized batch, known to both sides (never sent, never counted).

    Attributes:
      kind: which quantizer produced the payload ("stochastic_rounding", "nearest_rounding",
        "subtractive_dither", "per_sample_range").
      bits: B, bits per coordinate.
      lo, hi: the dataset-wide range; None for per-sample ranges (they travel in ``rows``).
      sample_shape: shape of one sample (``x.shape[1:]``).
      dtype: name of ``x``'s dtype, restored by ``decode``.
    """

    kind: str
    bits: int
    lo: float | None
    hi: float | None
    sample_shape: tuple
    dtype: str


# ----------------------------------------------------------------------------------------------
# Checks.


def _check_on_clip(on_clip) -> str:
    if on_clip not in ON_CLIP:
        raise ValueError(f"on_clip must be one of {ON_CLIP}, got {on_clip!r}")
    return on_clip


def _check_bound(value, name: str) -> float:
    if isinstance(value, (bool, str, bytes)) or checks.is_concrete(value) is False:
        raise ValueError(f"{name} must be a real number (the quantizer range), got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a real number (the quantizer range), got {value!r}") from err
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (the quantizer range), got {value}")
    return value


def _check_lo_hi(lo, hi) -> tuple[float, float]:
    lo, hi = _check_bound(lo, "lo"), _check_bound(hi, "hi")
    return checks.check_range(lo, hi)


def _check_x(x) -> Array:
    """Shape and dtype checks (static, valid under jit), then NaN/inf for concrete ``x``."""
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim < 2:
        raise ValueError(
            f"x must have shape (b, *sample_shape) with the samples on the leading axis, got shape "
            f"{tuple(x.shape)}; for a single sample pass x[None]"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}; cast integer data first")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"x's samples must have at least one coordinate, got shape {tuple(x.shape)}")
    checks.check_finite(x, "x")
    return x


def _raise_if_clipped(x: Array, lo, hi) -> None:
    """on_clip='error' for concrete ``x`` (``lo``/``hi`` scalars or per-row arrays)."""
    if not checks.is_concrete(x):
        return
    a = np.asarray(x)
    count = int(np.count_nonzero((a < lo) | (a > hi)))
    if count:
        raise ValueError(
            f"x has {count} value(s) outside the quantizer range [lo, hi]; widen the range or pass "
            f"on_clip='count' to clip them"
        )


def _min_max(flat: Array, axes: tuple) -> tuple[Array, Array]:
    """Min and max over ``axes`` in one pass (one variadic reduction: separate ``jnp.min`` and
    ``jnp.max`` read ``flat`` twice, which costs about as much as the rounding itself), on integer
    keys that order as the floats do (sign-magnitude to two's complement: XLA vectorizes integer
    min/max reductions better than float ones, which must propagate NaN). Exact for finite values."""
    itype = jnp.int64 if flat.dtype == jnp.float64 else jnp.int32
    flat = flat.astype(jnp.float32) if itype == jnp.int32 else flat
    magnitude = jnp.iinfo(itype).max

    def key(values):  # an involution: key(key(v)) = v
        return values ^ ((values >> (jnp.iinfo(itype).bits - 1)) & magnitude)

    k = key(jax.lax.bitcast_convert_type(flat, itype))
    low, high = jax.lax.reduce((k, k), (jnp.asarray(magnitude, itype), jnp.asarray(-magnitude - 1, itype)),
                               lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])), axes)
    return (jax.lax.bitcast_convert_type(key(low), flat.dtype),
            jax.lax.bitcast_convert_type(key(high), flat.dtype))


def _count_outside(flat: Array, lo, hi, outside: Array | None = None) -> Array:
    """int32 count of values of ``flat`` below ``lo`` or above ``hi``.

    An exact count is a serial reduction that costs more than the whole rounding on CPU, so it runs
    only when the cheap test ``outside`` (by default from the global min and max) says a value is
    out of range. (Under ``vmap`` both branches run; the result is the same.)
    """
    if outside is None:
        low, high = _min_max(flat, tuple(range(flat.ndim)))
        outside = ~((low >= lo) & (high <= hi))  # NaN counts as outside (it encodes as lo)
    return jax.lax.cond(outside, lambda f: jnp.sum(~((f >= lo) & (f <= hi)), dtype=jnp.int32),
                        # Built from f (not a constant) so both branches have f's sharding type
                        # under shard_map.
                        lambda f: jnp.sum(f[:0] < lo, dtype=jnp.int32), flat)


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _check_meta(payload: Payload, kind: str, **expected) -> QuantizerMeta:
    """The payload's meta, refused unless ``kind`` made it with the decoder's own ``expected`` fields
    (bits, range): codes read under another B or range would decode silently wrong."""
    meta = getattr(payload, "meta", None)
    if not isinstance(meta, QuantizerMeta) or meta.kind != kind:
        got = meta.kind if isinstance(meta, QuantizerMeta) else type(meta).__name__
        raise ValueError(f"payload was not produced by {kind} (its meta says {got!r})")
    for name, want in expected.items():
        if getattr(meta, name) != want:
            raise ValueError(f"payload was produced by {kind} with {name}={getattr(meta, name)!r}; "
                             f"this decoder has {name}={want!r}")
    return meta


# ----------------------------------------------------------------------------------------------
# Rounding in units of Delta: u in [0, L] -> integer codes in 0..L.


def _seed(key) -> Array:
    return jax.random.bits(key, (), jnp.uint32)


def _uniform24(seed: Array, shape) -> Array:
    """24-bit uniform words r (U = r / 2^24 in [0, 1)), regenerable from ``seed``."""
    return randomness.counter_bits(seed, shape) >> (32 - _FRAC_BITS)


def _floor_plus_uniform(u: Array, r24: Array, levels: int) -> Array:
    """floor(u_t + r24 / 2^24) exactly, with u_t = u truncated to 24 fractional bits (u >= 0).

    Done in integers so that the carry happens with probability exactly t / 2^24 whatever the size of
    u (a float sum u + U would drop U's low bits once u >= 1).
    """
    if levels < 1 << (32 - _FRAC_BITS):
        # u <= levels = 2^B - 1 < 2^8, so u 2^24 < 2^32 (exact: a power-of-two scaling) and its truncation to
        # uint32 is u_t in fixed point; one add and one shift then give whole + carry.
        t = (u * float(1 << _FRAC_BITS)).astype(jnp.uint32)
        return (t + r24) >> _FRAC_BITS
    whole = jnp.floor(u)
    t = ((u - whole) * (1 << _FRAC_BITS)).astype(jnp.int32).astype(jnp.uint32)
    return whole.astype(jnp.uint32) + ((t + r24) >> _FRAC_BITS)


def _uniform16(seed: Array, shape) -> Array:
    """16-bit uniform words r (U = r / 2^16 in [0, 1)) for a (b, n) batch, regenerable from ``seed``.

    Coordinates ``2i`` and ``2i + 1`` of a row take the low and high halves of word ``i`` of
    :func:`randomness.counter_bits`: the halves of an exactly uniform 32-bit word are exactly uniform and
    independent, and half as many words are hashed. The pairs stay on a minor axis of length 2, which
    the packing of B = 1, 2, 4 (codes grouped by 8, 4, 2) reads without a transpose.
    """
    b, n = shape
    m = -(-n // 2)
    w = randomness.counter_bits(seed, (b, m))
    r = (w[..., None] >> jnp.asarray([0, 16], jnp.uint32)) & jnp.uint32(0xFFFF)
    r = r.reshape(b, 2 * m)
    return r if 2 * m == n else r[:, :n]


def _rne_bits(v: Array) -> Array:
    """The bits of ``v + 2^p`` (``p`` = 23 for float32, 52 for float64) as unsigned integers: for
    ``0 <= v < 2^p`` they are ``bits(2^p) + round(v)`` (round half to even, the FPU's rounding), and
    ``bits(2^p)`` has its low ``p`` bits zero. One add instead of a float-to-int conversion."""
    if v.dtype == jnp.float64:
        return jax.lax.bitcast_convert_type(v + jnp.float64(2.0**52), jnp.uint64)
    return jax.lax.bitcast_convert_type(v + jnp.float32(2.0**23), jnp.uint32)


def _stochastic_codes(key, a: Array, scale, levels: int) -> tuple[Array, dict]:
    """Codes ``floor(u + U)`` for ``u = clip(a * scale, 0, levels)`` (``a = x - lo``)."""
    if levels in _PAIRED_LEVELS:
        # v = u 2^F <= levels 2^F < 2^23 (exact: power-of-two scaling of the clipped u), so _rne_bits
        # gives t = round(v), u in fixed point with F fractional bits, in its low bits; adding an F-bit
        # uniform r carries into the integer part with probability frac(t / 2^F). The constant above
        # bit 23 shifts to 0x4B << (24 - F) (float32), whose low 8 bits are zero: the mask keeps the code.
        frac = _paired_frac_bits(levels)
        one = float(1 << frac)
        t = _rne_bits(jax.lax.clamp(0.0, a * (scale * one), levels * one))
        r = (_uniform16(_seed(key), a.shape) >> (16 - frac)).astype(t.dtype)
        return (((t + r) >> frac) & levels).astype(jnp.uint32), {}
    u = jnp.clip(a * scale, 0.0, levels)
    return _floor_plus_uniform(u, _uniform24(_seed(key), u.shape), levels), {}


def _nearest_codes(key, a: Array, scale, levels: int) -> tuple[Array, dict]:
    del key
    # round(u) half to even, as jnp.round; u <= 2^16 - 1 < 2^23 and bits(2^23) has its low 23 bits zero.
    return (_rne_bits(jax.lax.clamp(0.0, a * scale, float(levels))) & levels).astype(jnp.uint32), {}


def _dither_codes(key, a: Array, scale, levels: int) -> tuple[Array, dict]:
    # round(u + U - 1/2) = floor(u + U) away from ties; the seed is sent so the decoder can subtract U.
    # One 24-bit word per coordinate: the decoder regenerates U, and paired 16-bit halves, whose layout
    # differs from the unpacked codes', measured slower to decode than they saved in encoding.
    seed = _seed(key)
    u = jnp.clip(a * scale, 0.0, levels)
    return _floor_plus_uniform(u, _uniform24(seed, u.shape), levels), {"seed": seed}


def _plain_levels(codes: Array, arrays: dict, dtype) -> Array:
    del arrays
    return codes.astype(dtype)


def _dither_levels(codes: Array, arrays: dict, dtype) -> Array:
    dither = _uniform24(arrays["seed"], codes.shape).astype(dtype) * (2.0**-_FRAC_BITS)
    return codes.astype(dtype) - dither + 0.5


_RULES: dict[str, tuple[Callable, Callable]] = {
    "stochastic_rounding": (_stochastic_codes, _plain_levels),
    "nearest_rounding": (_nearest_codes, _plain_levels),
    "subtractive_dither": (_dither_codes, _dither_levels),
}


def _quantizer(kind: str, encode_jit, decode_jit, on_clip: str, error_range: tuple, *, unbiased: bool,
               delta: float | None, expected: dict) -> Quantizer:
    """The public encode/decode around jitted ones: input checks (and ``on_clip="error"`` against
    ``error_range``) before any work, the payload's kind checked before decoding; bits read off the
    packed arrays (:func:`payloads.payload_bits`)."""

    def encode(key, x) -> Payload:
        x = _check_x(x)
        if on_clip == "error":
            _raise_if_clipped(x, *error_range)
        return encode_jit(key, x)

    def decode(payload: Payload) -> Array:
        _check_meta(payload, kind, **expected)
        return decode_jit(payload)

    return Quantizer(encode=encode, decode=decode, bits=payloads.payload_bits, unbiased=unbiased, delta=delta)


# ----------------------------------------------------------------------------------------------
# Dataset-wide range.


def _fixed_range(kind: str, bits, lo, hi, on_clip, unbiased: bool) -> Quantizer:
    bits = checks.check_bits(bits)
    lo, hi = _check_lo_hi(lo, hi)
    on_clip = _check_on_clip(on_clip)
    levels = (1 << bits) - 1
    delta = (hi - lo) / levels
    to_codes, to_levels = _RULES[kind]

    @compile_options.codec_jit
    def _encode(key, x):
        b, n = x.shape[0], math.prod(x.shape[1:])
        cdt = _compute_dtype(x.dtype)
        flat = x.reshape(b, n).astype(cdt)
        codes, arrays = to_codes(key, flat - lo, levels / (hi - lo), levels)
        if packing.flags_fuse(n, bits, words=True):
            # The out-of-range test rides along the packing loop instead of a pass of its own.
            packed, outside = packing.pack_codes(codes, bits, flags=~((flat >= lo) & (flat <= hi)), words=True)
            clipped = _count_outside(flat, lo, hi, outside)
        else:
            packed, clipped = packing.pack_codes(codes, bits, words=True), _count_outside(flat, lo, hi)
        meta = QuantizerMeta(kind, bits, lo, hi, tuple(x.shape[1:]), jnp.dtype(x.dtype).name)
        return Payload(arrays=arrays, rows={"codes": packed}, meta=meta, info={"clipped": clipped})

    @compile_options.codec_jit
    def _decode(payload: Payload):
        meta = _check_meta(payload, kind)
        cdt = _compute_dtype(meta.dtype)
        n = math.prod(meta.sample_shape)
        codes = packing.unpack_codes(payload.rows["codes"], meta.bits, n)
        x_hat = lo + to_levels(codes, payload.arrays, cdt) * jnp.asarray(delta, cdt)
        return x_hat.reshape(codes.shape[0], *meta.sample_shape).astype(meta.dtype)

    return _quantizer(kind, _encode, _decode, on_clip, (lo, hi), unbiased=unbiased, delta=delta,
                      expected=dict(bits=bits, lo=lo, hi=hi))


def stochastic_rounding(bits: int, lo: float, hi: float, *, on_clip: str = "count") -> Quantizer:
    """Unbiased stochastic rounding of each coordinate to ``2^B`` levels on ``[lo, hi]``.

    ``u = (x - lo) / Delta``, ``code = floor(u + U)``, ``U ~ U[0, 1)`` per coordinate, and
    ``Q(x) = lo + Delta code`` with ``Delta = (hi - lo) / (2^B - 1)``. For ``x`` in range,
    ``E[Q(x)] = x`` and ``E||Q(x) - x||^2 = Delta^2 sum_i f_i (1 - f_i) <= n Delta^2 / 4``
    (``f_i = frac(u_i)``); see e.g. Alistarh et al. 2017 (QSGD), DESIGN.md section 2 step 2.

    Args:
      bits: B in 1..16, bits per coordinate.
      lo, hi: the dataset-wide range, finite, ``lo < hi``; known to both sides, not sent.
      on_clip: "count" clips out-of-range values to ``[lo, hi]`` and counts them in
        ``payload.info['clipped']``; "error" raises ``ValueError`` for a concrete ``x`` with such
        values (under ``jax.jit``/``vmap`` the count is reported instead).

    Returns:
      A :class:`payloads.Quantizer` with ``unbiased=True`` and ``delta = Delta``. Payload:
      ``rows['codes']`` (b, ceil(n B / 8) bytes or n words), ``b * 8 ceil(n B / 8)`` bits.
    """
    return _fixed_range("stochastic_rounding", bits, lo, hi, on_clip, unbiased=True)


def nearest_rounding(bits: int, lo: float, hi: float, *, on_clip: str = "count") -> Quantizer:
    """Deterministic rounding of each coordinate to the nearest of ``2^B`` levels on ``[lo, hi]``.

    ``code = round(u)``, ``Q(x) = lo + Delta code``: ``|Q(x) - x| <= Delta / 2`` per coordinate for
    ``x`` in range, but biased (``E[Q(x)] != x`` in general); the key is ignored.

    Args:
      bits: B in 1..16, bits per coordinate.
      lo, hi: the dataset-wide range, finite, ``lo < hi``; known to both sides, not sent.
      on_clip: "count" (clip and count in ``payload.info['clipped']``) or "error" (``ValueError``
        for a concrete ``x`` out of range; under ``jax.jit``/``vmap`` the count is reported instead).

    Returns:
      A :class:`payloads.Quantizer` with ``unbiased=False`` and ``delta = Delta``; ``b * 8 ceil(n B / 8)``
      bits.
    """
    return _fixed_range("nearest_rounding", bits, lo, hi, on_clip, unbiased=False)


def subtractive_dither(bits: int, lo: float, hi: float, *, on_clip: str = "count") -> Quantizer:
    """Subtractive dithered quantization to ``2^B`` levels on ``[lo, hi]``.

    Node and learner share a dither ``U ~ U[0, 1)`` per coordinate through a 32-bit seed sent in
    ``payload.arrays['seed']`` (uint32, counted). ``code = round(u + U - 1/2)`` and
    ``Q(x) = lo + Delta (code - (U - 1/2))``. The error ``Q(x) - x`` is uniform on
    ``[-Delta/2, Delta/2]``, with variance ``Delta^2 / 12`` per coordinate, and independent of ``x``
    (Schuchman 1964; Gray & Stockham 1993), so ``Q`` is unbiased and its error is signal-free. The
    decoded value may leave ``[lo, hi]`` by up to ``Delta / 2``.

    Args:
      bits: B in 1..16, bits per coordinate.
      lo, hi: the dataset-wide range, finite, ``lo < hi``; known to both sides, not sent.
      on_clip: "count" (clip and count in ``payload.info['clipped']``) or "error" (``ValueError``
        for a concrete ``x`` out of range; under ``jax.jit``/``vmap`` the count is reported instead).

    Returns:
      A :class:`payloads.Quantizer` with ``unbiased=True`` and ``delta = Delta``;
      ``b * 8 ceil(n B / 8) + 32`` bits.
    """
    return _fixed_range("subtractive_dither", bits, lo, hi, on_clip, unbiased=True)


# ----------------------------------------------------------------------------------------------
# Per-sample range.


def _outward(value: Array, dtype, direction: float) -> Array:
    """``value`` cast to ``dtype``, moved one step toward ``direction`` if the cast went the other way,
    and kept finite (a range beyond dtype's largest value is clamped; what falls outside is clipped)."""
    cast = value.astype(dtype)
    wrong_side = (cast.astype(value.dtype) > value) if direction < 0 else (cast.astype(value.dtype) < value)
    cast = jnp.where(wrong_side, jnp.nextafter(cast, jnp.asarray(direction, dtype)), cast)
    big = jnp.finfo(dtype).max
    return jnp.clip(cast, -big, big)


def per_sample_range(bits: int, *, rounding: str = "stochastic", range_dtype=jnp.float16,
                     on_clip: str = "count") -> Quantizer:
    """Quantize each sample on its own range ``[lo_j, hi_j] = [min x_j, max x_j]``, sent as metadata.

    The range of sample ``j`` is sent in ``payload.rows['lo']``, ``payload.rows['hi']`` as
    ``range_dtype`` (fp16 by default: 32 bits per sample), rounded *outward* (``jnp.nextafter``) so
    that no value is clipped and encoder and decoder use the very same range. Within it,
    ``Delta_j = (hi_j - lo_j) / (2^B - 1)`` and the coordinates are rounded as in
    :func:`stochastic_rounding` (unbiased, ``E||Q(x_j) - x_j||^2 <= n Delta_j^2 / 4``) or
    :func:`nearest_rounding` (``|error| <= Delta_j / 2``). A constant sample (``lo_j = hi_j``) is sent
    as code 0 and decoded exactly, with no division by zero.

    Args:
      bits: B in 1..16, bits per coordinate.
      rounding: "stochastic" (unbiased) or "nearest" (deterministic, biased).
      range_dtype: floating dtype of the sent range (jnp.float16, jnp.bfloat16, jnp.float32).
      on_clip: values can only be clipped when they lie beyond ``range_dtype``'s largest finite value
        (65504 for fp16); "count" clips and counts them in ``payload.info['clipped']``, "error"
        raises ``ValueError`` for a concrete ``x`` (under ``jax.jit``/``vmap`` the count is reported).

    Returns:
      A :class:`payloads.Quantizer` with ``delta=None`` and ``unbiased`` true for stochastic rounding;
      ``b * (8 ceil(n B / 8) + 2 * bits(range_dtype))`` bits.
    """
    bits = checks.check_bits(bits)
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
    try:
        range_dtype = jnp.dtype(range_dtype)
    except TypeError as err:
        raise ValueError(f"range_dtype must be a floating dtype, got {range_dtype!r}") from err
    if not jnp.issubdtype(range_dtype, jnp.floating):
        raise ValueError(f"range_dtype must be a floating dtype, got {range_dtype}")
    on_clip = _check_on_clip(on_clip)
    levels = (1 << bits) - 1
    to_codes = _stochastic_codes if rounding == "stochastic" else _nearest_codes
    big = float(jnp.finfo(range_dtype).max)
    kind = "per_sample_range"

    def _steps(lo_sent: Array, hi_sent: Array, cdt):
        """Both sides derive the step from the *sent* range; a constant sample gets step 0."""
        lo, hi = lo_sent.astype(cdt)[:, None], hi_sent.astype(cdt)[:, None]
        width = hi - lo
        return lo, width, width > 0

    @compile_options.codec_jit
    def _encode(key, x):
        b, n = x.shape[0], math.prod(x.shape[1:])
        cdt = _compute_dtype(x.dtype)
        flat = x.reshape(b, n).astype(cdt)
        row_min, row_max = _min_max(flat, (1,))
        lo_sent = _outward(row_min, range_dtype, -math.inf)
        hi_sent = _outward(row_max, range_dtype, math.inf)
        lo, width, spread = _steps(lo_sent, hi_sent, cdt)
        clipped = _count_outside(flat, -big, big, jnp.any(row_min < -big) | jnp.any(row_max > big))
        scale = jnp.where(spread, levels / jnp.where(spread, width, 1.0), 0.0)
        codes, _ = to_codes(key, flat - lo, scale, levels)
        meta = QuantizerMeta(kind, bits, None, None, tuple(x.shape[1:]), jnp.dtype(x.dtype).name)
        rows = {"codes": packing.pack_codes(codes, bits, words=True), "lo": lo_sent, "hi": hi_sent}
        return Payload(rows=rows, meta=meta, info={"clipped": clipped})

    @compile_options.codec_jit
    def _decode(payload: Payload):
        meta = _check_meta(payload, kind)
        cdt = _compute_dtype(meta.dtype)
        n = math.prod(meta.sample_shape)
        codes = packing.unpack_codes(payload.rows["codes"], meta.bits, n)
        lo, width, _ = _steps(payload.rows["lo"], payload.rows["hi"], cdt)
        x_hat = lo + codes.astype(cdt) * (width / levels)
        return x_hat.reshape(codes.shape[0], *meta.sample_shape).astype(meta.dtype)

    return _quantizer(kind, _encode, _decode, on_clip, (-big, big), unbiased=rounding == "stochastic",
                      delta=None, expected=dict(bits=bits))
