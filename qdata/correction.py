"""The gradient-difference correction (DESIGN.md section 2, step 3), a function of (loss, compressor).

At node i, with the learner's view of its samples (Q(x_j), y~_j and weights a_j, decoded by the node
from its own message):

    delta_i = (1/b) sum_j a_j (grad_w f(w; x_j, y_j) - grad_w f(w; Q(x_j), y~_j)),

from two a-weighted batched backward passes (no per-sample gradients), sent as C(delta_i) through
the vector compressor C. Since ||grad f(w; x) - grad f(w; Q(x))|| <= L_x ||x - Q(x)||, delta is
small and a few bits suffice; with C unbiased the learner's estimate is unbiased whatever Q is.

:func:`correction` returns a :class:`Correction` in the optax style; :func:`no_correction` sends
nothing (and decodes to None).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from qdata.codecs.payloads import Compressor, EmptyState, Payload

Array = jax.Array
PyTree = Any


class Correction(NamedTuple):
    """The correction term.

    Attributes:
      init: ``init(params) -> state``, the compressor's state.
      encode: ``encode(key, params, x, y, x_hat, y_hat, a, state) -> (payload, state)``: C(delta_i)
        for the true samples (x, y) and the learner's view of them (x_hat, y_hat, weights a).
      decode: ``decode(payload) -> C(delta_i)``, a pytree like params (None: no correction).
      bits: ``bits(payload) -> int``, exact.
    """

    init: Callable[[PyTree], PyTree]
    encode: Callable[..., tuple[Payload, PyTree]]
    decode: Callable[[Payload], PyTree | None]
    bits: Callable[[Payload], int]


def weighted_mean_loss(loss_fn: Callable[..., Array]) -> Callable[..., Array]:
    """``(params, x, y, a) -> (1/b) sum_j a_j f(w; x_j, y_j)`` (b = len(x)) for per-sample ``loss_fn``."""

    def loss(params, x, y, a):
        # a_j = 0 rows are masked out of the sum so that an odd decoded value there cannot leak in.
        losses = loss_fn(params, x, y)
        return jnp.sum(jnp.where(a > 0, a * losses, 0.0)) / x.shape[0]

    return loss


def correction(loss_fn: Callable[..., Array], compressor: Compressor) -> Correction:
    """C(delta_i) of the module docstring, for per-sample losses ``loss_fn(params, x, y) -> (b,)``."""
    if not isinstance(compressor, Compressor):
        raise ValueError(f"correction must be a base.Compressor or None, got {type(compressor).__name__}")
    grad = jax.grad(weighted_mean_loss(loss_fn))

    def encode(key, params, x, y, x_hat, y_hat, a, state):
        delta = jax.tree_util.tree_map(jnp.subtract, grad(params, x, y, a), grad(params, x_hat, y_hat, a))
        return compressor.encode(key, delta, state)

    return Correction(init=compressor.init, encode=encode, decode=compressor.decode, bits=compressor.bits)


def no_correction() -> Correction:
    """No correction: nothing sent, nothing added."""

    def encode(key, params, x, y, x_hat, y_hat, a, state):
        return Payload(), state

    return Correction(init=lambda params: EmptyState(), encode=encode, decode=lambda payload: None,
                      bits=lambda payload: 0)
