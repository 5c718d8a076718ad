"""Redraw the comparison figure from a ``qdata compare`` output directory (results files only).

    python -m paper_figures.compare runs/compare-YYYYmmdd-HHMMSS [--out paper_figures/compare_digits.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qdata.compare import draw_figure


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a qdata compare output directory")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/accuracy_vs_bits.png)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    out = Path(args.out) if args.out else run_dir / "accuracy_vs_bits.png"
    draw_figure(summary, run_dir, out)
    print(out)
    return out


if __name__ == "__main__":
    main()
