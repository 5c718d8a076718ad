"""Entropy coding of data codes with constriction's ANS (qdata/codecs/entropy.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qdata.codecs import Payload, entropy, stochastic_rounding, varpack
from qdata.codecs import transform_codes as tc

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _skewed_codes(rng, count, alphabet):
    cols = []
    for a in alphabet:
        p = rng.dirichlet(np.full(a, 0.3))
        cols.append(rng.choice(a, size=count, p=p))
    return np.stack(cols, axis=1).astype(np.int32)


@SETTINGS
@given(st.lists(st.sampled_from([1, 2, 4, 16, 256]), min_size=1, max_size=12), st.integers(1, 300),
       st.integers(0, 2**31))
def test_round_trip_is_exact_and_bits_are_the_words(alphabet, count, seed):
    rng = np.random.default_rng(seed)
    fit = _skewed_codes(rng, 500, alphabet)
    model = entropy.fit_categorical(fit, alphabet)
    coder = entropy.entropy_coder(model)
    codes = _skewed_codes(rng, count, alphabet)  # other draws: symbols unseen at fit time still code
    words = coder.encode(codes)
    assert words.dtype == np.uint32
    assert coder.bits(words) == 32 * words.size
    np.testing.assert_array_equal(coder.decode(words, count), codes)


def test_coded_length_is_near_the_cross_entropy():
    rng = np.random.default_rng(0)
    alphabet = [16] * 20
    codes = _skewed_codes(rng, 2000, alphabet)
    model = entropy.fit_categorical(codes, alphabet)
    coder = entropy.entropy_coder(model)
    estimate = entropy.cross_entropy_bits(model, codes)
    bits = coder.bits(coder.encode(codes))
    assert estimate - 1 <= bits <= estimate * 1.002 + 64
    assert bits < 2000 * 20 * 4  # beats the fixed-length codes on skewed data


def test_model_is_charged_and_rebuilt_from_its_payload():
    rng = np.random.default_rng(1)
    alphabet = [2, 8, 8, 32]
    codes = _skewed_codes(rng, 300, alphabet)
    model = entropy.fit_categorical(codes, alphabet)
    assert entropy.model_bits(model) == 16 * sum(alphabet)
    words = entropy.entropy_coder(model).encode(codes)
    received = Payload(arrays={"freq": jnp.asarray(np.frombuffer(np.asarray(model.arrays["freq"]).tobytes(),
                                                                 np.uint16))}, meta=model.meta)
    np.testing.assert_array_equal(entropy.entropy_coder(received).decode(words, 300), codes)


def test_transform_payload_decodes_from_the_coded_words():
    rng = np.random.default_rng(2)
    x = np.clip(rng.normal(0.5, 0.1, (200, 4, 4, 1)) + np.linspace(0, 0.3, 16).reshape(1, 4, 4, 1), 0, 1)
    setup = tc.fit_transform_code(x.astype(np.float32), 40, basis="pca")
    q, s = tc.transform_code(setup), tc.transform_state(setup)
    payload = q.encode(jax.random.key(0), jnp.asarray(x, jnp.float32))
    codes = tc.payload_codes(setup, payload)
    model = entropy.fit_categorical(codes, 1 << s.widths)
    coder = entropy.entropy_coder(model)
    words = coder.encode(codes[:50])
    # The learner: words -> codes -> the fixed-length rows -> the very samples the node encoded.
    rows = varpack.pack_widths(jnp.asarray(coder.decode(words, 50), jnp.uint32), s.widths)
    received = Payload(arrays=payload.arrays, rows={"codes": rows}, meta=payload.meta)
    np.testing.assert_array_equal(np.asarray(q.decode(received)),
                                  np.asarray(q.decode(Payload(rows={"codes": payload.rows["codes"][:50]},
                                                              meta=payload.meta))))
    assert coder.bits(words) < q.bits(payload) / 200 * 50
    mask = np.zeros(200, np.int32)
    mask[:50] = 1
    assert entropy.coded_bits(coder, codes, mask) == coder.bits(words)


def test_pixel_quantizer_codes_round_trip():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.beta(0.5, 0.5, (64, 6, 6)), jnp.float32)
    payload = stochastic_rounding(4, 0.0, 1.0).encode(jax.random.key(0), x)
    codes = entropy.quantizer_codes(payload)
    assert codes.shape == (64, 36) and codes.max() <= 15
    coder = entropy.entropy_coder(entropy.fit_categorical(codes, [16] * 36))
    np.testing.assert_array_equal(coder.decode(coder.encode(codes), 64), codes)


def test_coded_bits_callback_under_jit_and_vmap():
    rng = np.random.default_rng(4)
    alphabet = [4] * 10
    codes = _skewed_codes(rng, 3 * 40, alphabet)
    coder = entropy.entropy_coder(entropy.fit_categorical(codes, alphabet))
    f = entropy.coded_bits_callback(coder)
    per_node = codes.reshape(3, 40, 10)
    got = jax.jit(jax.vmap(f))(jnp.asarray(per_node))
    assert got.dtype == jnp.int32
    assert [int(v) for v in got] == [coder.bits(coder.encode(c)) for c in per_node]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="codes must have shape"):
        entropy.fit_categorical(np.zeros((3, 2), np.int32), [4])
    with pytest.raises(ValueError, match="codes must lie in"):
        entropy.fit_categorical(np.full((3, 1), 4, np.int32), [4])
    with pytest.raises(ValueError, match="alphabet must be"):
        entropy.fit_categorical(np.zeros((3, 1), np.int32), [0])
    with pytest.raises(ValueError, match="model must come from fit_categorical"):
        entropy.entropy_coder(Payload(arrays={"freq": jnp.ones(3, jnp.uint16)}))
