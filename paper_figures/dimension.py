"""Uplink bits per node per round against the model dimension d at fixed n (DESIGN.md section 6's
communication claim, on real runs): runs of one dataset, nodes and batch that differ in the model
alone, one line per method. Measured from the runs' own ledgers (exact, read off the packed
payloads), nothing computed from a formula; the model broadcast, 32 d, is drawn for reference."""

from __future__ import annotations

import statistics
from pathlib import Path

from paper_figures import canvas, captions, series
from paper_figures.discover import Found, Run
from paper_figures.sweeps import per_round, source


def find(runs: list[Run]) -> list[dict[str, dict[int, list[Run]]]]:
    """Groups (fixed dataset, nodes, batch, partition, rounds) of method label -> d -> runs, with >= 2 d."""
    groups: dict[tuple, dict[str, dict[int, list[Run]]]] = {}
    for run in runs:
        cfg = run.header["config"]
        key = (run.header["dataset"]["name"], run.header["dataset"]["n"], cfg["num_nodes"], cfg["batch_size"],
               cfg["partition"], cfg["rounds"])
        label = series.describe_method(cfg)
        by_d = groups.setdefault(key, {}).setdefault(label, {})
        by_d.setdefault(run.header["model"]["params"], []).append(run)
    return [g for g in groups.values() if len({d for by_d in g.values() for d in by_d}) >= 2]


def draw_group(group: dict[str, dict[int, list[Run]]], path: Path, caption) -> canvas.Figure:
    plt = canvas.pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    dims = sorted({d for by_d in group.values() for d in by_d})
    ax.plot(dims, [32 * d for d in dims], color="grey", linestyle=":", label="model broadcast, 32 d (downlink)")
    for i, (label, by_d) in enumerate(group.items()):
        ds = sorted(by_d)
        # Runs of one method at one d on several seeds (or learning rates): their mean.
        ys = [statistics.fmean(per_round(r) for r in by_d[d]) for d in ds]
        qdata = next(iter(by_d.values()))[0].header["config"]["method"] == "qdata"
        ax.plot(ds, ys, label=label, **{**canvas.method_style(i, qdata), "marker": "o", "markersize": 4})
    models = {r.header["model"]["params"]: r.header["model"]["name"] for by_d in group.values()
              for runs in by_d.values() for r in runs}
    # Which model is at which d, beside the legend: close d's would make labels on the axes collide.
    fig.text(0.73, 0.12, "models:\n" + "\n".join(f"d = {d:,}: {models[d]}" for d in dims), fontsize=7,
             va="bottom", ha="left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model dimension d (parameters)")
    ax.set_ylabel("uplink bits per node per round (mean over the run)")
    ax.grid(True, which="both", alpha=0.3)
    canvas.side_legend(fig, ax, 0.72)
    note = ("measured: each run's exact uplink ledger over its rounds and nodes, mean over seeds; "
            "the models differ, the data dimension n does not")
    return canvas.save(fig, path, caption(note), "Uplink bits per round vs model dimension d at fixed n",
                       rect_right=0.72)


def draw(found: Found, out: Path) -> list:
    groups = find(found.all_runs())
    if not groups:
        return [canvas.Skipped("bits per round vs model dimension d",
                               "no runs of one dataset, nodes and batch with two models or more")]
    items = []
    for i, group in enumerate(groups):
        runs = [r for by_d in group.values() for rs in by_d.values() for r in rs]
        name = canvas.slug(f"bits_vs_dimension_{series.short_name(runs[0].header['dataset']['name'])}_{i + 1}")
        items.append(draw_group(group, out / f"{name}.png",
                                lambda note: captions.caption(runs, source(runs, found), note)))
    return items
