"""Argument checks: raised at construction or before any work, naming the argument."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
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


# ----------------------------------------------------------------------------------------------
# A node's training batch.


TARGET_DTYPES = ("float32", "float16")


def check_batch(batch, num_classes: int | None, target_dtype=None) -> tuple[Array, Array]:
    """(x, y) of a checked batch ``{'x': (b, *sample_shape), 'y': (b,)}``: x float, y integer labels in
    0..C-1 (C = ``num_classes``), or for real targets (``num_classes`` None) real values that fit
    ``target_dtype``, in float32 or wider. Shapes and dtypes are checked always (also under jit);
    values only when concrete."""
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("batch must be a dict with keys 'x' (b, *sample_shape) and 'y' (b,)")
    x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"batch['x'] must be a float array of shape (b, *sample_shape), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"batch['y'] must have shape (b,) = ({x.shape[0]},) to match batch['x'], got {y.shape}")
    if num_classes is None:
        return x, check_targets(x, y, target_dtype)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"batch['y'] must hold integer labels, got dtype {y.dtype}")
    check_finite(x, "batch['x']")
    if is_concrete(y):
        yv = np.asarray(y)
        if yv.size and (yv.min() < 0 or yv.max() >= num_classes):
            raise ValueError(f"batch['y'] labels must be in 0..{num_classes - 1}, got range {yv.min()}..{yv.max()}")
    return x, y


def check_target_dtype(value) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in TARGET_DTYPES:
        raise ValueError(f"target_dtype must be one of {TARGET_DTYPES}, got {value!r}")
    return dtype


def check_targets(x: Array, y: Array, target_dtype) -> Array:
    # Integer targets (counts, ordinal scores) are real values too: taken as float32.
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)):
        raise ValueError(f"batch['y'] must hold real-valued targets (float or integer), got dtype {y.dtype}")
    y = y if jnp.issubdtype(y.dtype, jnp.floating) else y.astype(jnp.float32)
    check_finite(x, "batch['x']")
    check_finite(y, "batch['y']")
    if is_concrete(y) and y.size:
        # A target beyond the wire type's range would arrive as inf.
        top, largest = float(np.max(np.abs(np.asarray(y, np.float64)))), float(jnp.finfo(target_dtype).max)
        if top > largest:
            raise ValueError(f"batch['y'] targets must fit target_dtype {np.dtype(target_dtype).name} "
                             f"(|y| <= {largest:g}), got max |y| = {top:g}")
    return y
