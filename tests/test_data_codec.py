"""The data codec contract: the quantizer adapter, joint codecs, the cache wrapper, streams, correction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdata.codecs import fp32, stochastic_rounding, subtractive_dither
from qdata.codecs.cache import learner_cache
from qdata.codecs.data_codec import from_quantizer, joint
from qdata.codecs.labels import class_labels, real_targets
from qdata.codecs.payloads import Payload, Quantizer, payload_bits
from qdata.codecs.streams import code_stream, read_stream, stream_bits, value_stream
from qdata.correction import correction, no_correction

B, N = 6, 10
SENT = jnp.asarray([1, 0, 1, 1, 0, 1], jnp.float32)


def _x(seed=0):
    return jax.random.uniform(jax.random.key(seed), (B, N))


def _identity_quantizer() -> Quantizer:
    """A toy Quantizer written against the stateless contract only: 8-bit nearest codes on [0, 1]."""

    def encode(key, x):
        del key
        return Payload(rows={"codes": jnp.round(x * 255).astype(jnp.uint8)})

    def decode(payload):
        return payload.rows["codes"].astype(jnp.float32) / 255

    return Quantizer(encode=encode, decode=decode, bits=payload_bits)


def test_adapter_zeroes_unsent_rows_and_charges_only_sent_ones():
    codec = from_quantizer(stochastic_rounding(4, 0.0, 1.0))
    payload, state = codec.encode(jax.random.key(1), _x(), codec.init(), SENT)
    assert state == codec.init()
    assert not np.any(np.asarray(payload.rows["codes"])[np.asarray(SENT) == 0])
    x_hat = np.asarray(codec.decode(payload, state, SENT))
    assert np.all(x_hat[np.asarray(SENT) == 0] == 0)
    assert np.all(np.abs(x_hat - np.asarray(_x()))[np.asarray(SENT) > 0] <= 1 / 15 + 1e-6)
    bits = codec.bits(payload, SENT)
    assert int(bits["data"]) == 4 * 8 * (N * 4 // 8) and int(bits["metadata"]) == 0
    np.testing.assert_array_equal(codec.decode_rows(payload, codec.rows(payload, SENT), state, SENT), x_hat)


def test_a_stateless_quantizer_plugs_into_the_cache():
    """Any Quantizer becomes a cacheable data codec: a held sample costs nothing but its position."""
    codec = learner_cache(from_quantizer(_identity_quantizer()), 8, jax.ShapeDtypeStruct((1, N), jnp.float32))
    node, learner = codec.init(), codec.init()
    pos = jnp.asarray([0, 1, 2, 2, 4, 5], jnp.int32)  # position 2 sent twice: its codes travel once
    payload, node = codec.encode(jax.random.key(0), _x(), node, SENT, pos)
    learner = codec.receive(payload, learner, SENT)
    bits = codec.bits(payload, SENT)
    assert int(bits["data"]) == 3 * 8 * N  # rows 0, 2 and 5 are fresh
    np.testing.assert_array_equal(codec.decode(payload, node, SENT), codec.decode(payload, learner, SENT))
    np.testing.assert_array_equal(np.asarray(node.held), np.asarray(learner.held))
    # The same positions again: only positions and the fresh bitmap cross the link.
    again, node = codec.encode(jax.random.key(1), _x(1), node, SENT, pos)
    bits = codec.bits(again, SENT)
    assert int(bits["data"]) == 0 and int(bits["positions"]) == 8 * -(-4 * 3 // 8) + 8
    learner = codec.receive(again, learner, SENT)
    np.testing.assert_array_equal(codec.decode(again, learner, SENT), codec.decode(payload, learner, SENT))


def test_cache_needs_positions_and_refuses_side_information():
    codec = learner_cache(from_quantizer(_identity_quantizer()), 8, jax.ShapeDtypeStruct((1, N), jnp.float32))
    with pytest.raises(ValueError, match="pos"):
        codec.encode(jax.random.key(0), _x(), codec.init(), SENT)
    with pytest.raises(ValueError, match="seed"):
        learner_cache(from_quantizer(subtractive_dither(4, 0.0, 1.0)), 8, jax.ShapeDtypeStruct((1, N), jnp.float32))


def test_joint_codec_keeps_the_first_codecs_randomness_and_merges_parts():
    q = stochastic_rounding(2, 0.0, 1.0)
    codec = joint(x=from_quantizer(q), y=class_labels(5))
    y = jnp.asarray([4, 0, 3, 1, 2, 2], jnp.int32)
    payload, state = codec.encode(jax.random.key(3), {"x": _x(), "y": y}, codec.init(), SENT)
    alone, _ = from_quantizer(q).encode(jax.random.key(3), _x(), (), SENT)
    np.testing.assert_array_equal(payload["x"].rows["codes"], alone.rows["codes"])
    view = codec.decode(payload, state, SENT)
    np.testing.assert_array_equal(view["y"], np.where(np.asarray(SENT) > 0, np.asarray(y), 0))
    assert set(codec.bits(payload, SENT)) == {"data", "metadata", "labels"}
    assert int(codec.bits(payload, SENT)["labels"]) == 8 * -(-4 * 3 // 8)


@pytest.mark.parametrize("width", [1, 3, 8, 10, 16])
def test_code_stream_carries_its_count_and_reads_back(width):
    codes = jnp.asarray(np.random.default_rng(width).integers(0, 2**width, B), jnp.int32)
    stream = code_stream(codes, SENT, width)
    assert int(stream.count) == 4
    word = {8: 8, 16: 16}.get(width, 8)
    assert int(stream_bits(stream)) == -(-4 * width // word) * word
    np.testing.assert_array_equal(read_stream(stream, SENT), np.where(np.asarray(SENT) > 0, np.asarray(codes), 0))


@pytest.mark.parametrize("dtype,width", [(jnp.float32, 32), (jnp.float16, 16)])
def test_value_stream_and_real_targets(dtype, width):
    y = jnp.linspace(-3.0, 3.0, B).astype(dtype)
    stream = value_stream(y, SENT)
    assert int(stream_bits(stream)) == 4 * width
    codec = real_targets(dtype)
    payload, state = codec.encode(None, jnp.linspace(-3.0, 3.0, B), codec.init(), SENT)
    out = codec.decode(payload, state, SENT)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, np.where(np.asarray(SENT) > 0, np.asarray(y), 0))


def test_correction_is_the_compressed_gradient_difference():
    def loss_fn(w, x, y):
        return jnp.sum((x * w - y[:, None]) ** 2, axis=1)

    w, x, y, a = jnp.ones((N,)), _x(), jnp.zeros((B,)), SENT
    x_hat = jnp.round(x * 4) / 4
    corr = correction(loss_fn, fp32())
    payload, _ = corr.encode(jax.random.key(0), w, x, y, x_hat, y, a, corr.init(w))
    grad = jax.grad(lambda w, x: jnp.sum(a * loss_fn(w, x, y)) / B)
    np.testing.assert_allclose(corr.decode(payload), grad(w, x) - grad(w, x_hat), rtol=1e-5, atol=1e-6)
    assert corr.bits(payload) == 32 * N
    none = no_correction()
    payload, _ = none.encode(None, w, x, y, x_hat, y, a, none.init(w))
    assert none.decode(payload) is None and none.bits(payload) == 0


def test_a_transform_code_plugs_into_the_estimator_and_its_cache():
    """A new Quantizer (the DCT/PCA transform code) needs no estimator change: through the adapter
    its code rows are charged as 'data', and the cache sends a held sample as its position alone."""
    from qdata.codecs import transform_codes as tc
    from qdata.methods.qdata import qdata_estimator
    from tests.one_node import one_node_gradient

    shard = jax.random.uniform(jax.random.key(5), (32, N))
    setup = tc.fit_transform_code(np.asarray(shard), 24, basis="pca")
    q = tc.transform_code(setup)

    def loss_fn(w, x, y):
        logits = x @ w
        return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]

    w = jnp.zeros((N, 3))
    est = qdata_estimator(loss_fn, q, num_classes=3, correction=fp32(), cache_size=32, sample_shape=(N,))
    pos = jnp.arange(B, dtype=jnp.int32)
    batch = {"x": shard[pos], "y": pos % 3, "pos": pos}
    msg, node = est.node_message(jax.random.key(0), w, batch, est.init(w))
    row_bits = payload_bits(Payload(rows={"codes": msg.samples.inner["x"].rows["codes"][:1]}))
    assert int(est.uplink_bits(msg)["data"]) == B * row_bits
    g, learner = one_node_gradient(est, w, msg)
    full = jax.grad(lambda w: jnp.mean(loss_fn(w, batch["x"], batch["y"])))(w)
    np.testing.assert_allclose(g, full, rtol=1e-4, atol=1e-6)  # exact correction: g is the full gradient
    again, node = est.node_message(jax.random.key(1), w, batch, node)
    assert int(est.uplink_bits(again)["data"]) == 0 and int(est.uplink_bits(again)["labels"]) == 0
    g2, _ = one_node_gradient(est, w, again, learner)
    np.testing.assert_allclose(g2, full, rtol=1e-4, atol=1e-6)
