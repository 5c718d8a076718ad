"""Runs into what a figure draws: methods' labels, groups of runs of one setting, curves averaged
over seeds, and the downlink as ``qdata compare`` charges it.

A *setting* is what every method of one comparison shares (DESIGN.md section 7): dataset, model,
nodes, partition and batch. A *method* within it is a run's config up to its seed; runs of one
method on several seeds are drawn as their mean, evaluation by evaluation.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable, NamedTuple

from qdata.compare import downlink_per_node as compare_downlink
from paper_figures import canvas
from paper_figures.discover import Compare, Found, Run

# Config fields that do not make a different method: the seed, and how a run is run or recorded.
NOT_METHOD = ("name", "seed", "eval_every", "checkpoint_every", "target_accuracy", "num_devices", "data_dir")


class Group(NamedTuple):
    """Runs of one setting, by method label (one run per seed); from a compare or from loose runs."""

    title: str  # e.g. "compare runs/cmp" or "runs under runs: digits, mlp, 8 nodes"
    name: str  # a file-name part, e.g. "compare_cmp" or "digits_mlp_8nodes"
    source: str  # where the results are, for the caption
    methods: dict[str, list[Run]]
    compare: Compare | None


def short_name(dataset: str) -> str:
    """A dataset's name without its provenance ("fashion_mnist (IDX files from ...)" -> "fashion_mnist")."""
    return dataset.split(" (")[0]


def setting_key(header: dict) -> tuple:
    cfg = header["config"]
    return (header["dataset"]["name"], header["model"]["name"], cfg["num_nodes"], cfg["partition"],
            cfg["batch_size"])


def method_key(header: dict, drop: tuple[str, ...] = ()) -> tuple:
    """The config up to the seed (and the fields in ``drop``), as a hashable key."""
    cfg = header["config"]
    return tuple(sorted((k, str(v)) for k, v in cfg.items() if k not in NOT_METHOD + drop))


def describe_method(cfg: dict) -> str:
    """A short label from the config alone (what a loose run's default name does not say)."""
    if cfg["method"] == "sgd":
        return "sgd-fp32"
    if cfg["method"] == "gradient":
        return f"{cfg['compressor']}{'-ef' if cfg['error_feedback'] else ''}"
    if cfg["method"] == "dca":
        return f"dca m={cfg['dca_dim']}"
    if cfg["method"] == "split":
        label = f"split{'-u' if cfg.get('split_top') else ''} cut={cfg['split_cut']}"
        return label + (f" {cfg['split_bits']}b" if cfg.get("split_bits") else " fp32")
    basis = cfg.get("transform", "none")
    label = f"qdata-{cfg['bits']}b" if basis == "none" else f"qdata-{basis}-{cfg['sample_bits']}"
    label += "" if cfg["coder"] == "fixed" else f"-{cfg['coder']}"
    label += "" if cfg["quantizer"] == "stochastic" else f"-{cfg['quantizer']}"
    label += "" if cfg["gate"] == "off" else f"+gate({cfg['gate']} rho={cfg['rho']:g})"
    label += "" if cfg["correction"] == "off" else f"+corr({cfg['correction']})"
    return label + ("+cache" if cfg["cache"] else "")


def _difference(cfg: dict, variants: list[dict]) -> str:
    """What tells ``cfg`` apart from the other configs of the same label (``" lr=0.1"``), or ""."""
    differ = [k for k in cfg if k not in NOT_METHOD and len({str(v.get(k)) for v in variants}) > 1]
    return "".join(f" {k}={cfg[k]:g}" if isinstance(cfg[k], float) else f" {k}={cfg[k]}" for k in differ)


def _loose_groups(runs: list[Run], root) -> list[Group]:
    by_setting: dict[tuple, dict[tuple, list[Run]]] = {}
    for run in runs:
        by_setting.setdefault(setting_key(run.header), {}).setdefault(method_key(run.header), []).append(run)
    groups = []
    for (dataset, model, nodes, *_), methods in by_setting.items():
        labels = {}
        for key, members in methods.items():
            cfg = members[0].header["config"]
            label = cfg["name"] if cfg["name"] != "run" else describe_method(cfg)
            labels.setdefault(label, []).append(members)
        named = {}
        for label, variants in labels.items():
            for members in variants:  # one label, several configs (e.g. a learning-rate grid): say how they differ
                named[label + _difference(members[0].header["config"], [v[0].header["config"] for v in variants])] = members
        paths = [str(r.path) for ms in named.values() for r in ms]
        source = f"qdata train results under {os.path.commonpath(paths)} ({len(paths)} runs)"
        groups.append(Group(f"runs under {root}: {dataset}, {model}, {nodes} nodes",
                            canvas.slug(f"{short_name(dataset)}_{model}_{nodes}nodes"), source, named, None))
    return groups


def groups(found: Found) -> list[Group]:
    """Every compare as a group (its table's methods), then the loose runs grouped by setting."""
    out = [Group(f"compare {c.path}", canvas.slug(f"compare_{c.path.name}"), f"qdata compare results in {c.path}",
                 {label: runs for label, runs in c.runs.items() if runs}, c) for c in found.compares]
    named, seen = [], {}
    for g in out + _loose_groups(found.runs, found.root):
        if g.methods:
            seen[g.name] = seen.get(g.name, 0) + 1  # two settings of one name (another batch): their own files
            named.append(g if seen[g.name] == 1 else g._replace(name=f"{g.name}_{seen[g.name]}"))
    return [_say_one_shot(_say_unfinished(_say_seeds(g))) for g in named]


def _say_seeds(group: Group) -> Group:
    """Where methods ran on different numbers of seeds (an unfinished compare), each label says its count."""
    counts = {label: len(runs) for label, runs in group.methods.items()}
    if len(set(counts.values())) <= 1:
        return group
    return group._replace(methods={f"{label} ({counts[label]} seed{'s' if counts[label] > 1 else ''})": runs
                                   for label, runs in group.methods.items()})


def _say_unfinished(group: Group) -> Group:
    """A method whose runs stopped short of their rounds (a run still going) says where they are."""
    methods = {}
    for label, runs in group.methods.items():
        done, planned = min(r.rounds[-1]["round"] for r in runs), runs[0].header["config"]["rounds"]
        methods[label if done >= planned else f"{label} (round {done} of {planned})"] = runs
    return group._replace(methods=methods)


def one_shot(run: Run) -> bool:
    """Whether ``run`` is a one-shot method's (DCA, dispatch): every bit sent before its first round,
    its rounds then the central (or local) training that follows, at no further cost."""
    return bool(run.header.get("one_shot"))


def _say_one_shot(group: Group) -> Group:
    """A one-shot method's label says so: its curve is vertical (all its bits before round 1)."""
    return group._replace(methods={f"{label} (one-shot)" if one_shot(runs[0]) else label: runs
                                   for label, runs in group.methods.items()})


def downlink_per_node(run: Run, record: dict) -> float:
    """Cumulative downlink bits per node at ``record``, exactly as ``qdata compare`` charges it
    (:func:`qdata.compare.downlink_per_node`): the model broadcast and replies every round, a one-shot
    method's downlink paid before its first round, the recorded replies where they vary by round
    (sequential split learning), or for a gradient compressor the relay of the other nodes'
    messages where that is cheaper."""
    return compare_downlink(run.header, run.rounds, record["round"], record["cumulative_uplink_bits_per_node"])


def mean_curve(runs: list[Run], value: Callable[[Run, dict], float]) -> tuple[list[int], list[float]]:
    """``(rounds, values)``: ``value(run, record)`` averaged over the runs (seeds) at each evaluated
    round they all reached."""
    common = set.intersection(*({r["round"] for r in run.rounds} for run in runs))
    rounds = sorted(common)
    at = [{r["round"]: r for r in run.rounds} for run in runs]
    return rounds, [statistics.fmean(value(run, a[t]) for run, a in zip(runs, at)) for t in rounds]


def sgd_finals(group: Group) -> list[float] | None:
    """SGD's final test accuracy per seed: the compare's, or a loose group's SGD runs' (None without)."""
    if group.compare is not None:
        return group.compare.summary["sgd_final_test_accuracy"]
    sgd = [runs for runs in group.methods.values() if runs[0].header["config"]["method"] == "sgd"]
    if not sgd:
        return None
    return [run.rounds[-1]["test_accuracy"] for run in best_on_validation(sgd)]


def best_on_validation(variants: list[list[Run]]) -> list[Run]:
    """Of several variants (e.g. learning rates), each a list of runs over seeds, the one with the best
    mean final validation accuracy, as ``qdata compare`` chooses (test accuracy where none recorded)."""
    runs = [r for v in variants for r in v]
    measure = "val_accuracy" if all("val_accuracy" in r.rounds[-1] for r in runs) else "test_accuracy"
    # Scored on the seeds every variant has (a compare tunes on seed 0 and runs only the chosen variant on
    # the other seeds): a mean over other seeds would compare different draws.
    seeds = set.intersection(*({r.header["config"]["seed"] for r in v} for v in variants))
    scored = lambda v: [r for r in v if r.header["config"]["seed"] in seeds] or v
    return max(variants, key=lambda v: statistics.fmean(r.rounds[-1][measure] for r in scored(v)))
