"""QSGD's Elias coding: the omega code by hand, the stream decodes to the message, and the ledger's
count is the stream's length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdata.codecs import compressors, elias
from qdata.config import make_compressor


def test_omega_codes_by_hand():
    # Elias (1975), table of the omega code.
    table = {1: "0", 2: "100", 3: "110", 4: "101000", 7: "101110", 8: "1110000", 16: "10100100000",
             100: "1011011001000"}
    for n, code in table.items():
        assert elias.omega_bits(n) == code
        assert int(elias.omega_length(jnp.asarray([n]))[0]) == len(code)
        assert elias.read_omega(code + "1", 0) == (n, len(code))
    with pytest.raises(ValueError, match=">= 1"):
        elias.omega_bits(0)
    with pytest.raises(ValueError, match="ends inside"):
        elias.read_omega("10", 0)


@given(st.integers(1, 2**31 - 1))
def test_omega_length_is_the_code_length(n):
    assert int(elias.omega_length(jnp.asarray([n], jnp.int32))[0]) == len(elias.omega_bits(n))


def test_a_tiny_message_by_hand():
    """x = (0, 3, 0, -4), one bucket, s = 1: ||x|| = 5, r = (0, 0.6, 0, 0.8). Whatever the draw, the
    levels are 0 or 1; with both entries at level 1: norm 32 + omega(3) 3 + entry 2 (gap 2: 3 bits,
    sign 1, level 1: 1 bit = 5) + entry 4 (gap 2: 5) = 45 bits."""
    c = compressors.qsgd(1, coding="elias")
    x = jnp.asarray([0.0, 3.0, 0.0, -4.0])
    for seed in range(50):
        payload, _ = c.encode(jax.random.PRNGKey(seed), x, c.init(x))
        levels = np.asarray(c.decode(payload)) != 0
        nnz = int(levels.sum())
        data, nbits = elias.encode_qsgd(payload)
        assert nbits == int(c.bits(payload)) == len(data) * 8 - (-nbits % 8)
        if nnz == 2:
            assert nbits == 45
        if nnz == 0:
            assert nbits == 33  # the norm and omega(1)


# A few shapes, so that the compiled encoders are reused across examples; 8 examples (each compiles
# its count, about 3 s): every code length is checked for all n by the omega test above.
@settings(max_examples=8)
@given(st.sampled_from([1, 5, 64, 700, 3000]), st.sampled_from([1, 2, 8, 100]), st.sampled_from([None, 7, 512]),
       st.integers(0, 2**16))
def test_stream_decodes_to_the_message_and_its_length_is_charged(d, s, bucket, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=d) * (rng.random(d) < 0.7), jnp.float32)
    c = compressors.qsgd(s, bucket_size=bucket, coding="elias")
    payload, _ = c.encode(jax.random.PRNGKey(seed), x, c.init(x))
    data, nbits = elias.encode_qsgd(payload)
    assert int(jax.jit(c.bits)(payload)) == nbits
    norms, levels, signs = elias.decode_qsgd(data, nbits, payload.meta)
    np.testing.assert_array_equal(norms, np.asarray(payload.arrays["norms"]))
    codes = np.asarray(compressors.base.unpack_codes(payload.arrays["codes"], payload.meta.width, d))
    np.testing.assert_array_equal(levels, codes >> 1)
    np.testing.assert_array_equal(signs[levels > 0], (codes & 1)[levels > 0])
    # Same message as the fixed-length coding: only the charge differs.
    fixed = compressors.qsgd(s, bucket_size=bucket)
    same, _ = fixed.encode(jax.random.PRNGKey(seed), x, fixed.init(x))
    np.testing.assert_array_equal(np.asarray(fixed.decode(same)), np.asarray(c.decode(payload)))


def test_a_truncated_stream_is_refused():
    c = compressors.qsgd(4, coding="elias")
    x = jnp.linspace(-1.0, 1.0, 64)
    payload, _ = c.encode(jax.random.PRNGKey(0), x, c.init(x))
    data, nbits = elias.encode_qsgd(payload)
    with pytest.raises(ValueError):
        elias.decode_qsgd(data[:-2], nbits - 16, payload.meta)


def test_elias_is_cheaper_than_fixed_at_few_levels_and_the_spec_builds_it():
    x = jax.random.normal(jax.random.PRNGKey(1), (100_000,))
    for s in (1, 2):
        fixed, coded = make_compressor(f"qsgd:{s}:512", x.size), make_compressor(f"qsgd_elias:{s}:512", x.size)
        payload, _ = coded.encode(jax.random.PRNGKey(0), x, coded.init(x))
        assert int(coded.bits(payload)) < fixed.bits(payload)
    with pytest.raises(ValueError, match="coding"):
        compressors.qsgd(4, coding="huffman")


def test_every_truncation_and_byte_flip_is_refused_or_decodes_never_crashes():
    # Issue 12 item 2: the host decoder checks what it reads (a ValueError, never an IndexError).
    c = compressors.qsgd(4, bucket_size=16, coding="elias")
    x = jnp.asarray(np.random.default_rng(0).normal(size=50), jnp.float32)
    payload, _ = c.encode(jax.random.PRNGKey(0), x, c.init(x))
    data, nbits = elias.encode_qsgd(payload)
    for cut in range(nbits):
        with pytest.raises(ValueError):
            elias.decode_qsgd(data[:(cut + 7) // 8], cut, payload.meta)
    with pytest.raises(ValueError, match="a truncated stream"):
        elias.decode_qsgd(data[:-1], nbits, payload.meta)
    for at in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[at] ^= 1 << bit
            try:
                elias.decode_qsgd(bytes(damaged), nbits, payload.meta)
            except ValueError:
                pass
