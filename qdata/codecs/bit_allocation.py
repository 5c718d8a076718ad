"""Bits allocated across transform coefficients by their variance: integer reverse water-filling.

For independent Gaussian coefficients of variances ``sigma_k^2`` and a rate of ``R`` bits per sample,
the rate-distortion optimum is reverse water-filling (Cover & Thomas, *Elements of Information
Theory*, 2nd ed., Thm 10.3.3): ``D_k = min(theta, sigma_k^2)``, ``b_k = max(0, 1/2 log2(sigma_k^2 /
theta))`` with ``theta`` set so that ``sum_k b_k = R``. A real code needs integer widths and the
distortion its own quantizer makes, so :func:`allocate_bits` runs the greedy marginal-return
allocation (Fox 1966; Gersho & Gray, *Vector Quantization and Signal Compression*, 1992, sec. 8.4)
on a table ``D[k, b]`` of the distortion of coefficient ``k`` at ``b`` bits: each step spends bits
where they lower the total distortion most per bit. With ``D[k, b] = sigma_k^2 4^-b`` this is
the integer version of reverse water-filling (coefficients under the water level get 0 bits).

A quantizer's first bit can *raise* the distortion (stochastic rounding with one bit on a
coefficient's full range ``[lo, hi]`` has variance ``E[(c - lo)(hi - c)]``, larger than the variance
of ``c`` itself), so each step looks ahead over several bits at once: the allocation follows the
lower convex hull of each ``D[k, .]``.

Distortion tables (mean squared error per coefficient, in the coefficient's units):

* :func:`dither_distortion`: subtractive dither, ``Delta_b^2 / 12`` exactly (Gray & Stockham 1993).
* :func:`rounding_distortion`: stochastic rounding, ``Delta_b^2 f (1 - f)`` averaged over samples
  (``f`` the fractional part of ``(c - lo) / Delta_b``), measured on the fitted coefficients.

Column ``b = 0`` is the distortion of sending nothing: ``E[c_k^2]`` for centred coefficients decoded
as 0.
"""

from __future__ import annotations

import numpy as np


def _steps(lo: np.ndarray, hi: np.ndarray, max_width: int) -> np.ndarray:
    """``Delta[k, b] = (hi_k - lo_k) / (2^b - 1)`` for b = 1..max_width, shape (K, max_width)."""
    levels = (1 << np.arange(1, max_width + 1)) - 1
    return (hi - lo)[:, None] / levels[None, :]


def dither_distortion(coefficients: np.ndarray, lo, hi, max_width: int) -> np.ndarray:
    """``D[k, b]``, b = 0..max_width, for subtractive dither on ``[lo_k, hi_k]``: ``Delta^2 / 12``.

    Args:
      coefficients: (m, K) centred coefficients of the fitted data (column 0 is their mean square).
      lo, hi: (K,) per-coefficient ranges.
      max_width: largest width considered.
    """
    c = np.asarray(coefficients, np.float64)
    d0 = np.mean(c * c, axis=0)
    delta = _steps(np.asarray(lo, np.float64), np.asarray(hi, np.float64), max_width)
    return np.concatenate([d0[:, None], delta**2 / 12.0], axis=1)


def rounding_distortion(coefficients: np.ndarray, lo, hi, max_width: int) -> np.ndarray:
    """``D[k, b]``, b = 0..max_width, for stochastic rounding on ``[lo_k, hi_k]``, measured on the rows.

    ``D[k, b] = mean_j Delta^2 f_jk (1 - f_jk)``, the exact expected squared error of stochastic rounding
    of the given coefficients (values outside the range are clipped first, as the codec does).
    """
    c = np.asarray(coefficients, np.float64)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    d = np.empty((c.shape[1], max_width + 1))
    d[:, 0] = np.mean(c * c, axis=0)
    delta = _steps(lo, hi, max_width)
    clipped = np.clip(c, lo, hi) - lo
    for b in range(1, max_width + 1):
        step = np.where(delta[:, b - 1] > 0, delta[:, b - 1], 1.0)
        u = clipped / step
        f = u - np.floor(u)
        d[:, b] = np.mean(f * (1.0 - f), axis=0) * delta[:, b - 1] ** 2
    return d


def allocate_bits(distortion: np.ndarray, budget: int) -> np.ndarray:
    """Integer widths ``b_k`` with ``sum_k b_k <= budget`` that greedily minimize ``sum_k D[k, b_k]``.

    Args:
      distortion: (K, W + 1) table, ``D[k, b]`` the distortion of coefficient k at b bits.
      budget: bits per sample to spend, a non-negative integer.

    Returns:
      (K,) int64 widths in 0..W. Bits are spent while some step lowers the distortion; a budget
      larger than needed leaves bits unspent (every coefficient at W bits, or no gain left).
    """
    d = np.asarray(distortion, np.float64)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"distortion must be a (K, W + 1) table with W >= 1, got shape {d.shape}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget must be a non-negative integer (bits per sample), got {budget!r}")
    k_count, top = d.shape[0], d.shape[1] - 1
    widths = np.zeros(k_count, np.int64)
    rows = np.arange(k_count)
    jumps = np.arange(1, top + 1)
    left = int(budget)
    while left > 0:
        target = widths[:, None] + jumps[None, :]
        valid = (target <= top) & (jumps[None, :] <= left)
        gain = d[rows, widths][:, None] - d[rows[:, None], np.minimum(target, top)]
        slope = np.where(valid, gain / jumps[None, :], -np.inf)
        k, j = np.unravel_index(np.argmax(slope), slope.shape)
        if not slope[k, j] > 0:
            break
        widths[k] += j + 1
        left -= j + 1
    return widths
