"""Compressors on the optax side: compress an existing training loop's gradients in one line.

``optax.chain(compress_gradients(qsgd(4), key), optax.sgd(0.1))`` makes every update step see the
gradients as a receiver would after one uplink message ``decode(encode(g))``, and records that
message's exact bits in the optimizer state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qdata.codecs.base import Compressor

_INT32_MAX = 2**31 - 1


class CompressGradientsState(NamedTuple):
    """State of :func:`compress_gradients`.

    Attributes:
      key: PRNG key for the next message (split on every update).
      inner: the compressor's own state (warm starts, error memory).
      bits: int32 scalar, exact uplink bits of the last message (0 before the first update).
    """

    key: jax.Array
    inner: Any
    bits: jax.Array


def compress_gradients(compressor: Compressor, key: jax.Array) -> optax.GradientTransformation:
    """An optax transformation that replaces the gradients g by ``C(g) = decode(encode(g))``.

    Put it first in an ``optax.chain`` to train on compressed gradients (the gradient-compression
    baseline of DESIGN.md); wrap the compressor in ``error_feedback`` for the EF variants. The bits of
    each message are ``compressor.bits(payload)`` and are kept in ``state.bits``.

    Args:
      compressor: any :class:`qdata.codecs.Compressor`.
      key: a PRNG key (``jax.random.key`` or legacy ``PRNGKey``); it is split once per update.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`CompressGradientsState`.
    """
    if not isinstance(compressor, Compressor):
        raise ValueError(f"compressor must be a qdata.codecs.Compressor, got {type(compressor).__name__}")
    if not isinstance(key, jax.Array):
        raise ValueError(f"key must be a jax PRNG key array, got {type(key).__name__}")

    def init_fn(params):
        return CompressGradientsState(key=key, inner=compressor.init(params), bits=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        next_key, message_key = jax.random.split(state.key)
        payload, inner = compressor.encode(message_key, updates, state.inner)
        bits = compressor.bits(payload)
        if isinstance(bits, int) and bits > _INT32_MAX:
            # The count is static here, so this is a trace-time error, not a silent wrap-around.
            raise ValueError(f"the message has {bits} bits, more than state.bits (int32) can record; "
                             "read compressor.bits(payload) directly for messages this large")
        received = compressor.decode(payload)
        return received, CompressGradientsState(next_key, inner, jnp.asarray(bits, jnp.int32))

    return optax.GradientTransformation(init_fn, update_fn)
