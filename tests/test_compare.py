"""`qdata compare`, the main job, end to end on a few rounds; and the summary arithmetic."""

import json
import subprocess
import sys

from qdata import results as qresults
from qdata.compare import TARGET_FRACTION, summarize
from qdata.config import RunConfig


def test_compare_command_writes_table_summary_and_figure(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "qdata.cli", "compare", "--rounds", "4", "--eval-every", "2", "--num-nodes", "2",
         "--checkpoint-every", "0", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    labels = [r["method"] for r in summary["rows"]]
    assert labels == ["qdata-4b", "qdata-4b+corr", "qdata-4b+gate", "qdata-4b+corr+gate", "sgd-fp32",
                      "qsgd-s4-b512", "topk-0.1%-ef", "powersgd-r2-ef"]
    # Every run shares the setting: same model size, nodes, rounds, seed.
    headers = [qresults.load(out / label)[0] for label in labels]
    assert len({(h["model"]["params"], h["config"]["num_nodes"], h["config"]["rounds"], h["config"]["seed"])
                for h in headers}) == 1
    assert (out / "accuracy_vs_bits.png").stat().st_size > 10_000
    table = (out / "table.txt").read_text()
    assert "digits" in table and "mlp" in table and "seed 0" in table
    assert "qdata-4b" in proc.stdout
    # The ledger's figure for SGD is exact: 32 bits per parameter per round.
    sgd = summary["rows"][labels.index("sgd-fp32")]
    assert sgd["uplink_bits_per_round"] == 32 * headers[0]["model"]["params"]
    # Resuming a finished comparison reruns nothing and gives the same table.
    stamps = {label: (out / label / "results.jsonl").stat().st_mtime_ns for label in labels}
    again = subprocess.run(
        [sys.executable, "-m", "qdata.cli", "compare", "--rounds", "4", "--eval-every", "2", "--num-nodes", "2",
         "--checkpoint-every", "0", "--out", str(out), "--no-progress", "--resume"],
        capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]
    assert stamps == {label: (out / label / "results.jsonl").stat().st_mtime_ns for label in labels}
    # The figure can be redrawn from the results files alone.
    from paper_figures.compare import main as redraw

    assert redraw([str(out), "--out", str(tmp_path / "again.png")]).stat().st_size > 10_000


def _run(label, method, accs, bits_per_round):
    rounds = [{"round": i + 1, "test_accuracy": a, "cumulative_uplink_bits_per_node": bits_per_round * (i + 1)}
              for i, a in enumerate(accs)]
    return (label, RunConfig(method=method), {"config": {}}, rounds)


def test_summary_bits_to_target_and_ratio():
    runs = [
        _run("sgd", "sgd", [0.5, 0.9, 1.0], 100),
        _run("gc-a", "gradient", [0.5, 0.96, 0.97], 10),  # reaches 0.95 at round 2: 20 bits
        _run("gc-b", "gradient", [0.2, 0.3, 0.96], 5),  # round 3: 15 bits, the best compressor
        _run("q", "qdata", [0.96, 0.99, 1.0], 3),  # round 1: 3 bits -> 5x fewer than 15
        _run("never", "qdata", [0.1, 0.2, 0.3], 1),
    ]
    s = summarize(runs)
    assert s["reference_accuracy"] == 1.0 and abs(s["target_accuracy"] - TARGET_FRACTION) < 1e-12
    rows = {r["method"]: r for r in s["rows"]}
    assert s["best_compressor_bits_to_target"] == 15
    assert rows["q"]["bits_to_target"] == 3 and rows["q"]["ratio_to_best_compressor"] == 5
    assert rows["never"]["bits_to_target"] is None and rows["never"]["ratio_to_best_compressor"] is None


def test_bench_step_quick_runs(capsys):
    """The step benchmark's smoke mode, so the script cannot rot (its figures are not asserted)."""
    from experiments.bench_step import main

    rows = main(["--quick"])
    assert {r["setting"] for r in rows} == {"plain step", "plain 4x8", "sgd", "qdata-4b", "qdata-4b+corr"}
    assert all(r["seconds"] > 0 and r["ratio_to_plain"] > 0 for r in rows)
    assert "synthetic" in capsys.readouterr().out
