"""Refinement of cached samples: a held sample sent again receives a residual instead of nothing.

With the learner cache (:mod:`qdata.codecs.cache`) a sample crosses the link once, at its first
code Q(x), and is then fixed at the learner. ``refined_cache(cached, delta, bits, most)`` wraps a
cached codec so that a held sample the node sends again (the gate picked it, or the batch drew it)
receives a residual code at ``bits`` bits a coordinate, at most ``most`` times, and the learner's copy
moves closer to x each time.

Both ends keep, per shard position, the current reconstruction ``x_k`` and the number of refinements
``k``. The error of the first code is within one quantizer step per coordinate, ``|x - x_0| <= delta``
(stochastic and nearest rounding on a dataset-wide range, :attr:`~qdata.codecs.payloads.Quantizer.delta`).
Refinement ``k`` stochastically rounds the residual ``r = x - x_k`` to the ``L = 2^bits`` levels
``-D_k + j s_k`` on ``[-D_k, D_k]``, ``D_k = delta rho^k``, ``s_k = 2 D_k / (L - 1)``, ``rho = 2 / (L - 1)``:

* ``E[x_{k+1} | x_k] = x_k + r = x``: each refinement is unbiased given the one before (for x in the
  quantizer's range), so an unbiased first code stays unbiased;
* ``|x - x_{k+1}| <= s_k = D_{k+1}``: the bound shrinks by rho (1/3 at 3 bits, 2/15 at 4) and every
  residual fits its range (``bits >= 2``: at one bit the range would have to grow).

What crosses the link (:class:`RefinedPayload`): the cached codec's payload, the b-bit bitmap of the
refined samples and their residual codes, ``8 ceil(n bits / 8)`` bits each; all charged as the
``'refine'`` part. The refined mask is the sent samples that are held (not fresh), the first sent copy
of their position in the batch, and refined fewer than ``most`` times.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from qdata import checks
from qdata.codecs.cache import CacheState, first_sent_copies
from qdata.codecs.data_codec import DataCodec, mask_items
from qdata.codecs.ledger import Bits
from qdata.codecs.packing import pack_codes, unpack_codes
from qdata.codecs.payloads import array_bits
from qdata.codecs.streams import read_stream

Array = jax.Array
PyTree = Any


class RefineState(NamedTuple):
    """One end's view of a node: the cache's state, each position's reconstruction ``(size, ...)`` and
    how many times it was refined ``(size,)``."""

    cache: CacheState
    x: Array
    level: Array


@struct.dataclass
class RefinedPayload:
    """The cached codec's payload, the packed bitmap of the refined samples and their residual codes
    (b rows of packed ``bits``-bit codes, rows not refined zero)."""

    cached: Any
    refined: Array
    codes: Array


def _bounds(delta: float, rho: float, level: Array, shape) -> Array:
    """D_k per item, shaped to broadcast against items of ``shape``."""
    bound = delta * jnp.power(rho, level.astype(jnp.float32))
    return bound.reshape((-1,) + (1,) * (len(shape) - 1))


def _residuals(codes: Array, bound: Array, levels: int, refine: Array) -> Array:
    """The residuals the codes stand for, ``-D_k + j s_k``, zero for items not refined."""
    step = 2.0 * bound / (levels - 1)
    return mask_items(-bound + step * codes.astype(jnp.float32), refine.astype(jnp.float32))


def _residual_codes(key, r: Array, bound: Array, levels: int, refine: Array) -> Array:
    """Stochastic rounding of the residuals ``r`` to the grid on [-D_k, D_k], uint32, rows not refined 0."""
    step = 2.0 * bound / (levels - 1)
    u = jax.random.uniform(jax.random.fold_in(key, 0x5EF1), r.shape)
    codes = jnp.clip(jnp.floor((r + bound) / step + u), 0, levels - 1)
    return mask_items(codes.astype(jnp.uint32), refine.astype(jnp.float32))


def _refined(state: RefineState, cache_state, pos, table, refine, residual) -> RefineState:
    """The state after the refined items' residuals are added and their counts raised."""
    at = jnp.where(refine, pos, table.shape[0])
    table = table.at[at].set(table[pos] + residual, mode="drop")
    return RefineState(cache=cache_state, x=table, level=state.level.at[at].add(1, mode="drop"))


def _checked(delta, sample_shape, bits, most):
    delta = float(delta)
    if not (math.isfinite(delta) and delta > 0.0):
        raise ValueError(f"delta (the first code's error bound) must be a positive finite number, got {delta}")
    return (delta, tuple(int(s) for s in sample_shape), checks.check_int(bits, "refine_bits", lo=2, hi=16),
            checks.check_int(most, "refine_max", lo=1, hi=64))


def refined_cache(cached: DataCodec, sample_shape: tuple[int, ...], delta: float, bits: int, most: int) -> DataCodec:
    """``cached`` (a :func:`~qdata.codecs.cache.learner_cache` of samples ``'x'`` and labels) whose held
    samples sent again receive residual codes (module docstring).

    Args:
      cached: the cached sample codec; its inner codec codes ``{'x': samples, ...}``.
      sample_shape: the shape of one sample.
      delta: the first code's error bound per coordinate (the quantizer's step), positive.
      bits: bits a coordinate of a residual, 2..16.
      most: the most refinements of one sample, 1..64.

    Returns:
      A :class:`DataCodec` with the interface of ``cached``; its state is a :class:`RefineState`.
    """
    delta, sample_shape, bits, most = _checked(delta, sample_shape, bits, most)
    levels = 2 ** bits
    rho = 2.0 / (levels - 1)

    def init():
        state = cached.init()
        size = state.held.shape[0]
        return RefineState(cache=state, x=jnp.zeros((size,) + sample_shape, jnp.float32),
                           level=jnp.zeros((size,), jnp.int32))

    def start(state, cache_state, payload, sent):
        """Both ends: the fresh samples' first codes entered, what is to be refined, and its bounds."""
        pos = read_stream(payload.positions, sent)
        fresh = unpack_codes(payload.fresh, 1, sent.shape[0]) > 0
        base = cached.decode(payload, cache_state, sent)["x"]
        table = state.x.at[jnp.where(fresh, pos, state.x.shape[0])].set(base.astype(state.x.dtype), mode="drop")
        refine = first_sent_copies(pos, sent) & ~fresh & (state.level[pos] < most)
        return pos, table, refine, _bounds(delta, rho, state.level[pos], table.shape)

    def encode(key, x, state, sent, pos=None):
        payload, cache_state = cached.encode(key, x, state.cache, sent, pos)
        pos, table, refine, bound = start(state, cache_state, payload, sent)
        codes = _residual_codes(key, x["x"].astype(table.dtype) - table[pos], bound, levels, refine)
        out = RefinedPayload(cached=payload, refined=pack_codes(refine.astype(jnp.uint32), 1),
                             codes=pack_codes(codes.reshape(codes.shape[0], -1), bits))
        return out, _refined(state, cache_state, pos, table, refine, _residuals(codes, bound, levels, refine))

    def receive(payload, state, sent):
        cache_state = cached.receive(payload.cached, state.cache, sent)
        pos, table, refine, bound = start(state, cache_state, payload.cached, sent)
        codes = unpack_codes(payload.codes, bits, math.prod(sample_shape)).reshape((-1,) + sample_shape)
        return _refined(state, cache_state, pos, table, refine, _residuals(codes, bound, levels, refine))

    def decode(payload, state, sent):
        pos = read_stream(payload.cached.positions, sent)
        decoded = cached.decode(payload.cached, state.cache, sent)
        return {**decoded, "x": mask_items(state.x[pos], sent)}

    def charge(payload, sent):
        refined = unpack_codes(payload.refined, 1, sent.shape[0])
        per_row = array_bits(payload.codes) // payload.codes.shape[0]
        parts = dict(cached.bits(payload.cached, sent))
        parts["refine"] = Bits.of(array_bits(payload.refined)) + Bits.count(jnp.sum(refined, dtype=jnp.int32), per_row)
        return parts

    def no_rows(*args):
        raise ValueError("a refined cache cannot be cached again")

    return DataCodec(init=init, encode=encode, receive=receive, decode=decode, bits=charge, rows=no_rows,
                     decode_rows=no_rows, unbiased=cached.unbiased, fit=cached.fit and _fit(cached))


def _fit(cached: DataCodec):
    def fit(state, x, count):
        return state._replace(cache=cached.fit(state.cache, x, count))

    return fit
