"""Exact bit counts at any scale, under ``jit`` and ``vmap``, without 64-bit integers on device.

A message's bits are ``size * itemsize * 8`` of its packed arrays (:func:`base.payload_bits`). At
ImageNet scale those numbers leave int32: 4,096 samples of 224*224*3 coordinates at 4 bits are
2,466,250,752 bits, and fp32 SGD at d = 10^9 sends 32e9 bits per node per round. JAX without x64
has no wider integer on device, so :class:`Bits` never forms the product there. A count is the sum

    value = sum_i counts[i] * units[i]

with ``counts`` small int32 arrays (pytree children: they pass through ``jit``, ``vmap``, ``scan``
and collectives like any array) and ``units`` static Python ints (part of the tree structure). The
products are taken on the host, in Python ints, so they are exact whatever their size.

* A static size (a Python int, e.g. ``32 * d``) is count 1 times a unit equal to that int.
* A dynamic size is a small count times a static unit: rows sent times bits per row
  (``Bits.count(sent, per_row)``), words of a stream prefix times the word size.

Bound on the counts: each count is at most an array size (rows of a payload, words of a stream,
1 for a static size), so below 2^31; adding the few parts of one message adds a few such counts.
Do not accumulate counts over many rounds on device: fetch each round's (or each scan's) ``Bits``
and add them on the host, where the sums are exact.

Under ``vmap`` over nodes (and ``scan`` over rounds) every count gains the leading axes, constants
included (``vmap`` broadcasts unbatched outputs), so a fetched ``Bits`` of counts of shape
``(rounds, N)`` holds one value per round and node.

On the host (after ``jax.device_get`` or ``engine.fetch``, which map over the counts):

* :func:`host_total` (or ``int(bits)``, ``bits.total()``): the exact Python int over all entries;
* :func:`host_per_entry` (or ``bits.per_entry()``, ``np.asarray(bits)``): the value of each
  leading-axis entry, int64 (object dtype of Python ints should int64 overflow);
* :func:`add_totals`: ``cumulative[part] + host_total(bits[part])`` for a dict of parts, the
  exact running ledger of a run.

A method's ``uplink_bits(message)`` returns ``dict[str, Bits]`` with ``'total'`` the sum of the
other parts; the engine vmaps it over nodes, fetches the dict and calls :func:`add_totals`.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _static_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {value!r}")
    return int(value)


def _as_count(n):
    """``n`` as an int32 count array; a concrete value outside int32 is refused, not wrapped."""
    if not hasattr(n, "dtype"):
        n = np.asarray(n)
    if not (np.issubdtype(n.dtype, np.integer) or n.dtype == np.bool_):
        raise TypeError(f"a bit count must be an integer array, got dtype {n.dtype}")
    narrow = n.dtype == np.bool_ or np.can_cast(n.dtype, np.int32)
    if not narrow and not _is_tracer(n):
        host = np.asarray(n)
        if host.size and (int(host.max()) > _INT32_MAX or int(host.min()) < -_INT32_MAX):
            raise ValueError("a count must fit int32 (it is a number of rows or words, not of bits), "
                             f"got values up to {int(host.max())}; pass the unit separately")
    if isinstance(n, np.ndarray):
        return n.astype(np.int32)
    return jnp.asarray(n).astype(jnp.int32)


def _merge(pairs) -> tuple[tuple, tuple]:
    """Counts of equal units added, units sorted (so the tree structure does not depend on the order
    in which parts were added), zero units dropped where that loses no entry (a lone zero keeps one
    count, so that its shape still follows ``vmap`` and ``scan``)."""
    by_unit: dict[int, object] = {}
    for count, unit in pairs:
        by_unit[unit] = count if unit not in by_unit else by_unit[unit] + count
    if 0 in by_unit and len(by_unit) > 1:
        rest = [np.shape(c) for u, c in by_unit.items() if u != 0]
        if np.broadcast_shapes(*rest) == np.broadcast_shapes(*rest, np.shape(by_unit[0])):
            del by_unit[0]
    units = tuple(sorted(by_unit))
    return tuple(by_unit[u] for u in units), units


@struct.dataclass(eq=False)
class Bits:
    """An exact bit count ``sum_i counts[i] * units[i]`` (module docstring).

    Attributes:
      counts: int32 arrays (pytree children), all of one shape or broadcastable: the leading axes
        (nodes, rounds) index entries.
      units: Python ints, one per count (static): bits per row, per word, or a whole static size.
    """

    counts: tuple = ()
    units: tuple = struct.field(pytree_node=False, default=())

    # ------------------------------------------------------------------------------------------
    # Construction (host or inside jit/vmap).

    @classmethod
    def of(cls, x) -> "Bits":
        """A :class:`Bits` from a Python int (a static size: count 1 times ``x``), a :class:`Bits`
        (returned as is), or an integer array (a count of single bits, e.g. a codec's own int32
        count; prefer :meth:`count` with the unit, which cannot overflow)."""
        if isinstance(x, Bits):
            return x
        if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
            return cls((np.ones((), np.int32),), (int(x),))
        return cls.count(x, 1)

    @classmethod
    def count(cls, n, unit: int) -> "Bits":
        """``n`` (an integer array, e.g. rows sent or words of a stream, < 2^31) times the static
        ``unit`` bits. A Python int ``n`` gives the static ``n * unit``."""
        unit = _static_int(unit, "unit")
        if isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)):
            return cls.of(int(n) * unit)
        return cls((_as_count(n),), (unit,))

    # ------------------------------------------------------------------------------------------
    # Arithmetic: exact, no device product.

    def __add__(self, other) -> "Bits":
        if not isinstance(other, (Bits, int, np.integer)) or isinstance(other, bool):
            return NotImplemented
        other = Bits.of(other)
        counts, units = _merge(zip(self.counts + other.counts, self.units + other.units))
        return Bits(counts, units)

    __radd__ = __add__  # addition commutes; 0 + bits makes sum(...) work

    def __neg__(self) -> "Bits":
        # The sign goes on the static units: the counts stay as they are.
        counts, units = _merge(zip(self.counts, tuple(-u for u in self.units)))
        return Bits(counts, units)

    def __sub__(self, other) -> "Bits":
        if not isinstance(other, (Bits, int, np.integer)) or isinstance(other, bool):
            return NotImplemented
        return self + (-Bits.of(other))

    def __rsub__(self, other) -> "Bits":
        return (-self) + other

    def times(self, sent) -> "Bits":
        """These bits counted ``sent`` times: ``sent`` an int32 0/1 array (a message that crosses in
        some rounds only, e.g. a node's turn in sequential split learning), so each count stays
        within its bound."""
        sent = _as_count(sent)
        return Bits(tuple(c * sent for c in self.counts), self.units)

    # ------------------------------------------------------------------------------------------
    # Host side: exact Python ints.

    def _host_counts(self) -> list[np.ndarray]:
        if any(_is_tracer(c) for c in self.counts):
            raise TypeError("Bits are exact on the host only: return them from jit/vmap and convert "
                            "there (int(bits), bits.per_entry()); inside a trace use bits.as_float()")
        return [np.asarray(c, np.int64) for c in self.counts]

    @property
    def shape(self) -> tuple:
        """The leading shape of the entries (nodes, rounds): the broadcast shape of the counts."""
        return tuple(np.broadcast_shapes(*(np.shape(c) for c in self.counts))) if self.counts else ()

    def total(self) -> int:
        """The exact value summed over all entries, a Python int."""
        size = math.prod(self.shape)
        # A count of fewer axes stands for each entry it broadcasts to (as a static size does).
        return sum(int(c.sum()) * (size // max(c.size, 1)) * u for c, u in zip(self._host_counts(), self.units))

    def __int__(self) -> int:
        return self.total()

    def per_entry(self) -> np.ndarray:
        """The exact value of each leading-axis entry (e.g. per node, per round and node): int64,
        or an object array of Python ints where an entry could exceed int64."""
        shape = self.shape
        counts = [np.broadcast_to(c, shape) for c in self._host_counts()]
        bound = sum(int(np.abs(c).max(initial=0)) * abs(u) for c, u in zip(counts, self.units))
        if bound <= _INT64_MAX and all(abs(u) <= _INT64_MAX for u in self.units):
            out = np.zeros(shape, np.int64)
            for c, u in zip(counts, self.units):
                out = out + c * np.int64(u)  # |each product| <= bound: no overflow
            return np.asarray(out)
        out = np.zeros(shape, object)
        for c, u in zip(counts, self.units):
            out = out + c.astype(object) * u
        return np.asarray(out, object)

    def __array__(self, dtype=None, copy=None):
        # np.asarray(bits), np.mean(bits), np.asarray(bits, np.int64): the per-entry values.
        del copy
        out = self.per_entry()
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index) -> "Bits":
        """The entries at ``index`` of the leading axes (``bits[-1]``: the last round)."""
        shape = self.shape
        broadcast = (jnp.broadcast_to if any(isinstance(c, jax.Array) for c in self.counts)
                     else np.broadcast_to)
        return Bits(tuple(broadcast(c, shape)[index] for c in self.counts), self.units)

    def __eq__(self, other):
        # Value equality (the dataclass' field-wise __eq__ is turned off): exact, on the host.
        if isinstance(other, Bits) or (isinstance(other, (int, np.integer)) and not isinstance(other, bool)):
            return self.total() == int(other)
        return NotImplemented

    __hash__ = None  # value equality over arrays: not hashable

    # ------------------------------------------------------------------------------------------
    # Inside a trace, for statistics only.

    def as_float(self, dtype=jnp.float32) -> jax.Array:
        """A floating-point approximation of each entry, computable on device (float32: relative
        error about 2^-24). For statistics such as a mean over rounds, never for the ledger."""
        terms = [jnp.asarray(c).astype(dtype) * jnp.asarray(float(u), dtype)
                 for c, u in zip(self.counts, self.units)]
        return sum(terms) if terms else jnp.zeros((), dtype)


def host_total(bits) -> int:
    """Exact Python int of ``bits`` (a :class:`Bits`, an int, or an integer array) over all entries."""
    if isinstance(bits, Bits):
        return bits.total()
    if isinstance(bits, (int, np.integer)):
        return int(bits)
    return int(np.asarray(bits, np.int64).sum())


def host_per_entry(bits) -> np.ndarray:
    """Exact value of each leading-axis entry of ``bits`` (a :class:`Bits`, an int or an integer
    array), as int64 (object dtype of Python ints where int64 could overflow)."""
    if isinstance(bits, Bits):
        return bits.per_entry()
    return np.asarray(bits, np.int64)


def add_totals(cumulative: Mapping[str, int], bits: Mapping[str, object]) -> dict[str, int]:
    """A new ledger: ``cumulative[part] + host_total(bits[part])`` for every part of either.

    Args:
      cumulative: exact running totals by part (Python ints), e.g. ``{}`` before the first round.
      bits: one fetched step of ``uplink_bits`` by part (each a :class:`Bits`, any leading axes:
        rounds, nodes).

    Returns:
      The updated totals, Python ints (exact at any size).
    """
    out = {part: int(value) for part, value in cumulative.items()}
    for part, value in bits.items():
        out[part] = out.get(part, 0) + host_total(value)
    return out


__all__ = ["Bits", "add_totals", "host_per_entry", "host_total"]
