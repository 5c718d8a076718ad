"""Files that are damaged or missing give errors naming them (issue 12, items 1 and 4): IDX data, a
redraw of a directory that is not a finished comparison, and a peer of a multi-process run that
never starts (a clear error once --init-timeout has passed, instead of JAX's C++ abort)."""

import gzip
import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from qdata import data
from qdata.data import load_dataset
from paper_figures import compare as redraw


def _write_idx(path, array):
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _idx_dir(root, n_train=7, n_test=3, gz=False):
    arrays = {"x_train": np.zeros((n_train, 4, 4), np.uint8), "y_train": np.zeros(n_train, np.uint8),
              "x_test": np.zeros((n_test, 4, 4), np.uint8), "y_test": np.zeros(n_test, np.uint8)}
    for key, stem in data.IDX_FILES.items():
        _write_idx(root / (stem + (".gz" if gz else "")), arrays[key])
    return root


def test_a_truncated_gz_idx_file_is_an_error_naming_it(tmp_path):
    root = _idx_dir(tmp_path, n_train=50, gz=True)
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])
    with pytest.raises(ValueError, match=rf"{images}: damaged gzip file"):
        load_dataset(f"idx:{root}")
    images.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=rf"{images}: damaged gzip file"):
        load_dataset(f"idx:{root}")


@pytest.mark.parametrize("n_train, n_test, split", [(0, 3, "train"), (7, 0, "test")])
def test_an_idx_set_of_0_samples_is_an_error_naming_it(tmp_path, n_train, n_test, split):
    root = _idx_dir(tmp_path, n_train=n_train, n_test=n_test)
    with pytest.raises(ValueError, match=rf"labels-idx1-ubyte: the {split} set holds 0 samples"):
        load_dataset(f"idx:{root}")


def _redraw(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        redraw.main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_redrawing_a_directory_without_summary_exits_2(tmp_path, capsys):
    assert "has no summary.json: not the output of a finished qdata compare" in _redraw([str(tmp_path)], capsys)
    (tmp_path / "summary.json").write_text('{"seeds": [0], "rows"')  # torn
    assert "summary.json is not valid JSON" in _redraw([str(tmp_path)], capsys)
    (tmp_path / "summary.json").write_text(json.dumps({"seeds": [0]}))
    assert "summary.json lacks the entry 'rows'" in _redraw([str(tmp_path)], capsys)
    assert "is not a directory" in _redraw([str(tmp_path / "nope")], capsys)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_peer_that_never_starts_is_a_clear_error_after_the_timeout(tmp_path, process_id):
    # Process 0 hosts the coordinator and waits for process 1; process 1 alone finds no coordinator.
    # Without the watchdog either would wait JAX's fixed 300 s and abort with a C++ fatal log.
    out = subprocess.run([sys.executable, "-m", "qdata.cli", "train", "--num-processes", "2", "--process-id",
                          str(process_id), "--coordinator", f"127.0.0.1:{_free_port()}", "--init-timeout", "3",
                          "--rounds", "2", "--eval-every", "2", "--checkpoint-every", "0", "--out", str(tmp_path / "r"),
                          "--no-progress"], capture_output=True, text=True, timeout=240)
    said = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert said and said[-1].startswith(f"qdata: error: process {process_id} of 2: not every process joined")
    assert "--init-timeout 3 s" in said[-1] and "Check failure" not in out.stderr
    assert not (tmp_path / "r" / "results.jsonl").exists()
