"""Data-dependent dispatch with local models: one-shot, each sample goes to the node of its cluster.

Dick, Li, Kumar, Konecny, Zhang, Sohn and Balcan, "Data Driven Resource Allocation for Distributed
Learning", AISTATS 2017 (arXiv:1512.04848): cluster the data into k balanced clusters with
replication p, send each cluster to one machine, train one model per machine on its own data with
no communication, and predict a point with the model of its nearest cluster centre.

1. **Clustering** (:func:`qdata.data.similarity_clusters`, the k-means of ``partition="similarity"``
   with replication added): k = N clusters of the training set, each sample assigned to its p
   nearest centres; with ``dispatch_balanced`` the sizes are bounded, cluster k holding exactly
   floor(N p / k) or ceil(N p / k) samples (the paper's bounds ``l N <= |C_k| <= L N`` at their
   tightest), else raw nearest-centre sizes. Cluster k goes to the node that already holds most of
   its samples (a maximum-weight matching, :func:`scipy.optimize.linear_sum_assignment`), so the
   fewest samples move.
2. **Dispatch.** The samples sit where the run's partition (``config.partition``, the base placement:
   iid unless set) put them. Each sample copy whose cluster's node is not the node holding it moves
   there, raw, in the dataset's stored type: uint8 for 8-bit images and for digits (whose 0..16
   intensities are stored as uint8: 8 bits a value, as the dataset holds them; 5 would do), float32
   for float data (32 bits a value). Links are the project's node-learner links (DESIGN.md section 1,
   a star): a moved sample crosses its source's uplink and, relayed by the learner, its
   destination's downlink. Node i's uplink (:func:`encode_outgoing`): its outgoing samples grouped by
   destination, their labels packed at ``ceil(log2 C)`` bits into bytes, and N - 1 int32 counts (one
   per other node, zeros included). Node j's downlink (:func:`encode_incoming`): the samples sent to
   it, their labels, one int32 count, and the k x n float32 centres (broadcast to every node).
3. **Local models.** Each node trains its own copy of the model (the run's initial parameters) on
   its own shard only, with the run's optimizer, batch size and rounds (one step a round, a batch of
   ``batch_size`` drawn from its shard), no communication: the N models train together under
   ``jax.vmap`` (:func:`train_local_models`). The engine's round (:mod:`qdata.engine`) is not used:
   its learner holds one model and its messages are uplink traffic, where here nothing is sent.
4. **Routing** (:func:`routed_predictions`): a test (or validation) point goes to the model of its
   nearest centre (``dispatch_route="nearest"``), or, with p >= 2, its p nearest centres' models
   average their softmax probabilities (``"vote"``). The results' ``train_loss`` is the routed
   (nearest) model's mean loss on the first 2048 training samples.

Bits, read off the payloads (:func:`message_bits`); every part per node, exact:

* uplink of node i: ``sum_j m_ij (8 n or 32 n)`` sample bits + ``8 ceil(m_i ceil(log2 C) / 8)``
  label bits (``m_i = sum_j m_ij`` copies leaving node i) + ``32 (N - 1)`` count bits;
* downlink of node j: the same sample and label bits for the ``m_j`` copies it receives, 32 count
  bits, and ``32 k n`` centre bits.

Samples that already sit at their cluster's node cost nothing. **Not charged**: the clustering
itself (k-means fitted on the whole training set in one place, as ``partition="similarity"`` does;
the paper fits it on a small sample at the dispatcher, which would add that sample's raw bits), the
coordination a balanced assignment needs (the capacities tie every sample's destination to the
others'; with ``dispatch_balanced=False`` a node computes its samples' destinations from the
centres alone), and inference routing (the centres and the models at prediction time, as for every
method). The results file reads like a per-round method's: all of the one-shot traffic is paid
before the first round, and nothing afterwards; the downlink is recorded in the header's
``one_shot`` (``downlink_bits_per_node``), which :mod:`qdata.compare` adds to the total.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qdata.codecs import packing
from qdata.codecs.payloads import Payload, payload_bits
from qdata.data import Clusters, Dataset, nearest_centres, similarity_clusters, stack_nodes

ROUTES = ("nearest", "vote")


class Plan(NamedTuple):
    """Where every sample copy goes.

    Attributes:
      clusters: the :class:`~qdata.data.Clusters` (members per cluster, the k centres).
      node_of_cluster: (k,) the node that receives cluster k.
      home: (num_train,) the node each training sample sits at before the dispatch (-1: at none).
      shards: per node, the training rows it holds after the dispatch, its kept samples first.
      moves: (N, N) int64, ``moves[i, j]`` the sample copies node i sends to node j (diagonal 0).
      centres: (N, n) float32, node j's cluster's centre in row j (what is broadcast, and routes by).
    """

    clusters: Clusters
    node_of_cluster: np.ndarray
    home: np.ndarray
    shards: list
    moves: np.ndarray
    centres: np.ndarray


def dispatch_plan(x_float, index, count, *, replication: int = 1, balanced: bool = True, seed: int = 0) -> Plan:
    """The dispatch of a training set held as ``index``/``count`` (:func:`qdata.data.stack_nodes`).

    Args:
      x_float: (num_train, ...) the training samples' float values (what k-means clusters).
      index, count: where the samples sit: node i holds rows ``index[i, :count[i]]``.
      replication: p, the clusters each sample goes to.
      balanced: bounded cluster sizes (:func:`qdata.data.similarity_clusters`).
      seed: the clustering's seed.
    """
    from scipy.optimize import linear_sum_assignment

    index, count = np.asarray(index), np.asarray(count).reshape(-1)
    nodes = len(count)
    home = np.full(len(x_float), -1, np.int64)
    for i, (rows, c) in enumerate(zip(index, count)):
        home[rows[:c]] = i
    if (home < 0).any():
        raise ValueError(f"{int((home < 0).sum())} training samples sit at no node: the dispatch moves samples from "
                         "where a partition of the whole training set put them")
    clusters = similarity_clusters(x_float, nodes, seed, balanced=balanced, replication=replication)
    overlap = np.zeros((nodes, nodes), np.int64)  # overlap[k, i]: cluster k's members at node i
    for k, members in enumerate(clusters.members):
        at = home[members]
        np.add.at(overlap[k], at[at >= 0], 1)
    rows, cols = linear_sum_assignment(-overlap)
    node_of_cluster = np.empty(nodes, np.int64)
    node_of_cluster[rows] = cols
    shards, moves = [None] * nodes, np.zeros((nodes, nodes), np.int64)
    for k, members in enumerate(clusters.members):
        j = node_of_cluster[k]
        kept = members[home[members] == j]
        shards[j] = np.concatenate([kept, members[home[members] != j]])
        np.add.at(moves[:, j], home[members][home[members] != j], 1)
    centres = np.empty_like(clusters.centres)
    centres[node_of_cluster] = clusters.centres
    return Plan(clusters, node_of_cluster, home, shards, moves, centres)


def _incoming(plan: Plan, j: int, source: int | None = None) -> np.ndarray:
    """The rows node j receives (from ``source`` only, if given), in their shard order."""
    rows = plan.shards[j]
    arrived = rows[plan.home[rows] != j]
    return arrived if source is None else arrived[plan.home[arrived] == source]


def _labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.asarray(packing.pack_codes(np.asarray(y, np.uint32), packing.index_width(num_classes)))


def encode_outgoing(dataset: Dataset, plan: Plan, i: int) -> Payload:
    """Node i's one uplink message: the samples it sends, grouped by destination (the other nodes in
    order), in the dataset's stored type; their labels packed; N - 1 int32 counts."""
    others = [j for j in range(len(plan.shards)) if j != i]
    rows = np.concatenate([_incoming(plan, j, source=i) for j in others]).astype(np.int64)
    counts = np.array([len(_incoming(plan, j, source=i)) for j in others], np.int32)
    return Payload(arrays={"samples": dataset.x_train[rows], "labels": _labels(dataset.y_train[rows], dataset.num_classes),
                           "counts": counts}, meta=(dataset.num_classes, packing.index_width(dataset.num_classes)))


def encode_incoming(dataset: Dataset, plan: Plan, j: int) -> Payload:
    """Node j's one downlink message: the samples relayed to it, their labels packed, one int32
    count, and the k x n float32 centres (row j: node j's cluster's centre)."""
    rows = _incoming(plan, j)
    return Payload(arrays={"samples": dataset.x_train[rows], "labels": _labels(dataset.y_train[rows], dataset.num_classes),
                           "count": np.asarray(len(rows), np.int32),
                           "centres": np.asarray(plan.centres, np.float32)},
                   meta=(dataset.num_classes, packing.index_width(dataset.num_classes)))


def message_bits(message: Payload) -> dict[str, int]:
    """Exact bits of one message, part by part, read off its arrays."""
    parts = {k: payload_bits(Payload(arrays={k: v})) for k, v in message.arrays.items()}
    return {**parts, "total": sum(parts.values())}


def decode_samples(message: Payload) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a message, as the receiver reads it: the samples as stored, the labels int32."""
    _, width = message.meta
    x = message.arrays["samples"]
    return x, np.asarray(packing.unpack_codes(message.arrays["labels"], width, len(x)), np.int32)


def node_datasets(dataset: Dataset, plan: Plan, incoming: list[Payload]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the nodes hold after the dispatch, as one stacked training set: ``(x, y, index, count)``,
    node j's samples its kept rows then those decoded from its downlink message."""
    xs, ys, spans = [], [], []
    start = 0
    for j, message in enumerate(incoming):
        kept = plan.shards[j][plan.home[plan.shards[j]] == j]
        x_in, y_in = decode_samples(message)
        xs += [dataset.x_train[kept], x_in]
        ys += [dataset.y_train[kept], y_in]
        size = len(kept) + len(x_in)
        spans.append(np.arange(start, start + size))
        start += size
    index, count = stack_nodes(spans)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int32), index, count


# ----------------------------------------------------------------------------------------------
# Local models and their routed predictions.


def stack_params(params, copies: int):
    """``copies`` copies of ``params`` on a leading node axis."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (copies,) + a.shape), params)


def make_local_step(loss_fn: Callable, optimizer: optax.GradientTransformation, x, y, index, count,
                    batch_size: int, to_float: Callable):
    """``steps(params, opt_state, key, rounds) -> (params, opt_state, losses)``: ``rounds`` local steps
    of every node at once (vmap), jitted; each node draws ``batch_size`` of its own rows with
    replacement (:func:`qdata.data.sample_batch`) and applies its own gradient to its own model."""
    from qdata.data import sample_batch

    x, y = jnp.asarray(x), jnp.asarray(y)
    index, count = jnp.asarray(index), jnp.asarray(count)

    def one_node(params, opt_state, key, rows, n):
        ids, _ = sample_batch(key, rows, n, batch_size)
        loss, grad = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, to_float(x[ids]), y[ids])))(params)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step(carry, key):
        params, opt_state = carry
        keys = jax.random.split(key, index.shape[0])
        params, opt_state, loss = jax.vmap(one_node)(params, opt_state, keys, index, count)
        return (params, opt_state), loss

    @jax.jit
    def steps(params, opt_state, keys):
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
        return params, opt_state, losses

    return steps


def node_probabilities(model) -> Callable:
    """``probs(stacked, x) -> (N, m, C)``: every node's model's softmax at points ``x``, jitted."""
    return jax.jit(jax.vmap(lambda p, xb: jax.nn.softmax(model.apply({"params": p}, xb)), in_axes=(0, None)))


def routed_predictions(probs: Callable, stacked, x, routes: np.ndarray, route: str, to_float: Callable,
                       batch_size: int = 1024) -> np.ndarray:
    """(m, C) float32 probabilities of the routed models at points ``x`` (``probs`` from
    :func:`node_probabilities`): the model of each point's nearest centre (``route="nearest"``,
    ``routes[:, 0]``), or the mean of its ``routes.shape[1]`` nearest centres' models' softmax (``"vote"``)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    out = []
    for start in range(0, len(x), batch_size):
        each = np.asarray(probs(stacked, to_float(np.asarray(x[start:start + batch_size]))))  # (N, b, C)
        chosen = routes[start:start + batch_size, : 1 if route == "nearest" else routes.shape[1]]
        out.append(each[chosen, np.arange(len(chosen))[:, None]].mean(axis=1))
    return np.concatenate(out)


def routed_accuracy(probs: Callable, stacked, x, y, centres, route: str, replication: int, to_float: Callable) -> float:
    """Share of points ``x`` whose routed prediction (:func:`routed_predictions`) is the label ``y``."""
    routes = nearest_centres(to_float(np.asarray(x)), centres, replication)
    return float(np.mean(routed_predictions(probs, stacked, x, routes, route, to_float).argmax(1) == np.asarray(y)))


# ----------------------------------------------------------------------------------------------
# A run: the dispatch once, the local training, one results file.


def _plain(config):
    """The config's data, partition and training without the dispatch fields (an SGD config)."""
    from qdata.config import RunConfig

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name.startswith("dispatch_")}
    return config.replace(method="sgd", **defaults)


def _exchange(config):
    """The experiment (data, base partition, model), the plan, every node's two messages, seconds."""
    from qdata.run import Experiment

    exp = Experiment(_plain(config))
    ds = exp.dataset
    start = time.perf_counter()
    plan = dispatch_plan(ds.to_float(ds.x_train), exp.index, exp.count, replication=config.dispatch_replication,
                         balanced=config.dispatch_balanced, seed=config.seed)
    learner_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outgoing = [encode_outgoing(ds, plan, i) for i in range(config.num_nodes)]
    node_seconds = time.perf_counter() - start
    incoming = [encode_incoming(ds, plan, j) for j in range(config.num_nodes)]
    return exp, plan, outgoing, incoming, {"node_seconds": node_seconds, "learner_seconds": learner_seconds}


def dispatch_phase_seconds(config) -> dict:
    """Wall seconds of the one exchange: the nodes' outgoing messages; the clustering and the plan."""
    return _exchange(config)[4]


def _sum_parts(parts: list[dict]) -> dict:
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def train_dispatch(config, out_dir, *, resume: bool = False, progress: bool = False) -> dict:
    """Run the dispatch for ``config`` (``method="dispatch"``): the one exchange, the N local models'
    training, and ``OUT/results.jsonl`` in the per-round methods' format (the one-shot uplink charged
    from the first evaluation on, the one-shot downlink in ``cumulative_downlink_bits``). No
    checkpoints: the run is redone whole (seconds on digits). Returns the last round's record."""
    from qdata import results as qresults
    from qdata.run import check_batch_fits, make_optimizer

    out = Path(out_dir)
    finished = qresults.finished_one_shot(out, config.rounds, resume)
    if finished is not None:
        return finished
    exp, plan, outgoing, incoming, _ = _exchange(config)
    ds, nodes = exp.dataset, config.num_nodes
    x, y, index, count = node_datasets(ds, plan, incoming)
    check_batch_fits(config, count)
    up = [message_bits(m) for m in outgoing]
    down = [message_bits(m) for m in incoming]
    up_total, down_total = _sum_parts(up), _sum_parts(down)
    header = {**exp.describe(), "config": config.to_dict(),
              "method": f"dispatch:{config.dispatch_replication}:{'balanced' if config.dispatch_balanced else 'unbalanced'}"
                        f":{config.dispatch_route}",
              "downlink_bits_per_node_per_round": 0, "downlink_parts_per_node_per_round": {"model": 0, "replies": 0},
              "one_shot": {"bits_per_node": [b["total"] for b in up], "parts": up_total,
                           "downlink_bits_per_node": [b["total"] for b in down], "downlink_parts": down_total,
                           "shard_sizes": [int(c) for c in count], "moved_per_node": plan.moves.sum(1).tolist(),
                           "sample_bits": int(8 * ds.x_train.dtype.itemsize * ds.n)}}
    optimizer = make_optimizer(config)
    stacked = stack_params(exp.params, nodes)
    opt_state = jax.vmap(optimizer.init)(stacked)
    steps = make_local_step(exp.loss_fn, optimizer, x, y, index, count, config.batch_size, ds.to_float)
    centres = plan.centres  # row j: node j's centre
    n_fit = min(len(ds.y_train), 2048)
    fit_routes = nearest_centres(ds.to_float(ds.x_train[:n_fit]), centres, 1)
    probs = node_probabilities(exp.model)
    per_node_up = up_total["total"] / nodes
    records, done, start = [header], 0, time.perf_counter()
    base_key = jax.random.PRNGKey(config.seed)
    while done < config.rounds:
        length = min(config.eval_every - done % config.eval_every, config.rounds - done)
        keys = jax.vmap(lambda t: jax.random.fold_in(base_key, t))(jnp.arange(done, done + length))
        stacked, opt_state, _ = steps(stacked, opt_state, keys)
        done += length
        fit = routed_predictions(probs, stacked, ds.x_train[:n_fit], fit_routes, "nearest", ds.to_float)
        train_loss = float(-np.mean(np.log(np.maximum(fit[np.arange(n_fit), ds.y_train[:n_fit]], 1e-30))))
        record = {"kind": "round", "round": done,
                  "test_accuracy": routed_accuracy(probs, stacked, ds.x_test, ds.y_test, centres,
                                                   config.dispatch_route, config.dispatch_replication, ds.to_float),
                  "train_loss": train_loss,
                  "uplink_bits_last_round_per_node": {k: 0.0 for k in up_total},
                  "cumulative_uplink_bits": dict(up_total), "cumulative_uplink_bits_per_node": per_node_up,
                  "cumulative_downlink_bits": down_total["total"], "encoder_counts": {},
                  "wall_seconds": time.perf_counter() - start}
        if exp.x_val is not None:
            record["val_accuracy"] = routed_accuracy(probs, stacked, exp.x_val, exp.y_val, centres,
                                                     config.dispatch_route, config.dispatch_replication, ds.to_float)
        if config.target_accuracy is not None:
            record["bits_to_target_per_node"] = qresults.bits_to_reach(records[1:] + [record], config.target_accuracy)
        if not math.isfinite(record["train_loss"]):
            record["diverged"] = True
        records.append(record)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records[-1]
