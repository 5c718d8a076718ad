"""What ``--resume`` accepts: the run's own config, or one that differs only where that is safe.

A resumed run must end as the uninterrupted run would have, and its results header must say what
it was run with. So the config given on resume is compared with the one in the results header,
field by field, and every difference is refused (naming the fields and both values) except:

* ``name``, ``num_devices``: labels and layout (the rounds compute the same values on any device
  count, up to the order of float reductions);
* ``checkpoint_every``: when to save; but 0 while the run has checkpoints is refused (it would
  ignore them and retrain from round 0);
* ``data_dir``: where the data is read from; the dataset's description (sizes, shapes, classes and
  a fingerprint of its samples) is compared instead;
* ``rounds``: extended only (a longer run continues; a shorter one would not be the run).

The changes are recorded in the header's ``resumed`` list.
"""

from __future__ import annotations

import dataclasses

from qdata.config import RunConfig

SAFE_TO_CHANGE = ("name", "num_devices", "checkpoint_every", "data_dir", "rounds")
_ABSENT = "(absent)"


def differences(saved: dict, config: RunConfig) -> dict[str, tuple]:
    """``{field: (run's value, value now)}`` for every field that differs (a field the saved config
    lacks counts as its default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    now = config.to_dict()
    fields = sorted(set(saved) | set(now))
    before = {k: saved.get(k, defaults.get(k, _ABSENT)) for k in fields}
    return {k: (before[k], now.get(k, _ABSENT)) for k in fields if before[k] != now.get(k, _ABSENT)}


def check_config(saved: dict, config: RunConfig, *, has_checkpoints: bool, where: str) -> dict[str, tuple]:
    """Refuse a resume whose ``config`` differs from the run's ``saved`` config where it is not safe
    (module docstring); return the safe differences. ``where`` names the results file in errors."""
    changed = differences(saved, config)
    refused = {k: v for k, v in changed.items() if k not in SAFE_TO_CHANGE}
    if "rounds" in changed and changed["rounds"][1] < changed["rounds"][0]:
        refused["rounds"] = changed["rounds"]
    if refused:
        said = "; ".join(f"{k}: {old!r} in the run, {new!r} now" for k, (old, new) in refused.items())
        raise ValueError(f"--resume: the config differs from the run's ({where}): {said}. A resumed run keeps "
                         f"its config; safe to change: {', '.join(SAFE_TO_CHANGE)} (rounds only upwards). "
                         "Start a new run (another --out) to change the others")
    if has_checkpoints and config.checkpoint_every == 0:
        raise ValueError(f"--resume with checkpoint_every=0 would ignore the run's checkpoints and retrain from "
                         f"round 0 ({where}); keep checkpoint_every > 0 (it was {saved.get('checkpoint_every')!r})")
    return changed


# What identifies the data, whatever directory it is read from.
DATA_KEYS = ("synthetic", "n", "sample_shape", "num_classes", "num_train", "num_test", "num_validation",
             "fingerprint")


def check_same_data(saved: dict, now: dict, *, where: str) -> None:
    """Refuse a resume on other data than the run's (the dataset descriptions of the results header
    and of the data loaded now; keys missing from either side are not compared)."""
    differ = [k for k in DATA_KEYS if k in saved and k in now and saved[k] != now[k]]
    if differ:
        said = "; ".join(f"{k}: {saved[k]!r} in the run, {now[k]!r} now" for k in differ)
        raise ValueError(f"--resume: the dataset differs from the run's ({where}): {said}")


def record(header: dict, previous: dict | None, from_round: int, changed: dict[str, tuple]) -> dict:
    """``header`` (the config as resumed) with the run's resume history, this resume appended."""
    history = list((previous or {}).get("resumed", []))
    history.append({"from_round": int(from_round),
                    "changed": {k: {"run": old, "now": new} for k, (old, new) in changed.items()}})
    return {**header, "resumed": history}
