"""The drawing surface every figure shares: matplotlib on Agg, a caption line printed under the
axes (wrapped, with room kept for it) and the PNG written; a :class:`Figure` or a :class:`Skipped`
is what each figure module returns."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import NamedTuple

CAPTION_FONT = 7.5
CHARS_PER_INCH = 17  # of CAPTION_FONT text: where the caption wraps
LINE_INCHES = 0.15


class Figure(NamedTuple):
    path: Path
    caption: str


class Skipped(NamedTuple):
    figure: str
    why: str


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = (".", "x", "^", "s", "v", "D")
# tab10 without its grey (C7): grey is the reference lines' (targets, the model broadcast), so a
# method drawn in it would read as one of them.
METHOD_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")


def method_style(i: int, qdata: bool) -> dict:
    """Line style of the i-th method: nine distinct colours, then the same colours with the next
    marker, drawn larger, open and spaced out (a small marker at every evaluation would not tell two
    lines of one colour apart); qdata solid, the others dashed."""
    colours, cycle = len(METHOD_COLOURS), i // len(METHOD_COLOURS)
    style = {"color": METHOD_COLOURS[i % colours], "marker": MARKERS[cycle % len(MARKERS)], "markersize": 3,
             "linewidth": 1.2, "linestyle": "-" if qdata else "--"}
    if cycle:
        style.update(markersize=6, markevery=0.04, markerfacecolor="none", markeredgewidth=1.1)
    return style


def side_legend(fig, ax, right: float) -> None:
    """The legend of ``ax`` beside the axes, in the figure's share right of ``right``."""
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(right, 0.5), fontsize=7,
               frameon=False)


def slug(text: str) -> str:
    """A file-name part from free text (labels, directory names)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:80] or "figure"


def save(fig, path: Path, caption: str, title: str | None = None, rect_right: float = 1.0) -> Figure:
    """Write ``fig`` to ``path`` with ``title`` above and ``caption`` wrapped below the axes (which
    keep the figure's left ``rect_right`` share: the rest is for a legend beside them)."""
    plt = pyplot()
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(caption, int(width * CHARS_PER_INCH))
    bottom = (len(lines) * LINE_INCHES + 0.1) / height
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=CAPTION_FONT, va="bottom", ha="left")
    top = 1.0
    if title:
        title_lines = textwrap.wrap(title, int(width * 13))
        fig.suptitle("\n".join(title_lines), fontsize=10)
        top = 1.0 - (len(title_lines) * 0.2 + 0.1) / height
    fig.tight_layout(rect=(0, bottom, rect_right, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Figure(path, caption)
