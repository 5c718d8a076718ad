"""Data collaboration analysis: one-shot, each node ships a dimensionality-reduced copy of its data.

Imakura and Sakurai, "Data collaboration analysis framework using centralization of individual
intermediate representations for distributed data sets", ASCE-ASME J. Risk Uncertainty Eng. Syst. A
6(2), 2020 (arXiv:1902.07535, 2019), Algorithm 1:

1. Shared anchors ``X^anc`` (r x n): uniform random points in the data range ``[lo, hi]^n`` drawn
   from a seed both sides know, so they cost nothing to send.
2. Node i fits its own map ``f_i``: the top m principal directions ``V_i`` (n x m) of its centred
   samples, ``f_i(x) = (x - c) V_i`` with c the midpoint of the data range (a shift every node
   shares, so the maps stay linear in the same coordinates and the collaboration functions fitted on
   the anchors agree off them). It sends once: ``f_i(X_i)`` (count_i x m), its labels, and
   ``f_i(X^anc)`` (r x m).
3. The learner stacks the anchors' representations, ``[f_1(X^anc), ..., f_N(X^anc)]`` (r x N m), takes
   its top m left singular vectors ``Z`` (r x m), and maps each node by the least-squares ``G_i``
   with ``f_i(X^anc) G_i ~ Z``. The collaboration representation of node i's data is
   ``f_i(X_i) G_i``; the learner trains the model on the union of them centrally (SGD, one node of
   batch N b, the same steps as the per-round methods, as the floors do: :mod:`qdata.floors`).
4. A point held at node i is predicted as ``h(f_i(x) G_i)``: the test (and validation) points are
   assigned to the nodes in turn (point j to node j mod N) and mapped by their node's functions.

Bits per node, read off the message (:func:`dca_bits`): ``count_i m`` and ``r m`` values in the
configured float type (32 or 16 bits), labels packed at ``ceil(log2 C)`` bits into bytes, and one
int32 count. Nothing goes down during training (the anchors come from the shared seed; inference
traffic, ``G_i`` and the model to the node, is not counted, as for every method). The results file
reads like a per-round method's: all of the uplink is paid before the first round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from qdata.codecs import packing
from qdata.codecs.payloads import Payload, payload_bits
from qdata.data import Dataset

ANCHOR_SEED = 0xDCA  # the anchors' shared seed, folded with the run's seed


def make_anchors(value_range: tuple[float, float], sample_shape: tuple, count: int, seed: int) -> np.ndarray:
    """(count, n) float32 anchors, uniform in the data range, from a seed both sides know."""
    lo, hi = value_range
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), ANCHOR_SEED]))
    return rng.uniform(lo, hi, size=(count, math.prod(sample_shape))).astype(np.float32)


def fit_node_map(x: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) the top ``dim`` principal directions of a node's samples ``x`` (count, n), centred."""
    if dim > x.shape[1]:
        raise ValueError(f"dca_dim={dim} exceeds the sample dimension n={x.shape[1]}")
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    basis = np.zeros((x.shape[1], dim))
    basis[:, : min(dim, vt.shape[0])] = vt[:dim].T  # a node with fewer samples than dim pads with zeros
    return basis.astype(np.float32)


def encode_node(x: np.ndarray, y: np.ndarray, anchors: np.ndarray, basis: np.ndarray, shift: float,
                num_classes: int, values: str = "float32") -> Payload:
    """Node i's one message: ``f_i(X_i)``, ``f_i(X^anc)`` in ``values``, the packed labels, the count."""
    if values not in ("float32", "float16"):
        raise ValueError(f"values must be 'float32' or 'float16', got {values!r}")
    width = packing.index_width(num_classes)
    labels = np.asarray(packing.pack_codes(np.asarray(y, np.uint32), width))
    return Payload(arrays={"data": ((x - shift) @ basis).astype(values),
                           "anchors": ((anchors - shift) @ basis).astype(values),
                           "labels": labels, "count": np.asarray(len(y), np.int32)},
                   meta=(num_classes, width))


def dca_bits(message: Payload) -> dict[str, int]:
    """Exact bits of one node's message, part by part, read off its arrays."""
    parts = {k: payload_bits(Payload(arrays={k: v})) for k, v in message.arrays.items()}
    return {**parts, "total": sum(parts.values())}


def decode_labels(message: Payload) -> np.ndarray:
    _, width = message.meta
    return np.asarray(packing.unpack_codes(message.arrays["labels"], width, int(message.arrays["count"])), np.int32)


def collaboration_maps(anchor_reps: list[np.ndarray], dim: int) -> list[np.ndarray]:
    """The ``G_i`` (m x dim): Z = top ``dim`` left singular vectors of the stacked anchor
    representations, ``G_i = argmin ||f_i(X^anc) G - Z||_F`` (least squares)."""
    stacked = np.concatenate([np.asarray(a, np.float64) for a in anchor_reps], axis=1)
    u, _, _ = np.linalg.svd(stacked, full_matrices=False)
    z = u[:, :dim]
    return [np.linalg.lstsq(np.asarray(a, np.float64), z, rcond=None)[0] for a in anchor_reps]


def _assigned(x: np.ndarray, bases, maps, shift: float) -> np.ndarray:
    """Points assigned to the nodes in turn, each mapped by its node's ``f_i`` and ``G_i``."""
    out = np.empty((len(x), maps[0].shape[1]), np.float32)
    for i, (basis, g) in enumerate(zip(bases, maps)):
        out[i :: len(maps)] = ((x[i :: len(maps)] - shift) @ basis) @ g
    return out


def collaborate(dataset: Dataset, index, count, validation, *, dim: int, anchors: int, values: str,
                seed: int):
    """The whole one-shot exchange on a partition: every node's message, then the learner's data.

    Returns:
      ``(central, (x_val, y_val), messages, seconds)``: the :class:`Dataset` of collaboration
      representations (training: node after node; test: the test points mapped at their nodes),
      the validation split mapped alike (or None), the N messages, and the node / learner seconds.
    """
    shift = 0.5 * (dataset.value_range[0] + dataset.value_range[1])
    anchor_x = make_anchors(dataset.value_range, dataset.sample_shape, anchors, seed)
    flat = lambda a: np.asarray(dataset.to_float(a), np.float32).reshape(len(a), -1)
    start = time.perf_counter()
    bases, messages = [], []
    for rows, n in zip(np.asarray(index), np.asarray(count)):
        x = flat(dataset.x_train[rows[:n]])
        bases.append(fit_node_map(x, dim))
        messages.append(encode_node(x, dataset.y_train[rows[:n]], anchor_x, bases[-1], shift,
                                    dataset.num_classes, values))
    node_seconds = time.perf_counter() - start
    start = time.perf_counter()
    maps = collaboration_maps([m.arrays["anchors"] for m in messages], dim)
    x_train = np.concatenate([m.arrays["data"].astype(np.float64) @ g for m, g in zip(messages, maps)])
    y_train = np.concatenate([decode_labels(m) for m in messages])
    learner_seconds = time.perf_counter() - start
    x_test = _assigned(flat(dataset.x_test), bases, maps, shift)
    x_train = x_train.astype(np.float32)
    lo, hi = float(x_train.min()), float(x_train.max())
    central = dataclasses.replace(dataset, x_train=x_train, y_train=y_train, x_test=x_test, x_divisor=1.0,
                                  value_range=(lo, hi if hi > lo else lo + 1.0),
                                  name=f"{dataset.name}, DCA m={dim}", source=f"collaboration representation of {dataset.name}")
    mapped_val = None
    if validation is not None:
        mapped_val = (_assigned(flat(validation[0]), bases, maps, shift), np.asarray(validation[1], np.int32))
    return central, mapped_val, messages, {"node_seconds": node_seconds, "learner_seconds": learner_seconds}


# ----------------------------------------------------------------------------------------------
# A run: the exchange once, then the learner's central training, written as one results file.


def _plain(config):
    """The config's data, partition and training without the DCA fields (an SGD config)."""
    from qdata.config import RunConfig

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name.startswith("dca_")}
    return config.replace(method="sgd", **defaults)


def _exchange(config):
    from qdata.run import Experiment

    exp = Experiment(_plain(config))
    validation = None if exp.x_val is None else (exp.x_val, exp.y_val)
    return collaborate(exp.dataset, exp.index, exp.count, validation, dim=config.dca_dim,
                       anchors=config.dca_anchors, values=config.dca_values, seed=config.seed)


def dca_phase_seconds(config) -> dict:
    """Wall seconds of the one exchange: all nodes' maps and messages, the learner's collaboration."""
    return _exchange(config)[3]


def train_dca(config, out_dir, *, resume: bool = False, progress: bool = False) -> dict:
    """Run DCA for ``config`` (``method="dca"``): the exchange, the central training (in
    ``OUT/central``), and ``OUT/results.jsonl`` in the per-round methods' format with the one-shot
    uplink charged from the first evaluation on and no downlink. Returns the last round's record."""
    from qdata import results as qresults
    from qdata.run import train

    out = Path(out_dir)
    finished = qresults.finished_one_shot(out, config.rounds, resume)
    if finished is not None:
        return finished
    central, validation, messages, _ = _exchange(config)
    plain = _plain(config)
    central_config = plain.replace(num_nodes=1, batch_size=config.num_nodes * config.batch_size, validation=0.0,
                                   checkpoint_every=0, name=f"{config.name}-central")
    shutil.rmtree(out / "central", ignore_errors=True)  # the central run is redone whole (seconds)
    train(central_config, out / "central", progress=progress, dataset=central, validation=validation)
    header, rounds = qresults.load(out / "central")
    per_node = [dca_bits(m) for m in messages]
    totals = {k: sum(b[k] for b in per_node) for k in per_node[0]}
    header = {**header, "config": config.to_dict(), "downlink_bits_per_node_per_round": 0,
              "downlink_parts_per_node_per_round": {"model": 0, "replies": 0},
              "method": f"dca:{config.dca_dim}:{config.dca_anchors}:{config.dca_values}",
              "one_shot": {"bits_per_node": [b["total"] for b in per_node], "parts": totals,
                           "central_run": "central"}}
    for r in rounds:
        r.update(cumulative_uplink_bits=dict(totals), cumulative_uplink_bits_per_node=totals["total"] / len(per_node),
                 uplink_bits_last_round_per_node={k: 0.0 for k in totals}, cumulative_downlink_bits=0)
    with open(out / "results.jsonl", "w") as f:
        for record in [header, *rounds]:
            f.write(json.dumps(record) + "\n")
    return rounds[-1]
