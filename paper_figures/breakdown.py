"""Bits per node per round by ledger part, per method: the uplink split into the parts the results
record (data codes, metadata, labels, gate weights and mask, cache positions, corrections,
integrity headers, compressed gradients), and beside it the downlink (model broadcast, the
learner's replies, or the relay a gradient compressor is charged where cheaper). A one-shot method
(DCA, dispatch) sends everything before its first round: its bits are drawn per node, paid once
(hatched), not divided by the rounds of the training that follows."""

from __future__ import annotations

import statistics
from pathlib import Path

from qdata.compare import relays
from paper_figures import canvas, captions, series
from paper_figures.discover import Found, Run

# The ledger's part names, in the order a message is read, and what a reader calls them.
PARTS = {"data": "data codes", "metadata": "data metadata (ranges, coder model)",
         "setup": "transform setup (basis, once)", "refine": "refinement codes", "labels": "labels",
         "weights": "gate weights", "mask": "gate mask", "positions": "cache positions",
         "correction": "corrections", "gradient": "compressed gradient", "indices": "coordinate indices (significance)",
         "values": "coordinate values (significance)", "integrity": "integrity headers",
         "activations": "cut-layer activations (split)", "node_layers": "node-held layers (split)",
         "node_optimizer": "node-held optimizer state (sequential split)",
         "top_gradients": "top-layer gradients (U-shaped split)", "anchors": "anchor representations (DCA)",
         "count": "sample count (DCA)", "fit_samples": "k-means fit sample (dispatch)",
         "distances": "centre distances (balanced dispatch)", "cluster_counts": "cluster counts (unbalanced dispatch)",
         "samples": "moved samples (dispatch)", "counts": "per-destination counts (dispatch)"}

# The right panel's bars, by direction: greys, black and hatches (not the left panel's part colours);
# a one-shot method's bits, paid once, hatched, so they are not read as a recurring cost.
ONCE = {"hatch": "///", "edgecolor": "white", "linewidth": 0}
DIRECTIONS = {"uplink": {"color": "0.1"}, "uplink, paid once (one-shot)": {"color": "0.1", **ONCE},
              "model broadcast": {"color": "0.78"}, "learner's replies": {"color": "0.5"},
              "relay of the other nodes' messages": {"facecolor": "white", "edgecolor": "0.25", "hatch": "xxx"},
              "downlink": {"color": "0.62"}, "downlink, paid once (one-shot)": {"color": "0.5", **ONCE}}


def part_colours(plt, parts) -> dict:
    """A fixed colour per ledger part (PARTS' order, then ``parts`` not in it): tab20's dark shades,
    its light ones, then tab20b's and tab20c's dark ones: 30 distinct before any repeats."""
    palette = ([plt.cm.tab20(i) for i in range(0, 20, 2)] + [plt.cm.tab20(i) for i in range(1, 20, 2)]
               + [plt.cm.tab20b(i) for i in range(0, 20, 4)] + [plt.cm.tab20c(i) for i in range(0, 20, 4)])
    names = [*PARTS, *(p for p in parts if p not in PARTS)]
    return {part: palette[i % len(palette)] for i, part in enumerate(names)}


def uplink_parts(run: Run) -> dict[str, float]:
    """Each recorded uplink part's bits per node per round over the whole run; a one-shot method's
    bits per node, paid once (divided by the rounds of its later training they would shrink with them)."""
    last = run.rounds[-1]
    scale = run.header["config"]["num_nodes"] * (1 if series.one_shot(run) else last["round"])
    return {k: v / scale for k, v in last["cumulative_uplink_bits"].items() if k != "total"}


def directions(run: Run) -> dict[str, float]:
    """The uplink and the downlink parts (:data:`DIRECTIONS`), bits per node per round (a one-shot
    method's: once), the downlink as ``qdata compare`` charges it (:func:`series.downlink_per_node`)."""
    last = run.rounds[-1]
    if series.one_shot(run):
        down = series.downlink_per_node(run, last)
        return {"uplink, paid once (one-shot)": last["cumulative_uplink_bits_per_node"],
                "downlink, paid once (one-shot)": down}
    out = {"uplink": last["cumulative_uplink_bits_per_node"] / last["round"]}
    down = series.downlink_per_node(run, last) / last["round"]
    parts = run.header.get("downlink_parts_per_node_per_round")
    if relays(run.header, run.rounds):
        return {**out, "relay of the other nodes' messages": down}
    if parts and sum(parts.values()) > 0:  # the header's split, scaled to what was charged (replies may vary)
        names = {"model": "model broadcast", "replies": "learner's replies"}
        return {**out, **{names.get(k, k): down * v / sum(parts.values()) for k, v in parts.items() if v > 0}}
    return {**out, "downlink": down}


def _mean_parts(runs: list[Run], parts) -> dict[str, float]:
    each = [parts(run) for run in runs]
    keys = [k for k in each[0] if all(k in e for e in each)]
    return {k: statistics.fmean(e[k] for e in each) for k in keys}


def _legend_below(ax, ncol: int) -> None:
    """The legend under the axes' x label, a fixed distance (in inches, so however few the rows)."""
    from matplotlib.transforms import ScaledTranslation

    below = ax.transAxes + ScaledTranslation(0, -0.5, ax.figure.dpi_scale_trans)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=ncol,
              frameon=False)


def _share_panel(ax, labels, ups, once, plt) -> None:
    """Left: each method's uplink as shares of its parts (100% stacked bars), its total written."""
    present = [k for k in {**PARTS, **{k: k for u in ups for k in u}} if any(u.get(k, 0) > 0 for u in ups)]
    colours = part_colours(plt, present)
    left = [0.0] * len(labels)
    for part in present:
        shares = [100 * u.get(part, 0) / (sum(u.values()) or 1) for u in ups]
        ax.barh(labels, shares, left=left, color=colours[part], label=PARTS.get(part, part))
        left = [a + b for a, b in zip(left, shares)]
    for y, (u, o) in enumerate(zip(ups, once)):
        ax.text(101, y, f"{sum(u.values()):,.0f}" + (" once" if o else ""), va="center", fontsize=7)
    ax.set_xlim(0, 125)
    ax.set_xticks(range(0, 101, 25))
    ax.set_xlabel("share of the uplink by ledger part (%); the number: uplink bits per node per round")
    _legend_below(ax, ncol=3)


def _bits_panel(ax, labels, ways) -> None:
    """Right: uplink and each downlink part, bits per node per round (one-shot: once), log x, side by side."""
    kinds = [k for k in {**DIRECTIONS, **{k: None for w in ways for k in w}} if any(w.get(k, 0) > 0 for w in ways)]
    height = 0.8 / max(1, len(kinds))
    for j, kind in enumerate(kinds):
        values = [w.get(kind, 0) for w in ways]
        ys = [y - 0.4 + height * (j + 0.5) for y in range(len(labels))]
        ax.barh(ys, [v if v > 0 else float("nan") for v in values], height=height, label=kind,
                **DIRECTIONS.get(kind, {"color": "0.62"}))
    ax.set_xscale("log")
    ax.set_xlabel("bits per node per round (log; hatched: one-shot, paid once; a missing bar: none)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    _legend_below(ax, ncol=2)


def draw_group(group: series.Group, path: Path) -> canvas.Figure:
    plt = canvas.pyplot()
    once = [series.one_shot(runs[0]) for runs in group.methods.values()]
    labels = list(group.methods)
    ups = [_mean_parts(runs, uplink_parts) for runs in group.methods.values()]
    ways = [_mean_parts(runs, directions) for runs in group.methods.values()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 0.3 * len(labels) + 3.2), sharey=True)
    _share_panel(a1, labels, ups, once, plt)
    _bits_panel(a2, labels, ways)
    a1.invert_yaxis()
    runs = [r for rs in group.methods.values() for r in rs]
    note = ("each part's exact cumulative bits (read off the packed payloads) over the run's rounds and nodes, "
            "mean over seeds; downlink as qdata compare charges it")
    if any(once):
        note += ("; a one-shot method (its bits all sent before its first round, then trained without "
                 "communication) drawn as bits per node paid once (\"once\", hatched), not per round")
    if not all("downlink_parts_per_node_per_round" in r.header for r in runs):
        note += "; runs recorded before the downlink was split show it as one bar"
    return canvas.save(fig, path, captions.caption(runs, group.source, note),
                       f"Bits per node per round by ledger part: {group.title}")


def draw(found: Found, out: Path) -> list:
    groups = series.groups(found)
    if not groups:
        return [canvas.Skipped("bits breakdown", "no training runs")]
    return [draw_group(g, out / f"bits_breakdown_{g.name}.png") for g in groups]
