"""Transform codes (DCT, PCA) in qdata's training path (issue 10, section 2; qdata.codecs.transform_codec).

A node's setup is fitted on its own shard and charged once, in round 0; its codes decode within the
rounding's bound; the learner decodes exactly what the node's codec decodes (fresh and cached); 1
device trains as 2; a run resumes bitwise; and training learns on digits.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdata import cli, data
from qdata.codecs import transform_codes
from qdata.codecs.transform_codec import transform_codec
from qdata.config import RunConfig
from qdata.methods.qdata import qdata_estimator, sample_codec
from qdata.models import make_model, per_sample_loss
from qdata.run import Experiment, final_params, train

DIGITS = data.load_dataset("digits")
X = np.asarray(DIGITS.to_float(DIGITS.x_train[:600]))  # (600, 8, 8, 1) in [0, 1]
Y = np.asarray(DIGITS.y_train[:600], np.int32)
N_PIX, B = 64, 16
BASE = RunConfig(dataset="digits", model="mlp", method="qdata", num_nodes=4, batch_size=16, rounds=3, eval_every=1,
                 checkpoint_every=0, transform="pca", sample_bits=96)


def _estimator(basis, sample_bits, rounding="stochastic", cache_size=None):
    codec = transform_codec(DIGITS.sample_shape, sample_bits, basis=basis, rounding=rounding)
    loss = per_sample_loss(make_model("mlp", 10))
    return qdata_estimator(loss, codec, num_classes=10, cache_size=cache_size, sample_shape=DIGITS.sample_shape)


def _fitted(est, count=500):
    """The node's state fitted on its shard (the first ``count`` of 600 rows: the rest is padding)."""
    return est.fit(est.init(None), {"x": jnp.asarray(X), "y": jnp.asarray(Y)}, jnp.int32(count))


def _batch(start, pos=None):
    pos = np.arange(start, start + B) if pos is None else np.asarray(pos)
    return {"x": jnp.asarray(X[pos]), "y": jnp.asarray(Y[pos]), "pos": jnp.asarray(pos, jnp.int32)}


def _setup_by_hand(basis, sample_bits, x=X[:500]):
    """Setup bits from the host fit, counted by hand: mean n fp16, widths n x 4 bits, two fp16 ranges
    per coefficient with bits, and for PCA its axis (n fp16)."""
    widths = transform_codes.node_setup(x, len(x), sample_bits, basis=basis, rounding="stochastic")["widths"]
    k = int(np.sum(widths > 0))
    return N_PIX * 16 + N_PIX * 4 + k * 2 * 16 + (k * N_PIX * 16 if basis == "pca" else 0), widths


@pytest.mark.parametrize("basis", ["dct", "pca"])
def test_bits_by_hand_setup_once_then_only_codes(basis):
    est = _estimator(basis, 96)
    state = _fitted(est)
    setup, widths = _setup_by_hand(basis, 96)
    assert 0 < widths.sum() <= 96
    for round_, start in enumerate((0, 16, 32)):
        message, state = est.node_message(jax.random.key(round_), None, _batch(start), state)
        bits = {k: int(v) for k, v in est.uplink_bits(message).items()}
        assert bits["data"] == B * 96  # 12 bytes a sample, every sample sent
        assert bits["labels"] == B * 4  # ceil(log2 10)
        assert bits["setup"] == (setup if round_ == 0 else 0)
        assert bits["total"] == B * 96 + B * 4 + bits["setup"]


@pytest.mark.parametrize("basis, rounding", [("dct", "stochastic"), ("dct", "dither"), ("pca", "stochastic")])
def test_decoded_error_within_the_rounding_bound(basis, rounding):
    """Through the estimator and the learner: each coded coefficient within Delta_k (stochastic
    rounding) or Delta_k / 2 (dither) of the sample's, the truncated ones decoded as 0."""
    est = _estimator(basis, 96, rounding)
    node = _fitted(est)
    message, node = est.node_message(jax.random.key(3), None, _batch(40), node)
    (x_hat, _, _), _ = est.received(message, est.init_learner())
    setup = node.samples["x"].setup
    mean = np.asarray(setup.arrays["mean"], np.float32)
    lo, hi = (np.asarray(setup.rows[k], np.float64) for k in ("lo", "hi"))
    widths = transform_codes.node_setup(X[:500], 500, 96, basis=basis, rounding=rounding)["widths"]
    step = np.where(widths > 0, (hi - lo) / np.maximum((1 << widths) - 1, 1), 0.0)
    basis_v = (transform_codes.dct_basis(DIGITS.sample_shape) if basis == "dct"
               else np.asarray(setup.rows["basis"], np.float64).T)
    flat = X[40:56].reshape(B, -1) - mean
    c = flat @ basis_v
    err_bound = step if rounding == "stochastic" else step / 2
    if basis == "dct":  # orthonormal: the coefficients read back exactly
        c_hat = (np.asarray(x_hat, np.float64).reshape(B, -1) - mean) @ basis_v
        assert np.all(np.abs(c_hat - c)[:, widths > 0] <= err_bound[widths > 0] * (1 + 1e-4) + 1e-5)
        assert np.all(np.abs(c_hat[:, widths == 0]) < 1e-5)
    else:  # the fp16 axes, near-orthonormal: ||x_hat - mu - c V^T|| <= sigma_max(V) ||Delta||
        projected = mean + c @ basis_v.T
        gap = np.linalg.norm(np.asarray(x_hat, np.float64).reshape(B, -1) - projected, axis=1)
        assert np.all(gap <= np.linalg.norm(basis_v, 2) * np.linalg.norm(err_bound) * (1 + 1e-4) + 1e-5)
    assert int(message.samples["x"].codes.info["clipped"]) == 0  # the node's own data lies in its ranges


@pytest.mark.parametrize("basis, rounding", [("dct", "dither"), ("pca", "stochastic")])
def test_the_learner_decodes_what_the_nodes_codec_decodes_fresh_and_cached(basis, rounding):
    """With the cache: round 0 sends the setup, round 1 resends some held samples as positions only;
    the learner's samples equal the node codec's decoding, bitwise, and need the setup (a learner
    without it decodes something else)."""
    codec = transform_codec(DIGITS.sample_shape, 96, basis=basis, rounding=rounding)
    est = qdata_estimator(per_sample_loss(make_model("mlp", 10)), codec, num_classes=10, cache_size=600,
                          sample_shape=DIGITS.sample_shape)
    samples = sample_codec(codec, num_classes=10, cache_size=600, sample_shape=DIGITS.sample_shape)
    node, learner = _fitted(est), est.init_learner()
    for round_, pos in enumerate((np.arange(16), np.r_[np.arange(8, 16), np.arange(100, 108)])):
        message, node = est.node_message(jax.random.key(round_), None, _batch(0, pos), node)
        before = learner
        (x_hat, y, _), learner = est.received(message, learner)
        mask = jnp.ones((B,), jnp.float32)
        np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(samples.decode(message.samples, node.samples, mask)["x"]))
        np.testing.assert_array_equal(np.asarray(y), Y[pos])
        if round_ == 1:  # 8 held samples travel as positions: only 8 samples' codes are charged
            assert int(est.uplink_bits(message)["data"]) == 8 * 96
            assert int(est.uplink_bits(message)["setup"]) == 0
    wrong = samples.decode(message.samples, before._replace(inner={**before.inner, "x": est.init_learner().inner["x"]}), mask)
    assert not np.allclose(np.asarray(wrong["x"]), np.asarray(x_hat), atol=1e-2)


def test_setups_differ_by_node_and_are_charged_once_in_the_run(tmp_path):
    """A run of 4 nodes (vmap-ed): round 0 charges each node's own setup, counted by hand from its
    own shard; later rounds only the codes and labels."""
    config = BASE.replace(transform="dct", sample_bits=64)
    train(config, tmp_path / "run")
    exp = Experiment(config)
    by_hand, widths = [], []
    for i in range(config.num_nodes):
        shard = np.asarray(exp.dataset.to_float(exp.dataset.x_train[exp.index[i, : exp.count[i]]]))
        bits, w = _setup_by_hand("dct", 64, shard)
        by_hand.append(bits)
        widths.append(tuple(w))
    assert len(set(widths)) > 1  # the nodes fit their own allocations (two may coincide)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()[1:]]
    per_node = [r["uplink_bits_last_round_per_node"] for r in rounds]
    assert per_node[0]["setup"] == sum(by_hand) / 4 and per_node[1]["setup"] == per_node[2]["setup"] == 0
    assert all(p["data"] == 16 * 64 and p["labels"] == 16 * 4 for p in per_node)
    assert rounds[-1]["cumulative_uplink_bits"]["setup"] == sum(by_hand)
    assert rounds[-1]["cumulative_uplink_bits"]["total"] == sum(by_hand) + 3 * 4 * 16 * (64 + 4)


_DEVICES_SCRIPT = r"""
import os, json, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
from qdata import engine
from qdata.codecs import transform_codes
from qdata.config import RunConfig
from qdata.run import Experiment
cfg = RunConfig.from_dict(json.loads(sys.argv[1]))
exp = Experiment(cfg)
out = {}
for devices in (1, 2):
    mesh = engine.node_mesh(devices)
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    state = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params, 4, 0))
    state = engine.fit_nodes(exp.method, mesh, state, shards, to_float=exp.dataset.to_float)
    codec_state = state.node_states.samples.inner  # the cache's inner state: samples and labels
    widths = engine.fetch(codec_state["x"].setup.arrays["widths"])
    one = engine.make_round(exp.method, exp.optimizer, mesh, batch_size=cfg.batch_size, state_template=state,
                            to_float=exp.dataset.to_float)
    state, bits, _ = engine.run_rounds(one, state, shards, 3)
    out[devices] = {"params": [np.asarray(p).tolist() for p in jax.tree_util.tree_leaves(engine.fetch(state.params))],
                    "bits": {k: np.asarray(v).tolist() for k, v in bits.items() if k in ("setup", "total")},
                    "widths": np.asarray(widths).tolist()}
host = []
for i in range(4):  # each node's own widths, fitted on the host from its shard
    shard = exp.dataset.to_float(exp.dataset.x_train[exp.index[i, : exp.count[i]]])
    host.append(transform_codes.node_setup(shard, len(shard), cfg.sample_bits, basis=cfg.transform,
                                           rounding=cfg.quantizer)["widths"].tolist())
out["host_widths"] = host
print(json.dumps(out))
"""


def test_two_devices_train_as_one_with_each_nodes_own_setup():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    config = BASE.replace(cache=True).to_dict()
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, json.dumps(config)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    from qdata.codecs.packing import unpack_codes
    for devices in (one, two):
        widths = [np.asarray(unpack_codes(jnp.asarray(w, jnp.uint8), 4, N_PIX)).tolist() for w in devices["widths"]]
        assert widths == out["host_widths"]  # node i's setup is fitted on node i's shard, on any mesh
    assert len({tuple(w) for w in out["host_widths"]}) == 4
    assert one["bits"] == two["bits"] and one["bits"]["setup"][0] != [0, 0, 0, 0] and not any(one["bits"]["setup"][1])
    for a, b in zip(one["params"], two["params"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    config = BASE.replace(rounds=6, eval_every=2, checkpoint_every=2, cache=True, quantizer="dither")
    train(config, tmp_path / "six")
    train(config.replace(rounds=8), tmp_path / "six", resume=True)
    train(config.replace(rounds=8), tmp_path / "eight")
    for a, b in zip(jax.tree_util.tree_leaves(final_params(tmp_path / "six", config.replace(rounds=8))),
                    jax.tree_util.tree_leaves(final_params(tmp_path / "eight", config.replace(rounds=8)))):
        np.testing.assert_array_equal(a, b)
    last = lambda name: json.loads((tmp_path / name / "results.jsonl").read_text().splitlines()[-1])
    assert last("six")["cumulative_uplink_bits"] == last("eight")["cumulative_uplink_bits"]


def test_training_on_pca_codes_learns_digits(tmp_path):
    """96 bits a sample (a 4-bit pixel code sends 256): above 90% test accuracy in 150 rounds (SGD on
    raw digits reaches about 95% here)."""
    last = train(BASE.replace(rounds=150, eval_every=150, batch_size=32, cache=True), tmp_path / "run")
    assert last["test_accuracy"] > 0.90
    assert last["uplink_bits_last_round_per_node"]["setup"] == 0


@pytest.mark.parametrize("fields, named", [
    (dict(transform="dct"), "transform='dct' needs sample_bits"),
    (dict(sample_bits=400), "sample_bits=400 is used only with method='qdata' and transform='dct' or 'pca'"),
    (dict(transform="pca", sample_bits=400, bits=2), "bits=2 is used only with method='qdata' and transform='none'"),
    (dict(transform="pca", sample_bits=400, coder="ans", quantizer="nearest"), "quantizer='nearest' with transform='pca'"),
    (dict(transform="dct", sample_bits=400, quantizer="nearest"), "quantizer='nearest' with transform='dct'"),
    (dict(transform="dct", sample_bits=400, faults="drop:1:0.5"), "needs stream_start=1, faults='none'"),
    (dict(transform="dct", sample_bits=400, stream_start=0.5), "needs stream_start=1"),
    (dict(transform="dct", sample_bits=401), "sample_bits must be a multiple of 8"),
    (dict(transform="wavelet", sample_bits=400), "transform must be one of 'none', 'dct', 'pca'"),
    (dict(method="sgd", transform="dct", sample_bits=400), "transform='dct' is used only with method='qdata'"),
])
def test_bad_settings_are_refused_before_any_work(fields, named):
    with pytest.raises(ValueError) as err:
        RunConfig(**fields)
    assert named in str(err.value), str(err.value)


def test_a_budget_above_8n_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="sample_bits must be an integer 8..512"):
        train(BASE.replace(sample_bits=1024), tmp_path / "run")
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_the_cli_refuses_a_transform_without_its_budget(capsys):
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(cli.main(["train", "--method", "qdata", "--transform", "pca", "--rounds", "1"]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "needs sample_bits" in err and len(err.strip().splitlines()) == 1, err
