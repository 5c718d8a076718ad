"""The convergence checks' figures, drawn from their results file (``report.json``) alone, so they
can be redrawn without rerunning the checks (``python -m paper_figures RUNS_DIR`` does).

* :func:`plot_objective`: per objective, the empirical curve (seed mean and 95% band) against the
  bound, log-log, one panel per estimator setting;
* :func:`plot_communication`: bits per round and rounds to a fixed accuracy against d;
* :func:`draw_report`: every figure of a report, each with its caption line (data: synthetic;
  the objective's dimensions; one node; the horizons T; seeds; the command that produced it).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import textwrap
from pathlib import Path

import numpy as np

CAPTION_CHARS_PER_INCH = 17


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, caption: str, top: float) -> None:
    """Write ``fig`` with ``caption`` wrapped under the axes (room kept for it)."""
    plt = _pyplot()
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(caption, int(width * CAPTION_CHARS_PER_INCH))
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7.5, va="bottom", ha="left")
    fig.tight_layout(rect=(0, (len(lines) * 0.15 + 0.1) / height, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command(report: dict) -> str:
    """The ``python -m convergence`` command line that wrote ``report`` (from its recorded options)."""
    cfg = report["config"]
    words = ["python", "-m", "convergence", "--out", str(cfg["out"])]
    for option in ("tmin", "tmax", "seeds", "batch", "slope_tol", "targets"):
        words += [f"--{option.replace('_', '-')}", str(cfg[option])]
    for option in ("bits", "objectives", "settings", "comm_dims"):
        if cfg.get(option):
            words += [f"--{option.replace('_', '-')}", *map(str, cfg[option])]
    words += [f"--{flag.replace('_', '-')}" for flag in ("no_comm", "no_controls") if cfg.get(flag)]
    return shlex.join(words)


def objective_caption(report: dict, name: str) -> str:
    o, T = report["objectives"][name], report["config"]["T_grid"]
    results = [r for r in report["results"] if r["objective"] == name]
    return (f"Dataset: SYNTHETIC data, {o['description']}. Model: the objective's parameters, d={o['d']}. "
            f"Nodes: 1 (one node's estimator, batch b={report['config']['batch']}). Rounds: T = {T[0]}..{T[-1]} "
            f"({len(T)} horizons, each its own run). Seeds: {results[0]['seeds'] if results else '-'} per T. "
            f"Source: {command(report)} (report.json).")


def plot_objective(report: dict, name: str, path: str | os.PathLike) -> None:
    """Empirical curve (mean and 95% band) against the bound, log-log, one panel per setting."""
    plt = _pyplot()
    results = [r for r in report["results"] if r["objective"] == name]
    cols = min(4, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.5, 3.3 * rows + 1.6), squeeze=False)
    for ax, r in zip(axes.flat, results):
        T, m = np.asarray(r["T"]), np.asarray(r["empirical_mean"])
        h = np.nan_to_num(np.asarray(r["empirical_halfwidth95"]))
        ax.loglog(T, r["bound"], "-", color="C3", label="bound")
        ax.loglog(T, m, "o-", color="C0", ms=3, label="empirical (mean)")
        ax.fill_between(T, np.maximum(m - h, m * 1e-3), m + h, color="C0", alpha=0.25, label="95% band")
        ax.axhline(r["start_value"], color="gray", ls="--", lw=0.8, label="value at w0 (bound vacuous above)")
        slopes = ("n/a (bound informative at < 2 T)" if math.isnan(r["slope_bound"]) else
                  f"{r['slope_empirical']:.2f} (bound {r['slope_bound']:.2f})")
        ax.set_title(f"{r['setting']['name']}: {'PASS' if r['passed'] else 'FAIL'}"
                     f"{'' if r['informative'] else ' (vacuous at T_max)'}\n"
                     f"worst ratio {r['worst_ratio']:.2g}, slope {slopes}", fontsize=8)
        ax.set_xlabel("T (rounds)", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes.flat[0].set_ylabel(results[0]["quantity"], fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{name}: {results[0]['quantity']} vs its bound ({results[0]['kind']}); settings: fp32 SGD and "
                 "qdata (B bits, +corr = random-k correction, +gate = Bernoulli gate)", fontsize=9, wrap=True)
    _save(fig, path, objective_caption(report, name), top=1 - 0.5 / fig.get_size_inches()[1])


def communication_caption(report: dict) -> str:
    comm = report["communication"]
    return (f"Dataset: SYNTHETIC data, ridge regression on random features ({comm.get('targets', 'binary')} "
            f"targets), n={comm['n']}, N={comm['N']}. Model: ridge on d random features, d={comm['dims'][0]}.."
            f"{comm['dims'][-1]}. Nodes: 1 (one node's message, batch b={comm['batch']}). Rounds: up to "
            f"{comm['max_rounds']}. Seeds: {comm['seeds']}. Bits: exact, read off each estimator's packed message "
            f"at w0 (measured, not a formula). Source: {command(report)} (report.json).")


def _rounds_panel(ax, comm: dict, labels: list[str], d) -> None:
    """Rounds to the target accuracy against d: the bound's prediction and the measured rounds."""
    big = 2.0 * comm["max_rounds"]  # where "not reached" (inf) is drawn
    # None (not run) is a gap; inf (run, target not reached; or no finite prediction) is drawn at ``big``.
    clip = lambda v: float("nan") if v is None else (big if not math.isfinite(v) else v)
    for i, lab in enumerate(labels):
        if comm["rows"][0][lab]["rounds_at_fp32_step"] is None:
            continue
        ax.loglog(d, [clip(r[lab]["rounds_predicted"]) for r in comm["rows"]], "--", color=f"C{i}",
                  label=f"{lab}: bound")
        if any(r[lab]["rounds_measured"] is not None for r in comm["rows"]):
            ax.loglog(d, [clip(r[lab]["rounds_measured"]) for r in comm["rows"]], "o-", color=f"C{i}",
                      label=f"{lab}: measured, own step")
        ax.loglog(d, [clip(r[lab]["rounds_at_fp32_step"]) for r in comm["rows"]], "s:", color=f"C{i}",
                  label=f"{lab}: measured, fp32 step")
    ax.axhline(big, color="gray", lw=0.5)
    ax.text(d[0], big * 1.05, "not reached / inf", fontsize=7, color="gray")
    ax.set_xlabel("model dimension d (random features)")
    ax.set_ylabel(f"rounds to E||w-w*||^2 <= {comm['accuracy']} ||w0-w*||^2")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def plot_communication(report: dict, path: str | os.PathLike) -> None:
    """Bits per round against d (left) and rounds to the target accuracy against d (right), log-log."""
    plt = _pyplot()
    comm = report["communication"]
    labels = [k for k in comm["rows"][0] if isinstance(comm["rows"][0][k], dict)]
    d = np.asarray([r["d"] for r in comm["rows"]])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 6.5))
    for i, lab in enumerate(labels):
        a1.loglog(d, [r[lab]["bits_per_round"] for r in comm["rows"]], "o-", color=f"C{i}", label=lab)
    a1.set_xlabel("model dimension d (random features)")
    a1.set_ylabel("uplink bits per node per round")
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    _rounds_panel(a2, comm, labels, d)
    fig.suptitle(f"Bits per round and rounds to accuracy vs d at fixed n={comm['n']}; qdata B={comm['bits']}, "
                 f"correction random-k k={comm['k']}, QSGD s={comm['qsgd_levels']}", fontsize=9, wrap=True)
    _save(fig, path, communication_caption(report), top=0.93)


def draw_report(report_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """Every figure of the convergence report at ``report_path`` into ``out_dir``: one per objective
    (``<objective>.png``) and the communication claim (``communication.png``) if it was run.
    Returns ``(path, caption)`` per figure."""
    report = json.loads(Path(report_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name in report["objectives"]:
        if any(r["objective"] == name for r in report["results"]):
            plot_objective(report, name, out / f"{name}.png")
            drawn.append((out / f"{name}.png", objective_caption(report, name)))
    if report.get("communication"):
        plot_communication(report, out / "communication.png")
        drawn.append((out / "communication.png", communication_caption(report)))
    return drawn
