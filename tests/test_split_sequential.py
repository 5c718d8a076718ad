"""Sequential split learning (Vepakomma et al. 2018; Gupta and Raskar 2018): the nodes take turns, the
lower layers handed on via the learner. Its bits both ways by hand, round by round (who sends what, the
hand-off); one model trained in turn equals SGD stepping on the active node's batch; the run and the
comparison charge the downlink the rounds sent; it trains; bad settings are refused."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qdata import compare, engine, models
from qdata.codecs import ledger
from qdata.config import RunConfig
from qdata.data import sample_batch
from qdata.run import Experiment, train
from tests.engine_rounds import engine_rounds
from tests.subprocess_json import run_json

SEQ = dict(method="split", split_mode="sequential", checkpoint_every=0)


# The MLP 64-8-10 cut after its first layer: m = 8 activations, d_low = 64*8 + 8 = 520 weights; b = 5.
ACTS, LABELS = 5 * 8 * 32, 8 * -(-5 * 4 // 8)  # 1,280 fp32 activations; 24 bits of labels (4 bits each)
LAYERS = TRACE = (64 * 8 + 8) * 32  # 16,640: the lower layers, and SGD's momentum trace for them
HANDOFF = LAYERS + TRACE


@pytest.mark.parametrize("turn,active,ends", [(1, [0, 1, 0, 1], [True] * 4),
                                              (2, [0, 0, 1, 1], [False, True, False, True])])
def test_bits_both_ways_by_hand(turn, active, ends):
    """2 nodes, 4 rounds. In round t only node a_t = (t // R) mod 2 sends: its activations and labels
    up, their gradients down; at a turn's end it sends its layers and their momentum trace up, and the
    learner sends them down to the next node. The other node sends nothing."""
    config = RunConfig(**SEQ, model="mlp:8", split_turn=turn, num_nodes=2, batch_size=5)
    exp, _, bits, diagnostics = engine_rounds(config, 4)
    per = {k: ledger.host_per_entry(v).tolist() for k, v in bits.items()}
    assert set(per) == {"activations", "labels", "node_layers", "node_optimizer", "total"}
    assert per["activations"] == [[ACTS if a == i else 0 for i in (0, 1)] for a in active]
    assert per["labels"] == [[LABELS if a == i else 0 for i in (0, 1)] for a in active]
    for part in ("node_layers", "node_optimizer"):
        assert per[part] == [[LAYERS if a == i and e else 0 for i in (0, 1)] for a, e in zip(active, ends)]
    assert per["total"] == [[(ACTS + LABELS + (HANDOFF if e else 0)) if a == i else 0 for i in (0, 1)]
                            for a, e in zip(active, ends)]
    down = ledger.host_per_entry(diagnostics[engine.REPLY_BITS]).tolist()
    assert down == [[ACTS * (a == i) + HANDOFF * (e and a != i) for i in (0, 1)] for a, e in zip(active, ends)]
    # A reply's size when sent (the header's figure; the run charges the rounds' own).
    assert engine.downlink_parts(exp.method, exp.params) == (0, ACTS + HANDOFF)
    assert exp.method.name == ("split_seq:1" if turn == 1 else "split_seq:1:t2")


def test_quantized_activations_and_plain_sgd_hand_off():
    """At B = 3 bits the active node's activations cost 5 (8 ceil(8*3/8) + 32) = 280 bits; with plain
    SGD (momentum 0) the optimizer has no state, and the hand-off is the lower layers alone."""
    config = RunConfig(**SEQ, model="mlp:8", num_nodes=2, batch_size=5, split_bits=3, momentum=0.0)
    exp, _, bits, diagnostics = engine_rounds(config, 2)
    assert ledger.host_per_entry(bits["activations"]).tolist() == [[280, 0], [0, 280]]
    assert ledger.host_per_entry(bits["node_optimizer"]).tolist() == [[0, 0], [0, 0]]
    assert ledger.host_per_entry(diagnostics[engine.REPLY_BITS]).tolist() == [[ACTS, LAYERS], [LAYERS, ACTS]]
    assert exp.method.name == "split_seq:1:3bit"


def test_one_node_sends_no_hand_off():
    config = RunConfig(**SEQ, model="mlp:8", num_nodes=1, batch_size=5)
    _, _, bits, diagnostics = engine_rounds(config, 3)
    assert ledger.host_per_entry(bits["total"]).tolist() == [[ACTS + LABELS]] * 3
    assert ledger.host_per_entry(diagnostics[engine.REPLY_BITS]).tolist() == [[ACTS]] * 3


def _sgd_on_the_schedule(exp: Experiment, rounds: int, turn: int, lr: float, momentum: float):
    """The whole model, one SGD (momentum) step a round on node ((t // R) mod N)'s batch, drawn as the
    engine draws it (keys from the seed, the round and the node's index)."""
    optimizer = optax.sgd(lr, momentum=momentum)
    params, opt_state = exp.params, optimizer.init(exp.params)
    loss = lambda p, x, y: jnp.mean(exp.loss_fn(p, x, y))
    num_nodes = exp.index.shape[0]
    for t in range(rounds):
        node = (t // turn) % num_nodes
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), t), node)
        ids, _ = sample_batch(jax.random.split(key)[0], jnp.asarray(exp.index[node]), exp.count[node],
                              exp.config.batch_size)
        x, y = exp.dataset.to_float(exp.dataset.x_train[np.asarray(ids)]), exp.dataset.y_train[np.asarray(ids)]
        updates, opt_state = optimizer.update(jax.grad(loss)(params, x, jnp.asarray(y)), opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("nodes,turn", [(1, 1), (2, 1), (3, 2)])
def test_turns_equal_sgd_on_the_active_nodes_batches(nodes, turn):
    """fp32 activations: a round is one momentum step of the whole model on the active node's batch
    (the chain rule splits the gradient; the hand-off carries the momentum trace on), so 3 rounds (4
    with turns of 2) equal SGD stepping on node (t // R) mod N's batch, to float rounding. One node:
    plain SGD on the whole model."""
    config = RunConfig(**SEQ, split_cut=2, num_nodes=nodes, split_turn=turn, batch_size=16, lr=0.1, momentum=0.9)
    rounds = 3 if turn == 1 else 4
    exp, state, _, _ = engine_rounds(config, rounds)
    got = engine.fetch(engine.model_params(exp.method, state))
    want = _sgd_on_the_schedule(exp, rounds, turn, 0.1, 0.9)
    if nodes == 1:  # and the library's own SGD on one node agrees
        sgd_config = config.replace(method="sgd", split_cut=1, split_mode="parallel")
        sgd_exp, sgd_state, _, _ = engine_rounds(sgd_config, rounds)
        want_sgd = engine.fetch(sgd_state.params)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want_sgd)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b, w0 in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                        jax.tree_util.tree_leaves(exp.params)):
        assert not np.allclose(b, w0)  # every layer moved, the lower ones included
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # After a hand-off the next node holds the current lower layers; the nodes not in the last turns keep old ones.
    trained = engine.fetch(state.node_states.trained)
    assert trained.max() == rounds and int(np.argmax(trained)) == ((rounds - 1) // turn) % nodes


def test_the_run_and_the_comparison_charge_the_downlink_the_rounds_sent(tmp_path):
    """4 rounds, 2 nodes, turns of 2, evaluations every 2: the records' downlink is what the replies
    sent (round 1 and 3 end a turn: one hand-off each), and the comparison reads it from them."""
    config = RunConfig(**SEQ, model="mlp:8", split_turn=2, num_nodes=2, batch_size=5, rounds=4, eval_every=2)
    train(config, tmp_path / "run")
    header, *rounds = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert header["downlink_varies_by_round"] is True and header["method"] == "split_seq:1:t2"
    assert header["downlink_parts_per_node_per_round"] == {"model": 0, "replies": ACTS + HANDOFF}
    every_two = 2 * ACTS + HANDOFF  # all nodes, two rounds: the gradients twice, one hand-off
    assert [r["cumulative_downlink_bits"] for r in rounds] == [every_two, 2 * every_two]
    assert [r["cumulative_uplink_bits"]["total"] for r in rounds] == [2 * (ACTS + LABELS) + HANDOFF,
                                                                      4 * (ACTS + LABELS) + 2 * HANDOFF]
    assert compare._downlink_kind(header, rounds) == "replies" and not compare.relays(header, rounds)
    figures = compare._per_seed(header, rounds, 0.0)
    assert figures["downlink_bits_per_round"] == 2 * every_two / 2 / 4
    assert compare.downlink_per_node(header, rounds, 3.0, 0.0) == 1.5 * every_two / 2  # between the two records
    # The parallel variant's header carries no such flag: its figures are read as before.
    parallel = Experiment(config.replace(split_mode="parallel", split_turn=1)).describe()
    assert "downlink_varies_by_round" not in parallel


def test_a_resumed_run_keeps_the_downlink(tmp_path):
    config = RunConfig(**{**SEQ, "checkpoint_every": 2}, model="mlp:8", num_nodes=2, batch_size=5, rounds=2,
                       eval_every=2)
    train(config, tmp_path / "run")
    last = train(config.replace(rounds=4), tmp_path / "run", resume=True)
    whole = train(config.replace(rounds=4), tmp_path / "whole")
    assert last["cumulative_downlink_bits"] == whole["cumulative_downlink_bits"] == 4 * (ACTS + HANDOFF)
    assert last["test_accuracy"] == whole["test_accuracy"]


def test_trains_on_digits(tmp_path):
    """150 rounds, 4 nodes, batch 32, 4-bit activations: one batch a round (the parallel variant takes
    four), so it sees a quarter of the samples. Measured (seed 0): 0.911 with turns of one round, 0.958
    with turns of 5 (seeds 1 and 2: 0.939 / 0.911 and 0.956 / 0.958: seed noise, both being SGD on one
    batch a round, whose one-node run reaches 0.961 / 0.958); the parallel variant 0.975. Turns of 5
    rounds pay the hand-off a fifth as often."""
    base = RunConfig(**SEQ, split_cut=1, split_bits=4, num_nodes=4, batch_size=32, rounds=150, eval_every=150,
                     lr=0.1)
    one = train(base, tmp_path / "turn1")
    five = train(base.replace(split_turn=5), tmp_path / "turn5")
    assert min(one["test_accuracy"], five["test_accuracy"]) > 0.88
    handoffs = lambda r: r["cumulative_uplink_bits"]["node_layers"]
    assert handoffs(one) == 5 * handoffs(five)


@pytest.mark.parametrize("changes,match", [
    ({"split_mode": "relay"}, r"split_mode must be one of .*parallel.*sequential"),
    ({"split_turn": 0}, r"split_turn must be an integer in 1\.\."),
    ({"split_mode": "parallel", "split_turn": 2}, r"split_turn=2 is used only with method='split' and "
                                                  r"split_mode='sequential'"),
    ({"method": "sgd", "split_turn": 1, "split_mode": "sequential"}, r"split_mode='sequential' is used only with "
                                                                    r"method='split'"),
    ({"split_top": 1, "model": "mlp:8x6"}, r"split_mode='sequential' with split_top=1.*not built"),
    ({"integrity": True}, r"split_mode='sequential'.*integrity=True is not built"),
    ({"faults": "drop:1:0.5"}, "not built"),
])
def test_bad_settings_are_refused_before_any_work(changes, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**{**SEQ, **changes})


def test_the_sequential_row_runs_alone_with_its_reference():
    """experiments/all_digits_split_seq.toml: all_digits.toml's base, seeds, grid and rows (SGD and the
    sequential row), so its figures are that lineup's."""
    from qdata.lineup import load_lineup

    full, subset = load_lineup("all_digits.toml"), load_lineup("all_digits_split_seq.toml")
    assert (subset.base, subset.seeds, subset.tune_seeds) == (full.base, full.seeds, full.tune_seeds)
    rows = {r.label: r for r in full.runs}
    assert {r.label for r in subset.runs} == {"sgd-fp32", "split-seq-cut1-4b"}
    for r in subset.runs:
        assert (r.config, r.lr_grid, r.family) == (rows[r.label].config, rows[r.label].lr_grid, rows[r.label].family)
    seq = rows["split-seq-cut1-4b"].config
    assert (seq.split_mode, seq.split_bits, seq.split_cut) == ("sequential", 4, 1)


_DEVICES_SCRIPT = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, sys.argv[1])  # the checkout, for tests.engine_rounds
import jax, numpy as np
from qdata import engine
from qdata.config import RunConfig
from tests.engine_rounds import engine_rounds
out = {}
for devices in (1, 2):
    config = RunConfig(method="split", split_mode="sequential", split_cut=1, split_bits=4, num_nodes=4, batch_size=8,
                       lr=0.1, checkpoint_every=0)
    exp, state, bits, _ = engine_rounds(config, 6, devices)
    params = engine.fetch(engine.model_params(exp.method, state))
    out[str(devices)] = {"params": [np.asarray(p).tolist() for p in jax.tree_util.tree_leaves(params)],
                         "bits": np.asarray(bits["total"]).tolist()}
print(json.dumps(out))
"""


def test_two_devices_equal_one_device():
    """Nodes 0, 1 on one device, 2, 3 on the other: the active node's activations reach the learner and
    the hand-offs cross devices (6 rounds of 4 nodes in turns of 1)."""
    out = run_json(_DEVICES_SCRIPT, str(Path(__file__).resolve().parents[1]))
    assert out["1"]["bits"] == out["2"]["bits"]
    for a, b in zip(out["1"]["params"], out["2"]["params"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
