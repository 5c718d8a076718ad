"""Rate bounds for SGD with an (un)biased gradient estimator, with exact constants (DESIGN.md section 6).

SGD: w_{t+1} = w_t - eta g_t with g_t = grad F(w_t) + beta_t + xi_t, where, conditionally on w_t,
E[xi_t] = 0, E||xi_t||^2 <= sigma^2 (uniformly over the region W the iterates stay in) and the bias
satisfies ||beta_t|| <= zeta (zeta = 0: unbiased). F is L-smooth; D0 = ||w_0 - w*||^2. All step sizes
below satisfy eta <= 1/(2L) (:func:`max_step`), the condition DESIGN.md states; every derivation only
needs eta <= 1/L.

Convex (:func:`convex_bound`), w_bar_T = (1/T) sum_{t=1..T} w_t:

    E F(w_bar_T) - F* <= D0 / (2 eta T) + eta sigma^2 + zeta R,     R = sup_t ||w_t - w*||.

  Derivation (the smooth stochastic case of Lan 2012, Math. Program. 133, "An optimal method for
  stochastic composite optimization", and Bubeck 2015, "Convex optimization: algorithms and
  complexity", Thm 6.3, here for constant eta): smoothness and convexity give
  F(w_{t+1}) - F* <= <grad F(w_t), w_{t+1} - w*> + (L/2) ||w_{t+1} - w_t||^2. Write
  grad F = g - beta - xi; the g-part equals (||w_t - w*||^2 - ||w_{t+1} - w*||^2 -
  ||w_{t+1} - w_t||^2) / (2 eta), whose last term cancels the L/2 term for eta <= 1/L;
  E<-xi_t, w_{t+1} - w*> = eta E||xi_t||^2 <= eta sigma^2; <-beta_t, w_{t+1} - w*> <= zeta R. Sum over
  t = 0..T-1, divide by T, apply Jensen. The bias term is the inexact-gradient term of d'Aspremont 2008
  (SIAM J. Optim. 19(3), "Smooth optimization with approximate gradient"): delta times the diameter.
  Tuned step: eta = min(1/(2L), sqrt(D0 / (2 sigma^2 T))), giving O(L D0 / T + sqrt(D0) sigma / sqrt(T)).

Strongly convex (:func:`strongly_convex_bound`), mu > 0:

    E||w_T - w*||^2 <= (1 - eta mu)^T D0 + eta sigma^2 / mu                       (zeta = 0)

  Derivation: for eta <= 1/L, ||w - eta grad F(w) - w*||^2 <= (1 - eta mu) ||w - w*||^2 (expand; use
  <grad F(w), w - w*> >= F(w) - F* + (mu/2) ||w - w*||^2 and ||grad F||^2 <= 2L (F - F*)); the noise
  adds eta^2 sigma^2 per step; unroll the recursion and sum the geometric series. This is the argument
  of Bottou, Curtis & Nocedal 2018 (SIAM Review 60(2), Thm 4.6, there for function values) and of
  Gower et al. 2019 (ICML, "SGD: general analysis and improved rates", Thm 3.1, there with
  expected smoothness instead of a uniform sigma^2), written for distances.
  With bias, ||w - eta grad F(w) - w* - eta beta|| <= sqrt(1 - eta mu) ||w - w*|| + eta zeta, and by
  Jensen u_t = E||w_t - w*||^2 obeys the monotone recursion

    u_{t+1} <= (sqrt((1 - eta mu) u_t) + eta zeta)^2 + eta^2 sigma^2,

  which :func:`strongly_convex_bound` iterates exactly (it reduces to the formula above for zeta = 0).
  Its fixed point is about ((zeta + sqrt(zeta^2 + eta mu sigma^2)) / mu)^2 for small eta mu: eta
  sigma^2 / mu without bias, (2 zeta / mu)^2 in squared distance without noise, i.e. the "b^2 / mu"
  floor in function value. Compare the biased
  strongly convex/PL analysis of Ajalloeian & Stich 2020 ("On the convergence of SGD with biased
  gradients", arXiv:2008.00051).

Non-convex (:func:`nonconvex_bound`):

    min_{t<T} E||grad F(w_t)||^2 <= (1/T) sum_{t<T} E||grad F(w_t)||^2
                                  <= 2 (F(w_0) - F_inf) / (eta T) + L eta sigma^2 + zeta^2.

  For zeta = 0 this is Bottou, Curtis & Nocedal 2018, Thm 4.10 (with their c = mu = M_G = 1,
  M = sigma^2) and Ghadimi & Lan 2013 (SIAM J. Optim. 23(4), "Stochastic first- and zeroth-order
  methods for nonconvex stochastic programming"). With bias: the descent lemma gives
  F_{t+1} <= F_t - eta <grad F, grad F + beta> + (L eta^2 / 2)(||grad F + beta||^2 + sigma^2), and
  <a, a + b> = (||a||^2 + ||a + b||^2 - ||b||^2) / 2 with eta <= 1/L leaves
  F_{t+1} <= F_t - (eta/2) ||grad F||^2 + (eta/2) zeta^2 + (L eta^2/2) sigma^2 (Ajalloeian & Stich
  2020, Thm 4 with M = 0). Tuned step: eta = min(1/(2L), sqrt(2 (F0 - F_inf) / (L sigma^2 T))).

The effective noise (:class:`NoiseModel`, :func:`qdata_noise`, :func:`compressed_gradient_noise`).
The qdata gradient of one node is g = A + (C(delta) - delta) with the correction, g = A + E without,
where A = (1/b) sum_j a_j grad f(w; x_j) (minibatch sampled with replacement, gate weights a_j),
E = (1/b) sum_j a_j e_j, e_j = grad f(w; Q(x_j)) - grad f(w; x_j), delta = -E. The parts are
martingale differences (sampling, then the gate given the batch, then Q and C given both), so:

* sampling: V(w) / b, with V the per-sample gradient variance (sup over the region);
* gate: E (1/b^2) sum_j (1/p_j - 1) ||grad f(w; x_j)||^2 (Horvitz-Thompson variance of independent
  Bernoulli(p_j) draws with weights 1/p_j), sup over the region;
* quantizer: ||e_j|| <= L_x ||Q(x_j) - x_j|| and E||Q(x) - x||^2 <= n Delta^2 / 4 give
  E||e_j||^2 <= q := L_x^2 n Delta^2 / 4 and a bias ||E e_j|| <= zeta, zeta = min(sqrt(q), L_xx n
  Delta^2 / 8) (first order as in DESIGN.md section 2; second order for unbiased Q, see
  :func:`quantizer_bias`). Q is independent across samples, so the fluctuation of E has variance
  <= q / b without a gate and <= (zeta^2 + m q) / b with one, m = E (1/b) sum_j 1/p_j;
* correction compressor: E||C(delta) - delta||^2 <= omega(d) E||delta||^2 with
  E||delta||^2 <= min(m q, zeta^2 + Var delta) (:func:`qdata_noise`).

With the correction (C, Q, gate unbiased): sigma^2 = sampling + gate + compressor and zeta = 0.
Without it: sigma^2 = (sqrt(sampling + gate) + sqrt(quantizer))^2 (Minkowski: the quantizer
fluctuation is not orthogonal to the others once E has a non-zero mean) and the bias zeta enters the
bounds above.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

KINDS = ("strongly_convex", "convex", "nonconvex")

# Asymptotic order of the bound in T with the tuned step (the log factor of the strongly convex case
# is ignored); the checker compares the fitted slope with the slope of the bound itself.
PREDICTED_ORDER = {"convex": -0.5, "strongly_convex": -1.0, "nonconvex": -0.5}


def _pos(value, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _nonneg(value, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _horizons(T) -> np.ndarray:
    T = np.asarray(T, np.float64)
    if T.size == 0 or np.any(~np.isfinite(T)) or np.any(T < 1) or np.any(T != np.round(T)):
        raise ValueError(f"T must hold positive integers, got {T}")
    return T


def max_step(L: float) -> float:
    """The largest step every bound here admits: eta <= 1/(2L) (DESIGN.md section 6)."""
    return 0.5 / _pos(L, "L")


# ----------------------------------------------------------------------------------------------
# Noise model.


class NoiseModel(NamedTuple):
    """The terms of the gradient noise (all variances are sups over the region).

    Attributes:
      sampling: V / b.
      gate: the gate's Horvitz-Thompson variance (0 without a gate).
      quantizer: variance of the uncorrected quantization error E (0 with the correction).
      compressor: the correction's (or gradient compressor's) variance.
      bias: zeta, a bound on ||E[g | w] - grad F(w)||.
    """

    sampling: float
    gate: float = 0.0
    quantizer: float = 0.0
    compressor: float = 0.0
    bias: float = 0.0

    @property
    def sigma2(self) -> float:
        """sigma_eff^2 = (sqrt(sampling + gate) + sqrt(quantizer))^2 + compressor (module docstring)."""
        return (math.sqrt(self.sampling + self.gate) + math.sqrt(self.quantizer)) ** 2 + self.compressor

    def as_dict(self) -> dict:
        out = {k: float(v) for k, v in self._asdict().items()}
        out["sigma2"] = self.sigma2
        return out


def sampling_variance(variance_sup: float, batch: int) -> float:
    """V / b: the variance of a size-b minibatch mean drawn with replacement."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return _nonneg(variance_sup, "variance_sup") / int(batch)


def quantizer_error(L_x: float, n: int, delta: float) -> float:
    """q = L_x^2 n Delta^2 / 4 >= E||grad f(w; Q(x)) - grad f(w; x)||^2 (DESIGN.md section 2)."""
    return _nonneg(L_x, "L_x") ** 2 * int(n) * _nonneg(delta, "delta") ** 2 / 4.0


def quantizer_bias(L_x: float, n: int, delta: float, *, L_xx: float | None = None,
                   unbiased: bool = False) -> float:
    """zeta >= ||E grad f(w; Q(x)) - grad f(w; x)||: the smaller of the first- and second-order bounds.

    First order, any quantizer with |Q(x)_i - x_i| <= Delta/2 or E (Q(x)_i - x_i)^2 <= Delta^2/4:
    L_x E||Q(x) - x|| <= L_x sqrt(n) Delta / 2 (DESIGN.md section 2). Second order, unbiased Q only:
    Taylor's theorem with E[Q(x) - x] = 0 leaves the remainder, (L_xx / 2) E||Q(x) - x||^2 <=
    L_xx n Delta^2 / 8, with L_xx bounding the second derivative of x -> grad_w f(w; x).
    """
    first = math.sqrt(quantizer_error(L_x, n, delta))
    if unbiased and L_xx is not None:
        return min(first, _nonneg(L_xx, "L_xx") * int(n) * _nonneg(delta, "delta") ** 2 / 8.0)
    return first


def qdata_noise(
    *,
    variance_sup: float,
    batch: int,
    L_x: float,
    n: int,
    delta: float,
    correction_omega: float | None,
    gate_variance: float = 0.0,
    mean_inv_p: float | None = None,
    quantizer_unbiased: bool = True,
    L_xx: float | None = None,
) -> NoiseModel:
    """The noise terms of the qdata estimator (module docstring).

    With q = L_x^2 n Delta^2 / 4, zeta = :func:`quantizer_bias` and m = E (1/b) sum_j 1/p_j:

    * uncorrected quantization error E = (1/b) sum_j a_j e_j: its mean has norm <= zeta and its
      variance is Var E <= q / b without a gate (i.i.d. terms with E||e_j||^2 <= q) and
      Var E <= (zeta^2 + m q) / b with one (given the batch, mask bits and roundings are independent
      across samples, E a_j^2 = 1/p_j; the conditional mean (1/b) sum_j E[e_j | x_j] varies over batches
      by at most zeta^2 / b);
    * correction: E||C(delta) - delta||^2 <= omega E||delta||^2 with delta = -E, so
      E||delta||^2 <= zeta^2 + Var E (also <= m q by Cauchy-Schwarz; the smaller is used).

    Args:
      variance_sup: sup over the region of V(w). batch: b. L_x, n: the objective's constants.
      delta: the quantizer step Delta.
      correction_omega: omega(d) of the correction compressor, or None without a correction.
      gate_variance: the gate's Horvitz-Thompson variance (0 without a gate).
      mean_inv_p: m with a gate; None without one (m = 1, and the sharper no-gate formulas apply).
      quantizer_unbiased: whether E[Q(x)] = x (allows the second-order bias bound).
      L_xx: the objective's second-order data constant, or None.
    """
    s = sampling_variance(variance_sup, batch)
    q = quantizer_error(L_x, n, delta)
    zeta = quantizer_bias(L_x, n, delta, L_xx=L_xx, unbiased=quantizer_unbiased)
    gated = mean_inv_p is not None
    m = _nonneg(mean_inv_p, "mean_inv_p") if gated else 1.0
    var_e = (zeta**2 + m * q) / batch if gated else q / batch
    gate = _nonneg(gate_variance, "gate_variance")
    if correction_omega is None:
        return NoiseModel(sampling=s, gate=gate, quantizer=var_e, compressor=0.0, bias=zeta)
    second_moment = min(m * q, zeta**2 + var_e)
    return NoiseModel(sampling=s, gate=gate, quantizer=0.0,
                      compressor=_nonneg(correction_omega, "correction_omega") * second_moment, bias=0.0)


def compressed_gradient_noise(*, variance_sup: float, batch: int, omega: float, grad_sup: float) -> NoiseModel:
    """Noise of g = C(A), A the minibatch gradient, C unbiased with relative variance omega.

    E||C(A) - grad F||^2 = E||A - grad F||^2 + E||C(A) - A||^2 <= V/b + omega (||grad F||^2 + V/b).
    """
    s = sampling_variance(variance_sup, batch)
    return NoiseModel(sampling=s, compressor=_nonneg(omega, "omega") * (_nonneg(grad_sup, "grad_sup") ** 2 + s))


# ----------------------------------------------------------------------------------------------
# Bounds.


def convex_bound(T, eta: float, D0: float, sigma2: float, bias: float = 0.0, radius: float = 0.0) -> np.ndarray:
    """E F(w_bar_T) - F* <= D0 / (2 eta T) + eta sigma^2 + zeta R (module docstring), for eta <= 1/L."""
    T = _horizons(T)
    eta = _pos(eta, "eta")
    return _nonneg(D0, "D0") / (2 * eta * T) + eta * _nonneg(sigma2, "sigma2") + _nonneg(bias, "bias") * _nonneg(
        radius, "radius")


def strongly_convex_bound(T, eta: float, D0: float, sigma2: float, mu: float, bias: float = 0.0) -> np.ndarray:
    """E||w_T - w*||^2 bound (module docstring), for eta <= 1/L and eta mu <= 1.

    zeta = 0: (1 - eta mu)^T D0 + eta sigma^2 / mu. zeta > 0: the exact iterate u_T of
    u_{t+1} = (sqrt((1 - eta mu) u_t) + eta zeta)^2 + eta^2 sigma^2, u_0 = D0, plus
    (1 - eta mu)^T eta sigma^2 / mu, the piece of the geometric sum that the zeta = 0 formula keeps;
    so the bound is continuous and non-decreasing in zeta and equals the formula at zeta = 0.
    """
    T = _horizons(T)
    eta, mu = _pos(eta, "eta"), _pos(mu, "mu")
    D0, sigma2, bias = _nonneg(D0, "D0"), _nonneg(sigma2, "sigma2"), _nonneg(bias, "bias")
    if eta * mu > 1:
        raise ValueError(f"eta * mu must be <= 1, got {eta * mu}")
    q = 1.0 - eta * mu
    if bias == 0.0:
        return q**T * D0 + eta * sigma2 / mu
    u = _sc_recursion(np.atleast_1d(T), np.array([eta]), D0, sigma2, mu, bias)[:, 0].reshape(T.shape)
    return u + q**T * eta * sigma2 / mu


def _sc_recursion(T: np.ndarray, etas: np.ndarray, D0, sigma2, mu, bias) -> np.ndarray:
    """u_T of the biased strongly convex recursion for every T (rows) and eta (columns)."""
    order = np.argsort(T)
    T_sorted = T[order].astype(np.int64)
    out = np.empty((len(T), len(etas)))
    u = np.full(len(etas), D0, np.float64)
    sq = np.sqrt(1.0 - etas * mu)
    t = 0
    for i, target in zip(order, T_sorted):
        while t < target:
            u = (sq * np.sqrt(u) + etas * bias) ** 2 + etas**2 * sigma2
            t += 1
        out[i] = u
    return out


def nonconvex_bound(T, eta: float, F_gap: float, L: float, sigma2: float, bias: float = 0.0) -> np.ndarray:
    """min_{t<T} E||grad F(w_t)||^2 <= 2 (F0 - F_inf)/(eta T) + L eta sigma^2 + zeta^2, for eta <= 1/L."""
    T = _horizons(T)
    eta = _pos(eta, "eta")
    return (2 * _nonneg(F_gap, "F_gap") / (eta * T) + _pos(L, "L") * eta * _nonneg(sigma2, "sigma2")
            + _nonneg(bias, "bias") ** 2)


# ----------------------------------------------------------------------------------------------
# Tuned steps: the step each bound prescribes for a horizon T (eta <= eta_max).


def tuned_step_convex(T, D0: float, sigma2: float, eta_max: float) -> np.ndarray:
    """argmin over eta <= eta_max of D0/(2 eta T) + eta sigma^2: min(eta_max, sqrt(D0 / (2 sigma^2 T)))."""
    T = _horizons(T)
    eta_max = _pos(eta_max, "eta_max")
    sigma2 = _nonneg(sigma2, "sigma2")
    if sigma2 == 0:
        return np.full(T.shape, eta_max)
    return np.minimum(eta_max, np.sqrt(_nonneg(D0, "D0") / (2 * sigma2 * T)))


def tuned_step_nonconvex(T, F_gap: float, L: float, sigma2: float, eta_max: float) -> np.ndarray:
    """argmin over eta <= eta_max of 2 F_gap/(eta T) + L eta sigma^2: min(eta_max, sqrt(2 F_gap/(L sigma^2 T)))."""
    T = _horizons(T)
    eta_max = _pos(eta_max, "eta_max")
    sigma2 = _nonneg(sigma2, "sigma2")
    if sigma2 == 0:
        return np.full(T.shape, eta_max)
    return np.minimum(eta_max, np.sqrt(2 * _nonneg(F_gap, "F_gap") / (_pos(L, "L") * sigma2 * T)))


def tuned_step_strongly_convex(T, D0: float, sigma2: float, mu: float, eta_max: float, bias: float = 0.0,
                               grid: int = 300, decades: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """The step minimizing :func:`strongly_convex_bound` at each T, over a log grid of ``grid`` steps.

    The grid spans [eta_max 10^-decades, eta_max] (ratio ~1.02 between neighbours; the bound is flat
    near its minimum). The floor matters only where the bound is vacuous at T (sigma^2 / mu >
    T mu D0): there the exact minimizer is eta -> 0 (bound -> D0, "do not move"), which is useless to
    run; the floor keeps a step that makes progress. Returns (eta_T, bound_T).
    """
    T = _horizons(T)
    eta_max = _pos(eta_max, "eta_max")
    mu = _pos(mu, "mu")
    eta_max = min(eta_max, 1.0 / mu)
    etas = eta_max * np.logspace(-float(decades), 0, grid)
    D0, sigma2, bias = _nonneg(D0, "D0"), _nonneg(sigma2, "sigma2"), _nonneg(bias, "bias")
    if bias == 0.0:
        vals = (1.0 - etas[None, :] * mu) ** T[:, None] * D0 + etas[None, :] * sigma2 / mu
    else:
        vals = _sc_recursion(T, etas, D0, sigma2, mu, bias)
        vals = vals + (1.0 - etas[None, :] * mu) ** T[:, None] * etas[None, :] * sigma2 / mu
    best = np.argmin(vals, axis=1)
    return etas[best], vals[np.arange(len(T)), best]


def prescribed_steps(kind: str, T, *, L: float, noise: NoiseModel, D0: float | None = None,
                     F_gap: float | None = None, mu: float = 0.0) -> np.ndarray:
    """For each horizon T, the step eta_T <= 1/(2L) that minimizes the bound of ``kind`` at T.

    Args:
      kind: "convex", "strongly_convex" or "nonconvex".
      T: horizons. L: smoothness. noise: the :class:`NoiseModel` (sigma^2; zeta matters only for the
        strongly convex recursion, the other bias terms do not depend on eta).
      D0: ||w0 - w*||^2 (convex kinds). F_gap: F(w0) - F_inf (non-convex). mu: strong convexity.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    T = _horizons(T)
    eta_max = max_step(L)
    if kind == "convex":
        return tuned_step_convex(T, D0, noise.sigma2, eta_max)
    if kind == "nonconvex":
        return tuned_step_nonconvex(T, F_gap, L, noise.sigma2, eta_max)
    return tuned_step_strongly_convex(T, D0, noise.sigma2, mu, eta_max, noise.bias)[0]


def bound_at(kind: str, T, eta, *, L: float, noise: NoiseModel, D0: float | None = None,
             F_gap: float | None = None, mu: float = 0.0, radius: float = 0.0) -> np.ndarray:
    """The bound of ``kind`` at horizons T with steps eta (an array matching T, or one float)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    T = _horizons(T)
    etas = np.broadcast_to(np.asarray(eta, np.float64), T.shape)
    s2, z = noise.sigma2, noise.bias
    out = []
    for t, e in zip(T, etas):
        if kind == "convex":
            out.append(convex_bound(t, e, D0, s2, z, radius)[()])
        elif kind == "nonconvex":
            out.append(nonconvex_bound(t, e, F_gap, L, s2, z)[()])
        else:
            out.append(strongly_convex_bound(t, e, D0, s2, mu, z)[()])
    return np.asarray(out, np.float64)


def loglog_slope(T, values) -> float:
    """Least-squares slope of log(values) against log(T) (NaN if any value is not positive and finite)."""
    T = np.asarray(T, np.float64)
    v = np.asarray(values, np.float64)
    if v.shape != T.shape or len(T) < 2 or np.any(~np.isfinite(v)) or np.any(v <= 0):
        return float("nan")
    return float(np.polyfit(np.log(T), np.log(v), 1)[0])


def rounds_to_accuracy(T, values, target: float) -> float:
    """The first T at which ``values`` (a curve over increasing T) is <= target; inf if never."""
    T = np.asarray(T, np.float64)
    v = np.asarray(values, np.float64)
    hit = np.nonzero(v <= target)[0]
    return float(T[hit[0]]) if hit.size else float("inf")
