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
