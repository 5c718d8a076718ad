"""Training loss against rounds, every method of a setting (the loss each evaluation records: the
mean per-sample loss on up to 2,048 training samples, :func:`qdata.run._evaluator`)."""

from __future__ import annotations

import math
from pathlib import Path

from paper_figures import canvas, captions, series
from paper_figures.discover import Found

RIGHT = 0.75  # the axes' share of the width; the legend is beside them


def _has_loss(runs) -> bool:
    return all("train_loss" in r for run in runs for r in run.rounds)


def draw_group(group: series.Group, methods: dict, path: Path) -> canvas.Figure:
    plt = canvas.pyplot()
    fig, ax = plt.subplots(figsize=(11, max(4.8, 0.17 * len(methods) + 1.5)))
    diverged, drawn, same = [], {}, []
    for i, (label, runs) in enumerate(methods.items()):
        rounds, ys = series.mean_curve(runs, lambda run, record: record["train_loss"])
        twin = next((other for other, curve in drawn.items() if curve == (rounds, ys)), None)
        if twin is not None:  # e.g. a lossless coder trains exactly as its fixed-length twin
            same.append(f"{label} on {twin}")
        drawn[label] = (rounds, ys)
        finite = [(t, y) for t, y in zip(rounds, ys) if math.isfinite(y)]
        if len(finite) < len(rounds):
            diverged.append(label)
        ax.plot([t for t, _ in finite], [y for _, y in finite], label=label,
                **canvas.method_style(i, runs[0].header["config"]["method"] == "qdata"))
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    canvas.side_legend(fig, ax, RIGHT)
    note = "training loss: mean cross-entropy on the first 2,048 training samples (all, if fewer), mean over seeds at each evaluation (solid: qdata, dashed: the others), log y"
    if same:
        note += f"; identical curves, the later drawn over the earlier: {', '.join(same)}"
    if diverged:
        note += f"; non-finite losses (diverged) not drawn: {', '.join(diverged)}"
    runs = [r for rs in methods.values() for r in rs]
    return canvas.save(fig, path, captions.caption(runs, group.source, note),
                       f"Training loss vs rounds: {group.title}", rect_right=RIGHT)


def draw(found: Found, out: Path) -> list:
    items = []
    for group in series.groups(found):
        methods = {label: runs for label, runs in group.methods.items() if _has_loss(runs)}
        if not methods:
            items.append(canvas.Skipped(f"training loss ({group.title})", "its results record no train_loss"))
            continue
        items.append(draw_group(group, methods, out / f"train_loss_{group.name}.png"))
    return items or [canvas.Skipped("training loss", "no training runs")]
