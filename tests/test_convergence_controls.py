"""Negative controls (a checker that cannot fail is worthless), the report/CLI and the exact bit ledger
of the communication claim."""

import json
import math
import os

import pytest

from convergence import check as C
from convergence import objectives as O
from qdata.codecs import compressors

# Up to 4096: a control can only fail the slope test where the bound is informative, and with the
# large variance the mis-scaled compressors claim, the bound becomes informative at T ~ 2048.
T_GRID = (64, 128, 256, 512, 1024, 2048, 4096)
SEEDS = 4


@pytest.fixture(scope="module")
def lsq():
    return O.least_squares(10, num_samples=256, features="identity", seed=0)


def test_unscaled_random_k_fails(lsq):
    # E[g] = (k/d) grad F: the effective step is 10x smaller than the one the bound prescribes, so at
    # the horizons where the bound is informative the curve lies above it.
    control = C.negative_controls(lsq)[0]
    r = C.check_setting(lsq, control, T_grid=T_GRID, seeds=SEEDS)
    assert not r["passed"] and not r["bound_holds"]
    assert r["slope_empirical"] > r["slope_bound"] + r["slope_tol"]  # the slope test catches it too


def test_scaled_random_k_passes(lsq):
    # Positive control for the one above: the same compressor with its d/k scale passes.
    r = C.check_setting(lsq, C.Setting("randk k=1", method="compressed", compressor=compressors.randk(1)),
                        T_grid=T_GRID, seeds=SEEDS)
    assert r["passed"], r["ratio"]


def test_step_above_two_over_L_fails(lsq):
    # eta = 2.5 / L > 2 / L: gradient descent on a quadratic diverges along the top eigenvector.
    r = C.check_setting(lsq, C.negative_controls(lsq)[1], T_grid=T_GRID, seeds=SEEDS)
    assert not r["passed"] and not r["step_valid"]
    assert not r["bound_holds"]


def test_biased_estimator_fails(lsq):
    # A constant bias c, ||c|| = 0.3: SGD converges to the minimizer of F - <c, w>, a plateau at
    # ||c||^2 / (2 mu)-ish in function value, while the unbiased bound keeps decreasing as 1/sqrt(T).
    r = C.check_setting(lsq, C.negative_controls(lsq)[2], T_grid=T_GRID, seeds=SEEDS)
    assert not r["passed"] and not r["bound_holds"]
    assert r["slope_empirical"] > r["slope_bound"] + r["slope_tol"]  # a plateau


def test_cli_writes_report_and_figure(tmp_path, capsys):
    out = tmp_path / "conv"
    rc = C.main(["--out", str(out), "--tmin", "6", "--tmax", "7", "--seeds", "2", "--objectives", "least_squares",
                 "--settings", "fp32 SGD", "--no-comm", "--no-controls"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["results"]) == 1
    r = report["results"][0]
    for key in ("bound", "empirical_mean", "empirical_halfwidth95", "ratio", "slope_empirical", "slope_bound",
                "passed", "noise"):
        assert key in r
    assert report["objectives"]["least_squares"]["methods"]["L"]
    assert os.path.getsize(out / "least_squares.png") > 0
    printed = capsys.readouterr().out
    assert "least_squares" in printed and "fp32 SGD" in printed and "worst ratio" in printed


@pytest.mark.parametrize("targets", ["real", "binary"])
def test_communication_bits_are_exact(targets):
    n, b, k, s = 4, 8, 16, 16
    comm = C.communication_claim((20, 400), n=n, num_samples=64, bits=8, k=k, qsgd_levels=s, batch=b,
                                 measure_rounds=False, targets=targets)
    # Real targets travel as fp32 values (32 bits each); binary labels at 1 bit, packed in bytes.
    label_bits = 32 * b if targets == "real" else 8 * math.ceil(b / 8)
    for row in comm["rows"]:
        d = row["d"]
        w = math.ceil(math.log2(d))
        data_and_labels = b * 8 * n + label_bits  # B=8: one byte per coordinate
        assert row["qdata B=8"]["bits_per_round"] == data_and_labels
        assert row[f"qdata B=8 +corr(randk k={k})"]["bits_per_round"] == data_and_labels + 32 * k + 8 * math.ceil(k * w / 8)
        assert row["fp32 SGD"]["bits_per_round"] == 32 * d
        assert row[f"QSGD s={s}"]["bits_per_round"] == 32 + 8 * math.ceil(d * (1 + 5) / 8)
    assert comm["bits_claim_holds"]
    assert comm["bits_growth"]["fp32 SGD"] == pytest.approx(20.0)
    assert comm["bits_slope"]["fp32 SGD"] == pytest.approx(1.0)
    assert comm["bits_growth"][f"qdata B=8 +corr(randk k={k})"] <= comm["log_factor"]
