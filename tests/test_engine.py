"""The engine end to end: devices, processes, resume, and the bit ledger in the results file."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from qdata import results as qresults
from qdata.config import RunConfig
from qdata.run import final_params, train

# Small but complete: digits, an MLP, 4 nodes, qdata with every part of the message switched on
# (4-bit codes, Bernoulli gate with fp16 weights and a mask, random-k correction).
FLAGS = ["--dataset", "digits", "--model", "mlp", "--num-nodes", "4", "--batch-size", "16",
         "--rounds", "6", "--eval-every", "3", "--checkpoint-every", "3", "--seed", "3",
         "--method", "qdata", "--bits", "4", "--gate", "bernoulli", "--rho", "0.5",
         "--correction", "randk:32", "--no-progress"]


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "qdata.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _params(out_dir):
    header, _ = qresults.load(out_dir)
    config = RunConfig.from_dict(header["config"]).replace(num_devices=1)
    return final_params(out_dir, config)


def _assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        # Float reductions differ in order between layouts; anything beyond that would be a real bug.
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_devices_equal_one_device_and_two_processes(tmp_path):
    one = _cli(FLAGS + ["--out", str(tmp_path / "one"), "--num-devices", "1"])
    _finish(one)
    four = _cli(FLAGS + ["--out", str(tmp_path / "four"), "--num-devices", "4", "--local-devices", "4"])
    _finish(four)
    port = str(_free_port())
    procs = [
        _cli(FLAGS + ["--out", str(tmp_path / "procs"), "--num-devices", "4", "--local-devices", "2",
                      "--num-processes", "2", "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}"])
        for i in range(2)
    ]
    for p in procs:
        _finish(p)
    p1, p4, p22 = _params(tmp_path / "one"), _params(tmp_path / "four"), _params(tmp_path / "procs")
    _assert_same_params(p1, p4)
    _assert_same_params(p4, p22)
    # The ledgers agree too: the bits are those of the same messages.
    ledgers = [qresults.load(tmp_path / d)[1][-1]["cumulative_uplink_bits"] for d in ("one", "four", "procs")]
    assert ledgers[0] == ledgers[1] == ledgers[2]
    header, _ = qresults.load(tmp_path / "procs")
    assert header["processes"] == 2 and header["devices"] == 4


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", [
    # state at the nodes: error memory; PowerSGD's warm start inside it
    dict(method="gradient", compressor="powersgd:2", error_feedback=True),
    # state at both ends: the learner's sample cache, the node's record of it, EF memory of the correction
    dict(method="qdata", cache=True, correction="ef:topk:32", gate="bernoulli", rho=0.5),
])
def test_resume_after_kill_matches_uninterrupted(tmp_path, method):
    config = RunConfig(dataset="digits", model="mlp", num_nodes=4, batch_size=16, rounds=12, eval_every=2,
                       checkpoint_every=4, seed=1, **method)
    train(config, tmp_path / "full")

    def kill_after_round_6(record):
        if record["round"] == 6:  # checkpoint at 4; rounds 5-6 are lost and recomputed
            raise _Killed

    with pytest.raises(_Killed):
        train(config, tmp_path / "killed", on_round=kill_after_round_6)
    with pytest.raises(FileExistsError):
        train(config, tmp_path / "killed")
    train(config, tmp_path / "killed", resume=True)
    _assert_same_params(_params(tmp_path / "full"), _params(tmp_path / "killed"))
    _, full_rounds = qresults.load(tmp_path / "full")
    _, resumed_rounds = qresults.load(tmp_path / "killed")
    assert [r["round"] for r in resumed_rounds] == [r["round"] for r in full_rounds]
    assert full_rounds[-1]["cumulative_uplink_bits"] == resumed_rounds[-1]["cumulative_uplink_bits"]


def test_ledger_in_results_is_exact(tmp_path):
    config = RunConfig(dataset="digits", model="mlp", num_nodes=2, batch_size=8, rounds=4, eval_every=2,
                       checkpoint_every=0, method="qdata", bits=4, correction="off", target_accuracy=0.01)
    train(config, tmp_path)
    header, rounds = qresults.load(tmp_path)
    n = header["dataset"]["n"]
    # 8 samples of 64 4-bit codes (32 bytes each) and 8 labels of ceil(log2 10) = 4 bits (4 bytes).
    per_node_round = 8 * (n * 4 // 8) * 8 + 8 * 4
    assert rounds[-1]["uplink_bits_last_round_per_node"]["total"] == per_node_round
    assert rounds[-1]["cumulative_uplink_bits"]["total"] == per_node_round * 2 * 4
    assert rounds[-1]["cumulative_uplink_bits"]["correction"] == 0
    # Digits lie in the quantizer's [0, 1]; every sample of 2 nodes x 4 rounds x 8 was sent and coded.
    assert rounds[-1]["encoder_counts"] == {"clipped": 0, "samples_coded": 64, "samples_sent": 64}
    # Any accuracy reaches 1%: the first evaluation's cumulative bits, carried forward.
    assert rounds[0]["bits_to_target_per_node"] == rounds[-1]["bits_to_target_per_node"] == per_node_round * 2
    # Neither a gate nor a correction: nodes do not need the model, so no downlink is charged.
    assert header["downlink_bits_per_node_per_round"] == 0
    sgd = RunConfig(dataset="digits", model="mlp", num_nodes=2, batch_size=8, rounds=2, eval_every=2,
                    checkpoint_every=0, method="sgd")
    train(sgd, tmp_path / "sgd")
    header, rounds = qresults.load(tmp_path / "sgd")
    d = header["model"]["params"]
    assert rounds[-1]["uplink_bits_last_round_per_node"]["total"] == 32 * d
    assert rounds[-1]["cumulative_downlink_bits"] == 32 * d * 2 * 2


def test_streaming_nodes_only_draw_arrived_samples(tmp_path):
    config = RunConfig(dataset="digits", model="logreg", num_nodes=2, batch_size=8, rounds=4, eval_every=4,
                       checkpoint_every=0, method="sgd", stream_start=0.05, stream_rounds=100)
    record = train(config, tmp_path)
    assert record["round"] == 4


def test_cli_bad_input_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qdata.cli", "train", "--dataset", "no_such_dataset_xyz",
                          "--out", str(tmp_path / "x"), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "no_such_dataset_xyz" in out.stderr
    out = subprocess.run([sys.executable, "-m", "qdata.cli", "train", "--bits", "17", "--out", str(tmp_path / "y")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "bits" in out.stderr


def test_train_from_a_toml_config_with_flag_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(
        'name = "from-toml"\nmethod = "qdata"\nbits = 2\nmodel = "logreg"\nnum_nodes = 2\nbatch_size = 8\n'
        'rounds = 2\neval_every = 2\ncheckpoint_every = 0\ncache = true\n')
    out = subprocess.run([sys.executable, "-m", "qdata.cli", "train", "--config", str(tmp_path / "run.toml"),
                          "--bits", "3", "--out", str(tmp_path / "r"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    header, rounds = qresults.load(tmp_path / "r")
    assert header["config"]["name"] == "from-toml" and header["config"]["cache"] is True
    assert header["config"]["bits"] == 3  # the flag overrides the file
    assert rounds[-1]["round"] == 2
    (tmp_path / "bad.toml").write_text("bitz = 3\n")
    out = subprocess.run([sys.executable, "-m", "qdata.cli", "train", "--config", str(tmp_path / "bad.toml"),
                          "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "bitz" in out.stderr


_HLO_SCRIPT = r"""
import json, os, re
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np
from qdata import engine
from qdata.config import RunConfig
from qdata.run import Experiment
out = {}
for method in ("qdata", "sgd"):
    cfg = RunConfig(method=method, num_nodes=4, batch_size=8, num_devices=4, cache=(method == "qdata"))
    exp = Experiment(cfg)
    mesh = engine.node_mesh(4)
    st = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params, 4, 0))
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    fn = engine.make_round(exp.method, exp.optimizer, mesh, batch_size=8, state_template=st)
    text = fn.lower(st, shards).compile().as_text()
    collectives = re.findall(r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                             r"(?:-start)?\(", text)
    out[method] = {
        "d": exp.d, "max_len": int(exp.index.shape[1]),
        "collectives": [[kind, re.findall(r"(\w+)\[([\d,]*)\]", shapes)] for shapes, kind in collectives],
        "x_shards": sorted({tuple(s.data.shape) for s in shards.x.addressable_shards}),
        "x_dtype": str(shards.x.dtype),
        "cache_shards": sorted({tuple(s.data.shape)[0] for leaf in
                                __import__("jax").tree_util.tree_leaves(st.learner_state)
                                for s in leaf.addressable_shards}),
    }
print(json.dumps(out))
"""


def test_devices_hold_their_nodes_and_exchange_only_the_learners_gradient():
    """Read the compiled 4-device round. The node-to-learner hand-over is local (each device's
    learner share serves its own nodes): the one collective is the learner's own all-reduce of its
    d-sized gradient, for qdata as for SGD; no sample, payload or ledger count is gathered. Each
    device holds only its node's rows of the training set and of the learner's cache."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _HLO_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in ("qdata", "sgd"):
        found = out[method]
        kinds = [kind for kind, _ in found["collectives"]]
        assert kinds == ["all-reduce"], found["collectives"]
        shapes = found["collectives"][0][1]
        assert {dtype for dtype, _ in shapes} == {"f32"}
        assert sum(int(np.prod([int(v) for v in dims.split(",") if v])) for _, dims in shapes) == found["d"]
        assert found["x_shards"] == [[1, found["max_len"], 8, 8, 1]]  # one node's rows per device
        assert found["x_dtype"] == "uint8"  # digits' 17 levels, stored as the source has them
    assert out["qdata"]["cache_shards"] == [1]  # the learner's cache of one node per device


def test_unrolled_and_vmapped_nodes_give_the_same_round():
    """The two ways a device maps its nodes (unrolled on CPU for convolutional models, vmap
    elsewhere) compute the same round: same messages and bits, the same update up to float order."""
    from qdata import engine
    from qdata.run import Experiment

    config = RunConfig(dataset="synthetic:8x8x1:4", model="cnn", num_nodes=2, batch_size=4, method="qdata",
                       bits=4, correction="randk:64", max_train=64, max_test=16)
    exp = Experiment(config)
    assert engine.unrolls_nodes("auto", 2, exp.params) == (jax.default_backend() == "cpu")
    mesh = engine.node_mesh(1)
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    results = {}
    for node_map in ("vmap", "unroll"):
        state = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params, 2, 0))
        one_round = engine.make_round(exp.method, exp.optimizer, mesh, batch_size=4, state_template=state,
                                      to_float=exp.dataset.to_float, node_map=node_map)
        results[node_map] = engine.run_rounds(one_round, state, shards, 2)
    (s_v, bits_v, _), (s_u, bits_u, _) = results["vmap"], results["unroll"]
    _assert_same_params(engine.fetch(s_v.params), engine.fetch(s_u.params))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, bits_v, bits_u))
    with pytest.raises(ValueError, match="node_map"):
        engine.make_round(exp.method, exp.optimizer, mesh, batch_size=4, state_template=state, node_map="loop")
