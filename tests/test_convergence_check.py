"""Reduced versions of the convergence checks: every objective, fp32 SGD and a qdata setting, small T.

Statistical margin: the checks compare the mean over seeds with a worst-case bound. On these objectives
the full run (python -m convergence) shows worst ratios of at most ~0.3 wherever the bound is informative,
and the 95% band (reported in each result) is far narrower than the gap, so a pass here does not hinge
on luck; a failure means the bound, the constants or the estimator changed.
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
