"""PowerSGD as Vogels et al. (2019) publish it: two reductions a round, one shared Q, a replicated model.

Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", NeurIPS 2019, Algorithms 1 and 2. Every matrix-shaped gradient leaf (reshaped to
m x n, output channels last, as :func:`qdata.codecs.compressors.powersgd`) of every node i goes
through one warm-started power iteration, *summed over the nodes before orthogonalization*:

1. node i: ``M_i = g_i + e_i`` (error feedback), sends ``P_i = M_i Q`` (m x r), with ``Q`` (n x r)
   the shared warm start every node holds;
2. learner: ``P = sum_i P_i``, replies ``P^ = orth(P)`` (QR) to every node;
3. node i: sends ``Q_i = M_i^T P^`` (n x r) and keeps ``e_i = M_i - P^ Q_i^T``;
4. learner: ``Q = (1/N) sum_i Q_i``, replies it (the next round's warm start); the update is
   ``P^ Q^T``, the mean over nodes of their rank-r approximations in the shared span of ``P^``.

Other leaves (biases, norms) are sent in fp32 with the first message and their mean comes back with
the second reply, as in the paper. In the paper both reductions are all-reduces and every worker
applies the update itself; here the learner is the reducer: the nodes keep a replica of the model,
updated from what the replies carry (``P^``, ``Q`` and the mean of the other leaves, enough to form
the update and run the same optimizer), so no model broadcast is sent or charged. Per node and round:
uplink ``32 r (m + n)`` per matrix leaf plus 32 bits per other coordinate; downlink the same.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qdata.codecs import base
from qdata.codecs.base import Payload
from qdata.codecs.compressors import _matrix_plan, join_matrices, split_matrices
from qdata.codecs.ledger import Bits
from qdata.methods.base import Exchange, Method

PyTree = Any


class PowerSGDNode(NamedTuple):
    """A node's state: the shared warm start, its error memory and this round's ``M_i``."""

    q: tuple  # (n, r) per matrix leaf: the shared Q, as the last reply brought it
    error: PyTree  # e_i, in the shapes of the parameters (zeros without error feedback)
    m: PyTree  # M_i = g_i + e_i, kept between the node's two messages of a round


class PowerSGDLearner(NamedTuple):
    """The learner's state (one copy per node it serves): this round's ``P^``, ``Q`` and other leaves."""

    p_hat: tuple  # (m, r) per matrix leaf
    q: tuple  # (n, r) per matrix leaf
    rest: jax.Array  # mean over nodes of the other leaves, flattened


def _plan(params: PyTree, rank: int) -> tuple:
    return _matrix_plan(base.tree_spec(params).shapes, rank)


def _rest_size(params: PyTree, plan: tuple) -> int:
    return sum(math.prod(jnp.shape(leaf)) for leaf, p in zip(jax.tree_util.tree_leaves(params), plan) if p is None)


def _bits(message: Payload) -> dict:
    bits = Bits.of(base.payload_bits(message))
    return {"gradient": bits, "total": bits}


def _to_each(tree: PyTree, count: int) -> PyTree:
    """The same reply for each of ``count`` nodes (leading node axis)."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (count,) + a.shape), tree)


def powersgd_allreduce(loss_fn, rank: int, *, error_feedback: bool = True, seed: int = 0) -> Method:
    """PowerSGD of rank ``rank`` as published (module docstring), as a :class:`Method`.

    Args:
      loss_fn: ``loss_fn(params, x, y) -> (b,)`` per-sample losses.
      rank: r >= 1 (an m x n leaf uses ``min(r, m, n)``).
      error_feedback: keep each node's residual ``e_i`` (the paper's Algorithm 2; on by default).
      seed: seed of the shared i.i.d. standard normal initial Q.
    """
    rank, seed = base.check_int(rank, "rank"), base.check_int(seed, "seed", lo=0)

    def init_node(params):
        plan, root = _plan(params, rank), jax.random.key(seed)
        q = tuple(jax.random.normal(jax.random.fold_in(root, i), (p[1], p[2]), jnp.float32)
                  for i, p in enumerate(plan) if p is not None)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return PowerSGDNode(q, zeros, zeros)

    def init_learner(params, num_nodes):
        full = _plan(params, rank)  # once: the matrix leaves' shapes and the size of the rest
        plan = [p for p in full if p is not None]
        one = PowerSGDLearner(tuple(jnp.zeros((m, r)) for m, _, r in plan),
                              tuple(jnp.zeros((n, r)) for _, n, r in plan), jnp.zeros((_rest_size(params, full),)))
        return _to_each(one, num_nodes)

    def node_message(key, params, batch, state):
        del key  # deterministic given the state
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch["x"], batch["y"])))(params)
        m = jax.tree_util.tree_map(lambda g, e: (g + e).astype(g.dtype), grads, state.error)
        mats, rest = split_matrices(m, _plan(params, rank))
        message = Payload(arrays={"p": tuple(a @ q for a, q in zip(mats, state.q)), "rest": rest})
        return message, state._replace(m=m)

    def reply_p(params, messages, learner_state, total):
        p_hat = tuple(jnp.linalg.qr(p)[0] for p in total(messages.arrays["p"]))
        count = messages.arrays["rest"].shape[0]
        nodes = total(jnp.ones((count,)))
        rest = total(messages.arrays["rest"]) / nodes
        return (Payload(arrays={"p_hat": _to_each(p_hat, count)}),
                learner_state._replace(p_hat=_to_each(p_hat, count), rest=_to_each(rest, count)))

    def answer_q(key, params, reply, state):
        del key
        plan = _plan(params, rank)
        mats, rest = split_matrices(state.m, plan)
        p_hat = reply.arrays["p_hat"]
        qs = tuple(a.T @ p for a, p in zip(mats, p_hat))
        error = jax.tree_util.tree_map(jnp.zeros_like, params)
        if error_feedback:  # the other leaves were sent exactly: their residual is 0
            error = join_matrices([a - p @ q.T for a, p, q in zip(mats, p_hat, qs)], jnp.zeros_like(rest),
                                  base.tree_spec(params), plan)
        return Payload(arrays={"q": qs}), state._replace(error=error)

    def reply_q(params, messages, learner_state, total):
        count = learner_state.rest.shape[0]
        nodes = total(jnp.ones((count,)))
        q = tuple(s / nodes for s in total(messages.arrays["q"]))
        reply = Payload(arrays={"q": _to_each(q, count), "rest": learner_state.rest})
        return reply, learner_state._replace(q=_to_each(q, count))

    def take_q(key, params, reply, state):
        del key, params
        return Payload(arrays={}), state._replace(q=reply.arrays["q"])

    def learner_gradient(params, messages, learner_state):
        del messages  # the update is formed from what the replies carried
        share = jax.tree_util.tree_map(lambda a: a[0], learner_state)
        mats = [p @ q.T for p, q in zip(share.p_hat, share.q)]
        return join_matrices(mats, share.rest, base.tree_spec(params), _plan(params, rank)), learner_state

    def reply_p_bits(params):
        return sum(32 * p[0] * p[2] for p in _plan(params, rank) if p is not None)

    def reply_q_bits(params):
        plan = _plan(params, rank)
        return sum(32 * p[1] * p[2] for p in plan if p is not None) + 32 * _rest_size(params, plan)

    exchanges = (Exchange(reply_p, answer_q, _bits, reply_p_bits), Exchange(reply_q, take_q, _bits, reply_q_bits))
    return Method(f"powersgd_allreduce:{rank}", init_node, init_learner, node_message, learner_gradient,
                  _bits, needs_params=False, exchanges=exchanges)
