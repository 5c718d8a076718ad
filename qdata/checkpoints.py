"""Orbax checkpoints of a run that a resume can trust.

Each checkpoint holds the round state and a small JSON ledger (the exact bit totals so far) with a
SHA-256 digest of the state's arrays. :func:`restore_newest_intact` tries the checkpoints newest
first: one that does not restore, or whose arrays do not match their digest (a flipped bit that
tensorstore would read back silently), is moved out of the way to ``OUT/checkpoints-broken/<step>``
with a :class:`BrokenCheckpointWarning` naming it, and the previous one is tried.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from qdata import engine

KEEP = 2  # checkpoints kept: the newest and one to fall back on


class BrokenCheckpointWarning(UserWarning):
    """A checkpoint did not restore (or did not match its digest) and was set aside."""


class Restored(NamedTuple):
    step: int
    state: Any
    ledger: dict


def directory(out: Path) -> Path:
    return (Path(out) / "checkpoints").absolute()


def saved_steps(out: Path) -> list[int]:
    """The steps of the finished checkpoints in ``out`` (orbax names each one's directory by its step;
    unfinished saves keep a temporary name), without opening any."""
    root = directory(out)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def open_manager(out: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory(out), options=ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=True))


def state_digest(state) -> str:
    """SHA-256 over the state's arrays (dtype, shape and bytes of every leaf, in tree order)."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(engine.fetch(state)):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def save(manager: ocp.CheckpointManager, step: int, state, ledger: dict) -> None:
    """Save ``state`` and ``ledger`` (JSON) at ``step``, with the state's digest; wait until written."""
    ledger = {**ledger, "state_sha256": state_digest(state)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               ledger=ocp.args.JsonSave(ledger)))
    manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, step: int, template) -> Restored:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template),
                                                             ledger=ocp.args.JsonRestore()))
    ledger = dict(restored["ledger"])
    expected = ledger.pop("state_sha256", None)  # None: a checkpoint from before digests were saved
    if expected is not None and state_digest(restored["state"]) != expected:
        raise ValueError("its arrays do not match the SHA-256 digest saved with them")
    return Restored(step, restored["state"], ledger)


def _set_aside(root: Path, step: int, err: Exception) -> None:
    broken = root.parent / "checkpoints-broken"
    target = broken / str(step)
    suffix = 1
    while target.exists():
        target, suffix = broken / f"{step}.{suffix}", suffix + 1
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    if jax.process_index() == 0:  # one process moves it; every process reads the same directory
        broken.mkdir(exist_ok=True)
        shutil.move(str(root / str(step)), str(target))
    warnings.warn(f"checkpoint {root / str(step)} is broken ({reason}); moved to {target}, "
                  "trying the previous one", BrokenCheckpointWarning, stacklevel=3)


def restore_newest_intact(manager: ocp.CheckpointManager, template, at_most: int | None = None) -> Restored | None:
    """The newest checkpoint that restores into ``template``'s structure and matches its digest; the
    broken ones on the way are set aside (module docstring). None when no checkpoint is intact.

    ``at_most``: the last round the results file records. A checkpoint beyond it (its record was
    lost, e.g. torn) cannot continue the results and is deleted with a warning: the rounds after
    the checkpoint used are recomputed, bitwise the same.
    """
    root = Path(manager.directory)
    found = None
    steps = sorted(manager.all_steps(), reverse=True)
    for step in [s for s in steps if at_most is not None and s > at_most]:
        warnings.warn(f"checkpoint {root / str(step)} is newer than the last round the results record "
                      f"({at_most}); deleted, its rounds will be recomputed", BrokenCheckpointWarning, stacklevel=2)
        manager.delete(step)
    for step in [s for s in steps if at_most is None or s <= at_most]:
        try:
            found = _restore(manager, step, template)
            break
        except Exception as err:  # whatever orbax or tensorstore raise, the checkpoint is unusable
            _set_aside(root, step, err)
        finally:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"qdata restore {step}")
    manager.reload()
    return found
