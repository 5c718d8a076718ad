"""Test accuracy against cumulative uplink bits and against total (uplink + downlink) bits per node,
log x, every method of a setting, both targets of the comparison protocol marked, and the one-shot
floors where the compare recorded them."""

from __future__ import annotations

import statistics
from pathlib import Path

from qdata.compare import TARGETS
from paper_figures import canvas, captions, series
from paper_figures.discover import Found

RIGHT = 0.78  # the axes' share of the width; the legend is beside them
FLOOR_STYLES = ("-.", (0, (1, 3)), (0, (5, 2, 1, 2)))


def _targets(group: series.Group) -> dict[str, float] | None:
    finals = series.sgd_finals(group)
    if not finals:
        return None
    mean = statistics.fmean(finals)
    return {name: rule(mean) for name, rule in TARGETS.items()}


def _draw_panels(axes, group: series.Group, targets) -> None:
    for ax, measure in zip(axes, ("uplink", "total")):
        for i, (label, runs) in enumerate(group.methods.items()):
            def bits(run, record):
                down = series.downlink_per_node(run, record) if measure == "total" else 0.0
                return record["cumulative_uplink_bits_per_node"] + down

            rounds, xs = series.mean_curve(runs, bits)
            _, ys = series.mean_curve(runs, lambda run, record: record["test_accuracy"])
            ax.plot(xs, ys, label=label, **canvas.method_style(i, runs[0].header["config"]["method"] == "qdata"))
        for (name, acc), style in zip((targets or {}).items(), (":", "--")):
            ax.axhline(acc, color="grey", linestyle=style, linewidth=1, label=f"target {name} ({acc:.3f})")
        floors = (group.compare.summary.get("floors") or []) if group.compare else []
        for floor, style in zip(floors, FLOOR_STYLES):
            ax.axvline(floor["bits"], color="black", linestyle=style, alpha=0.8,
                       label=f"floor: {floor['label']}, {floor['bits']:,.0f} bits")
            if floor.get("accuracy") is not None:
                ax.plot([floor["bits"]], [floor["accuracy"]], marker="*", markersize=11, color="black")
        ax.set_xscale("log")
        ax.set_xlabel(f"cumulative {measure} bits per node" + (" (uplink + downlink)" if measure == "total" else ""))
        ax.grid(True, which="both", alpha=0.3)


def draw_group(group: series.Group, path: Path) -> canvas.Figure:
    plt = canvas.pyplot()
    rows = len(group.methods) + 2 + (len((group.compare.summary.get("floors") or [])) if group.compare else 0)
    fig, axes = plt.subplots(1, 2, figsize=(15, max(5.0, 0.17 * rows + 1.5)), sharey=True)
    targets = _targets(group)
    _draw_panels(axes, group, targets)
    axes[0].set_ylabel("test accuracy")
    canvas.side_legend(fig, axes[1], RIGHT)
    runs = [r for rs in group.methods.values() for r in rs]
    note = ("curves: mean over seeds at each evaluation (solid: qdata, dashed: the others); downlink as qdata "
            "compare charges it (model broadcast and replies, or for a gradient compressor the relay of the "
            "other nodes' messages where cheaper)")
    note += ("; targets from SGD's final test accuracy (mean over seeds; of several SGD learning rates, the best "
             "on validation): 95% of it and it minus 1 point"
             if targets else "; no SGD run in this setting, so no targets are marked")
    if any(series.one_shot(rs[0]) for rs in group.methods.values()):
        note += ("; a one-shot method (DCA, dispatch) sends all its bits, up and down, before its first round: "
                 "its curve is vertical, the training that follows costs no bits")
    if group.compare is not None:
        note += "; each method at the learning rate the compare chose on validation"
        if group.compare.summary.get("floors"):
            note += "; floors: each node ships its shard once (vertical line; star: the central model's accuracy)"
    title = f"Test accuracy vs cumulative bits per node: {group.title}"
    return canvas.save(fig, path, captions.caption(runs, group.source, note), title, rect_right=RIGHT)


def draw(found: Found, out: Path) -> list:
    groups = series.groups(found)
    if not groups:
        return [canvas.Skipped("accuracy vs bits", "no training runs")]
    return [draw_group(g, out / f"accuracy_vs_bits_{g.name}.png") for g in groups]
