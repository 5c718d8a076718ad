"""Where the data comes from and how it is spread over the nodes (DESIGN.md section 5).

Four sources, one result type (:class:`Dataset`), all offline unless the data was prepared beforehand:

* ``"digits"``: scikit-learn's handwritten digits (1797 images, 8x8x1), embedded, the default;
* a tensorflow-datasets name (``"cifar10"``, ``"mnist"``, ``"fashion_mnist"``, ``"imagenet2012"``, ...)
  read with random access through ``tfds.data_source`` from a directory where it was *already
  prepared* (in the ``array_record`` format); qdata never downloads, so a machine without the data
  gets a :class:`DatasetUnavailableError` at once, never a hang;
* ``"idx:PATH"``: MNIST-format IDX files in a local directory (MNIST, Fashion-MNIST, KMNIST);
* ``"fashion_mnist"``: tensorflow-datasets where it is prepared, otherwise the IDX files of the
  Debian/Ubuntu package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, or the
  directory in ``$QDATA_FASHION_MNIST_DIR``); :attr:`Dataset.source` and the name say which
  (:data:`INSTALLED_IDX`);
* ``"synthetic:HxWxC:CLASSES"`` / ``"synthetic:N_DIM:CLASSES"``: seeded, learnable data of any shape for
  throughput and scale runs, flagged ``synthetic=True`` so every report can say so.

Then the training set is partitioned over N nodes (:func:`partition`: iid, Dirichlet label skew, or
similarity-based dispatch), stacked into a padded index matrix for jit (:func:`stack_nodes`), and
optionally made to arrive over time (:func:`available_counts`, :func:`streaming_counts`).

Conventions: samples on the leading axis; ``y`` int32. ``x`` is kept as its source stores it, so a
dataset takes no more memory on the host or on a device than its files: 8-bit images (IDX files,
tensorflow-datasets images, digits' 0..16 intensities) stay uint8, other data is float32. The value a
model sees is ``x / x_divisor`` in float32 (:meth:`Dataset.to_float`, jit-able; image pixels in
[0, 1]), converted where the samples are used: the engine converts each node's minibatch, the
evaluation the test samples. Each node's index list is in a random order, which is also the order its
samples arrive in when streaming.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import re
import zlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdata.checks import check_finite

__all__ = [
    "Dataset", "DatasetUnavailableError", "load_dataset", "LOCAL_SOURCES", "INSTALLED_IDX", "InstalledIdx", "to_float", "check_image_size",
    "partition_iid", "partition_dirichlet", "partition_similarity", "similarity_clusters", "Clusters",
    "nearest_centres", "partition", "PARTITIONS",
    "NodeData", "stack_nodes", "sample_node_batches", "available_counts", "streaming_counts",
]

LOCAL_SOURCES = (
    "'digits' (scikit-learn's 8x8 handwritten digits, embedded, always available)",
    "'idx:PATH' (MNIST-format IDX files in a local directory: MNIST, Fashion-MNIST, KMNIST)",
    "'synthetic:HxWxC:CLASSES' or 'synthetic:N_DIM:CLASSES' (seeded synthetic data, e.g. 'synthetic:32x32x3:10')",
    "'fashion_mnist' where the Debian/Ubuntu package dataset-fashion-mnist is installed "
    "(apt-get install -y dataset-fashion-mnist: IDX files in /usr/share/datasets/fashion-mnist)",
)
_ACCEPTED_FORMS = (
    "'digits', a tensorflow-datasets name prepared locally (e.g. 'cifar10', 'mnist', 'fashion_mnist', "
    "'imagenet2012'), 'idx:PATH', 'synthetic:HxWxC:CLASSES' or 'synthetic:N_DIM:CLASSES'"
)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
DIGITS_TEST_SIZE = 360
DIGITS_LEVELS = 16.0  # digits' intensities run from 0 to 16
# The digits split never depends on the run's seed, so test accuracies are comparable across seeds.
_DIGITS_SPLIT_SEED = 0
SYNTHETIC_DEFAULT_SIZES = (10_000, 2_000)


class DatasetUnavailableError(ValueError):
    """A named dataset cannot be read on this machine (not prepared locally, or unknown)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in host memory, in the dtype of its source.

    Attributes:
      x_train, x_test: arrays of shape (N, *sample_shape), uint8 (8-bit images, stored as read) or
        float32. The value of a sample is ``x / x_divisor`` (:meth:`to_float`); images in [0, 1].
      y_train, y_test: int32 labels in [0, num_classes).
      num_classes: C; labels travel in ceil(log2 C) bits.
      name: what reports call it (contains "synthetic" for synthetic data).
      synthetic: True when the data is generated, not measured.
      value_range: (lo, hi), the dataset-wide range of the float values ``to_float(x)`` known to both
        sides of a link (the data quantizer's default range); (0, 1) for images.
      x_divisor: what the stored integers are divided by to give the float values: 255 for 8-bit
        images, 16 for digits; 1 for float32 data, which is stored as its values.
      source: where the samples were read from, in words (e.g. "IDX files in
        /usr/share/datasets/fashion-mnist", "tensorflow-datasets, prepared in DIR"); "" if not said.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    synthetic: bool = False
    value_range: tuple[float, float] = (0.0, 1.0)
    x_divisor: float = 1.0
    source: str = ""

    def __post_init__(self):
        _check_storage(self.name, self.x_train.dtype, self.x_test.dtype, self.x_divisor)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if y.dtype != np.int32:
                raise ValueError(f"dataset {self.name!r}: y_{split} must be int32, got {y.dtype}")
            if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
                raise ValueError(f"dataset {self.name!r}: x_{split} of shape {x.shape} and y_{split} of shape "
                                 f"{y.shape} must hold the same number of samples on the leading axis")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"dataset {self.name!r}: y_{split} must lie in [0, {self.num_classes}), "
                                 f"got labels in [{y.min()}, {y.max()}]")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"dataset {self.name!r}: train samples of shape {self.x_train.shape[1:]} but test "
                             f"samples of shape {self.x_test.shape[1:]}")
        if self.x_train.shape[0] == 0:
            raise ValueError(f"dataset {self.name!r} has no training samples")
        lo, hi = self.value_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"dataset {self.name!r}: value_range needs finite lo < hi, got {self.value_range}")

    def to_float(self, x):
        """The float32 values ``x / x_divisor`` of stored samples ``x`` (see :func:`to_float`).

        Numpy in, numpy out; jax arrays and tracers in, jax out; jit- and vmap-able. float32 input is
        returned as is, so converting twice is harmless.
        """
        return to_float(x, self.x_divisor)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample x (e.g. (32, 32, 3))."""
        return tuple(self.x_train.shape[1:])

    @property
    def n(self) -> int:
        """Dimension n of one sample: prod(sample_shape)."""
        return int(math.prod(self.sample_shape))

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


def _check_storage(name: str, train_dtype, test_dtype, x_divisor) -> None:
    if train_dtype != test_dtype or train_dtype not in (np.uint8, np.float32):
        raise ValueError(f"dataset {name!r}: x_train and x_test must both be uint8 (8-bit data, stored as read) or "
                         f"both float32, got {train_dtype} and {test_dtype}")
    if isinstance(x_divisor, bool) or not isinstance(x_divisor, (int, float, np.integer, np.floating)):
        raise ValueError(f"dataset {name!r}: x_divisor must be a number, got {x_divisor!r}")
    if train_dtype == np.uint8 and not (math.isfinite(x_divisor) and x_divisor > 0):
        raise ValueError(f"dataset {name!r}: uint8 samples need a finite x_divisor > 0 (255 for 8-bit images), "
                         f"got {x_divisor!r}")
    if train_dtype == np.float32 and x_divisor != 1:
        raise ValueError(f"dataset {name!r}: float32 samples are stored as their values and need x_divisor=1, "
                         f"got {x_divisor!r}")


@functools.lru_cache(maxsize=16)
def _level_values(x_divisor: float) -> np.ndarray:
    # Each of the 256 uint8 levels divided in float32 on the host, the loaders' formula
    # (x.astype(float32) / divisor, correctly rounded). XLA turns a division by a constant into a
    # multiplication by its reciprocal, which for 255 is one ulp off at 126 of the 256 levels, so
    # jitted code looks the values up in this table rather than dividing.
    table = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(x_divisor)
    table.flags.writeable = False
    return table


def to_float(x, x_divisor: float = 1.0):
    """The float32 values ``x / x_divisor`` of samples stored as uint8, or float32 ``x`` unchanged.

    The result is bit-identical to ``x.astype(np.float32) / np.float32(x_divisor)`` computed by numpy
    (a 256-entry table lookup, exact on every backend, where an XLA division would not be).

    Args:
      x: uint8 or float32 array (numpy, jax, or a tracer inside jit/vmap).
      x_divisor: what uint8 levels are divided by (:attr:`Dataset.x_divisor`); unused for float32.

    Returns:
      A float32 array of x's shape: numpy for numpy input, jax otherwise.

    Raises:
      ValueError: x of another dtype.
    """
    dtype = np.dtype(x.dtype)
    if dtype == np.float32:
        return x
    if dtype != np.uint8:
        raise ValueError(f"to_float takes uint8 or float32 samples, got {dtype}")
    table = _level_values(float(x_divisor))
    if isinstance(x, np.ndarray):
        return table[x]
    # uint8 indices are always inside the 256-entry table.
    return jnp.asarray(table).at[x].get(mode="promise_in_bounds")


# ----------------------------------------------------------------------------------------------
# Loading.


def load_dataset(spec: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0,
                 max_train: int | None = None, max_test: int | None = None,
                 image_size: int | None = None) -> Dataset:
    """Load a dataset by its spec (see the module docstring for the accepted forms).

    Args:
      spec: ``"digits"``, a tensorflow-datasets name, ``"idx:PATH"`` or ``"synthetic:SHAPE:CLASSES"``.
      data_dir: where tensorflow-datasets looks for prepared data (default: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``). Only read, never written.
      seed: seeds the synthetic data and the subsets drawn by ``max_train``/``max_test``.
      max_train, max_test: keep at most this many samples (a seeded uniform subset). For synthetic
        data these are the sizes generated (default 10000 / 2000).
      image_size: tensorflow-datasets only: resize every image so its shorter side is
        ``image_size`` and centre-crop it to ``image_size x image_size`` (required for datasets whose
        images differ in size, such as imagenet2012).

    Returns:
      A :class:`Dataset`.

    Raises:
      DatasetUnavailableError: a tensorflow-datasets name that is unknown or not prepared locally
        (for a name of :data:`INSTALLED_IDX`: neither prepared nor installed as IDX files).
      ValueError: a malformed spec or argument, missing IDX files, or data holding NaN/inf.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}; accepted forms: {_ACCEPTED_FORMS}")
    seed = _check_int(seed, "seed", minimum=0)
    max_train = None if max_train is None else _check_int(max_train, "max_train", minimum=1)
    max_test = None if max_test is None else _check_int(max_test, "max_test", minimum=1)
    spec = spec.strip()
    image_size = check_image_size(image_size, spec)
    if spec == "digits":
        data = _load_digits()
    elif spec.startswith("idx:"):
        data = _load_idx(spec[len("idx:"):])
    elif spec.startswith("synthetic:"):
        return _load_synthetic(spec, seed, max_train, max_test)
    elif spec in INSTALLED_IDX:
        data = _load_installed(spec, data_dir, seed, max_train, max_test, image_size)
        max_train = max_test = None  # already subsampled while reading
    elif re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.=,\-]+)*(:[0-9]+\.[0-9]+\.[0-9]+)?", spec):
        data = _load_tfds(spec, data_dir, seed, max_train, max_test, image_size)
        max_train = max_test = None  # already subsampled while reading
    else:
        raise ValueError(f"unknown dataset spec {spec!r}; accepted forms: {_ACCEPTED_FORMS}")
    rng = np.random.default_rng(seed)
    x_train, y_train = _subsample(data.x_train, data.y_train, max_train, rng)
    x_test, y_test = _subsample(data.x_test, data.y_test, max_test, rng)
    return dataclasses.replace(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def check_image_size(image_size, spec: str) -> int | None:
    """Check ``image_size`` for the dataset ``spec`` before any data is read (also used by RunConfig).

    Args:
      image_size: None, or the side in pixels of the square images a tensorflow-datasets source is
        resized and centre-cropped to (:func:`load_dataset`).
      spec: the dataset spec it comes with.

    Returns:
      ``image_size`` as an int, or None.

    Raises:
      ValueError: ``image_size`` not a positive integer, or given for a source that is not from
        tensorflow-datasets ('digits', 'idx:PATH', 'synthetic:...').
    """
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (the side in pixels of the square images, "
                         f"e.g. 64 or 224) or None, got {image_size!r}")
    spec = spec.strip() if isinstance(spec, str) else spec
    if isinstance(spec, str) and (spec == "digits" or spec.startswith(("idx:", "synthetic:"))):
        raise ValueError(f"image_size applies to tensorflow-datasets sources only (e.g. 'imagenet2012', "
                         f"'cifar10'), not {spec!r}: leave image_size unset (None) for 'digits', 'idx:PATH' "
                         f"and 'synthetic:...' sources")
    return int(image_size)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _subsample(x, y, limit, rng):
    if limit is None or limit >= x.shape[0]:
        return x, y
    keep = np.sort(rng.choice(x.shape[0], size=limit, replace=False))
    return x[keep], y[keep]


def _finished(name: str, x_train, y_train, x_test, y_test, num_classes: int, *, synthetic=False,
              value_range=(0.0, 1.0), x_divisor=1.0, source: str = "") -> Dataset:
    """Build the Dataset after the NaN/inf check every source goes through; uint8 samples stay
    uint8 (their value is x / x_divisor), anything else becomes float32."""
    for split, x in (("x_train", x_train), ("x_test", x_test)):
        check_finite(x, name=f"{split} of dataset {name!r}")
    stored = lambda x: np.ascontiguousarray(x, np.uint8 if x.dtype == np.uint8 else np.float32)
    return Dataset(x_train=stored(x_train), y_train=np.asarray(y_train, np.int32),
                   x_test=stored(x_test), y_test=np.asarray(y_test, np.int32),
                   num_classes=int(num_classes), name=name, synthetic=synthetic,
                   value_range=(float(value_range[0]), float(value_range[1])), x_divisor=float(x_divisor),
                   source=source)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are integer intensities 0..16 (held as float64 by scikit-learn): stored as uint8.
    x = digits.images.astype(np.uint8)[..., None]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=_DIGITS_SPLIT_SEED)
    return _finished("digits", x_train, y_train, x_test, y_test, 10, x_divisor=DIGITS_LEVELS,
                     source="scikit-learn's embedded digits")


# IDX dtype codes (LeCun's MNIST page): the third magic byte; data is big-endian.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed): magic ``00 00 TYPE NDIM``, NDIM big-endian
    uint32 dimensions, then the data in row-major order."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # a download cut short, or not gzip at all
        raise ValueError(f"{path}: damaged gzip file ({err}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header promises shape {shape} of {dtype} ({expected} bytes) but the file "
                         f"holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_paths(directory: str) -> tuple[dict, list]:
    """The paths of the four IDX files in ``directory`` (each optionally .gz), and the stems missing."""
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for candidate in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(directory, candidate)):
                found[key] = os.path.join(directory, candidate)
                break
        else:
            missing.append(stem)
    return found, missing


def _load_idx(directory: str) -> Dataset:
    if not directory:
        raise ValueError("dataset spec 'idx:' needs a directory: 'idx:PATH', got an empty PATH")
    directory = os.path.expanduser(directory)
    found, missing = _idx_paths(directory)
    if missing:
        raise ValueError(f"IDX dataset directory {directory!r} lacks {', '.join(missing)} (optionally .gz); "
                         f"expected the files {', '.join(IDX_FILES.values())}")
    arrays = {key: read_idx(path) for key, path in found.items()}
    name = "idx:" + os.path.basename(os.path.normpath(directory))
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{directory}: {split} images of shape {x.shape} do not match labels of shape {y.shape}")
        if y.shape[0] == 0:
            raise ValueError(f"{found[f'y_{split}']}: the {split} set holds 0 samples; an IDX dataset needs "
                             "at least one training and one test sample")
        if x.ndim == 3:  # (N, H, W) grey-scale: one channel
            arrays[f"x_{split}"] = x[..., None]
    integer = np.issubdtype(arrays["x_train"].dtype, np.integer)
    x_divisor = 1.0
    if arrays["x_train"].dtype == np.uint8 and arrays["x_test"].dtype == np.uint8:
        # 8-bit intensities, the MNIST case: stored as read, value x / 255.
        x_train, x_test, x_divisor = arrays["x_train"], arrays["x_test"], 255.0
        value_range = (0.0, 1.0)
    elif integer:
        x_train = arrays["x_train"].astype(np.float32) / 255.0
        x_test = arrays["x_test"].astype(np.float32) / 255.0
        value_range = (0.0, 1.0)
    else:
        x_train, x_test = arrays["x_train"].astype(np.float32), arrays["x_test"].astype(np.float32)
        check_finite(x_train, name=f"x_train of dataset {name!r}")
        value_range = (float(x_train.min()), float(x_train.max()))
        if value_range[0] == value_range[1]:
            value_range = (value_range[0], value_range[0] + 1.0)
    y_train, y_test = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    if min(y_train.min(), y_test.min()) < 0:
        raise ValueError(f"{directory}: labels must be non-negative")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return _finished(name, x_train, y_train, x_test, y_test, num_classes, value_range=value_range,
                     x_divisor=x_divisor, source=f"IDX files in {directory}")


class InstalledIdx(NamedTuple):
    """Where a system package installs a dataset as IDX files, read when tensorflow-datasets has
    not prepared it (see :func:`load_dataset`).

    Attributes:
      env: the environment variable naming a directory that holds the four IDX files; when set, it
        is used instead of ``dirs``.
      dirs: the directories the package installs them to, looked in in order.
      install: the command that installs the package.
    """

    env: str
    dirs: tuple[str, ...]
    install: str


INSTALLED_IDX = {
    "fashion_mnist": InstalledIdx("QDATA_FASHION_MNIST_DIR", ("/usr/share/datasets/fashion-mnist",),
                                  "apt-get install -y dataset-fashion-mnist"),
}


def _installed_idx_dir(spec: str) -> tuple[str | None, str]:
    """The directory of ``spec``'s installed IDX files (None if there is none), and where it looked.

    A directory set in the environment variable is the only one looked in; if it lacks a file, that
    is an error rather than a silent fall-back to the package's directory."""
    entry = INSTALLED_IDX[spec]
    override = os.environ.get(entry.env, "").strip()
    if override:
        directory = os.path.expanduser(override)
        missing = _idx_paths(directory)[1]
        if missing:
            raise DatasetUnavailableError(
                f"${entry.env} is {override!r}, but that directory lacks {', '.join(missing)} (optionally .gz): "
                f"it must hold the IDX files {', '.join(IDX_FILES.values())}; unset it to look in "
                f"{', '.join(entry.dirs)}")
        return directory, f"${entry.env}={override}"
    for directory in entry.dirs:
        if not _idx_paths(directory)[1]:
            return directory, directory
    return None, f"{', '.join(entry.dirs)} (and ${entry.env}, unset)"


def _load_installed(spec: str, data_dir, seed: int, max_train, max_test, image_size) -> Dataset:
    """tensorflow-datasets where ``spec`` is prepared, else its installed IDX files (subsampled and
    resized as tensorflow-datasets would be), else an error that says how to get either."""
    try:
        return _load_tfds(spec, data_dir, seed, max_train, max_test, image_size)
    except DatasetUnavailableError as err:
        not_prepared = err
    directory, looked = _installed_idx_dir(spec)
    if directory is None:
        entry = INSTALLED_IDX[spec]
        raise DatasetUnavailableError(
            f"dataset {spec!r} is neither prepared for tensorflow-datasets nor installed as IDX files (looked "
            f"in {looked}). To get the IDX files (Debian/Ubuntu): {entry.install} (they go to "
            f"{entry.dirs[0]}); or put the files {', '.join(IDX_FILES.values())} (optionally .gz) in a "
            f"directory DIR and set {entry.env}=DIR. Or prepare it for tensorflow-datasets: {not_prepared}"
        ) from None
    data = _load_idx(directory)
    rng = np.random.default_rng(seed)
    x_train, y_train = _subsample(data.x_train, data.y_train, max_train, rng)
    x_test, y_test = _subsample(data.x_test, data.y_test, max_test, rng)
    name = spec
    if image_size is not None:
        resize = lambda x: np.stack([_resize_center_crop(img, image_size) for img in x])
        x_train, x_test, name = resize(x_train), resize(x_test), f"{spec}@{image_size}"
    return dataclasses.replace(data, name=f"{name} (IDX files from {directory})", x_train=x_train,
                               y_train=y_train, x_test=x_test, y_test=y_test)


def _parse_synthetic(spec: str) -> tuple[tuple[int, ...], int]:
    m = re.fullmatch(r"synthetic:([0-9]+(?:x[0-9]+)*):([0-9]+)", spec)
    if not m:
        raise ValueError(f"malformed synthetic dataset spec {spec!r}; expected 'synthetic:HxWxC:CLASSES' or "
                         f"'synthetic:N_DIM:CLASSES', e.g. 'synthetic:32x32x3:10'")
    shape = tuple(int(d) for d in m.group(1).split("x"))
    classes = int(m.group(2))
    if min(shape) < 1 or classes < 2:
        raise ValueError(f"synthetic dataset spec {spec!r} needs positive dimensions and at least 2 classes")
    return shape, classes


SYNTHETIC_NOISE = 0.15
# Distance between two class means, in units of the noise standard deviation, whatever n is: the
# pairwise Bayes error is Phi(-SEPARATION / 2) ~ 2%, so the task is learnable but not saturated.
SYNTHETIC_SEPARATION = 4.0


def _load_synthetic(spec: str, seed: int, max_train, max_test) -> Dataset:
    """Gaussian classes: x = clip(mu_y + sigma * z, 0, 1), z ~ N(0, I_n), with class means
    mu_c = 1/2 + (SEPARATION * sigma / sqrt(2 n)) u_c, u_c ~ N(0, I_n), so that
    E||mu_c - mu_c'|| ~ SEPARATION * sigma at every n (difficulty independent of the shape)."""
    shape, classes = _parse_synthetic(spec)
    n_train = max_train or SYNTHETIC_DEFAULT_SIZES[0]
    n_test = max_test or SYNTHETIC_DEFAULT_SIZES[1]
    n = math.prod(shape)
    rng = np.random.default_rng(seed)
    scale = SYNTHETIC_SEPARATION * SYNTHETIC_NOISE / math.sqrt(2 * n)
    means = (0.5 + scale * rng.standard_normal((classes, n))).astype(np.float32)

    def draw(count):
        y = rng.integers(0, classes, size=count).astype(np.int32)
        x = means[y] + SYNTHETIC_NOISE * rng.standard_normal((count, n), dtype=np.float32)
        return np.clip(x, 0.0, 1.0).reshape((count,) + shape), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return _finished(spec, x_train, y_train, x_test, y_test, classes, synthetic=True,
                     source=f"generated (seed {seed})")


def _unavailable_message(name: str, data_dir, looked_in: str) -> str:
    where = data_dir if data_dir is not None else "default: $TFDS_DATA_DIR or ~/tensorflow_datasets"
    return (
        f"dataset {name!r} is not prepared in data_dir ({where}; looked in {looked_in}), and qdata never "
        f"downloads: this machine may be offline. To use it, prepare it on a machine with internet access and copy the data_dir here:\n"
        f"  pip install 'qdata[prepare]'\n"
        f"  python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='DIR', file_format='array_record').download_and_prepare()\"\n"
        f"  (or: tfds build {name} --data_dir=DIR --file_format=array_record)\n"
        f"then pass data_dir=DIR. The array_record format is required (random access without TensorFlow); "
        f"some datasets (e.g. imagenet2012) also need their archives downloaded by hand first (see the "
        f"tensorflow-datasets catalog). "
        f"Offline alternatives: " + "; ".join(LOCAL_SOURCES)
    )


def _load_tfds(spec: str, data_dir, seed: int, max_train, max_test, image_size) -> Dataset:
    import tensorflow_datasets as tfds

    base = spec.split("/")[0].split(":")[0]
    # Only the builders shipped with tensorflow-datasets: the community index would need the network.
    known = tfds.list_builders(with_community_datasets=False)
    if base not in known:
        raise DatasetUnavailableError(
            f"unknown dataset {spec!r}: it is not a tensorflow-datasets name. Local sources: "
            + "; ".join(LOCAL_SOURCES))
    data_dir = None if data_dir is None else os.fspath(os.path.expanduser(data_dir))
    # Look for prepared data before anything else; download_and_prepare is never called.
    try:
        builder = tfds.builder(spec, data_dir=data_dir, try_gcs=False)
    except (AssertionError, ValueError) as err:  # an unknown version or config
        raise DatasetUnavailableError(f"cannot open tensorflow-datasets dataset {spec!r}: {err}") from err
    if not builder.is_prepared():
        raise DatasetUnavailableError(_unavailable_message(spec, data_dir, builder.data_dir))
    info = builder.info
    image_key, label_key = _supervised_keys(info, spec)
    split_names = set(info.splits.keys()) if info.splits else set()
    test_split = "test" if "test" in split_names or not split_names else (
        "validation" if "validation" in split_names else None)
    if test_split is None or (split_names and "train" not in split_names):
        raise ValueError(f"dataset {spec!r} needs a 'train' and a 'test' or 'validation' split, has {sorted(split_names)}")
    try:
        sources = tfds.data_source(spec, split=["train", test_split], data_dir=data_dir, download=False,
                                   try_gcs=False)
    except NotImplementedError as err:
        raise DatasetUnavailableError(
            f"dataset {spec!r} is prepared in {builder.data_dir} but not in a random-access format; "
            f"re-prepare it with file_format='array_record'. ({err})") from err
    label_feature = info.features[label_key]
    num_classes = getattr(label_feature, "num_classes", None)
    if not num_classes:
        raise ValueError(f"dataset {spec!r}: the label feature {label_key!r} has no class count")
    feature_shape = tuple(info.features[image_key].shape)
    if image_size is None and any(d is None for d in feature_shape[:-1]):
        raise ValueError(f"dataset {spec!r} holds images of varying size {feature_shape}; pass image_size "
                         f"(e.g. image_size=64) to resize and centre-crop them")
    rng = np.random.default_rng(seed)
    x_train, y_train = _read_split(sources[0], max_train, rng, image_key, label_key, image_size)
    x_test, y_test = _read_split(sources[1], max_test, rng, image_key, label_key, image_size)
    name = spec if image_size is None else f"{spec}@{image_size}"
    x_divisor = 255.0 if x_train.dtype == np.uint8 else 1.0
    return _finished(name, x_train, y_train, x_test, y_test, num_classes, x_divisor=x_divisor,
                     source=f"tensorflow-datasets, prepared in {builder.data_dir}")


def _supervised_keys(info, spec: str) -> tuple[str, str]:
    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    if "image" in info.features and "label" in info.features:
        return "image", "label"
    raise ValueError(f"dataset {spec!r} is not an image classification dataset (no image/label features)")


_READ_CHUNK = 1024


def _read_split(source, limit, rng, image_key, label_key, image_size):
    total = len(source)
    if total == 0:
        raise ValueError("a split of the dataset is empty")
    ids = np.arange(total) if limit is None or limit >= total else np.sort(rng.choice(total, limit, replace=False))
    x = None  # allocated once the first image gives the shape: no list of images, no second copy
    labels = np.empty(len(ids), np.int32)
    batched = hasattr(source, "__getitems__")
    row = 0
    for start in range(0, len(ids), _READ_CHUNK):
        chunk = [int(i) for i in ids[start:start + _READ_CHUNK]]
        if batched:
            try:
                examples = source.__getitems__(chunk)
            except TypeError:
                # tfds.testing.mock_data replaces __getitems__ with a function of the wrong arity.
                batched = False
        if not batched:
            examples = [source[i] for i in chunk]
        for ex in examples:
            img = np.asarray(ex[image_key])
            if image_size:
                img = _resize_center_crop(img, image_size)
            if img.ndim == 2:
                img = img[..., None]
            if x is None:
                # 8-bit pixels are stored as read (value x / 255); other integers are taken as
                # intensities out of 255 and converted, floats kept.
                x = np.empty((len(ids),) + img.shape, np.uint8 if img.dtype == np.uint8 else np.float32)
                convert = x.dtype != np.uint8 and np.issubdtype(img.dtype, np.integer)
            if img.shape != x.shape[1:]:
                raise ValueError(f"images of several shapes ({x.shape[1:]} and {img.shape}); pass image_size "
                                 f"to resize them")
            x[row] = img / np.float32(255.0) if convert else img
            labels[row] = int(ex[label_key])
            row += 1
    return x, labels


def _resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    squeeze = img.ndim == 3 and img.shape[-1] == 1
    pil = Image.fromarray(img[..., 0] if squeeze else img)
    w, h = pil.size
    scale = size / min(w, h)
    pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = pil.size
    left, top = (w - size) // 2, (h - size) // 2
    out = np.asarray(pil.crop((left, top, left + size, top + size)))
    return out[..., None] if squeeze else out


# ----------------------------------------------------------------------------------------------
# Partitions over nodes. Each returns a list of num_nodes int64 index arrays into the training set;
# every training sample is in exactly one node and every node holds at least one sample.


def _check_partition_args(num_samples: int, num_nodes, seed) -> tuple[int, int]:
    num_nodes = _check_int(num_nodes, "num_nodes", minimum=1)
    seed = _check_int(seed, "seed", minimum=0)
    if num_nodes > num_samples:
        raise ValueError(f"num_nodes={num_nodes} exceeds the {num_samples} training samples: a node would be empty")
    return num_nodes, seed


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    return labels


def _shuffled(parts: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    # A random order within each node: minibatches and streaming arrival see no class or cluster order.
    return [rng.permutation(np.asarray(p, np.int64)) for p in parts]


def partition_iid(labels, num_nodes: int, seed: int) -> list[np.ndarray]:
    """Uniformly random partition: node sizes differ by at most one, each node's label histogram is
    a uniform sample of the global one.

    Args:
      labels: (N,) integer training labels (only their count is used).
      num_nodes: number of nodes, 1 <= num_nodes <= N.
      seed: seed of the permutation.

    Returns:
      A list of num_nodes index arrays into the training set.
    """
    labels = _check_labels(labels)
    num_nodes, seed = _check_partition_args(labels.shape[0], num_nodes, seed)
    rng = np.random.default_rng(seed)
    return _shuffled(np.array_split(rng.permutation(labels.shape[0]), num_nodes), rng)


def partition_dirichlet(labels, num_nodes: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: for each class c, its samples are split over the nodes in proportions
    q_c ~ Dirichlet(alpha * 1_N) (Hsu et al. 2019, "Measuring the effects of non-identical data
    distribution for federated visual classification"). Small alpha gives nodes dominated by a few
    classes; alpha -> infinity approaches the iid partition.

    A node left empty by the draw receives one sample taken from the largest node, so every node
    holds at least one sample and every sample stays in exactly one node.

    Args:
      labels: (N,) integer training labels.
      num_nodes: number of nodes, 1 <= num_nodes <= N.
      alpha: concentration, a finite float > 0.
      seed: seed of the draw.

    Returns:
      A list of num_nodes index arrays into the training set.
    """
    labels = _check_labels(labels)
    num_nodes, seed = _check_partition_args(labels.shape[0], num_nodes, seed)
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite float > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        q = rng.dirichlet(np.full(num_nodes, alpha))
        cuts = np.round(np.cumsum(q)[:-1] * members.size).astype(np.int64)
        for node, piece in enumerate(np.split(members, cuts)):
            parts[node].append(piece)
    nodes = [np.concatenate(p) if p else np.zeros((0,), np.int64) for p in parts]
    return _shuffled(_fill_empty(nodes, rng), rng)


def _fill_empty(nodes: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    nodes = list(nodes)
    for i in range(len(nodes)):
        if nodes[i].size == 0:
            donor = int(np.argmax([p.size for p in nodes]))
            take = int(rng.integers(nodes[donor].size))
            nodes[i] = nodes[donor][take:take + 1]
            nodes[donor] = np.delete(nodes[donor], take)
    return nodes


class Clusters(NamedTuple):
    """A similarity dispatch of the training set (:func:`similarity_clusters`).

    Attributes:
      members: num_nodes int64 index arrays into the training set, cluster k's samples (in a random
        order); with replication p a sample is in p of them.
      centres: (num_nodes, n) float32 k-means centres in the samples' float space: the centres of
        the PCA space mapped back (``mean + z V``), so the nearest of them to any point is its
        nearest centre in the PCA space as well (the part of ``x - c_k`` off the PCA subspace does
        not depend on k); :func:`nearest_centres` routes points by them.
    """

    members: list
    centres: np.ndarray


def similarity_clusters(x, num_nodes: int, seed: int, *, balanced: bool = True, replication: int = 1,
                        pca_dim: int | None = 50) -> Clusters:
    """Similarity-based dispatch with replication: similar samples go to the same node.

    The flattened samples (projected on their top ``pca_dim`` principal components when n is larger,
    which keeps the clustering fast on images) are clustered by k-means with num_nodes clusters
    (scikit-learn ``KMeans``, k-means++ seeding), and cluster k goes to node k. Each sample is
    assigned to ``replication`` = p distinct clusters, its nearest ones (Dick et al., "Data Driven
    Resource Allocation for Distributed Learning", AISTATS 2017: p-replicated balanced clustering).

    With ``balanced=True`` the assignment is capacity-constrained: cluster k holds exactly its share
    of the N p assignments, floor(N p / K) or ceil(N p / K). In rounds, every sample short of p
    clusters proposes to its nearest centroid that still has room and that it is not in yet, and
    each centroid keeps its closest proposers up to its remaining capacity; a sample left with no
    such centroid (p > 1 only) takes its nearest full centroid c' it is not in, whose member nearest
    to a centroid c with room (that the sample is in, and the member is not) moves to c. With
    ``balanced=False`` each sample goes to its p nearest centroids, sizes as they fall (an empty
    cluster is given one sample from the largest).

    Args:
      x: (N, *sample_shape) training samples.
      num_nodes: number of nodes K, 1 <= K <= N.
      seed: seed of the PCA and k-means.
      balanced: exact shares of the N p assignments (default) or raw nearest-centroid sizes.
      replication: p, the clusters each sample is assigned to, 1 <= p <= K.
      pca_dim: dimension the samples are projected to before clustering; None keeps all n.

    Returns:
      The :class:`Clusters`: each cluster's members and the K centres.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must hold samples on the leading axis, got shape {x.shape}")
    num_nodes, seed = _check_partition_args(x.shape[0], num_nodes, seed)
    replication = _check_int(replication, "replication", minimum=1)
    if replication > num_nodes:
        raise ValueError(f"replication={replication} exceeds num_nodes={num_nodes}: a sample goes to at most "
                         "every node once")
    if pca_dim is not None:
        pca_dim = _check_int(pca_dim, "pca_dim", minimum=1)
    check_finite(x, name="x")
    flat, kmeans, centres = _fit_kmeans(x, num_nodes, seed, pca_dim)
    rng = np.random.default_rng(seed)
    if not balanced:
        if replication == 1:
            assign = kmeans.labels_
        else:
            assign = np.argsort(kmeans.transform(flat), axis=1, kind="stable")[:, :replication]
        nodes = [np.flatnonzero((assign.reshape(len(flat), -1) == k).any(axis=1)) for k in range(num_nodes)]
        return Clusters(_shuffled(_fill_empty(nodes, rng), rng), centres)
    held = balanced_assignment(kmeans.transform(flat), replication)
    return Clusters(_shuffled([np.flatnonzero(held[:, k]) for k in range(num_nodes)], rng), centres)


def partition_similarity(x, num_nodes: int, seed: int, *, balanced: bool = True,
                         pca_dim: int | None = 50) -> list[np.ndarray]:
    """Similarity-based dispatch: similar samples go to the same node, each to one node.

    The members of :func:`similarity_clusters` with replication 1: k-means (on the top ``pca_dim``
    principal components when n is larger) with num_nodes clusters, cluster k to node k; with
    ``balanced=True`` node sizes differ by at most one (capacity-constrained proposals), with
    ``balanced=False`` they are the cluster sizes (an empty cluster is given one sample from the largest).

    Args:
      x: (N, *sample_shape) training samples.
      num_nodes: number of nodes, 1 <= num_nodes <= N.
      seed: seed of the PCA and k-means.
      balanced: equal node sizes (default) or raw cluster sizes.
      pca_dim: dimension the samples are projected to before clustering; None keeps all n.

    Returns:
      A list of num_nodes index arrays into the training set.
    """
    return similarity_clusters(x, num_nodes, seed, balanced=balanced, pca_dim=pca_dim).members


def _fit_kmeans(x, num_centres: int, seed: int, pca_dim: int | None):
    """k-means (scikit-learn ``KMeans``, k-means++ seeding, one start) of the flattened samples ``x``,
    on their top ``pca_dim`` principal components when n and the sample count exceed it. Returns the
    fitted space's points, the fitted ``KMeans`` and the (k, n) float32 centres mapped back to the
    samples' float space."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    flat = np.asarray(x).reshape(len(x), -1).astype(np.float32)
    pca = None
    if pca_dim is not None and flat.shape[1] > pca_dim and flat.shape[0] > pca_dim:
        pca = PCA(n_components=pca_dim, random_state=seed)
        flat = pca.fit_transform(flat)
    kmeans = KMeans(n_clusters=num_centres, n_init=1, random_state=seed).fit(flat)
    centres = kmeans.cluster_centers_ if pca is None else pca.inverse_transform(kmeans.cluster_centers_)
    return flat, kmeans, np.asarray(centres, np.float32)


def fit_centres(x, num_centres: int, seed: int, pca_dim: int | None = 50) -> np.ndarray:
    """(k, n) float32: the k-means centres of the samples ``x`` (the clustering of
    :func:`similarity_clusters`, fitted on ``x`` alone), in the samples' float space.

    Args:
      x: (m, *sample_shape) the samples to fit on, m >= k.
      num_centres: k.
      seed: seed of the PCA and k-means.
      pca_dim: dimension the samples are projected to before clustering; None keeps all n.
    """
    x = np.asarray(x)
    if x.ndim < 2 or len(x) < num_centres:
        raise ValueError(f"fitting {num_centres} centres needs at least {num_centres} samples on the leading axis, "
                         f"got shape {x.shape}")
    check_finite(x, name="x")
    return _fit_kmeans(x, num_centres, seed, pca_dim)[2]


def _squared_distances(x, centres: np.ndarray) -> np.ndarray:
    """(m, k) float64 squared Euclidean distances of the m flattened points ``x`` to the k centres."""
    flat = np.asarray(x, np.float32).reshape(len(x), -1).astype(np.float64)
    c = np.asarray(centres, np.float64)
    return (flat**2).sum(1, keepdims=True) - 2.0 * flat @ c.T + (c**2).sum(1)[None, :]


def centre_distances(x, centres: np.ndarray) -> np.ndarray:
    """(m, k) float32 Euclidean distances of the m points ``x`` (flattened float values) to the k centres."""
    return np.sqrt(np.maximum(_squared_distances(x, centres), 0.0)).astype(np.float32)


def nearest_centres(x, centres: np.ndarray, count: int = 1) -> np.ndarray:
    """(m, count) int32: the indices of the ``count`` centres nearest to each of the m points ``x``
    (flattened float values), nearest first (squared Euclidean distance)."""
    return np.argsort(_squared_distances(x, centres), axis=1, kind="stable")[:, :count].astype(np.int32)


def balanced_assignment(dist: np.ndarray, replication: int = 1) -> np.ndarray:
    """(N, K) bool: which of K centroids each of N points is assigned to, ``replication`` distinct
    ones each, centroid k holding floor(N p / K) or ceil(N p / K) points, preferring near centroids
    (the proposal rounds and the repair of :func:`similarity_clusters`)."""
    n, k = dist.shape
    total = n * replication
    capacity = np.full(k, total // k)
    capacity[: total % k] += 1
    held = np.zeros((n, k), bool)
    dist = dist.astype(np.float64)
    while True:
        free = np.flatnonzero(held.sum(axis=1) < replication)
        if free.size == 0:
            return held
        room = np.where(held[free] | (capacity == 0)[None, :], np.inf, dist[free])
        choice = np.argmin(room, axis=1)
        open_ = np.isfinite(room[np.arange(free.size), choice])
        if not open_.any():
            _repair(free[0], held, capacity, dist)
            continue
        free, choice = free[open_], choice[open_]
        for c in np.unique(choice):
            proposers = free[choice == c]
            keep = proposers[np.argsort(dist[proposers, c], kind="stable")[: capacity[c]]]
            held[keep, c] = True
            capacity[c] -= keep.size


def _repair(point: int, held: np.ndarray, capacity: np.ndarray, dist: np.ndarray) -> None:
    """Point ``point`` lacks a cluster and every centroid with room already holds it: it takes its
    nearest full centroid c' it is not in, and the member q of c' nearest to a centroid c with room
    (which q is not in) moves from c' to c. Such a q exists: |c'| >= |c| > |c minus point|, and the
    point is not in c'."""
    room = np.flatnonzero(capacity > 0)
    lacking = np.flatnonzero(~held[point])
    target = lacking[np.argmin(dist[point, lacking])]
    rows, cols = np.nonzero(held[:, target][:, None] & ~held[:, room])  # (a member q of c', a c it is not in)
    best = np.argmin(dist[rows, room[cols]])
    q, c = rows[best], room[cols[best]]
    held[q, target], held[q, c] = False, True
    capacity[c] -= 1
    held[point, target] = True


PARTITIONS = ("iid", "dirichlet:ALPHA", "similarity", "similarity:unbalanced")


def partition(spec: str, dataset: Dataset, num_nodes: int, seed: int) -> list[np.ndarray]:
    """Partition ``dataset``'s training set over ``num_nodes`` nodes.

    Args:
      spec: ``"iid"``, ``"dirichlet:ALPHA"`` (e.g. ``"dirichlet:0.3"``), ``"similarity"`` (balanced
        k-means dispatch) or ``"similarity:unbalanced"`` (raw k-means clusters).
      dataset: the :class:`Dataset`.
      num_nodes: N.
      seed: seed of the partition.

    Returns:
      A list of num_nodes index arrays into ``dataset.x_train``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"partition spec must be a string, one of {PARTITIONS}, got {spec!r}")
    if spec == "iid":
        return partition_iid(dataset.y_train, num_nodes, seed)
    if spec.startswith("dirichlet:"):
        try:
            alpha = float(spec[len("dirichlet:"):])
        except ValueError:
            raise ValueError(f"malformed partition spec {spec!r}: expected 'dirichlet:ALPHA' with a number ALPHA > 0") from None
        return partition_dirichlet(dataset.y_train, num_nodes, alpha, seed)
    if spec in ("similarity", "similarity:unbalanced"):
        return partition_similarity(dataset.to_float(dataset.x_train), num_nodes, seed,
                                    balanced=spec == "similarity")
    raise ValueError(f"unknown partition spec {spec!r}; accepted: {', '.join(PARTITIONS)}")


def split_validation(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Carve a validation split out of the training set: settings are chosen on it, the test split
    only reports.

    Args:
      dataset: the :class:`Dataset`.
      fraction: share of the training samples held out, in (0, 1) (at least one sample each side).
      seed: seeds the (uniform, stratification-free) choice of the held-out rows.

    Returns:
      ``(train, x_val, y_val)``: the dataset without the held-out rows (same test split) and the
      held-out samples, stored as the training set is (convert with ``dataset.to_float``).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be a number in (0, 1), got {fraction!r}")
    total = dataset.num_train
    held = int(round(fraction * total))
    if not 1 <= held < total:
        raise ValueError(f"validation fraction {fraction} of {total} training samples leaves an empty split")
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7A11D])).permutation(total)
    val, keep = np.sort(order[:held]), np.sort(order[held:])
    train = dataclasses.replace(dataset, x_train=dataset.x_train[keep], y_train=dataset.y_train[keep])
    return train, dataset.x_train[val], dataset.y_train[val]


# ----------------------------------------------------------------------------------------------
# Nodes as arrays, for jit.


class NodeData(NamedTuple):
    """Each node's share of the training set as a rectangle.

    Attributes:
      index: (num_nodes, max_len) int32; ``index[i, :counts[i]]`` are node i's training-set rows, in
        arrival order. The padding repeats the node's first row, so every entry is a valid row.
      counts: (num_nodes,) int32, the number of samples of each node.
    """

    index: np.ndarray
    counts: np.ndarray


def stack_nodes(indices: Sequence[np.ndarray]) -> NodeData:
    """Stack a partition (list of index arrays) into a padded (num_nodes, max_len) int32 matrix.

    A node draws a minibatch with ``index[i, randint(0, counts[i])]`` (see
    :func:`sample_node_batches`), so no padded entry is ever drawn.
    """
    if len(indices) == 0:
        raise ValueError("indices must hold at least one node")
    arrays = [np.asarray(a).reshape(-1) for a in indices]
    for i, a in enumerate(arrays):
        if a.size == 0:
            raise ValueError(f"node {i} holds no sample; every node needs at least one")
        if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > np.iinfo(np.int32).max:
            raise ValueError(f"node {i}: indices must be non-negative integers below 2**31")
    counts = np.array([a.size for a in arrays], np.int32)
    index = np.empty((len(arrays), int(counts.max())), np.int32)
    for i, a in enumerate(arrays):
        index[i, : a.size] = a
        index[i, a.size:] = a[0]
    return NodeData(index=index, counts=counts)


def sample_batch(key: jax.Array, rows: jax.Array, count, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """One node's minibatch: ``batch_size`` positions drawn uniformly with replacement among the
    node's first ``count`` samples, and the training-set rows at those positions. Jit-able.

    Returns:
      ``(ids, pos)``: (batch_size,) int32 training-set rows and positions in the node's shard.
    """
    pos = jax.random.randint(key, (batch_size,), 0, count)
    return rows[pos], pos


def sample_node_batches(key: jax.Array, index: jax.Array, counts: jax.Array, batch_size: int) -> jax.Array:
    """Each node's minibatch (:func:`sample_batch`, the sampler the engine uses), one key per node
    split from ``key``; pass :func:`available_counts` for streaming nodes. Jit-able.

    Returns:
      (num_nodes, batch_size) int32 training-set rows.
    """
    keys = jax.random.split(key, index.shape[0])
    return jax.vmap(lambda k, rows, count: sample_batch(k, rows, count, batch_size)[0])(keys, index, counts)


# ----------------------------------------------------------------------------------------------
# Streaming nodes: data arriving over time.


def _check_streaming(start_fraction, arrival_rounds) -> tuple[float, int]:
    start_fraction = float(start_fraction)
    if not 0.0 < start_fraction <= 1.0:
        raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
    return start_fraction, _check_int(arrival_rounds, "arrival_rounds", minimum=1)


def available_counts(counts, t, *, start_fraction: float, arrival_rounds: int):
    """How many of each node's samples have arrived by round t (linear arrival).

    Node i starts with ceil(start_fraction * count_i) samples at round 0 and receives the rest at a
    constant rate until it holds all count_i at round ``arrival_rounds``:
    available_i(t) = clip(ceil(count_i * (f0 + (1 - f0) * min(t / T_a, 1))), 1, count_i).
    The samples arrive in the order of the node's index row, so a node at round t samples among
    ``index[i, :available_i(t)]``. Jit-able in ``t`` (a traced round counter is fine).

    Args:
      counts: (num_nodes,) total samples per node (``NodeData.counts``).
      t: the round (int or int array).
      start_fraction: f0 in (0, 1], the share present at round 0 (1 turns streaming off).
      arrival_rounds: T_a >= 1, the round by which all data has arrived.

    Returns:
      (num_nodes,) int32 array.
    """
    start_fraction, arrival_rounds = _check_streaming(start_fraction, arrival_rounds)
    counts = jnp.asarray(counts, jnp.int32)
    progress = jnp.clip(jnp.asarray(t, jnp.float32) / arrival_rounds, 0.0, 1.0)
    frac = start_fraction + (1.0 - start_fraction) * progress
    avail = jnp.ceil(frac * counts.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(avail, 1, counts)


def streaming_counts(counts, rounds: int, start_fraction: float = 0.1,
                     arrival_rounds: int | None = None) -> np.ndarray:
    """The table of :func:`available_counts` for rounds 0..rounds-1.

    Args:
      counts: (num_nodes,) total samples per node.
      rounds: number of rounds.
      start_fraction: share of each node's data present at round 0.
      arrival_rounds: round by which all data has arrived (default: the last round, rounds - 1).

    Returns:
      (rounds, num_nodes) int32 numpy array, non-decreasing in t, ending at ``counts`` when
      ``arrival_rounds <= rounds - 1``.
    """
    rounds = _check_int(rounds, "rounds", minimum=1)
    if arrival_rounds is None:
        arrival_rounds = max(rounds - 1, 1)
    table = jax.vmap(lambda t: available_counts(counts, t, start_fraction=start_fraction,
                                                arrival_rounds=arrival_rounds))(jnp.arange(rounds))
    return np.asarray(table)
