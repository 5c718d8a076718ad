"""``qdata compare``: every method of a lineup, tuned alike on validation, reported on test.

The protocol (DESIGN.md section 7), for a :class:`~qdata.lineup.Lineup`:

1. **Tuning, on the validation split only.** Every run of the lineup trains at every learning rate
   of its grid on the tuning seeds; its learning rate is the one with the best mean final
   *validation* accuracy. Where that is the grid's smallest or largest rate (a grid of two or more),
   the run also trains at the next rate of the 1-2-5 series past it and chooses again (a tie keeps
   the earlier rate), up to the lineup's ``lr_extend`` times (:func:`tune`); the table names any
   run still at an edge of the rates it tried. Within a family (one knob swept: top-k density,
   PowerSGD rank, QSGD levels), the best member is the one that reaches SGD's final validation accuracy minus 1 point
   with the fewest uplink bits (all tuning seeds), else the most accurate.
2. **Reporting, on the test split.** Every run trains at its learning rate on every seed. Two
   targets per seed, from full-precision SGD on that seed: 95% of its final test accuracy, and its
   final test accuracy minus 1 point. Per run: final test accuracy, uplink / downlink bits per node
   per round, and uplink and total (uplink + downlink) bits per node to each target, interpolated
   linearly between the two evaluations that straddle it; mean and range over seeds; the node and
   learner compute of one round (seconds, timed in this process); ratios to the best gradient
   compressor (the family bests, over those that reach the target on every seed), on uplink and on
   total bits. Downlink, at its cheapest for each method (:func:`relays`): the model broadcast
   (32 d a round) to a node that needs the model; for a gradient compressor, the relay of the
   other nodes' messages to a node that keeps a replica of the model, where that is smaller; a
   method's own replies (PowerSGD as published; split learning's activation gradients and averaged
   lower layers); nothing for qdata without gate or correction.

Outputs in ``OUT/``: ``table.txt``, ``summary.json``, ``accuracy_vs_bits.png`` and each run's results
file under ``OUT/<label>/lr<LR>/seed<SEED>/``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import jax

from qdata import results as qresults
from qdata.lineup import Lineup, load_lineup
from qdata.run import phase_seconds, train

DEFAULT_LINEUP = "compare_digits.toml"
TARGETS = {"95% of SGD": lambda acc: 0.95 * acc, "SGD - 1 pt": lambda acc: acc - 0.01}
HEADLINE = "SGD - 1 pt"


def run_dir(out: Path, label: str, lr: float, seed: int) -> Path:
    return out / label / f"lr{lr:g}" / f"seed{seed}"


def _train_each(jobs, out: Path, progress: bool, resume: bool, results: dict) -> None:
    """Train every ``(run, lr, seed)`` job not yet in ``results``; load each one's results file."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="compare", unit="run")
    for run, lr, seed in jobs:
        key = (run.label, lr, seed)
        if key not in results:
            directory = run_dir(out, *key)
            if bar is not None:
                bar.set_postfix_str(f"{run.label} lr={lr:g} seed={seed}")
            train(run.config.replace(lr=lr, seed=seed, name=run.label), directory, progress=progress,
                  resume=resume)
            results[key] = qresults.load(directory)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _mean(values):
    return statistics.fmean(values) if values else None


def choose_learning_rates(lineup: Lineup, results: dict, grids: dict | None = None) -> dict[str, float]:
    """Each run's learning rate: the best mean final validation accuracy over the tuning seeds
    (the first of the grid on ties), over ``grids[label]`` (default: each run's ``lr_grid``)."""
    chosen = {}
    for run in lineup.runs:
        grid = run.lr_grid if grids is None else grids[run.label]
        score = {lr: _mean([results[(run.label, lr, s)][1][-1]["val_accuracy"] for s in lineup.tune_seeds])
                 for lr in grid}
        chosen[run.label] = max(grid, key=lambda lr: (score[lr], -grid.index(lr)))
    return chosen


def next_rate(lr: float, up: bool) -> float:
    """The learning rate past ``lr`` in the 1-2-5 series (0.05 -> 0.1 up, 0.01 -> 0.005 down); a
    rate off the series is doubled or halved."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10.0 ** exponent, 9)
    if mantissa not in (1.0, 2.0, 5.0):
        return lr * 2 if up else lr / 2
    i = (1, 2, 5).index(int(mantissa)) + (1 if up else -1)
    return float(f"{(1, 2, 5)[i % 3]}e{exponent + i // 3}")


def at_edge(lr: float, grid) -> bool:
    """Whether ``lr`` is the smallest or largest of a grid of two or more rates (a one-rate grid is a
    fixed choice, never widened)."""
    return len(grid) > 1 and lr in (min(grid), max(grid))


def tune(lineup: Lineup, results: dict, train_each: Callable[[list], None]) -> tuple[dict, dict]:
    """Protocol step 1's learning rates: ``(chosen, grids)``. ``train_each(jobs)`` puts every
    ``(run, lr, seed)`` job's results into ``results``; each run is trained on the tuning seeds at
    every rate of its grid, and its grid widened past an edge its run chose (module docstring). A
    rate added later wins a tie with none tried before it: a plateau does not draw the choice outward."""
    grids = {r.label: tuple(r.lr_grid) for r in lineup.runs}  # in the order tried
    for widened in range(lineup.lr_extend + 1):
        train_each([(r, lr, s) for r in lineup.runs for lr in grids[r.label] for s in lineup.tune_seeds])
        chosen = choose_learning_rates(lineup, results, grids)
        edges = {label: lr for label, lr in chosen.items() if at_edge(lr, grids[label])}
        if widened == lineup.lr_extend or not edges:
            return chosen, grids
        for label, lr in edges.items():
            grids[label] = (*grids[label], next_rate(lr, up=lr == max(grids[label])))


def choose_family_bests(lineup: Lineup, results: dict, chosen: dict) -> dict[str, str]:
    """Each family's best member on validation (module docstring), by label."""
    ref = lineup.reference
    targets = {s: results[(ref.label, chosen[ref.label], s)][1][-1]["val_accuracy"] - 0.01 for s in lineup.tune_seeds}
    families: dict[str, list] = {}
    for run in lineup.runs:
        families.setdefault(run.family, []).append(run)
    best = {}
    for family, members in families.items():
        def key(run):
            rounds = {s: results[(run.label, chosen[run.label], s)][1] for s in lineup.tune_seeds}
            hits = [qresults.crossing(rounds[s], targets[s], "val_accuracy") for s in lineup.tune_seeds]
            bits = _mean([h["uplink_bits_per_node"] for h in hits]) if all(hits) else float("inf")
            return bits, -_mean([rounds[s][-1]["val_accuracy"] for s in lineup.tune_seeds])
        best[family] = min(members, key=key).label
    return best


def relays(header: dict, rounds: list[dict]) -> bool:
    """Whether a gradient compressor's nodes are cheaper served by a relay than by the model.

    A node that holds a replica of the model and the optimizer can form the round's update from
    the other N - 1 nodes' messages, relayed by the learner, instead of receiving the model (32 d
    bits): the relay costs ``(N - 1)`` times a node's uplink. It is charged where it is smaller in
    every evaluated round (``uplink_bits_last_round_per_node``; fixed-size messages: every round).
    SGD and qdata keep the model broadcast (qdata's nodes cannot form the learner's update). Gaia's
    significance filter (``significance:S``) relays like a gradient compressor: its messages vary in
    size, and the rule reads the largest evaluated round's."""
    if header["method"] != "gradient" and not header["method"].startswith("significance:"):
        return False
    others = header["config"]["num_nodes"] - 1
    largest = max(r["uplink_bits_last_round_per_node"]["total"] for r in rounds)
    return others * largest < header["downlink_bits_per_node_per_round"]


def downlink_per_node(header: dict, rounds: list[dict], round_: float, uplink: float) -> float:
    """Downlink bits per node after ``round_`` rounds, ``uplink`` bits per node sent by then (a
    one-shot method's downlink, paid before its first round, included)."""
    if relays(header, rounds):
        return (header["config"]["num_nodes"] - 1) * uplink
    if header.get("downlink_varies_by_round"):
        return _recorded_downlink(header, rounds, round_)
    return qresults.one_shot_downlink_per_node(header) + header["downlink_bits_per_node_per_round"] * round_


def _recorded_downlink(header: dict, rounds: list[dict], round_: float) -> float:
    """Downlink bits per node after ``round_`` rounds for a method whose replies vary by round
    (sequential split learning's turns): the records' exact ``cumulative_downlink_bits``, interpolated
    linearly between the evaluations that straddle ``round_`` (as :func:`qdata.results.crossing`
    interpolates the uplink), from 0 at round 0."""
    nodes = header["config"]["num_nodes"]
    points = [(0.0, 0.0)] + [(float(r["round"]), r["cumulative_downlink_bits"] / nodes) for r in rounds]
    for (r0, d0), (r1, d1) in zip(points, points[1:]):
        if round_ <= r1:
            return d0 + (round_ - r0) / (r1 - r0) * (d1 - d0) if r1 > r0 else d1
    return points[-1][1]


def _downlink_kind(header: dict, rounds: list[dict]) -> str:
    """What goes down to a node: ``none``, ``model`` (32 d a round), ``relay`` (:func:`relays`),
    ``replies`` (a method's own replies, e.g. PowerSGD as published; ``model+replies`` with both) or
    ``one-shot`` (a one-shot method's downlink, e.g. the dispatch's relayed samples and centres)."""
    down, model = header["downlink_bits_per_node_per_round"], 32 * header["model"]["params"]
    if relays(header, rounds):
        return "relay"
    if qresults.one_shot_downlink_per_node(header):
        return "one-shot"
    parts = header.get("downlink_parts_per_node_per_round")  # absent from older results files
    if parts is not None:  # read, not guessed from the sizes (split learning's replies may exceed 32 d)
        return "+".join(k for k in ("model", "replies") if parts[k]) or "none"
    return "none" if down == 0 else "model" if down == model else "model+replies" if down > model else "replies"


def _per_seed(header: dict, rounds: list[dict], sgd_final: float) -> dict:
    """One seed's test figures of one run: final accuracy, bits per round, and per target the
    interpolated uplink and total bits per node (None if never reached)."""
    last = rounds[-1]
    uplink = last["cumulative_uplink_bits_per_node"]
    figures = {"final_test_accuracy": last["test_accuracy"], "uplink_bits_per_round": uplink / last["round"],
               "downlink_bits_per_round": downlink_per_node(header, rounds, last["round"], uplink) / last["round"],
               "downlink": _downlink_kind(header, rounds), "targets": {}}
    for name, rule in TARGETS.items():
        hit = qresults.crossing(rounds, rule(sgd_final))
        figures["targets"][name] = None if hit is None else {
            "round": hit["round"], "uplink": hit["uplink_bits_per_node"],
            "total": hit["uplink_bits_per_node"] + downlink_per_node(header, rounds, hit["round"], hit["uplink_bits_per_node"])}
    return figures


def _spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return {"mean": _mean(values), "min": min(values), "max": max(values)} if values else None


def _row(run, lr: float, seeds: list[dict], phases: dict, best: bool, grid) -> dict:
    row = {"method": run.label, "family": run.family, "lr": lr, "lr_tried": sorted(grid),
           "lr_at_edge": at_edge(lr, grid), "best_of_family": best,
           "gradient_compressor": run.config.method == "gradient", "qdata": run.config.method == "qdata",
           "final_test_accuracy": _spread([s["final_test_accuracy"] for s in seeds]),
           "uplink_bits_per_round": _mean([s["uplink_bits_per_round"] for s in seeds]),
           "downlink_bits_per_round": _mean([s["downlink_bits_per_round"] for s in seeds]),
           "downlink": seeds[0]["downlink"], **phases, "targets": {}}
    for name in TARGETS:
        hits = [s["targets"][name] for s in seeds]
        row["targets"][name] = {"reached": sum(h is not None for h in hits), "seeds": len(hits),
                                "uplink": _spread([h and h["uplink"] for h in hits]),
                                "total": _spread([h and h["total"] for h in hits])}
    return row


def _add_ratios(rows: list[dict]) -> dict:
    """Ratios to the best gradient compressor (family bests reaching a target on every seed), on
    uplink and on total bits; returns the best compressor per target and measure."""
    best = {}
    for name in TARGETS:
        full = lambda r: r["targets"][name]["reached"] == r["targets"][name]["seeds"]
        pool = [r for r in rows if r["gradient_compressor"] and r["best_of_family"] and full(r)]
        for measure in ("uplink", "total"):
            winner = min(pool, key=lambda r: r["targets"][name][measure]["mean"], default=None)
            best[(name, measure)] = winner and winner["method"]
            for r in rows:
                t = r["targets"][name]
                t[f"ratio_{measure}"] = (winner["targets"][name][measure]["mean"] / t[measure]["mean"]
                                         if winner and full(r) else None)
    return {f"{name} / {measure}": label for (name, measure), label in best.items()}


def _floor_runs(lineup: Lineup, out: Path, lr: float, progress: bool, resume: bool) -> dict:
    """The one-shot floors (:mod:`qdata.floors`) of every seed: each node's shard as its runs hold
    it, coded losslessly and at each of the lineup's B with stochastic rounding, by every coder
    (the cheapest counts); the learner then trains centrally on the decoded data (full-precision
    SGD at the reference's learning rate, one node of batch N*b: the same samples a step and the
    same steps as SGD). Returns ``{B: {"rows": per-seed coder rows, "rounds": per-seed results}}``."""
    from qdata import floors
    from qdata.run import Experiment

    ref = lineup.reference.config.replace(lr=lr)
    found: dict = {}
    for seed in lineup.seeds:
        exp = Experiment(ref.replace(seed=seed))  # the nodes' shards, after the validation split
        for b in (None, *lineup.floors.get("bits", ())):
            rows = floors.floor_rows(exp.dataset, exp.index, exp.count, bits=(b,), rounding="stochastic",
                                     coders=lineup.floors.get("coders") or floors.CODERS, seed=seed)
            central = floors.central_dataset(exp.dataset, floors.floor_payloads(
                exp.dataset, exp.index, exp.count, "zstd", b, rounding="stochastic", seed=seed))
            name = f"floor-{'lossless' if b is None else f'{b}b'}"
            config = ref.replace(name=name, num_nodes=1, batch_size=ref.num_nodes * ref.batch_size,
                                 validation=0.0, seed=seed)
            directory = out / name / f"seed{seed}"
            train(config, directory, progress=progress, resume=resume, dataset=central)
            entry = found.setdefault(b, {"rows": [], "rounds": []})
            entry["rows"].append(rows)
            entry["rounds"].append(qresults.load(directory)[1])
    return found


def _floor_summary(found: dict, sgd_final: list[float]) -> list[dict]:
    """Floor rows of the table: the cheapest coder's bits per node (mean over nodes and seeds), the
    central model's final test accuracy, and each target reached if the central run reaches it
    (the bits are all paid before training: to-target bits are the floor's bits)."""
    summary = []
    for b, entry in found.items():
        best = [next(r for r in rows if r["best"]) for rows in entry["rows"]]
        bits = _mean([r["mean_bits_per_node"] for r in best])
        row = {"label": f"{'lossless' if b is None else f'{b}-bit stochastic'} ({', '.join(sorted({r['coder'] for r in best}))})",
               "bits": bits, "data_bits": b, "coders_per_seed": entry["rows"],
               "final_test_accuracy": _spread([rounds[-1]["test_accuracy"] for rounds in entry["rounds"]]),
               "accuracy": _mean([rounds[-1]["test_accuracy"] for rounds in entry["rounds"]]), "targets": {}}
        for name, rule in TARGETS.items():
            reached = sum(qresults.crossing(rounds, rule(acc)) is not None
                          for rounds, acc in zip(entry["rounds"], sgd_final))
            row["targets"][name] = {"reached": reached, "seeds": len(entry["rounds"])}
        summary.append(row)
    return summary


def summarize(lineup: Lineup, results: dict, chosen: dict, bests: dict, phases: dict,
              grids: dict | None = None) -> dict:
    """The comparison as data (module docstring); ``grids``: the rates each run was tried at
    (default: its ``lr_grid``)."""
    ref = lineup.reference
    sgd_final = {s: results[(ref.label, chosen[ref.label], s)][1][-1]["test_accuracy"] for s in lineup.seeds}
    sgd_list = [sgd_final[s] for s in lineup.seeds]
    rows = []
    for run in lineup.runs:
        lr = chosen[run.label]
        seeds = [_per_seed(*results[(run.label, lr, s)], sgd_final[s]) for s in lineup.seeds]
        grid = run.lr_grid if grids is None else grids[run.label]
        rows.append(_row(run, lr, seeds, phases[run.label], bests[run.family] == run.label, grid))
    best_gc = _add_ratios(rows)
    qdata_rows = [r for r in rows if r["qdata"]]
    headline = {m: max((r["targets"][HEADLINE][f"ratio_{m}"] for r in qdata_rows
                        if r["targets"][HEADLINE][f"ratio_{m}"] is not None), default=None)
                for m in ("uplink", "total")}
    header = results[(ref.label, chosen[ref.label], lineup.seeds[0])][0]
    return {"setting": qresults.describe_setting(header).rsplit("; seed", 1)[0],
            "seeds": list(lineup.seeds), "tune_seeds": list(lineup.tune_seeds),
            "lr_extend": lineup.lr_extend, "sgd_final_test_accuracy": sgd_list, "targets": list(TARGETS),
            "best_gradient_compressor": best_gc,
            "headline_target": HEADLINE, "best_qdata_ratio": headline,
            "against_every_member": against_every_member(rows, HEADLINE), "rows": rows}


def _rates_line(summary: dict) -> str:
    """Which rates were tried, and the rows whose choice is still an edge of what they tried."""
    extend = summary.get("lr_extend", 0)
    line = "lr: chosen on validation from each row's grid" + (
        f", widened past a chosen edge along 1-2-5 up to {extend} time(s)" if extend else "")
    if not all("lr_tried" in r for r in summary["rows"]):
        return line + " (rates tried: not recorded in this summary)"
    edges = [f"{r['method']} ({'/'.join(f'{lr:g}' for lr in r['lr_tried'])})" for r in summary["rows"]
             if r["lr_at_edge"]]
    return line + "; chosen at an edge of the rates tried: " + (", ".join(edges) if edges else "none")


def _headline_line(summary: dict) -> str:
    ratio, target = summary["best_qdata_ratio"], summary["headline_target"]
    if ratio["uplink"] is None and ratio["total"] is None:
        return (f"headline ({target}): no ratio (it needs a qdata run and a gradient compressor that both reach "
                "the target on every seed)")
    return (f"headline ({target}): best qdata run / best gradient compressor = {_fmt_ratio(ratio['uplink'])}x "
            f"fewer uplink bits, {_fmt_ratio(ratio['total'])}x fewer total bits")


def against_every_member(rows: list[dict], target: str) -> dict:
    """The stricter yardstick: the best qdata run against the best of *every* swept gradient
    compressor (any member of any family, whatever validation chose) that reaches ``target`` on
    every seed, on uplink and on total bits: ``{measure: {"ratio", "qdata", "compressor"}}``."""
    full = lambda r: r["targets"][target]["reached"] == r["targets"][target]["seeds"]
    out = {}
    for measure in ("uplink", "total"):
        mean = lambda r: r["targets"][target][measure]["mean"]
        pool = [r for r in rows if r["gradient_compressor"] and full(r)]
        ours = [r for r in rows if r["qdata"] and full(r)]
        if not pool or not ours:
            out[measure] = None
            continue
        best, q = min(pool, key=mean), min(ours, key=mean)
        out[measure] = {"ratio": mean(best) / mean(q), "qdata": q["method"], "compressor": best["method"]}
    return out


def _fmt_spread(spread: dict | None, digits: str = ",.0f") -> str:
    if spread is None:
        return "never"
    if spread["min"] == spread["max"]:
        return format(spread["mean"], digits)
    return f"{spread['mean']:{digits}} [{spread['min']:{digits}}-{spread['max']:{digits}}]"


def _fmt_ratio(value) -> str:
    return "-" if value is None else (f"{value:.3g}" if value < 1000 else f"{value:,.0f}")


def format_table(summary: dict) -> str:
    """The text table: one block of per-run figures, one block per target."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [f"setting: {summary['setting']}; seeds {seeds} (mean [min-max]); learning rates and family bests "
             f"chosen on the validation split (seeds {', '.join(str(s) for s in summary['tune_seeds'])}), "
             "figures on the test split", "",
             f"{'method':<22}{'lr':>7}{'final test acc':>24}{'uplink/round':>14}{'downlink/round':>16}"
             f"{'down':>9}{'node s':>9}{'learner s':>10}"]
    for r in summary["rows"]:
        mark = "*" if r["best_of_family"] else " "
        lines.append(f"{mark}{r['method']:<21}{r['lr']:>7g}{_fmt_spread(r['final_test_accuracy'], '.4f'):>24}"
                     f"{r['uplink_bits_per_round']:>14,.0f}{r['downlink_bits_per_round']:>16,.0f}"
                     f"{r['downlink']:>9}{r['node_seconds']:>9.4f}{r['learner_seconds']:>10.4f}")
    for name in summary["targets"]:
        acc = ", ".join(f"{TARGETS[name](a):.4f}" for a in summary["sgd_final_test_accuracy"])
        lines += ["", f"target {name} (test accuracy per seed: {acc}); bits per node to reach it, interpolated",
                  f"{'method':<22}{'reached':>8}{'uplink bits':>40}{'total bits':>44}{'x up':>9}{'x total':>9}"]
        for r in summary["rows"]:
            t = r["targets"][name]
            mark = "*" if r["best_of_family"] else " "
            lines.append(f"{mark}{r['method']:<21}{t['reached']:>5}/{t['seeds']:<2}{_fmt_spread(t['uplink']):>40}"
                         f"{_fmt_spread(t['total']):>44} {_fmt_ratio(t['ratio_uplink']):>8}"
                         f" {_fmt_ratio(t['ratio_total']):>8}")
    if summary.get("floors"):
        lines += ["", "floors: each node ships its whole shard once (no model goes down), coded by real coders "
                  "(bits per node: 8 x the coded bytes, labels included; the cheapest coder); the learner trains "
                  "centrally on it (SGD, one node of batch N*b, the reference's learning rate)",
                  f"{'floor':<36}{'bits per node':>16}{'central test acc':>24}{'95% of SGD':>12}{'SGD - 1 pt':>12}"]
        for f in summary["floors"]:
            reach = [f"{f['targets'][n]['reached']}/{f['targets'][n]['seeds']}" for n in summary["targets"]]
            lines.append(f"{f['label']:<36}{f['bits']:>16,.0f}{_fmt_spread(f['final_test_accuracy'], '.4f'):>24}"
                         f"{reach[0]:>12}{reach[1]:>12}")
    best = summary["best_gradient_compressor"]
    lines += ["", "* best of its family (chosen on validation). x up / x total: the best gradient compressor's "
              "bits to the target over this method's (family bests reaching it on every seed: "
              + ("; ".join(f"{k}: {v}" for k, v in best.items() if v) if any(best.values()) else
                 "none: no gradient compressor in this lineup reaches a target on every seed") + ")",
              "bits: exact, read off the packed payloads. Uplink: what a node sends. Downlink (down): model = the "
              "broadcast of w, 32 d a round, to a node that needs it; relay = a gradient compressor's node keeps a "
              "replica of the model and receives the other N - 1 nodes' messages instead, where that is smaller; "
              "replies = the learner's replies (PowerSGD as published: P^, then Q and the other leaves; split "
              "learning: the activation gradients and, in parallel, the averaged lower layers, in turns the "
              "handed-on lower layers and their optimizer state); one-shot = paid once before "
              "training (dispatch: the k-means centres, each sample's destinations or the cluster-to-node matching, "
              "and the samples relayed to a node; its uplink: the k-means fit sample, the centre distances or "
              "cluster counts, and the moved samples; shown per round as its "
              "total over the rounds); "
              "none = qdata without gate or correction. Total = uplink + downlink.",
              "node s / learner s: one round's node phase (all nodes) and learner phase, timed on their own.",
              _rates_line(summary), _headline_line(summary)]
    strict = summary.get("against_every_member") or {}
    lines.append(f"against every swept compressor member reaching {summary['headline_target']} on every seed: "
                 + "; ".join(f"{m}: {v['qdata']} vs {v['compressor']} = {_fmt_ratio(v['ratio'])}x" if v
                             else f"{m}: -" for m, v in strict.items()))
    return "\n".join(lines)


def draw_figure(summary: dict, out_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Test accuracy against cumulative uplink and total bits per node (the first seed), each
    family's best and every qdata run, with both targets (that seed's) marked; from the results
    files under ``out_dir`` and its ``summary`` alone, so it can be redrawn without training."""
    seed = summary["seeds"][0]
    shown = [r for r in summary["rows"] if r["best_of_family"] or r["qdata"]]
    runs = []
    for r in shown:
        runs.append((r["method"], *qresults.load(run_dir(Path(out_dir), r["method"], r["lr"], seed))))
    targets = {name: TARGETS[name](summary["sgd_final_test_accuracy"][0]) for name in summary["targets"]}
    qresults.plot_accuracy_vs_bits_panels(runs, path, targets=targets, floors=summary.get("floors"), title=(
        f"test accuracy vs bits per node, seed {seed}: each family's best (chosen on validation) and qdata"),
        downlink=downlink_per_node)  # the table's own rule (relays, one-shot, recorded replies)


def compare(lineup: Lineup | None = None, out_dir: str | os.PathLike | None = None, *, progress: bool = True,
            resume: bool = False) -> dict:
    """Run ``lineup`` (default ``experiments/compare_digits.toml``) by the protocol of the module
    docstring; write the table, the summary and the figure. With ``resume``, finished runs in
    ``out_dir`` are kept and an interrupted one continues from its newest checkpoint.

    Returns the summary dict (also written to ``OUT/summary.json``), with ``table`` and ``out_dir``.
    """
    lineup = lineup or load_lineup(DEFAULT_LINEUP)
    out = Path(out_dir) if out_dir else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    chosen, grids = tune(lineup, results, lambda jobs: _train_each(jobs, out, progress, resume, results))
    bests = choose_family_bests(lineup, results, chosen)
    _train_each([(r, chosen[r.label], s) for r in lineup.runs for s in lineup.seeds], out, progress, resume, results)
    phases = {r.label: phase_seconds(r.config.replace(lr=chosen[r.label], seed=lineup.seeds[0]))
              for r in lineup.runs}
    summary = summarize(lineup, results, chosen, bests, phases, grids)
    if lineup.floors:
        found = _floor_runs(lineup, out, chosen[lineup.reference.label], progress, resume)
        summary["floors"] = _floor_summary(found, summary["sgd_final_test_accuracy"])
    table = format_table(summary)
    if jax.process_index() == 0:  # one writer of the shared directory, as for a run's results file
        (out / "table.txt").write_text(table + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        draw_figure(summary, out, out / "accuracy_vs_bits.png")
    return {**summary, "out_dir": str(out), "table": table}
