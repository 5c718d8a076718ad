"""`qdata compare`, the main job: a lineup end to end, the lineup loader, the protocol's choices
(on validation only) and the table's arithmetic (targets, interpolation, totals, ratios)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qdata import compare as compare_module
from qdata import results as qresults
from qdata.compare import TARGETS, choose_family_bests, choose_learning_rates, run_dir, summarize
from qdata.lineup import load_lineup, parse_lineup, with_overrides

TINY = """
seeds = [0, 1]
lr_grid = [0.1, 0.2]
floors = { bits = [4], coders = ["png", "zstd"] }
[base]
dataset = "digits"
model = "mlp:16"
num_nodes = 2
batch_size = 8
rounds = 6
eval_every = 3
checkpoint_every = 0
validation = 0.1
[[run]]
label = "sgd"
method = "sgd"
[[run]]
label = "qdata-4b"
method = "qdata"
bits = 4
cache = true
[[run]]
label = "topk-1%"
family = "topk"
method = "gradient"
compressor = "topk:0.01"
error_feedback = true
[[run]]
label = "topk-10%"
family = "topk"
method = "gradient"
compressor = "topk:0.1"
error_feedback = true
"""


def _compare(args, timeout=900):
    return subprocess.run([sys.executable, "-m", "qdata.cli", "compare", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


def test_compare_command_runs_a_lineup_resumes_and_redraws(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "cmp"
    proc = _compare(["--config", str(tmp_path / "tiny.toml"), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["sgd", "qdata-4b", "topk-1%", "topk-10%"]
    assert sum(r["best_of_family"] for r in rows.values() if r["family"] == "topk") == 1
    # Every run shares the setting; each seed's directory holds its own run.
    headers = [qresults.load(run_dir(out, m, r["lr"], s))[0] for m, r in rows.items() for s in (0, 1)]
    assert len({(h["model"]["params"], h["config"]["num_nodes"], h["config"]["rounds"]) for h in headers}) == 1
    assert {h["config"]["seed"] for h in headers} == {0, 1}
    assert all(h["dataset"]["num_validation"] == 144 for h in headers)  # 10% of digits' 1,437 training images
    d = headers[0]["model"]["params"]
    assert rows["sgd"]["uplink_bits_per_round"] == rows["sgd"]["downlink_bits_per_round"] == 32 * d
    assert rows["qdata-4b"]["downlink_bits_per_round"] == 0  # no gate, no correction: no model at the nodes
    assert rows["qdata-4b"]["node_seconds"] > 0 and rows["qdata-4b"]["learner_seconds"] > 0
    assert "SGD - 1 pt" in proc.stdout and "95% of SGD" in proc.stdout
    assert (out / "accuracy_vs_bits.png").stat().st_size > 10_000
    # The floors: the cheapest real coder's bytes, the central model's accuracy, in the table.
    floors = {f["data_bits"]: f for f in summary["floors"]}
    assert set(floors) == {None, 4}
    for f in floors.values():
        per_seed = [min(c["mean_bits_per_node"] for c in rows) for rows in f["coders_per_seed"]]
        assert len(per_seed) == 2 and f["bits"] == pytest.approx(sum(per_seed) / 2) and f["bits"] > 0
        assert all({c["coder"] for c in rows} == {"png", "zstd"} for rows in f["coders_per_seed"])
        assert 0 < f["final_test_accuracy"]["mean"] <= 1
    assert "floors:" in proc.stdout and "lossless" in proc.stdout
    # Resuming a finished comparison trains nothing and gives the same rows (but the timings).
    files = sorted(out.glob("*/lr*/seed*/results.jsonl"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _compare(["--config", str(tmp_path / "tiny.toml"), "--out", str(out), "--resume"])
    assert again.returncode == 0, again.stderr
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rs]
    assert strip(json.loads((out / "summary.json").read_text())["rows"]) == strip(summary["rows"])
    assert stamps == [f.stat().st_mtime_ns for f in files]
    from paper_figures.compare import main as redraw

    assert redraw([str(out), "--out", str(tmp_path / "again.png")]).stat().st_size > 10_000


def test_compare_refuses_flags_the_lineup_sets(tmp_path, capsys):
    from qdata import cli

    (tmp_path / "tiny.toml").write_text(TINY)
    for flags, word in ((["--bits", "3"], "--bits"), (["--rounds", "9"], "--rounds"), (["--seed", "2"], "--seed"),
                        (["--lr", "0.3"], "--lr"), (["--compressor", "fp16"], "--compressor")):
        code = cli.main(["compare", "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "x"), *flags,
                         "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and word in err and err.startswith("qdata: error:"), (flags, err)
    assert not (tmp_path / "x").exists()  # refused before any work
    code = cli.main(["compare", "--config", str(tmp_path / "missing.toml")])
    assert code == 2 and "missing.toml" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ("bogus = 1\n", "unknown key"),
    ("[[run]]\nlabel = \"x\"\nbitz = 3\n", "bitz"),
    ("[[run]]\nlabel = \"x\"\nrounds = 3\n", "rounds"),  # the base sets it
    ("[[run]]\nlabel = \"sgd\"\nmethod = \"qdata\"\n", "duplicate"),
    ("[[run]]\nlabel = \"sgd2\"\nmethod = \"sgd\"\n", "reference"),
    ("[[run]]\nlabel = \"lr\"\nlr = 0.3\n", "lr"),
    ("lr_extend = 9\n", r"lr_extend must be an integer in 0\.\.4"),
    ("lr_extend = true\n", "lr_extend"),
])
def test_lineup_loader_refuses_bad_files(tmp_path, change, message):
    top, _, runs = TINY.partition("[base]")
    text = (top + change + "[base]" + runs) if not change.startswith("[[run]]") else TINY + change
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_lineup(tmp_path / "bad.toml")


def test_lineup_needs_a_validation_split_and_a_reference():
    import tomllib

    values = tomllib.loads(TINY)
    del values["base"]["validation"]
    with pytest.raises(ValueError, match="validation"):
        parse_lineup(values)
    values = tomllib.loads(TINY)
    values["run"] = [r for r in values["run"] if r["method"] != "sgd"]
    with pytest.raises(ValueError, match="reference"):
        parse_lineup(values)
    lineup = parse_lineup(tomllib.loads(TINY))
    assert with_overrides(lineup, {"max_test": 50}).runs[1].config.max_test == 50
    with pytest.raises(ValueError, match="--num-nodes"):
        with_overrides(lineup, {"num_nodes": 4})


def test_default_lineups_load():
    digits = load_lineup("compare_digits.toml")
    assert digits.reference.label == "sgd-fp32" and digits.seeds == (0, 1, 2)
    families = {r.family for r in digits.runs if r.config.method == "gradient"}
    assert {"topk-ef", "qsgd", "ef-sign", "terngrad", "fp16"} <= families
    for name, dataset, model in (("compare_fashion_mnist_mlp.toml", "fashion_mnist", "mlp"),
                                 ("compare_fashion_mnist_cnn.toml", "fashion_mnist", "cnn"),
                                 ("compare_fashion_mnist_cnn_short.toml", "fashion_mnist", "cnn"),
                                 ("compare_cifar10_resnet20.toml", "cifar10", "resnet20"),
                                 ("study_digits_low_bits.toml", "digits", "mlp"),
                                 ("study_digits_correction.toml", "digits", "mlp"),
                                 ("study_digits_gate.toml", "digits", "mlp"),
                                 ("all_digits_dispatch_sensitivity.toml", "digits", "mlp"),
                                 ("study_fashion_mnist_low_bits.toml", "fashion_mnist", "mlp"),
                                 ("stream_digits.toml", "digits", "mlp"),
                                 ("all_fashion_mnist_mlp.toml", "fashion_mnist", "mlp")):
        lineup = load_lineup(name)
        assert (lineup.base.dataset, lineup.base.model) == (dataset, model) and lineup.base.validation > 0


def test_crossing_interpolates_between_the_straddling_evaluations():
    rounds = [{"round": 10, "test_accuracy": 0.5, "cumulative_uplink_bits_per_node": 100},
              {"round": 20, "test_accuracy": 0.9, "cumulative_uplink_bits_per_node": 300}]
    hit = qresults.crossing(rounds, 0.6)
    assert hit == {"round": 12.5, "uplink_bits_per_node": 150.0}
    assert qresults.crossing(rounds, 0.4) == {"round": 10.0, "uplink_bits_per_node": 100.0}  # the first evaluation
    assert qresults.crossing(rounds, 0.95) is None


def _fake(val, test, bits_per_round, down=0, rounds_each=10, method="gradient"):
    header = {"method": method, "downlink_bits_per_node_per_round": down, "dataset": {"name": "fake", "synthetic": True, "n": 4},
              "model": {"name": "m", "params": max(1, down // 32)}, "config": {"num_nodes": 2, "partition": "iid", "batch_size": 1,
                                                              "rounds": rounds_each * len(val), "seed": 0}}
    rounds = [{"round": rounds_each * (i + 1), "val_accuracy": v, "test_accuracy": t,
               "cumulative_uplink_bits_per_node": bits_per_round * rounds_each * (i + 1),
               "uplink_bits_last_round_per_node": {"total": bits_per_round}}
              for i, (v, t) in enumerate(zip(val, test))]
    return header, rounds


@pytest.mark.parametrize("lr, up, want", [(0.05, True, 0.1), (0.1, True, 0.2), (0.2, True, 0.5), (0.5, True, 1.0),
                                         (0.01, False, 0.005), (0.1, False, 0.05), (0.001, False, 0.0005),
                                         (2.0, True, 5.0), (0.03, True, 0.06), (0.03, False, 0.015)])
def test_the_next_rate_past_an_edge_follows_1_2_5(lr, up, want):
    assert compare_module.next_rate(lr, up) == want  # exactly: the run directory is named after it


def _peaked(peak, trained):
    """A stand-in trainer: final validation (and test) accuracy falls off with |log(lr / peak[label])|;
    ``peak[label]`` may be a function of lr instead."""
    def train_each(jobs, results):
        for run, lr, seed in jobs:
            if (run.label, lr, seed) not in results:
                trained.append((run.label, lr))
                p = peak[run.label]
                val = p(lr) if callable(p) else 0.9 - abs(math.log(lr / p))
                results[(run.label, lr, seed)] = _fake([val], [val], 10, method=run.config.method)
    return train_each


def _widening_lineup(extend=2):
    import tomllib

    values = tomllib.loads(TINY)
    values["run"][3]["lr_grid"] = [0.2]
    return parse_lineup({**values, "lr_grid": [0.05, 0.1, 0.2], "seeds": [0], "tune_seeds": [0], "lr_extend": extend})


def test_a_rate_chosen_at_an_edge_widens_the_grid():
    """Validation accuracy peaks at 0.5 for SGD (above the grid), at 0.1 for qdata (inside it) and at
    0.01 for top-k 1% (below it, out of reach with lr_extend = 2); top-k 10%'s one-rate grid is fixed."""
    peak = {"sgd": 0.5, "qdata-4b": 0.1, "topk-1%": 0.01, "topk-10%": 0.01}
    trained, results, lineup = [], {}, _widening_lineup()
    train_each = _peaked(peak, trained)
    chosen, grids = compare_module.tune(lineup, results, lambda jobs: train_each(jobs, results))
    assert chosen == {"sgd": 0.5, "qdata-4b": 0.1, "topk-1%": 0.01, "topk-10%": 0.2}
    assert grids == {"sgd": (0.05, 0.1, 0.2, 0.5, 1.0), "qdata-4b": (0.05, 0.1, 0.2),
                     "topk-1%": (0.05, 0.1, 0.2, 0.02, 0.01), "topk-10%": (0.2,)}
    assert len(trained) == len(set(trained)) == 5 + 3 + 5 + 1  # each rate once
    assert {r.label: r.lr_grid for r in lineup.runs}["sgd"] == (0.05, 0.1, 0.2)  # the lineup is not changed
    # Resumed over the same results: the same choices, nothing trained again.
    assert compare_module.tune(lineup, results, lambda jobs: train_each(jobs, results)) == (chosen, grids)
    assert len(trained) == 14
    fresh = {}
    unwidened = compare_module.tune(lineup._replace(lr_extend=0), fresh, lambda jobs: train_each(jobs, fresh))
    assert unwidened[1]["sgd"] == (0.05, 0.1, 0.2) and unwidened[0]["sgd"] == 0.2
    phases = {r.label: {"node_seconds": 0.1, "learner_seconds": 0.2} for r in lineup.runs}
    summary = summarize(lineup, results, chosen, choose_family_bests(lineup, results, chosen), phases, grids)
    assert [r["method"] for r in summary["rows"] if r["lr_at_edge"]] == ["topk-1%"]
    line = next(x for x in compare_module.format_table(summary).splitlines() if x.startswith("lr: "))
    assert line.endswith("chosen at an edge of the rates tried: topk-1% (0.01/0.02/0.05/0.1/0.2)")
    assert "up to 2 time(s)" in line


def test_a_plateau_does_not_draw_the_choice_outward():
    """Validation accuracy is flat below 0.05 (as discrete accuracies often are): one step down ties,
    the earlier rate keeps the choice and the widening stops there."""
    flat = lambda lr: 0.9 if lr <= 0.05 else 0.5
    peak = {"sgd": flat, "qdata-4b": 0.1, "topk-1%": 0.1, "topk-10%": 0.1}
    trained, results, lineup = [], {}, _widening_lineup()
    train_each = _peaked(peak, trained)
    chosen, grids = compare_module.tune(lineup, results, lambda jobs: train_each(jobs, results))
    assert chosen["sgd"] == 0.05 and grids["sgd"] == (0.05, 0.1, 0.2, 0.02)
    assert not compare_module.at_edge(chosen["sgd"], grids["sgd"])


def test_choices_use_validation_only_and_the_table_arithmetic():
    import tomllib

    lineup = parse_lineup({**tomllib.loads(TINY), "seeds": [0], "tune_seeds": [0]})
    results = {
        # SGD: validation prefers lr 0.2, although lr 0.1 is better on test.
        ("sgd", 0.1, 0): _fake([0.5, 0.8], [0.5, 0.99], 1000, down=1024, method="sgd"),
        ("sgd", 0.2, 0): _fake([0.6, 0.9], [0.6, 1.0], 1000, down=1024, method="sgd"),
        ("qdata-4b", 0.1, 0): _fake([0.7, 0.95], [0.96, 0.99], 10, method="qdata"),
        ("qdata-4b", 0.2, 0): _fake([0.1, 0.1], [0.1, 0.1], 10, method="qdata"),
        # top-k: 10% reaches SGD's validation accuracy - 1 pt (0.89) with fewer bits than 1%.
        ("topk-1%", 0.1, 0): _fake([0.5, 0.95], [0.5, 0.95], 100, down=1024),
        ("topk-1%", 0.2, 0): _fake([0.5, 0.5], [0.5, 0.5], 100, down=1024),
        ("topk-10%", 0.1, 0): _fake([0.95, 0.95], [0.97, 0.995], 40, down=1024),
        ("topk-10%", 0.2, 0): _fake([0.5, 0.5], [0.5, 0.5], 40, down=1024),
    }
    chosen = choose_learning_rates(lineup, results)
    assert chosen == {"sgd": 0.2, "qdata-4b": 0.1, "topk-1%": 0.1, "topk-10%": 0.1}
    bests = choose_family_bests(lineup, results, chosen)
    assert bests["topk"] == "topk-10%"
    phases = {r.label: {"node_seconds": 0.1, "learner_seconds": 0.2} for r in lineup.runs}
    summary = summarize(lineup, results, chosen, bests, phases)
    rows = {r["method"]: r for r in summary["rows"]}
    assert summary["sgd_final_test_accuracy"] == [1.0]
    # Target SGD - 1 pt = 0.99 (test). top-k 10%: 0.97 at round 10 (400 bits), 0.995 at 20 (800 bits):
    # interpolated at 0.8 of the way, round 18, 720 uplink bits; its downlink is the relay of the
    # other node's messages (N - 1 = 1 times 40 bits a round, under the model's 1024): 720 more.
    topk = rows["topk-10%"]["targets"]["SGD - 1 pt"]
    assert topk["uplink"]["mean"] == pytest.approx(720) and topk["total"]["mean"] == pytest.approx(1_440)
    assert rows["topk-10%"]["downlink"] == "relay" and rows["topk-10%"]["downlink_bits_per_round"] == 40
    assert rows["sgd"]["downlink"] == "model" and rows["sgd"]["downlink_bits_per_round"] == 1024
    assert rows["qdata-4b"]["downlink"] == "none"
    # qdata: 0.96 -> 0.99 reaches 0.99 at round 20 exactly: 200 bits, no downlink.
    q = rows["qdata-4b"]["targets"]["SGD - 1 pt"]
    assert q["uplink"]["mean"] == pytest.approx(200) and q["total"]["mean"] == pytest.approx(200)
    assert q["ratio_uplink"] == pytest.approx(720 / 200) and q["ratio_total"] == pytest.approx(1_440 / 200)
    assert summary["best_qdata_ratio"] == {"uplink": pytest.approx(3.6), "total": pytest.approx(7.2)}
    strict = summary["against_every_member"]["uplink"]
    assert strict["compressor"] == "topk-10%" and strict["ratio"] == pytest.approx(3.6)
    assert "against every swept compressor member" in compare_module.format_table(summary)
    # A lineup whose compressors reach no target (or that has none) says so instead of "None" and "-x".
    alone = compare_module.format_table({**summary, "best_qdata_ratio": {"uplink": None, "total": None},
                                         "best_gradient_compressor": dict.fromkeys(summary["best_gradient_compressor"])})
    assert "none: no gradient compressor in this lineup reaches a target on every seed" in alone
    assert "headline (SGD - 1 pt): no ratio" in alone and "None" not in alone and "-x" not in alone
    # A compressor whose relay would cost more than the model (N - 1 = 1 times 1500 > 1024) gets the model.
    header, rounds = _fake([0.5], [0.5], 1500, down=1024)
    assert not compare_module.relays(header, rounds)
    assert compare_module.relays(*_fake([0.5], [0.5], 1023, down=1024))
    assert rows["topk-1%"]["targets"]["SGD - 1 pt"]["reached"] == 0  # 0.95 < 0.99
    assert rows["topk-1%"]["targets"]["SGD - 1 pt"]["ratio_uplink"] is None
    assert set(TARGETS) == {"95% of SGD", "SGD - 1 pt"}


def test_bench_step_quick_runs(capsys):
    """The step benchmark's smoke mode, so the script cannot rot (its figures are not asserted)."""
    from experiments.bench_step import main

    rows = main(["--quick"])
    assert {r["setting"] for r in rows} == {"plain step", "plain 4x8", "sgd", "qdata-4b", "qdata-4b+corr"}
    assert all(r["seconds"] > 0 and r["ratio_to_plain"] > 0 for r in rows)
    assert "synthetic" in capsys.readouterr().out


def test_the_figures_total_panel_charges_the_downlink_as_the_table_does(tmp_path, monkeypatch):
    """The accuracy-vs-bits figure's total panel uses the table's downlink rule: for sequential split
    learning (replies that vary by round) the recorded downlink, not the header's per-round reply
    size times the rounds (8x more); for a relaying compressor the other nodes' messages."""
    import matplotlib.figure

    from qdata import results as qresults

    drawn = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.setdefault("fig", fig))
    out = Path(__file__).resolve().parents[1] / "paper_figures" / "runs" / "all-digits-split-seq"
    summary = json.loads((out / "summary.json").read_text())
    compare_module.draw_figure(summary, out, tmp_path / "figure.png")
    total = {line.get_label(): line.get_xdata() for line in drawn["fig"].axes[1].get_lines()}
    row = next(r for r in summary["rows"] if r["method"] == "split-seq-cut1-4b")
    header, rounds = qresults.load(compare_module.run_dir(out, row["method"], row["lr"], summary["seeds"][0]))
    last = rounds[-1]
    expected = last["cumulative_uplink_bits_per_node"] + last["cumulative_downlink_bits"] / header["config"]["num_nodes"]
    assert total["split-seq-cut1-4b"][-1] == pytest.approx(expected)
    # the rule the figure had: the header's reply size every round, several times what was sent
    assert header["downlink_bits_per_node_per_round"] * last["round"] > 4 * (expected - last["cumulative_uplink_bits_per_node"])


def test_the_one_seed_look_chooses_as_compare_does_and_names_a_missing_run(tmp_path):
    """On the committed results of the every-method Fashion lineup (no widening) it gives the table's
    choices; on a lineup that widens past runs not made yet it names the first missing one."""
    from experiments import one_seed_table

    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "paper_figures/runs/cmp-all-fashion/summary.json").read_text())
    sgd, table = one_seed_table.rows("all_fashion_mnist_mlp.toml", str(root / "paper_figures/runs/cmp-all-fashion"), 0)
    assert {label: lr for label, lr, *_ in table} == {r["method"]: r["lr"] for r in summary["rows"]}
    widening = tmp_path / "widening.toml"
    widening.write_text(TINY.replace("lr_grid = [0.1, 0.2]", "lr_grid = [0.1, 0.2]\nlr_extend = 1"))
    for label in ("sgd", "qdata-4b", "topk-1%", "topk-10%"):
        for lr in (0.1, 0.2):
            d = run_dir(tmp_path / "cmp", label, lr, 0)
            d.mkdir(parents=True)
            header, rounds = _fake([0.5 + lr], [0.5], 10, method="sgd" if label == "sgd" else "gradient")
            (d / "results.jsonl").write_text("\n".join(json.dumps(x) for x in [{"kind": "config", **header}] + [
                {"kind": "round", **r} for r in rounds]) + "\n")
    with pytest.raises(SystemExit, match=r"sgd/lr0\.5/seed0: not run yet"):
        one_seed_table.rows(str(widening), str(tmp_path / "cmp"), 0)
    d = run_dir(tmp_path / "cmp", "sgd", 0.5, 0)  # SGD's choice made (0.5 beats 0.2): the others wait for theirs
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text((run_dir(tmp_path / "cmp", "sgd", 0.2, 0) / "results.jsonl").read_text().replace(
        '"val_accuracy": 0.7', '"val_accuracy": 0.9'))
    sgd, table = one_seed_table.rows(str(widening), str(tmp_path / "cmp"), 0)
    assert table[0][:2] == ("sgd", 0.5)
    assert [(label, lr, where.endswith(f"{label}/lr0.5/seed0")) for label, lr, where, *_ in table[1:]] == [
        ("qdata-4b", None, True), ("topk-1%", None, True), ("topk-10%", None, True)]
