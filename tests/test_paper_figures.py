"""``python -m paper_figures RUNS_DIR``: every figure redrawn from a results directory made by short
real runs (four ``qdata train`` runs on digits, one tiny ``python -m convergence``): the figures
render, their captions say what the runs' headers say, a missing kind is skipped with a note, and a
bad directory is a one-line error with exit status 2."""

import shutil

import pytest

from paper_figures.__main__ import main
from qdata import results as qresults
from qdata.config import RunConfig
from qdata.run import train

BASE = RunConfig(dataset="digits", model="mlp:16", num_nodes=2, batch_size=8, rounds=4, eval_every=2,
                 checkpoint_every=0)
RUNS = {  # directory -> config: two data bits B (the bits sweep), two models (bits vs d), SGD (the targets)
    "sgd-mlp": BASE.replace(name="sgd", method="sgd"),
    "sgd-logreg": BASE.replace(name="sgd", method="sgd", model="logreg"),
    "qdata-2b": BASE.replace(name="qdata-2b", bits=2),
    "qdata-4b": BASE.replace(name="qdata-4b", bits=4),
    "qdata-dct-64": BASE.replace(name="qdata-dct-64", transform="dct", sample_bits=64),  # bits per sample across bases
}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    from convergence.check import main as convergence_main

    root = tmp_path_factory.mktemp("runs")
    for name, config in RUNS.items():
        train(config, root / name)
    convergence_main(["--out", str(root / "convergence"), "--tmin", "5", "--tmax", "6", "--seeds", "2",
                      "--objectives", "least_squares", "--settings", "fp32 SGD", "--no-controls", "--no-comm"])
    return root


@pytest.fixture(scope="module")
def drawn(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    figures = main([str(runs_dir), "--out", str(out)])
    captions = dict(line.split(": ", 1) for line in (out / "captions.txt").read_text().splitlines())
    return out, figures, captions


def test_every_kind_renders(drawn):
    out, figures, captions = drawn
    names = sorted(str(f.path.relative_to(out)) for f in figures)
    for kind in ("accuracy_vs_bits_", "train_loss_", "bits_breakdown_", "accuracy_vs_data_bits_",
                 "accuracy_vs_bits_per_sample_",
                 "bits_vs_dimension_", "convergence_convergence/least_squares.png"):
        assert any(name.startswith(kind) for name in names), (kind, names)
    for figure in figures:
        assert figure.path.stat().st_size > 10_000  # a drawn PNG, not an empty canvas
        assert captions[str(figure.path.relative_to(out))] == figure.caption
    assert sorted(captions) == names


def test_captions_say_what_the_runs_say(runs_dir, drawn):
    out, figures, captions = drawn
    header, rounds = qresults.load(runs_dir / "qdata-4b")
    sweep = next(c for name, c in captions.items() if name.startswith("accuracy_vs_data_bits_"))
    ds, cfg = header["dataset"], header["config"]
    assert f"Dataset {ds['name']} (real data, n={ds['n']}" in sweep
    assert f"model {header['model']['name']} (d={header['model']['params']:,})" in sweep
    assert f"nodes {cfg['num_nodes']} ({cfg['partition']})" in sweep
    assert f"rounds {rounds[-1]['round']}; seeds {cfg['seed']}" in sweep
    assert f"under {runs_dir}" in sweep  # what produced it
    accuracy = next(c for name, c in captions.items() if name.startswith("accuracy_vs_bits_") and "mlp" in c)
    assert "targets from SGD's final test accuracy" in accuracy  # an SGD run is in the setting
    dimension = next(c for name, c in captions.items() if name.startswith("bits_vs_dimension_"))
    for name in ("sgd-mlp", "sgd-logreg"):
        model = qresults.load(runs_dir / name)[0]["model"]
        assert f"{model['name']} (d={model['params']:,})" in dimension
    across = next(c for name, c in captions.items() if name.startswith("accuracy_vs_bits_per_sample_"))
    assert "a transform's setup spread over its samples" in across and "left off" not in across
    convergence = next(c for name, c in captions.items() if name.startswith("convergence_"))
    assert "SYNTHETIC data" in convergence and "python -m convergence --out" in convergence


def test_a_missing_kind_is_skipped_with_a_note(runs_dir, tmp_path, capsys):
    shutil.copytree(runs_dir / "qdata-4b", tmp_path / "runs" / "one")
    figures = main([str(tmp_path / "runs"), "--out", str(tmp_path / "figures")])
    printed = capsys.readouterr().out
    kinds = ("accuracy_vs_bits_", "train_loss_", "bits_breakdown_")  # the kinds one run makes
    assert sorted(next(k for k in kinds if f.path.name.startswith(k)) for f in figures) == sorted(kinds)
    for kind in ("accuracy vs data bits B", "gate's budget rho", "model dimension d", "convergence checks",
                 "data codes"):
        assert sum(line.startswith("note: skipped") and kind in line for line in printed.splitlines()) == 1, kind
    assert "no SGD run in this setting, so no targets are marked" in figures[0].caption


@pytest.mark.parametrize("make", ["missing", "empty", "junk only"])
def test_a_bad_runs_dir_is_a_one_line_error(tmp_path, capsys, make):
    runs = tmp_path / "runs"
    if make != "missing":
        runs.mkdir()
    if make == "junk only":
        (runs / "notes.txt").write_text("no results here")
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("paper_figures: error:") and str(runs) in err
    assert not (runs / "figures").exists()


def _run(method: str, *, one_shot=None, dataset="digits", n=64, params=1000, **header):
    """A hand-made run (header and two round records) of 2 nodes, 10 rounds: what the figures read."""
    from paper_figures.discover import Run

    config = {"name": method, "method": method.split(":")[0], "num_nodes": 2, "partition": "iid", "seed": 0,
              "rounds": 10, "batch_size": 8}
    head = {"config": config, "method": method, "model": {"name": "mlp", "params": params},
            "dataset": {"name": dataset, "source": f"source of {dataset}", "synthetic": False, "n": n,
                        "num_train": 100, "num_test": 20},
            "downlink_bits_per_node_per_round": 0, **header}
    if one_shot:
        head["one_shot"] = one_shot
    up = {"data": 300, "labels": 100, "total": 400}
    rounds = [{"round": t, "test_accuracy": 0.5, "cumulative_uplink_bits": up, "cumulative_uplink_bits_per_node": 200.0,
               "uplink_bits_last_round_per_node": {"total": 0.0}, "cumulative_downlink_bits": 60 * t} for t in (5, 10)]
    return Run(None, head, rounds)


def test_a_one_shot_method_is_charged_its_downlink_and_drawn_once():
    from paper_figures import breakdown, series

    dispatch = _run("dispatch:1", one_shot={"bits_per_node": [200, 200], "downlink_bits_per_node": [70, 90]})
    assert series.downlink_per_node(dispatch, dispatch.rounds[-1]) == 80  # paid before round 1, not 0
    assert breakdown.uplink_parts(dispatch) == {"data": 150, "labels": 50}  # per node, once: not / 10 rounds
    assert breakdown.directions(dispatch) == {"uplink, paid once (one-shot)": 200, "downlink, paid once (one-shot)": 80}
    # Sequential split learning's replies vary by round: the recorded downlink, not the header's per-round value.
    split = _run("split_seq:1", downlink_bits_per_node_per_round=999, downlink_varies_by_round=True,
                 downlink_parts_per_node_per_round={"model": 0, "replies": 999})
    assert series.downlink_per_node(split, split.rounds[-1]) == 600 / 2
    assert breakdown.directions(split) == {"uplink": 20, "learner's replies": 30}


def test_every_ledger_part_and_method_has_a_colour_of_its_own():
    from paper_figures import breakdown, canvas

    parts = [*breakdown.PARTS, "a_new_part"]
    colours = breakdown.part_colours(canvas.pyplot(), parts)
    assert len({colours[p] for p in parts}) == len(parts)
    styles = [canvas.method_style(i, qdata=False) for i in range(27)]
    assert all(s["color"] != "C7" for s in styles)  # grey: the targets' and references' colour
    assert len({(s["color"], s["marker"]) for s in styles}) == len(styles)


def test_a_one_shot_representation_is_not_captioned_as_another_dataset():
    from paper_figures import captions

    sgd = _run("sgd", params=85_002)
    dca = _run("dca:16", dataset="digits, DCA m=16", n=16, params=72_714, one_shot={"bits_per_node": [1, 1]})
    line = captions.setting_caption([sgd, dca])
    assert line.startswith("Dataset digits (real data, n=64, 100 train / 20 test); model mlp (d=85,002) "
                           "(dca:16, one-shot: its mlp (d=72,714) trains on the source of digits, DCA m=16, n=16); "
                           "nodes 2 (iid)")
    assert line.count("real data") == 1
