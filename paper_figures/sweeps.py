"""One qdata knob swept, everything else fixed: accuracy against the data bits B and against the data
codes' bits per sample (issue 10's bits-versus-accuracy curve, one line per coder and quantizer),
and accuracy and bits against the gate's budget rho (the gate off is rho = 1).

The points come from whatever qdata runs under RUNS_DIR differ in that knob alone (compares' runs at
their chosen learning rates, and loose runs); a point run at several learning rates is drawn at the
one with the best mean final validation accuracy (test accuracy where no validation was recorded),
and several seeds as their mean with the min-max range as an error bar.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, NamedTuple

from paper_figures import canvas, captions, series
from paper_figures.discover import Found, Run


class Sweep(NamedTuple):
    knob: str
    lines: dict[str, dict[float, list[Run]]]  # line label -> knob value -> one run per seed


def _choose_lr(runs: list[Run]) -> list[Run]:
    by_lr: dict[float, list[Run]] = {}
    for run in runs:
        by_lr.setdefault(run.header["config"]["lr"], []).append(run)
    return series.best_on_validation(list(by_lr.values()))


def find_sweeps(runs: list[Run], knob: str, fields: tuple[str, ...], value: Callable[[dict], float],
                line: Callable[[dict], str]) -> list[Sweep]:
    """Groups of qdata runs equal up to ``fields`` (and seed, learning rate) with >= 2 values of ``value``."""
    groups: dict[tuple, dict[str, dict[float, list[Run]]]] = {}
    for run in runs:
        cfg = run.header["config"]
        if cfg["method"] != "qdata":
            continue
        key = (run.header["dataset"]["name"],) + series.method_key(run.header, drop=fields + ("lr",))
        groups.setdefault(key, {}).setdefault(line(cfg), {}).setdefault(value(cfg), []).append(run)
    sweeps = []
    for lines in groups.values():
        if len({x for points in lines.values() for x in points}) >= 2:
            chosen = {label: {x: _choose_lr(rs) for x, rs in sorted(points.items())} for label, points in lines.items()}
            sweeps.append(Sweep(knob, chosen))
    return sweeps


def final(runs: list[Run], measure: Callable[[Run], float]) -> tuple[float, float, float]:
    """(mean, mean - min, max - mean) of ``measure`` over the seeds: a point and its error bar."""
    values = [measure(r) for r in runs]
    mean = statistics.fmean(values)
    return mean, mean - min(values), max(values) - mean


def accuracy(run: Run) -> float:
    return run.rounds[-1]["test_accuracy"]


def per_round(run: Run, total: bool = False) -> float:
    last = run.rounds[-1]
    down = series.downlink_per_node(run, last) if total else 0.0
    return (last["cumulative_uplink_bits_per_node"] + down) / last["round"]


def plot_line(ax, points: dict[float, list[Run]], measure, x=lambda v, runs: v, *, tag: str | None = None,
              **style) -> list[float]:
    """One line of a sweep: ``measure`` (mean and min-max over seeds) at ``x(value, runs)`` for each
    knob value (a point whose x is None is left off); ``tag``: each point labelled ``tag=value``.
    Returns the x positions drawn."""
    kept = [(x(v, runs), v, final(runs, measure)) for v, runs in points.items()]
    kept = [k for k in kept if k[0] is not None]
    if kept:
        ax.errorbar([k[0] for k in kept], [k[2][0] for k in kept], yerr=[[k[2][1] for k in kept],
                    [k[2][2] for k in kept]], capsize=3, marker="o", markersize=4, **style)
    for xv, v, (y, _, _) in kept if tag else []:
        ax.annotate(f"{tag}={v:g}", (xv, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    return [k[0] for k in kept]


def readable_accuracy_axis(ax, span: float = 0.02) -> None:
    """At least ``span`` (2 points) of accuracy on the axis: a tighter one makes noise look like an effect."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        middle = (lo + hi) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def mean_or_missing(measure: Callable[[Run], float | None], missing: list[str], name: str):
    """An ``x`` for :func:`plot_line`: the mean of ``measure`` over a point's runs, or None (the point
    left off, ``f"{name}{value:g}"`` added to ``missing``) when any run has no value."""

    def x(value, runs):
        values = [measure(r) for r in runs]
        if any(v is None for v in values):
            missing.append(f"{name}{value:g}")
            return None
        return sum(values) / len(values)

    return x


def sweep_runs(sweep: Sweep) -> list[Run]:
    return [r for points in sweep.lines.values() for runs in points.values() for r in runs]


def source(runs: list[Run], found: Found) -> str:
    paths = {r.path for r in runs}
    compares = sorted({str(c.path) for c in found.compares for rs in c.runs.values() for r in rs if r.path in paths})
    loose = [r for r in found.runs if r.path in paths]
    parts = [f"qdata compare results in {', '.join(compares)}"] if compares else []
    if loose:
        parts.append(f"{len(loose)} qdata train runs under {found.root}")
    return " and ".join(parts)


def draw(found: Found, out: Path) -> list:
    from paper_figures import sweep_bits, sweep_rho, sweep_sample_bits

    finished = lambda run: run.rounds[-1]["round"] >= run.header["config"]["rounds"]
    runs = [r for r in found.all_runs() if finished(r)]
    unfinished = [r for r in found.all_runs() if not finished(r)]
    items = [canvas.Skipped("the sweeps' unfinished runs", f"{len(unfinished)} run(s) short of their rounds, with no "
                            f"final accuracy yet, left out (e.g. {unfinished[0].path})")] if unfinished else []
    for module in (sweep_bits, sweep_sample_bits, sweep_rho):
        sweeps = module.find(runs)
        if not sweeps:
            items.append(canvas.Skipped(module.FIGURE, module.NEEDS))
        for i, sweep in enumerate(sweeps):
            figure_runs = sweep_runs(sweep)
            first = figure_runs[0].header
            dataset = series.short_name(first["dataset"]["name"])
            name = canvas.slug(f"{module.NAME}_{dataset}_{first['model']['name']}_{i + 1}")

            def caption(note, figure_runs=figure_runs):
                return captions.caption(figure_runs, source(figure_runs, found), note)

            items.append(module.draw_sweep(sweep, out / f"{name}.png", caption))
    return items
