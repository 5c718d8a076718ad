"""Transform codes: quantize each sample in an orthonormal basis where its energy concentrates.

DESIGN.md section 2 step 2 ("codes far below n*B"). A node holding samples ``x in R^n`` sends the
coefficients ``c = (x - mu) V`` of the sample in an orthonormal basis ``V`` (columns), each coefficient
with its own width ``b_k`` bits, and the learner decodes ``x_hat = mu + c_hat V^T``:

* basis ``"dct"``: the fixed orthonormal 2-D DCT-II of each image channel (:func:`dct_basis`),
  known to both sides, never sent;
* basis ``"pca"``: the principal axes of the node's own data, the columns that get bits sent once
  as fp16 and orthonormalized again (QR) on both sides, so encoder and decoder use the same basis.

The **setup** (:func:`fit_transform_code`) is the codec's fitted state and is itself a
:class:`~qdata.codecs.Payload`, sent once per node and charged once (:func:`setup_bits`):
``mean`` (fp16, n values), ``widths`` (4-bit codes, one per basis column), per-coefficient ranges
``lo``/``hi`` of the coefficients that get bits (``range_dtype``, rounded outward), and for PCA the
``basis`` (fp16, n x K). :func:`transform_code` builds the codec from the setup alone, as the learner
would. Widths come from integer reverse water-filling (:mod:`qdata.codecs.bit_allocation`) of the
distortion each coefficient's quantizer makes, to a budget of code bits per sample.

Per coefficient with ``w_k >= 1`` bits, ``u = (c_k - lo_k) / Delta_k`` with ``Delta_k = (hi_k - lo_k)
/ (2^w_k - 1)``, code ``floor(u + U)`` with ``U ~ U[0, 1)`` (exact in 24-bit fixed point, widths <= 8):

* ``rounding="stochastic"``: ``c_hat = lo + Delta code``, ``E[c_hat] = c`` inside the range,
  ``E(c_hat - c)^2 = Delta^2 f (1 - f) <= Delta^2 / 4``, ``|c_hat - c| < Delta``;
* ``rounding="dither"`` (subtractive dither; the seed of ``U`` travels in ``arrays['seed']``, 32 bits):
  ``c_hat = lo + Delta (code - U + 1/2)``, error uniform on ``[-Delta/2, Delta/2]``, independent of c.

**Truncation.** Coefficients with 0 bits are decoded as 0 (the fitted mean): the code is unbiased
for the *projection* of the sample, ``E[x_hat] = mu + P (x - mu)`` with ``P = V_K V_K^T`` the
projector on the coefficients that get bits, and biased by ``-(I - P)(x - mu)``
(:func:`truncation_bias`), left to the correction term. ``Quantizer.unbiased`` is True only when every
basis column gets bits. Coefficients outside their fitted range are clipped and counted in
``payload.info['clipped']`` (never sent); on the node's own fitted data nothing is clipped.

Per-sample payload: ``rows['codes']``, the codes packed end to end (:mod:`qdata.codecs.varpack`),
``8 ceil(sum_k w_k / 8)`` bits a sample, read off the array by ``bits`` (``payload_bits``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qdata.codecs import Payload, Quantizer, counter_bits, pack_codes, payload_bits, unpack_codes
from qdata.codecs import bit_allocation, varpack

Array = jax.Array

BASES = ("dct", "pca")
ROUNDINGS = ("stochastic", "dither")
ALLOCATIONS = ("waterfill", "uniform")
MAX_WIDTH = 8  # the 24-bit fixed-point rounding needs u < 2^8
_FRAC = 24
_DISTORTION_ROWS = 4096  # rows on which the allocation measures each coefficient's distortion


class SetupMeta(NamedTuple):
    """Static description of a setup (never sent): basis kind, sample shape, rounding, range dtype."""

    basis: str
    sample_shape: tuple
    rounding: str
    columns: int
    range_dtype: str


class TransformMeta(NamedTuple):
    """Static record of a per-sample payload (never sent)."""

    kind: str
    sample_shape: tuple
    dtype: str


class TransformState(NamedTuple):
    """What both sides derive from the setup: ``x_hat = mean + c_hat basis^T``.

    Attributes:
      mean: (n,) float32, the fitted mean as sent.
      basis: (n, K) float32 orthonormal columns of the coefficients that get bits.
      lo, hi: (K,) float32 ranges as sent; step: (K,) ``Delta_k``.
      widths: (K,) numpy int64 widths, all >= 1.
      rounding: "stochastic" or "dither".
    """

    mean: Array
    basis: Array
    lo: Array
    hi: Array
    step: Array
    widths: np.ndarray
    rounding: str


# ----------------------------------------------------------------------------------------------
# Bases.


def _dct_matrix(size: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, rows are basis vectors (``scipy.fft.dct(norm='ortho')``)."""
    k, i = np.arange(size)[:, None], np.arange(size)[None, :]
    m = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * i + 1) * k / (2 * size))
    m[0] /= np.sqrt(2.0)
    return m


def dct_basis(sample_shape) -> np.ndarray:
    """The (n, n) orthonormal 2-D DCT-II basis for samples of ``sample_shape``, basis vectors as columns.

    ``(H, W)`` or ``(H, W, C)`` images: the 2-D DCT of each channel (row-major flattening); 1-D
    samples ``(n,)``: the 1-D DCT. Coefficients are ``x_flat @ dct_basis(shape)``.
    """
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 1:
        return _dct_matrix(shape[0]).T
    if len(shape) not in (2, 3):
        raise ValueError(f"sample_shape must be (n,), (H, W) or (H, W, C), got {shape}")
    rows = np.kron(_dct_matrix(shape[0]), _dct_matrix(shape[1]))
    if len(shape) == 3:
        rows = np.kron(rows, np.eye(shape[2]))
    return rows.T


def _orthonormal(columns: np.ndarray) -> np.ndarray:
    """QR of the sent fp16 columns, signs fixed so each column keeps its direction (deterministic)."""
    q, r = np.linalg.qr(np.asarray(columns, np.float64))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def _pca_axes(centred: np.ndarray) -> np.ndarray:
    """Principal axes of the rows of ``centred`` (n, n), by decreasing variance."""
    cov = (centred.T @ centred).astype(np.float64) / max(1, centred.shape[0])
    values, vectors = np.linalg.eigh(cov)
    return vectors[:, np.argsort(values)[::-1]]


# ----------------------------------------------------------------------------------------------
# Setup: fitted on the node's data, sent once.


def _check_choice(value, name: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _outward(lo: np.ndarray, hi: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``lo``/``hi`` cast to ``dtype``, each moved one step outward where the cast moved it inward."""
    lo_c, hi_c = lo.astype(dtype), hi.astype(dtype)
    lo_c = np.where(lo_c.astype(np.float64) > lo, np.nextafter(lo_c, dtype(-np.inf)), lo_c)
    hi_c = np.where(hi_c.astype(np.float64) < hi, np.nextafter(hi_c, dtype(np.inf)), hi_c)
    return lo_c.astype(dtype), hi_c.astype(dtype)


def _allocate(coeffs: np.ndarray, rounding: str, budget: int, max_width: int, allocation: str,
              seed: int) -> np.ndarray:
    """Widths per basis column: water-filling of the measured distortion, or ``max_width`` bits on
    the ``budget // max_width`` columns of largest variance ("uniform")."""
    if allocation == "uniform":
        widths = np.zeros(coeffs.shape[1], np.int64)
        top = np.argsort(-np.mean(coeffs.astype(np.float64) ** 2, axis=0), kind="stable")
        widths[top[: min(coeffs.shape[1], budget // max_width)]] = max_width
        return widths
    rows = np.random.default_rng(seed).permutation(coeffs.shape[0])[:_DISTORTION_ROWS]
    sub, lo, hi = coeffs[rows], coeffs.min(axis=0), coeffs.max(axis=0)
    table = (bit_allocation.rounding_distortion if rounding == "stochastic"
             else bit_allocation.dither_distortion)(sub, lo, hi, max_width)
    return bit_allocation.allocate_bits(table, budget)


def fit_transform_code(x, bits_per_sample: int, *, basis: str = "pca", rounding: str = "stochastic",
                       max_width: int = MAX_WIDTH, allocation: str = "waterfill", range_dtype=np.float16,
                       seed: int = 0) -> Payload:
    """Fit a transform code on a node's samples ``x`` and return its setup (a payload sent once).

    Args:
      x: (N, *sample_shape) float samples of the node (numpy or jax), the data the code will send.
      bits_per_sample: code bits per sample to allocate (reverse water-filling), >= 1.
      basis: "dct" (fixed, not sent) or "pca" (fitted here, sent as fp16 columns).
      rounding: "stochastic" (unbiased per coefficient) or "dither" (subtractive dither).
      max_width: the largest width of one coefficient, 1..8 (1 or 2 give low-B transform codes).
      allocation: "waterfill" (reverse water-filling of each coefficient's measured distortion: the
        first bits of a coefficient on its full range may not pay, so with ``max_width`` 1 no
        coefficient may get bits) or "uniform" (``max_width`` bits on each of the
        ``bits_per_sample // max_width`` coefficients of largest variance: the low-B codes).
      range_dtype: dtype of the sent ranges (np.float16 or np.float32).
      seed: seeds the subsample on which each coefficient's distortion is measured.

    Returns:
      The setup :class:`Payload` (``arrays``: mean, widths, lo, hi and for PCA basis; ``meta``:
      :class:`SetupMeta`); charge it once with :func:`setup_bits`, build the codec with
      :func:`transform_code`.
    """
    basis, rounding = _check_choice(basis, "basis", BASES), _check_choice(rounding, "rounding", ROUNDINGS)
    allocation = _check_choice(allocation, "allocation", ALLOCATIONS)
    if isinstance(max_width, bool) or not isinstance(max_width, int) or not 1 <= max_width <= MAX_WIDTH:
        raise ValueError(f"max_width must be an integer in 1..{MAX_WIDTH}, got {max_width!r}")
    if isinstance(bits_per_sample, bool) or not isinstance(bits_per_sample, (int, np.integer)) \
            or bits_per_sample < 1:
        raise ValueError(f"bits_per_sample must be a positive integer, got {bits_per_sample!r}")
    range_dtype = np.dtype(range_dtype).type
    if range_dtype not in (np.float16, np.float32):
        raise ValueError(f"range_dtype must be np.float16 or np.float32, got {range_dtype!r}")
    x = np.asarray(x, np.float32)
    if x.ndim < 2 or x.shape[0] < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"x must be (N >= 2, *sample_shape) finite samples, got shape {x.shape}")
    sample_shape, flat = tuple(x.shape[1:]), x.reshape(x.shape[0], -1)
    mean16 = flat.mean(axis=0, dtype=np.float64).astype(np.float16)
    # float32 products (the codec itself computes in float32); the outward ranges absorb their rounding.
    centred = flat - mean16.astype(np.float32)
    axes = (dct_basis(sample_shape) if basis == "dct" else _pca_axes(centred)).astype(np.float32)
    widths = _allocate(centred @ axes, rounding, int(bits_per_sample), max_width, allocation, seed)
    if not widths.any():
        raise ValueError(f"no coefficient gains from bits at bits_per_sample={bits_per_sample}, "
                         f"max_width={max_width} (one bit on a full range costs more error than sending "
                         f"nothing); raise max_width or use allocation='uniform'")
    arrays = {"mean": mean16}
    if basis == "pca":
        keep = widths > 0
        arrays["basis"] = axes[:, keep].astype(np.float16)
        widths, kept = widths[keep], _orthonormal(arrays["basis"])
    else:
        kept = axes[:, widths > 0]
    coeffs = centred @ kept.astype(np.float32)
    lo, hi = coeffs.min(axis=0).astype(np.float64), coeffs.max(axis=0).astype(np.float64)
    arrays["lo"], arrays["hi"] = _outward(lo, hi, range_dtype)
    arrays["widths"] = np.asarray(pack_codes(jnp.asarray(widths, jnp.uint32), 4))
    meta = SetupMeta(basis, sample_shape, rounding, int(widths.size), np.dtype(range_dtype).name)
    return Payload(arrays={k: jnp.asarray(v) for k, v in arrays.items()}, meta=meta)


def node_setup(x, count, bits_per_sample: int, *, basis: str, rounding: str,
               max_width: int = MAX_WIDTH, seed: int = 0) -> dict:
    """A node's setup as fixed-shape arrays over all n basis columns, fitted on its first ``count``
    samples (the training codec's form, :mod:`qdata.codecs.transform_codec`; host, numpy).

    As :func:`fit_transform_code` (fp16 mean, reverse water-filling of the measured distortion to
    ``bits_per_sample``), but every array keeps one entry per basis column k = 0..n-1, zero where
    ``w_k = 0``, so that every node's setup has the same shapes (nodes are ``vmap``-ed and sharded):
    ``mean`` (n,) fp16; ``widths`` (n,) int32; ``lo``, ``hi`` (n,) fp16, rounded outward; for PCA
    ``basis`` (n, n) fp16, row k the k-th principal axis V_k (by decreasing variance). Both ends
    use the fp16 axes as sent (no orthonormalization): the ranges are those of ``(x - mu) V`` with V
    the sent axes, so nothing of the fitted data is clipped, and E[x_hat] = mu + V V^T (x - mu).

    Raises:
      ValueError: fewer than 2 samples, or no coefficient gains from bits at this budget.
    """
    flat = np.asarray(x, np.float32)[: int(count)]
    flat = flat.reshape(flat.shape[0], -1)
    if flat.shape[0] < 2:
        raise ValueError(f"a node needs at least 2 samples to fit its transform code, got {flat.shape[0]}")
    mean16 = flat.mean(axis=0, dtype=np.float64).astype(np.float16)
    centred = flat - mean16.astype(np.float32)
    axes = (dct_basis(np.asarray(x).shape[1:]) if basis == "dct" else _pca_axes(centred)).astype(np.float32)
    widths = _allocate(centred @ axes, rounding, int(bits_per_sample), max_width, "waterfill", seed)
    if not widths.any():
        raise ValueError(f"no coefficient gains from bits at sample_bits={bits_per_sample} (one bit on a "
                         "full range costs more error than sending nothing); raise sample_bits")
    keep = widths > 0
    out = {"mean": mean16, "widths": widths.astype(np.int32)}
    if basis == "pca":
        out["basis"] = np.where(keep[:, None], axes.T, 0.0).astype(np.float16)
        axes = out["basis"].astype(np.float32).T
    coeffs = centred @ axes[:, keep]
    lo, hi = _outward(coeffs.min(axis=0).astype(np.float64), coeffs.max(axis=0).astype(np.float64), np.float16)
    out["lo"], out["hi"] = np.zeros(widths.size, np.float16), np.zeros(widths.size, np.float16)
    out["lo"][keep], out["hi"][keep] = lo, hi
    return out


def setup_bits(setup: Payload) -> int:
    """Exact bits of the setup, read off its arrays (sent once per node)."""
    return payload_bits(setup)


def transform_state(setup: Payload) -> TransformState:
    """The state both sides derive from the setup payload alone (what the learner can rebuild)."""
    meta = setup.meta
    if not isinstance(meta, SetupMeta):
        raise ValueError(f"setup must come from fit_transform_code, its meta is {type(meta).__name__}")
    widths = np.asarray(unpack_codes(setup.arrays["widths"], 4, meta.columns)).astype(np.int64)
    if meta.basis == "pca":
        columns = _orthonormal(np.asarray(setup.arrays["basis"]))
    else:
        columns = dct_basis(meta.sample_shape)
    keep = widths > 0
    columns, widths = columns[:, keep], widths[keep]
    lo = jnp.asarray(setup.arrays["lo"], jnp.float32)
    hi = jnp.asarray(setup.arrays["hi"], jnp.float32)
    step = (hi - lo) / jnp.asarray((1 << widths) - 1, jnp.float32)
    return TransformState(jnp.asarray(setup.arrays["mean"], jnp.float32), jnp.asarray(columns, jnp.float32),
                          lo, hi, step, widths, meta.rounding)


def truncation_bias(setup: Payload, x) -> Array:
    """``E[decode(encode(x))] - x = -(I - P)(x - mu)`` for ``x`` inside the ranges, shape of ``x``."""
    s = transform_state(setup)
    flat = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1) - s.mean
    return ((flat @ s.basis) @ s.basis.T - flat).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# The codec.


def _uniform24(seed, shape) -> Array:
    return counter_bits(seed, shape) >> (32 - _FRAC)


def _codes(s: TransformState, flat: Array, seed) -> tuple[Array, Array]:
    """Codes ``floor(u + U)`` per coefficient, and the count of coefficients clipped to the range."""
    c = (flat - s.mean) @ s.basis
    levels = jnp.asarray((1 << s.widths) - 1, jnp.float32)
    inv = jnp.where(s.step > 0, 1.0 / jnp.where(s.step > 0, s.step, 1.0), 0.0)
    u = jnp.clip((c - s.lo) * inv, 0.0, levels)
    t = (u * float(1 << _FRAC)).astype(jnp.uint32)  # u < 2^8, so u 2^24 < 2^32: exact fixed point
    codes = (t + _uniform24(seed, c.shape)) >> _FRAC
    return jnp.minimum(codes, levels.astype(jnp.uint32)), jnp.sum((c < s.lo) | (c > s.hi), dtype=jnp.int32)


def transform_code(setup: Payload) -> Quantizer:
    """The transform codec built from its setup (see the module docstring for the code).

    Returns:
      A :class:`~qdata.codecs.Quantizer`: ``encode(key, x)`` for ``x`` of shape ``(b, *sample_shape)``
      gives ``rows['codes']`` (b, ceil(sum w / 8)) uint8 (and ``arrays['seed']`` for dither);
      ``decode(payload) -> x_hat``; ``bits(payload, mask=None)`` read off the packed arrays.
      ``unbiased`` is True only without truncation; ``delta`` is None (one step per coefficient).
    """
    s = transform_state(setup)
    meta = setup.meta
    dither = s.rounding == "dither"

    @jax.jit
    def _encode(key, x):
        flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
        seed = jax.random.bits(key, (), jnp.uint32)
        codes, clipped = _codes(s, flat, seed)
        arrays = {"seed": seed} if dither else {}
        return Payload(arrays=arrays, rows={"codes": varpack.pack_widths(codes, s.widths)},
                       meta=TransformMeta("transform_code", meta.sample_shape, jnp.dtype(x.dtype).name),
                       info={"clipped": clipped})

    @jax.jit
    def _decode(payload):
        codes = varpack.unpack_widths(payload.rows["codes"], s.widths).astype(jnp.float32)
        if dither:
            codes = codes - _uniform24(payload.arrays["seed"], codes.shape) * (1.0 / (1 << _FRAC)) + 0.5
        flat = s.mean + (s.lo + s.step * codes) @ s.basis.T
        return flat.reshape(codes.shape[0], *meta.sample_shape).astype(payload.meta.dtype)

    def encode(key, x) -> Payload:
        x = jnp.asarray(x)
        if x.ndim < 2 or tuple(x.shape[1:]) != tuple(meta.sample_shape):
            raise ValueError(f"x must have shape (b, {', '.join(map(str, meta.sample_shape))}) to match the "
                             f"setup, got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
        return _encode(key, x)

    def decode(payload: Payload) -> Array:
        if not isinstance(payload.meta, TransformMeta):
            raise ValueError(f"payload was not produced by transform_code (its meta is "
                             f"{type(payload.meta).__name__})")
        return _decode(payload)

    full = s.widths.size == math.prod(meta.sample_shape)
    return Quantizer(encode=encode, decode=decode, bits=payload_bits, unbiased=full, delta=None)


def payload_codes(setup: Payload, payload: Payload) -> np.ndarray:
    """The integer codes (b, K) of a per-sample payload, on the host (for the entropy coder)."""
    return np.asarray(varpack.unpack_widths(payload.rows["codes"], transform_state(setup).widths))
