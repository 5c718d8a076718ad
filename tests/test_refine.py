"""Refinement of cached samples (qdata.codecs.refine): residuals shrink the error bound by rho each
time, each refinement is unbiased, both ends keep the same reconstruction, and a refined sample costs
exactly its residual codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdata.run as qrun
from qdata.codecs import per_sample_range, stochastic_rounding
from qdata.config import RunConfig
from qdata.methods.qdata import sample_codec

B, N, C, SHARD = 12, 10, 5, 20
BITS, REFINE_BITS, MOST = 2, 3, 4
DELTA, RHO = 1.0 / (2**BITS - 1), 2.0 / (2**REFINE_BITS - 1)


def _codec(refine=(REFINE_BITS, MOST)):
    return sample_codec(stochastic_rounding(BITS, 0.0, 1.0), num_classes=C, cache_size=SHARD, sample_shape=(N,),
                        refine=refine)


def _shard():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.random((SHARD, N)), jnp.float32), jnp.asarray(rng.integers(0, C, SHARD), jnp.int32)


def _send(codec, key, node, learner, pos, sent=None):
    sx, sy = _shard()
    pos = jnp.asarray(pos, jnp.int32)
    sent = jnp.ones(pos.shape, jnp.float32) if sent is None else jnp.asarray(sent, jnp.float32)
    payload, node = codec.encode(key, {"x": sx[pos], "y": sy[pos]}, node, sent, pos)
    learner = codec.receive(payload, learner, sent)
    return payload, node, learner, sent


def test_residuals_shrink_the_bound_by_rho_both_ends_agree_and_refinement_stops_at_most():
    codec, (sx, _) = _codec(), _shard()
    node = learner = codec.init()
    pos = np.arange(B) % 7  # duplicates: only the first copy of a position is refined
    step = jax.jit(lambda k, n, l: _send(codec, k, n, l, pos)[:3])
    for t in range(MOST + 2):
        payload, node, learner = step(jax.random.PRNGKey(t), node, learner)
        k = min(t, MOST)
        np.testing.assert_array_equal(np.asarray(node.level)[:7], k)
        np.testing.assert_array_equal(node.x, learner.x)
        error = np.abs(np.asarray(node.x)[:7] - np.asarray(sx)[:7])
        assert error.max() <= DELTA * RHO**k + 1e-6, (t, error.max())
        sent = jnp.ones(B)
        decoded = np.asarray(codec.decode(payload, learner, sent)["x"])
        np.testing.assert_array_equal(decoded, np.asarray(node.x)[pos])
    assert int(np.asarray(node.level)[7:].max()) == 0  # positions never sent are never refined
    # Not vacuous: after MOST refinements the error is far under the first code's step.
    assert error.max() < DELTA / 10


def test_a_refined_sample_costs_exactly_its_residual_codes_and_the_bitmap():
    codec = _codec()
    node = learner = codec.init()
    pos = np.arange(B) % 7
    sent = (np.arange(B) != 3).astype(np.float32)  # position 3 sent only in its second copy (index 10)
    per_row = 8 * -(-N * REFINE_BITS // 8)
    payload, node, learner, s = _send(codec, jax.random.PRNGKey(0), node, learner, pos, sent)
    first = codec.bits(payload, s)
    assert int(first["refine"]) == 8 * -(-B // 8)  # the bitmap alone: nothing was held
    payload, node, learner, s = _send(codec, jax.random.PRNGKey(1), node, learner, pos, sent)
    second = codec.bits(payload, s)
    assert int(second["data"]) == 0 and int(second["labels"]) == 0
    assert int(second["refine"]) == 8 * -(-B // 8) + 7 * per_row  # the 7 held positions, once each
    # The bits are those of the arrays that would be sent: the refined rows' packed codes.
    codes = np.asarray(payload.codes)
    refined = [0, 1, 2, 4, 5, 6, 10]  # the first sent copy of each held position
    assert codes.shape == (B, per_row // 8) and not np.delete(codes, refined, axis=0).any()


def test_each_refinement_is_unbiased_within_its_variance():
    codec, (sx, _) = _codec(refine=(2, 1)), _shard()
    pos = np.arange(4)
    _, held, _, _ = _send(codec, jax.random.PRNGKey(0), codec.init(), codec.init(), pos)

    def refined(key):
        return _send(codec, key, held, held, pos)[1].x[:4]

    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    x1 = np.asarray(jax.jit(jax.vmap(refined))(keys), np.float64)
    x0, x = np.asarray(held.x[:4], np.float64), np.asarray(sx[:4], np.float64)
    s = 2 * DELTA / 3  # the residual's step at 2 bits: the variance of a coordinate is at most s^2 / 4
    np.testing.assert_array_less(np.abs(x1.mean(axis=0) - x), 5 * (s / 2) / np.sqrt(len(keys)) + 1e-6)
    # Not vacuous: the residual moved the samples, and the bound shrank from DELTA to s.
    assert np.abs(x0 - x).max() > s and np.abs(x1 - x).max() <= s + 1e-6


@pytest.mark.parametrize("change, needs", [
    (dict(cache=False), "cache=False"),
    (dict(quantizer="per_sample"), "quantizer='per_sample'"),
    (dict(cache=True, transform="dct", sample_bits=64, quantizer="stochastic", bits=4), "transform='dct'"),
    (dict(faults="drop:1:0.5"), "faults='drop:1:0.5'"),
])
def test_refinement_is_refused_where_it_cannot_hold(change, needs):
    setting = dict(method="qdata", cache=True, refine_bits=2, num_nodes=4)
    with pytest.raises(ValueError, match="refine_bits=2") as err:
        RunConfig(**{**setting, **change})
    assert needs in str(err.value)


@pytest.mark.parametrize("kwargs, says", [
    (dict(refine_bits=1, cache=True), "refine_bits"), (dict(refine_bits=17, cache=True), "refine_bits"),
    (dict(refine_bits=2, refine_max=0, cache=True), "refine_max"),
    (dict(refine_bits=2, refine_max=65, cache=True), "refine_max"), (dict(refine_max=3), "refine_max"),
])
def test_bad_refine_values_are_refused(kwargs, says):
    with pytest.raises(ValueError, match=says):
        RunConfig(method="qdata", **kwargs)


def test_the_library_refuses_refinement_without_a_cache_or_a_dataset_wide_step():
    with pytest.raises(ValueError, match="cache_size"):
        sample_codec(stochastic_rounding(2, 0.0, 1.0), num_classes=C, sample_shape=(N,), refine=(2, 1))
    with pytest.raises(ValueError, match="dataset-wide step"):
        sample_codec(per_sample_range(2), num_classes=C, cache_size=SHARD, sample_shape=(N,), refine=(2, 1))


def test_training_with_refinement_charges_the_refine_part(tmp_path):
    config = RunConfig(dataset="digits", model="mlp", num_nodes=4, batch_size=32, rounds=20, eval_every=20,
                       checkpoint_every=0, lr=0.1, bits=2, cache=True, refine_bits=2, refine_max=2, seed=0)
    last = qrun.train(config, tmp_path)
    parts = last["cumulative_uplink_bits"]
    assert parts["refine"] > 20 * 4 * 8 * 4  # more than the bitmaps: held samples were refined
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"]
    assert last["test_accuracy"] > 0.5
