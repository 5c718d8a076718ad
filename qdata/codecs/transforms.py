"""Compressors on the optax side: compress an existing training loop's gradients in one line.

``optax.chain(compress_gradients(qsgd(4), key), optax.sgd(0.1))`` makes every update step see the
gradients as a receiver would after one uplink message ``decode(encode(g))``, and records that
message's exact bits in the optimizer state (a :class:`~qdata.codecs.ledger.Bits`: ``int(state.bits)``
on the host, exact at any model size).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qdata.codecs.payloads import Compressor
from qdata.codecs.ledger import Bits


class CompressGradientsState(NamedTuple):
    """State of :func:`compress_gradients`.

    Attributes:
      key: PRNG key for the next message (split on every update).
      inner: the compressor's own state (warm starts, error memory).
      bits: :class:`~qdata.codecs.ledger.Bits`, exact uplink bits of the last message (0 before the
        first update).
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

    def message_bits(payload) -> Bits:
        return Bits.of(compressor.bits(payload))

    def init_fn(params):
        inner = compressor.init(params)
        # The state's structure must not change at the first update: a zero of the Bits one message
        # will have (their units are static, read off an abstract message).
        shape = jax.eval_shape(lambda p, s: message_bits(compressor.encode(key, p, s)[0]), params, inner)
        zero = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shape)
        return CompressGradientsState(key=key, inner=inner, bits=zero)

    def update_fn(updates, state, params=None):
        del params
        next_key, message_key = jax.random.split(state.key)
        payload, inner = compressor.encode(message_key, updates, state.inner)
        received = compressor.decode(payload)
        return received, CompressGradientsState(next_key, inner, message_bits(payload))

    return optax.GradientTransformation(init_fn, update_fn)
