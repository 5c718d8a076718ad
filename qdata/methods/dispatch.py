"""Data-dependent dispatch with local models: one-shot, each sample goes to the node of its cluster.

Dick, Li, Kumar, Konecny, Zhang, Sohn and Balcan, "Data Driven Resource Allocation for Distributed
Learning", AISTATS 2017 (arXiv:1512.04848): cluster the data into k balanced clusters with
replication p, send each cluster to one machine, train one model per machine on its own data with
no communication, and predict a point with the model of its nearest cluster centre.

1. **Clustering at the dispatcher** (the learner). Each node sends ``dispatch_fit_samples`` = m of
   its samples (all of a smaller shard; drawn with the run's seed, :func:`fit_sample`), raw in the
   dataset's stored type, no labels. The dispatcher fits k = N centres on those samples only, with
   the project's k-means (:func:`qdata.data.fit_centres`: the clustering of
   ``partition="similarity"``, on the top 50 principal components when n is larger), and sends the
   k x n float32 centres to every node. The paper clusters a small sample at the dispatcher and
   extends the rule to the rest (its abstract: "techniques for extending a dispatching rule from a
   small sample to the entire distribution"); the sample size here, 64 a node by default, is this
   project's choice, not the paper's. Each sample is assigned to p = ``dispatch_replication``
   clusters. With ``dispatch_balanced`` the sizes are bounded, cluster k holding exactly
   floor(N p / k) or ceil(N p / k) copies (the paper's bounds ``l N <= |C_k| <= L N`` at their
   tightest; :func:`qdata.data.balanced_assignment`): the capacities tie every sample's clusters to
   the others', so each node sends every sample's k distances to the centres (float32, Euclidean in
   the samples' float space) and the dispatcher solves the assignment on exactly those values. Else
   each node takes its samples' p nearest centres itself and sends only its k copy counts per
   cluster. Cluster k goes to the node that holds most of its copies (a maximum-weight matching,
   :func:`scipy.optimize.linear_sum_assignment`), so the fewest samples move; the dispatcher sends
   balanced, each node its samples' destinations (p node ids a sample), unbalanced, every node the
   node of each cluster.
2. **Dispatch.** The samples sit where the run's partition (``config.partition``, the base placement:
   iid unless set) put them. Each sample copy whose destination is not the node holding it moves
   there, raw, in the dataset's stored type: uint8 for 8-bit images and for digits (whose 0..16
   intensities are stored as uint8: 8 bits a value, as the dataset holds them; 5 would do), float32
   for float data (32 bits a value). Links are the project's node-learner links (DESIGN.md section 1,
   a star): a moved sample crosses its source's uplink and, relayed by the learner, its
   destination's downlink. Node i's samples message (:func:`encode_outgoing`): its outgoing samples
   grouped by destination, their labels packed at ``ceil(log2 C)`` bits into bytes, and N - 1 int32
   counts (one per other node, zeros included). Node j's (:func:`encode_incoming`): the samples sent
   to it, their labels, one int32 count.
3. **Local models.** Each node trains its own copy of the model (the run's initial parameters) on
   its own shard only, with the run's optimizer, batch size and rounds (one step a round, a batch of
   ``batch_size`` drawn from its shard), no communication: the N models train together under
   ``jax.vmap`` (:func:`train_local_models`). The engine's round (:mod:`qdata.engine`) is not used:
   its learner holds one model and its messages are uplink traffic, where here nothing is sent.
4. **Routing** (:func:`routed_predictions`): a test (or validation) point goes to the model of its
   nearest centre (``dispatch_route="nearest"``), or, with p >= 2, its p nearest centres' models
   average their softmax probabilities (``"vote"``). The results' ``train_loss`` is the routed
   (nearest) model's mean loss on the first 2048 training samples.

Bits, read off the payloads (:func:`message_bits`, :func:`messages_bits`); every part per node,
exact, in the order the messages cross (:func:`node_uplink`, :func:`node_downlink`):

* uplink of node i (c_i samples, ``m_i = min(m, c_i)`` fitted on, ``s_i`` bits a stored sample:
  ``8 n`` or ``32 n``): ``m_i s_i`` fit-sample bits (``fit_samples``); balanced, ``32 k c_i``
  distance bits (``distances``), unbalanced, ``32 k`` cluster-count bits (``cluster_counts``); then
  ``sum_j m_ij s_i`` moved-sample bits (``samples``) + ``8 ceil(M_i ceil(log2 C) / 8)`` label bits
  (``M_i = sum_j m_ij`` copies leaving node i) + ``32 (N - 1)`` count bits (``counts``);
* downlink of node j: ``32 k n`` centre bits (``centres``); balanced, ``8 ceil(c_j p ceil(log2 N) / 8)``
  destination bits (``destinations``), unbalanced, ``8 ceil(k ceil(log2 N) / 8)`` matching bits
  (``node_of_cluster``); then the sample and label bits of the copies it receives and 32 count bits.

A copy that already sits at its cluster's node costs nothing beyond the coordination. **Not
charged**: inference routing (the centres and the models at prediction time, as for every method),
and nothing is saved where it could be: a fit sample that must move is sent again (the dispatcher,
which holds it, could relay it), and the distances travel as float32 (fewer bits would likely do).
The results file reads like a per-round method's: all of the one-shot traffic is paid before the
first round, and nothing afterwards; the downlink is recorded in the header's ``one_shot``
(``downlink_bits_per_node``), which :mod:`qdata.compare` adds to the total.
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
from qdata.data import (Clusters, Dataset, balanced_assignment, centre_distances, fit_centres, nearest_centres,
                        stack_nodes)

ROUTES = ("nearest", "vote")


class Plan(NamedTuple):
    """Where every sample copy goes, and what the dispatch's coordination carried.

    Attributes:
      clusters: the :class:`~qdata.data.Clusters`: members per cluster (ascending rows), the k
        centres in cluster order (what is broadcast, and what the nodes measure distances to).
      node_of_cluster: (k,) the node that receives cluster k.
      home: (num_train,) the node each training sample sits at before the dispatch.
      shards: per node, the training rows it holds after the dispatch, its kept samples first.
      moves: (N, N) int64, ``moves[i, j]`` the sample copies node i sends to node j (diagonal 0).
      centres: (N, n) float32, node j's cluster's centre in row j (what routes test points).
      fit_rows: per node, the rows it sends for the k-means fit (ascending).
      distances: (num_train, k) float32 distances of every sample to the k centres, as the nodes
        send them (balanced only; None without the capacities).
      destinations: (num_train, p) int64, the nodes each sample's copies go to, ascending.
      cluster_counts: (N, k) int64, node i's sample copies in cluster k (its nearest centres'
        counts: what an unbalanced dispatch's node sends for the matching).
    """

    clusters: Clusters
    node_of_cluster: np.ndarray
    home: np.ndarray
    shards: list
    moves: np.ndarray
    centres: np.ndarray
    fit_rows: list
    distances: np.ndarray | None
    destinations: np.ndarray
    cluster_counts: np.ndarray


def _homes(index, count, num_train: int) -> np.ndarray:
    """(num_train,) the node holding each training row; every row must sit at one."""
    home = np.full(num_train, -1, np.int64)
    for i, (rows, c) in enumerate(zip(index, count)):
        home[rows[:c]] = i
    if (home < 0).any():
        raise ValueError(f"{int((home < 0).sum())} training samples sit at no node: the dispatch moves samples from "
                         "where a partition of the whole training set put them")
    return home


def fit_sample(index, count, per_node: int, seed: int) -> list[np.ndarray]:
    """Per node, the rows it sends to the dispatcher for the k-means fit: ``min(per_node, c_i)`` of
    its ``c_i`` rows, drawn without replacement with the run's seed, ascending."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(rows[:c], size=min(per_node, int(c)), replace=False)) for rows, c in zip(index, count)]


def _memberships(x_float, centres: np.ndarray, distances, replication: int) -> np.ndarray:
    """(num_train, k) bool, the clusters each sample is in: the capacitated assignment solved on the
    distances the nodes sent (:func:`qdata.data.balanced_assignment`), or, without distances, each
    sample's p nearest centres (computed at its node)."""
    if distances is not None:
        return balanced_assignment(distances, replication)
    held = np.zeros((len(x_float), len(centres)), bool)
    np.put_along_axis(held, nearest_centres(x_float, centres, replication), True, axis=1)
    if not held.any(axis=0).all():
        raise ValueError(f"clusters {np.flatnonzero(~held.any(axis=0)).tolist()} are nobody's nearest centre: an "
                         "unbalanced dispatch would leave their nodes without data (use dispatch_balanced=True)")
    return held


def dispatch_plan(x_float, index, count, *, replication: int = 1, balanced: bool = True, seed: int = 0,
                  fit_samples: int = 64) -> Plan:
    """The dispatch of a training set held as ``index``/``count`` (:func:`qdata.data.stack_nodes`).

    Args:
      x_float: (num_train, ...) the training samples' float values.
      index, count: where the samples sit: node i holds rows ``index[i, :count[i]]``.
      replication: p, the clusters each sample goes to.
      balanced: bounded cluster sizes, solved at the dispatcher on the nodes' distances.
      seed: the fit sample's and the clustering's seed.
      fit_samples: m, the samples each node sends for the fit (all of a smaller shard).
    """
    from scipy.optimize import linear_sum_assignment

    index, count = np.asarray(index), np.asarray(count).reshape(-1)
    nodes = len(count)
    home = _homes(index, count, len(x_float))
    fit_rows = fit_sample(index, count, fit_samples, seed)
    # The order the dispatcher stacks the samples in does not change what was sent.
    cluster_centres = fit_centres(x_float[np.sort(np.concatenate(fit_rows))], nodes, seed)
    distances = centre_distances(x_float, cluster_centres) if balanced else None
    held = _memberships(x_float, cluster_centres, distances, replication)
    cluster_counts = np.zeros((nodes, nodes), np.int64)
    np.add.at(cluster_counts, home, held.astype(np.int64))
    clusters_, nodes_ = linear_sum_assignment(-cluster_counts.T)  # the fewest copies move
    node_of_cluster = np.empty(nodes, np.int64)
    node_of_cluster[clusters_] = nodes_
    destinations = np.sort(node_of_cluster[np.nonzero(held)[1]].reshape(len(held), replication), axis=1)
    members = [np.flatnonzero(held[:, k]) for k in range(nodes)]
    shards, moves = [None] * nodes, np.zeros((nodes, nodes), np.int64)
    for k, rows in enumerate(members):
        j = node_of_cluster[k]
        shards[j] = np.concatenate([rows[home[rows] == j], rows[home[rows] != j]])
        np.add.at(moves[:, j], home[rows][home[rows] != j], 1)
    centres = np.empty_like(cluster_centres)
    centres[node_of_cluster] = cluster_centres
    return Plan(Clusters(members, cluster_centres), node_of_cluster, home, shards, moves, centres, fit_rows,
                distances, destinations, cluster_counts)


def _incoming(plan: Plan, j: int, source: int | None = None) -> np.ndarray:
    """The rows node j receives (from ``source`` only, if given), in their shard order."""
    rows = plan.shards[j]
    arrived = rows[plan.home[rows] != j]
    return arrived if source is None else arrived[plan.home[arrived] == source]


def _packed(codes: np.ndarray, count: int) -> np.ndarray:
    """Codes in 0..count-1 (labels, node ids) packed at ``ceil(log2 count)`` bits into bytes."""
    return np.asarray(packing.pack_codes(np.asarray(codes, np.uint32), packing.index_width(count)))


def encode_outgoing(dataset: Dataset, plan: Plan, i: int) -> Payload:
    """Node i's one uplink message: the samples it sends, grouped by destination (the other nodes in
    order), in the dataset's stored type; their labels packed; N - 1 int32 counts."""
    others = [j for j in range(len(plan.shards)) if j != i]
    rows = np.concatenate([_incoming(plan, j, source=i) for j in others]).astype(np.int64)
    counts = np.array([len(_incoming(plan, j, source=i)) for j in others], np.int32)
    return Payload(arrays={"samples": dataset.x_train[rows], "labels": _packed(dataset.y_train[rows], dataset.num_classes),
                           "counts": counts}, meta=(dataset.num_classes, packing.index_width(dataset.num_classes)))


def encode_incoming(dataset: Dataset, plan: Plan, j: int) -> Payload:
    """Node j's last downlink message: the samples relayed to it, their labels packed, one int32 count."""
    rows = _incoming(plan, j)
    return Payload(arrays={"samples": dataset.x_train[rows], "labels": _packed(dataset.y_train[rows], dataset.num_classes),
                           "count": np.asarray(len(rows), np.int32)},
                   meta=(dataset.num_classes, packing.index_width(dataset.num_classes)))


def _rows_at(plan: Plan, i: int) -> np.ndarray:
    """Node i's rows in the order both ends index them by (ascending)."""
    return np.flatnonzero(plan.home == i)


def encode_fit_sample(dataset: Dataset, plan: Plan, i: int) -> Payload:
    """Node i's first uplink message: its fit-sample rows raw, in the dataset's stored type (as the
    moved samples travel), no labels (k-means needs none)."""
    return Payload(arrays={"fit_samples": dataset.x_train[plan.fit_rows[i]]})


def encode_centres(plan: Plan) -> Payload:
    """The first downlink message, to every node: the k x n float32 centres, in cluster order."""
    return Payload(arrays={"centres": np.asarray(plan.clusters.centres, np.float32)})


def encode_affinities(plan: Plan, i: int) -> Payload:
    """Node i's second uplink message. Balanced: each of its samples' k distances to the centres,
    float32 (the dispatcher solves the capacitated assignment on exactly these values). Unbalanced:
    k int32 counts, its sample copies per cluster (its samples' nearest centres, computed at the
    node), from which the dispatcher matches clusters to nodes."""
    if plan.distances is not None:
        return Payload(arrays={"distances": plan.distances[_rows_at(plan, i)]})
    return Payload(arrays={"cluster_counts": plan.cluster_counts[i].astype(np.int32)})


def encode_destinations(plan: Plan, j: int) -> Payload:
    """Node j's second downlink message, codes of ``ceil(log2 N)`` bits packed into bytes. Balanced:
    each of its samples' p destination nodes (its own: the copy stays), ascending. Unbalanced: the
    node of each of the k clusters (the matching; the same message to every node)."""
    width = packing.index_width(len(plan.shards))
    if plan.distances is not None:
        codes, name = plan.destinations[_rows_at(plan, j)].reshape(-1), "destinations"
    else:
        codes, name = plan.node_of_cluster, "node_of_cluster"
    return Payload(arrays={name: _packed(codes, len(plan.shards))}, meta=(width, len(codes)))


def decode_destinations(message: Payload) -> np.ndarray:
    """The node ids of :func:`encode_destinations`'s message, int64 (``(count_j * p,)`` or ``(k,)``)."""
    width, count = message.meta
    (packed,) = message.arrays.values()
    return np.asarray(packing.unpack_codes(packed, width, count), np.int64)


def node_uplink(dataset: Dataset, plan: Plan, i: int) -> list[Payload]:
    """Node i's uplink messages in the order they are sent: fit sample, affinities, samples."""
    return [encode_fit_sample(dataset, plan, i), encode_affinities(plan, i), encode_outgoing(dataset, plan, i)]


def node_downlink(dataset: Dataset, plan: Plan, j: int) -> list[Payload]:
    """Node j's downlink messages in the order they arrive: centres, destinations, relayed samples."""
    return [encode_centres(plan), encode_destinations(plan, j), encode_incoming(dataset, plan, j)]


def message_bits(message: Payload) -> dict[str, int]:
    """Exact bits of one message, part by part, read off its arrays."""
    parts = {k: payload_bits(Payload(arrays={k: v})) for k, v in message.arrays.items()}
    return {**parts, "total": sum(parts.values())}


def messages_bits(messages: list[Payload]) -> dict[str, int]:
    """Exact bits of a node's messages in one direction, part by part (:func:`message_bits`)."""
    parts: dict[str, int] = {}
    for message in messages:
        for k, v in message_bits(message).items():
            if k != "total":
                parts[k] = parts.get(k, 0) + v
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
    """The experiment (data, base partition, model), the plan, every node's uplink and downlink messages,
    seconds. The plan's seconds are charged to the learner (the dispatcher) although they include the
    nodes' share (each sample's centre distances or nearest centres, computed inside the plan)."""
    from qdata.run import Experiment

    exp = Experiment(_plain(config))
    ds = exp.dataset
    start = time.perf_counter()
    plan = dispatch_plan(ds.to_float(ds.x_train), exp.index, exp.count, replication=config.dispatch_replication,
                         balanced=config.dispatch_balanced, seed=config.seed, fit_samples=config.dispatch_fit_samples)
    learner_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outgoing = [node_uplink(ds, plan, i) for i in range(config.num_nodes)]
    node_seconds = time.perf_counter() - start
    incoming = [node_downlink(ds, plan, j) for j in range(config.num_nodes)]
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
    x, y, index, count = node_datasets(ds, plan, [messages[-1] for messages in incoming])
    check_batch_fits(config, count)
    up = [messages_bits(m) for m in outgoing]
    down = [messages_bits(m) for m in incoming]
    up_total, down_total = _sum_parts(up), _sum_parts(down)
    header = {**exp.describe(), "config": config.to_dict(),
              "method": f"dispatch:{config.dispatch_replication}:{'balanced' if config.dispatch_balanced else 'unbalanced'}"
                        f":{config.dispatch_route}",
              "downlink_bits_per_node_per_round": 0, "downlink_parts_per_node_per_round": {"model": 0, "replies": 0},
              "one_shot": {"bits_per_node": [b["total"] for b in up], "parts": up_total,
                           "downlink_bits_per_node": [b["total"] for b in down], "downlink_parts": down_total,
                           "shard_sizes": [int(c) for c in count], "moved_per_node": plan.moves.sum(1).tolist(),
                           "fit_samples_per_node": [len(r) for r in plan.fit_rows],
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
