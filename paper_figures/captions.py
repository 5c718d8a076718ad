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


def _represented(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """The runs on the setting's own data, and the one-shot runs that train on a representation of it
    (DCA's collaboration representation: another n, another model size), which are not another dataset."""
    own = [r for r in runs if not r.header.get("one_shot")]
    datasets = {_dataset(r.header) for r in own}
    other = {id(r) for r in runs if own and r.header.get("one_shot") and _dataset(r.header) not in datasets}
    return [r for r in runs if id(r) not in other], [r for r in runs if id(r) in other]


def setting_caption(runs: list[Run]) -> str:
    """Dataset, model, nodes, rounds and seeds of ``runs`` (every distinct value, in order met); a
    one-shot method trained on a representation of the data says so apart."""
    own, represented = _represented(runs)
    headers = [r.header for r in own]
    models = _joined(f"{h['model']['name']} (d={h['model']['params']:,})" for h in headers)
    nodes = _joined(f"{r.header['config']['num_nodes']} ({r.header['config']['partition']})" for r in runs)
    seeds = _joined(sorted({r.header["config"]["seed"] for r in runs}))
    rounds = _joined(sorted({r.header["config"]["rounds"] for r in runs}))
    batch = _joined(sorted({r.header["config"]["batch_size"] for r in runs}))
    line = f"Dataset {_joined(_dataset(h) for h in headers)}; model {models}"
    for name, h in {r.header["config"]["name"]: r.header for r in represented}.items():
        line += (f" ({name}, one-shot: its {h['model']['name']} (d={h['model']['params']:,}) trains on the "
                 f"{h['dataset']['source']}, n={h['dataset']['n']})")
    return f"{line}; nodes {nodes}, batch {batch}; rounds {rounds}; seeds {seeds}"


def caption(runs: list[Run], source: str, note: str = "") -> str:
    """The full caption line: the setting, an optional note on what is drawn, and the source."""
    parts = [setting_caption(runs)] + ([f"Drawn: {note}"] if note else []) + [f"Source: {source}"]
    return ". ".join(p.rstrip(".") for p in parts) + "."
