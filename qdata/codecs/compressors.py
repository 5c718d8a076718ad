"""Vector compressors C for pytrees of parameters: the correction term and gradient compression.

In qdata a node sends ``C(delta_i)``, the compressed gradient difference (DESIGN.md section 2, step 3);
the gradient-compression baselines send ``C(g_i)``. Every factory returns a :class:`base.Compressor`
(``init``, ``encode``, ``decode``, ``bits``, ``unbiased``, ``omega``) in the optax style: pure
functions, explicit PRNG keys, state passed in and returned, all of it usable under ``jax.jit`` and
``jax.vmap`` over a leading node axis.

Random-k, top-k, QSGD, TernGrad and scaled sign act on the flattened vector ``x`` of length ``d``
(:func:`base.flatten`); PowerSGD acts per matrix-shaped leaf. For an unbiased compressor
(``E[C(x)] = x``) ``omega(d)`` bounds the relative variance, ``E||C(x) - x||^2 <= omega(d) ||x||^2``.

Bits (DESIGN.md section 3) are always ``base.payload_bits`` of the packed arrays. With
``w(d) = ceil(log2 d)`` (:func:`base.index_width`) they come to:

====================  =============================================================
``fp32``              ``32 d``
``fp16``              ``16 d``
``randk`` (sent)      ``32 k + 8 ceil(k w(d) / 8)``
``randk`` (seed)      ``32 k + 32``
``topk``              ``32 k + 8 ceil(k w(d) / 8)``
``qsgd``              ``32 ceil(d / bucket) + 8 ceil(d (1 + ceil(log2(s + 1))) / 8)``
``terngrad``          ``32 + 8 ceil(2 d / 8)``
``scaled_sign``       ``32 + 8 ceil(d / 8)``
``powersgd``          ``32 r (m + n)`` per matrix leaf + ``32 x`` (size of the other leaves)
====================  =============================================================
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qdata.codecs import base, elias
from qdata.codecs.base import Compressor, EmptyState, Payload, TreeSpec

Array = jax.Array
PyTree = Any

# Widest QSGD level count whose code (1 sign bit + ceil(log2(s + 1)) level bits) fits a 32-bit word.
_MAX_LEVELS = 2**31 - 1


def _size(tree: PyTree) -> int:
    """d, the number of coordinates of ``tree`` (static, from shapes only)."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def _stateless_init(params: PyTree) -> EmptyState:
    del params
    return EmptyState()


def _flatten_checked(tree: PyTree) -> tuple[Array, TreeSpec]:
    base.check_finite(tree, "tree")
    return base.flatten(tree)


def _sent_by(payload, name: str, meta_type, keys: frozenset):
    """The meta of a payload that ``name`` produced; a ValueError for another codec's payload (issue 12:
    decoders do not trust their payload)."""
    meta, arrays = getattr(payload, "meta", None), getattr(payload, "arrays", None)
    if not isinstance(meta, meta_type) or not isinstance(arrays, dict) or set(arrays) != keys:
        raise ValueError(f"payload was not produced by {name} (meta {type(meta).__name__}, arrays "
                         f"{sorted(arrays) if isinstance(arrays, dict) else None}; expected {sorted(keys)})")
    return meta


_HUGE = 2.0**124  # above it, 1 / den is under float32's smallest normal number (2^-126)


def _divide(num: Array, den: Array) -> Array:
    """``num / den`` for a positive ``den`` up to float32's largest value. XLA divides by multiplying
    with ``1 / den``, which CPUs flush to zero once subnormal (``den`` above about 8.5e37): one such
    value made a whole vector decode as zeros. Both sides are scaled by 2^-4 (exact) first there."""
    scale = jnp.where(den > _HUGE, 2.0**-4, 1.0).astype(den.dtype)
    return (num * scale) / (den * scale)


def _l2_norm(x: Array, axis=None, keepdims=False) -> Array:
    """||x||_2 computed on x / max|x| so that squares of large gradients do not overflow fp32."""
    peak = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    safe = jnp.where(peak > 0, peak, 1.0)
    norm = safe * jnp.sqrt(jnp.sum(jnp.square(_divide(x, safe)), axis=axis, keepdims=True))
    norm = jnp.where(peak > 0, norm, 0.0)
    return norm if keepdims else jnp.squeeze(norm, axis=axis)


# ----------------------------------------------------------------------------------------------
# Identity codecs.


def fp32() -> Compressor:
    """No compression: the flattened vector sent in float32, ``32 d`` bits.

    Exact for float32 (and narrower float) leaves, hence unbiased with ``omega(d) = 0``.

    Returns:
      A stateless :class:`base.Compressor`.
    """

    def encode(key, tree, state):
        del key
        vec, spec = _flatten_checked(tree)
        return Payload(arrays={"values": vec}, meta=spec), state

    def decode(payload):
        spec = _sent_by(payload, "fp32/fp16", base.TreeSpec, frozenset({"values"}))
        return base.unflatten(payload.arrays["values"].astype(jnp.float32), spec)

    return Compressor(_stateless_init, encode, decode, base.payload_bits, unbiased=True, omega=lambda d: 0.0)


def fp16() -> Compressor:
    """The flattened vector rounded to float16 (round to nearest), ``16 d`` bits.

    Biased: rounding to nearest is deterministic, so ``E[C(x)] = fl16(x) != x`` in general (relative
    error up to 2^-11 for normal numbers; values below 2^-24 in magnitude flush to zero). Values
    beyond the float16 range saturate at +-65504 instead of becoming inf, so one large gradient
    cannot poison the receiver's update.

    Returns:
      A stateless, biased :class:`base.Compressor`.
    """
    top = float(jnp.finfo(jnp.float16).max)

    def encode(key, tree, state):
        del key
        vec, spec = _flatten_checked(tree)
        return Payload(arrays={"values": jnp.clip(vec, -top, top).astype(jnp.float16)}, meta=spec), state

    def decode(payload):
        spec = _sent_by(payload, "fp32/fp16", base.TreeSpec, frozenset({"values"}))
        return base.unflatten(payload.arrays["values"].astype(jnp.float32), spec)

    return Compressor(_stateless_init, encode, decode, base.payload_bits, unbiased=False)


# ----------------------------------------------------------------------------------------------
# Sparsifiers: random-k and top-k (Stich et al. 2018).


class SparseMeta(NamedTuple):
    """Static side of a sparse message: the tree, k, how indices travel and the decode scale."""

    spec: TreeSpec
    k: int
    indices: str  # "sent": packed indices in the payload; "seed": a shared uint32 seed
    scale: float  # d / k for random-k (unbiased), 1 for top-k


def _check_k(k: int, d: int) -> None:
    if not 1 <= k <= d:
        raise ValueError(f"k must be in 1..d where d = {d} is the number of coordinates, got k={k}")


def _random_subset(key, d: int, k: int) -> Array:
    """k distinct coordinates, each included with probability exactly k/d, in O(k).

    Stratified sampling on the circle of d coordinates: a uniform offset c, then one uniform
    coordinate in each of k consecutive strata of s = floor(d/k) coordinates starting at c. A
    coordinate is covered by the strata with probability k s / d and then drawn with probability
    1/s, so P(i in S) = k/d for every i. Unbiasedness of ``(d/k) x_S`` and
    ``E||C(x) - x||^2 = (d/k - 1)||x||^2`` depend on these inclusion probabilities alone, so they
    are exactly those of a uniform k-subset; only the joint law of S differs (no two coordinates of
    one stratum together). A uniform subset (``jax.random.choice(replace=False)``) is a random
    permutation, O(d log d): about 10 s per message for d = 11M on a 2-core CPU.
    """
    stride = d // k
    k_offset, k_inner = jax.random.split(key)
    offset = jax.random.randint(k_offset, (), 0, d, dtype=jnp.int32)
    inner = jax.random.randint(k_inner, (k,), 0, stride, dtype=jnp.int32)
    return (offset + jnp.arange(k, dtype=jnp.int32) * stride + inner) % d


def _seeded_indices(seed: Array, d: int, k: int) -> Array:
    """The subset drawn from the shared seed: both sides compute the same set."""
    return _random_subset(jax.random.key(seed), d, k)


def _sparse_decode(payload: Payload) -> PyTree:
    meta = getattr(payload, "meta", None)
    keys = frozenset({"seed" if getattr(meta, "indices", None) == "seed" else "indices", "values"})
    meta = _sent_by(payload, "randk/topk", SparseMeta, keys)
    d = meta.spec.size
    if meta.indices == "seed":
        idx = _seeded_indices(payload.arrays["seed"], d, meta.k)
    else:
        idx = base.unpack_codes(payload.arrays["indices"], base.index_width(d), meta.k).astype(jnp.int32)
    values = payload.arrays["values"].astype(jnp.float32) * jnp.float32(meta.scale)
    return base.unflatten(jnp.zeros((d,), jnp.float32).at[idx].set(values), meta.spec)


def randk(k: int, *, indices: str = "sent") -> Compressor:
    """Random-k sparsification with scale d/k (Stich et al. 2018): unbiased.

    ``C(x) = (d/k) sum_{i in S} x_i e_i`` with S a random k-subset of ``{1..d}`` in which every
    coordinate is kept with probability exactly k/d (stratified, see :func:`_random_subset`), so
    ``E[C(x)] = x`` and exactly ``E||C(x) - x||^2 = (d/k - 1) ||x||^2``.

    Args:
      k: number of coordinates sent, in 1..d (checked against d at ``init``/``encode``, where the
        shapes are known; under jit this is a trace-time error).
      indices: ``"sent"`` sends the k indices bit-packed at ``ceil(log2 d)`` bits each;
        ``"seed"`` sends one uint32 seed from which the receiver redraws the same subset.

    Returns:
      A stateless, unbiased :class:`base.Compressor` with ``omega(d) = d/k - 1``. The k values
      travel in fp32 (unscaled; the receiver multiplies by d/k). Drawing the subset costs O(k).
    """
    k = base.check_int(k, "k")
    if indices not in ("sent", "seed"):
        raise ValueError(f"indices must be 'sent' or 'seed', got {indices!r}")

    def init(params):
        _check_k(k, _size(params))
        return EmptyState()

    def encode(key, tree, state):
        vec, spec = _flatten_checked(tree)
        d = spec.size
        _check_k(k, d)
        if indices == "seed":
            seed = jax.random.bits(key, (), jnp.uint32)
            idx = _seeded_indices(seed, d, k)
            arrays = {"seed": seed, "values": vec[idx]}
        else:
            idx = _random_subset(key, d, k)
            arrays = {"indices": base.pack_codes(idx, base.index_width(d)), "values": vec[idx]}
        return Payload(arrays=arrays, meta=SparseMeta(spec, k, indices, d / k)), state

    return Compressor(init, encode, _sparse_decode, base.payload_bits, unbiased=True, omega=lambda d: d / k - 1.0)


def topk(k: int) -> Compressor:
    """Top-k sparsification (Stich et al. 2018): the k coordinates of largest magnitude, unscaled.

    Biased (``E[C(x)] = C(x) != x``), contractive: ``||C(x) - x||^2 <= (1 - k/d) ||x||^2``; use it
    with :func:`error_feedback`. Ties go to the lower index.

    Args:
      k: number of coordinates sent, in 1..d (checked against d at ``init``/``encode``).

    Returns:
      A stateless, biased :class:`base.Compressor` sending k fp32 values and k indices packed at
      ``ceil(log2 d)`` bits each.
    """
    k = base.check_int(k, "k")

    def init(params):
        _check_k(k, _size(params))
        return EmptyState()

    def encode(key, tree, state):
        del key
        vec, spec = _flatten_checked(tree)
        d = spec.size
        _check_k(k, d)
        _, idx = jax.lax.top_k(jnp.abs(vec), k)
        arrays = {"indices": base.pack_codes(idx, base.index_width(d)), "values": vec[idx]}
        return Payload(arrays=arrays, meta=SparseMeta(spec, k, "sent", 1.0)), state

    return Compressor(init, encode, _sparse_decode, base.payload_bits, unbiased=False)


# ----------------------------------------------------------------------------------------------
# QSGD (Alistarh et al. 2017).


class QSGDMeta(NamedTuple):
    """Static side of a QSGD message."""

    spec: TreeSpec
    levels: int  # s
    bucket: int  # coordinates per bucket (the last bucket may be shorter)

    @property
    def width(self) -> int:
        """Bits per coordinate: one sign bit and ceil(log2(s + 1)) level bits."""
        return 1 + base.index_width(self.levels + 1)


QSGD_CODINGS = ("fixed", "elias")


def qsgd(levels: int, *, bucket_size: int | None = None, coding: str = "fixed") -> Compressor:
    """QSGD with s levels (Alistarh et al. 2017): unbiased stochastic quantization of x / ||x||.

    Per bucket B of the flattened vector: ``Q(x_i) = ||x_B||_2 sign(x_i) l_i / s`` where, with
    ``r_i = s |x_i| / ||x_B||_2``, the level ``l_i`` is ``floor(r_i) + 1`` with probability
    ``r_i - floor(r_i)`` and ``floor(r_i)`` otherwise. Unbiased, and (Lemma 3.1)
    ``E||Q(x) - x||^2 <= min(b/s^2, sqrt(b)/s) ||x||^2`` with b the bucket length.

    Sent: one fp32 norm per bucket, then per coordinate the code ``2 l_i + [x_i < 0]`` in
    ``1 + ceil(log2(s + 1))`` bits, packed fixed-length: ``32 ceil(d/b) + 8 ceil(d (1 + ceil(log2(s+1))) / 8)``
    bits. With ``coding="elias"`` the same message is charged as the paper's Elias coding of it
    (:mod:`qdata.codecs.elias`: per bucket the norm, then each nonzero's gap, sign and level in
    Elias omega codes), the exact length of the stream :func:`qdata.codecs.elias.encode_qsgd` writes.
    :func:`qsgd_entropy_bits` reports what an ideal entropy coder would need, as an estimate.

    Args:
      levels: s >= 1, the number of nonzero levels.
      bucket_size: coordinates per bucket (one norm each); None: one bucket of the whole vector.
      coding: ``"fixed"`` (fixed-length codes, the payload's own size) or ``"elias"``.

    Returns:
      A stateless, unbiased :class:`base.Compressor` with ``omega(d) = min(b/s^2, sqrt(b)/s)``,
      ``b = min(bucket_size, d)``.
    """
    s = base.check_int(levels, "levels", 1, _MAX_LEVELS)
    if coding not in QSGD_CODINGS:
        raise ValueError(f"coding must be one of {QSGD_CODINGS}, got {coding!r}")
    if bucket_size is not None:
        bucket_size = base.check_int(bucket_size, "bucket_size")

    def bucket_of(d: int) -> int:
        return max(1, min(bucket_size or d, d))

    def omega(d: int) -> float:
        b = bucket_of(d)
        return min(b / s**2, math.sqrt(b) / s)

    def encode(key, tree, state):
        vec, spec = _flatten_checked(tree)
        d = spec.size
        b = bucket_of(d)
        nb = -(-d // b)
        x = jnp.pad(vec, (0, nb * b - d)).reshape(nb, b)
        norms = _l2_norm(x, axis=1)
        ratio = s * _divide(jnp.abs(x), jnp.where(norms > 0, norms, 1.0)[:, None])
        low = jnp.floor(ratio)
        up = jax.random.uniform(key, x.shape) < ratio - low
        # Clip: rounding can push |x_i| / ||x_B|| a hair above 1.
        level = jnp.clip(low + up, 0, s).astype(jnp.uint32).reshape(-1)[:d]
        codes = (level << 1) | (vec < 0).astype(jnp.uint32)
        meta = QSGDMeta(spec, s, b)
        return Payload(arrays={"norms": norms, "codes": base.pack_codes(codes, meta.width)}, meta=meta), state

    def decode(payload):
        meta = _sent_by(payload, "qsgd", QSGDMeta, frozenset({"norms", "codes"}))
        d = meta.spec.size
        codes = base.unpack_codes(payload.arrays["codes"], meta.width, d)
        level = (codes >> 1).astype(jnp.float32)
        sign = 1.0 - 2.0 * (codes & 1).astype(jnp.float32)
        norm = payload.arrays["norms"][jnp.arange(d) // meta.bucket]
        # l / s <= 1 first: norm * l would overflow for a norm near float32's largest value (the same
        # numbers where s is a power of two)
        return base.unflatten(norm * (sign * level / meta.levels), meta.spec)

    bits = elias.qsgd_elias_bits if coding == "elias" else base.payload_bits
    return Compressor(_stateless_init, encode, decode, bits, unbiased=True, omega=omega)


def qsgd_entropy_bits(payload: Payload) -> Array:
    """An ESTIMATE of the bits of a QSGD message under ideal entropy coding, beside the exact count.

    ``32 * buckets + d * H(l) + #{i : l_i != 0}``: the fp32 norms as sent, the empirical (zeroth
    order) entropy H of the levels l_i in bits per coordinate, and one sign bit for each nonzero
    level (a zero level needs no sign). It ignores the cost of sending the code table and the
    coder's overhead, so a real coder (Elias, arithmetic) needs somewhat more. The exact, fixed-length
    count of what :func:`qsgd` sends is ``base.payload_bits(payload)``.

    Args:
      payload: a message from :func:`qsgd` (one node's; call it inside the vmap over nodes).

    Returns:
      A float32 scalar: estimated bits.
    """
    meta = payload.meta
    if not isinstance(meta, QSGDMeta):
        raise ValueError("payload must be a message from qsgd()")
    d = meta.spec.size
    level = base.unpack_codes(payload.arrays["codes"], meta.width, d) >> 1
    counts = jnp.bincount(level.astype(jnp.int32), length=meta.levels + 1)
    p = counts / max(d, 1)
    entropy = -jnp.sum(jnp.where(counts > 0, p * jnp.log2(jnp.where(counts > 0, p, 1.0)), 0.0))
    return (base.array_bits(payload.arrays["norms"]) + d * entropy + (d - counts[0])).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# TernGrad (Wen et al. 2017) and scaled sign (Karimireddy et al. 2019).


def terngrad() -> Compressor:
    """TernGrad (Wen et al. 2017): ``C(x)_i = s_t sign(x_i) b_i``, ``s_t = max_j |x_j|``.

    ``b_i ~ Bernoulli(|x_i| / s_t)`` independently, so ``E[C(x)] = x`` and
    ``E||C(x) - x||^2 = s_t ||x||_1 - ||x||^2 <= (sqrt(d) - 1) ||x||^2`` (since ``s_t <= ||x||_2``
    and ``||x||_1 <= sqrt(d) ||x||_2``). One scale for the whole flattened tree (the paper scales
    per layer and adds gradient clipping; neither is applied here).

    Sent: ``s_t`` in fp32 and a 2-bit code per coordinate (0, +1, -1): ``32 + 8 ceil(2d / 8)`` bits.

    Returns:
      A stateless, unbiased :class:`base.Compressor` with ``omega(d) = sqrt(d) - 1``.
    """

    def encode(key, tree, state):
        vec, spec = _flatten_checked(tree)
        scale = jnp.max(jnp.abs(vec)) if spec.size else jnp.float32(0.0)
        prob = _divide(jnp.abs(vec), jnp.where(scale > 0, scale, 1.0))
        keep = jax.random.uniform(key, vec.shape) < prob
        codes = keep.astype(jnp.uint32) * (1 + (vec < 0).astype(jnp.uint32))
        return Payload(arrays={"scale": scale, "codes": base.pack_codes(codes, 2)}, meta=spec), state

    def decode(payload):
        spec = _sent_by(payload, "terngrad", base.TreeSpec, frozenset({"scale", "codes"}))
        codes = base.unpack_codes(payload.arrays["codes"], 2, spec.size)
        ternary = jnp.where(codes == 1, 1.0, jnp.where(codes == 2, -1.0, 0.0))
        return base.unflatten(payload.arrays["scale"] * ternary, spec)

    return Compressor(
        _stateless_init, encode, decode, base.payload_bits, unbiased=True, omega=lambda d: math.sqrt(d) - 1.0
    )


def scaled_sign() -> Compressor:
    """Scaled sign (Karimireddy et al. 2019): ``C(x) = (||x||_1 / d) sign(x)``, biased.

    Sent: the fp32 scale and one bit per coordinate, ``32 + 8 ceil(d / 8)`` bits. Zero coordinates
    are sent as +. Meant for use with :func:`error_feedback` (EF-signSGD).

    Returns:
      A stateless, biased :class:`base.Compressor`.
    """

    def encode(key, tree, state):
        del key
        vec, spec = _flatten_checked(tree)
        scale = jnp.sum(jnp.abs(vec)) / max(spec.size, 1)
        return Payload(arrays={"scale": scale, "signs": base.pack_codes(vec < 0, 1)}, meta=spec), state

    def decode(payload):
        spec = _sent_by(payload, "sign", base.TreeSpec, frozenset({"scale", "signs"}))
        negative = base.unpack_codes(payload.arrays["signs"], 1, spec.size).astype(jnp.float32)
        return base.unflatten(payload.arrays["scale"] * (1.0 - 2.0 * negative), spec)

    return Compressor(_stateless_init, encode, decode, base.payload_bits, unbiased=False)


# ----------------------------------------------------------------------------------------------
# PowerSGD (Vogels et al. 2019).


class PowerSGDState(NamedTuple):
    """Warm start of PowerSGD: one Q of shape (n, r) per matrix-shaped leaf, in leaf order."""

    q: tuple


def _matrix_plan(shapes: tuple, rank: int) -> tuple:
    """Per leaf, (m, n, r) for a leaf of ndim >= 2 seen as an m x n matrix, or None (sent as is)."""
    plan = []
    for shape in shapes:
        if len(shape) >= 2:
            # Output channels last (flax's kernels: (in, out) and (kh, kw, cin, cout)), so a conv kernel
            # becomes (kh*kw*cin) x cout as in Vogels et al., not a rank-capped kh x (kw*cin*cout).
            m, n = math.prod(shape[:-1]), shape[-1]
            plan.append((m, n, min(rank, m, n)))
        else:
            plan.append(None)
    return tuple(plan)


def split_matrices(tree: PyTree, plan: tuple) -> tuple[list, Array]:
    """The leaves of a :func:`_matrix_plan` as (m, n) float32 matrices, and the other leaves as one
    fp32 vector, in leaf order."""
    mats, rest = [], []
    for leaf, p in zip(jax.tree_util.tree_leaves(tree), plan):
        if p is None:
            rest.append(jnp.ravel(leaf).astype(jnp.float32))
        else:
            mats.append(jnp.reshape(leaf, (p[0], p[1])).astype(jnp.float32))
    return mats, (jnp.concatenate(rest) if rest else jnp.zeros((0,), jnp.float32))


def join_matrices(mats, rest: Array, spec: TreeSpec, plan: tuple) -> PyTree:
    """The inverse of :func:`split_matrices`: the tree of ``spec`` (shapes, dtypes, structure)."""
    leaves, mats, start = [], iter(mats), 0
    for shape, dtype, p in zip(spec.shapes, spec.dtypes, plan):
        if p is None:
            size = math.prod(shape)
            leaf = rest[start:start + size].reshape(shape)
            start += size
        else:
            leaf = next(mats).reshape(shape)
        leaves.append(leaf.astype(dtype))
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def powersgd(rank: int, *, seed: int = 0) -> Compressor:
    """PowerSGD (Vogels et al. 2019): rank-r approximation by one warm-started power iteration.

    Each leaf with ndim >= 2 is reshaped to ``M`` of shape ``(prod(shape[:-1]), shape[-1])``; with the
    previous round's ``Q`` (n x r): ``P = orth(M Q)`` (QR), ``Q' = M^T P``, and the receiver
    reconstructs ``P Q'^T``, the projection of M on span(P). ``Q'`` warm-starts the next round, so
    repeated rounds on a slowly changing M run subspace iteration toward its best rank-r
    approximation. Biased; meant to be used with :func:`error_feedback`, as in the paper. Other
    leaves (biases, norms) are sent uncompressed in fp32, as Vogels et al. do. The rank used for an
    m x n leaf is ``min(rank, m, n)``.

    Sent: P and Q' in fp32, ``32 r (m + n)`` bits per matrix leaf, plus 32 bits per coordinate of
    the other leaves. Note that this exceeds fp32's ``32 m n`` when ``r (m + n) > m n``.

    Args:
      rank: r >= 1.
      seed: seed of the i.i.d. standard normal initial Q (one per matrix leaf) drawn at ``init``.
        All nodes that share it start from the same Q, as in the paper.

    Returns:
      A stateful, biased :class:`base.Compressor`; its state is a :class:`PowerSGDState`. The key
      passed to ``encode`` is unused (the method is deterministic given the state).
    """
    rank = base.check_int(rank, "rank")
    seed = base.check_int(seed, "seed", lo=0)

    def init(params):
        plan = _matrix_plan(base.tree_spec(params).shapes, rank)
        root = jax.random.key(seed)
        q = tuple(
            jax.random.normal(jax.random.fold_in(root, i), (p[1], p[2]), jnp.float32)
            for i, p in enumerate(plan)
            if p is not None
        )
        return PowerSGDState(q)

    def encode(key, tree, state):
        del key
        base.check_finite(tree, "tree")
        spec = base.tree_spec(tree)
        plan = _matrix_plan(spec.shapes, rank)
        expected = tuple((p[1], p[2]) for p in plan if p is not None)
        got = tuple(tuple(q.shape[-2:]) for q in state.q)
        if got != expected:
            raise ValueError(f"state does not match the tree: Q shapes {got}, expected {expected}; "
                             "build it with init(params) on a tree of the same structure")
        mats, rest = split_matrices(tree, plan)
        ps, qs = [], []
        for m, q in zip(mats, state.q):
            left, _ = jnp.linalg.qr(m @ q)
            ps.append(left)
            qs.append(m.T @ left)
        payload = Payload(arrays={"p": tuple(ps), "q": tuple(qs), "rest": rest}, meta=spec)
        return payload, PowerSGDState(tuple(qs))

    def decode(payload):
        spec = _sent_by(payload, "powersgd", base.TreeSpec, frozenset({"p", "q", "rest"}))
        mats = [p @ q.T for p, q in zip(payload.arrays["p"], payload.arrays["q"])]
        return join_matrices(mats, payload.arrays["rest"], spec, _matrix_plan(spec.shapes, rank))

    return Compressor(init, encode, decode, base.payload_bits, unbiased=False)


# ----------------------------------------------------------------------------------------------
# Error feedback (Stich et al. 2018; Karimireddy et al. 2019).


class ErrorFeedbackState(NamedTuple):
    """State of :func:`error_feedback`: the inner compressor's state and the error memory e."""

    inner: PyTree
    error: PyTree


def error_feedback(compressor: Compressor) -> Compressor:
    """Error feedback around any compressor (Stich et al. 2018; Karimireddy et al. 2019).

    With memory ``e_t`` (``e_0 = 0``): ``v_t = x_t + e_t``, send ``C(v_t)``, keep
    ``e_{t+1} = v_t - C(v_t)``. What was lost is sent later, so the messages telescope:
    ``sum_{t<T} C(v_t) = sum_{t<T} x_t - e_T``, and a contractive C keeps ``e_T`` bounded.

    Args:
      compressor: any :class:`base.Compressor`.

    Returns:
      A biased :class:`base.Compressor` whose payloads are the inner compressor's (same format,
      ``decode`` and ``bits``); its state is an :class:`ErrorFeedbackState`, the error kept in
      the dtypes of ``params``.
    """
    if not isinstance(compressor, Compressor):
        raise ValueError(f"compressor must be a qdata.codecs.Compressor, got {type(compressor).__name__}")

    def init(params):
        return ErrorFeedbackState(compressor.init(params), jax.tree_util.tree_map(jnp.zeros_like, params))

    def encode(key, tree, state):
        base.check_finite(tree, "tree")
        corrected = jax.tree_util.tree_map(lambda x, e: (x + e).astype(x.dtype), tree, state.error)
        payload, inner = compressor.encode(key, corrected, state.inner)
        sent = compressor.decode(payload)
        error = jax.tree_util.tree_map(lambda v, c: v - c, corrected, sent)
        return payload, ErrorFeedbackState(inner, error)

    return Compressor(init, encode, compressor.decode, compressor.bits, unbiased=False)
