"""Gaia's significance filter: each node sends only the coordinates whose accumulated update is significant.

Hsieh, Harlap, Vijaykumar, Konomis, Ganger, Gibbons and Mutlu, "Gaia: Geo-Distributed Machine Learning
Approaching LAN Speeds", NSDI 2017, section 3.2 (the significance filter of Approximate Synchronous
Parallel). There, each data centre accumulates the updates it makes to each parameter and shares an
accumulated update only once it is *significant*, ``|accumulated update / parameter value| > s``
(s = 1% in the paper), then restarts that parameter's accumulation; insignificant updates stay at home
until they add up.

Here, with the learner holding the model (DESIGN.md section 1), node i in round t:

1. computes its minibatch gradient ``g_i = grad f_i(w_t)`` and adds it to its accumulator:
   ``a_i <- a_i + g_i`` (every coordinate; nothing is lost, as with error feedback);
2. coordinate j is significant when the update it would make is, relative to the parameter:
   ``eta |a_ij| > s |w_j|``, ``eta`` the learning rate (a parameter at 0, such as a fresh bias, is
   significant as soon as its accumulated gradient is nonzero);
3. sends the m significant coordinates as a sparse message: the count m (one int32), their indices in
   increasing order packed at ``ceil(log2 d)`` bits each, and their accumulated values ``a_ij`` in fp32;
   and sets ``a_ij = 0`` there.

The learner averages the N sparse vectors into g and applies its optax update. The accumulator is in
gradient units so that the learner's optimizer (momentum, Adam) acts on it as on any gradient; with
momentum the parameter moves about ``eta / (1 - momentum)`` times the accumulated gradient, so the
threshold is on the plain-SGD update ``eta a``, as in the paper. The paper lowers s as the learning rate
decays; the learning rate here is constant, and so is s.

Bits per node and round, read off the message: ``32 + ceil(m w / 8) 8 + 32 m`` with
``w = ceil(log2 d)`` (indices bit-packed into bytes; 8, 16 or 32 bit indices in whole words). The nodes
need the model (their gradient is taken at w_t, and the test reads w_j): the downlink is the model
broadcast, or, for a node that keeps a replica of the model and optimizer, the relay of the other N - 1
nodes' sparse messages where that is smaller (:func:`qdata.compare.relays`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qdata.codecs import packing, trees
from qdata.codecs.ledger import Bits
from qdata.codecs.payloads import array_bits
from qdata.codecs.streams import Stream, StreamMeta, stream_bits
from qdata.methods.base import Method


class SignificanceNode(NamedTuple):
    """A node's state: its accumulated gradient, not yet sent, flattened to (d,)."""

    accumulated: jax.Array


class SignificantUpdate(NamedTuple):
    """One node's message: the count m, the m indices (packed) and the m accumulated values (fp32)."""

    count: jax.Array  # int32 scalar, sent
    indices: Stream  # room for d codes of ceil(log2 d) bits; the first m are sent
    values: Stream  # room for d float32 values; the first m are sent


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def significant_coordinates(accumulated: jax.Array, params_flat: jax.Array, threshold: float,
                            learning_rate: float) -> jax.Array:
    """The mask of significant coordinates: ``eta |a_j| > s |w_j|`` (module docstring, step 2)."""
    return learning_rate * jnp.abs(accumulated) > threshold * jnp.abs(params_flat)


def encode_update(accumulated: jax.Array, significant: jax.Array) -> SignificantUpdate:
    """The sparse message of the ``significant`` coordinates of ``accumulated`` (both (d,))."""
    d = accumulated.shape[0]
    width = packing.index_width(d)
    count = jnp.sum(significant, dtype=jnp.int32)
    # The significant indices in increasing order, then zeros (O(d), no sort).
    idx = jnp.nonzero(significant, size=d, fill_value=0)[0].astype(jnp.uint32)
    sent = jnp.arange(d) < count
    values = jnp.where(sent, accumulated[idx], 0.0).astype(jnp.float32)
    return SignificantUpdate(count, Stream(packing.pack_codes(jnp.where(sent, idx, 0), width), count,
                                           StreamMeta(d, width)),
                             Stream(values, count, StreamMeta(d, 32, "float32")))


def decode_update(message: SignificantUpdate) -> jax.Array:
    """The dense (d,) vector a message carries: its values at its indices, zeros elsewhere."""
    d = message.values.meta.length
    idx = packing.unpack_codes(message.indices.values, message.indices.meta.width, d).astype(jnp.int32)
    sent = jnp.arange(d) < message.count
    return jnp.zeros((d,), jnp.float32).at[jnp.where(sent, idx, d)].add(
        jnp.where(sent, message.values.values, 0.0), mode="drop")


def update_bits(message: SignificantUpdate) -> dict:
    """Exact bits of one message, part by part: the count, the index stream, the value stream."""
    parts = {"count": Bits.of(array_bits(message.count)), "indices": stream_bits(message.indices),
             "values": stream_bits(message.values)}
    return {**parts, "total": parts["count"] + parts["indices"] + parts["values"]}


def significance_filter(loss_fn, threshold: float, learning_rate: float) -> Method:
    """Gaia's significance filter (Hsieh et al., NSDI 2017) as a :class:`Method` (module docstring).

    Args:
      loss_fn: ``loss_fn(params, x, y) -> (b,)`` per-sample losses.
      threshold: s > 0, the relative significance (0.01: an accumulated update of 1% of the parameter).
      learning_rate: eta > 0, the learner's learning rate, which turns the accumulated gradient into
        the update the test compares with the parameter.

    Returns:
      A :class:`Method` named ``significance:S``; the learner averages the N decoded sparse vectors.
    """
    threshold = _check_positive(threshold, "threshold")
    learning_rate = _check_positive(learning_rate, "learning_rate")

    def init_node(params):
        return SignificanceNode(jnp.zeros((trees.flatten(params)[0].shape[0],), jnp.float32))

    def init_learner(params, num_nodes):
        del params, num_nodes
        return ()

    def node_message(key, params, batch, state):
        del key  # deterministic
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch["x"], batch["y"])))(params)
        accumulated = state.accumulated + trees.flatten(grads)[0].astype(jnp.float32)
        significant = significant_coordinates(accumulated, trees.flatten(params)[0], threshold, learning_rate)
        message = encode_update(accumulated, significant)
        return message, SignificanceNode(jnp.where(significant, 0.0, accumulated))

    def learner_gradient(params, messages, learner_state):
        mean = jnp.mean(jax.vmap(decode_update)(messages), axis=0)
        return trees.unflatten(mean, trees.tree_spec(params)), learner_state

    return Method(f"significance:{threshold:g}", init_node, init_learner, node_message, learner_gradient,
                  update_bits, needs_params=True)
