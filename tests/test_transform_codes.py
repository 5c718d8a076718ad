"""Transform codes (qdata/codecs/transform_codes.py), their bit allocation and variable-width packing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings, strategies as st

from qdata.codecs import bit_allocation, payload_bits, varpack
from qdata.codecs import transform_codes as tc

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def _images(seed: int, count: int = 400, shape=(8, 8, 1)) -> np.ndarray:
    """Smooth random images in [0, 1]: energy concentrates in a few DCT/PCA coefficients."""
    rng = np.random.default_rng(seed)
    h, w = shape[0], shape[1]
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    a = rng.uniform(0, 1, (count, 4, 1, 1))
    img = (a[:, 0] * xx + a[:, 1] * yy + a[:, 2] * np.sin(3 * xx * yy) + 0.3 * a[:, 3]) / 2.3
    img = img + 0.02 * rng.standard_normal((count, h, w))
    return np.clip(img, 0, 1)[..., None].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Packing.


@SETTINGS
@given(st.lists(st.integers(0, 16), min_size=1, max_size=40), st.integers(1, 5), st.integers(0, 2**31))
def test_varpack_round_trip_and_exact_size(widths, rows, seed):
    widths = np.asarray(widths)
    rng = np.random.default_rng(seed)
    codes = (rng.integers(0, 2**16, (rows, widths.size)) % (1 << widths)).astype(np.uint32)
    packed = varpack.pack_widths(jnp.asarray(codes), widths)
    assert packed.dtype == jnp.uint8 and packed.shape == (rows, math.ceil(widths.sum() / 8))
    assert packed.shape[1] * 8 == varpack.stream_bits(widths)
    np.testing.assert_array_equal(np.asarray(varpack.unpack_widths(packed, widths)), np.where(widths > 0, codes, 0))


def test_varpack_is_a_little_endian_bit_stream():
    # codes 0b1 (1 bit), 0b10 (2 bits), 0b11111 (5 bits) -> bits 1, 0 1, 1 1 1 1 1 -> byte 0b11111101
    packed = varpack.pack_widths(jnp.asarray([[1, 2, 31]], jnp.uint32), np.array([1, 2, 5]))
    assert int(packed[0, 0]) == 0b11111101


def test_varpack_rejects_bad_widths():
    with pytest.raises(ValueError, match="widths must lie in 0..16"):
        varpack.pack_widths(jnp.zeros((1, 2), jnp.uint32), np.array([3, 17]))
    with pytest.raises(ValueError, match="codes must have shape"):
        varpack.pack_widths(jnp.zeros((1, 3), jnp.uint32), np.array([3, 4]))


# ----------------------------------------------------------------------------------------------
# Bases and allocation.


@pytest.mark.parametrize("shape", [(8, 8), (4, 6, 3), (10,)])
def test_dct_basis_is_orthonormal_and_matches_scipy(shape):
    v = tc.dct_basis(shape)
    np.testing.assert_allclose(v.T @ v, np.eye(v.shape[0]), atol=1e-12)
    x = np.random.default_rng(0).standard_normal(shape)
    axes = (0, 1) if len(shape) > 1 else (0,)
    want = scipy.fft.dctn(x, norm="ortho", axes=axes).reshape(-1)
    np.testing.assert_allclose(x.reshape(-1) @ v, want, atol=1e-12)


def test_allocation_is_reverse_water_filling_for_gaussian_distortion():
    variances = np.array([16.0, 8.0, 4.0, 1.0, 0.25, 0.01])
    table = variances[:, None] * 4.0 ** -np.arange(9)[None, :]
    widths = bit_allocation.allocate_bits(table, 10)
    assert widths.sum() == 10
    assert np.all(np.diff(widths) <= 0)  # more variance, no fewer bits
    # Continuous optimum b_k = max(0, log2(sigma_k / sqrt(theta))); integer greedy is within a bit of it.
    theta = next(t for t in np.geomspace(1e-4, 20, 20000)[::-1]
                 if np.maximum(0, 0.5 * np.log2(variances / t)).sum() >= 10)
    assert np.all(np.abs(widths - np.maximum(0, 0.5 * np.log2(variances / theta))) <= 1.0)


def test_allocation_looks_ahead_over_a_costly_first_bit():
    # One bit makes things worse (stochastic rounding on a wide range), two bits pay.
    table = np.array([[1.0, 3.0, 0.2, 0.05], [0.5, 0.45, 0.4, 0.35]])
    assert list(bit_allocation.allocate_bits(table, 2)) == [2, 0]


def test_allocate_bits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget must be a non-negative integer"):
        bit_allocation.allocate_bits(np.ones((3, 4)), -1)
    with pytest.raises(ValueError, match="distortion must be a"):
        bit_allocation.allocate_bits(np.ones(3), 4)


# ----------------------------------------------------------------------------------------------
# The codec.


@pytest.fixture(scope="module")
def images():
    return _images(0)


def _setup(images, basis, rounding, budget=96, max_width=8):
    return tc.fit_transform_code(images, budget, basis=basis, rounding=rounding, max_width=max_width)


@pytest.mark.parametrize("basis", tc.BASES)
@pytest.mark.parametrize("rounding", tc.ROUNDINGS)
def test_bits_are_read_off_the_packed_payload(images, basis, rounding):
    setup = _setup(images, basis, rounding)
    q, s = tc.transform_code(setup), tc.transform_state(setup)
    assert s.widths.sum() <= 96 and s.widths.min() >= 1
    payload = q.encode(jax.random.key(1), jnp.asarray(images[:10]))
    seed_bits = 32 if rounding == "dither" else 0
    assert q.bits(payload) == 10 * 8 * math.ceil(s.widths.sum() / 8) + seed_bits
    assert q.bits(payload) == payload_bits(payload)
    mask = jnp.asarray([1, 0] * 5)
    assert int(q.bits(payload, mask).total()) == 5 * 8 * math.ceil(s.widths.sum() / 8) + seed_bits


@pytest.mark.parametrize("basis", tc.BASES)
def test_setup_is_charged_once_and_is_all_the_learner_needs(images, basis):
    setup = _setup(images, basis, "stochastic")
    s = tc.transform_state(setup)
    n, columns, kept = 64, setup.meta.columns, s.widths.size
    want = 16 * n + 4 * columns + (columns % 2) * 4 + 2 * 16 * kept + (16 * n * kept if basis == "pca" else 0)
    assert tc.setup_bits(setup) == want
    # The per-sample payload carries no part of the setup: its size depends only on the widths.
    q = tc.transform_code(setup)
    p = q.encode(jax.random.key(0), jnp.asarray(images[:3]))
    assert set(p.rows) == {"codes"} and not p.arrays
    # A learner that only received the setup's bytes rebuilds the same decoder.
    received = type(setup)(arrays={k: jnp.asarray(np.frombuffer(np.asarray(v).tobytes(), np.asarray(v).dtype)
                                                  .reshape(v.shape)) for k, v in setup.arrays.items()},
                           meta=setup.meta)
    np.testing.assert_array_equal(np.asarray(tc.transform_code(received).decode(p)), np.asarray(q.decode(p)))


def _replicas(images, index, count):
    return jnp.asarray(np.repeat(images[index : index + 1], count, axis=0))


@pytest.mark.parametrize("basis", tc.BASES)
@pytest.mark.parametrize("rounding", tc.ROUNDINGS)
def test_unbiased_for_the_projection_with_the_stated_truncation_bias(images, basis, rounding):
    setup = _setup(images, basis, rounding)
    q, s = tc.transform_code(setup), tc.transform_state(setup)
    count = 4096
    x = _replicas(images, 7, count)
    draws = np.concatenate([np.asarray(q.decode(q.encode(jax.random.key(k), x))) for k in range(4)])
    mean = draws.reshape(draws.shape[0], -1).mean(axis=0)
    want = np.asarray(x[0] + tc.truncation_bias(setup, x[:1])[0]).reshape(-1)
    # Var(x_hat_i) = sum_k V_ik^2 Var(c_hat_k) <= sum_k V_ik^2 Delta_k^2 / 4 (SR), / 12 (dither).
    var = (np.asarray(s.basis) ** 2) @ (np.asarray(s.step) ** 2 / (4 if rounding == "stochastic" else 12))
    tol = 5 * np.sqrt(var / draws.shape[0]) + 1e-5
    assert np.all(np.abs(mean - want) <= tol)
    assert not q.unbiased  # truncated: unbiased only for the projection


def test_full_allocation_is_unbiased():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (300, 6)).astype(np.float32)
    setup = tc.fit_transform_code(x, 6 * 4, basis="pca", rounding="stochastic")
    q = tc.transform_code(setup)
    assert q.unbiased and tc.transform_state(setup).widths.size == 6
    reps = jnp.asarray(np.repeat(x[:1], 8192, axis=0))
    got = np.asarray(q.decode(q.encode(jax.random.key(0), reps))).mean(axis=0)
    s = tc.transform_state(setup)
    tol = 5 * np.sqrt((np.asarray(s.basis) ** 2) @ (np.asarray(s.step) ** 2 / 4) / 8192) + 1e-5
    assert np.all(np.abs(got - x[0]) <= tol)


@SETTINGS
@given(st.integers(0, 2**31), st.sampled_from(tc.BASES), st.sampled_from(tc.ROUNDINGS), st.integers(20, 200))
def test_decode_of_encode_within_the_stated_error(seed, basis, rounding, budget):
    x = _images(seed % 1000, count=120)
    setup = tc.fit_transform_code(x, budget, basis=basis, rounding=rounding)
    q, s = tc.transform_code(setup), tc.transform_state(setup)
    p = q.encode(jax.random.key(seed), jnp.asarray(x))
    assert int(p.info["clipped"]) == 0  # the ranges were fitted on these samples
    err = np.asarray(q.decode(p) - (jnp.asarray(x) + tc.truncation_bias(setup, x))).reshape(len(x), -1)
    # |c_hat_k - c_k| < Delta_k (stochastic rounding), <= Delta_k / 2 (dither); the basis is orthonormal.
    bound = np.sum(np.asarray(s.step) ** 2) * (1.0 if rounding == "stochastic" else 0.25)
    assert np.all(np.sum(err**2, axis=1) <= bound * (1 + 1e-4) + 1e-8)


def test_dither_error_has_the_variance_delta_squared_over_12(images):
    setup = _setup(images, "pca", "dither")
    q, s = tc.transform_code(setup), tc.transform_state(setup)
    x = jnp.asarray(images)
    err = np.asarray(q.decode(q.encode(jax.random.key(5), x)) - x - tc.truncation_bias(setup, images))
    per_sample = np.sum(err.reshape(len(images), -1) ** 2, axis=1)
    want = float(np.sum(np.asarray(s.step) ** 2) / 12)
    # The squared error of one sample is a sum of K independent terms of variance Delta^4/180 each.
    sd = np.sqrt(np.sum(np.asarray(s.step) ** 4 / 180) / len(images))
    assert abs(per_sample.mean() - want) <= 5 * sd


@pytest.mark.parametrize("max_width", [1, 2])
def test_low_b_transform_codes(images, max_width):
    setup = tc.fit_transform_code(images, 40, basis="pca", rounding="dither", max_width=max_width,
                                  allocation="uniform")
    s = tc.transform_state(setup)
    assert np.all(s.widths == max_width) and s.widths.sum() == 40
    q = tc.transform_code(setup)
    assert q.bits(q.encode(jax.random.key(0), jnp.asarray(images[:4]))) == 4 * 40 + 32


def test_one_full_range_bit_never_beats_truncation_under_water_filling(images):
    # Dither on [min, max] at one bit has error Delta^2 / 12 = (hi - lo)^2 / 12 > Var(c): no bit pays.
    with pytest.raises(ValueError, match="no coefficient gains from bits"):
        tc.fit_transform_code(images, 40, basis="pca", rounding="dither", max_width=1)


def test_out_of_range_coefficients_are_clipped_and_counted(images):
    setup = _setup(images, "dct", "stochastic")
    q = tc.transform_code(setup)
    p = q.encode(jax.random.key(0), jnp.asarray(images[:2] * 3.0))
    assert int(p.info["clipped"]) > 0


def test_errors_name_the_argument(images):
    with pytest.raises(ValueError, match="basis must be one of"):
        tc.fit_transform_code(images, 10, basis="wavelet")
    with pytest.raises(ValueError, match="rounding must be one of"):
        tc.fit_transform_code(images, 10, rounding="nearest")
    with pytest.raises(ValueError, match="allocation must be one of"):
        tc.fit_transform_code(images, 10, allocation="greedy")
    with pytest.raises(ValueError, match="max_width must be an integer in 1..8"):
        tc.fit_transform_code(images, 10, max_width=9)
    with pytest.raises(ValueError, match="bits_per_sample must be a positive integer"):
        tc.fit_transform_code(images, 0)
    q = tc.transform_code(_setup(images, "dct", "stochastic"))
    with pytest.raises(ValueError, match="x must have shape"):
        q.encode(jax.random.key(0), jnp.zeros((2, 7, 7, 1)))


def test_encode_and_decode_vmap_over_nodes(images):
    # The engine simulates nodes with jax.vmap: each node's payload is what it would have sent alone.
    setup = _setup(images, "pca", "dither")
    q = tc.transform_code(setup)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jnp.asarray(images[:24]).reshape(3, 8, 8, 8, 1)
    decoded = jax.jit(jax.vmap(lambda k, xi: q.decode(q.encode(k, xi))))(keys, x)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(decoded[i]), np.asarray(q.decode(q.encode(keys[i], x[i]))),
                                   atol=1e-6)
