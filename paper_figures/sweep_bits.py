"""Accuracy against the data bits B, and against the data codes' bits per sample sent (issue 10's
bits-versus-accuracy curve): qdata runs that differ in B, coder or quantizer alone, one line per
coder and quantizer (:mod:`paper_figures.sweeps`).

Bits per sample sent: the run's data-code bits (data and metadata parts, all nodes, the whole run)
over the samples it sent. A fixed-length code sends n B bits a sample, so its data part counts its
samples exactly; results files record the count (``encoder_counts['samples_coded']``), and for
older ones a lossless coder (ANS) takes the count of its fixed-length twin (the same config with
``coder = "fixed"``, same seed), which sends the same samples. A run without a count is left off that
panel, and the caption says so.
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import canvas
from paper_figures.discover import Run
from paper_figures.sweeps import (Sweep, accuracy, find_sweeps, mean_or_missing, plot_line, readable_accuracy_axis,
                                  sweep_runs)

NAME, FIGURE = "accuracy_vs_data_bits", "accuracy vs data bits B"
NEEDS = "no qdata runs that differ in the data bits B alone (same dataset, model, nodes, rounds, gate, ...)"
FIELDS = ("bits", "coder", "quantizer")


def find(runs: list[Run]) -> list[Sweep]:
    return find_sweeps(runs, "B", FIELDS, lambda cfg: cfg["bits"],
                       lambda cfg: f"coder {cfg['coder']}, {cfg['quantizer']} rounding")


def samples_counted(run: Run) -> int | None:
    """The samples whose codes a run sent, all nodes, the whole run, as its encoders counted them
    (``encoder_counts['samples_coded']``; None in results files written before the count)."""
    return run.rounds[-1].get("encoder_counts", {}).get("samples_coded")


def samples_sent(run: Run) -> int | None:
    """Samples a fixed-length run sent, all nodes, the whole run (None if its data part is not n B a sample)."""
    counted = samples_counted(run)
    if counted is not None:
        return counted
    cfg, n = run.header["config"], run.header["dataset"]["n"]
    data = run.rounds[-1]["cumulative_uplink_bits"].get("data", 0)
    if cfg["coder"] != "fixed" or data % (n * cfg["bits"]):
        return None
    return data // (n * cfg["bits"])


def _twin(run: Run, everyone: list[Run]) -> Run | None:
    cfg = {**run.header["config"], "coder": "fixed"}
    same = lambda other: all(other.header["config"].get(k) == v for k, v in cfg.items() if k != "name")
    return next((other for other in everyone if same(other)), None)


def bits_per_sample(run: Run, everyone: list[Run]) -> float | None:
    twin = run if run.header["config"]["coder"] == "fixed" or samples_counted(run) else _twin(run, everyone)
    sent = samples_sent(twin) if twin is not None else None
    if not sent:
        return None
    parts = run.rounds[-1]["cumulative_uplink_bits"]
    return (parts.get("data", 0) + parts.get("metadata", 0)) / sent


def _dodge(i: int, lines: int) -> float:
    """A line's sideways shift on the B axis, so lines of equal accuracy (a lossless coder's) stay visible."""
    return 0.08 * (i - (lines - 1) / 2)


def draw_sweep(sweep: Sweep, path: Path, caption) -> canvas.Figure:
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    plt = canvas.pyplot()
    everyone = sweep_runs(sweep)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    missing, ticks = [], []
    for i, (label, points) in enumerate(sweep.lines.items()):
        shift = _dodge(i, len(sweep.lines))
        plot_line(a1, points, accuracy, lambda b, runs: b + shift, color=f"C{i}", label=label)
        x = mean_or_missing(lambda r: bits_per_sample(r, everyone), missing, f"{label} B=")
        ticks += plot_line(a2, points, accuracy, x, tag="B", color=f"C{i}", label=label)
    if not ticks:  # an empty panel would read as a drawing fault
        a2.text(0.5, 0.5, "no run here has a sample count\n(no fixed-length twin of its coder)", ha="center",
                va="center", transform=a2.transAxes, fontsize=9, color="grey")
    a1.set_xticks(sorted({b for points in sweep.lines.values() for b in points}))
    a1.set_xlabel("data bits B per coordinate")
    a1.set_ylabel("final test accuracy")
    readable_accuracy_axis(a1)
    a2.set_xscale("log")
    a2.margins(x=0.12)  # room for the last point's tag
    a2.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
    a2.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    a2.xaxis.set_minor_locator(NullLocator())
    a2.tick_params(axis="x", labelsize=7, labelrotation=30)
    a2.set_xlabel("data-code bits per sample sent ((data + metadata parts) / samples sent), log")
    for ax in (a1, a2):
        ax.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    note = ("final test accuracy, mean over seeds (bars: min-max); lines dodged sideways on the B axis where "
            "they coincide (a lossless coder trains exactly as its fixed-length twin); a point at several "
            "learning rates: the one with the best mean final validation (else test) accuracy; bits per sample "
            "sent: exact, a lossless coder's samples counted by its fixed-length twin run")
    if missing:
        note += f"; not on the right panel (no sample count): {', '.join(missing)}"
    return canvas.save(fig, path, caption(note), "Test accuracy vs data bits B and vs bits per sample sent")
