"""Faulty nodes and links: a schedule of what goes wrong, drawn under ``jit`` from (seed, round, node).

DESIGN.md is silent on failures; issue 12 item 3 asks that a node may miss rounds or leave for good,
and that the learner goes on with the messages it has. A schedule is a spec string (``RunConfig.faults``):

=========================  ===================================================================
``none``                   nothing goes wrong (the default)
``drop:NODE:P``            node NODE misses each round with probability P (it sends nothing)
``leave:NODE:ROUND``       node NODE takes part in rounds 0..ROUND-1, then never again
``corrupt:NODE:P``         with probability P a round, one random bit of each message node NODE
                           sends is flipped on the link (what :mod:`qdata.integrity` must catch)
``truncate:NODE:P``        with probability P a round, each message node NODE sends loses a random
                           tail on the link (the bytes after the cut arrive as zeros, and fewer bits
                           arrive than were sent)
=========================  ===================================================================

NODE is a node index 0..N-1 or ``*`` (every node); P is a probability in (0, 1]; ROUND an integer
>= 0. Rules are joined by commas (``drop:1:0.5,leave:3:100``). The draws of rule r for node i in
round t are a function of (seed, t, r, i) only: they do not depend on how nodes are placed on
devices or processes, nor on the other rules, so ``drop:1:0.5`` and ``corrupt:1:0.5`` (each the
first rule) hit the same rounds, which the integrity test uses (a corrupted message rejected is a
message dropped).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("drop", "leave", "corrupt", "truncate")
SPECS = ("none", "drop:NODE:P", "leave:NODE:ROUND", "corrupt:NODE:P", "truncate:NODE:P")
ALL_NODES = -1  # NODE = "*"
_TAG = 0x46A17  # folded into the run's key so fault draws never coincide with the nodes' own keys


class FaultRule(NamedTuple):
    """One rule: ``kind`` (:data:`KINDS`), ``node`` (an index, or :data:`ALL_NODES`) and ``value``
    (the probability P, or the ROUND a node leaves at)."""

    kind: str
    node: int
    value: float


class FaultSchedule(NamedTuple):
    """A parsed ``faults`` spec: its rules in order (empty for ``none``)."""

    rules: tuple = ()

    def has(self, *kinds: str) -> bool:
        return any(rule.kind in kinds for rule in self.rules)


def _bad(spec: str, why: str):
    raise ValueError(f"faults spec {spec!r}: {why}; allowed: 'none' or comma-separated rules "
                     f"{', '.join(SPECS[1:])} (NODE an index 0..N-1 or '*', P in (0, 1], ROUND >= 0)")


def parse_faults(spec: str) -> FaultSchedule:
    """Parse a ``faults`` spec (module docstring); a ValueError names the spec and the allowed forms."""
    if not isinstance(spec, str):
        _bad(repr(spec), f"must be a string, got {type(spec).__name__}")
    if spec == "none":
        return FaultSchedule()
    rules = []
    for text in spec.split(","):
        parts = text.strip().split(":")
        if len(parts) != 3 or parts[0] not in KINDS:
            _bad(spec, f"rule {text!r} is not KIND:NODE:VALUE with KIND one of {', '.join(KINDS)}")
        kind, node, value = parts
        if node != "*" and not (node.isdigit() and int(node) < 2**31 - 1):
            _bad(spec, f"rule {text!r}: NODE must be a node index or '*', got {node!r}")
        if kind == "leave":
            if not value.isdigit() or int(value) > 2**31 - 1:
                _bad(spec, f"rule {text!r}: ROUND must be an integer >= 0, got {value!r}")
            number = float(int(value))
        else:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not 0.0 < number <= 1.0:
                _bad(spec, f"rule {text!r}: P must be a probability in (0, 1], got {value!r}")
        rules.append(FaultRule(kind, ALL_NODES if node == "*" else int(node), number))
    return FaultSchedule(tuple(rules))


def check_nodes(schedule: FaultSchedule, num_nodes: int, spec: str) -> None:
    """Refuse a rule naming a node the run does not have."""
    for rule in schedule.rules:
        if rule.node >= num_nodes:
            raise ValueError(f"faults spec {spec!r}: node {rule.node} does not exist (num_nodes={num_nodes}: "
                             f"NODE must be in 0..{num_nodes - 1} or '*')")


def _applies(rule: FaultRule, node_ids):
    return (node_ids >= 0) if rule.node == ALL_NODES else (node_ids == rule.node)


def _uniform(key: jax.Array, round_: jax.Array, index: int, node_ids: jax.Array, salt: int = 0) -> jax.Array:
    """u in [0, 1) for rule ``index`` at round ``round_`` for each node: a function of (key, round,
    rule, node) alone. ``salt`` gives further independent draws of the same event (bit positions)."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, _TAG), round_), index)
    base = jax.random.fold_in(base, salt)
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(base, i)))(node_ids)


def present(schedule: FaultSchedule, round_, node_ids):
    """Whether each node is still in the run at ``round_`` (no ``leave`` rule has taken it away).
    Works on numpy (the host's ledger) and on traced arrays alike."""
    xp = np if isinstance(node_ids, np.ndarray) else jnp
    out = xp.ones(np.broadcast_shapes(np.shape(round_), np.shape(node_ids)), bool)
    for rule in schedule.rules:
        if rule.kind == "leave":
            out = out & ~(_applies(rule, node_ids) & (round_ >= int(rule.value)))
    return out


def _happens(schedule: FaultSchedule, kinds: tuple, key, round_, node_ids) -> jax.Array:
    hit = jnp.zeros(node_ids.shape, bool)
    for index, rule in enumerate(schedule.rules):
        if rule.kind in kinds:
            hit = hit | (_applies(rule, node_ids) & (_uniform(key, round_, index, node_ids) < rule.value))
    return hit


def sends(schedule: FaultSchedule, key: jax.Array, round_: jax.Array, node_ids: jax.Array) -> jax.Array:
    """bool (n,): whether each node sends its messages this round (present and not dropped)."""
    return present(schedule, round_, node_ids) & ~_happens(schedule, ("drop",), key, round_, node_ids)


# ----------------------------------------------------------------------------------------------
# Damage on the link: one node's message at a time (inside the engine's map over nodes).


def _flip(leaves: list, at: jax.Array, bit: jax.Array) -> list:
    """Flip bit ``bit`` (mod the element's width) of element ``at`` of the leaves laid end to end."""
    out, offset = [], 0
    for leaf in leaves:
        width = np.dtype(leaf.dtype).itemsize * 8
        words = jax.lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{width}")) if leaf.dtype != bool else leaf
        flat = words.reshape(-1)
        local = at - offset
        if leaf.dtype == bool:
            flat = flat ^ (jnp.arange(flat.size) == local)
        else:
            mask = (jnp.arange(flat.size) == local).astype(flat.dtype) << (bit % width).astype(flat.dtype)
            flat = flat ^ mask
        flat = flat.reshape(leaf.shape)
        out.append(flat if leaf.dtype == bool else jax.lax.bitcast_convert_type(flat, leaf.dtype))
        offset += leaf.size
    return out


def _cut(leaves: list, keep: jax.Array) -> tuple[list, jax.Array]:
    """Zero every element from element ``keep`` on (the leaves laid end to end); also the bits lost
    (uint32, mod 2^32)."""
    out, offset, lost = [], 0, jnp.uint32(0)
    for leaf in leaves:
        index = offset + jnp.arange(leaf.size).reshape(leaf.shape)
        out.append(jnp.where(index < keep, leaf, jnp.zeros((), leaf.dtype)))
        gone = jnp.clip(offset + leaf.size - keep, 0, leaf.size).astype(jnp.uint32)
        lost = lost + gone * jnp.uint32(np.dtype(leaf.dtype).itemsize * 8)
        offset += leaf.size
    return out, lost


def damage(schedule: FaultSchedule, key: jax.Array, round_: jax.Array, node_id: jax.Array, message, arrived):
    """What of one node's sealed ``message`` reaches the learner: ``(message, arrived)`` after the
    ``corrupt`` and ``truncate`` rules for this node and round (``arrived``: the link's own count
    of the bits received, mod 2^32, shrunk by a truncation). Unchanged when no rule hits."""
    leaves, treedef = jax.tree_util.tree_flatten(message)
    total = sum(leaf.size for leaf in leaves)
    if not total:
        return message, arrived
    ids = jnp.reshape(node_id, (1,))
    for index, rule in enumerate(schedule.rules):
        if rule.kind not in ("corrupt", "truncate"):
            continue
        hit = (_applies(rule, ids) & (_uniform(key, round_, index, ids) < rule.value))[0]
        u_at, u_bit = (_uniform(key, round_, index, ids, salt=s)[0] for s in (1, 2))
        at = jnp.minimum((u_at * total).astype(jnp.int32), total - 1)
        if rule.kind == "corrupt":
            damaged = _flip(leaves, at, (u_bit * 64).astype(jnp.int32))
        else:  # keep elements 0..at-1; the learner's count of what arrived falls by what is missing
            damaged, lost = _cut(leaves, at)
            arrived = jnp.where(hit, arrived - lost, arrived)
        leaves = [jnp.where(hit, d, leaf) for d, leaf in zip(damaged, leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves), arrived
