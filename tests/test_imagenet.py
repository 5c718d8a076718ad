"""ImageNet reachable from a config: ``image_size`` in RunConfig, TOML and the CLI, through to the
data, with tensorflow-datasets' mock data standing in for imagenet2012 (issue 8, item 5)."""

import json

import pytest

from qdata import cli
from qdata.config import RunConfig


def test_config_takes_image_size_for_tfds_sources(tmp_path):
    assert RunConfig().image_size is None
    assert RunConfig(dataset="imagenet2012", image_size=64).image_size == 64
    (tmp_path / "run.toml").write_text('dataset = "imagenet2012"\nimage_size = 32\nmodel = "resnet18_imagenet"\n')
    config = RunConfig.from_toml(tmp_path / "run.toml")
    assert (config.dataset, config.image_size, config.model) == ("imagenet2012", 32, "resnet18_imagenet")
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("image_size", [0, -1, 2.5, True, "32"])
def test_config_rejects_a_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size must be a positive integer .* or None"):
        RunConfig(dataset="imagenet2012", image_size=image_size)


@pytest.mark.parametrize("dataset", ["digits", "idx:/data/mnist", "synthetic:32x32x3:10"])
def test_config_rejects_image_size_for_local_sources(dataset):
    with pytest.raises(ValueError, match=rf"image_size applies to tensorflow-datasets sources only.*{dataset!r}"):
        RunConfig(dataset=dataset, image_size=32)


def test_cli_image_size_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--image-size", "32", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "image_size applies to tensorflow-datasets sources only" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "imagenet2012", "--image-size", "0", "--out", str(tmp_path / "b"),
                     "--no-progress"]) == 2
    assert "image_size must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work


def test_cli_trains_on_mock_imagenet_at_a_given_image_size(mocked_tfds, tmp_path, capsys):
    """``qdata train --dataset imagenet2012 --image-size 16`` gets past the image-size check and
    runs: the data is read, resized to 16x16, and two rounds of SGD train a model on it."""
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", "imagenet2012", "--image-size", "16", "--model", "logreg",
                     "--method", "sgd", "--num-nodes", "2", "--batch-size", "4", "--rounds", "2",
                     "--eval-every", "2", "--checkpoint-every", "0", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    header, *rounds = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert header["config"]["image_size"] == 16
    assert header["dataset"]["name"] == "imagenet2012@16"
    assert header["dataset"]["sample_shape"] == [16, 16, 3] and header["dataset"]["num_classes"] == 1000
    assert header["model"]["params"] == 16 * 16 * 3 * 1000 + 1000
    assert rounds[-1]["round"] == 2 and 0.0 <= rounds[-1]["test_accuracy"] <= 1.0
