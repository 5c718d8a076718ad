"""The convergence checks' figures, redrawn from each ``python -m convergence`` report found
(:func:`convergence.figures.draw_report`), into ``OUT/convergence_<dir>/``."""

from __future__ import annotations

from pathlib import Path

from convergence.figures import draw_report
from paper_figures import canvas
from paper_figures.discover import Found


def draw(found: Found, out: Path) -> list:
    if not found.reports:
        return [canvas.Skipped("convergence checks", "no python -m convergence report.json")]
    items = []
    for directory, _ in found.reports:
        where = directory.relative_to(found.root) if directory != found.root else Path(directory.name)
        target = out / canvas.slug(f"convergence_{where}")
        items += [canvas.Figure(path, caption) for path, caption in draw_report(directory / "report.json", target)]
    return items
