"""Accuracy against the data codes' bits per sample sent, across bases (issue 10's curve for B, basis
and coder choices): qdata runs equal up to their data code (pixel codes of B bits, fixed or
entropy-coded; transform codes of ``sample_bits`` in the DCT or a node's PCA basis), one line per
basis, rounding and coder (:mod:`paper_figures.sweeps`). Drawn where a transform run is among them;
pixel codes alone are :mod:`paper_figures.sweep_bits`' figure.

Bits per sample sent: the run's data-code bits (data, metadata and the transform's one-off setup
parts, all nodes, the whole run) over the samples it sent. A transform code sends ``sample_bits`` a
sample in its data part, a fixed-length pixel code n B, so the data part counts their samples
exactly; an entropy-coded run takes the count of its fixed-length twin (:func:`sweep_bits.bits_per_sample`).
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import canvas, sweep_bits
from paper_figures.discover import Run
from paper_figures.sweeps import (Sweep, accuracy, find_sweeps, mean_or_missing, plot_line, readable_accuracy_axis,
                                  sweep_runs)

NAME, FIGURE = "accuracy_vs_bits_per_sample", "accuracy vs bits per sample across bases"
NEEDS = "no transform-coded qdata runs beside other qdata runs of the same setting"
FIELDS = ("bits", "coder", "quantizer", "transform", "sample_bits")


def _basis(cfg: dict) -> str:
    return cfg.get("transform", "none")


def _knob(cfg: dict) -> float:
    """Where a run sits on its line: its budget (sample_bits) or its B (pixel codes)."""
    return cfg["sample_bits"] if _basis(cfg) != "none" else cfg["bits"]


def _line(cfg: dict) -> str:
    basis = "pixels" if _basis(cfg) == "none" else f"{_basis(cfg).upper()} basis"
    return f"{basis}, {cfg['quantizer']} rounding, coder {cfg['coder']}"


def find(runs: list[Run]) -> list[Sweep]:
    sweeps = find_sweeps(runs, "bits per sample", FIELDS, _knob, _line)
    return [s for s in sweeps if any(not label.startswith("pixels") for label in s.lines)]


def bits_per_sample(run: Run, everyone: list[Run]) -> float | None:
    cfg, parts = run.header["config"], run.rounds[-1]["cumulative_uplink_bits"]
    if _basis(cfg) == "none":
        return sweep_bits.bits_per_sample(run, everyone)
    data = parts.get("data", 0)
    sent = sweep_bits.samples_counted(run)
    if sent is None and data and not data % cfg["sample_bits"]:
        sent = data // cfg["sample_bits"]
    if not sent:
        return None
    return (data + parts.get("metadata", 0) + parts.get("setup", 0)) / sent


def draw_sweep(sweep: Sweep, path: Path, caption) -> canvas.Figure:
    from matplotlib.ticker import StrMethodFormatter

    plt = canvas.pyplot()
    everyone = sweep_runs(sweep)
    fig, ax = plt.subplots(figsize=(12, 5))
    missing, ticks = [], []
    for i, (label, points) in enumerate(sweep.lines.items()):
        x = mean_or_missing(lambda r: bits_per_sample(r, everyone), missing, f"{label} at ")
        tag = "B" if label.startswith("pixels") else "budget"
        ticks += plot_line(ax, points, accuracy, x, tag=tag, color=f"C{i}", label=label)
    ax.set_xscale("log")
    ax.margins(x=0.1)
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.xaxis.set_minor_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.set_xlabel("data-code bits per sample sent ((data + metadata + setup parts) / samples sent), log")
    ax.set_ylabel("final test accuracy")
    readable_accuracy_axis(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the points fill the axes
    note = ("final test accuracy, mean over seeds (bars: min-max); a point at several learning rates: the one with "
            "the best mean final validation (else test) accuracy; bits per sample sent: exact, a transform's "
            "setup spread over its samples, an entropy coder's samples counted by its fixed-length twin")
    if missing:
        note += f"; left off (no sample count): {', '.join(missing)}"
    return canvas.save(fig, path, caption(note), "Test accuracy vs bits per sample sent, pixel and transform codes")
