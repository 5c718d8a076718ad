"""The rate-bound formulas of convergence.bounds: hand-computed values, monotonicity, limits, steps."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convergence import bounds as B

pos = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


# ----------------------------------------------------------------------------------------------
# Hand-computed values.


def test_convex_bound_hand_values():
    # D0 / (2 eta T) + eta sigma^2 + zeta R = 2 / (2 * 0.1 * 10) + 0.1 * 3 + 0.5 * 4
    assert B.convex_bound(10, 0.1, 2.0, 3.0) == pytest.approx(1.3, rel=1e-12)
    assert B.convex_bound(10, 0.1, 2.0, 3.0, bias=0.5, radius=4.0) == pytest.approx(3.3, rel=1e-12)
    np.testing.assert_allclose(B.convex_bound([1, 2, 4], 0.5, 1.0, 0.0), [1.0, 0.5, 0.25], rtol=1e-12)


def test_strongly_convex_bound_hand_values():
    # (1 - eta mu)^T D0 + eta sigma^2 / mu = 0.9^5 + 0.1 * 2
    assert B.strongly_convex_bound(5, 0.1, 1.0, 2.0, 1.0) == pytest.approx(0.9**5 + 0.2, rel=1e-12)


def test_strongly_convex_biased_recursion_hand_values():
    # u1 = (sqrt(0.9 * 1) + 0.1 * 0.5)^2 + 0.01 * 2, u2 = (sqrt(0.9 u1) + 0.05)^2 + 0.02, plus the
    # q^T eta sigma^2 / mu = 0.9^T * 0.2 that makes the bound continuous at zeta = 0.
    u1 = (math.sqrt(0.9) + 0.05) ** 2 + 0.02
    u2 = (math.sqrt(0.9 * u1) + 0.05) ** 2 + 0.02
    np.testing.assert_allclose(B.strongly_convex_bound([1, 2], 0.1, 1.0, 2.0, 1.0, bias=0.5),
                               [u1 + 0.9 * 0.2, u2 + 0.81 * 0.2], rtol=1e-12)
    assert B.strongly_convex_bound(2, 0.1, 1.0, 2.0, 1.0, bias=0.5) == pytest.approx(u2 + 0.81 * 0.2, rel=1e-12)


def test_nonconvex_bound_hand_values():
    # 2 (F0 - F_inf) / (eta T) + L eta sigma^2 + zeta^2 = 2 * 3 / (0.2 * 30) + 2 * 0.2 * 5 + 0.3^2
    assert B.nonconvex_bound(30, 0.2, 3.0, 2.0, 5.0, bias=0.3) == pytest.approx(1.0 + 2.0 + 0.09, rel=1e-12)


def test_noise_terms_hand_values():
    # q = L_x^2 n Delta^2 / 4 = 4 * 10 * 0.01 / 4 = 0.1; first-order bias sqrt(q).
    assert B.quantizer_error(2.0, 10, 0.1) == pytest.approx(0.1)
    assert B.quantizer_bias(2.0, 10, 0.1) == pytest.approx(math.sqrt(0.1))
    # Second order (unbiased Q): L_xx n Delta^2 / 8 = 3 * 10 * 0.01 / 8; only if it is smaller.
    assert B.quantizer_bias(2.0, 10, 0.1, L_xx=3.0, unbiased=True) == pytest.approx(0.0375)
    assert B.quantizer_bias(2.0, 10, 0.1, L_xx=3.0, unbiased=False) == pytest.approx(math.sqrt(0.1))
    assert B.quantizer_bias(2.0, 10, 0.1, L_xx=1e6, unbiased=True) == pytest.approx(math.sqrt(0.1))

    # No correction, no gate: sampling V/b, quantizer q/b, bias sqrt(q).
    nm = B.qdata_noise(variance_sup=4.0, batch=8, L_x=2.0, n=10, delta=0.1, correction_omega=None)
    assert nm.sampling == pytest.approx(0.5) and nm.quantizer == pytest.approx(0.1 / 8)
    assert nm.bias == pytest.approx(math.sqrt(0.1)) and nm.compressor == 0.0
    assert nm.sigma2 == pytest.approx((math.sqrt(0.5) + math.sqrt(0.1 / 8)) ** 2)
    # Correction through omega = 3: unbiased, compressor omega * min(q, zeta^2 + q / b) = 3 * 0.1.
    nm = B.qdata_noise(variance_sup=4.0, batch=8, L_x=2.0, n=10, delta=0.1, correction_omega=3.0)
    assert nm.bias == 0.0 and nm.quantizer == 0.0
    assert nm.compressor == pytest.approx(3 * min(0.1, 0.1 + 0.1 / 8))
    assert nm.sigma2 == pytest.approx(0.5 + 0.3)
    # With a gate (m = 5, gate variance 0.7): Var E = (zeta^2 + m q) / b.
    nm = B.qdata_noise(variance_sup=4.0, batch=8, L_x=2.0, n=10, delta=0.1, correction_omega=None,
                       gate_variance=0.7, mean_inv_p=5.0)
    assert nm.quantizer == pytest.approx((0.1 + 5 * 0.1) / 8) and nm.gate == 0.7
    # Gradient compression: V/b + omega (G^2 + V/b).
    nm = B.compressed_gradient_noise(variance_sup=4.0, batch=8, omega=2.0, grad_sup=3.0)
    assert nm.sigma2 == pytest.approx(0.5 + 2 * (9 + 0.5))


# ----------------------------------------------------------------------------------------------
# Monotonicity and limits.


@given(T=st.integers(1, 10**6), eta=pos, D0=pos, s2=pos, z=pos, r=pos)
def test_convex_bound_monotone(T, eta, D0, s2, z, r):
    base = B.convex_bound(T, eta, D0, s2, z, r)
    assert B.convex_bound(T + 1, eta, D0, s2, z, r) <= base
    assert B.convex_bound(T, eta, D0, 2 * s2, z, r) > base
    assert B.convex_bound(T, eta, 2 * D0, s2, z, r) > base
    assert B.convex_bound(T, eta, D0, s2, 2 * z, r) > base


@given(T=st.integers(1, 2000), eta=st.floats(1e-4, 0.5), mu=st.floats(1e-3, 1.0), D0=pos, s2=pos,
       z=st.floats(0.0, 10.0))
def test_strongly_convex_bound_monotone(T, eta, mu, D0, s2, z):
    u = B.strongly_convex_bound([T, T + 1], eta, D0, s2, mu, bias=z)
    u_more_noise = B.strongly_convex_bound([T], eta, D0, 2 * s2, mu, bias=z)
    u_more_bias = B.strongly_convex_bound([T], eta, D0, s2, mu, bias=z + 1.0)
    assert u_more_noise[0] >= u[0] and u_more_bias[0] >= u[0]
    # The recursion with bias is always at least the unbiased value (it adds non-negative terms).
    assert u[0] >= B.strongly_convex_bound(T, eta, D0, s2, mu) * (1 - 1e-12)


def test_strongly_convex_limits():
    eta, mu, D0, s2 = 0.05, 0.5, 3.0, 2.0
    # Unbiased: the limit is eta sigma^2 / mu.
    assert B.strongly_convex_bound(10**6, eta, D0, s2, mu) == pytest.approx(eta * s2 / mu, rel=1e-9)
    # Biased: the limit is the fixed point of u = (sqrt(q u) + eta zeta)^2 + eta^2 sigma^2.
    z = 0.3
    u = B.strongly_convex_bound(20000, eta, D0, s2, mu, bias=z)
    q = 1 - eta * mu
    assert u == pytest.approx((math.sqrt(q * u) + eta * z) ** 2 + eta**2 * s2, rel=1e-9)
    # and it is about ((zeta + sqrt(zeta^2 + eta mu sigma^2)) / mu)^2 when eta mu is small
    # (expand sqrt(q) = 1 - eta mu / 2 in the fixed-point equation).
    assert u == pytest.approx(((z + math.sqrt(z**2 + eta * mu * s2)) / mu) ** 2, rel=0.03)
    # The bound is continuous at zeta = 0: a tiny bias gives the closed form.
    tiny = B.strongly_convex_bound(50, eta, D0, s2, mu, bias=1e-15)
    assert tiny == pytest.approx(B.strongly_convex_bound(50, eta, D0, s2, mu), rel=1e-9)


def test_convex_and_nonconvex_limits():
    assert B.convex_bound(10**12, 0.1, 5.0, 2.0, 0.3, 2.0) == pytest.approx(0.1 * 2.0 + 0.6, rel=1e-9)
    assert B.nonconvex_bound(10**12, 0.1, 5.0, 3.0, 2.0, 0.3) == pytest.approx(3 * 0.1 * 2.0 + 0.09, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Prescribed steps are the minimizers of the bounds.


@given(T=st.integers(1, 10**5), D0=pos, s2=pos, L=pos)
def test_tuned_convex_step_minimizes(T, D0, s2, L):
    eta_max = B.max_step(L)
    eta = float(B.tuned_step_convex(T, D0, s2, eta_max)[()])
    assert 0 < eta <= eta_max
    grid = eta_max * np.logspace(-6, 0, 400)
    best = min(B.convex_bound(T, e, D0, s2) for e in grid)
    assert B.convex_bound(T, eta, D0, s2) <= best * (1 + 1e-9)


@given(T=st.integers(1, 10**5), F=pos, s2=pos, L=pos)
def test_tuned_nonconvex_step_minimizes(T, F, s2, L):
    eta_max = B.max_step(L)
    eta = float(B.tuned_step_nonconvex(T, F, L, s2, eta_max)[()])
    assert 0 < eta <= eta_max
    grid = eta_max * np.logspace(-6, 0, 400)
    best = min(B.nonconvex_bound(T, e, F, L, s2) for e in grid)
    assert B.nonconvex_bound(T, eta, F, L, s2) <= best * (1 + 1e-9)


def test_tuned_strongly_convex_step():
    T = np.array([16, 256, 4096])
    etas, vals = B.tuned_step_strongly_convex(T, 2.0, 1.0, 0.2, 0.5)
    assert np.all(etas <= 0.5) and np.all(np.diff(etas) <= 0)  # longer horizons, smaller steps
    for t, e, v in zip(T, etas, vals):
        assert v == pytest.approx(B.strongly_convex_bound(t, e, 2.0, 1.0, 0.2), rel=1e-12)
        # no step of a finer grid does markedly better
        fine = 0.5 * np.logspace(-3, 0, 3000)
        assert v <= min(B.strongly_convex_bound(t, f, 2.0, 1.0, 0.2) for f in fine) * 1.01
    # With bias, the recursion is minimized too.
    etas_b, vals_b = B.tuned_step_strongly_convex(T, 2.0, 1.0, 0.2, 0.5, bias=0.05)
    assert np.all(vals_b >= vals)
    np.testing.assert_allclose(vals_b, [B.strongly_convex_bound(t, e, 2.0, 1.0, 0.2, bias=0.05)[()]
                                        for t, e in zip(T, etas_b)], rtol=1e-12)


def test_prescribed_steps_and_bound_at_agree():
    noise = B.NoiseModel(sampling=0.5, compressor=0.2, bias=0.0)
    T = np.array([64, 128, 256])
    for kind in B.KINDS:
        eta = B.prescribed_steps(kind, T, L=2.0, noise=noise, D0=1.0, F_gap=1.0, mu=0.3)
        assert np.all(eta <= B.max_step(2.0))
        vals = B.bound_at(kind, T, eta, L=2.0, noise=noise, D0=1.0, F_gap=1.0, mu=0.3)
        assert np.all(np.diff(vals) < 0)  # the tuned bound decreases with the horizon


def test_loglog_slope_and_rounds():
    T = np.array([64, 128, 256, 512])
    assert B.loglog_slope(T, 3.0 * T**-0.5) == pytest.approx(-0.5, abs=1e-12)
    assert math.isnan(B.loglog_slope(T, [1.0, 0.0, 1.0, 1.0]))
    assert B.rounds_to_accuracy(T, [4, 3, 2, 1], 2.5) == 256
    assert B.rounds_to_accuracy(T, [4, 3, 2, 1], 0.5) == math.inf


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("call, name", [
    (lambda: B.convex_bound(10, 0.0, 1.0, 1.0), "eta"),
    (lambda: B.convex_bound(10, 0.1, -1.0, 1.0), "D0"),
    (lambda: B.convex_bound(2.5, 0.1, 1.0, 1.0), "T"),
    (lambda: B.strongly_convex_bound(10, 0.1, 1.0, 1.0, 0.0), "mu"),
    (lambda: B.strongly_convex_bound(10, 3.0, 1.0, 1.0, 1.0), "eta \\* mu"),
    (lambda: B.nonconvex_bound(10, 0.1, 1.0, 1.0, float("nan")), "sigma2"),
    (lambda: B.max_step(0.0), "L"),
    (lambda: B.sampling_variance(1.0, 0), "batch"),
    (lambda: B.prescribed_steps("concave", [10], L=1.0, noise=B.NoiseModel(1.0)), "kind"),
])
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()
