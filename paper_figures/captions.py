"""The caption line every figure carries: dataset (synthetic data labelled as such), model, nodes,
rounds and seeds, read from the runs' headers, and what produced it."""

from __future__ import annotations

from paper_figures.discover import Run


def _joined(values) -> str:
    unique = []
    for v in values:
        if v not in unique:
            unique.append(v)
    return ", ".join(str(v) for v in unique)


def _dataset(header: dict) -> str:
    ds = header["dataset"]
    kind = "SYNTHETIC data" if ds["synthetic"] else "real data"
    return f"{ds['name']} ({kind}, n={ds['n']}, {ds['num_train']} train / {ds['num_test']} test)"


def setting_caption(runs: list[Run]) -> str:
    """Dataset, model, nodes, rounds and seeds of ``runs`` (every distinct value, in order met)."""
    headers = [r.header for r in runs]
    models = _joined(f"{h['model']['name']} (d={h['model']['params']:,})" for h in headers)
    nodes = _joined(f"{h['config']['num_nodes']} ({h['config']['partition']})" for h in headers)
    seeds = _joined(sorted({h["config"]["seed"] for h in headers}))
    rounds = _joined(sorted({h["config"]["rounds"] for h in headers}))
    batch = _joined(sorted({h["config"]["batch_size"] for h in headers}))
    return (f"Dataset {_joined(_dataset(h) for h in headers)}; model {models}; nodes {nodes}, batch {batch}; "
            f"rounds {rounds}; seeds {seeds}")


def caption(runs: list[Run], source: str, note: str = "") -> str:
    """The full caption line: the setting, an optional note on what is drawn, and the source."""
    parts = [setting_caption(runs)] + ([f"Drawn: {note}"] if note else []) + [f"Source: {source}"]
    return ". ".join(p.rstrip(".") for p in parts) + "."
