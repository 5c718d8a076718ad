"""The adaptive context-model ANS coder of data codes (qdata.codecs.context_ans): what is charged is the
length of a stream that decodes to the codes the learner reads, both ends keep the same model, and the
training is exactly that of fixed-length codes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qdata.codecs import context_ans as ca
from qdata.codecs import quantizers
from qdata.codecs.data_codec import from_quantizer
from qdata.codecs.ledger import host_total
from qdata.codecs.packing import unpack_codes
from qdata.config import RunConfig
from qdata.methods.qdata import sample_codec
from tests.coders import train_both_coders


def _codec(bits, shape):
    return ca.context_ans(from_quantizer(quantizers.stochastic_rounding(bits, 0.0, 1.0)), bits, shape)


def _smooth(key, b, shape):
    """Samples with the spatial structure of images (a blurred field), so that contexts matter."""
    x = jax.random.uniform(key, (b,) + shape)
    for axis in range(1, min(3, x.ndim)):
        x = (x + jnp.roll(x, 1, axis=axis) + jnp.roll(x, 2, axis=axis)) / 3
    return x


def _codes(payload, bits, n):
    return np.asarray(unpack_codes(payload.inner.rows["codes"], bits, n))


@settings(max_examples=8, deadline=None)  # each example compiles its coder (a few seconds)
@given(bits=st.integers(1, 8), shape=st.sampled_from([(12,), (5, 6), (4, 3, 2)]), b=st.sampled_from([1, 5]),
       seed=st.integers(0, 2**16), messages=st.integers(1, 3))
def test_the_charged_stream_decodes_to_the_codes_the_learner_reads(bits, shape, b, seed, messages):
    codec, n = _codec(bits, shape), math.prod(shape)
    node, learner = codec.init(), codec.init()
    rng = np.random.default_rng(seed)
    for m in range(messages):  # later messages are coded under the counts the earlier ones left
        sent = jnp.asarray(rng.integers(0, 2, b), jnp.float32)
        x = _smooth(jax.random.PRNGKey(seed + m), b, shape)
        before = np.asarray(node["counts"])
        payload, node = jax.jit(codec.encode)(jax.random.PRNGKey(m), x, node, sent)
        rows = _codes(payload, bits, n)[np.asarray(sent) > 0]
        words = ca.encode_words(rows, before, shape, bits)
        assert int(payload.words) == words.size
        np.testing.assert_array_equal(ca.decode_words(words, before, len(rows), shape, bits), rows)
        learner = codec.receive(payload, learner, sent)
        np.testing.assert_array_equal(np.asarray(learner["counts"]), np.asarray(node["counts"]))
        parts = {k: host_total(v) for k, v in codec.bits(payload, sent).items()}
        assert parts["data"] == 32 * words.size
        assert parts["metadata"] == (32 if len(rows) else 0)  # the word count, when a stream is sent


def test_counts_grow_by_the_sent_codes_and_the_model_learns():
    codec, shape, bits = _codec(4, (8, 8)), (8, 8), 4
    state = codec.init()
    sent = jnp.ones((16,), jnp.float32).at[3].set(0.0)
    coded = []
    for m in range(6):
        payload, new = jax.jit(codec.encode)(jax.random.PRNGKey(m), _smooth(jax.random.PRNGKey(9), 16, shape),
                                             state, sent)
        assert int(new["counts"].sum() - state["counts"].sum()) == 2 * 15 * 64
        coded.append(int(payload.words))
        state = new
    # The same smooth samples again and again: the adaptive model codes them in ever fewer words,
    # well under the fixed-length 15 * 64 * 4 bits.
    assert coded[-1] < coded[0] and 32 * coded[-1] < 0.6 * 15 * 64 * 4


def test_a_full_context_is_halved_and_stays_odd():
    codec = _codec(2, (3, 3))
    state = codec.init()
    state["counts"] = state["counts"].at[0].set(ca.RESCALE_AT // 4 + 1)  # the row sums past the limit
    payload, new = jax.jit(codec.encode)(jax.random.PRNGKey(0), jnp.zeros((2, 3, 3)), state, jnp.ones((2,)))
    old, adds = np.asarray(state["counts"][0]), np.zeros(4, np.int64)
    adds[0] = 2 * 2 * 9  # two blank samples: every code 0, every context 0
    np.testing.assert_array_equal(np.asarray(new["counts"][0]), ((old + adds) >> 1) | 1)
    np.testing.assert_array_equal(np.asarray(new["counts"][1:]), np.asarray(state["counts"][1:]))  # untouched
    assert int(new["counts"][0].sum()) <= ca.RESCALE_AT and np.all(np.asarray(new["counts"]) % 2 == 1)
    learner = codec.receive(payload, codec.init() | {"counts": state["counts"]}, jnp.ones((2,)))
    np.testing.assert_array_equal(np.asarray(learner["counts"]), np.asarray(new["counts"]))


def test_each_node_is_coded_under_its_own_counts_under_vmap():
    codec, shape = _codec(3, (6, 6)), (6, 6)
    states = jax.vmap(lambda _: codec.init())(jnp.arange(3))
    states["counts"] = states["counts"].at[1, :, 0].add(400)  # node 1 has learnt that 0 is likely
    x = jax.vmap(lambda k: _smooth(k, 4, shape))(jax.random.split(jax.random.PRNGKey(1), 3))
    sent = jnp.ones((3, 4))
    payloads, _ = jax.jit(jax.vmap(codec.encode))(jax.random.split(jax.random.PRNGKey(2), 3), x, states, sent)
    for i in range(3):
        codes = np.asarray(unpack_codes(payloads.inner.rows["codes"][i], 3, 36))
        assert int(payloads.words[i]) == ca.encode_words(codes, states["counts"][i], shape, 3).size
    codes = np.asarray(unpack_codes(payloads.inner.rows["codes"][1], 3, 36))
    assert ca.encode_words(codes, states["counts"][0], shape, 3).size != int(payloads.words[1])

def test_ans_training_is_exactly_fixed_length_training_for_fewer_bits(tmp_path):
    base = RunConfig(dataset="digits", method="qdata", bits=4, cache=True, num_nodes=4, rounds=12, eval_every=6,
                     checkpoint_every=12, lr=0.1)
    records = train_both_coders(base, tmp_path)  # bitwise equal parameters
    fixed, coded = (records[c]["cumulative_uplink_bits"] for c in ("fixed", "ans"))
    assert coded["labels"] == fixed["labels"] and coded["positions"] == fixed["positions"]
    assert coded["data"] < 0.9 * fixed["data"]


def test_bad_coder_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="coder must be one of"):
        RunConfig(coder="zip")
    with pytest.raises(ValueError, match="B <= 8"):
        RunConfig(coder="ans", bits=12)
    with pytest.raises(ValueError, match="coder='ans' is used only with method='qdata'"):
        RunConfig(method="sgd", coder="ans")
    with pytest.raises(ValueError, match="needs integrity=true"):
        RunConfig(coder="ans", num_nodes=4, faults="corrupt:1:0.5")
    RunConfig(coder="ans", num_nodes=4, faults="corrupt:1:0.5", integrity=True)
    with pytest.raises(ValueError, match="bits must be"):
        _codec(9, (4, 4))
    with pytest.raises(ValueError, match="coder must be one of"):
        sample_codec(quantizers.stochastic_rounding(4, 0.0, 1.0), num_classes=10, sample_shape=(4,), coder="png")
    with pytest.raises(ValueError, match="needs sample_shape"):
        sample_codec(quantizers.stochastic_rounding(4, 0.0, 1.0), num_classes=10, coder="ans")


def test_blank_samples_code_to_no_words_and_decode_back():
    # ANS starts at state 0 and codes a run of symbol 0 in no words: a valid, empty stream.
    counts = np.ones((ca.num_contexts(2), 4), np.int32)
    words = ca.encode_words(np.zeros((3, 4), np.int32), counts, (2, 2), 2)
    assert words.size == 0
    np.testing.assert_array_equal(ca.decode_words(words, counts, 3, (2, 2), 2), np.zeros((3, 4), np.int32))


def test_compare_refuses_faulty_runs_it_would_table_wrongly():
    from qdata.lineup import load_lineup, with_overrides

    with pytest.raises(ValueError, match="faults are set for"):
        with_overrides(load_lineup("compare_digits_ans.toml"), {"faults": "drop:1:0.5"})
