"""Data sources, partitions over nodes, node stacking and streaming (qdata/data.py)."""

import gzip
import math
import os
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, strategies as st

from qdata import data
from qdata.data import Dataset, DatasetUnavailableError, load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_split(digits):
    from sklearn.datasets import load_digits

    assert digits.x_train.shape == (1797 - data.DIGITS_TEST_SIZE, 8, 8, 1)
    assert digits.x_test.shape == (data.DIGITS_TEST_SIZE, 8, 8, 1)
    # Stored as the source holds it: integer intensities 0..16, value x / 16.
    assert digits.x_train.dtype == np.uint8 and digits.y_train.dtype == np.int32
    assert digits.x_divisor == 16.0
    assert digits.sample_shape == (8, 8, 1) and digits.n == 64
    assert digits.num_classes == 10 and digits.value_range == (0.0, 1.0)
    assert digits.name == "digits" and not digits.synthetic
    both = digits.to_float(np.concatenate([digits.x_train, digits.x_test]))
    assert both.dtype == np.float32 and both.min() == 0.0 and both.max() == 1.0
    # The split is a partition of the 1797 images: same multiset of (image, label) rows.
    raw = load_digits()
    ours = np.concatenate([both.reshape(len(both), -1) * 16, np.concatenate([digits.y_train, digits.y_test])[:, None]], 1)
    ref = np.concatenate([raw.data, raw.target[:, None]], 1)
    np.testing.assert_array_equal(ours[np.lexsort(ours.T)], ref[np.lexsort(ref.T)])
    # Stratified: each class's test share matches its overall share up to rounding.
    overall = np.bincount(raw.target, minlength=10) * data.DIGITS_TEST_SIZE / 1797
    assert np.all(np.abs(np.bincount(digits.y_test, minlength=10) - overall) <= 1)


def test_digits_split_is_fixed_and_max_train_subsets(digits):
    other = load_dataset("digits", seed=5)
    np.testing.assert_array_equal(other.x_test, digits.x_test)
    small = load_dataset("digits", seed=1, max_train=100, max_test=50)
    assert small.x_train.shape == (100, 8, 8, 1) and small.x_test.shape == (50, 8, 8, 1)
    full_rows = {r.tobytes() for r in digits.x_train}
    assert all(r.tobytes() in full_rows for r in small.x_train)
    again = load_dataset("digits", seed=1, max_train=100, max_test=50)
    np.testing.assert_array_equal(again.x_train, small.x_train)


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock(mocked_tfds, name, shape):
    ds = load_dataset(name, max_test=4)
    assert ds.name == name and not ds.synthetic and ds.num_classes == 10
    assert ds.x_train.shape == (9,) + shape and ds.x_test.shape == (4,) + shape
    # 8-bit pixels are kept as read; their values are x / 255, in [0, 1].
    assert ds.x_train.dtype == np.uint8 and ds.x_divisor == 255.0 and ds.y_train.dtype == np.int32
    values = ds.to_float(ds.x_train)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
    assert np.all((ds.y_train >= 0) & (ds.y_train < 10))


def test_tfds_imagenet_mock_needs_and_takes_image_size(mocked_tfds):
    # imagenet2012's images differ in size: without image_size it cannot be stacked, with it every
    # image is resized and centre-cropped to a square, kept as uint8.
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagenet2012", max_test=2)
    ds = load_dataset("imagenet2012", image_size=16, max_test=2)
    assert ds.name == "imagenet2012@16" and ds.num_classes == 1000
    assert ds.x_train.shape == (9, 16, 16, 3) and ds.x_test.shape == (2, 16, 16, 3)
    assert ds.x_train.dtype == np.uint8 and ds.x_divisor == 255.0 and ds.value_range == (0.0, 1.0)


class QdataToyImages(tfds.core.GeneratorBasedBuilder):
    """A tiny image dataset prepared offline in the array_record format, to exercise the real
    read path (prepared-data check, tfds.data_source, batched random access)."""

    VERSION = tfds.core.Version("1.0.0")
    SHAPE = (6, 5, 3)
    SIZES = {"train": 12, "test": 5}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=self.SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=4),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.SIZES}

    def _generate_examples(self, split):
        for i, (image, label) in enumerate(zip(*toy_examples(split))):
            yield i, {"image": image, "label": int(label)}


def toy_examples(split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = QdataToyImages.SIZES[split]
    return rng.integers(0, 256, (n,) + QdataToyImages.SHAPE, dtype=np.uint8), np.arange(n) % 4


def test_tfds_prepared_array_record(tmp_path, monkeypatch):
    QdataToyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: pytest.fail("qdata must never download"))
    ds = load_dataset("qdata_toy_images", data_dir=tmp_path)
    assert ds.num_classes == 4 and ds.sample_shape == QdataToyImages.SHAPE
    for split in ("train", "test"):
        images, labels = toy_examples(split)
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        # tfds shuffles the records on write: compare as multisets of (image, label).
        assert x.dtype == np.uint8
        got = sorted(zip(map(bytes, x), y.tolist()))
        want = sorted(zip(map(bytes, images), labels.tolist()))
        assert got == want
    small = load_dataset("qdata_toy_images", data_dir=str(tmp_path), max_train=5, seed=3)
    assert small.x_train.shape == (5,) + QdataToyImages.SHAPE
    resized = load_dataset("qdata_toy_images", data_dir=tmp_path, image_size=4)
    assert resized.sample_shape == (4, 4, 3) and resized.name == "qdata_toy_images@4"
    assert resized.x_train.dtype == np.uint8 and resized.x_divisor == 255.0


def test_tfds_unavailable_is_fast_and_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: pytest.fail("qdata must never download"))
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    msg = str(info.value)
    for needed in ("'cifar10'", "not prepared", str(tmp_path), "offline", "pip install 'qdata[prepare]'",
                   "download_and_prepare", "tfds build cifar10", "'digits'", "idx:PATH", "synthetic:"):
        assert needed in msg, needed
    assert isinstance(info.value, ValueError)
    assert os.listdir(tmp_path) == []  # nothing was fetched or written


def test_tfds_unknown_name_version_or_config(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="no_such_dataset_q.*digits.*idx:PATH.*synthetic"):
        load_dataset("no_such_dataset_q")
    for spec in ("mnist:9.9.9", "cifar10/no_such_config"):
        with pytest.raises(DatasetUnavailableError, match=spec):
            load_dataset(spec, data_dir=tmp_path)


@pytest.mark.parametrize("spec", ["", "   ", "two words", "idx:", "synthetic:abc:3", "synthetic:4x4:1",
                                  "synthetic:0x4:3", "synthetic:8", "cifar10!"])
def test_malformed_spec(spec):
    with pytest.raises(ValueError) as info:
        load_dataset(spec)
    assert not isinstance(info.value, DatasetUnavailableError)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"max_train": 0}, {"max_test": 1.5}, {"image_size": 32}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        load_dataset("digits", **kwargs)


@pytest.mark.parametrize("image_size", [0, -3, 2.5, True, "32"])
def test_image_size_must_be_a_positive_int(image_size):
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        data.check_image_size(image_size, "imagenet2012")
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_dataset("imagenet2012", image_size=image_size)


@pytest.mark.parametrize("spec", ["digits", " digits", "idx:/tmp/x", "synthetic:8x8x1:3"])
def test_image_size_only_for_tfds_sources(spec):
    with pytest.raises(ValueError, match=r"image_size applies to tensorflow-datasets sources only.*'imagenet2012'"):
        data.check_image_size(32, spec)
    assert data.check_image_size(None, spec) is None
    assert data.check_image_size(np.int64(224), "imagenet2012") == 224


def test_non_string_spec():
    with pytest.raises(ValueError, match="spec"):
        load_dataset(3)


# ----------------------------------------------------------------------------------------------
# IDX files


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    payload = header + big.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def make_idx_dir(tmp_path, gz, rng):
    arrays = {
        "x_train": rng.integers(0, 256, (7, 5, 4), dtype=np.uint8),
        "y_train": rng.integers(0, 3, 7).astype(np.uint8),
        "x_test": rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
        "y_test": np.array([0, 1, 2], np.uint8),
    }
    for key, stem in data.IDX_FILES.items():
        write_idx(tmp_path / (stem + (".gz" if gz else "")), arrays[key], 0x08)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz, np.random.default_rng(0))
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.name == f"idx:{tmp_path.name}" and ds.sample_shape == (5, 4, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    assert ds.x_train.dtype == np.uint8 and ds.x_divisor == 255.0
    np.testing.assert_array_equal(ds.to_float(ds.x_test)[..., 0], arrays["x_test"].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    assert ds.num_classes == 3 and ds.value_range == (0.0, 1.0)


def test_idx_int16_images_become_float32_as_before(tmp_path):
    arrays = make_idx_dir(tmp_path, False, np.random.default_rng(0))
    for key in ("x_train", "x_test"):
        write_idx(tmp_path / data.IDX_FILES[key], arrays[key].astype(np.int16), 0x0B)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.x_train.dtype == np.float32 and ds.x_divisor == 1.0
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"].astype(np.float32) / 255)


def test_idx_wider_dtypes_roundtrip(tmp_path):
    for code, dtype in [(0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)]:
        a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
        write_idx(tmp_path / "f", a, code)
        got = data.read_idx(tmp_path / "f")
        assert got.dtype == np.dtype(dtype) and got.shape == a.shape
        np.testing.assert_array_equal(got, a)


def test_idx_missing_files(tmp_path):
    make_idx_dir(tmp_path, False, np.random.default_rng(0))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ValueError) as info:
        load_dataset(f"idx:{tmp_path}")
    msg = str(info.value)
    assert str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg
    assert all(stem in msg for stem in data.IDX_FILES.values())


def test_idx_corrupt(tmp_path):
    make_idx_dir(tmp_path, False, np.random.default_rng(0))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x08\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_dataset(f"idx:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((7, 5, 4), np.uint8), 0x08)
    with open(tmp_path / "train-images-idx3-ubyte", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="header promises"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_nan_is_rejected(tmp_path):
    make_idx_dir(tmp_path, False, np.random.default_rng(0))
    x = np.random.default_rng(1).random((7, 5, 4)).astype(np.float32)
    x[2, 1, 1] = np.nan
    write_idx(tmp_path / "train-images-idx3-ubyte", x, 0x0D)
    with pytest.raises(ValueError, match=f"idx:{tmp_path.name}.*NaN"):
        load_dataset(f"idx:{tmp_path}")


# ----------------------------------------------------------------------------------------------
# fashion_mnist: tensorflow-datasets where prepared, else the installed IDX files


@pytest.fixture
def no_download(monkeypatch):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: pytest.fail("qdata must never download"))


def installed_at(monkeypatch, *dirs):
    """Look for the installed Fashion-MNIST IDX files in ``dirs`` only, the variable unset."""
    entry = data.INSTALLED_IDX["fashion_mnist"]
    monkeypatch.delenv(entry.env, raising=False)
    monkeypatch.setitem(data.INSTALLED_IDX, "fashion_mnist", entry._replace(dirs=tuple(map(str, dirs))))


def test_fashion_mnist_reads_the_idx_files_named_by_the_environment(tmp_path, monkeypatch, no_download):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    arrays = make_idx_dir(idx_dir, True, np.random.default_rng(0))
    monkeypatch.setenv("QDATA_FASHION_MNIST_DIR", str(idx_dir))
    ds = load_dataset("fashion_mnist", data_dir=tmp_path / "tfds")  # nothing prepared there
    assert ds.name == f"fashion_mnist (IDX files from {idx_dir})" and ds.source == f"IDX files in {idx_dir}"
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.x_train.dtype == np.uint8 and ds.x_divisor == 255.0 and ds.num_classes == 3
    # Subsets are the ones 'idx:PATH' draws with the same seed; image_size resizes as for tfds.
    small = load_dataset("fashion_mnist", data_dir=tmp_path / "tfds", max_train=4, max_test=2, seed=1)
    same = load_dataset(f"idx:{idx_dir}", max_train=4, max_test=2, seed=1)
    np.testing.assert_array_equal(small.x_train, same.x_train)
    np.testing.assert_array_equal(small.y_test, same.y_test)
    resized = load_dataset("fashion_mnist", data_dir=tmp_path / "tfds", image_size=3)
    assert resized.sample_shape == (3, 3, 1) and resized.name.startswith("fashion_mnist@3 (IDX files from ")
    assert not (tmp_path / "tfds").exists()


def test_fashion_mnist_looks_in_the_package_directories(tmp_path, monkeypatch, no_download):
    make_idx_dir(tmp_path, False, np.random.default_rng(1))
    installed_at(monkeypatch, tmp_path / "absent", tmp_path)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path / "tfds")
    assert ds.name == f"fashion_mnist (IDX files from {tmp_path})" and ds.num_train == 7


def test_fashion_mnist_prefers_prepared_tfds(mocked_tfds, tmp_path, monkeypatch):
    make_idx_dir(tmp_path, False, np.random.default_rng(2))
    monkeypatch.setenv("QDATA_FASHION_MNIST_DIR", str(tmp_path))
    ds = load_dataset("fashion_mnist", max_test=4)
    assert ds.name == "fashion_mnist" and ds.source.startswith("tensorflow-datasets, prepared in ")
    assert ds.x_train.shape == (9, 28, 28, 1) and ds.num_classes == 10


def test_fashion_mnist_missing_everywhere_says_how_to_get_it(tmp_path, monkeypatch, no_download):
    installed_at(monkeypatch, tmp_path / "absent")
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path / "tfds")
    assert time.monotonic() - start < 5.0
    msg = str(info.value)
    for needed in ("'fashion_mnist'", "apt-get install -y dataset-fashion-mnist", "QDATA_FASHION_MNIST_DIR=DIR",
                   str(tmp_path / "absent"), "train-images-idx3-ubyte", "not prepared", "tfds build fashion_mnist",
                   "download_and_prepare"):
        assert needed in msg, needed


def test_fashion_mnist_variable_naming_an_incomplete_directory(tmp_path, monkeypatch, no_download):
    make_idx_dir(tmp_path, False, np.random.default_rng(3))
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    installed_at(monkeypatch)
    monkeypatch.setenv("QDATA_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match=r"QDATA_FASHION_MNIST_DIR.*lacks t10k-images-idx3-ubyte"):
        load_dataset("fashion_mnist", data_dir=tmp_path / "tfds")


# ----------------------------------------------------------------------------------------------
# synthetic


@pytest.mark.parametrize("spec,shape,classes", [("synthetic:6x5x3:7", (6, 5, 3), 7), ("synthetic:12:3", (12,), 3)])
def test_synthetic_shapes_and_label(spec, shape, classes):
    ds = load_dataset(spec, seed=2, max_train=50, max_test=20)
    assert ds.synthetic and "synthetic" in ds.name
    assert ds.x_train.shape == (50,) + shape and ds.x_test.shape == (20,) + shape
    assert ds.num_classes == classes and ds.x_train.dtype == np.float32 and ds.x_divisor == 1.0
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    again = load_dataset(spec, seed=2, max_train=50, max_test=20)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    assert not np.array_equal(load_dataset(spec, seed=3, max_train=50, max_test=20).x_train, ds.x_train)


def test_synthetic_defaults_and_learnable():
    ds = load_dataset("synthetic:64:5", seed=0)
    assert (ds.num_train, ds.num_test) == data.SYNTHETIC_DEFAULT_SIZES
    # Nearest class mean (means estimated on train) on test. With class means SEPARATION noise
    # standard deviations apart, the pairwise Bayes error is Phi(-SEPARATION/2) and the union bound
    # over the other C-1 classes caps the expected error at (C-1) Phi(-SEPARATION/2); allow twice
    # that for the error of the estimated means, then 5 binomial standard errors of the test count.
    phi = 0.5 * math.erfc(data.SYNTHETIC_SEPARATION / 2 / math.sqrt(2))
    bound = 2 * (ds.num_classes - 1) * phi
    bound += 5 * math.sqrt(bound * (1 - bound) / ds.num_test)
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(ds.num_classes)])
    dist = ((ds.x_test[:, None, :] - means[None]) ** 2).sum(-1)
    error = np.mean(dist.argmin(1) != ds.y_test)
    assert error <= bound < 1 - 1 / ds.num_classes


# ----------------------------------------------------------------------------------------------
# Partitions


def assert_exact_cover(parts, total, num_nodes):
    assert len(parts) == num_nodes
    assert all(p.size >= 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(total))


def label_shares(parts, labels, num_classes):
    return np.stack([np.bincount(labels[p], minlength=num_classes) / p.size for p in parts])


def test_iid_balanced_and_representative(digits):
    y = digits.y_train
    parts = data.partition_iid(y, 10, seed=0)
    assert_exact_cover(parts, y.size, 10)
    sizes = np.array([p.size for p in parts])
    assert sizes.max() - sizes.min() <= 1
    # Each node's class count is hypergeometric, variance below the binomial s p (1 - p): within 5 sd.
    p = np.bincount(y, minlength=10) / y.size
    for part in parts:
        counts = np.bincount(y[part], minlength=10)
        sd = np.sqrt(part.size * p * (1 - p))
        assert np.all(np.abs(counts - part.size * p) <= 5 * sd)


def test_dirichlet_skew(digits):
    y = digits.y_train
    skewed = data.partition_dirichlet(y, 10, alpha=0.1, seed=0)
    flat = data.partition_dirichlet(y, 10, alpha=100.0, seed=0)
    for parts in (skewed, flat):
        assert_exact_cover(parts, y.size, 10)
    # With alpha=0.1 each class lands mostly on one or two nodes, so a node is dominated by few
    # classes; with alpha=100 every node is close to the global mix (max share near 1/10).
    max_share_skewed = label_shares(skewed, y, 10).max(1).mean()
    max_share_flat = label_shares(flat, y, 10).max(1).mean()
    assert max_share_skewed > 2 * max_share_flat
    assert max_share_flat < 2 / 10


@given(num_nodes=st.integers(1, 60), alpha=st.floats(1e-3, 10.0), seed=st.integers(0, 2**31 - 1),
       total=st.integers(60, 200))
def test_dirichlet_covers_every_node(num_nodes, alpha, seed, total):
    labels = np.random.default_rng(seed).integers(0, 4, total)
    parts = data.partition_dirichlet(labels, num_nodes, alpha, seed)
    assert_exact_cover(parts, total, num_nodes)


def within_node_spread(x, parts):
    flat = x.reshape(x.shape[0], -1)
    return np.mean([((flat[p] - flat[p].mean(0)) ** 2).sum(1).mean() for p in parts])


def test_similarity_groups_similar_points(digits):
    x, y = digits.to_float(digits.x_train), digits.y_train
    sim = data.partition_similarity(x, 10, seed=0)
    iid = data.partition_iid(y, 10, seed=0)
    assert_exact_cover(sim, y.size, 10)
    sizes = np.array([p.size for p in sim])
    assert sizes.max() - sizes.min() <= 1
    # Clustering must cut the mean squared distance to the node centroid well below the iid value
    # (which is the total variance); k-means on 10 digit classes removes the between-class part.
    assert within_node_spread(x, sim) < 0.85 * within_node_spread(x, iid)
    unbalanced = data.partition_similarity(x, 10, seed=0, balanced=False)
    assert_exact_cover(unbalanced, y.size, 10)
    assert within_node_spread(x, unbalanced) < 0.85 * within_node_spread(x, iid)


def test_balanced_assignment_prefers_near_centroids():
    # Two tight groups of 4 points near two centroids: the balanced assignment keeps them apart.
    pts = np.concatenate([np.zeros((4, 2)), np.ones((4, 2)) * 10]) + np.arange(8)[:, None] * 0.01
    centers = np.array([[0.0, 0.0], [10.0, 10.0]])
    dist = np.sqrt(((pts[:, None] - centers[None]) ** 2).sum(-1))
    held = data.balanced_assignment(dist)  # (points, centroids) membership, one centroid each at p = 1
    np.testing.assert_array_equal(held.sum(axis=1), 1)
    np.testing.assert_array_equal(held.argmax(axis=1), [0] * 4 + [1] * 4)


def test_partition_dispatch(digits):
    for spec in ("iid", "dirichlet:0.3", "similarity", "similarity:unbalanced"):
        assert_exact_cover(data.partition(spec, digits, 7, seed=1), digits.num_train, 7)
    np.testing.assert_array_equal(data.partition("dirichlet:0.3", digits, 7, 1)[3],
                                  data.partition_dirichlet(digits.y_train, 7, 0.3, 1)[3])
    for bad in ("dirichlet:x", "dirichlet:-1", "kmeans", 3):
        with pytest.raises(ValueError):
            data.partition(bad, digits, 7, seed=1)


@pytest.mark.parametrize("num_nodes", [0, 2000, 2.5])
def test_partition_bad_num_nodes(digits, num_nodes):
    with pytest.raises(ValueError, match="num_nodes"):
        data.partition_iid(digits.y_train, num_nodes, seed=0)


# ----------------------------------------------------------------------------------------------
# Stacking and sampling


def test_stack_nodes_padding():
    parts = [np.array([4, 2, 9]), np.array([7]), np.array([0, 1])]
    index, counts = data.stack_nodes(parts)
    assert index.dtype == np.int32 and counts.dtype == np.int32
    np.testing.assert_array_equal(counts, [3, 1, 2])
    np.testing.assert_array_equal(index, [[4, 2, 9], [7, 7, 7], [0, 1, 0]])
    with pytest.raises(ValueError, match="node 1"):
        data.stack_nodes([np.array([1]), np.array([], np.int64)])


def test_sample_node_batches_stays_in_node_and_available_prefix():
    parts = data.partition_iid(np.zeros(50, np.int64), 4, seed=0)
    nodes = data.stack_nodes(parts)
    sample = jax.jit(data.sample_node_batches, static_argnums=3)
    rows = np.asarray(sample(jax.random.PRNGKey(0), nodes.index, nodes.counts, 64))
    assert rows.shape == (4, 64)
    for i, part in enumerate(parts):
        assert set(rows[i]) <= set(part.tolist())
    avail = jnp.array([1, 2, 3, 4], jnp.int32)
    rows = np.asarray(sample(jax.random.PRNGKey(1), nodes.index, avail, 64))
    for i, part in enumerate(parts):
        assert set(rows[i]) <= set(part[: int(avail[i])].tolist())
    # With 64 draws from 4 rows, a row is missed with probability 4 (3/4)^64 ~ 1e-8.
    assert set(rows[3]) == set(parts[3][:4].tolist())


# ----------------------------------------------------------------------------------------------
# Streaming


def test_streaming_counts():
    counts = np.array([10, 1, 37], np.int32)
    table = data.streaming_counts(counts, rounds=6, start_fraction=0.2)
    assert table.shape == (6, 3) and table.dtype == np.int32
    np.testing.assert_array_equal(table[0], np.maximum(1, np.ceil(0.2 * counts)))
    np.testing.assert_array_equal(table[-1], counts)
    assert np.all(np.diff(table, axis=0) >= 0) and np.all(table >= 1) and np.all(table <= counts)
    early = data.streaming_counts(counts, rounds=6, start_fraction=0.2, arrival_rounds=2)
    np.testing.assert_array_equal(early[2:], np.broadcast_to(counts, (4, 3)))
    np.testing.assert_array_equal(data.streaming_counts(counts, 3, start_fraction=1.0), np.broadcast_to(counts, (3, 3)))


def test_available_counts_traced_round():
    counts = jnp.array([10, 40], jnp.int32)
    f = jax.jit(lambda t: data.available_counts(counts, t, start_fraction=0.5, arrival_rounds=4))
    np.testing.assert_array_equal(f(jnp.int32(2)), [8, 30])
    with pytest.raises(ValueError, match="start_fraction"):
        data.available_counts(counts, 0, start_fraction=0.0, arrival_rounds=4)
    with pytest.raises(ValueError, match="arrival_rounds"):
        data.available_counts(counts, 0, start_fraction=0.5, arrival_rounds=0)


def test_dataset_validates():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="num_classes|labels"):
        Dataset(x, np.array([0, 1, 5], np.int32), x, np.zeros(3, np.int32), 3, "bad")
    with pytest.raises(ValueError, match="float32"):
        Dataset(x.astype(np.float64), np.zeros(3, np.int32), x, np.zeros(3, np.int32), 3, "bad")


# ----------------------------------------------------------------------------------------------
# Stored dtype and float values


def as_bits(a):
    return np.asarray(a).view(np.uint32)


@pytest.mark.parametrize("divisor", [255.0, 16.0, 3.0])
def test_to_float_is_bit_identical_to_the_float32_division(divisor):
    levels = np.arange(256, dtype=np.uint8)
    old = levels.astype(np.float32) / np.float32(divisor)  # what the loaders stored before
    got = {
        "numpy": data.to_float(levels, divisor),
        "jax": data.to_float(jnp.asarray(levels), divisor),
        "jit": jax.jit(lambda x: data.to_float(x, divisor))(levels),
        "vmap": jax.vmap(lambda x: data.to_float(x, divisor))(levels.reshape(16, 16)).reshape(-1),
    }
    assert isinstance(got["numpy"], np.ndarray)
    for how, values in got.items():
        assert values.dtype == np.float32, how
        np.testing.assert_array_equal(as_bits(values), as_bits(old), err_msg=how)
    # Why a table and not arithmetic: a multiplication by the reciprocal (what XLA makes of a
    # division by a constant) is one ulp off at some levels.
    if divisor == 255.0:
        assert np.any(levels.astype(np.float32) * np.float32(1 / divisor) != old)


def test_dataset_to_float_matches_the_old_loaders(digits, tmp_path):
    from sklearn.datasets import load_digits

    images = load_digits().images
    old = np.sort((images.astype(np.float32) / 16.0).reshape(len(images), -1), axis=0)
    both = np.concatenate([digits.to_float(digits.x_train), digits.to_float(digits.x_test)])
    np.testing.assert_array_equal(np.sort(both.reshape(len(both), -1), axis=0), old)
    arrays = make_idx_dir(tmp_path, False, np.random.default_rng(4))
    ds = load_dataset(f"idx:{tmp_path}")
    np.testing.assert_array_equal(as_bits(ds.to_float(ds.x_train)[..., 0]),
                                  as_bits(arrays["x_train"].astype(np.float32) / 255.0))


def test_to_float_passes_float32_through_and_rejects_other_dtypes():
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    assert data.to_float(x, 255.0) is x  # already values: converting twice is harmless
    y = jnp.asarray(x)
    assert data.to_float(y) is y
    for bad in (np.zeros(3, np.int32), np.zeros(3, np.float64), jnp.zeros(3, jnp.bfloat16)):
        with pytest.raises(ValueError, match="uint8 or float32"):
            data.to_float(bad, 255.0)


def test_dataset_rejects_bad_storage():
    y = np.zeros(4, np.int32)
    ok_u8 = np.zeros((4, 2), np.uint8)
    ok_f32 = np.zeros((4, 2), np.float32)
    make = lambda x_train, x_test, **kw: Dataset(x_train, y, x_test, y, num_classes=2, name="t", **kw)
    assert make(ok_u8, ok_u8, x_divisor=255.0).x_divisor == 255.0
    with pytest.raises(ValueError, match="uint8 .* or both float32, got float64"):
        make(ok_u8.astype(np.float64), ok_u8.astype(np.float64))
    with pytest.raises(ValueError, match="both be uint8 .*got uint8 and float32"):
        make(ok_u8, ok_f32, x_divisor=255.0)
    for divisor in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite x_divisor > 0"):
            make(ok_u8, ok_u8, x_divisor=divisor)
    with pytest.raises(ValueError, match="need x_divisor=1"):
        make(ok_f32, ok_f32, x_divisor=255.0)
    with pytest.raises(ValueError, match="x_divisor must be a number"):
        make(ok_u8, ok_u8, x_divisor="255")
