"""Redraw the comparison figure from a ``qdata compare`` output directory (results files only).

    python -m paper_figures.compare runs/compare-YYYYmmdd-HHMMSS [--out paper_figures/compare_digits.png]

A directory that is not a finished comparison (no ``summary.json``), or a damaged results file in
it, is an error in one line (exit status 2); a torn last line of a results file is dropped with a
warning (:func:`qdata.results.read_records`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdata.compare import draw_figure


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory (expected the output directory of qdata compare)")
    if not path.is_file():
        raise ValueError(f"{run_dir} has no summary.json: not the output of a finished qdata compare "
                         "(finish it with qdata compare --resume --out DIR)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun qdata compare --resume --out {run_dir}") from None


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a qdata compare output directory")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/accuracy_vs_bits.png)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "accuracy_vs_bits.png"
    try:
        try:
            draw_figure(_summary(run_dir), run_dir, out)
        except KeyError as err:
            raise ValueError(f"{run_dir / 'summary.json'} lacks the entry {err} (from another qdata version?)") from None
    except ValueError as err:
        print(f"paper_figures.compare: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(out)
    return out


if __name__ == "__main__":
    main()
