"""Argument checks: raised at construction or before any work, naming the argument."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

PyTree = Any


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 16:
        raise ValueError(f"{name} must be an integer in 1..16, got {bits!r}")
    return int(bits)


def check_int(value: int, name: str, lo: int = 1, hi: int | None = None) -> int:
    """An integer hyper-parameter in ``lo..hi`` (``hi`` None: no upper bound); bools are refused."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if ok and (int(value) < lo or (hi is not None and int(value) > hi)):
        ok = False
    if not ok:
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def check_range(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"the quantizer range needs finite lo < hi, got lo={lo}, hi={hi}")
    return lo, hi


def check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer inside jit/vmap/grad)."""
    return not any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves(x))


def check_finite(x: PyTree, name: str = "x") -> None:
    """Raise ValueError if a concrete ``x`` holds NaN or inf. Tracers are skipped (checked upstream)."""
    if not is_concrete(x):
        return
    for leaf in jax.tree_util.tree_leaves(x):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise ValueError(f"{name} contains {bad} NaN or inf value(s)")
