"""Split learning (Vepakomma et al. 2018; parallel as SplitFed): the cut model composes to the whole,
its bits both ways by hand, one round equals data-parallel SGD, it trains, 1 device = 2, bad cuts refused."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from qdata import compare, engine, models
from qdata.codecs import ledger
from qdata.config import RunConfig
from qdata.methods.split import cut_model
from qdata.run import train
from tests.engine_rounds import engine_rounds
from tests.subprocess_json import run_json


@pytest.mark.parametrize("name,shape,cuts", [("mlp:16x8", (8, 8), ((1, 0), (2, 0), (1, 1))),
                                             ("cnn", (8, 8, 1), ((1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (1, 2)))])
def test_the_cut_model_composes_to_the_whole(name, shape, cuts):
    model = models.make_model(name, 10)
    params = models.init_params(model, jax.random.PRNGKey(0), shape)
    x = jax.random.uniform(jax.random.PRNGKey(1), (5,) + shape)
    whole = model.apply({"params": params}, x)
    for cut, top in cuts:
        split = cut_model(model, cut, top)
        node, learner = split.split(params)
        assert set(node) | set(learner) == set(params) and not set(node) & set(learner)
        assert len(node) == cut + top
        logits = split.head(node, split.upper(learner, split.lower(node, x)))
        np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-6)


def test_bits_both_ways_by_hand():
    """digits (n = 64, C = 10), the MLP 64-8-10 cut after its first layer (m = 8 activations), b = 5:
    up 5*8*32 activations + 8 ceil(5*4/8) labels + (64*8 + 8)*32 lower layers; down 5*8*32 + the same."""
    config = RunConfig(method="split", model="mlp:8", split_cut=1, num_nodes=2, batch_size=5, checkpoint_every=0)
    exp, _, bits, _ = engine_rounds(config)
    lower = (64 * 8 + 8) * 32
    expected = {"activations": 5 * 8 * 32, "labels": 24, "node_layers": lower}
    for part, value in expected.items():
        assert ledger.host_per_entry(bits[part]).tolist() == [[value, value]], part
    assert ledger.host_per_entry(bits["total"]).tolist() == [[sum(expected.values())] * 2]
    assert engine.downlink_parts(exp.method, exp.params) == (0, 5 * 8 * 32 + lower)
    # At B = 3 bits: 8 ceil(8*3/8) bits of codes and an fp16 min and max per sample.
    _, _, bits, _ = engine_rounds(config.replace(split_bits=3))
    assert ledger.host_per_entry(bits["activations"]).tolist() == [[5 * (24 + 32)] * 2]


def test_u_shaped_bits_both_ways_by_hand():
    """The MLP 64-8-6-10, the node holding its first and last layers: no labels cross; up the
    activations (5*8*32), the top gradients (5*6*32) and both layers ((64*8+8 + 6*10+10)*32); down the
    top activations, the activation gradients and the same layers."""
    config = RunConfig(method="split", model="mlp:8x6", split_cut=1, split_top=1, num_nodes=2, batch_size=5,
                       checkpoint_every=0)
    exp, _, bits, _ = engine_rounds(config)
    layers = (64 * 8 + 8 + 6 * 10 + 10) * 32
    expected = {"activations": 5 * 8 * 32, "top_gradients": 5 * 6 * 32, "node_layers": layers}
    assert set(bits) == set(expected) | {"total"}
    for part, value in expected.items():
        assert ledger.host_per_entry(bits[part]).tolist() == [[value, value]], part
    assert ledger.host_per_entry(bits["total"]).tolist() == [[sum(expected.values())] * 2]
    assert engine.downlink_parts(exp.method, exp.params) == (0, 5 * 6 * 32 + 5 * 8 * 32 + layers)
    assert exp.method.name == "split_u:1:1"


def test_the_comparison_charges_the_replies_as_downlink(tmp_path):
    config = RunConfig(method="split", model="mlp:8", num_nodes=2, batch_size=5, rounds=4, eval_every=2,
                       checkpoint_every=0)
    train(config, tmp_path / "run")
    header, *rounds = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    down = 5 * 8 * 32 + (64 * 8 + 8) * 32
    assert header["downlink_parts_per_node_per_round"] == {"model": 0, "replies": down}
    assert not compare.relays(header, rounds) and compare._downlink_kind(header, rounds) == "replies"
    assert compare._per_seed(header, rounds, 0.5)["downlink_bits_per_round"] == down
    # Were the replies above 32 d, they would still be replies, not a model broadcast.
    big = {**header, "downlink_bits_per_node_per_round": 64 * header["model"]["params"],
           "downlink_parts_per_node_per_round": {"model": 0, "replies": 64 * header["model"]["params"]}}
    assert compare._downlink_kind(big, rounds) == "replies"


@pytest.mark.parametrize("nodes,top", [(1, 0), (2, 0), (2, 1)])
def test_a_round_is_data_parallel_sgd_on_the_whole_model(nodes, top):
    """fp32 activations: the chain rule splits the gradient, and the average of the nodes' momentum
    steps is the momentum step on the averaged gradient; so 3 rounds equal 3 of SGD, to float rounding
    (U-shaped too: the node's head and lower layers, the learner's middle one)."""
    config = RunConfig(method="split", split_cut=2 - top, split_top=top, num_nodes=nodes, batch_size=16, lr=0.1,
                       momentum=0.9, checkpoint_every=0)
    split_exp, split_state, _, _ = engine_rounds(config, rounds=3)
    sgd_exp, sgd_state, _, _ = engine_rounds(config.replace(method="sgd", split_cut=1, split_top=0), rounds=3)
    split_params = engine.fetch(engine.model_params(split_exp.method, split_state))
    sgd_params = engine.fetch(sgd_state.params)
    assert jax.tree_util.tree_structure(split_params) == jax.tree_util.tree_structure(sgd_params)
    start = jax.tree_util.tree_leaves(split_exp.params)
    for a, b, w0 in zip(jax.tree_util.tree_leaves(split_params), jax.tree_util.tree_leaves(sgd_params), start):
        assert not np.allclose(b, w0)  # the rounds moved every layer, the lower ones included
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Every node holds the average; the learner holds its own layer only.
    node = engine.fetch(split_state.node_states.layers)
    np.testing.assert_allclose(node["Dense_0"]["kernel"][-1], split_params["Dense_0"]["kernel"], rtol=1e-6)
    assert set(engine.fetch(split_state.params)) == {"Dense_1" if top else "Dense_2"}


def test_trains_on_digits(tmp_path):
    """60 rounds, 4 nodes, batch 32: fp32 activations reach what SGD reaches (test_a_round_is_... shows
    it is SGD); 4-bit activations stay above 0.9 (SGD's run is about 0.95 here)."""
    base = RunConfig(method="split", split_cut=1, num_nodes=4, batch_size=32, rounds=60, eval_every=60,
                     checkpoint_every=0, lr=0.1)
    fp32 = train(base, tmp_path / "fp32")
    four = train(base.replace(split_bits=4), tmp_path / "four")
    u_shaped = train(base.replace(split_bits=4, split_top=1), tmp_path / "u")
    assert min(fp32["test_accuracy"], four["test_accuracy"], u_shaped["test_accuracy"]) > 0.9
    assert "labels" not in u_shaped["uplink_bits_last_round_per_node"]
    up = lambda record: record["uplink_bits_last_round_per_node"]["activations"]
    assert up(four) < up(fp32) / 4


_DEVICES_SCRIPT = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, sys.argv[1])  # the checkout, for tests.engine_rounds
import jax, numpy as np
from qdata import engine
from qdata.config import RunConfig
from tests.engine_rounds import engine_rounds
out = {}
for top, devices in ((0, 1), (0, 2), (1, 1), (1, 2)):
    config = RunConfig(method="split", split_cut=1, split_top=top, split_bits=4, num_nodes=4, batch_size=8, lr=0.1)
    exp, state, bits, _ = engine_rounds(config, 3, devices)
    params = engine.fetch(engine.model_params(exp.method, state))
    out[f"{top}:{devices}"] = {"params": [np.asarray(p).tolist() for p in jax.tree_util.tree_leaves(params)],
                               "bits": np.asarray(bits["total"]).tolist()}
print(json.dumps(out))
"""


def test_two_devices_equal_one_device():
    """The average of the lower layers sums across devices (the learner's own reduction)."""
    out = run_json(_DEVICES_SCRIPT, str(Path(__file__).resolve().parents[1]))
    for top in (0, 1):
        one, two = out[f"{top}:1"], out[f"{top}:2"]
        assert one["bits"] == two["bits"]
        for a, b in zip(one["params"], two["params"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("changes,match", [
    ({"split_cut": 3}, r"split_cut=3, split_top=0: the model MLP has 3 layer\(s\) \(Dense_0, Dense_1, Dense_2\)"
                       r".*must be an integer in 1\.\.2"),
    ({"split_cut": 2, "model": "mlp:32"}, r"2 layer\(s\).*1\.\.1"),
    ({"split_cut": 2, "split_top": 1}, r"in 1\.\.1"),
    ({"split_top": 2, "model": "mlp:32"}, "nothing to split"),
    ({"model": "logreg"}, "nothing to split"),
    ({"model": "resnet20"}, "chain of layers"),
    ({"split_cut": 0}, "split_cut must be an integer in 1"),
    ({"faults": "drop:1:0.5"}, "not built"),
])
def test_bad_settings_are_refused_before_any_work(changes, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(method="split", **changes)


def test_split_fields_need_method_split():
    with pytest.raises(ValueError, match="split_bits=4 is used only with method='split'"):
        RunConfig(method="sgd", split_bits=4)
    with pytest.raises(ValueError, match="chain of layers"):
        cut_model(models.make_model("resnet20", 10), 1)


def test_the_every_method_lineup_holds_both_variants():
    from qdata.lineup import load_lineup

    runs = [r.config for r in load_lineup("all_digits.toml").runs if r.config.method == "split"]
    assert {(c.split_top > 0, c.split_bits) for c in runs} == {(False, 0), (False, 4), (True, 4)}
