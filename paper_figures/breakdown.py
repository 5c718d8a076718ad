"""Bits per node per round by ledger part, per method: the uplink split into the parts the results
record (data codes, metadata, labels, gate weights and mask, cache positions, corrections,
integrity headers, compressed gradients), and beside it the downlink (model broadcast, the
learner's replies, or the relay a gradient compressor is charged where cheaper)."""

from __future__ import annotations

import statistics
from pathlib import Path

from qdata.compare import relays
from paper_figures import canvas, captions, series
from paper_figures.discover import Found, Run

# The ledger's part names, in the order a message is read, and what a reader calls them.
PARTS = {"data": "data codes", "metadata": "data metadata (ranges, coder model)", "labels": "labels",
         "weights": "gate weights", "mask": "gate mask", "positions": "cache positions",
         "correction": "corrections", "gradient": "compressed gradient", "integrity": "integrity headers",
         "activations": "cut-layer activations (split)", "node_layers": "node-held layers (split)",
         "top_gradients": "top-layer gradients (U-shaped split)",
         "fit_samples": "k-means fit sample (dispatch)", "distances": "centre distances (balanced dispatch)",
         "cluster_counts": "cluster counts (unbalanced dispatch)", "samples": "moved samples (dispatch)",
         "counts": "per-destination counts (dispatch)"}


# Greys and black: the right panel's bars are directions, not the left panel's coloured parts.
DIRECTION_COLOURS = ("0.15", "0.55", "0.8", "0.35")


def uplink_parts(run: Run) -> dict[str, float]:
    """Each recorded uplink part's bits per node per round, over the whole run."""
    last = run.rounds[-1]
    scale = run.header["config"]["num_nodes"] * last["round"]
    return {k: v / scale for k, v in last["cumulative_uplink_bits"].items() if k != "total"}


def downlink_parts(run: Run) -> dict[str, float]:
    """The downlink bits per node per round, split where the results say how."""
    last = run.rounds[-1]
    if relays(run.header, run.rounds):
        return {"relay of the other nodes' messages": series.downlink_per_node(run, last) / last["round"]}
    total = run.header["downlink_bits_per_node_per_round"]
    parts = run.header.get("downlink_parts_per_node_per_round")
    if parts and sum(parts.values()) == total:
        return {"model broadcast" if k == "model" else "learner's replies": v for k, v in parts.items()}
    return {"downlink": total}


def _mean_parts(runs: list[Run], parts) -> dict[str, float]:
    each = [parts(run) for run in runs]
    keys = [k for k in each[0] if all(k in e for e in each)]
    return {k: statistics.fmean(e[k] for e in each) for k in keys}


def _share_panel(ax, labels, ups, plt) -> None:
    """Left: each method's uplink as shares of its parts (100% stacked bars), its total written."""
    present = [k for k in {**PARTS, **{k: k for u in ups for k in u}} if any(u.get(k, 0) > 0 for u in ups)]
    left = [0.0] * len(labels)
    # A part's colour is fixed: tab20's dark shades for the first ten, then its light ones.
    colours = {part: plt.cm.tab20((2 * i) % 20 + (i // 10) % 2)
               for i, part in enumerate([*PARTS, *(p for p in present if p not in PARTS)])}
    for part in present:
        shares = [100 * u.get(part, 0) / (sum(u.values()) or 1) for u in ups]
        ax.barh(labels, shares, left=left, color=colours[part], label=PARTS.get(part, part))
        left = [a + b for a, b in zip(left, shares)]
    for y, u in enumerate(ups):
        ax.text(101, y, f"{sum(u.values()):,.0f}", va="center", fontsize=7)
    ax.set_xlim(0, 125)
    ax.set_xticks(range(0, 101, 25))
    ax.set_xlabel("share of the uplink by ledger part (%); the number: uplink bits per node per round")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3, frameon=False)


def _bits_panel(ax, labels, ups, downs) -> None:
    """Right: uplink and each downlink part, bits per node per round, log x (side by side, not stacked)."""
    kinds = sorted({k for d in downs for k, v in d.items() if v > 0})  # no legend entry for a bar drawn nowhere
    height = 0.8 / (1 + len(kinds))
    for j, kind in enumerate(["uplink"] + kinds):
        values = [sum(u.values()) if kind == "uplink" else d.get(kind, 0) for u, d in zip(ups, downs)]
        ys = [y - 0.4 + height * (j + 0.5) for y in range(len(labels))]
        ax.barh(ys, [v if v > 0 else float("nan") for v in values], height=height, label=kind,
                color=DIRECTION_COLOURS[j % len(DIRECTION_COLOURS)])
    ax.set_xscale("log")
    ax.set_xlabel("bits per node per round (log; a missing bar: none)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)


def draw_group(group: series.Group, path: Path) -> canvas.Figure:
    plt = canvas.pyplot()
    labels = list(group.methods)
    ups = [_mean_parts(runs, uplink_parts) for runs in group.methods.values()]
    downs = [_mean_parts(runs, downlink_parts) for runs in group.methods.values()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 0.3 * len(labels) + 3.2), sharey=True)
    _share_panel(a1, labels, ups, plt)
    _bits_panel(a2, labels, ups, downs)
    a1.invert_yaxis()
    runs = [r for rs in group.methods.values() for r in rs]
    note = ("each part's exact cumulative bits (read off the packed payloads) over the run's rounds and nodes, "
            "mean over seeds; downlink as qdata compare charges it")
    if not all("downlink_parts_per_node_per_round" in r.header for r in runs):
        note += "; runs recorded before the downlink was split show it as one bar"
    return canvas.save(fig, path, captions.caption(runs, group.source, note),
                       f"Bits per node per round by ledger part: {group.title}")


def draw(found: Found, out: Path) -> list:
    groups = series.groups(found)
    if not groups:
        return [canvas.Skipped("bits breakdown", "no training runs")]
    return [draw_group(g, out / f"bits_breakdown_{g.name}.png") for g in groups]
