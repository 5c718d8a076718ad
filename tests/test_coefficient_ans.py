"""Adaptive ANS of transform codes (qdata.codecs.coefficient_ans, issue 10): the charged stream decodes
to exactly the coefficient codes the learner reads, truncated coefficients cost nothing, both ends keep
the same counts, and training is exactly that of fixed-length codes for fewer data bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdata import data
from qdata.codecs import coefficient_ans as coa
from qdata.codecs import quantizers
from qdata.codecs.data_codec import from_quantizer
from qdata.codecs.ledger import host_total
from qdata.codecs.transform_codec import coefficient_codes, transform_codec
from qdata.config import RunConfig
from qdata.methods.qdata import sample_codec
from tests.coders import train_both_coders

DIGITS = data.load_dataset("digits")
X_DIGITS = jnp.asarray(DIGITS.to_float(DIGITS.x_train[:400]))  # (400, 8, 8, 1) in [0, 1]


def _synthetic(count=300, shape=(6, 6), seed=0):
    """Smooth 6x6 images (a blurred field): energy in the low frequencies, as in natural images."""
    x = jax.random.uniform(jax.random.PRNGKey(seed), (count,) + shape)
    for axis in (1, 2):
        x = (x + jnp.roll(x, 1, axis=axis) + jnp.roll(x, 2, axis=axis)) / 3
    return x


CASES = {  # name: (samples, sample_bits, basis, rounding)
    "dct-digits": (X_DIGITS, 64, "dct", "stochastic"),
    "pca-digits": (X_DIGITS, 96, "pca", "dither"),
    "dct-6x6": (_synthetic(), 40, "dct", "dither"),
    "pca-6x6": (_synthetic(), 48, "pca", "stochastic"),
}


def _codec(x, sample_bits, basis, rounding):
    shape = tuple(x.shape[1:])
    inner = transform_codec(shape, sample_bits, basis=basis, rounding=rounding)
    return coa.coefficient_ans(inner, shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_charged_stream_decodes_to_the_codes_the_learner_reads(case):
    x, sample_bits, basis, rounding = CASES[case]
    codec = _codec(x, sample_bits, basis, rounding)
    node, learner = codec.fit(codec.init(), x, jnp.int32(x.shape[0])), codec.init()
    rng = np.random.default_rng(7)
    sents = [np.ones(12), rng.integers(0, 2, 12), np.zeros(12), rng.integers(0, 2, 12), np.ones(12)]
    encode = jax.jit(codec.encode)
    for m, sent in enumerate(sents):  # later messages are coded under the counts the earlier ones left
        sent = jnp.asarray(sent, jnp.float32)
        before = np.asarray(node["counts"])
        payload, node = encode(jax.random.PRNGKey(m), x[12 * m: 12 * m + 12], node, sent)
        learner = codec.receive(payload, learner, sent)
        codes, widths = (np.asarray(a) for a in coefficient_codes(payload.inner, node["inner"]))
        assert widths.sum() <= sample_bits and np.any(widths == 0)  # truncated coefficients, 0 bits
        rows = codes[np.asarray(sent) > 0]
        assert np.all(rows < (1 << widths)) and np.all(rows[:, widths == 0] == 0)
        words = coa.encode_words(rows, widths, before)
        assert int(payload.words) == words.size
        np.testing.assert_array_equal(coa.decode_words(words, before, len(rows), widths), rows)
        # The learner holds the node's widths (from the setup of the first message) and its counts.
        _, learner_widths = coefficient_codes(payload.inner, learner["inner"])
        np.testing.assert_array_equal(np.asarray(learner_widths), widths)
        np.testing.assert_array_equal(np.asarray(learner["counts"]), np.asarray(node["counts"]))
        parts = {k: host_total(v) for k, v in codec.bits(payload, sent).items()}
        seed = 32 if rounding == "dither" else 0
        assert parts["data"] == 32 * words.size
        assert parts["metadata"] == seed + (32 if len(rows) else 0)  # the word count, when a stream is sent
        if not len(rows):  # a message with no sent samples: no stream, no word count
            assert words.size == 0 and parts["data"] == 0


def test_counts_grow_by_the_coded_coefficients_only_and_the_model_learns():
    x, sample_bits = _synthetic(), 40
    codec = _codec(x, sample_bits, "dct", "stochastic")
    state = codec.fit(codec.init(), x, jnp.int32(x.shape[0]))
    sent = jnp.ones((32,), jnp.float32).at[5].set(0.0)
    coded = []
    for m in range(6):  # the same samples again and again
        payload, new = jax.jit(codec.encode)(jax.random.PRNGKey(m), x[:32], state, sent)
        _, widths = coefficient_codes(payload.inner, new["inner"])
        assert int(new["counts"].sum() - state["counts"].sum()) == 2 * 31 * int(jnp.sum(widths > 0))
        coded.append(int(payload.words))
        state = new
    # Measured 32 words (0.83 of the fixed-length 31 x 40 bits) after 40 at first: the codes of a
    # coefficient cluster inside its range, which the per-coefficient counts learn.
    assert coded[-1] < coded[0] and 32 * coded[-1] < 0.9 * 31 * sample_bits


def test_the_counts_hold_a_row_per_coded_coefficient_at_most():
    for shape, sample_bits, rows in (((8, 8, 1), 128, 64), ((28, 28, 1), 400, 400), ((32, 32, 3), 400, 400)):
        codec = coa.coefficient_ans(transform_codec(shape, sample_bits, basis="dct"), shape)
        assert codec.init()["counts"].shape == (rows, 256)


def test_training_with_coefficient_ans_is_exactly_fixed_length_training_for_fewer_bits(tmp_path):
    base = RunConfig(dataset="digits", model="mlp", method="qdata", transform="dct", sample_bits=128,
                     quantizer="dither", cache=True, num_nodes=2, batch_size=32, rounds=12, eval_every=6,
                     checkpoint_every=12, lr=0.1)
    records = train_both_coders(base, tmp_path)  # bitwise equal parameters
    assert records["ans"]["test_accuracy"] == records["fixed"]["test_accuracy"]
    fixed, coded = (records[c]["cumulative_uplink_bits"] for c in ("fixed", "ans"))
    for part in ("labels", "positions", "setup"):
        assert coded[part] == fixed[part]
    assert coded["data"] < fixed["data"]


def test_settings_it_cannot_code_are_refused():
    RunConfig(method="qdata", transform="pca", sample_bits=400, quantizer="dither", cache=True, coder="ans")
    with pytest.raises(ValueError, match="quantizer='nearest' with transform='pca'"):
        RunConfig(transform="pca", sample_bits=400, coder="ans", quantizer="nearest")
    with pytest.raises(ValueError, match="needs stream_start=1, faults='none'"):
        RunConfig(transform="dct", sample_bits=400, coder="ans", num_nodes=4, faults="drop:1:0.5")
    with pytest.raises(ValueError, match="bits=12 is used only with method='qdata' and transform='none'"):
        RunConfig(transform="dct", sample_bits=400, coder="ans", bits=12)
    with pytest.raises(ValueError, match="codes the coefficient codes of a transform codec"):
        coa.coefficient_ans(from_quantizer(quantizers.stochastic_rounding(4, 0.0, 1.0)), (4, 4))
    with pytest.raises(ValueError, match="needs sample_shape"):
        sample_codec(transform_codec((4, 4), 16), num_classes=10, coder="ans")
