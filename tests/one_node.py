"""One node's g_i through the learner's one path: :func:`qdata.methods.qdata_method` over N = 1."""

import jax

from qdata.methods import qdata_method


def _stack(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def one_node_gradient(est, params, message, learner_state=None):
    """``(g_i, learner_state)`` for one node's message; ``learner_state`` (one node's, unstacked)
    defaults to the learner's initial state. Works under ``jit`` and ``vmap``."""
    if learner_state is None:
        learner_state = est.init_learner()
    g, state = qdata_method(est).learner_gradient(params, _stack(message), _stack(learner_state))
    return g, jax.tree_util.tree_map(lambda a: a[0], state)


def node_gradient(est, params, message):
    """g_i alone, from the learner's initial state."""
    return one_node_gradient(est, params, message)[0]
