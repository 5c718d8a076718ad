"""Reading results files, the bit-ledger summaries, and the figures drawn from them.

Figures are made from results files only (``results.jsonl``), so a figure can be redrawn without
retraining, and every figure states what produced it: dataset (synthetic data labelled as such),
model and its size, the methods' bits, rounds and seed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable


class TornLineWarning(UserWarning):
    """The last line of a results file was cut short (a run killed while writing it) and is dropped."""


def read_records(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines results file, one a line (blank lines skipped).

    A run killed while writing leaves its last line torn: that line is dropped with a
    :class:`TornLineWarning` naming the file and the line. A bad line anywhere else is not an
    interruption but a damaged file: a ValueError naming the file and the line.
    """
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if position == len(numbered) - 1:
                warnings.warn(f"{path}: line {number} is torn (an interrupted write: {err}); dropped",
                              TornLineWarning, stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not a JSON object ({err}); the file is damaged") from None
        records.append(record)
    return records


def load(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(header, rounds)`` of a results file (or of the directory holding ``results.jsonl``); a torn
    last line is dropped with a warning (:func:`read_records`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: no such results file")
    records = read_records(path)
    if not records or records[0].get("kind") != "config":
        raise ValueError(f"{path} is not a qdata results file (its first line is not the config)")
    return records[0], [r for r in records if r.get("kind") == "round"]


def finished_one_shot(out_dir: str | os.PathLike, rounds: int, resume: bool) -> dict | None:
    """For a one-shot method's run in ``out_dir``: its last record if a resumed run already reached
    ``rounds`` (nothing to redo), else None (train it); a results file without ``resume`` is refused."""
    path = Path(out_dir) / "results.jsonl"
    if path.exists() and not resume:
        raise FileExistsError(f"{path} exists: pass resume=True (--resume) to continue it, or choose another directory")
    if path.exists():
        _, done = load(out_dir)
        if done and done[-1]["round"] >= rounds:
            return done[-1]
    return None


def final_accuracy(rounds: list[dict]) -> float:
    return rounds[-1]["test_accuracy"] if rounds else float("nan")


def bits_to_reach(rounds: list[dict], target: float) -> float | None:
    """Cumulative uplink bits per node at the first evaluation whose test accuracy >= ``target``;
    None if the run never reaches it."""
    for r in rounds:
        if r["test_accuracy"] >= target:
            return r["cumulative_uplink_bits_per_node"]
    return None


def uplink_bits_per_round(rounds: list[dict]) -> float:
    """Mean uplink bits per node per round over the whole run (exact totals / rounds / nodes)."""
    if not rounds:
        return float("nan")
    return rounds[-1]["cumulative_uplink_bits_per_node"] / rounds[-1]["round"]


def one_shot_downlink_per_node(header: dict) -> float:
    """The downlink bits per node a one-shot method paid before its first round (the mean over the
    nodes of its header's ``one_shot.downlink_bits_per_node``; 0 for every other method)."""
    down = (header.get("one_shot") or {}).get("downlink_bits_per_node")
    return sum(down) / len(down) if down else 0.0


def describe_setting(header: dict) -> str:
    """One line saying what produced a run: data (synthetic or not), model, nodes, rounds, seed."""
    ds, cfg = header["dataset"], header["config"]
    data = f"{ds['name']}{' (synthetic data)' if ds['synthetic'] else ''}, n={ds['n']}"
    return (f"{data}; model {header['model']['name']} (d={header['model']['params']:,}); "
            f"{cfg['num_nodes']} nodes, {cfg['partition']} partition, batch {cfg['batch_size']}; "
            f"{cfg['rounds']} rounds; seed {cfg['seed']}")


def plot_accuracy_vs_bits(runs: list[tuple[str, dict, list[dict]]], path: str | os.PathLike, *,
                          target: float | None = None, title: str | None = None) -> None:
    """Test accuracy against cumulative uplink bits per node (log scale), one line per run.

    Args:
      runs: ``(label, header, rounds)`` triples; all from the same setting.
      path: the PNG to write.
      target: an accuracy level drawn as a horizontal line.
      title: first title line; the second is :func:`describe_setting` of the first run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for label, _, rounds in runs:
        xs = [r["cumulative_uplink_bits_per_node"] for r in rounds]
        ys = [r["test_accuracy"] for r in rounds]
        ax.plot(xs, ys, marker=".", label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bits per node (exact, from the packed payloads)")
    ax.set_ylabel("test accuracy")
    setting = describe_setting(runs[0][1])
    ax.set_title((title + "\n" if title else "") + setting, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def crossing(rounds: list[dict], target: float, key: str = "test_accuracy") -> dict | None:
    """Where a run first reaches ``target`` accuracy (``key``: ``test_accuracy`` or ``val_accuracy``),
    interpolated linearly between the two evaluations that straddle it.

    Returns ``{"round", "uplink_bits_per_node"}`` at the crossing (fractional round, interpolated
    cumulative uplink bits per node), or None if no evaluation reaches the target. When the first
    evaluation already reaches it there is nothing earlier to interpolate from: its own figures.
    """
    previous = None
    for r in rounds:
        if r[key] >= target:
            point = (r["round"], r["cumulative_uplink_bits_per_node"])
            if previous is None or r[key] == previous[key]:
                return {"round": float(point[0]), "uplink_bits_per_node": float(point[1])}
            frac = (target - previous[key]) / (r[key] - previous[key])
            lo = (previous["round"], previous["cumulative_uplink_bits_per_node"])
            return {"round": lo[0] + frac * (point[0] - lo[0]),
                    "uplink_bits_per_node": lo[1] + frac * (point[1] - lo[1])}
        previous = r
    return None



# tab20 without its two greys (14, 15): grey is the targets' colour, and a method drawn in it read as a
# target line (as paper_figures.canvas.METHOD_COLOURS leaves tab10's grey out).
_NOT_GREY = tuple(i for i in range(20) if i not in (14, 15))


def plot_accuracy_vs_bits_panels(runs: list[tuple[str, dict, list[dict]]], path: str | os.PathLike, *,
                                 targets: dict[str, float], floors: list[dict] | None = None,
                                 title: str | None = None, downlink: Callable) -> None:
    """Two panels, test accuracy against cumulative uplink bits per node and against total
    (uplink + downlink) bits per node, log scale; each target a horizontal line; each floor (a dict
    with ``label``, ``bits`` per node and optionally ``accuracy``) a vertical line, and its accuracy
    a marker where known.

    Args:
      runs: ``(label, header, rounds)`` triples, all from the same setting.
      path: the PNG to write.
      targets: name -> accuracy.
      floors: the one-shot data-shipping floors, if any (their uplink is their total: no model goes down).
      title: the first title line; the second is :func:`describe_setting` of the first run.
      downlink: ``(header, rounds, round, uplink) -> bits per node`` sent down by then
        (:func:`qdata.compare.downlink_per_node`: relays, one-shot downlinks, recorded replies).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, measure in zip(axes, ("uplink", "total")):
        for i, (label, header, rounds) in enumerate(runs):
            xs = [r["cumulative_uplink_bits_per_node"]
                  + (downlink(header, rounds, r["round"], r["cumulative_uplink_bits_per_node"]) if measure == "total" else 0)
                  for r in rounds]
            ax.plot(xs, [r["test_accuracy"] for r in rounds], marker=".", markersize=3, label=label,
                    color=plt.cm.tab20(_NOT_GREY[i % len(_NOT_GREY)]), linestyle="-" if "qdata" in label else "--")
        for (name, acc), style in zip(targets.items(), (":", "--")):
            ax.axhline(acc, color="grey", linestyle=style, label=f"target {name} ({acc:.3f})")
        for floor, style in zip(floors or [], ("-.", (0, (1, 3)), (0, (5, 2, 1, 2)))):
            ax.axvline(floor["bits"], color="black", linestyle=style, alpha=0.8, label=f"floor: {floor['label']}")
            if floor.get("accuracy") is not None:
                ax.plot([floor["bits"]], [floor["accuracy"]], marker="*", markersize=11, color="black")
        ax.set_xscale("log")
        ax.set_xlabel(f"cumulative {measure} bits per node (exact{', uplink + downlink' if measure == 'total' else ''})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle((title + "\n" if title else "") + describe_setting(runs[0][1]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
