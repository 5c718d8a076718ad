"""Gradient compression: every node sends C(grad f_i(w)) of size ~d; the reference baselines.

``sgd`` is full-precision data-parallel SGD (fp32 gradients, 32*d bits per node per round).
``gradient_compression`` sends the node's minibatch gradient through any vector compressor of
:mod:`qdata.codecs` (QSGD, top-k, random-k, TernGrad, scaled sign, PowerSGD, ...), optionally with
error feedback (Karimireddy et al. 2019), which makes biased compressors such as top-k and PowerSGD
converge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qdata.codecs import compressors as _compressors
from qdata.codecs.base import Compressor
from qdata.codecs.ledger import Bits
from qdata.methods.base import Method


def gradient_compression(loss_fn, compressor: Compressor, *, error_feedback: bool = False,
                         name: str | None = None) -> Method:
    """Data-parallel SGD whose gradients cross the link through ``compressor``.

    Args:
      loss_fn: ``loss_fn(params, x, y) -> (b,)`` per-sample losses.
      compressor: a :class:`qdata.codecs.Compressor` applied to the node's minibatch gradient.
      error_feedback: wrap the compressor in error feedback (the error memory lives at the node).
      name: the method's name in results (default ``gradient``).

    Returns:
      A :class:`Method`; the learner averages the N decoded gradients.
    """
    if error_feedback:
        compressor = _compressors.error_feedback(compressor)

    def mean_loss(params, x, y):
        return jnp.mean(loss_fn(params, x, y))

    def init_node(params):
        return compressor.init(params)

    def init_learner(params, num_nodes):
        del params, num_nodes
        return ()

    def node_message(key, params, batch, node_state):
        grads = jax.grad(mean_loss)(params, batch["x"], batch["y"])
        return compressor.encode(key, grads, node_state)

    def learner_gradient(params, messages, learner_state):
        del params
        decoded = jax.vmap(compressor.decode)(messages)
        return jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), decoded), learner_state

    def uplink_bits(message):
        # Exact at any d: fp32 at d = 10^9 is 32e9 bits, beyond int32 (a static count here).
        bits = Bits.of(compressor.bits(message))
        return {"gradient": bits, "total": bits}

    return Method(name or "gradient", init_node, init_learner, node_message, learner_gradient,
                  uplink_bits, needs_params=True)


def sgd(loss_fn) -> Method:
    """Full-precision data-parallel SGD: fp32 gradients, the reference every method is measured by."""
    return gradient_compression(loss_fn, _compressors.fp32(), name="sgd")
