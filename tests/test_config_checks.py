"""Every input checked before work (issue 12, item 1): the cases a careful but clumsy user found,
through the library, a TOML file and the command line. Each must be refused with the field (or flag,
or file) and its allowed values named; the CLI exits 2 with one line and no traceback."""

import pytest

from qdata import cli
from qdata.config import RunConfig, make_compressor, parse_compressor_spec


@pytest.mark.parametrize("kwargs, named", [
    (dict(eval_every=2.5), "eval_every must be an integer"),
    (dict(rounds=20.5), "rounds must be an integer"),
    (dict(cache="no"), "cache must be true or false"),
    (dict(method="gradient", error_feedback="no"), "error_feedback must be true or false"),
    (dict(lr="fast"), "lr must be a finite number > 0"),
    (dict(lr=float("inf")), "lr must be a finite number > 0"),
    (dict(momentum=float("nan")), r"momentum must be a number in \[0, 1\)"),
    (dict(momentum=-1), r"momentum must be a number in \[0, 1\)"),
    (dict(momentum=1.0), r"momentum must be a number in \[0, 1\)"),
    (dict(bits=True), "bits must be an integer in 1..16"),
    (dict(seed=-1), "seed must be an integer in 0.."),
    (dict(method="gradient", compressor="topk:0"), "compressor: spec 'topk:0': K must be an integer >= 1"),
    (dict(method="gradient", compressor="randk:-5"), "compressor: spec 'randk:-5': K must be"),
    (dict(method="gradient", compressor="topk:1.5"), "K must be an integer >= 1 or a fraction"),
    (dict(method="gradient", compressor="ef:ef:topk:10"), "error feedback wraps a compressor once"),
    (dict(method="gradient", compressor="ef:topk:10", error_feedback=True), "already has error feedback"),
    (dict(method="gradient", compressor="fp32:3"), "spec 'fp32:3' must be written 'fp32'"),
    (dict(method="gradient", compressor="qsgd:0"), "the levels S must be an integer"),
    (dict(correction="topk"), "spec 'topk' must be written 'topk:K'"),
    (dict(method="qdata", compressor="topk:10"), "compressor='topk:10' is used only with method='gradient'"),
    (dict(method="sgd", bits=8), "bits=8 is used only with method='qdata'"),
    (dict(method="gradient", cache=True), "cache=True is used only with method='qdata'"),
    (dict(optimizer="adam", momentum=0.5), "momentum=0.5 is used only with optimizer='sgd'"),
    (dict(stream_rounds=10), "stream_rounds=10 is used only with stream_start < 1"),
    (dict(score="grad_norm"), "score='grad_norm' is used only with a gate"),
    (dict(partition="dirichlet:-1"), "partition must be one of iid, dirichlet:ALPHA"),
    (dict(model="mlp:0"), "model: model 'mlp:0'"),
    (dict(model="vgg"), "unknown model 'vgg'"),
    (dict(name="a/b"), "name must be a non-empty string without '/'"),
    (dict(checkpoint_every=15, eval_every=10), "must be a multiple of eval_every"),
    (dict(num_nodes=2**40), "num_nodes must be an integer in 1..2147483647"),
])
def test_a_bad_field_is_refused_with_its_name_and_allowed_values(kwargs, named):
    with pytest.raises(ValueError, match=named) as err:
        RunConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_good_configs_still_pass_and_are_normalised():
    import numpy as np

    config = RunConfig(rho=1, lr=np.float32(0.5), num_nodes=np.int64(4), method="qdata", gate="bernoulli",
                       score="grad_norm")
    assert type(config.rho) is float and type(config.lr) is float and type(config.num_nodes) is int
    RunConfig(method="gradient", compressor="ef:topk:0.01")
    RunConfig(method="gradient", compressor="qsgd:4:512", error_feedback=False)
    RunConfig(optimizer="adam")  # momentum at its default is not "set"
    assert RunConfig.from_dict(config.to_dict()) == config


def test_compressor_specs_parse_and_K_is_checked_against_d():
    assert parse_compressor_spec("ef:topk:0.01") == ("topk", (("fraction", 0.01),), True)
    assert parse_compressor_spec("qsgd") == ("qsgd", (4, None), False)
    make_compressor("topk:1000", d=1000)
    with pytest.raises(ValueError, match="keeps K=1001 coordinates of a model of d=1000"):
        make_compressor("randk:1001", d=1000)
    assert make_compressor("topk:0.00001", d=1000) is not None  # a fraction rounds up to at least 1


@pytest.mark.parametrize("text, named", [
    ("eval_every = 2.5\n", "eval_every must be an integer"),
    ('cache = "no"\n', "cache must be true or false"),
    ("rounds = 20.5\n", "rounds must be an integer"),
    ('lr = "fast"\n', "lr must be a finite number"),
    ("bitz = 3\n", r"unknown config key\(s\) \['bitz'\]"),
    ("lr = \n", "is not valid TOML"),
    ("[base]\nlr = 0.1\n", "looks like a lineup file"),
])
def test_toml_errors_name_the_file(tmp_path, text, named):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=named) as err:
        RunConfig.from_toml(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config file .*nope.toml' not found"):
        RunConfig.from_toml(tmp_path / "nope.toml")


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        code = cli.main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, named", [
    (["--rounds", "20.5"], "argument --rounds: invalid int value: '20.5'"),
    (["--lr", "inf"], "--lr inf: lr must be a finite number > 0"),
    (["--momentum", "nan"], "--momentum nan: momentum must be"),
    (["--momentum", "-1"], "--momentum -1.0: momentum must be"),
    (["--compressor", "topk:0", "--method", "gradient"], "K must be an integer >= 1"),
    (["--compressor", "topk:10"], "compressor='topk:10' is used only with method='gradient'"),
    (["--method", "foo"], "argument --method: invalid choice: 'foo'"),
    (["--cache=no"], "argument --cache/--no-cache"),
    (["--num-processes", "2", "--coordinator", "notahost.invalid:1234"], "host 'notahost.invalid' does not resolve"),
    (["--num-processes", "2", "--coordinator", "notahost"], "--coordinator must be HOST:PORT"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--coordinator", "127.0.0.1:1"], "--coordinator needs --num-processes > 1"),
    (["--num-processes", "2", "--init-timeout", "0"], "--init-timeout must be in"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
])
def test_cli_bad_flags_exit_2_with_one_line(tmp_path, capsys, argv, named):
    line = _cli_error(capsys, ["train", *argv, "--out", str(tmp_path / "run"), "--no-progress"])
    assert named in line
    assert not (tmp_path / "run").exists()  # refused before any work


def test_cli_bad_files_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('lr = "fast"\n')
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--config", str(tmp_path / "missing.toml")], "missing.toml' not found"),
        (["--config", str(tmp_path / "bad.toml")], f"--config {tmp_path / 'bad.toml'}: lr must be a finite number"),
        (["--out", str(tmp_path / "a_file" / "run")], "cannot be created"),
        (["--out", str(tmp_path / "a_file")], "exists and is not a directory"),
        (["--dataset", "idx:" + str(tmp_path / "no_such_dir")], "no_such_dir"),
    ]
    for argv, named in cases:
        line = _cli_error(capsys, ["train", *argv, "--no-progress"] + (["--out", str(tmp_path / "r")]
                                                                       if "--out" not in argv else []))
        assert named in line, line


def test_cli_batch_larger_than_a_shard_is_refused_before_compiling(tmp_path, capsys):
    line = _cli_error(capsys, ["train", "--batch-size", "100000", "--num-nodes", "8", "--out", str(tmp_path / "r"),
                               "--no-progress"])
    assert "batch_size=100000 is larger than the smallest node's shard (179 samples" in line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_compare_flag_errors_are_one_line(tmp_path, capsys):
    line = _cli_error(capsys, ["compare", "--resume", "--no-progress"])
    assert "--resume needs --out" in line
    line = _cli_error(capsys, ["compare", "--num-processes", "2", "--no-progress"])
    assert "--num-processes 2 needs --out, the one directory of the comparison that every process is given" in line
    line = _cli_error(capsys, ["compare", "--bits", "3", "--out", str(tmp_path / "c"), "--no-progress"])
    assert "--bits" in line
