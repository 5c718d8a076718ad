"""Runs that survive (issue 12, item 4): ``--resume`` refuses a config it cannot continue, falls back
past a broken checkpoint, and shrugs off a torn results line; a SIGKILL at a random moment of a real
``qdata train`` loses at most one checkpoint interval and ends bitwise equal to an uninterrupted run."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from qdata import results as qresults
from qdata.checkpoints import BrokenCheckpointWarning
from qdata.config import RunConfig
from qdata.resume import check_same_data
from qdata.run import final_params, train

# 4 nodes holding state at both ends (the learner's cache, the nodes' EF memory of the correction),
# a Bernoulli gate: everything a resume must carry over.
BASE = RunConfig(dataset="digits", model="mlp", num_nodes=4, batch_size=8, rounds=6, eval_every=2, checkpoint_every=2,
                 seed=1, method="qdata", cache=True, correction="ef:topk:32", gate="bernoulli", rho=0.5)


def _params(out_dir):
    header, _ = qresults.load(out_dir)
    return final_params(out_dir, RunConfig.from_dict(header["config"]))


def _assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 6-round run (checkpoints at 4 and 6 kept) and the uninterrupted 8-round reference."""
    root = tmp_path_factory.mktemp("runs")
    train(BASE, root / "six")
    train(BASE.replace(rounds=8), root / "eight")
    return root


def _copy(runs, name, tmp_path):
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("change, named", [
    (dict(lr=0.2), "lr: 0.1 in the run, 0.2 now"),
    (dict(bits=8), "bits: 4 in the run, 8 now"),
    (dict(num_nodes=2, batch_size=8), "num_nodes: 4 in the run, 2 now"),
    (dict(seed=2), "seed: 1 in the run, 2 now"),
    (dict(rounds=4), "rounds: 6 in the run, 4 now"),
    (dict(lr=0.3, momentum=0.5), "lr: 0.1 in the run, 0.3 now; momentum: 0.9 in the run, 0.5 now"),
])
def test_resume_refuses_a_changed_config_naming_fields_and_values(runs, tmp_path, change, named):
    out = _copy(runs, "six", tmp_path)
    before = (out / "results.jsonl").read_bytes()
    with pytest.raises(ValueError, match="--resume: the config differs from the run's") as err:
        train(BASE.replace(**change), out, resume=True)
    assert named in str(err.value) and "safe to change: name, num_devices" in str(err.value)
    assert (out / "results.jsonl").read_bytes() == before  # refused before anything was touched


def test_resume_refuses_to_drop_the_checkpoints(runs, tmp_path):
    out = _copy(runs, "six", tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every=0 would ignore the run's checkpoints"):
        train(BASE.replace(checkpoint_every=0, rounds=8), out, resume=True)


def test_resume_takes_the_safe_changes_records_them_and_matches_an_uninterrupted_run(runs, tmp_path):
    out = _copy(runs, "six", tmp_path)
    resumed = BASE.replace(rounds=8, name="longer", checkpoint_every=4)
    train(resumed, out, resume=True)
    header, rounds = qresults.load(out)
    assert header["config"] == resumed.to_dict()  # the header says what the run now is ...
    assert header["resumed"] == [{"from_round": 6, "changed": {  # ... and what changed, from when
        "checkpoint_every": {"run": 2, "now": 4}, "name": {"run": "run", "now": "longer"},
        "rounds": {"run": 6, "now": 8}}}]
    _, reference = qresults.load(runs / "eight")
    assert [r["round"] for r in rounds] == [r["round"] for r in reference]
    assert rounds[-1]["cumulative_uplink_bits"] == reference[-1]["cumulative_uplink_bits"]
    _assert_bitwise_equal(_params(out), _params(runs / "eight"))


def test_resume_compares_the_data_not_its_directory():
    saved = {"name": "idx:a (IDX files from /old)", "n": 64, "num_train": 10, "fingerprint": "f00"}
    check_same_data(saved, {**saved, "name": "idx:a (IDX files from /new)"}, where="x")  # moved: fine
    with pytest.raises(ValueError, match="dataset differs.*fingerprint: 'f00' in the run, 'bad' now"):
        check_same_data(saved, {**saved, "fingerprint": "bad"}, where="x")


def _corrupt_bytes(step_dir: Path) -> None:
    # Flip bytes in the middle of the largest array file: tensorstore may read it back silently,
    # the digest saved with the checkpoint does not match.
    target = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))


def _truncate_files(step_dir: Path) -> None:
    for p in (step_dir / "state").rglob("*"):
        if p.is_file():
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _delete_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("damage", [_corrupt_bytes, _truncate_files, _delete_metadata])
def test_a_broken_newest_checkpoint_is_set_aside_and_the_previous_one_used(runs, tmp_path, damage):
    out = _copy(runs, "six", tmp_path)
    damage(out / "checkpoints" / "6")
    with pytest.warns(BrokenCheckpointWarning, match=r"checkpoint .*checkpoints/6 is broken .*moved to "
                                                     r".*checkpoints-broken/6, trying the previous one"):
        train(BASE.replace(rounds=8), out, resume=True)
    assert (out / "checkpoints-broken" / "6").is_dir()
    header, rounds = qresults.load(out)
    assert header["resumed"][-1]["from_round"] == 4
    assert [r["round"] for r in rounds] == [2, 4, 6, 8]  # rounds 5-6 recomputed, their old lines replaced
    _assert_bitwise_equal(_params(out), _params(runs / "eight"))


def test_a_torn_last_results_line_is_dropped_with_a_warning(runs, tmp_path):
    out = _copy(runs, "six", tmp_path)
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])  # killed while writing the round-6 record
    with pytest.warns(qresults.TornLineWarning, match=rf"{path}: line {len(lines)} is torn"):
        header, rounds = qresults.load(out)
    assert [r["round"] for r in rounds] == [2, 4]
    # The checkpoint of round 6 has no record left to continue: deleted, rounds 5-6 recomputed from 4.
    with pytest.warns(qresults.TornLineWarning), pytest.warns(BrokenCheckpointWarning, match="newer than the last"):
        train(BASE.replace(rounds=8), out, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten whole on resume: nothing torn is left
        _, rounds = qresults.load(out)
    assert [r["round"] for r in rounds] == [2, 4, 6, 8]
    _assert_bitwise_equal(_params(out), _params(runs / "eight"))


def test_a_bad_line_inside_a_results_file_is_an_error_naming_it(runs, tmp_path):
    out = _copy(runs, "six", tmp_path)
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:30] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a JSON object .*the file is damaged"):
        qresults.load(out)
    with pytest.raises(ValueError, match="line 2"):
        train(BASE, out, resume=True)


def test_a_batch_larger_than_a_shard_is_refused_before_compiling(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=1000 is larger than the smallest node's shard \(359 samples"):
        train(BASE.replace(batch_size=1000), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# SIGKILL of a real process at a random moment.

KILL_FLAGS = ["--dataset", "digits", "--model", "mlp", "--num-nodes", "4", "--batch-size", "16", "--rounds", "32",
              "--eval-every", "2", "--checkpoint-every", "4", "--seed", "5", "--method", "qdata", "--bits", "4",
              "--cache", "--gate", "bernoulli", "--rho", "0.5", "--correction", "ef:topk:32", "--no-progress"]
CHECKPOINT_EVERY = 4


def _qdata_train(args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, "-m", "qdata.cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def _rounds_written(path: Path) -> int:
    if not path.exists():
        return 0
    done = [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]  # complete lines only
    return max([r["round"] for r in done if r["kind"] == "round"], default=0)


def _kill_at(out: Path, after_round: int, delay: float) -> tuple[bool, int]:
    """SIGKILL a training run into ``out`` once ``after_round`` results are on disk and ``delay`` seconds
    have passed; whether it was still running then, and the last round it had written."""
    victim = _qdata_train(KILL_FLAGS + ["--out", str(out)])
    while _rounds_written(out / "results.jsonl") < after_round and victim.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)
    alive = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    return alive, _rounds_written(out / "results.jsonl")


def test_sigkill_at_a_random_moment_loses_at_most_one_checkpoint_interval(tmp_path):
    seed = int(os.environ.get("QDATA_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    about = f"(replay with QDATA_KILL_SEED={seed})"
    reference = _qdata_train(KILL_FLAGS + ["--out", str(tmp_path / "full")])
    # The moment: once a random number of evaluations are on disk, after a random delay (possibly
    # inside a checkpoint write, an evaluation or a round). A fast machine may finish the run before
    # the moment comes: then the moment is drawn again, earlier, in a fresh directory (3 tries).
    after_round, delay = rng.choice(range(0, 24, 2)), rng.uniform(0.0, 0.5)
    for attempt in range(3):
        killed_dir = tmp_path / f"killed{attempt}"
        alive, written = _kill_at(killed_dir, after_round, delay)
        if alive and written < 32:
            break
        after_round, delay = after_round // 2, delay / 4
    assert alive and written < 32, f"the run ended before it was killed, 3 times {about}"
    resumed = _finish(_qdata_train(KILL_FLAGS + ["--out", str(killed_dir), "--resume"]))
    _finish(reference)
    header, rounds = qresults.load(killed_dir)
    from_round = header["resumed"][-1]["from_round"] if "resumed" in header else 0  # killed before any result
    print(f"killed after round {written} (+{delay:.2f} s); resumed from round {from_round} {about}")
    assert written - from_round <= CHECKPOINT_EVERY, (written, from_round, about)
    assert "Traceback" not in resumed
    _, full_rounds = qresults.load(tmp_path / "full")
    assert [r["round"] for r in rounds] == [r["round"] for r in full_rounds]
    assert rounds[-1]["cumulative_uplink_bits"] == full_rounds[-1]["cumulative_uplink_bits"]
    assert [r["test_accuracy"] for r in rounds] == [r["test_accuracy"] for r in full_rounds]
    _assert_bitwise_equal(_params(killed_dir), _params(tmp_path / "full"))
