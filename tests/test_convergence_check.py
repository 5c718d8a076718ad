"""Reduced versions of the convergence checks: every objective, fp32 SGD and a qdata setting, small T.

Statistical margin: the checks compare the mean over seeds with a worst-case bound. In the full run
(python -m convergence) the worst ratios are at most ~0.2 wherever the bound is informative, except on
ridge where it reaches ~0.96 at the shortest horizon (T = 64: the prescribed step is tiny, so both the
iterate and the bound sit near the starting value, by construction rather than by chance), and the 95%
band (reported in each result) is far narrower than the gap, so a pass here does not hinge on luck; a
failure means the bound, the constants or the estimator changed.
"""

import math

import numpy as np
import pytest

from convergence import check as C
from convergence import objectives as O

T_GRID = (64, 128, 256, 512)
SEEDS = 4


@pytest.fixture(scope="module")
def objectives():
    return {o.name: o for o in C.default_objectives(num_samples=256)}


# One qdata setting per objective, so that every ingredient (uncorrected, correction, gate, each B)
# runs on some objective under the default suite.
QDATA_SETTING = {
    "least_squares": C.Setting("qdata B=8 +corr +gate", bits=8, correction=True, gate=True),
    "ridge_rf": C.Setting("qdata B=8", bits=8),
    "logistic": C.Setting("qdata B=4 +corr", bits=4, correction=True),
    "sigmoid": C.Setting("qdata B=8 +gate", bits=8, gate=True),
    "tanh_net": C.Setting("qdata B=8 +corr", bits=8, correction=True),
}


@pytest.mark.parametrize("name", list(QDATA_SETTING))
def test_reduced_check_passes(objectives, name):
    obj = objectives[name]
    for setting in (C.Setting("fp32 SGD", method="sgd"), QDATA_SETTING[name]):
        r = C.check_setting(obj, setting, T_grid=T_GRID, seeds=SEEDS)
        assert r["passed"], (name, setting.name, r["ratio"], r["slope_empirical"], r["slope_bound"])
        assert r["kind"] == obj.kind and r["T"] == list(T_GRID)
        assert len(r["eta"]) == len(T_GRID) and max(r["eta"]) <= 0.5 / obj.L * (1 + 1e-12)
        assert r["region_ok"] and r["finite"] and r["step_valid"]
        assert all(0 < x <= 1 for x in r["ratio"])
        # The bits the checker records are the estimator's exact ledger (a positive whole number).
        assert r["uplink_bits_first_round"] > 0


def test_the_bound_is_not_vacuous_for_fp32(objectives):
    """On least squares the fp32 bound is informative and the empirical curve is within ~10x of it:
    the check compares like with like (a bound 1000x above the data would pass anything)."""
    r = C.check_setting(objectives["least_squares"], C.Setting("fp32 SGD", method="sgd"), T_grid=T_GRID,
                        seeds=SEEDS)
    assert r["informative"]
    assert max(r["ratio"]) > 0.05
    assert not math.isnan(r["slope_empirical"])


def test_setting_validation():
    with pytest.raises(ValueError, match="method"):
        C.Setting("x", method="adam")
    with pytest.raises(ValueError, match="bits"):
        C.Setting("x", method="qdata")
    with pytest.raises(ValueError, match="compressor"):
        C.Setting("x", method="compressed")
    with pytest.raises(ValueError, match="step_over_L"):
        C.Setting("x", method="sgd", step_over_L=-1.0)
    with pytest.raises(ValueError, match="rho"):
        C.Setting("x", bits=4, gate=True, rho=1.5)
    with pytest.raises(ValueError, match="dims"):
        C.communication_claim((100,))
    with pytest.raises(ValueError, match="accuracy"):
        C.communication_claim((100, 1000), accuracy=2.0)
    obj = O.least_squares(4, num_samples=64)
    with pytest.raises(ValueError, match="multiple of"):
        C.check_setting(obj, C.Setting("fp32", method="sgd"), T_grid=(64, 100))
    with pytest.raises(ValueError, match="seeds"):
        C.check_setting(obj, C.Setting("fp32", method="sgd"), seeds=1)
    with pytest.raises(ValueError, match="strongly convex bound needs mu > 0"):
        C.check_setting(O.least_squares(4, 40, num_samples=16, features="random"),
                        C.Setting("fp32", method="sgd"), kind="strongly_convex")


def test_default_settings():
    names = [s.name for s in C.default_settings()]
    assert len(names) == 13 and names[0] == "fp32 SGD"
    assert "qdata B=2 +corr +gate" in names and "qdata B=8" in names


@pytest.mark.parametrize("setting", [
    C.Setting("qdata B=2", bits=2),
    C.Setting("qdata B=4 +corr", bits=4, correction=True),
    C.Setting("qdata B=4 +gate", bits=4, gate=True),
], ids=lambda s: s.name)
@pytest.mark.parametrize("targets", ["binary", "real"])  # real: fp32 targets on the link (num_classes None)
def test_noise_model_bounds_the_real_estimator(setting, targets):
    """The noise terms the bounds use hold for the real estimator at fixed points of the region:
    E||g - grad F||^2 <= sigma^2 + zeta^2 and ||E g - grad F|| <= zeta.

    Tolerance: M = 2000 independent rounds (fresh minibatch and codec randomness each); the Monte Carlo
    mean of ||g - grad F||^2 is compared with 5 of its own standard errors of slack, and ||mean g - grad F||
    with 5 standard errors of the mean (sqrt(tr Cov / M)).
    """
    import jax
    import jax.numpy as jnp

    obj = O.least_squares(6, num_samples=128, seed=3, targets=targets)
    noise, _ = C.noise_model(obj, setting, batch=8)
    rnd = C.build_round(obj, setting)
    x, y = jnp.asarray(obj.x), jnp.asarray(obj.y)

    @jax.jit
    def draws(w, keys):
        def one(key):
            kb, ke = jax.random.split(key)
            idx = jax.random.randint(kb, (8,), 0, x.shape[0])
            return rnd.step(ke, w, {"x": x[idx], "y": y[idx]}, rnd.init(w))[0]

        return jax.vmap(one)(keys)

    M = 2000
    for w in (obj.w0.astype(np.float64), obj.w_star, obj.center + 0.9 * obj.radius * np.eye(obj.d)[0]):
        g = np.asarray(draws(jnp.asarray(w, jnp.float32), jax.random.split(jax.random.key(1), M)), np.float64)
        err = g - obj.full_grad(w)
        sq = np.sum(err**2, axis=1)
        assert sq.mean() <= noise.sigma2 + noise.bias**2 + 5 * sq.std() / math.sqrt(M), setting.name
        se_mean = math.sqrt(np.sum(err.var(axis=0)) / M)
        assert np.linalg.norm(err.mean(axis=0)) <= noise.bias + 5 * se_mean, setting.name
        # The Monte Carlo sees the noise at all: at least half the exact sampling variance V(w)/b at w.
        assert sq.mean() >= 0.5 * O.per_sample_variance(obj, w) / 8
