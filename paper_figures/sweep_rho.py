"""Accuracy and bits against the gate's budget rho (the expected share of each batch sent): qdata
runs that differ in the gate and rho alone, one line per gate; the gate off is drawn at rho = 1,
where DESIGN.md puts it (:mod:`paper_figures.sweeps`)."""

from __future__ import annotations

from pathlib import Path

from paper_figures import canvas
from paper_figures.discover import Run
from paper_figures.sweeps import Sweep, accuracy, find_sweeps, readable_accuracy_axis, per_round, plot_line

NAME, FIGURE = "accuracy_bits_vs_rho", "accuracy and bits vs the gate's budget rho"
NEEDS = "no qdata runs that differ in the gate's budget rho alone (two values at least; the gate off counts as 1)"


def find(runs: list[Run]) -> list[Sweep]:
    return find_sweeps(runs, "rho", ("gate", "rho"), lambda cfg: 1.0 if cfg["gate"] == "off" else cfg["rho"],
                       lambda cfg: "gate off (rho = 1)" if cfg["gate"] == "off" else f"{cfg['gate']} gate")


def draw_sweep(sweep: Sweep, path: Path, caption) -> canvas.Figure:
    plt = canvas.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (label, points) in enumerate(sweep.lines.items()):
        plot_line(a1, points, accuracy, color=f"C{i}", label=label)
        plot_line(a2, points, per_round, color=f"C{i}", label=f"{label}: uplink")
        plot_line(a2, points, lambda run: per_round(run, total=True), color=f"C{i}", linestyle="--",
                   label=f"{label}: total (uplink + downlink)")
    rhos = sorted({r for points in sweep.lines.values() for r in points})
    for ax in (a1, a2):
        ax.set_xticks(rhos)
        ax.set_xlabel("gate budget rho (expected share of each batch sent)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    a1.set_ylabel("final test accuracy")
    readable_accuracy_axis(a1)
    a2.set_yscale("log")
    a2.set_ylabel("bits per node per round (mean over the run)")
    note = ("mean over seeds (bars: min-max); a point at several learning rates: the one with the best mean "
            "final validation (else test) accuracy; downlink as qdata compare charges it")
    return canvas.save(fig, path, caption(note), "Test accuracy and bits vs the gate's budget rho")
