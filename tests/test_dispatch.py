"""Data-dependent dispatch with local models (Dick et al. 2017): the replicated balanced assignment,
bits by hand on a tiny configuration, routing, refusals, and training on digits against SGD."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdata import data as qdata_data
from qdata import results as qresults
from qdata.config import RunConfig
from qdata.methods import dispatch
from qdata.run import train


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), k=st.integers(1, 6), p=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_replicated_assignment_fills_exact_shares_with_distinct_clusters(n, k, p, seed):
    """Every point in p distinct clusters, cluster k holding floor or ceil of N p / K, for any
    distances (ties and the repair included)."""
    p = min(p, k)
    rng = np.random.default_rng(seed)
    dist = rng.integers(0, 4, size=(n, k)).astype(float)  # small integers: many ties
    held = qdata_data.balanced_assignment(dist, p)
    assert (held.sum(axis=1) == p).all()
    sizes = held.sum(axis=0)
    assert sizes.sum() == n * p and sizes.max() - sizes.min() <= 1 and sizes.max() == -(-n * p // k)


def test_replication_one_is_the_similarity_partition():
    ds = qdata_data.load_dataset("digits")
    x = ds.to_float(ds.x_train)
    clusters = qdata_data.similarity_clusters(x, 4, 3)
    for a, b in zip(clusters.members, qdata_data.partition_similarity(x, 4, 3)):
        np.testing.assert_array_equal(a, b)
    # The centres, mapped back from the PCA space, route every training point of the unbalanced
    # clustering to its own cluster (nearest centre there = nearest in the PCA space).
    raw = qdata_data.similarity_clusters(x, 4, 3, balanced=False)
    own = np.empty(len(x), int)
    for k, members in enumerate(raw.members):
        own[members] = k
    np.testing.assert_array_equal(qdata_data.nearest_centres(x, raw.centres)[:, 0], own)


def _tiny(num_classes=2):
    """12 samples of 2 pixels (uint8, 8 bits a value as stored): blob A near 1, blob B near 15.
    Node 0 holds rows 0-5 (A: 0-3, B: 4, 5); node 1 rows 6-11 (B: 6, 7, 10, 11; A: 8, 9)."""
    a, b = [[1, 1], [1, 2], [2, 1], [2, 2]], [[15, 15], [14, 15]]
    x = np.array(a + b + b + a[:2] + b, np.uint8)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1], np.int32)
    ds = qdata_data.Dataset(x_train=x, y_train=y, x_test=x, y_test=y, num_classes=num_classes, name="tiny",
                            x_divisor=16.0)
    index, count = qdata_data.stack_nodes([np.arange(6), np.arange(6, 12)])
    return ds, index, count


def test_bits_by_hand_on_twelve_samples_and_two_nodes():
    ds, index, count = _tiny()
    plan = dispatch.dispatch_plan(ds.to_float(ds.x_train), index, count, seed=0)  # m = 64: every row is fitted on
    # Cluster A goes to node 0 (it holds 4 of A's 6), B to node 1: rows 4, 5 move 0 -> 1, rows 8, 9 move 1 -> 0.
    assert sorted(plan.shards[0].tolist()) == [0, 1, 2, 3, 8, 9] and sorted(plan.shards[1].tolist()) == [4, 5, 6, 7, 10, 11]
    np.testing.assert_array_equal(plan.moves, [[0, 2], [2, 0]])
    for i in range(2):
        up = dispatch.messages_bits(dispatch.node_uplink(ds, plan, i))
        # The fit sample: 6 samples x 2 pixels x 8 bits; the balanced assignment's distances: 6 samples x 2
        # centres x float32; then the moved 2 samples x 2 pixels x 8 bits, 2 labels of ceil(log2 2) = 1 bit in
        # one byte, one int32 count (N - 1 = 1).
        assert up == {"fit_samples": 96, "distances": 384, "samples": 32, "labels": 8, "counts": 32, "total": 552}
        down = dispatch.messages_bits(dispatch.node_downlink(ds, plan, i))
        # The 2 x 2 float32 centres; 6 destinations of ceil(log2 2) = 1 bit in one byte; the 2 samples and labels
        # relayed, one int32 count.
        assert down == {"centres": 128, "destinations": 8, "samples": 32, "labels": 8, "count": 32, "total": 208}
    x, y = dispatch.decode_samples(dispatch.encode_incoming(ds, plan, 0))
    np.testing.assert_array_equal(x, ds.x_train[[8, 9]])
    np.testing.assert_array_equal(y, [0, 0])
    # With 3 classes a label takes 2 bits: still one byte for 2 labels. With p = 2 every sample is
    # on both nodes: each node sends its 6 samples (6 x 16 bits, 6 labels of 1 bit in a byte) and
    # receives 12 destinations (1 bit each: two bytes).
    plan2 = dispatch.dispatch_plan(ds.to_float(ds.x_train), index, count, replication=2, seed=0)
    up = dispatch.messages_bits(dispatch.node_uplink(ds, plan2, 0))
    assert up == {"fit_samples": 96, "distances": 384, "samples": 96, "labels": 8, "counts": 32, "total": 616}
    assert dispatch.message_bits(dispatch.encode_destinations(plan2, 0)) == {"destinations": 16, "total": 16}
    np.testing.assert_array_equal(dispatch.decode_destinations(dispatch.encode_destinations(plan2, 0)), [0, 1] * 6)


def test_what_the_dispatcher_decodes_is_what_it_used():
    """The centres are fitted on the decoded fit samples only, the balanced assignment is solved on the
    decoded distances, and each node reads its samples' destinations off its message."""
    ds, index, count = _tiny()
    x_float = ds.to_float(ds.x_train)
    plan = dispatch.dispatch_plan(x_float, index, count, seed=0, fit_samples=4)
    fitted = [dispatch.encode_fit_sample(ds, plan, i).arrays["fit_samples"] for i in range(2)]
    for i, rows in enumerate(plan.fit_rows):
        assert len(rows) == 4 and set(rows.tolist()) <= set(range(6 * i, 6 * i + 6))
        np.testing.assert_array_equal(fitted[i], ds.x_train[rows])  # raw, as stored (uint8)
    assert dispatch.message_bits(dispatch.encode_fit_sample(ds, plan, 0)) == {"fit_samples": 4 * 2 * 8, "total": 64}
    np.testing.assert_array_equal(
        plan.clusters.centres, qdata_data.fit_centres(ds.to_float(ds.x_train[np.sort(np.concatenate(plan.fit_rows))]), 2, 0))
    received = np.concatenate([dispatch.encode_affinities(plan, i).arrays["distances"] for i in range(2)])
    assert received.dtype == np.float32
    np.testing.assert_array_equal(received, qdata_data.centre_distances(x_float, plan.clusters.centres))
    held = qdata_data.balanced_assignment(received)
    for i in range(2):
        rows = np.arange(6 * i, 6 * i + 6)
        np.testing.assert_array_equal(dispatch.decode_destinations(dispatch.encode_destinations(plan, i)),
                                      plan.node_of_cluster[held[rows].argmax(1)])
    # The same seed, the same fit sample and plan; the balanced plan's destinations are the ones the rows went to.
    again = dispatch.dispatch_plan(x_float, index, count, seed=0, fit_samples=4)
    assert all((a == b).all() for a, b in zip(again.fit_rows, plan.fit_rows))
    for j, shard in enumerate(plan.shards):
        assert (plan.destinations[shard] == j).any(axis=1).all()


def test_unbalanced_dispatch_sends_cluster_counts_and_receives_the_matching():
    """Without capacities a node finds its samples' nearest centres itself: it sends k int32 counts
    (its copies per cluster) and every node receives the node of each cluster (k codes of ceil(log2 N) bits)."""
    ds, index, count = _tiny()
    plan = dispatch.dispatch_plan(ds.to_float(ds.x_train), index, count, balanced=False, seed=0)
    assert plan.distances is None
    np.testing.assert_array_equal(plan.moves, [[0, 2], [2, 0]])  # the blobs are the nearest-centre clusters too
    for i in range(2):
        messages = dispatch.node_uplink(ds, plan, i)
        assert sorted(messages[1].arrays["cluster_counts"].tolist()) == [2, 4]  # 4 of its own blob, 2 of the other
        assert dispatch.messages_bits(messages) == {"fit_samples": 96, "cluster_counts": 64, "samples": 32,
                                                    "labels": 8, "counts": 32, "total": 232}
        down = dispatch.node_downlink(ds, plan, i)
        assert dispatch.messages_bits(down) == {"centres": 128, "node_of_cluster": 8, "samples": 32, "labels": 8,
                                                "count": 32, "total": 208}
        np.testing.assert_array_equal(dispatch.decode_destinations(down[1]), plan.node_of_cluster)
    # The matching sends each cluster to the node holding most of it.
    counts = np.stack([dispatch.encode_affinities(plan, i).arrays["cluster_counts"] for i in range(2)])
    np.testing.assert_array_equal(counts.argmax(0), plan.node_of_cluster)


def test_samples_at_their_clusters_node_cost_nothing_and_the_results_file_charges_the_messages(tmp_path):
    ds = qdata_data.load_dataset("digits")
    n, fit_all = ds.n, 10_000
    config = RunConfig(method="dispatch", dataset="digits", model="mlp:32", num_nodes=4, batch_size=16, rounds=20,
                       eval_every=10, checkpoint_every=0, partition="similarity:unbalanced", dispatch_balanced=False,
                       dispatch_fit_samples=fit_all)
    # The base partition is the dispatch's own clustering (its k-means fitted on every sample): nothing moves.
    train(config, tmp_path / "sim")
    header, rounds = qresults.load(tmp_path / "sim")
    assert header["one_shot"]["moved_per_node"] == [0, 0, 0, 0]
    assert sum(header["one_shot"]["fit_samples_per_node"]) == ds.num_train
    assert header["one_shot"]["parts"] == {"fit_samples": ds.num_train * n * 8, "cluster_counts": 4 * 4 * 32,
                                           "samples": 0, "labels": 0, "counts": 4 * 3 * 32,
                                           "total": ds.num_train * n * 8 + 4 * 4 * 32 + 4 * 3 * 32}
    # The 4 x n float32 centres, the 4 clusters' nodes at 2 bits in one byte, one int32 count.
    assert header["one_shot"]["downlink_bits_per_node"] == [4 * n * 32 + 8 + 32] * 4
    iid = config.replace(partition="iid", dispatch_balanced=True, dispatch_fit_samples=64)
    train(iid, tmp_path / "iid")
    header, rounds = qresults.load(tmp_path / "iid")
    moved, parts = sum(header["one_shot"]["moved_per_node"]), header["one_shot"]["parts"]
    assert header["one_shot"]["fit_samples_per_node"] == [64] * 4
    assert parts["fit_samples"] == 4 * 64 * n * 8 and parts["distances"] == ds.num_train * 4 * 32
    assert parts["samples"] == moved * n * 8 and header["one_shot"]["sample_bits"] == 8 * n
    assert rounds[0]["cumulative_uplink_bits_per_node"] == rounds[-1]["cumulative_uplink_bits_per_node"] \
        == parts["total"] / 4
    assert rounds[-1]["cumulative_downlink_bits"] == sum(header["one_shot"]["downlink_bits_per_node"])
    assert header["one_shot"]["downlink_parts"]["destinations"] == 8 * sum(-(-c * 2 // 8) for c in
                                                                          np.bincount(_homes(iid, ds), minlength=4))
    from qdata import compare

    assert compare._downlink_kind(header, rounds) == "one-shot"
    assert compare.downlink_per_node(header, rounds, 20, 0.0) == sum(header["one_shot"]["downlink_bits_per_node"]) / 4


def _homes(config, ds):
    """The node each training row sits at under ``config``'s base partition."""
    parts = qdata_data.partition(config.partition, ds, config.num_nodes, config.seed)
    home = np.empty(ds.num_train, np.int64)
    for i, rows in enumerate(parts):
        home[rows] = i
    return home


def test_points_go_to_their_nearest_centres_model():
    """Node j's fake model says class j: the routed class is the node of the nearest centre, and a
    vote of the p nearest is the mean of their outputs."""
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    x = np.array([[0.1, 0.0], [0.9, 0.1], [0.1, 0.8], [0.6, 0.0], [0.2, 0.7]], np.float32)
    probs = lambda stacked, xb: np.broadcast_to(np.eye(3)[:, None, :], (3, len(xb), 3))
    routes = qdata_data.nearest_centres(x, centres, 2)
    np.testing.assert_array_equal(routes[:, 0], [0, 1, 2, 1, 2])
    nearest = dispatch.routed_predictions(probs, None, x, routes, "nearest", lambda v: v)
    np.testing.assert_array_equal(nearest.argmax(1), [0, 1, 2, 1, 2])
    vote = dispatch.routed_predictions(probs, None, x, routes, "vote", lambda v: v)
    np.testing.assert_allclose(vote.sum(1), 1.0)
    np.testing.assert_allclose(vote[0], [0.5, 0.5, 0.0])  # nearest (0, 0), then (1, 0)
    with pytest.raises(ValueError, match="route must be one of"):
        dispatch.routed_predictions(probs, None, x, routes, "mean", lambda v: v)


def test_local_models_learn_a_toy_no_single_linear_model_fits(tmp_path):
    """Two far-apart blobs (x1 near -6 and near 6) whose labels follow opposite rules (class = x0 > 0 in one, < 0
    in the other): one logistic regression cannot fit both, the routed local models do."""
    rng = np.random.default_rng(0)

    def blob(offset, flip, count):
        x = rng.uniform(-1, 1, size=(count, 2)).astype(np.float32)
        y = ((x[:, 0] > 0) ^ flip).astype(np.int32)
        return x + offset, y

    (xa, ya), (xb, yb) = blob(np.float32([0, -6]), False, 200), blob(np.float32([0, 6]), True, 200)
    order = rng.permutation(300)  # 150 of each blob to train on (balanced clusters hold exactly a blob)
    x_train, y_train = np.concatenate([xa[:150], xb[:150]])[order], np.concatenate([ya[:150], yb[:150]])[order]
    ds = qdata_data.Dataset(x_train=x_train, y_train=y_train, x_test=np.concatenate([xa[150:], xb[150:]]),
                            y_test=np.concatenate([ya[150:], yb[150:]]), num_classes=2, name="two opposite blobs",
                            synthetic=True, value_range=(-7.0, 7.0))
    common = dict(model="logreg", num_nodes=2, batch_size=16, rounds=300, eval_every=300, checkpoint_every=0, lr=0.5)
    exp_plan = dispatch.dispatch_plan(ds.x_train, *qdata_data.stack_nodes(qdata_data.partition_iid(ds.y_train, 2, 0)))
    assert {frozenset(np.sign(ds.x_train[s, 1]).tolist()) for s in exp_plan.shards} == {frozenset({-1.0}), frozenset({1.0})}
    from unittest import mock

    with mock.patch("qdata.data.load_dataset", lambda *a, **k: ds):
        sgd = train(RunConfig(method="sgd", **common), tmp_path / "sgd")
        local = train(RunConfig(method="dispatch", **common), tmp_path / "dispatch")
    # Measured: the routed local models 0.98, one model trained by SGD over both nodes 0.42.
    assert local["test_accuracy"] >= 0.95 and sgd["test_accuracy"] <= 0.8, (local["test_accuracy"], sgd["test_accuracy"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="dispatch_replication=2 is used only with method='dispatch'"):
        RunConfig(method="sgd", dispatch_replication=2)
    with pytest.raises(ValueError, match="dispatch_balanced"):
        RunConfig(method="qdata", dispatch_balanced=False)
    with pytest.raises(ValueError, match="dispatch_route must be one of 'nearest', 'vote'"):
        RunConfig(method="dispatch", dispatch_route="mean")
    with pytest.raises(ValueError, match=r"dispatch_replication must be an integer in 1..num_nodes=4"):
        RunConfig(method="dispatch", num_nodes=4, dispatch_replication=5)
    with pytest.raises(ValueError, match="dispatch_replication must be an integer in 1"):
        RunConfig(method="dispatch", dispatch_replication=0)
    with pytest.raises(ValueError, match="needs dispatch_replication >= 2"):
        RunConfig(method="dispatch", dispatch_route="vote")
    with pytest.raises(ValueError, match="one-shot"):
        RunConfig(method="dispatch", stream_start=0.5)
    with pytest.raises(ValueError, match=r"dispatch_fit_samples must be an integer in 1\.\."):
        RunConfig(method="dispatch", dispatch_fit_samples=0)
    with pytest.raises(ValueError, match="dispatch_fit_samples=8 is used only with method='dispatch'"):
        RunConfig(method="sgd", dispatch_fit_samples=8)
    with pytest.raises(ValueError, match="faults='none', integrity=false and num_devices=1"):
        RunConfig(method="dispatch", integrity=True)
    with pytest.raises(ValueError, match="replication=3 exceeds num_nodes=2"):
        qdata_data.similarity_clusters(np.zeros((10, 2), np.float32), 2, 0, replication=3)
    from qdata import models
    from qdata.methods import build_method

    ds = qdata_data.load_dataset("digits")
    with pytest.raises(ValueError, match="one-shot"):
        build_method(RunConfig(method="dispatch"), models.make_model("mlp", 10), ds, 10)


def test_trains_on_digits_against_sgd(tmp_path):
    common = dict(dataset="digits", model="mlp:64", num_nodes=4, batch_size=32, rounds=120, eval_every=60,
                  checkpoint_every=0, lr=0.1, validation=0.1)
    sgd = train(RunConfig(method="sgd", **common), tmp_path / "sgd")
    one = train(RunConfig(method="dispatch", **common), tmp_path / "p1")
    vote = train(RunConfig(method="dispatch", dispatch_replication=2, dispatch_route="vote", **common), tmp_path / "p2")
    header, _ = qresults.load(tmp_path / "p2")
    assert header["method"] == "dispatch:2:balanced:vote" and "val_accuracy" in vote
    assert sorted(header["one_shot"]["shard_sizes"]) == [646, 646, 647, 647]  # 2 x 1293 copies over 4 nodes
    # Stated (measured at these settings, seed 0): SGD 0.964, dispatch p = 1 0.936, p = 2 with a vote 0.958.
    assert one["test_accuracy"] >= sgd["test_accuracy"] - 0.07, (one["test_accuracy"], sgd["test_accuracy"])
    assert vote["test_accuracy"] >= sgd["test_accuracy"] - 0.03, (vote["test_accuracy"], sgd["test_accuracy"])


def test_an_unbalanced_dispatch_refuses_a_cluster_that_is_nobodys_nearest_centre():
    """Without capacities a centre fitted on the sample may be no training sample's nearest (a cluster
    of outliers of the sample): its node would train on nothing. Refused, naming the cluster."""
    x = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0], [1.1, 1.0]], np.float32)
    centres = np.array([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]], np.float32)
    held = dispatch._memberships(x, centres[:2], None, 1)
    assert held.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    with pytest.raises(ValueError, match=r"clusters \[2\] are nobody's nearest centre.*dispatch_balanced=True"):
        dispatch._memberships(x, centres, None, 1)
