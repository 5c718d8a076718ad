"""A comparison's lineup, as data: which methods run, on what, over which seeds and learning rates.

A lineup is a TOML file (see ``experiments/compare_*.toml``)::

    seeds = [0, 1, 2]              # every reported figure is a mean and range over these
    lr_grid = [0.03, 0.1, 0.3]     # each method's learning rate is chosen from this grid ...
    tune_seeds = [0]               # ... by validation accuracy on these seeds (default: the first)
    lr_extend = 2                  # optional: a rate chosen at its grid's edge widens it (up to 2 times)
    floors = { coders = ["png", "zstd"], bits = [4] }   # optional: the one-shot data-shipping floors

    [base]                         # RunConfig fields shared by every run
    dataset = "digits"
    validation = 0.1               # the validation split the choices are made on (required > 0)

    [[run]]                        # one method; a family groups the settings of one knob
    label = "topk-0.1%-ef"
    family = "topk-ef"
    method = "gradient"
    compressor = "topk:0.001"
    error_feedback = true

Exactly one run is the reference, full-precision SGD (``method = "sgd"``). A run may set its own
``lr_grid``. With ``lr_extend = K``, a run whose chosen rate is the smallest or largest of its
grid (of two or more rates) is also trained at the next rate of the 1-2-5 series past that edge
(0.05 -> 0.1, 0.01 -> 0.005), up to K times, outward from the edge it chose
(``qdata.compare.tune``). Unknown keys, a run field that is not a :class:`~qdata.config.RunConfig`
field, a field set in a run that the base also sets, duplicate labels and a missing reference are refused
with an error naming them.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import NamedTuple

from qdata.config import RunConfig

TOP_KEYS = ("seeds", "lr_grid", "tune_seeds", "lr_extend", "floors", "base", "run", "description")
MAX_LR_EXTEND = 4
RUN_KEYS = ("label", "family", "lr_grid")
FLOOR_KEYS = ("coders", "bits")
LINEUP_DIR = Path(__file__).resolve().parent.parent / "experiments"


class Run(NamedTuple):
    """One method of a lineup: its label, its family, its config (without lr and seed) and grid."""

    label: str
    family: str
    config: RunConfig
    lr_grid: tuple[float, ...]
    overrides: frozenset  # the fields this run sets on top of the base


class Lineup(NamedTuple):
    base: RunConfig
    base_fields: frozenset  # the fields [base] sets
    runs: tuple[Run, ...]
    seeds: tuple[int, ...]
    tune_seeds: tuple[int, ...]
    floors: dict
    description: str = ""
    lr_extend: int = 0  # how many times a grid widens past an edge its run chose

    @property
    def reference(self) -> Run:
        return next(r for r in self.runs if r.config.method == "sgd")

    def fields_set(self) -> set[str]:
        """Every RunConfig field the lineup sets (base or any run), plus lr and seed."""
        return set(self.base_fields) | {f for r in self.runs for f in r.overrides} | {"lr", "seed"}


def _ints(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                            and v >= 0 for v in value):
        raise ValueError(f"lineup: {name} must be a non-empty list of non-negative integers, got {value!r}")
    return tuple(value)


def _grid(value, name: str) -> tuple[float, ...]:
    ok = isinstance(value, list) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value)
    if not ok:
        raise ValueError(f"lineup: {name} must be a non-empty list of positive learning rates, got {value!r}")
    return tuple(float(v) for v in value)


def _floors(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) - set(FLOOR_KEYS):
        raise ValueError(f"lineup: floors must be a table with keys {FLOOR_KEYS}, got {value!r}")
    return {"coders": tuple(value.get("coders", ())), "bits": _ints(value["bits"], "floors.bits")
            if "bits" in value else ()}


def _run(entry, index: int, base: RunConfig, base_fields: set, grid: tuple[float, ...]) -> Run:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    if not isinstance(entry, dict):
        raise ValueError(f"lineup: run #{index + 1} must be a table, got {entry!r}")
    label = entry.get("label")
    if not isinstance(label, str) or not label or "/" in label:
        raise ValueError(f"lineup: run #{index + 1} needs a label (a non-empty string without '/'), got {label!r}")
    fields = {k: v for k, v in entry.items() if k not in RUN_KEYS}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"lineup: run {label!r} sets unknown field(s) {unknown}; RunConfig fields: {sorted(known)}")
    clash = sorted(set(fields) & (base_fields | {"lr", "seed", "name"}))
    if clash:
        raise ValueError(f"lineup: run {label!r} sets {clash}, which the base (or the lineup's seeds and lr_grid) sets")
    config = base.replace(**fields, name=label)
    family = entry.get("family", label)
    if not isinstance(family, str) or not family:
        raise ValueError(f"lineup: run {label!r}: family must be a non-empty string, got {family!r}")
    run_grid = _grid(entry["lr_grid"], f"run {label!r} lr_grid") if "lr_grid" in entry else grid
    return Run(label, family, config, run_grid, frozenset(fields))


def _check_fault_free(runs, source: str) -> None:
    # The comparison's downlink column is the fault-free one of each method: refuse faults rather than
    # print a wrong total (a node that has left receives nothing; see qdata.answers).
    faulty = sorted(r.label for r in runs if getattr(r.config, "faults", "none") != "none")
    if faulty:
        raise ValueError(f"{source}: faults are set for {faulty}; qdata compare tables fault-free runs only "
                         "(run faulty nodes with qdata train --faults)")


def parse_lineup(values: dict, *, source: str = "lineup") -> Lineup:
    """Check and build a :class:`Lineup` from a parsed TOML document (module docstring)."""
    unknown = sorted(set(values) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; allowed: {list(TOP_KEYS)}")
    base_values = values.get("base", {})
    if not isinstance(base_values, dict):
        raise ValueError(f"{source}: [base] must be a table of RunConfig fields")
    base = RunConfig.from_dict(base_values)
    if not base.validation:
        raise ValueError(f"{source}: [base] must set validation (a share of the training set in (0, 1)): "
                         "learning rates and family members are chosen on it, never on the test split")
    seeds = _ints(values.get("seeds", [0]), "seeds")
    grid = _grid(values.get("lr_grid", [base.lr]), "lr_grid")
    entries = values.get("run", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: needs at least one [[run]]")
    runs = tuple(_run(e, i, base, set(base_values), grid) for i, e in enumerate(entries))
    labels = [r.label for r in runs]
    duplicates = sorted({lab for lab in labels if labels.count(lab) > 1})
    if duplicates:
        raise ValueError(f"{source}: duplicate run label(s) {duplicates}")
    if sum(r.config.method == "sgd" for r in runs) != 1:
        raise ValueError(f"{source}: exactly one run must be the reference, method = \"sgd\" (full-precision SGD)")
    _check_fault_free(runs, source)
    tune = _ints(values.get("tune_seeds", [seeds[0]]), "tune_seeds")
    extend = values.get("lr_extend", 0)
    if isinstance(extend, bool) or not isinstance(extend, int) or not 0 <= extend <= MAX_LR_EXTEND:
        raise ValueError(f"{source}: lr_extend must be an integer in 0..{MAX_LR_EXTEND} (how many times a "
                         f"learning-rate grid widens past an edge its run chose), got {extend!r}")
    return Lineup(base, frozenset(base_values), runs, seeds, tune, _floors(values.get("floors")),
                  str(values.get("description", "")), extend)


def load_lineup(path: str | Path) -> Lineup:
    """The lineup in TOML file ``path`` (a path, or the name of a file in ``experiments/``)."""
    path = Path(path)
    if not path.exists() and (LINEUP_DIR / path).exists():
        path = LINEUP_DIR / path
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"lineup file {str(path)!r} not found (lineups in {LINEUP_DIR}: "
                         f"{sorted(p.name for p in LINEUP_DIR.glob('compare_*.toml'))})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"lineup file {str(path)!r} is not valid TOML: {err}") from None
    return parse_lineup(values, source=str(path))


def with_overrides(lineup: Lineup, changes: dict, *, source: str = "the command line") -> Lineup:
    """The lineup with base fields set from ``changes`` (e.g. flags); a field the lineup itself sets
    is refused, never silently overridden."""
    clash = sorted(set(changes) & lineup.fields_set())
    if clash:
        raise ValueError(f"{', '.join('--' + c.replace('_', '-') for c in clash)} from {source}: the lineup sets "
                         f"{'it' if len(clash) == 1 else 'them'} (per run, in [base], or as seeds / lr_grid); "
                         "edit the lineup file instead")
    if not changes:
        return lineup
    base = lineup.base.replace(**changes)
    runs = tuple(r._replace(config=r.config.replace(**changes)) for r in lineup.runs)
    _check_fault_free(runs, source)
    return lineup._replace(base=base, runs=runs, base_fields=lineup.base_fields | set(changes))
