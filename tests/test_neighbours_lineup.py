"""The neighbouring methods' lineup parses, and the comparison charges their downlink as described."""

from qdata import compare
from qdata.lineup import load_lineup


def test_all_digits_lineup_holds_every_neighbouring_method():
    lineup = load_lineup("all_digits.toml")
    kinds = {(r.config.method, r.config.compressor.split(":")[0]) for r in lineup.runs}
    assert {("sgd", "fp32"), ("qdata", "fp32"), ("gradient", "topk"), ("gradient", "significance"),
            ("dca", "fp32"), ("dispatch", "fp32")} <= kinds
    assert lineup.reference.label == "sgd-fp32"


def _header(method, d=1000, nodes=5):
    return {"method": method, "config": {"num_nodes": nodes}, "model": {"params": d},
            "downlink_bits_per_node_per_round": 0 if method.startswith("dca") else 32 * d}


def test_significance_relays_where_smaller_and_dca_sends_nothing_down():
    small = [{"uplink_bits_last_round_per_node": {"total": 1000.0}}]
    large = [{"uplink_bits_last_round_per_node": {"total": 9000.0}}]
    assert compare.relays(_header("significance:0.1"), small)  # 4 x 1,000 < 32,000
    assert not compare.relays(_header("significance:0.1"), large)  # 4 x 9,000 > 32,000: the model
    dca = _header("dca:16:64:float16")
    assert not compare.relays(dca, small) and compare._downlink_kind(dca, small) == "none"


def test_the_dispatch_subset_is_the_lineups_own_rows():
    """experiments/all_digits_dispatch.toml runs the dispatch rows alone: the same base, seeds, grid
    and runs as all_digits.toml's, so its figures are that lineup's rows."""
    full, subset = load_lineup("all_digits.toml"), load_lineup("all_digits_dispatch.toml")
    assert (subset.base, subset.seeds, subset.tune_seeds) == (full.base, full.seeds, full.tune_seeds)
    rows = {r.label: r for r in full.runs}
    assert {r.label for r in subset.runs} == {"sgd-fp32", "dispatch-p1", "dispatch-p2-vote"}
    for r in subset.runs:
        assert (r.config, r.lr_grid, r.family) == (rows[r.label].config, rows[r.label].lr_grid, rows[r.label].family)
