"""The one-shot data-shipping floors (qdata/floors.py): exact bits, decoders, the central dataset."""

import json
import math

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st

from qdata import data, floors
from qdata.codecs import quantizers
from qdata.data import Dataset


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def digit_nodes(digits):
    return data.stack_nodes(data.partition("iid", digits, 3, 0))


def image_set(shape, num_train=23, num_test=5, num_classes=5, seed=0):
    """Small uint8 images with structure (a gradient, blobs, noise), as a Dataset; 5 classes make
    3-bit labels that do not fill whole bytes."""
    rng = np.random.default_rng(seed)
    h, w, c = shape

    def draw(count):
        ramp = np.add.outer(np.arange(h), np.arange(w))[None, :, :, None] * 7
        x = ramp + rng.integers(0, 40, (count, h, w, c)) + 120 * (rng.random((count, 1, 1, c)) < 0.5)
        return np.clip(x, 0, 255).astype(np.uint8), rng.integers(0, num_classes, count).astype(np.int32)

    (x_train, y_train), (x_test, y_test) = draw(num_train), draw(num_test)
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=num_classes,
                   name="test images", x_divisor=255.0, source="made in the test")


def nodes_of(dataset, num_nodes, seed=0):
    return data.stack_nodes(data.partition("iid", dataset, num_nodes, seed))


def rows_of(nodes, i):
    return nodes.index[i, :nodes.counts[i]]


# ----------------------------------------------------------------------------------------------
# Bits.


@pytest.mark.parametrize("coder", floors.CODERS)
@pytest.mark.parametrize("bits", [None, 4])
def test_bits_are_eight_times_the_coded_bytes(digits, digit_nodes, coder, bits):
    payloads = floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts, coder, bits)
    assert len(payloads) == 3
    for p, m in zip(payloads, digit_nodes.counts):
        counted = floors.floor_bits(p)
        assert counted["data"] == 8 * sum(len(chunk) for chunk in p.data)
        # digits has 10 classes: 4 bits a label, packed into whole bytes.
        assert counted["labels"] == 8 * len(p.labels) == 8 * math.ceil(m * 4 / 8)
        assert counted["total"] == counted["data"] + counted["labels"]
        assert all(isinstance(chunk, bytes) and chunk for chunk in p.data)
    np.testing.assert_array_equal(floors.floor_bits_per_node(payloads),
                                  [floors.floor_bits(p)["total"] for p in payloads])
    assert floors.floor_bits_per_node(payloads).dtype == np.int64


def test_coders_really_compress_and_the_stack_beats_each_image(digits, digit_nodes):
    raw = 8 * digits.x_train[rows_of(digit_nodes, 0)].size
    for coder in floors.CODERS:
        stack, each = (floors.floor_payloads(digits, digit_nodes.index[:1], digit_nodes.counts[:1], coder,
                                             layout=layout)[0] for layout in floors.LAYOUTS)
        assert floors.floor_bits(stack)["data"] < 0.5 * raw
        assert floors.floor_bits(stack)["data"] < floors.floor_bits(each)["data"]
        assert len(each.data) == digit_nodes.counts[0]


# ----------------------------------------------------------------------------------------------
# Decoders.


@pytest.mark.parametrize("coder", floors.CODERS)
@pytest.mark.parametrize("layout", floors.LAYOUTS)
def test_lossless_round_trip_digits(digits, digit_nodes, coder, layout):
    payloads = floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts, coder, layout=layout)
    for i, p in enumerate(payloads):
        x, y = floors.decode_floor(p)
        rows = rows_of(digit_nodes, i)
        assert x.dtype == np.uint8 and y.dtype == np.int32
        np.testing.assert_array_equal(x, digits.x_train[rows])
        np.testing.assert_array_equal(y, digits.y_train[rows])


@pytest.mark.parametrize("coder", floors.CODERS)
@pytest.mark.parametrize("shape", [(6, 5, 1), (4, 7, 3)])
def test_lossless_round_trip_made_images_over_several_tiles(coder, shape, monkeypatch):
    # Tiles of at most 20 rows: 3 grey images of 6 rows or 5 RGB images of 4 rows each, so a node
    # of 8 images spans several files.
    monkeypatch.setattr(floors, "WEBP_MAX_SIDE", 20)
    ds = image_set(shape)
    nodes = nodes_of(ds, 3)
    payloads = floors.floor_payloads(ds, nodes.index, nodes.counts, coder)
    if coder != "zstd":
        assert len(payloads[0].data) == math.ceil(nodes.counts[0] / (20 // shape[0]))
    for i, p in enumerate(payloads):
        x, y = floors.decode_floor(p)
        np.testing.assert_array_equal(x, ds.x_train[rows_of(nodes, i)])
        np.testing.assert_array_equal(y, ds.y_train[rows_of(nodes, i)])
        assert floors.floor_bits(p)["labels"] == 8 * math.ceil(nodes.counts[i] * 3 / 8)


@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3]), st.integers(1, 12), st.integers(0, 255),
       st.integers(0, 2**32 - 1))
def test_lossless_round_trip_any_small_images(h, w, c, m, top, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, top + 1, (m, h, w, c)).astype(np.uint8)
    y = rng.integers(0, 3, m).astype(np.int32)
    for coder in floors.CODERS:
        meta = floors.FloorMeta(coder, "stack", (h, w, c), "uint8", None, None, None, None, 3)
        got_x, got_y = floors.decode_floor(floors.encode_floor(x, y, meta))
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)


def test_float_data_lossless_through_zstd_only():
    ds = data.load_dataset("synthetic:4x4x1:3", max_train=20, max_test=4)
    nodes = nodes_of(ds, 2)
    (p, _) = floors.floor_payloads(ds, nodes.index, nodes.counts, "zstd")
    x, _ = floors.decode_floor(p)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, ds.x_train[rows_of(nodes, 0)])  # bit-identical floats
    for coder in ("png", "webp"):
        assert "zstd" in floors.cannot_code(ds, coder)
        with pytest.raises(ValueError, match="codes 8-bit images.*'zstd'"):
            floors.floor_payloads(ds, nodes.index, nodes.counts, coder)
        assert floors.cannot_code(ds, coder, bits=4) is None  # its levels are images
    rows = floors.floor_rows(ds, nodes.index, nodes.counts, bits=(None,))
    assert [r["coder"] for r in rows] == ["zstd"] and rows[0]["best"]


@pytest.mark.parametrize("coder", floors.CODERS)
@pytest.mark.parametrize("bits,rounding", [(4, "nearest"), (2, "stochastic"), (8, "nearest"), (1, "stochastic")])
def test_quantized_round_trip(coder, bits, rounding):
    ds = image_set((6, 5, 1), num_train=30)
    nodes = nodes_of(ds, 3)
    payloads = floors.floor_payloads(ds, nodes.index, nodes.counts, coder, bits, rounding=rounding, seed=7)
    for i, p in enumerate(payloads):
        assert p.meta.bits == bits and p.meta.rounding == rounding and p.meta.dtype == "uint8"
        levels, y = floors.decode_floor(p)
        shard = ds.x_train[rows_of(nodes, i)]
        key = jax.random.fold_in(jax.random.PRNGKey(7), i)
        # The levels decode exactly, and are those of qdata's quantizer on the shard alone (the
        # padding of the node's index row changes no sample's draw).
        np.testing.assert_array_equal(levels, floors.quantize_levels(ds, shard, bits, rounding, key))
        np.testing.assert_array_equal(y, ds.y_train[rows_of(nodes, i)])
        assert levels.dtype == np.uint8 and levels.max() <= (1 << bits) - 1
        if rounding == "nearest":
            np.testing.assert_array_equal(levels, np.round(ds.to_float(shard) * ((1 << bits) - 1)))
        else:  # each value goes to one of its two neighbouring levels
            u = ds.to_float(shard).astype(np.float64) * ((1 << bits) - 1)
            assert np.all((levels == np.floor(u + 1e-6)) | (levels == np.ceil(u - 1e-6)))


def test_stochastic_levels_depend_on_the_seed():
    ds = image_set((6, 5, 1), num_train=30)
    nodes = nodes_of(ds, 2)
    a, b = (floors.floor_payloads(ds, nodes.index, nodes.counts, "zstd", 2, rounding="stochastic", seed=s)
            for s in (0, 1))
    assert not np.array_equal(floors.decode_floor(a[0])[0], floors.decode_floor(b[0])[0])
    again = floors.floor_payloads(ds, nodes.index, nodes.counts, "zstd", 2, rounding="stochastic", seed=0)
    assert [p.data for p in again] == [p.data for p in a]


# ----------------------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize("kwargs,match", [
    ({"coder": "jpeg"}, r"coder must be one of \('png', 'webp', 'zstd'\), got 'jpeg'"),
    ({"coder": "png", "bits": 0}, r"bits must be None \(the lossless floor\) or an integer B in 1\.\.8"),
    ({"coder": "png", "bits": 9}, r"bits must be None .* in 1\.\.8 .*got 9"),
    ({"coder": "png", "bits": True}, "bits must be None"),
    ({"coder": "png", "bits": 2.5}, "bits must be None"),
    ({"coder": "png", "layout": "grid"}, r"layout must be one of \('stack', 'each'\), got 'grid'"),
    ({"coder": "png", "bits": 4, "rounding": "up"}, r"rounding must be one of \('nearest', 'stochastic'\)"),
])
def test_bad_arguments(digits, digit_nodes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts, **kwargs)


def test_bad_shapes_and_inputs(digits, digit_nodes):
    vectors = data.load_dataset("synthetic:12:3", max_train=10, max_test=2)
    nodes = nodes_of(vectors, 2)
    with pytest.raises(ValueError, match=r"grey-scale \(H, W, 1\) or RGB \(H, W, 3\) images.*\(12,\).*'zstd'"):
        floors.floor_payloads(vectors, nodes.index, nodes.counts, "webp", 4)
    assert floors.decode_floor(floors.floor_payloads(vectors, nodes.index, nodes.counts, "zstd", 4)[0])[0].shape == (5, 12)
    with pytest.raises(ValueError, match="count must lie in 1..479"):
        floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts * 0, "zstd")
    with pytest.raises(ValueError, match="stochastic rounding needs a key"):
        floors.quantize_levels(digits, digits.x_train[:2], 4, "stochastic")
    with pytest.raises(ValueError, match="central_dataset needs"):
        floors.central_dataset(digits, [])


# ----------------------------------------------------------------------------------------------
# The central dataset the learner trains on.


def test_central_dataset_lossless(digits, digit_nodes):
    payloads = floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts, "webp")
    central = floors.central_dataset(digits, payloads)
    rows = np.concatenate([rows_of(digit_nodes, i) for i in range(3)])
    np.testing.assert_array_equal(central.x_train, digits.x_train[rows])
    np.testing.assert_array_equal(central.y_train, digits.y_train[rows])
    assert sorted(rows.tolist()) == list(range(digits.num_train))  # the whole training set, reordered
    assert central.x_test is digits.x_test and central.y_test is digits.y_test
    assert central.x_divisor == digits.x_divisor == 16.0 and central.name == "digits, lossless floor"
    assert "webp" in central.source


def test_central_dataset_quantized_keeps_uint8_where_exact():
    ds = image_set((6, 5, 1), num_train=30)
    nodes = nodes_of(ds, 3)
    payloads = floors.floor_payloads(ds, nodes.index, nodes.counts, "png", 4, rounding="stochastic", seed=1)
    central = floors.central_dataset(ds, payloads)
    levels = np.concatenate([floors.decode_floor(p)[0] for p in payloads])
    # 255 / (2^4 - 1) = 17: the levels times 17 are uint8, and x / 255 is exactly level / 15 in float32.
    assert central.x_train.dtype == np.uint8 and central.x_divisor == 255.0
    np.testing.assert_array_equal(central.x_train, levels * 17)
    np.testing.assert_array_equal(central.to_float(central.x_train), np.float32(levels) / np.float32(15))
    assert central.x_test is ds.x_test and central.name == "test images, 4-bit stochastic floor"
    # Within a float32 ulp of what qdata's quantizer decodes from the same codes.
    q = quantizers.stochastic_rounding(4, 0.0, 1.0)
    key = jax.random.fold_in(jax.random.PRNGKey(1), 0)
    shard = ds.x_train[rows_of(nodes, 0)]
    decoded = np.asarray(q.decode(q.encode(key, ds.to_float(shard))))
    np.testing.assert_allclose(central.to_float(central.x_train[:nodes.counts[0]]), decoded, rtol=0, atol=6e-8)


def test_central_dataset_quantized_digits_becomes_float32(digits, digit_nodes):
    payloads = floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts, "zstd", 4)
    central = floors.central_dataset(digits, payloads)
    levels = np.concatenate([floors.decode_floor(p)[0] for p in payloads])
    # 16 / 15 is no integer: both splits become their float32 values.
    assert central.x_train.dtype == central.x_test.dtype == np.float32 and central.x_divisor == 1.0
    np.testing.assert_array_equal(central.x_train, (levels / 15.0).astype(np.float32))
    np.testing.assert_array_equal(central.x_test, digits.to_float(digits.x_test))
    assert central.value_range == digits.value_range and central.num_classes == 10
    with pytest.raises(ValueError, match="one floor per node"):
        floors.central_dataset(digits, payloads[:1] + floors.floor_payloads(digits, digit_nodes.index[:1],
                                                                           digit_nodes.counts[:1], "zstd", 2))


def test_the_learner_trains_centrally_on_the_floor(digits, digit_nodes, tmp_path, monkeypatch):
    """run.train builds its dataset from config.dataset; until it takes a prepared one, hand it the
    central dataset through the loader it calls."""
    from qdata.config import RunConfig
    from qdata.run import train

    central = floors.central_dataset(digits, floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts,
                                                                   "png", 2))
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: central)
    config = RunConfig(dataset="digits", model="mlp", method="sgd", num_nodes=1, batch_size=96, rounds=40,
                       eval_every=20, lr=0.1, momentum=0.9, seed=0, checkpoint_every=0)
    last = train(config, tmp_path / "floor")
    header = json.loads((tmp_path / "floor" / "results.jsonl").read_text().splitlines()[0])
    assert header["dataset"]["name"] == "digits, 2-bit nearest floor"
    assert header["dataset"]["num_train"] == digits.num_train
    assert last["test_accuracy"] > 0.7  # chance is 0.1


def test_floor_rows(digits, digit_nodes):
    rows = floors.floor_rows(digits, digit_nodes.index, digit_nodes.counts, bits=(None, 2))
    assert [(r["bits"], r["coder"]) for r in rows] == [(b, c) for b in (None, 2) for c in floors.CODERS]
    for b in (None, 2):
        group = [r for r in rows if r["bits"] == b]
        assert sum(r["best"] for r in group) >= 1
        best = min(r["mean_bits_per_node"] for r in group)
        assert all(r["best"] == (r["mean_bits_per_node"] == best) for r in group)
    for r in rows:
        payloads = floors.floor_payloads(digits, digit_nodes.index, digit_nodes.counts, r["coder"], r["bits"])
        assert r["bits_per_node"] == floors.floor_bits_per_node(payloads).tolist()
        assert r["rounding"] == (None if r["bits"] is None else "nearest")
    json.dumps(rows)
