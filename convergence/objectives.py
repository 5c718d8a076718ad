"""Synthetic objectives with their constants computed from the data, not assumed (DESIGN.md section 6).

Every objective is a finite sum F(w) = (1/N) sum_i f(w; x_i, y_i) over a synthetic dataset (labelled
synthetic wherever reported) with samples x_i in the box [lo, hi]^n, so that the qdata estimator runs on
it unchanged: the node quantizes the n-dimensional x, the learner holds w in R^d. Data dimension n and
model dimension d are set independently by a feature map phi: R^n -> R^d that is part of the *model*
(computed wherever f is evaluated, i.e. on the learner and, for the correction, on the node), so the
node still sends the n-dimensional x:

* :func:`identity_features`: phi(x) = x, d = n;
* :func:`random_features`: phi(x) = sqrt(2/d) cos(W x + c) with W ~ N(0, s^2), c ~ U[0, 2 pi)
  (Rahimi & Recht 2007), any d.

Objectives (factories return an :class:`Objective`):

==========================  =====================================================  ==================
:func:`least_squares`        f = (w^T phi(x) - t)^2 / 2                             convex (mu >= 0)
:func:`ridge`                least squares + (lam/2) ||w||^2                         strongly convex
:func:`logistic_regression`  f = log(1 + exp(-t w^T phi(x))) (+ (lam/2) ||w||^2)    convex
:func:`sigmoid_classifier`   f = sigma(-t w^T phi(x)), the sigmoid (0-1 surrogate) loss  non-convex
:func:`tanh_network`         f = log(1 + exp(-t (v^T tanh(A x + c) + e)))           non-convex
==========================  =====================================================  ==================

with t = 2 y - 1 in {-1, +1} for integer labels y in {0, 1} (the qdata estimator sends labels as
integers, ceil(log2 C) bits), or t = y for real targets (``targets="real"``, least squares and
ridge; the qdata estimator, built with ``num_classes=None``, sends each as an fp32 value).

The constants every bound needs, each with the method used recorded in ``Objective.info['methods']``:

* L (smoothness of F): GLMs: sup|l''| * lambda_max(Phi^T Phi / N) + lam, from the eigenvalues of the
  data covariance in feature space (exact for least squares; for logistic regression
  lambda_max(Phi^T Phi)/(4N) + lam). Tanh network: max over many points of the Hessian's spectral norm,
  by power iteration with Hessian-vector products, times a stated safety factor (an estimate).
* mu: lambda_min(Phi^T Phi / N) + lam for (ridge) least squares, lam for regularized logistic
  regression, 0 otherwise.
* w*, F*: a direct solve (least squares, ridge) or a float64 Newton solve (logistic regression),
  all in numpy float64; F_inf = 0 for the non-convex objectives (their losses are >= 0).
* L_x, the data-Lipschitz constant: sup_{w in W, x in [lo, hi]^n} ||d grad_w f(w; x, y) / dx||_op over
  the *region* W (a ball the iterates must stay in, checked by :mod:`convergence.check`): a certified
  closed-form upper bound for the GLMs; for the tanh network the sup estimated by sampling, times a
  safety factor (its certified chain-rule bound is recorded too, but is ~10x looser).
* L_xx, the second-order data constant (GLMs, certified): it bounds the quantization bias of an
  unbiased quantizer at second order in Delta (:func:`convergence.bounds.quantizer_bias`).
* The sampling variance V(w) = (1/N) sum_i ||grad f_i(w) - grad F(w)||^2: measured exactly at the
  region's centre (w* for convex objectives) and extended to the whole region by a certified
  Lipschitz argument (GLMs), or estimated as a maximum over probe points times a safety factor.

All constant computations run in numpy float64 on the float32 data that the runs use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TARGETS = ("binary", "real")
KINDS = ("strongly_convex", "convex", "nonconvex")

# sup |sigma''(m)| = 1 / (6 sqrt 3), attained at sigma(m) = (3 +- sqrt 3) / 6.
_SIGMOID_D2 = 1.0 / (6.0 * math.sqrt(3.0))
# sup |tanh''(z)| = 4 / (3 sqrt 3), attained at tanh(z) = +-1/sqrt 3.
_TANH_D2 = 4.0 / (3.0 * math.sqrt(3.0))


# ----------------------------------------------------------------------------------------------
# Feature maps.


class FeatureMap(NamedTuple):
    """phi: R^n -> R^d with the sup-constants over the data box that L_x needs.

    Attributes:
      name: "identity" or "random".
      n, d: data and model dimensions.
      apply: jax ``(b, n) -> (b, d)`` in float32.
      apply64: numpy ``(b, n) -> (b, d)`` in float64 (same parameters).
      phi_max: sup_{x in [lo, hi]^n} ||phi(x)||_2.
      jac_max: sup_{x in [lo, hi]^n} ||d phi / dx||_op.
      info: how phi_max and jac_max were obtained.
      hess_max: sup over x in the box and unit u of ||d^2 phi(x)[u, u]||_2.
    """

    name: str
    n: int
    d: int
    apply: Callable
    apply64: Callable
    phi_max: float
    jac_max: float
    info: str
    hess_max: float = 0.0


def _check_box(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"the data range needs finite lo < hi, got lo={lo}, hi={hi}")
    return lo, hi


def _check_dim(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def identity_features(n: int, lo: float = -1.0, hi: float = 1.0) -> FeatureMap:
    """phi(x) = x (d = n): ||phi(x)|| <= sqrt(n) max(|lo|, |hi|), d phi/dx = I."""
    n = _check_dim(n, "n")
    lo, hi = _check_box(lo, hi)
    xmax = max(abs(lo), abs(hi))
    return FeatureMap("identity", n, n, lambda x: x, lambda x: np.asarray(x, np.float64),
                      math.sqrt(n) * xmax, 1.0, "phi_max = sqrt(n) max(|lo|,|hi|); jac_max = 1 (exact); hess_max = 0",
                      0.0)


def random_features(n: int, d: int, *, seed: int = 0, scale: float = 1.0) -> FeatureMap:
    """Random Fourier features phi(x) = sqrt(2/d) cos(W x + c) (Rahimi & Recht 2007).

    W has i.i.d. N(0, scale^2) entries (d x n) and c ~ U[0, 2 pi)^d, fixed by ``seed``. Certified
    constants: ||phi(x)||^2 = (2/d) sum cos^2 <= 2 for every x, and
    d phi/dx = -sqrt(2/d) diag(sin(W x + c)) W, so ||d phi/dx||_op <= sqrt(2/d) ||W||_op, with
    ||W||_op computed exactly (SVD). Both are independent of the box and, up to ||W||_op/sqrt(d) ->
    scale (1 + sqrt(n/d)), of d: lifting d does not change L, L_x (module docstring). Second
    derivative: d^2 phi[u, u] = -sqrt(2/d) cos(W x + c) (W u)^2, of norm <= sqrt(2/d) ||W u||_4^2
    <= sqrt(2/d) ||W||_op^2.
    """
    n = _check_dim(n, "n")
    d = _check_dim(d, "d")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, scale, size=(d, n)).astype(np.float32)
    c = rng.uniform(0.0, 2 * math.pi, size=(d,)).astype(np.float32)
    w64, c64 = w.astype(np.float64), c.astype(np.float64)
    amp = math.sqrt(2.0 / d)
    w_j, c_j = jnp.asarray(w), jnp.asarray(c)

    def apply(x):
        return jnp.float32(amp) * jnp.cos(x @ w_j.T + c_j)

    def apply64(x):
        return amp * np.cos(np.asarray(x, np.float64) @ w64.T + c64)

    w_op = float(np.linalg.norm(w64, 2))
    return FeatureMap("random", n, d, apply, apply64, math.sqrt(2.0), amp * w_op,
                      "phi_max = sqrt(2) (||phi||^2 = (2/d) sum cos^2); jac_max = sqrt(2/d) ||W||_op (exact SVD); "
                      "hess_max = sqrt(2/d) ||W||_op^2", amp * w_op**2)


# ----------------------------------------------------------------------------------------------
# The objective record.


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """A synthetic finite-sum objective with its constants.

    Attributes:
      name: short name used in reports.
      kind: which bound applies: "strongly_convex", "convex" or "nonconvex".
      loss_fn: jax ``(w, x, y) -> (b,)`` per-sample losses f(w; x_j, y_j), float32; w is a flat (d,).
      x: (N, n) float32 samples in [lo, hi]^n.
      y: (N,) int32 labels in {0, 1} (num_classes = 2) or float32 targets (num_classes None).
      num_classes: C for the label ledger, or None for real targets.
      lo, hi: the data range (also the quantizer's range).
      w0: (d,) float32 starting point.
      L, mu: smoothness and strong convexity of F.
      L_x: data-Lipschitz constant over the region (certified upper bound).
      L_xx: certified bound on sup ||d^2 grad_w f / dx^2|| (as a bilinear map) over the region and the
        box, or None. With an unbiased quantizer it bounds the quantization bias at second order:
        ||E grad f(w; Q(x)) - grad f(w; x)|| <= (L_xx / 2) E||Q(x) - x||^2 <= L_xx n Delta^2 / 8.
      F0: F(w0). F_star: min F (convex objectives) or None. F_inf: a lower bound on F.
      w_star: the minimizer (convex objectives) or None.
      center, radius: the region W = {w : ||w - center|| <= radius} over which L_x, the variance and
        the gradient bound hold; the checker verifies that every iterate stays in it.
      variance_sup: sup_{w in W} V(w), V(w) = (1/N) sum_i ||grad f_i(w) - grad F(w)||^2.
      grad_sup: sup_{w in W} ||grad F(w)|| (for compressors applied to the gradient itself).
      full_loss: numpy float64 F(w).
      full_grad: numpy float64 grad F(w).
      info: descriptive fields and ``info['methods']``, how each constant was obtained.
    """

    name: str
    kind: str
    loss_fn: Callable
    x: np.ndarray
    y: np.ndarray
    num_classes: int | None
    lo: float
    hi: float
    w0: np.ndarray
    L: float
    mu: float
    L_x: float
    L_xx: float | None
    F0: float
    F_star: float | None
    F_inf: float
    w_star: np.ndarray | None
    center: np.ndarray
    radius: float
    variance_sup: float
    grad_sup: float
    full_loss: Callable[[np.ndarray], float]
    full_grad: Callable[[np.ndarray], np.ndarray]
    info: dict

    @property
    def n(self) -> int:
        return int(self.x.shape[1])

    @property
    def d(self) -> int:
        return int(self.w0.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def D0(self) -> float:
        """||w0 - w*||^2 (convex objectives)."""
        if self.w_star is None:
            raise ValueError(f"objective {self.name} has no minimizer w*")
        return float(np.sum((self.w0.astype(np.float64) - self.w_star) ** 2))

    def constants(self) -> dict:
        """The constants as plain floats (for the JSON report)."""
        out = {k: getattr(self, k) for k in ("L", "mu", "L_x", "L_xx", "F0", "F_star", "F_inf", "radius",
                                             "variance_sup", "grad_sup")}
        out.update(n=self.n, d=self.d, N=self.num_samples, kind=self.kind, lo=self.lo, hi=self.hi)
        if self.w_star is not None:
            out["D0"] = self.D0
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}

    def describe(self) -> str:
        return (f"{self.name} (synthetic, N={self.num_samples}, n={self.n}, d={self.d}, "
                f"{self.info.get('features', '')})")


# ----------------------------------------------------------------------------------------------
# Helpers.


def _gram_eigs(phi: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(lambda_max, lambda_min) of (1/N) sum_i w_i phi_i phi_i^T, via the smaller Gram matrix.

    lambda_min is 0 when d > N (rank deficient).
    """
    nsamp, d = phi.shape
    a = phi if weights is None else phi * np.sqrt(weights)[:, None]
    if d <= nsamp:
        eig = np.linalg.eigvalsh(a.T @ a / nsamp)
        return float(eig[-1]), float(max(eig[0], 0.0))
    eig = np.linalg.eigvalsh(a @ a.T / nsamp)
    return float(eig[-1]), 0.0


def _targets(y: np.ndarray, targets: str) -> np.ndarray:
    return (2.0 * y - 1.0) if targets == "binary" else y.astype(np.float64)


def _check_common(num_samples, lam, targets=None):
    num_samples = _check_dim(num_samples, "num_samples")
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if targets is not None and targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    return num_samples, lam


def _uniform_box(rng, num_samples, n, lo, hi) -> np.ndarray:
    return rng.uniform(lo, hi, size=(num_samples, n)).astype(np.float32)


def _probe_points(center: np.ndarray, radius: float, count: int, seed: int) -> np.ndarray:
    """``count`` points of the ball B(center, radius): half on the sphere, half at uniform radii."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(count, center.shape[0]))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = np.where(np.arange(count) % 2 == 0, 1.0, rng.uniform(0.0, 1.0, count)) * radius
    return center[None, :] + r[:, None] * u


# ----------------------------------------------------------------------------------------------
# Generalized linear models: f(w; x, y) = l(w^T phi(x), t) + (lam/2) ||w||^2.


class Link(NamedTuple):
    """A scalar loss l(p, t) of the prediction p = w^T phi(x) and its derivative bounds.

    d1_sup(p_max, t_max): sup |dl/dp| over |p| <= p_max, |t| <= t_max; d2_sup: sup |d2l/dp2|;
    d1_global: sup over all p (inf if unbounded).
    """

    name: str
    loss: Callable  # jax
    loss64: Callable  # numpy
    d1_64: Callable  # numpy dl/dp
    d2_64: Callable  # numpy d2l/dp2
    d1_sup: Callable[[float, float], float]
    d2_sup: float
    d1_global: float
    d3_sup: float  # sup |l'''| for |t| <= 1


def _sigmoid64(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


SQUARE = Link(
    "square",
    lambda p, t: 0.5 * jnp.square(p - t),
    lambda p, t: 0.5 * (p - t) ** 2,
    lambda p, t: p - t,
    lambda p, t: np.ones_like(p),
    lambda pmax, tmax: pmax + tmax,
    1.0,
    math.inf,
    0.0,
)
LOGISTIC = Link(
    "logistic",
    lambda p, t: jax.nn.softplus(-t * p),
    lambda p, t: np.logaddexp(0.0, -t * p),
    lambda p, t: -t * _sigmoid64(-t * p),
    lambda p, t: _sigmoid64(t * p) * _sigmoid64(-t * p),
    lambda pmax, tmax: tmax * float(_sigmoid64(pmax * tmax)),
    0.25,
    1.0,
    _SIGMOID_D2,  # l''' = t^3 s (1 - s)(1 - 2 s), s = sigma(t p)
)
SIGMOID = Link(
    "sigmoid",
    lambda p, t: jax.nn.sigmoid(-t * p),
    lambda p, t: _sigmoid64(-t * p),
    lambda p, t: -t * _sigmoid64(-t * p) * _sigmoid64(t * p),
    # d2/dp2 sigma(-t p) = t^2 sigma''(-t p), sigma'' = s (1 - s) (1 - 2 s).
    lambda p, t: (t**2) * (lambda s: s * (1 - s) * (1 - 2 * s))(_sigmoid64(-t * p)),
    lambda pmax, tmax: 0.25 * tmax,
    _SIGMOID_D2,
    0.25,
    0.125,  # |sigma'''| = |s (1 - s)(1 - 6 s + 6 s^2)| <= 1/8, at s = 1/2
)


def _glm_loss_fn(link: Link, features: FeatureMap, lam: float, targets: str):
    def loss_fn(w, x, y):
        t = (2.0 * y.astype(jnp.float32) - 1.0) if targets == "binary" else y.astype(jnp.float32)
        p = features.apply(x.astype(jnp.float32)) @ w
        out = link.loss(p, t)
        if lam > 0:
            out = out + 0.5 * lam * jnp.sum(jnp.square(w))
        return out

    return loss_fn


def _newton(loss_grad_hess, w0: np.ndarray, tol: float = 1e-12, max_iter: int = 200) -> tuple[np.ndarray, int]:
    """Damped Newton with backtracking in float64; returns (w, iterations). Raises if not converged."""
    w = w0.copy()
    for it in range(max_iter):
        f, g, h = loss_grad_hess(w)
        if np.linalg.norm(g) <= tol:
            return w, it
        step = np.linalg.solve(h + 1e-300 * np.eye(len(w)), g)
        alpha = 1.0
        while alpha > 1e-12:
            f_new = loss_grad_hess(w - alpha * step, value_only=True)
            if f_new <= f - 0.25 * alpha * float(g @ step):
                break
            alpha *= 0.5
        w = w - alpha * step
    f, g, h = loss_grad_hess(w)
    if np.linalg.norm(g) > 1e-9:
        raise RuntimeError(f"Newton did not converge: ||grad F|| = {np.linalg.norm(g):.3e}")
    return w, max_iter


def _glm_full_loss_grad(link: Link, phi: np.ndarray, t: np.ndarray, lam: float):
    """F(w) = (1/N) sum_i l(w^T phi_i, t_i) + (lam/2) ||w||^2 and its gradient, numpy float64.

    Returns:
      ``(full_loss, full_grad)``: w -> F(w) (a float) and w -> grad F(w) = (1/N) Phi^T l'(Phi w) + lam w.
    """
    nsamp = phi.shape[0]

    def full_loss(w):
        w = np.asarray(w, np.float64)
        return float(np.mean(link.loss64(phi @ w, t)) + 0.5 * lam * w @ w)

    def full_grad(w):
        w = np.asarray(w, np.float64)
        return phi.T @ link.d1_64(phi @ w, t) / nsamp + lam * w

    return full_loss, full_grad


def _glm_curvature(kind: str, link: Link, lmax: float, lmin: float, lam: float) -> tuple[float, float, dict]:
    """L = sup|l''| lambda_max + lam and mu (lambda_min + lam for least squares, lam for the logistic
    loss, 0 non-convex), lambda_max, lambda_min those of Phi^T Phi / N.

    Returns:
      ``(L, mu, methods)``, methods the ``"L"`` and ``"mu"`` entries of ``info['methods']``.
    """
    L = link.d2_sup * lmax + lam
    methods = {"L": f"sup|l''| * lambda_max(Phi^T Phi / N) + lam = {link.d2_sup:.6g} * {lmax:.6g} + {lam:g} "
                    "(eigenvalues of the feature covariance, float64)"}
    if kind == "nonconvex":
        mu = 0.0
        methods["mu"] = "non-convex: none"
    elif link is SQUARE:
        mu = lmin + lam
        methods["mu"] = f"lambda_min(Phi^T Phi / N) + lam = {lmin:.6g} + {lam:g}"
    else:
        mu = lam
        methods["mu"] = "lam (the logistic loss alone is not strongly convex globally)"
    return L, mu, methods


def _glm_minimizer(link: Link, phi: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, str]:
    """w* = argmin F, float64: the normal equations (least squares, in the smaller of the primal and
    dual forms when lam > 0) or damped Newton (:func:`_newton`, logistic regression).

    Returns:
      ``(w_star, method)``, method the ``"w_star"`` entry of ``info['methods']``.
    """
    nsamp, d = phi.shape
    if link is SQUARE:
        if lam > 0 and d > nsamp:
            alpha = np.linalg.solve(phi @ phi.T / nsamp + lam * np.eye(nsamp), t / nsamp)
            w_star = phi.T @ alpha
        elif lam > 0:
            w_star = np.linalg.solve(phi.T @ phi / nsamp + lam * np.eye(d), phi.T @ t / nsamp)
        else:
            w_star = np.linalg.lstsq(phi, t, rcond=None)[0]
        return w_star, "direct solve of the normal equations (float64)"
    if d > 2000:
        raise ValueError(f"logistic regression solves for w* by Newton's method; d={d} > 2000 is too large")

    def lgh(w, value_only=False):
        p = phi @ w
        f = float(np.mean(link.loss64(p, t)) + 0.5 * lam * w @ w)
        if value_only:
            return f
        g = phi.T @ link.d1_64(p, t) / nsamp + lam * w
        h = (phi * link.d2_64(p, t)[:, None]).T @ phi / nsamp + lam * np.eye(d)
        return f, g, h

    w_star, iters = _newton(lgh, np.zeros(d))
    return w_star, f"damped Newton in float64, ||grad F(w*)|| <= 1e-12 after {iters} steps"


def _glm_region(w0: np.ndarray, w_star: np.ndarray | None, radius: float | None,
                region_factor: float) -> tuple[np.ndarray, float, str]:
    """The region W = B(center, radius): around w* (convex; radius region_factor ||w0 - w*|| unless
    given), or around w0 with the given radius (non-convex, ``w_star`` None).

    Returns:
      ``(center, radius, method)``, method the ``"region"`` entry of ``info['methods']``.
    """
    if w_star is not None:
        center = w_star
        if radius is None:
            radius = region_factor * float(np.linalg.norm(w0 - w_star))
            method = f"ball around w* of radius {region_factor:g} ||w0 - w*|| = {radius:.4g}"
        else:
            radius = float(radius)
            method = f"ball around w* of radius {radius:g} (given)"
    else:
        center = w0.astype(np.float64)
        if radius is None:
            raise ValueError("a non-convex objective needs an explicit region radius")
        method = f"ball around w0 of radius {radius:g} (given)"
    if not radius > 0:
        raise ValueError(f"the region radius must be positive, got {radius}")
    return center, radius, method


def _glm_data_lipschitz(link: Link, features: FeatureMap, t: np.ndarray, center: np.ndarray,
                        radius: float) -> tuple[float, float | None, dict]:
    """The certified data constants L_x >= sup ||d grad_w f / dx||_op and L_xx over W and the box.

    d grad_w f / dx = l''(p) phi (J^T w)^T + l'(p) J (the ridge term does not depend on x), with
    ||w|| <= R_w = ||center|| + radius and |p| <= phi_max R_w. L_xx needs |t| <= 1 or the square loss.

    Returns:
      ``(L_x, L_xx, methods)``, L_xx None where not available, methods their ``info['methods']`` entries.
    """
    r_w = float(np.linalg.norm(center)) + radius
    t_max = float(np.max(np.abs(t)))
    p_max = features.phi_max * r_w
    d1 = link.d1_sup(p_max, t_max)
    L_x = link.d2_sup * features.phi_max * features.jac_max * r_w + d1 * features.jac_max
    methods = {"L_x": (f"certified: sup|l''| phi_max jac_max R_w + sup|l'| jac_max with R_w = ||center|| + radius "
                       f"= {r_w:.4g}, phi_max = {features.phi_max:.4g}, jac_max = {features.jac_max:.4g}, "
                       f"sup|l'| = {d1:.4g} over |p| <= phi_max R_w")}

    # L_xx: d^2 [l'(p) phi][u, u] = l''' (Dp u)^2 phi + l'' (D^2 p[u, u]) phi + 2 l'' (Dp u) (Dphi u)
    # + l'(p) D^2 phi[u, u], with |Dp u| <= R_w jac_max and |D^2 p[u, u]| <= R_w hess_max.
    if t_max <= 1.0 or link is SQUARE:
        jm, hm, pm = features.jac_max, features.hess_max, features.phi_max
        L_xx = (link.d3_sup * (r_w * jm) ** 2 * pm + link.d2_sup * r_w * hm * pm + 2 * link.d2_sup * r_w * jm**2
                + d1 * hm)
        methods["L_xx"] = ("certified: sup|l'''| (R_w jac_max)^2 phi_max + sup|l''| R_w hess_max phi_max "
                           f"+ 2 sup|l''| R_w jac_max^2 + sup|l'| hess_max = {L_xx:.4g}")
    else:
        L_xx = None
        methods["L_xx"] = "not available (targets beyond [-1, 1])"
    return L_x, L_xx, methods


def _glm_variance_sup(link: Link, phi: np.ndarray, t: np.ndarray, center: np.ndarray,
                      radius: float) -> tuple[float, float, str]:
    """A certified sup over W of the sampling variance V(w) = (1/N) sum_i ||h_i(w) - mean h||^2 of the
    data-part gradients h_i(w) = l'(w^T phi_i) phi_i.

    sqrt V(w) <= sqrt V(c) + L_var ||w - c|| with L_var^2 = sup|l''|^2 lambda_max((1/N) sum ||phi_i||^2
    phi_i phi_i^T), since ||h_i(w) - h_i(c)|| <= sup|l''| |phi_i^T (w - c)| ||phi_i|| and subtracting the
    mean only lowers the second moment; also V <= sup|l'|^2 mean ||phi||^2.

    Returns:
      ``(variance_sup, V(center), method)``, method the ``"variance_sup"`` entry of ``info['methods']``.
    """
    h_c = link.d1_64(phi @ center, t)[:, None] * phi
    v_center = float(np.mean(np.sum((h_c - h_c.mean(0)) ** 2, axis=1)))
    sq_norms = np.sum(phi**2, axis=1)
    l_var = link.d2_sup * math.sqrt(_gram_eigs(phi, sq_norms)[0])
    v_growth = (math.sqrt(v_center) + l_var * radius) ** 2
    v_global = link.d1_global**2 * float(np.mean(sq_norms))
    method = (f"certified: min[(sqrt V(center) + L_var R)^2, sup|l'|^2 mean||phi||^2] = "
              f"min({v_growth:.4g}, {v_global:.4g}); V(center) = {v_center:.4g} measured exactly, "
              f"L_var = {l_var:.4g}")
    return min(v_growth, v_global), v_center, method


def _glm_grad_sup(kind: str, link: Link, phi: np.ndarray, L: float, lam: float, center: np.ndarray,
                  radius: float) -> tuple[float, str]:
    """sup_{w in W} ||grad F(w)||: L radius (convex, grad F(w*) = 0), else sup|l'| sqrt(mean ||phi||^2)
    + lam R_w with R_w = ||center|| + radius.

    Returns:
      ``(grad_sup, method)``, method the ``"grad_sup"`` entry of ``info['methods']``.
    """
    if kind != "nonconvex":
        return L * radius, "L * radius (grad F(w*) = 0)"
    r_w = float(np.linalg.norm(center)) + radius
    sq_norms = np.sum(phi**2, axis=1)
    return (link.d1_global * math.sqrt(float(np.mean(sq_norms))) + lam * r_w,
            "sup|l'| sqrt(mean ||phi||^2) + lam R_w")


def _glm(
    name: str,
    kind: str,
    link: Link,
    features: FeatureMap,
    x: np.ndarray,
    y: np.ndarray,
    *,
    lam: float,
    targets: str,
    lo: float,
    hi: float,
    w0: np.ndarray,
    region_factor: float,
    radius: float | None,
    extra_info: dict,
) -> Objective:
    """Assemble a GLM objective f(w; x, y) = l(w^T phi(x), t) + (lam/2) ||w||^2 and compute all its
    constants in float64 (see module docstring), each with how it was obtained in ``info['methods']``."""
    phi = features.apply64(x.astype(np.float64))
    d = phi.shape[1]
    t = _targets(y, targets)
    full_loss, full_grad = _glm_full_loss_grad(link, phi, t, lam)
    lmax, lmin = _gram_eigs(phi)
    L, mu, methods = _glm_curvature(kind, link, lmax, lmin, lam)
    w_star = F_star = None
    if kind != "nonconvex":
        w_star, methods["w_star"] = _glm_minimizer(link, phi, t, lam)
        F_star = full_loss(w_star)
        methods["F_star"] = "F(w*) in float64"
        extra_info = dict(extra_info, grad_norm_at_w_star=float(np.linalg.norm(full_grad(w_star))))
    center, radius, methods["region"] = _glm_region(w0, w_star, radius, region_factor)
    L_x, L_xx, data_methods = _glm_data_lipschitz(link, features, t, center, radius)
    methods.update(data_methods)
    variance_sup, v_center, methods["variance_sup"] = _glm_variance_sup(link, phi, t, center, radius)
    grad_sup, methods["grad_sup"] = _glm_grad_sup(kind, link, phi, L, lam, center, radius)
    info = dict(extra_info, methods=methods, link=link.name, lam=lam, targets=targets,
                features=f"{features.name} features d={d}", feature_info=features.info,
                V_center=v_center, lambda_max=lmax, lambda_min=lmin)
    return Objective(
        name=name, kind=kind, loss_fn=_glm_loss_fn(link, features, lam, targets), x=x, y=y,
        num_classes=2 if targets == "binary" else None, lo=lo, hi=hi, w0=w0.astype(np.float32), L=L, mu=mu,
        L_x=L_x, L_xx=L_xx, F0=full_loss(w0), F_star=F_star, F_inf=F_star if F_star is not None else 0.0,
        w_star=w_star, center=np.asarray(center, np.float64), radius=radius, variance_sup=variance_sup,
        grad_sup=grad_sup, full_loss=full_loss, full_grad=full_grad, info=info,
    )


def _make_features(n, d, features, lo, hi, seed, scale):
    if features == "identity":
        if d is not None and d != n:
            raise ValueError(f"identity features need d == n, got n={n}, d={d}")
        return identity_features(n, lo, hi)
    if features == "random":
        return random_features(n, n if d is None else d, seed=seed + 1, scale=scale)
    raise ValueError(f"features must be 'identity' or 'random', got {features!r}")


def _linear_data(n, d, num_samples, features, lo, hi, seed, scale, teacher="features"):
    """x uniform in the box and a unit-variance teacher signal s_i.

    teacher="features": s = phi(x)^T w_true with w_true random in R^d; teacher="data": s = x^T u with u
    random in R^n, so that (x, s) and hence the labels do not depend on d (lifting d changes the model only).
    """
    lo, hi = _check_box(lo, hi)
    if teacher not in ("features", "data"):
        raise ValueError(f"teacher must be 'features' or 'data', got {teacher!r}")
    fmap = _make_features(n, d, features, lo, hi, seed, scale)
    rng = np.random.default_rng(seed)
    x = _uniform_box(rng, num_samples, n, lo, hi)
    if teacher == "data":
        u = rng.normal(size=n)
        signal = x.astype(np.float64) @ u
    else:
        w_true = rng.normal(size=fmap.d)
        signal = fmap.apply64(x.astype(np.float64)) @ w_true
    signal = (signal - np.mean(signal)) / np.std(signal) if teacher == "data" else signal / np.std(signal)
    return fmap, x, signal, rng


def least_squares(
    n: int = 10,
    d: int | None = None,
    *,
    num_samples: int = 512,
    features: str = "identity",
    targets: str = "binary",
    lam: float = 0.0,
    noise: float = 0.5,
    lo: float = -1.0,
    hi: float = 1.0,
    scale: float = 1.0,
    region_factor: float = 2.0,
    teacher: str = "features",
    seed: int = 0,
    name: str | None = None,
) -> Objective:
    """Least squares f(w; x, y) = (w^T phi(x) - t)^2 / 2 (+ (lam/2) ||w||^2), w0 = 0.

    Data (synthetic): x ~ U[lo, hi]^n; s = phi(x)^T w_true normalized to unit variance; real targets
    t = s + noise * N(0, 1) (float32, ``num_classes`` None: fp32 on the link); binary labels
    y = 1[s + noise * N(0, 1) > 0] with t = 2 y - 1 (least-squares classification, 1-bit labels).
    L = lambda_max + lam, mu = lambda_min + lam of (1/N) Phi^T Phi (+ lam I); w*, F* from the normal
    equations.

    Args:
      n: data dimension. d: model dimension (None: n for identity features).
      num_samples: N. features: "identity" or "random". targets: "binary" or "real".
      lam: ridge weight (0: plain least squares). noise: label noise level.
      lo, hi: data range. scale: random-feature bandwidth. region_factor: the region is the ball
        around w* of radius region_factor * ||w0 - w*||. teacher: "features" (a random linear teacher
        in feature space) or "data" (in data space: the same (x, y) for every d). seed: data seed.
    """
    num_samples, lam = _check_common(num_samples, lam, targets)
    if not region_factor > 0:
        raise ValueError(f"region_factor must be positive, got {region_factor}")
    fmap, x, signal, rng = _linear_data(n, d, num_samples, features, lo, hi, seed, scale, teacher)
    z = signal + noise * rng.normal(size=num_samples)
    y = (z > 0).astype(np.int32) if targets == "binary" else z.astype(np.float32)
    kind = "strongly_convex" if lam > 0 else "convex"
    default = "ridge" if lam > 0 else "least_squares"
    return _glm(name or default, kind, SQUARE, fmap, x, y, lam=lam, targets=targets, lo=float(lo), hi=float(hi),
                w0=np.zeros(fmap.d), region_factor=region_factor, radius=None,
                extra_info={"noise": noise, "seed": seed, "teacher": teacher})


def ridge(n: int = 10, d: int | None = None, *, lam: float = 0.05, **kwargs) -> Objective:
    """Ridge regression: :func:`least_squares` with lam > 0 (strongly convex, mu >= lam)."""
    if not float(lam) > 0:
        raise ValueError(f"ridge needs lam > 0, got {lam}")
    return least_squares(n, d, lam=lam, **kwargs)


def logistic_regression(
    n: int = 10,
    d: int | None = None,
    *,
    num_samples: int = 512,
    features: str = "identity",
    lam: float = 0.0,
    sharpness: float = 2.0,
    lo: float = -1.0,
    hi: float = 1.0,
    scale: float = 1.0,
    region_factor: float = 2.0,
    seed: int = 0,
    name: str | None = None,
) -> Objective:
    """Logistic regression f = log(1 + exp(-t w^T phi(x))) (+ (lam/2) ||w||^2), w0 = 0.

    Labels y ~ Bernoulli(sigma(sharpness * s)) with s the unit-variance teacher signal: not separable,
    so w* exists. L = lambda_max(Phi^T Phi)/(4N) + lam (certified: l'' <= 1/4); w*, F* by float64 Newton.
    Convex; with lam > 0 it is lam-strongly convex and reported as such.
    """
    num_samples, lam = _check_common(num_samples, lam)
    if not region_factor > 0:
        raise ValueError(f"region_factor must be positive, got {region_factor}")
    fmap, x, signal, rng = _linear_data(n, d, num_samples, features, lo, hi, seed, scale)
    y = (rng.uniform(size=num_samples) < _sigmoid64(sharpness * signal)).astype(np.int32)
    kind = "strongly_convex" if lam > 0 else "convex"
    return _glm(name or "logistic", kind, LOGISTIC, fmap, x, y, lam=lam, targets="binary", lo=float(lo),
                hi=float(hi), w0=np.zeros(fmap.d), region_factor=region_factor, radius=None,
                extra_info={"sharpness": sharpness, "seed": seed})


def sigmoid_classifier(
    n: int = 10,
    d: int | None = None,
    *,
    num_samples: int = 512,
    features: str = "identity",
    flip: float = 0.1,
    radius: float = 30.0,
    lo: float = -1.0,
    hi: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    name: str | None = None,
) -> Objective:
    """Linear classifier with the sigmoid loss f = sigma(-t w^T phi(x)) in [0, 1]: non-convex, w0 = 0.

    Certified constants: |l'| <= 1/4, |l''| <= 1/(6 sqrt 3), so L = lambda_max(Phi^T Phi / N) / (6 sqrt 3)
    holds globally; F_inf = 0 since f >= 0. Labels: the sign of the teacher signal, flipped with
    probability ``flip``. The region is the ball of radius ``radius`` around w0: the loss flattens as
    the margins grow, so SGD keeps growing ||w|| (to ~18 in 2^13 rounds of the default check); L_x
    and the quantization terms grow with the radius.
    """
    num_samples, _ = _check_common(num_samples, 0.0)
    if not 0.0 <= flip < 0.5:
        raise ValueError(f"flip must be in [0, 0.5), got {flip}")
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    fmap, x, signal, rng = _linear_data(n, d, num_samples, features, lo, hi, seed, scale)
    y = ((signal > 0) ^ (rng.uniform(size=num_samples) < flip)).astype(np.int32)
    return _glm(name or "sigmoid", "nonconvex", SIGMOID, fmap, x, y, lam=0.0, targets="binary", lo=float(lo),
                hi=float(hi), w0=np.zeros(fmap.d), region_factor=1.0, radius=radius,
                extra_info={"flip": flip, "seed": seed})


# ----------------------------------------------------------------------------------------------
# A small tanh network (non-convex, L estimated).


def power_iteration_smoothness(
    full_loss_jax: Callable[[Array], Array], points: np.ndarray, *, iters: int = 60, seed: int = 0
) -> np.ndarray:
    """||Hessian of F||_2 at each of ``points`` (M, d) by power iteration with Hessian-vector products.

    HVPs are forward-over-reverse (jax.jvp of jax.grad); ``iters`` iterations from a random start,
    returning ||H v|| for the final unit v (a lower estimate of the spectral norm that converges to it
    geometrically in the ratio of the top two eigenvalue magnitudes). Float32.
    """
    grad = jax.grad(full_loss_jax)

    def hvp(w, v):
        return jax.jvp(grad, (w,), (v,))[1]

    @jax.jit
    def norms(ws, v0):
        def one(w, v):
            def body(_, v):
                hv = hvp(w, v)
                return hv / (jnp.linalg.norm(hv) + 1e-30)

            v = jax.lax.fori_loop(0, iters, body, v / jnp.linalg.norm(v))
            return jnp.linalg.norm(hvp(w, v))

        return jax.vmap(one)(ws, v0)

    v0 = np.random.default_rng(seed).normal(size=points.shape).astype(np.float32)
    return np.asarray(norms(jnp.asarray(points, jnp.float32), jnp.asarray(v0)), np.float64)


class TanhShapes(NamedTuple):
    n: int
    hidden: int

    @property
    def d(self) -> int:
        return self.hidden * self.n + 2 * self.hidden + 1


def _tanh_unpack(w, shapes: TanhShapes, xp=jnp):
    h, n = shapes.hidden, shapes.n
    a = w[: h * n].reshape(h, n)
    c = w[h * n: h * n + h]
    v = w[h * n + h: h * n + 2 * h]
    e = w[h * n + 2 * h]
    return a, c, v, e


def _tanh_out64(w, xs: np.ndarray, shapes: TanhShapes) -> np.ndarray:
    """The network's output v^T tanh(A x + c) + e for each row of ``xs``, numpy float64."""
    a, c, v, e = _tanh_unpack(np.asarray(w, np.float64), shapes)
    return np.tanh(xs @ a.T + c) @ v + e


def _tanh_loss_fn(shapes: TanhShapes):
    """jax ``(w, x, y) -> (b,)``: f(w; x_j, y_j) = log(1 + exp(-t_j (v^T tanh(A x_j + c) + e))), t = 2 y - 1."""
    def loss_fn(w, xb, yb):
        a, c, v, e = _tanh_unpack(w, shapes)
        t = 2.0 * yb.astype(jnp.float32) - 1.0
        out = jnp.tanh(xb.astype(jnp.float32) @ a.T + c) @ v + e
        return jax.nn.softplus(-t * out)

    return loss_fn


def _tanh_data(shapes: TanhShapes, num_samples: int, flip: float, lo: float, hi: float,
               seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic data and start of :func:`tanh_network`, all from one generator seeded ``seed``.

    x ~ U[lo, hi]^n; labels y = 1[teacher(x) > 0] flipped with probability ``flip``, the teacher a
    random network of the same shape; w0: A ~ N(0, 1/n), v ~ N(0, 9/h), c = e = 0.

    Returns:
      ``(x, y, w0)``: (N, n) float32, (N,) int32, (d,) float32.
    """
    n, hidden, d = shapes.n, shapes.hidden, shapes.d
    rng = np.random.default_rng(seed)
    x = _uniform_box(rng, num_samples, n, lo, hi)
    teacher = rng.normal(size=d) * np.concatenate(
        [np.full(hidden * n, 2.0 / math.sqrt(n)), np.full(hidden, 0.5), np.full(hidden, 2.0), [0.0]])
    w0 = np.concatenate([rng.normal(size=hidden * n) / math.sqrt(n), np.zeros(hidden),
                         3.0 * rng.normal(size=hidden) / math.sqrt(hidden), [0.0]]).astype(np.float32)
    y = ((_tanh_out64(teacher, x.astype(np.float64), shapes) > 0)
         ^ (rng.uniform(size=num_samples) < flip)).astype(np.int32)
    return x, y, w0


def _tanh_full_loss(loss_fn, shapes: TanhShapes, x: np.ndarray, y: np.ndarray):
    """F(w) = (1/N) sum_i f(w; x_i, y_i) three ways: jax float32 (for Hessian-vector products), numpy
    float64, and grad F by float32 autodiff returned in float64.

    Returns:
      ``(full_loss_jax, full_loss, full_grad)``.
    """
    x64, t64 = x.astype(np.float64), 2.0 * y - 1.0
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def full_loss_jax(w):
        return jnp.mean(loss_fn(w, xj, yj))

    def full_loss(w):
        return float(np.mean(np.logaddexp(0.0, -t64 * _tanh_out64(w, x64, shapes))))

    grad_jit = jax.jit(jax.grad(full_loss_jax))

    def full_grad(w):
        return np.asarray(grad_jit(jnp.asarray(w, jnp.float32)), np.float64)

    return full_loss_jax, full_loss, full_grad


def _tanh_gradient_spread(loss_fn, xj: Array, yj: Array, probes_w: np.ndarray,
                          safety: float) -> tuple[float, float, list[float]]:
    """Estimated sup over the region of V(w) and of ||grad F(w)||: ``safety`` times their maximum over
    ``probes_w`` (V(w) = (1/N) sum_i ||grad f_i(w) - grad F(w)||^2 exact over the data at each point).

    Returns:
      ``(variance_sup, grad_sup, variances)``, the last V(w) at each probe point.
    """
    per_sample_grads = jax.jit(jax.vmap(jax.grad(lambda w, xi, yi: loss_fn(w, xi[None], yi[None])[0]),
                                        in_axes=(None, 0, 0)))
    variances, grads = [], []
    for w in probes_w:
        g = np.asarray(per_sample_grads(jnp.asarray(w, jnp.float32), xj, yj), np.float64)
        mean = g.mean(0)
        variances.append(float(np.mean(np.sum((g - mean) ** 2, axis=1))))
        grads.append(float(np.linalg.norm(mean)))
    return safety * max(variances), safety * max(grads), variances


class _TanhNorms(NamedTuple):
    """Bounds over the region: ||A||_F <= a_max, ||v|| <= v_max; over the box: ||x|| <= x_norm."""

    a_max: float
    v_max: float
    x_norm: float


def _tanh_lx_certified(shapes: TanhShapes, center: np.ndarray, radius: float, lo: float,
                       hi: float) -> tuple[float, _TanhNorms]:
    """The chain-rule bound on sup ||d grad_w f / dx||_op (see :func:`tanh_network`): per parameter
    block (v, e, c, A) with |sigma'| <= 1/4, |tanh'| <= 1, |tanh''| <= 4/(3 sqrt 3), ||A||_op <= ||A||_F,
    combined as the root sum of squares.

    Returns:
      ``(L_x certified, the norms it used)``.
    """
    a0, _, v0, _ = _tanh_unpack(center, shapes, np)
    a_max = float(np.linalg.norm(a0)) + radius
    v_max = float(np.linalg.norm(v0)) + radius
    x_norm = math.sqrt(shapes.n) * max(abs(lo), abs(hi))
    blocks = [
        a_max * (math.sqrt(shapes.hidden) * v_max / 4.0 + 1.0),
        a_max * v_max / 4.0,
        a_max * v_max**2 / 4.0 + _TANH_D2 * v_max * a_max,
        x_norm * (a_max * v_max**2 / 4.0 + _TANH_D2 * v_max * a_max) + v_max,
    ]
    return math.sqrt(sum(b * b for b in blocks)), _TanhNorms(a_max, v_max, x_norm)


def _tanh_lx_sampled(loss_fn, shapes: TanhShapes, center: np.ndarray, radius: float, lo: float, hi: float,
                     samples: int, seed: int) -> float:
    """max of the exact ||d grad_w f(w; x, y) / dx||_op (autodiff Jacobian, SVD) over ``samples``
    triples: w in the region, x in the box (half of them box corners), y in {0, 1}."""
    jac_x = jax.jit(jax.vmap(jax.jacfwd(jax.grad(lambda w, xi, yi: loss_fn(w, xi[None], yi[None])[0]), argnums=1)))
    lx_rng = np.random.default_rng(seed + 13)
    ws = _probe_points(center, radius, samples, seed + 17)
    xs = lx_rng.uniform(lo, hi, size=(samples, shapes.n))
    xs[::2] = np.where(lx_rng.uniform(size=xs[::2].shape) < 0.5, lo, hi)
    ys = lx_rng.integers(0, 2, samples).astype(np.int32)
    jacs = np.asarray(jac_x(jnp.asarray(ws, jnp.float32), jnp.asarray(xs, jnp.float32), jnp.asarray(ys)), np.float64)
    return float(np.max(np.linalg.norm(jacs, ord=2, axis=(1, 2))))


def _tanh_data_lipschitz(loss_fn, shapes: TanhShapes, center: np.ndarray, radius: float, lo: float, hi: float, *,
                         data_lipschitz: str, lx_samples: int, lx_safety: float,
                         seed: int) -> tuple[float, float, float, str]:
    """L_x of :func:`tanh_network`: the certified chain-rule bound, or ``lx_safety`` times the sampled sup.

    Returns:
      ``(L_x, certified bound, sampled max, method)``, method the ``"L_x"`` entry of ``info['methods']``.
    """
    lx_certified, norms = _tanh_lx_certified(shapes, center, radius, lo, hi)
    lx_seen = _tanh_lx_sampled(loss_fn, shapes, center, radius, lo, hi, lx_samples, seed)
    if data_lipschitz == "certified":
        method = (f"certified: chain rule per parameter block with ||A||_F <= {norms.a_max:.4g}, ||v|| <= "
                  f"{norms.v_max:.4g}, ||x|| <= {norms.x_norm:.4g} (see tanh_network docstring); the sampled sup is "
                  f"{lx_seen:.4g}")
        return lx_certified, lx_certified, lx_seen, method
    method = (f"estimated: {lx_safety:g} x max of ||d grad_w f / dx||_op over {lx_samples} pairs (w in the "
              f"region, x in the box, half at corners) = {lx_safety:g} x {lx_seen:.4g}; the certified "
              f"chain-rule bound is {lx_certified:.4g}")
    return lx_safety * lx_seen, lx_certified, lx_seen, method


def _check_tanh_args(num_samples, n, hidden, lo, hi, flip, safety, radius, data_lipschitz):
    """The validated (num_samples, n, hidden, lo, hi) of :func:`tanh_network`; raises on a bad argument."""
    num_samples, _ = _check_common(num_samples, 0.0)
    n = _check_dim(n, "n")
    hidden = _check_dim(hidden, "hidden")
    lo, hi = _check_box(lo, hi)
    if not 0.0 <= flip < 0.5:
        raise ValueError(f"flip must be in [0, 0.5), got {flip}")
    if not safety >= 1.0:
        raise ValueError(f"safety must be >= 1, got {safety}")
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if data_lipschitz not in ("estimated", "certified"):
        raise ValueError(f"data_lipschitz must be 'estimated' or 'certified', got {data_lipschitz!r}")
    return num_samples, n, hidden, lo, hi


def tanh_network(
    n: int = 10,
    hidden: int = 8,
    *,
    num_samples: int = 512,
    flip: float = 0.1,
    radius: float = 4.0,
    lo: float = -1.0,
    hi: float = 1.0,
    safety: float = 1.5,
    probes: int = 32,
    data_lipschitz: str = "estimated",
    lx_samples: int = 256,
    lx_safety: float = 2.0,
    seed: int = 0,
    name: str | None = None,
) -> Objective:
    """One-hidden-layer tanh network with the logistic loss: non-convex, d = hidden (n + 2) + 1.

    f(w; x, y) = log(1 + exp(-t (v^T tanh(A x + c) + e))) >= 0, so F_inf = 0. Labels from a teacher
    network of the same shape, flipped with probability ``flip``. w0: A ~ N(0, 1/n), v ~ N(0, 9/h),
    c = e = 0 (w = 0 is a saddle point; the larger v makes ||grad F(w0)|| large enough for the
    non-convex bound to say something over the whole T range). Region: the ball of radius ``radius``
    around w0.

    Constants:
      L: estimated: max over w0 and ``probes`` points of the region of ||Hessian F||_2 by power
        iteration with Hessian-vector products (:func:`power_iteration_smoothness`), times ``safety``.
      L_x: ``data_lipschitz="certified"``: from the chain rule with |sigma'| <= 1/4, |tanh'| <= 1,
        |tanh''| <= 4/(3 sqrt 3), ||A||_op <= ||A||_F and the region's bounds on ||A||_F, ||v||, per
        parameter block (v: ||A||(sqrt(h)||v||/4 + 1); e: ||A|| ||v||/4; c: ||A|| ||v||^2/4 +
        tanh''_max ||v|| ||A||; A: ||x|| (||A|| ||v||^2/4 + tanh''_max ||v|| ||A||) + ||v||), combined as
        the root sum of squares. It is valid but some 30x above the sup actually attained, which makes
        every qdata bound on the network vacuous; so the default ``"estimated"`` takes the sup itself,
        estimated as ``lx_safety`` times the maximum of the exact ||d grad_w f / dx||_op (autodiff
        Jacobian, SVD) over ``lx_samples`` pairs (w in the region, x in the box, half of them box
        corners). Both values are recorded in ``info``.
      variance_sup, grad_sup: estimated: max over the same probe points (exact over the data at each
        point), times ``safety``.
    """
    num_samples, n, hidden, lo, hi = _check_tanh_args(num_samples, n, hidden, lo, hi, flip, safety, radius,
                                                      data_lipschitz)
    shapes = TanhShapes(n, hidden)
    x, y, w0 = _tanh_data(shapes, num_samples, flip, lo, hi, seed)
    loss_fn = _tanh_loss_fn(shapes)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    full_loss_jax, full_loss, full_grad = _tanh_full_loss(loss_fn, shapes, x, y)
    center = w0.astype(np.float64)
    probes_w = np.concatenate([center[None], _probe_points(center, radius, probes, seed + 7)])
    hess = power_iteration_smoothness(full_loss_jax, probes_w, seed=seed + 11)
    L = safety * float(np.max(hess))
    variance_sup, grad_sup, variances = _tanh_gradient_spread(loss_fn, xj, yj, probes_w, safety)
    L_x, lx_certified, lx_seen, lx_method = _tanh_data_lipschitz(
        loss_fn, shapes, center, radius, lo, hi, data_lipschitz=data_lipschitz, lx_samples=lx_samples,
        lx_safety=lx_safety, seed=seed)
    methods = {
        "L": (f"estimated: {safety:g} x max ||Hessian F||_2 over w0 and {probes} points of the region "
              f"(power iteration, 60 HVPs each; max found {np.max(hess):.4g})"),
        "variance_sup": (f"estimated: {safety:g} x max of V(w) (exact over the data) over w0 and {probes} "
                         f"points of the region (max found {max(variances):.4g}; V(w0) = {variances[0]:.4g})"),
        "grad_sup": f"estimated: {safety:g} x max ||grad F|| over the same points",
        "L_x": lx_method,
        "region": f"ball around w0 of radius {radius:g} (given)",
        "L_xx": "not derived for the network: the quantization bias uses the first-order bound L_x E||Q(x) - x||",
    }
    info = {"methods": methods, "features": f"tanh network n={n} hidden={hidden}", "hidden": hidden,
            "L_x_certified": lx_certified, "L_x_sampled_max": lx_seen,
            "flip": flip, "seed": seed, "hessian_norms": [float(h) for h in hess[:5]]}
    return Objective(
        name=name or "tanh_net", kind="nonconvex", loss_fn=loss_fn, x=x, y=y, num_classes=2, lo=lo, hi=hi,
        w0=w0, L=L, mu=0.0, L_x=L_x, L_xx=None, F0=full_loss(w0), F_star=None, F_inf=0.0, w_star=None, center=center,
        radius=float(radius), variance_sup=variance_sup, grad_sup=grad_sup, full_loss=full_loss,
        full_grad=full_grad, info=info,
    )


def per_sample_variance(objective: Objective, w: np.ndarray) -> float:
    """V(w) = (1/N) sum_i ||grad f_i(w) - grad F(w)||^2, exact over the dataset (float32 autodiff)."""
    g = jax.vmap(jax.grad(lambda w, xi, yi: objective.loss_fn(w, xi[None], yi[None])[0]), in_axes=(None, 0, 0))(
        jnp.asarray(w, jnp.float32), jnp.asarray(objective.x), jnp.asarray(objective.y))
    g = np.asarray(g, np.float64)
    return float(np.mean(np.sum((g - g.mean(0)) ** 2, axis=1)))


def probe_points(objective: Objective, count: int, seed: int = 0) -> np.ndarray:
    """The region's centre, w0 and ``count`` points of the region (for estimated suprema)."""
    pts = [objective.center, objective.w0.astype(np.float64)]
    return np.concatenate([np.stack(pts), _probe_points(objective.center, objective.radius, count, seed)])
