"""A negative control on the qdata path (issue 12, item 5): the Bernoulli gate without its 1/p
weights must fail the convergence check, and the same gate with them must pass it, informatively.

Horizons to 2^13 (the CLI's default T_max): the unweighted gate's curve crosses the bound at 2^12 and
sits 1.35x above it at 2^13 on the controls' objective, while the weighted one stays under 0.21x
(convergence.check.CONTROL_RHO has the measurements). Both margins are far wider than the 95% band
over seeds, so neither outcome hinges on luck.
"""

import pytest

from convergence import check as C

T_GRID = tuple(2**k for k in range(6, 14))
SEEDS = 4


@pytest.fixture(scope="module")
def objective():
    return C.control_objective()


def test_the_gate_without_its_weights_fails(objective):
    control = next(s for s in C.negative_controls(objective) if s.gate_override is not None)
    r = C.check_setting(objective, control, T_grid=T_GRID, seeds=SEEDS)
    assert not r["passed"] and not r["bound_holds"]
    assert r["ratio"][-1] > 1.15  # above the bound at T_max, by more than the band
    assert r["slope_empirical"] > r["slope_bound"] + r["slope_tol"]  # a plateau, not the predicted rate
    assert r["informative"] and r["region_ok"] and r["finite"] and r["step_valid"]  # failing for the bias alone


def test_the_same_gate_with_its_weights_passes_informatively(objective):
    r = C.check_setting(objective, C.Setting("qdata B=8 +gate", bits=8, gate=True, rho=C.CONTROL_RHO),
                        T_grid=T_GRID, seeds=SEEDS)
    assert r["passed"] and r["informative"]
    assert max(r["ratio"]) < 0.5


def test_gate_override_needs_a_gated_qdata_setting():
    with pytest.raises(ValueError, match="gate_override replaces the gate of a qdata setting"):
        C.Setting("x", method="sgd", gate_override=C.unweighted_gate(0.5))
