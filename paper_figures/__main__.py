"""``python -m paper_figures RUNS_DIR [--out DIR]``: every figure, redrawn from results files alone.

Finds every ``qdata train`` run, ``qdata compare`` output and ``python -m convergence`` report under
RUNS_DIR (:mod:`paper_figures.discover`) and draws, each PNG with its caption line (dataset, model,
nodes, rounds, seeds, source) printed in it and written to ``captions.txt`` beside it:

* test accuracy vs cumulative uplink and total bits per node, targets and floors marked
  (:mod:`paper_figures.accuracy_bits`);
* training loss vs rounds (:mod:`paper_figures.loss`);
* the bits per round by ledger part, per method (:mod:`paper_figures.breakdown`);
* accuracy vs data bits B and bits per sample, accuracy and bits vs the gate's budget rho, from qdata
  runs that differ in that knob alone (:mod:`paper_figures.sweeps`);
* bits per round vs the model dimension d at fixed n, from runs of several models
  (:mod:`paper_figures.dimension`);
* the convergence checks' figures (:mod:`paper_figures.convergence`);
* the data codes' accuracy vs bits per sample of ``python -m experiments.data_codes``
  (:mod:`paper_figures.data_codes`).

A figure whose runs RUNS_DIR lacks is skipped with a one-line note; a RUNS_DIR that does not exist
or holds no results at all is an error in one line (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paper_figures import (accuracy_bits, breakdown, canvas, convergence, data_codes, dimension, discover, loss,
                           sweeps)

FIGURES = (accuracy_bits, loss, breakdown, sweeps, dimension, convergence, data_codes)


def _fail(message: str) -> None:
    print(f"paper_figures: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def draw_all(runs_dir: Path, out: Path) -> tuple[list[canvas.Figure], list[str]]:
    """Every figure of ``runs_dir`` into ``out``; returns the figures and the notes (skips, unread files)."""
    found = discover.find(runs_dir, skip=out)
    if found.empty():
        raise ValueError(f"{runs_dir} holds no results (no results.jsonl, summary.json, convergence "
                         "report.json or data_codes.json under it)" + (f"; {found.notes[0]}" if found.notes else ""))
    figures, notes = [], list(found.notes)
    for module in FIGURES:
        for item in module.draw(found, out):
            if isinstance(item, canvas.Skipped):
                notes.append(f"skipped {item.figure}: {item.why}")
            else:
                figures.append(item)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{f.path.relative_to(out)}: {f.caption}" for f in figures]
    (out / "captions.txt").write_text("".join(line + "\n" for line in lines))
    return figures, notes


def main(argv=None) -> list[canvas.Figure]:
    parser = argparse.ArgumentParser(prog="python -m paper_figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="a directory of qdata runs, compares and convergence reports")
    parser.add_argument("--out", default=None, help="where the figures go (default RUNS_DIR/figures)")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        _fail(f"{runs_dir} does not exist or is not a directory (expected a directory of qdata runs)")
    out = Path(args.out) if args.out else runs_dir / "figures"
    try:
        figures, notes = draw_all(runs_dir, out)
    except ValueError as err:
        _fail(" ".join(str(err).splitlines()))
    for note in notes:
        print(f"note: {note}")
    for figure in figures:
        print(figure.path)
    print(f"{len(figures)} figures and their captions ({out / 'captions.txt'}) in {out}")
    return figures


if __name__ == "__main__":
    main()
