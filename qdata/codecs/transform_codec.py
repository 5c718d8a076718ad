"""Transform codes in training: a data codec whose per-node setup is fitted on the node's shard and sent once.

DESIGN.md section 2 step 2 ("codes far below n*B"), as a :class:`~qdata.codecs.data_codec.DataCodec`
the estimator composes. Node i sends each sample x in R^n as the coefficients ``c = (x - mu_i) V_i``
in an orthonormal basis (the 2-D DCT, fixed; or the principal axes of node i's own data, fp16),
coefficient k at its own width ``w_ik`` bits, stochastic rounding or subtractive dither on the
range ``[lo_ik, hi_ik]`` (:mod:`qdata.codecs.transform_codes` says the code and its error); the
learner decodes ``x_hat = mu_i + c_hat V_i^T``, a truncated coefficient (``w_ik = 0``) as 0.

**The setup** of node i (:func:`qdata.codecs.transform_codes.node_setup`: mean, widths by reverse
water-filling of each coefficient's measured distortion, ranges, and for PCA the basis) is fitted
by ``fit(state, x_shard, count)`` from the node's own shard before round 0 (the engine runs it per
node, inside ``shard_map``, :func:`qdata.engine.fit_nodes`). Every node's setup has the same
shapes, one entry per basis column, so the N setups are ``vmap``-ed and sharded like any node state.
It is a :class:`~qdata.codecs.payloads.Payload`: ``arrays`` mean (n fp16) and widths (n 4-bit
codes), always sent with it; ``rows`` (one per basis column, zero where ``w_k = 0``) ``lo``, ``hi``
(fp16) and for PCA ``basis`` (n fp16 values a row), charged only for the columns that get bits.

**What crosses the link** (:class:`TransformPayload`): the sample codes (``rows['codes']``, the
codes of one sample end to end, :func:`qdata.codecs.varpack.pack_varying`, ``ceil(S / 8)`` bytes
for a budget of S bits a sample; with dither ``arrays['seed']``, 32 bits a message) and the setup
with its count, 1 in the node's first message and 0 after it (the setup then travels as zeros and
costs nothing). The count is not charged: the learner knows whether it holds the node's setup. Parts
of the ledger: ``'data'`` (the codes of sent rows), ``'metadata'`` (the dither seed), ``'setup'``.

**Bias.** Only the projection is coded: ``E[x_hat] = mu + V V^T (x - mu)`` for x inside the ranges
(V the sent axes, those with bits), so ``unbiased`` is False; the bias ``-(I - V V^T)(x - mu)`` is
left to the correction term.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from qdata import checks
from qdata.codecs.data_codec import DataCodec, count_items, mask_items
from qdata.codecs.ledger import Bits
from qdata.codecs.packing import pack_codes, unpack_codes
from qdata.codecs.payloads import Payload, array_bits, payload_bits
from qdata.codecs.randomness import counter_bits
from qdata.codecs import transform_codes, varpack

Array = jax.Array
TRANSFORMS = ("dct", "pca")
ROUNDINGS = ("stochastic", "dither")
_FRAC = 24  # fixed-point bits of the rounding noise, as in transform_codes


class TransformState(NamedTuple):
    """One end's state: the node's setup (as fitted at the node, as received at the learner) and
    ``pending``, True while the node has not yet sent it (always False at the learner)."""

    setup: Payload
    pending: Array


@struct.dataclass
class TransformPayload:
    """A message: the sample codes, the setup (zeros after the first message) and its count (0 or 1)."""

    codes: Payload
    setup: Payload
    count: Array


def _setup_template(n: int, basis: str) -> Payload:
    """The all-zero setup (the learner's before round 0): shapes and dtypes of every node's."""
    rows = {"lo": jnp.zeros((n,), jnp.float16), "hi": jnp.zeros((n,), jnp.float16)}
    if basis == "pca":
        rows["basis"] = jnp.zeros((n, n), jnp.float16)
    arrays = {"mean": jnp.zeros((n,), jnp.float16), "widths": jnp.zeros((-(-n * 4 // 8),), jnp.uint8)}
    return Payload(arrays=arrays, rows=rows)


class _Decoding(NamedTuple):
    """What both ends derive from a setup: mean, basis columns V (n, K = n), widths, ranges, steps."""

    mean: Array
    basis: Array
    widths: Array
    lo: Array
    hi: Array
    step: Array
    levels: Array


def _widths(setup: Payload) -> Array:
    """The widths ``w_k`` (n,) int32 of a setup (4-bit codes as sent)."""
    return unpack_codes(setup.arrays["widths"], 4, setup.arrays["mean"].shape[0]).astype(jnp.int32)


def _decoding(setup: Payload, fixed_basis) -> _Decoding:
    widths = _widths(setup)
    lo, hi = setup.rows["lo"].astype(jnp.float32), setup.rows["hi"].astype(jnp.float32)
    levels = ((1 << widths) - 1).astype(jnp.float32)
    step = jnp.where(levels > 0, (hi - lo) / jnp.maximum(levels, 1.0), 0.0)
    basis = fixed_basis if fixed_basis is not None else setup.rows["basis"].astype(jnp.float32).T
    return _Decoding(setup.arrays["mean"].astype(jnp.float32), basis, widths, lo, hi, step, levels)


def _noise(seeds: Array, n: int) -> Array:
    """Per-row rounding noise U in [0, 1) as 24-bit integers, (b, n), from each row's seed."""
    return jax.vmap(lambda s: counter_bits(s, (n,)))(seeds) >> (32 - _FRAC)


def _fit_setup(x, count, sample_bits: int, **fit) -> Payload:
    """Node i's setup fitted on the host (:func:`transform_codes.node_setup`), one call per node
    under ``vmap``, as the payload that crosses the link (widths packed at 4 bits)."""
    n, pca = math.prod(x.shape[1:]), fit["basis"] == "pca"
    names = ("mean", "widths", "lo", "hi") + (("basis",) if pca else ())
    shapes = [jax.ShapeDtypeStruct((n,), t) for t in (jnp.float16, jnp.int32, jnp.float16, jnp.float16)]
    shapes += [jax.ShapeDtypeStruct((n, n), jnp.float16)] if pca else []

    def host(x, count):
        arrays = transform_codes.node_setup(x, count, sample_bits, **fit)
        return tuple(arrays[k] for k in names)

    out = dict(zip(names, jax.pure_callback(host, tuple(shapes), x, count, vmap_method="sequential")))
    widths = pack_codes(out.pop("widths").astype(jnp.uint32), 4)
    return Payload(arrays={"mean": out.pop("mean"), "widths": widths}, rows=out)


def _code_samples(d: _Decoding, x: Array, seed: Array, sent: Array, num_bytes: int) -> tuple[Array, Array]:
    """The packed codes ``floor(u + U)`` of the sent samples, and how many coefficients lay outside
    their ranges (clipped; counted, never sent)."""
    n = d.mean.shape[0]
    c = (x.reshape(x.shape[0], n).astype(jnp.float32) - d.mean) @ d.basis
    inv = jnp.where(d.step > 0, 1.0 / jnp.where(d.step > 0, d.step, 1.0), 0.0)
    u = jnp.clip((c - d.lo) * inv, 0.0, d.levels)
    t = (u * float(1 << _FRAC)).astype(jnp.uint32)  # u < 2^8: exact in 32-bit fixed point
    noise = _noise(counter_bits(seed, (x.shape[0],)), n)
    codes = jnp.minimum((t + noise) >> _FRAC, d.levels.astype(jnp.uint32))
    outside = (d.widths > 0) & ((c < d.lo) | (c > d.hi)) & (sent[:, None] > 0)
    return mask_items(varpack.pack_varying(codes, d.widths, num_bytes), sent), jnp.sum(outside, dtype=jnp.int32)


def _decode_samples(d: _Decoding, rows: dict, max_width: int) -> Array:
    """``x_hat = mu + c_hat V^T`` (b, n) from the rows' codes (and, with dither, their seeds)."""
    codes = varpack.unpack_varying(rows["codes"], d.widths, max_width).astype(jnp.float32)
    if "seed" in rows:  # subtractive dither: the noise the node added is taken off
        codes = codes - _noise(rows["seed"], codes.shape[1]).astype(jnp.float32) * (1.0 / (1 << _FRAC)) + 0.5
    return d.mean + (d.lo + d.step * codes) @ d.basis.T


def coefficient_codes(payload: TransformPayload, state: TransformState) -> tuple[Array, Array]:
    """The codes ``(b, n)`` int32 of a message's samples, coefficient k in column k (0 where
    ``w_k = 0``), and the widths ``w`` (n,) of the setup ``state`` holds: what an entropy coder of
    the codes reads (:mod:`qdata.codecs.coefficient_ans`), at the node and at the learner once it
    has received the setup."""
    if not isinstance(payload, TransformPayload) or not isinstance(state, TransformState):
        raise ValueError("coefficient codes are read off a transform codec's message and state "
                         f"(transform_codec); got {type(payload).__name__} and {type(state).__name__}")
    widths = _widths(state.setup)
    codes = varpack.unpack_varying(payload.codes.rows["codes"], widths, transform_codes.MAX_WIDTH)
    return codes.astype(jnp.int32), widths


def transform_codec(sample_shape, sample_bits: int, *, basis: str = "dct", rounding: str = "stochastic",
                    max_width: int = transform_codes.MAX_WIDTH) -> DataCodec:
    """The transform data codec (module docstring) for samples of ``sample_shape``.

    Args:
      sample_shape: the shape of one sample, (n,), (H, W) or (H, W, C).
      sample_bits: S, the code bits of one sample, a multiple of 8 in 8..max_width n: the budget the
        allocation spends and exactly what one sent sample's codes cost.
      basis: ``"dct"`` (fixed, not sent) or ``"pca"`` (each node's principal axes, sent in its setup).
      rounding: ``"stochastic"`` (unbiased per coefficient) or ``"dither"`` (subtractive dither).
      max_width: the largest width of one coefficient, 1..8.

    Returns:
      A :class:`DataCodec` with ``fit``; its state is a :class:`TransformState`.
    """
    if basis not in TRANSFORMS or rounding not in ROUNDINGS:
        raise ValueError(f"transform must be one of {TRANSFORMS} and its rounding one of {ROUNDINGS}, got "
                         f"{basis!r} and {rounding!r}")
    sample_shape = tuple(int(s) for s in sample_shape)
    n = math.prod(sample_shape)
    max_width = checks.check_int(max_width, "max_width", lo=1, hi=transform_codes.MAX_WIDTH)
    sample_bits = checks.check_int(sample_bits, "sample_bits", lo=8, hi=max_width * n)
    if sample_bits % 8:
        raise ValueError(f"sample_bits must be a multiple of 8 (whole bytes a sample), got {sample_bits}")
    fixed = jnp.asarray(transform_codes.dct_basis(sample_shape), jnp.float32) if basis == "dct" else None
    dither = rounding == "dither"
    template = _setup_template(n, basis)

    def init():
        return TransformState(setup=template, pending=jnp.zeros((), bool))

    def fit(state, x, count):
        """Node i's state fitted on its shard ``x`` (L, *sample_shape), of which ``count`` rows are its."""
        del state
        setup = _fit_setup(x, count, sample_bits, basis=basis, rounding=rounding, max_width=max_width)
        return TransformState(setup, jnp.ones((), bool))

    def encode(key, x, state, sent, pos=None):
        del pos
        seed = jax.random.bits(key, (), jnp.uint32)
        codes, clipped = _code_samples(_decoding(state.setup, fixed), x, seed, sent, sample_bits // 8)
        count = state.pending.astype(jnp.int32)
        setup = jax.tree_util.tree_map(lambda a: jnp.where(count > 0, a, jnp.zeros_like(a)), state.setup)
        info = {"clipped": clipped, "samples_coded": count_items(sent)}
        payload = Payload(arrays={"seed": seed} if dither else {}, rows={"codes": codes}, info=info)
        return TransformPayload(payload, setup, count), state._replace(pending=jnp.zeros((), bool))

    def receive(payload, state, sent):
        del sent
        take = lambda new, old: jnp.where(payload.count > 0, new, old)
        return state._replace(setup=jax.tree_util.tree_map(take, payload.setup, state.setup))

    def rows(payload, sent):
        del sent
        out = {"codes": payload.codes.rows["codes"]}
        if dither:  # each row's own noise seed, derived from the message's: a cached row decodes alone
            out["seed"] = counter_bits(payload.codes.arrays["seed"], (out["codes"].shape[0],))
        return out

    def decode_rows(payload, rows, state, sent):
        del payload
        x_hat = _decode_samples(_decoding(state.setup, fixed), rows, max_width)
        return mask_items(x_hat.reshape((x_hat.shape[0],) + sample_shape), sent)

    def decode(payload, state, sent):
        return decode_rows(payload, rows(payload, sent), state, sent)

    def bits(payload, sent):
        setup = payload.setup
        sent_columns = (unpack_codes(setup.arrays["widths"], 4, n) > 0) & (payload.count > 0)
        fixed_bits = sum(array_bits(a) for a in jax.tree_util.tree_leaves(setup.arrays))
        return {"data": payload_bits(Payload(rows=payload.codes.rows), sent),
                "metadata": Bits.of(payload_bits(Payload(arrays=payload.codes.arrays))),
                "setup": Bits.count(payload.count, fixed_bits) + payload_bits(Payload(rows=setup.rows), sent_columns)}

    return DataCodec(init=init, encode=encode, receive=receive, decode=decode, bits=bits, rows=rows,
                     decode_rows=decode_rows, unbiased=False, fit=fit)
