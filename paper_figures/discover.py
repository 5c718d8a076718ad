"""Finding what a runs directory holds: ``qdata train`` runs, ``qdata compare`` outputs and
``python -m convergence`` reports, read from their results files only.

* a run: a directory with ``results.jsonl`` (:func:`qdata.results.load`); a results file inside a
  run's directory (a one-shot method's central run) belongs to that run and is not a run of its own;
* a compare: a directory with ``summary.json``; its runs are those of its table, each at the
  learning rate the compare chose, on every seed (``OUT/<label>/lr<LR>/seed<SEED>``); the rest
  under it (the tuning grid, the floors' central runs) is the compare's own business;
* a convergence report: a ``report.json`` with the checks' ``results``;
* a data-codes result of ``python -m experiments.data_codes`` (``data_codes.json``, or any other
  JSON file of that shape: a ``config``, a ``dataset`` and ``rows`` with ``bits_per_sample`` and ``family``).

A file that cannot be read is passed over with a one-line note (``Found.notes``), never an error:
a figure that needs it is then skipped.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

from qdata import results as qresults
from qdata.compare import run_dir


class Run(NamedTuple):
    """One training run: its directory, its header (the config record) and its round records."""

    path: Path
    header: dict
    rounds: list[dict]


class Compare(NamedTuple):
    """One ``qdata compare`` output: its directory, ``summary.json`` and its table's runs."""

    path: Path
    summary: dict
    runs: dict[str, list[Run]]  # method label -> one run per seed, at the chosen learning rate


class Found(NamedTuple):
    root: Path
    runs: list[Run]  # the runs outside any compare
    compares: list[Compare]
    reports: list[tuple[Path, dict]]  # convergence reports
    data_codes: list[Path]  # experiments.data_codes results files
    notes: list[str]  # what could not be read, one line each

    def all_runs(self) -> list[Run]:
        """Every run: those outside compares, and each compare's table runs."""
        return self.runs + [r for c in self.compares for runs in c.runs.values() for r in runs]

    def empty(self) -> bool:
        return not (self.runs or self.compares or self.reports or self.data_codes)


def _load_run(path: Path, notes: list[str]) -> Run | None:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", qresults.TornLineWarning)
            header, rounds = qresults.load(path)
        notes.extend(f"{path}: {w.message}" for w in caught)
    except (ValueError, OSError) as err:
        notes.append(f"{path}: skipped ({' '.join(str(err).splitlines())})")
        return None
    if not rounds:
        notes.append(f"{path}: skipped (no evaluation recorded yet)")
        return None
    return Run(path, header, rounds)


def _load_compare(path: Path, notes: list[str]) -> Compare | None:
    try:
        summary = json.loads((path / "summary.json").read_text())
        rows = [(row["method"], row["lr"]) for row in summary["rows"]]
        seeds = summary["seeds"]
    except (ValueError, OSError, KeyError, TypeError) as err:
        notes.append(f"{path / 'summary.json'}: skipped (not a readable compare summary: {err})")
        return None
    runs = {}
    for label, lr in rows:
        loaded = [_load_run(run_dir(path, label, lr, s), notes) for s in seeds]
        runs[label] = [r for r in loaded if r is not None]
    return Compare(path, summary, runs)


def _load_report(path: Path, notes: list[str]) -> dict | None:
    try:
        report = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        notes.append(f"{path}: skipped (not valid JSON: {err})")
        return None
    if not isinstance(report, dict) or "results" not in report or "objectives" not in report:
        return None  # some other report.json: not a convergence report
    return report


def _is_data_codes(path: Path) -> bool:
    """Whether a JSON file is a result of ``python -m experiments.data_codes`` (small files only)."""
    if path.stat().st_size > 5_000_000:
        return False
    try:
        results = json.loads(path.read_text())
        return {"config", "dataset", "rows"} <= set(results) and all("bits_per_sample" in r and "family" in r for r in results["rows"])
    except (ValueError, OSError, TypeError, KeyError, IndexError, AttributeError):
        return False


def find(root: str | Path, skip: Path | None = None) -> Found:
    """Everything under ``root`` (module docstring); ``skip``: a directory not to look in (the
    figures' own output)."""
    root = Path(root)
    found = Found(root, [], [], [], [], [])
    claimed: list[Path] = []  # compare and run directories: what is under them is theirs
    names = ("summary.json", "results.jsonl", "report.json")
    # Shallow first: a compare's summary (or a run's results) is met before what lies under it.
    for path in sorted((p for p in root.rglob("*") if p.name in names or p.suffix == ".json"),
                       key=lambda p: (len(p.parts), str(p))):
        if not path.is_file() or "checkpoints" in path.relative_to(root).parts:
            continue
        directory = path.parent
        if skip is not None and directory.is_relative_to(skip):
            continue
        if any(directory.is_relative_to(c) for c in claimed):
            continue
        if path.name == "summary.json":
            compare = _load_compare(directory, found.notes)
            if compare is not None:
                found.compares.append(compare)
                claimed.append(directory)
        elif path.name == "results.jsonl":
            run = _load_run(directory, found.notes)
            claimed.append(directory)
            if run is not None:
                found.runs.append(run)
        elif path.name != "report.json":
            if _is_data_codes(path):
                found.data_codes.append(path)
        else:
            report = _load_report(path, found.notes)
            if report is not None:
                found.reports.append((directory, report))
    return found
