"""The synthetic objectives: their constants against direct computation (autodiff, eigenvalues, sampling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convergence import objectives as O

N = 256  # small datasets keep the suite fast; the constants are computed the same way at any N


@pytest.fixture(scope="module")
def glms():
    return [
        O.least_squares(6, num_samples=N, features="identity", seed=1),
        O.ridge(5, 40, num_samples=N, features="random", lam=0.1, seed=2),
        O.logistic_regression(6, num_samples=N, features="identity", seed=3),
        O.logistic_regression(4, 30, num_samples=N, features="random", lam=0.02, seed=4),
        O.sigmoid_classifier(6, num_samples=N, features="identity", seed=5),
    ]


@pytest.fixture(scope="module")
def tanh():
    return O.tanh_network(5, 4, num_samples=N, probes=8, seed=6)


def _hessian(obj, w):
    x, y = jnp.asarray(obj.x), jnp.asarray(obj.y)
    return np.asarray(jax.hessian(lambda v: jnp.mean(obj.loss_fn(v, x, y)))(jnp.asarray(w, jnp.float32)), np.float64)


def _region_points(obj, count, seed):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(count, obj.d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return obj.center + obj.radius * rng.uniform(0, 1, (count, 1)) ** (1 / 3) * u


def _box_points(obj, count, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(obj.lo, obj.hi, size=(count, obj.n))
    # Half at the corners of the box, where the norms that enter L_x peak.
    x[::2] = np.where(rng.uniform(size=x[::2].shape) < 0.5, obj.lo, obj.hi)
    return x.astype(np.float32)


def test_quadratic_constants_are_exact(glms):
    """Least squares and ridge: the Hessian is constant, L and mu are its extreme eigenvalues."""
    for obj in glms[:2]:
        eig = np.linalg.eigvalsh(_hessian(obj, obj.w0))
        assert obj.L == pytest.approx(eig[-1], rel=1e-4)
        assert obj.mu == pytest.approx(eig[0], rel=1e-3, abs=1e-6)
        # w* is the minimizer: zero gradient in float64 and F(w* + e) > F* for perturbations.
        assert np.linalg.norm(obj.full_grad(obj.w_star)) < 1e-10
        rng = np.random.default_rng(0)
        for _ in range(5):
            e = rng.normal(size=obj.d) * 1e-3
            assert obj.full_loss(obj.w_star + e) >= obj.F_star
        assert obj.F_star == pytest.approx(obj.full_loss(obj.w_star))


def test_logistic_and_sigmoid_smoothness_is_an_upper_bound(glms):
    """L bounds ||Hessian F|| everywhere (certified), mu bounds it below; Newton's w* is stationary."""
    for obj in glms[2:]:
        for w in _region_points(obj, 6, seed=1):
            eig = np.linalg.eigvalsh(_hessian(obj, w))
            assert np.max(np.abs(eig)) <= obj.L * (1 + 1e-5)
            if obj.kind != "nonconvex":
                assert eig[0] >= obj.mu * (1 - 1e-4) - 1e-6
        if obj.w_star is not None:
            assert np.linalg.norm(obj.full_grad(obj.w_star)) < 1e-9
    # Logistic regression's L is lambda_max(Phi^T Phi)/(4N) + lam.
    obj = glms[2]
    phi = obj.x.astype(np.float64)
    assert obj.L == pytest.approx(np.linalg.eigvalsh(phi.T @ phi)[-1] / (4 * N), rel=1e-9)


def test_power_iteration_matches_the_hessian(glms):
    """The estimator used for the tanh network's L finds the spectral norm at a point."""
    obj = glms[2]
    x, y = jnp.asarray(obj.x), jnp.asarray(obj.y)
    pts = _region_points(obj, 3, seed=2)
    est = O.power_iteration_smoothness(lambda w: jnp.mean(obj.loss_fn(w, x, y)), pts, iters=200)
    exact = [np.max(np.abs(np.linalg.eigvalsh(_hessian(obj, w)))) for w in pts]
    np.testing.assert_allclose(est, exact, rtol=1e-3)


def _dgrad_dx(obj, w, x, y):
    """||d grad_w f / dx||_op at one sample, by autodiff."""
    f = lambda w_, x_: obj.loss_fn(w_, x_[None], y[None])[0]
    jac = jax.jacfwd(jax.grad(f, argnums=0), argnums=1)(jnp.asarray(w, jnp.float32), jnp.asarray(x))
    return float(np.linalg.norm(np.asarray(jac, np.float64), 2))


def test_data_lipschitz_constant_is_an_upper_bound(glms, tanh):
    """L_x >= ||d grad_w f / dx||_op at random (w in the region, x in the box), and is not absurd."""
    for obj in glms + [tanh]:
        ws, xs = _region_points(obj, 20, seed=3), _box_points(obj, 20, seed=4)
        ys = obj.y[:20]
        seen = max(_dgrad_dx(obj, w, x, jnp.asarray(y)) for w, x, y in zip(ws, xs, ys))
        assert seen <= obj.L_x, obj.name
        # A certified bound may be loose, but not by orders of magnitude on these small problems.
        assert seen >= obj.L_x / 200, obj.name


def test_second_order_data_constant_is_an_upper_bound(glms):
    """L_xx >= sup_u ||d^2 grad_w f / dx^2 [u, u]|| (random unit u) at random points."""
    rng = np.random.default_rng(5)
    for obj in glms:
        assert obj.L_xx is not None
        f = lambda w_, x_, y_: obj.loss_fn(w_, x_[None], y_[None])[0]
        hess_x = jax.jit(jax.jacfwd(jax.jacfwd(jax.grad(f, argnums=0), argnums=1), argnums=1))
        seen = 0.0
        for w, x, y in zip(_region_points(obj, 8, seed=6), _box_points(obj, 8, seed=7), obj.y[:8]):
            t = np.asarray(hess_x(jnp.asarray(w, jnp.float32), jnp.asarray(x), jnp.asarray(y)), np.float64)
            for _ in range(20):
                u = rng.normal(size=obj.n)
                u /= np.linalg.norm(u)
                seen = max(seen, float(np.linalg.norm(np.einsum("dij,i,j->d", t, u, u))))
        assert seen <= obj.L_xx, obj.name


def test_variance_sup_bounds_the_sampling_variance(glms, tanh):
    """V(w) <= variance_sup over the region (certified for GLMs, estimated x1.5 for the network)."""
    for obj in glms + [tanh]:
        assert O.per_sample_variance(obj, obj.center) <= obj.variance_sup
        for w in _region_points(obj, 8, seed=8):
            assert O.per_sample_variance(obj, w) <= obj.variance_sup * (1 + 1e-5), obj.name
            assert np.linalg.norm(obj.full_grad(w)) <= obj.grad_sup * (1 + 1e-5), obj.name


def test_random_features_constants():
    fmap = O.random_features(4, 300, seed=3, scale=1.5)
    x = _box_points(O.least_squares(4, num_samples=8), 50, seed=1)
    phi = np.asarray(fmap.apply(jnp.asarray(x)))
    np.testing.assert_allclose(phi, fmap.apply64(x), atol=2e-6)
    assert np.max(np.linalg.norm(phi, axis=1)) <= fmap.phi_max + 1e-6
    jac = jax.vmap(jax.jacfwd(lambda v: fmap.apply(v[None])[0]))(jnp.asarray(x))
    assert max(np.linalg.norm(np.asarray(j, np.float64), 2) for j in jac) <= fmap.jac_max * (1 + 1e-6)


def test_dimensions_are_independent():
    """n stays the data dimension whatever d: the node sends n numbers per sample."""
    for d in (20, 400):
        obj = O.ridge(4, d, num_samples=64, features="random", lam=0.1, teacher="data")
        assert obj.x.shape == (64, 4) and obj.d == d and obj.w_star.shape == (d,)
    # teacher="data": the same (x, y) for every d.
    a = O.ridge(4, 20, num_samples=64, features="random", teacher="data")
    b = O.ridge(4, 400, num_samples=64, features="random", teacher="data")
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)


def test_targets_and_labels():
    obj = O.least_squares(4, num_samples=64, targets="real")
    assert obj.y.dtype == np.float32 and obj.num_classes is None
    obj = O.least_squares(4, num_samples=64, targets="binary")
    assert obj.y.dtype == np.int32 and set(np.unique(obj.y)) <= {0, 1} and obj.num_classes == 2


def test_nonconvex_lower_bounds(glms, tanh):
    for obj in (glms[-1], tanh):
        assert obj.F_inf == 0.0 and obj.F0 > 0
        x, y = jnp.asarray(obj.x), jnp.asarray(obj.y)
        for w in _region_points(obj, 4, seed=9):
            assert float(jnp.min(obj.loss_fn(jnp.asarray(w, jnp.float32), x, y))) >= 0.0


@pytest.mark.parametrize("call, name", [
    (lambda: O.least_squares(4, num_samples=8, lo=1.0, hi=0.0), "lo < hi"),
    (lambda: O.least_squares(4, 7, num_samples=8), "identity features need d == n"),
    (lambda: O.least_squares(4, num_samples=8, lam=-1.0), "lam"),
    (lambda: O.least_squares(4, num_samples=8, targets="ordinal"), "targets"),
    (lambda: O.ridge(4, num_samples=8, lam=0.0), "lam > 0"),
    (lambda: O.sigmoid_classifier(4, num_samples=8, flip=0.5), "flip"),
    (lambda: O.random_features(4, 0), "d must be"),
    (lambda: O.tanh_network(4, 3, num_samples=8, safety=0.5), "safety"),
    (lambda: O.least_squares(0, num_samples=8), "n must be"),
    (lambda: O.sigmoid_classifier(4, num_samples=8, radius=0.0), "radius"),
    (lambda: O.tanh_network(4, 3, num_samples=8, data_lipschitz="guess"), "data_lipschitz"),
    (lambda: O.logistic_regression(4, num_samples=8, region_factor=-1.0), "region_factor"),
])
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()
