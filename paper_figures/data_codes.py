"""The data codes' test accuracy against bits per sample (issue 10: fixed-length and ANS-coded,
pixel, DCT and PCA bases), redrawn from each ``data_codes.json`` of ``python -m
experiments.data_codes`` (:func:`experiments.data_codes.plot`, with the caption line printed in the
figure) into ``OUT/data_codes_<dir>_<file>.png``."""

from __future__ import annotations

import json
from pathlib import Path

from paper_figures import canvas
from paper_figures.discover import Found


def describe(results: dict, path: Path) -> str:
    """The caption line, from the results file alone."""
    from experiments.data_codes import caption

    cfg, name = results["config"], results["dataset"]
    kind = "SYNTHETIC data" if name.startswith("synthetic") else "real data"
    return (f"Dataset {name} ({kind}, {results['num_train']} train samples); model MLP 784-256-256-10, trained "
            f"centrally on the decoded samples; nodes 1 (one node holds the training split); rounds: "
            f"{cfg['epochs']} epochs; seeds {', '.join(str(s) for s in cfg['seeds'])}. Drawn: {caption(results)}. "
            f"Source: python -m experiments.data_codes results in {path}.")


def draw(found: Found, out: Path) -> list:
    if not found.data_codes:
        return [canvas.Skipped("data codes' accuracy vs bits per sample", "no experiments.data_codes data_codes.json")]
    from experiments.data_codes import plot

    plt = canvas.pyplot()
    items = []
    out.mkdir(parents=True, exist_ok=True)
    for path in found.data_codes:
        try:
            results = json.loads(path.read_text())
            where = path.parent.relative_to(found.root) if path.parent != found.root else Path(path.parent.name)
            target = out / f"{canvas.slug(f'data_codes_{where}_{path.stem}')}.png"
            caption = describe(results, path)  # the setting line every figure carries, printed in it too
            plot(str(path), str(target), caption)
            items.append(canvas.Figure(target, caption))
        except (ValueError, KeyError, OSError) as err:
            items.append(canvas.Skipped(f"data codes ({path})", f"unreadable: {err}"))
        finally:
            plt.close("all")  # experiments.data_codes.plot leaves its figure open
    return items
