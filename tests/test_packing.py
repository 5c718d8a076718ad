"""Bit packing (packing.pack_codes / unpack_codes) and the exact bit count (payloads.payload_bits)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from qdata.codecs import packing, payloads
from qdata.codecs.payloads import Payload

WIDTHS = list(range(1, 17)) + [32]


def _codes(seed: int, shape: tuple, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**width, size=shape, dtype=np.uint64).astype(np.uint32)


def _check_round_trip(codes: np.ndarray, width: int) -> None:
    *lead, count = codes.shape
    packed = jax.jit(packing.pack_codes, static_argnums=1)(jnp.asarray(codes), width)
    # The stream is what would be sent: ceil(count * width / 8) bytes per row, in whole words for
    # 8/16/32-bit codes and in bytes otherwise.
    assert packed.shape == (*lead, packing.packed_size(count, width))
    assert packed.dtype == packing.code_dtype(width)
    assert packed.shape[-1] * packed.dtype.itemsize == math.ceil(count * width / 8)
    assert payloads.array_bits(packed) == math.prod(lead) * 8 * math.ceil(count * width / 8)
    back = jax.jit(packing.unpack_codes, static_argnums=(1, 2))(packed, width, count)
    assert back.dtype == jnp.uint32 and back.shape == codes.shape
    np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("width", WIDTHS)
def test_round_trip_every_width(width):
    # 37 codes: not a multiple of any group size, so every width needs padding somewhere.
    _check_round_trip(_codes(width, (2, 3, 37), width), width)
    _check_round_trip(_codes(width + 100, (1,), width), width)


@given(width=st.sampled_from(WIDTHS), count=st.integers(1, 40), lead=st.lists(st.integers(1, 3), max_size=2),
       seed=st.integers(0, 2**31))
def test_round_trip_random_shapes(width, count, lead, seed):
    _check_round_trip(_codes(seed, (*lead, count), width), width)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 12])
def test_padding_bits_are_zero(width):
    # A deterministic stream: the padding of the last byte carries no stray bits.
    count = 8 * 3 + 1
    codes = jnp.full((2, count), 2**width - 1, jnp.uint32)
    packed = np.asarray(packing.pack_codes(codes, width))
    used = count * width - 8 * (packed.shape[-1] - 1)
    assert np.all(packed[:, -1] == (1 << used) - 1)


@pytest.mark.parametrize("width", [1, 3, 4, 8, 11, 16])
def test_pack_under_jit_and_vmap(width):
    codes = jnp.asarray(_codes(width, (3, 2, 13), width))
    packed = jax.jit(jax.vmap(lambda c: packing.pack_codes(c, width)))(codes)
    np.testing.assert_array_equal(packed, packing.pack_codes(codes, width))
    back = jax.jit(lambda p: packing.unpack_codes(p, width, 13))(packed)
    np.testing.assert_array_equal(back, codes)


def test_pack_rejects_bad_width():
    with pytest.raises(ValueError, match="width"):
        packing.pack_codes(jnp.zeros((2, 3), jnp.uint32), 0)
    with pytest.raises(ValueError, match="width"):
        packing.pack_codes(jnp.zeros((2, 3), jnp.uint32), 33)


@given(b=st.integers(1, 6), row_bytes=st.integers(1, 9), fixed_words=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_payload_bits_with_and_without_mask(b, row_bytes, fixed_words, seed):
    rng = np.random.default_rng(seed)
    payload = Payload(
        arrays={"seed": jnp.zeros((fixed_words,), jnp.uint32)},
        rows={"codes": jnp.zeros((b, row_bytes), jnp.uint8), "lo": jnp.zeros((b,), jnp.float16)},
    )
    per_row = 8 * row_bytes + 16
    fixed = 32 * fixed_words
    total = payloads.payload_bits(payload)
    assert isinstance(total, int) and total == fixed + b * per_row
    leaves = jax.tree_util.tree_leaves((payload.arrays, payload.rows))
    assert total == sum(l.size * l.dtype.itemsize * 8 for l in leaves)
    mask = rng.integers(0, 2, size=b)
    sent = payloads.payload_bits(payload, jnp.asarray(mask))
    assert int(sent) == fixed + int(mask.sum()) * per_row
    assert int(jax.jit(payloads.payload_bits)(payload, jnp.asarray(mask))) == int(sent)
    assert int(payloads.payload_bits(payload, jnp.zeros(b))) == fixed
    assert int(payloads.payload_bits(payload, jnp.ones(b))) == total


def test_payload_bits_ignores_meta_and_info():
    payload = Payload(rows={"codes": jnp.zeros((2, 3), jnp.uint8)}, meta=("anything", 123),
                      info={"clipped": jnp.int32(7)})
    assert payloads.payload_bits(payload) == 2 * 3 * 8


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("count", [1, 5, 8, 13, 64])
def test_sub_byte_layout_matches_reference(width, count):
    # The wire layout, independently of pack/unpack agreeing with each other: code i of a row sits
    # in byte (i * width) // 8 at bit offset (i * width) % 8 (little-endian within the byte).
    codes = _codes(count + width, (3, count), width)
    expect = np.zeros((3, math.ceil(count * width / 8)), np.uint8)
    for i in range(count):
        expect[:, (i * width) // 8] |= (codes[:, i] << ((i * width) % 8)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(packing.pack_codes(jnp.asarray(codes), width)), expect)
    back = jax.jit(packing.unpack_codes, static_argnums=(1, 2))(jnp.asarray(expect), width, count)
    np.testing.assert_array_equal(np.asarray(back), codes)


@given(width=st.sampled_from([1, 2, 4, 8, 3, 16]), words_per_row=st.integers(1, 5), rows=st.integers(1, 3),
       extra=st.sampled_from([0, 1]), seed=st.integers(0, 2**31))
def test_words_container_is_the_same_bit_stream(width, words_per_row, rows, extra, seed):
    # pack_codes(words=True): rows that fill whole uint32 words are stored as such; viewed as
    # little-endian bytes they are the byte stream, bit for bit, with the same size; other rows (a
    # code more, or a width that does not divide 32) are packed as without it.
    count = words_per_row * 32 // width + extra if 32 % width == 0 else 5 * words_per_row
    codes = _codes(seed, (rows, count), width)
    plain = np.asarray(packing.pack_codes(jnp.asarray(codes), width))
    flags = np.zeros(codes.shape, bool)
    flags[-1, -1] = seed % 2 == 0
    words, hit = packing.pack_codes(jnp.asarray(codes), width, jnp.asarray(flags), words=True)
    assert bool(hit) == bool(flags.any())
    assert words.shape == (rows, packing.packed_size(count, width, words=True))
    if packing.word_packable(count, width):
        assert words.dtype == jnp.uint32
        as_bytes = np.asarray(words).astype("<u4").view(np.uint8).reshape(rows, -1)
        np.testing.assert_array_equal(as_bytes, plain.view(np.uint8).reshape(rows, -1))
    else:
        np.testing.assert_array_equal(np.asarray(words), plain)
    assert payloads.array_bits(words) == payloads.array_bits(plain)
    np.testing.assert_array_equal(np.asarray(packing.unpack_codes(words, width, count)), codes)
    np.testing.assert_array_equal(np.asarray(jax.jit(packing.unpack_codes, static_argnums=(1, 2))(words, width, count)),
                                  codes)


def test_words_container_refuses_a_wrong_count():
    words = packing.pack_codes(jnp.zeros((2, 16), jnp.uint32), 4, words=True)
    with pytest.raises(ValueError, match="do not hold"):
        packing.unpack_codes(words, 4, 15)
