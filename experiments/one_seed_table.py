"""Bits to SGD's final minus 1 point on ONE seed, from an unfinished ``qdata compare`` directory.

The comparison's table needs every seed; while a long lineup is still running (or was stopped), this
reads the runs it has finished for the tuning seed, chooses each method's learning rate on validation
exactly as ``qdata compare`` does (:func:`qdata.compare.tune`, grids widened past a chosen edge as far as
the lineup's ``lr_extend`` and the finished runs go) and prints, per method,
the final test accuracy and the uplink and total bits per node to the target on that seed, downlink
charged as the comparison charges it. A preliminary look, labelled as such; not the table.

    python -m experiments.one_seed_table experiments/compare_fashion_mnist_mlp.toml runs/cmp-fashion-mlp
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qdata import results as qresults
from qdata.compare import downlink_per_node, run_dir, tune
from qdata.lineup import load_lineup


class Unfinished(Exception):
    """A run the choice needs has no results file yet (its directory)."""


def _loader(out: Path, found: dict):
    """A ``train_each`` for :func:`qdata.compare.tune` that trains nothing: it loads the runs' results
    files and raises :class:`Unfinished` at the first one missing."""
    def load(jobs):
        for run, lr, seed in jobs:
            directory = run_dir(out, run.label, lr, seed)
            if not (directory / "results.jsonl").exists():
                raise Unfinished(str(directory))
            found.setdefault((run.label, lr, seed), qresults.load(directory))
    return load


def rows(lineup_path: str, out: str, seed: int) -> tuple[float, list[tuple]]:
    """SGD's final test accuracy on ``seed`` and one row per run: (label, lr, final, uplink, total), or
    (label, None, directory of the first missing run) for a run whose choice cannot be made yet (each
    run's rate is chosen on its own runs alone, as in the comparison)."""
    lineup = load_lineup(lineup_path)._replace(tune_seeds=(seed,))
    found: dict = {}
    load = _loader(Path(out), found)
    chosen, waiting = {}, {}  # label -> rate; label -> the first run its choice still needs
    for run in lineup.runs:
        try:
            chosen.update(tune(lineup._replace(runs=(run,)), found, load)[0])
        except Unfinished as missing:
            if run is lineup.reference:
                raise SystemExit(f"{missing}: not run yet (SGD's choice sets the target); run the lineup further") \
                    from None
            waiting[run.label] = str(missing)
    sgd = found[(lineup.reference.label, chosen[lineup.reference.label], seed)][1][-1]["test_accuracy"]
    table = []
    for run in lineup.runs:
        if run.label in waiting:
            table.append((run.label, None, waiting[run.label]))
            continue
        header, rounds = found[(run.label, chosen[run.label], seed)]
        hit = qresults.crossing(rounds, sgd - 0.01)
        up = None if hit is None else hit["uplink_bits_per_node"]
        total = None if hit is None else up + downlink_per_node(header, rounds, hit["round"], up)
        table.append((run.label, chosen[run.label], rounds[-1]["test_accuracy"], up, total))
    return sgd, table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lineup")
    parser.add_argument("out", help="the comparison's directory")
    parser.add_argument("--seed", type=int, default=0, help="the tuning seed to read (default 0)")
    args = parser.parse_args(argv)
    sgd, table = rows(args.lineup, args.out, args.seed)
    print(f"PRELIMINARY, one seed ({args.seed}) of an unfinished comparison ({args.out}, {args.lineup}); learning "
          f"rates chosen on validation on this seed; SGD final test {sgd:.4f}, target SGD - 1 pt = {sgd - 0.01:.4f}")
    print(f"{'method':24s} {'lr':>5s} {'final':>7s} {'uplink to target':>18s} {'total to target':>18s}")
    cell = lambda v: "never" if v is None else f"{v:,.0f}"
    for label, lr, *rest in table:
        if lr is None:
            print(f"{label:24s} not chosen yet: {rest[0]} not run")
            continue
        final, up, total = rest
        print(f"{label:24s} {lr:5g} {final:7.4f} {cell(up):>18s} {cell(total):>18s}")


if __name__ == "__main__":
    main()
