"""Flattening pytrees to one vector, with a hashable spec that can ride in ``Payload.meta``."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


class TreeSpec(NamedTuple):
    """Static description of a pytree of arrays: enough to rebuild it from a flat vector."""

    treedef: Any
    shapes: tuple
    dtypes: tuple

    @property
    def size(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


def tree_spec(tree: PyTree) -> TreeSpec:
    """The :class:`TreeSpec` of ``tree`` without concatenating its leaves (for per-leaf codecs)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return TreeSpec(treedef, tuple(tuple(l.shape) for l in leaves), tuple(jnp.dtype(l.dtype).name for l in leaves))


def flatten(tree: PyTree) -> tuple[Array, TreeSpec]:
    """Concatenate the leaves of ``tree`` into one float32 vector of length d."""
    leaves, spec = jax.tree_util.tree_leaves(tree), tree_spec(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.float32), spec
    vec = jnp.concatenate([jnp.ravel(l).astype(jnp.float32) for l in leaves])
    return vec, spec


def unflatten(vec: Array, spec: TreeSpec) -> PyTree:
    """Inverse of :func:`flatten`."""
    leaves, start = [], 0
    for shape, dtype in zip(spec.shapes, spec.dtypes):
        size = math.prod(shape)
        leaves.append(vec[start : start + size].reshape(shape).astype(dtype))
        start += size
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)
