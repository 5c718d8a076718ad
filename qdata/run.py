"""One training run from a :class:`RunConfig` to a results file, with checkpoints and resume.

The results file ``OUT/results.jsonl`` holds one JSON object per line: first
``{"kind": "config", ...}`` (the config, the dataset, the model size, the method, the downlink cost per node per round, in all
and split into the model broadcast and the learner's replies),
then one ``{"kind": "round", ...}`` per evaluation with the test accuracy, the training loss and the
bit ledger: the uplink bits of the last round per node (part by part), the exact cumulative
uplink and downlink bits so far (all nodes, and per node), and with ``target_accuracy`` set the
uplink bits per node at the first evaluation that reached it (null until then). Figures are drawn
from this file alone. With ``faults`` or ``integrity`` on, each round record also says who answered:
per node, the rounds whose messages were applied and the messages refused, since the last record and
in all (:mod:`qdata.answers`), and the downlink as the fault schedule makes it.

Checkpoints (orbax) go to ``OUT/checkpoints`` every ``checkpoint_every`` rounds; ``resume=True``
restores the newest one, drops the result lines written after it, and continues; the resumed run
ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from qdata import answers as qanswers
from qdata import checkpoints
from qdata import faults as qfaults
from qdata import data as qdata_data
from qdata import engine, models
from qdata import resume as qresume
from qdata.codecs import ledger
from qdata import results as qresults
from qdata.config import RunConfig
from qdata.methods import build_method


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
    if config.optimizer == "sgd":
        return optax.sgd(config.lr, momentum=config.momentum or None)
    if config.optimizer == "adam":
        return optax.adam(config.lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


class Experiment:
    """The pieces a config describes, built once: data, shards, model, method, optimizer."""

    def __init__(self, config: RunConfig, dataset: qdata_data.Dataset | None = None, validation=None):
        self.config = config
        self.dataset = dataset if dataset is not None else qdata_data.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed,
                                              max_train=config.max_train, max_test=config.max_test,
                                              image_size=config.image_size)
        self.x_val = self.y_val = None
        if validation is not None:  # a validation split prepared with the dataset (e.g. mapped by DCA)
            self.x_val, self.y_val = validation
        elif config.validation:
            self.dataset, self.x_val, self.y_val = qdata_data.split_validation(
                self.dataset, config.validation, config.seed)
        self.model = models.make_model(config.model, self.dataset.num_classes)
        self.params = models.init_params(self.model, jax.random.PRNGKey(config.seed), self.dataset.sample_shape)
        self.d = models.param_count(self.params)
        indices = qdata_data.partition(config.partition, self.dataset, config.num_nodes, config.seed)
        self.index, self.count = qdata_data.stack_nodes(indices)
        self.method = build_method(config, self.model, self.dataset, self.d, node_size=self.index.shape[1])
        self.optimizer = make_optimizer(config)
        self.loss_fn = models.per_sample_loss(self.model)

    def describe(self) -> dict:
        ds = self.dataset
        return {
            "kind": "config",
            "config": self.config.to_dict(),
            "dataset": {"name": ds.name, "source": getattr(ds, "source", None), "synthetic": bool(ds.synthetic), "n": int(ds.n),
                        "sample_shape": list(ds.sample_shape), "num_classes": int(ds.num_classes),
                        "num_train": int(len(ds.y_train)), "num_test": int(len(ds.y_test)),
                        "num_validation": 0 if self.y_val is None else int(len(self.y_val)),
                        "fingerprint": data_fingerprint(ds)},
            "model": {"name": self.config.model, "params": int(self.d)},
            "method": self.method.name,
            "downlink_bits_per_node_per_round": engine.downlink_bits_per_round(self.method, self.params),
            # Split so a figure can tell the model broadcast from the learner's replies.
            "downlink_parts_per_node_per_round": dict(zip(("model", "replies"),
                                                          engine.downlink_parts(self.method, self.params))),
            "devices": int(self.config.num_devices),
            "processes": int(jax.process_count()),
        } | ({"downlink_varies_by_round": True} if engine.replies_vary(self.method) else {})


def data_fingerprint(ds: qdata_data.Dataset, samples: int = 4096) -> str:
    """SHA-256 (first 16 hex digits) of the labels and of up to ``samples`` evenly spaced samples of
    each split: what a resume compares to know it continues on the same data, cheap at any size."""
    digest = hashlib.sha256()
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        picks = np.unique(np.linspace(0, len(y) - 1, min(samples, len(y))).astype(np.int64))
        for part in (np.asarray(y), np.asarray(x[picks])):
            digest.update(f"{part.dtype.str}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def _write_records(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def check_batch_fits(config: RunConfig, count) -> None:
    """Refuse, before anything is compiled, a batch larger than the smallest node's shard."""
    smallest = int(np.min(count))
    if config.batch_size > smallest:
        raise ValueError(f"batch_size={config.batch_size} is larger than the smallest node's shard ({smallest} "
                         f"samples; {int(np.sum(count))} training samples over num_nodes={config.num_nodes}): "
                         f"choose batch_size <= {smallest}, or fewer nodes")


class _Saved(NamedTuple):
    """What a resume finds in ``OUT``: the results' header and round records, and the checkpoints."""

    header: dict | None
    rounds: list[dict]
    steps: list[int]


def _check_resume(config: RunConfig, out: Path, results_path: Path) -> tuple[_Saved, dict]:
    """The run found in ``out`` and the config's safe changes to it (:mod:`qdata.resume`)."""
    records = qresults.read_records(results_path) if results_path.exists() else []
    header = records[0] if records and records[0].get("kind") == "config" else None
    saved = _Saved(header, [r for r in records if r.get("kind") == "round"], checkpoints.saved_steps(out))
    if header is None:
        if saved.steps:
            raise ValueError(f"--resume: {out} has checkpoints but {results_path} holds no run header, so the "
                             "config cannot be checked against the run's; start a new run (another --out)")
        return saved, {}
    changed = qresume.check_config(header["config"], config, has_checkpoints=bool(saved.steps),
                                   where=str(results_path))
    if "rounds" in changed and config.stream_start < 1.0 and config.stream_rounds == 0:
        raise ValueError("--resume: rounds cannot change for streaming nodes with stream_rounds=0 (their data "
                         "arrives by the last round, so the arrival schedule would change); set stream_rounds")
    return saved, changed


def train(config: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = False,
          on_round: Callable[[dict], None] | None = None, dataset: qdata_data.Dataset | None = None,
          validation=None) -> dict:
    """Run ``config`` and write ``out_dir/results.jsonl``; return the last round's record.

    Args:
      config: the run.
      out_dir: its directory (created).
      resume: continue from the newest intact checkpoint in ``out_dir`` (a fresh start if there is
        none); the config must be the run's, up to the changes :mod:`qdata.resume` allows.
      progress: show a progress bar.
      on_round: called with each round record after it is written (and after its checkpoint).
      dataset: train on this prepared dataset instead of loading ``config.dataset`` (e.g. the data
        the learner holds after a one-shot floor, :func:`qdata.floors.central_dataset`).
      validation: ``(x_val, y_val)`` prepared with ``dataset``, instead of a split carved from it.

    A one-shot method ships its data once: ``method="dca"`` then trains centrally
    (:func:`qdata.methods.dca.train_dca`), ``method="dispatch"`` trains a local model per node
    (:func:`qdata.methods.dispatch.train_dispatch`).
    """
    if config.method == "dca":
        from qdata.methods.dca import train_dca

        return train_dca(config, out_dir, resume=resume, progress=progress)
    if config.method == "dispatch":
        from qdata.methods.dispatch import train_dispatch

        return train_dispatch(config, out_dir, resume=resume, progress=progress)
    out = Path(out_dir)
    results_path = out / "results.jsonl"
    # Over several processes every process runs the same program; process 0 alone writes results.
    writer = jax.process_index() == 0
    if writer and results_path.exists() and not resume:
        raise FileExistsError(f"{results_path} exists: pass resume=True (--resume) to continue it, or choose another directory")
    saved, changed = _check_resume(config, out, results_path) if resume else (_Saved(None, [], []), {})
    if saved.rounds and saved.rounds[-1]["round"] >= config.rounds:
        return saved.rounds[-1]  # nothing left to do
    out.mkdir(parents=True, exist_ok=True)

    exp = Experiment(config, dataset, validation)
    header = exp.describe()
    if saved.header is not None:
        qresume.check_same_data(saved.header["dataset"], header["dataset"], where=str(results_path))
    check_batch_fits(config, exp.count)
    mesh = engine.node_mesh(config.num_devices)
    engine.check_nodes_fit(config.num_nodes, mesh)
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    state = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params,
                                                        config.num_nodes, config.seed))
    state = engine.fit_nodes(exp.method, mesh, state, shards, to_float=exp.dataset.to_float)
    manager = checkpoints.open_manager(out) if config.checkpoint_every else None
    totals, records = _Totals({}, {}, 0.0, qanswers.Answers.empty(config.num_nodes)), [header]
    restored = None
    if resume and manager is not None:
        recorded = saved.rounds[-1]["round"] if saved.rounds else 0
        restored = checkpoints.restore_newest_intact(manager, state, at_most=recorded)
    if restored is not None:
        state, ledger_saved = restored.state, restored.ledger
        totals = _Totals({k: int(v) for k, v in ledger_saved["cumulative"].items()},
                         {k: int(v) for k, v in ledger_saved.get("encoder_counts", {}).items()},
                         float(ledger_saved.get("wall_seconds", 0.0)),
                         qanswers.Answers.from_ledger(ledger_saved["link"]) if "link" in ledger_saved
                         else totals.link, int(ledger_saved.get("replies", 0)))
        records += [r for r in saved.rounds if r["round"] <= restored.step]
    if resume and saved.header is not None:
        records[0] = qresume.record(header, saved.header, restored.step if restored else 0, changed)
    if writer:
        _write_records(results_path, records)
    try:
        return _run_rounds(exp, mesh, shards, state, records, totals, manager, results_path if writer else None,
                           progress, on_round)
    finally:
        if manager is not None:
            manager.close()


class _Totals(NamedTuple):
    """Exact running totals carried across a resume (saved in each checkpoint's ledger)."""

    cumulative: dict
    encoder_counts: dict
    elapsed: float  # wall seconds of the rounds before a resume
    link: qanswers.Answers  # who answered, and the downlink, with faults or integrity on
    replies: int = 0  # all nodes' replies so far, for a method whose replies vary by round


def _run_rounds(exp: Experiment, mesh, shards, state, records: list[dict], totals: _Totals, manager,
                results_path: Path | None, progress: bool, on_round) -> dict:
    """The round loop: ``eval_every`` rounds on device, then an evaluation record (appended to the
    results file when ``results_path``) and, every ``checkpoint_every`` rounds, a checkpoint."""
    config = exp.config
    available = None
    if config.stream_start < 1.0:
        available = functools.partial(qdata_data.available_counts, start_fraction=config.stream_start,
                                      arrival_rounds=config.stream_rounds or max(config.rounds - 1, 1))
    link = engine.Link(qfaults.parse_faults(config.faults), config.integrity)
    one_round = engine.make_round(exp.method, exp.optimizer, mesh, batch_size=config.batch_size,
                                  state_template=state, available=available, to_float=exp.dataset.to_float,
                                  link=link)
    downlink_parts = engine.downlink_parts(exp.method, exp.params)
    varying = engine.replies_vary(exp.method)
    # Replies that vary by round are charged as the round sent them (engine.REPLY_BITS), the model as always.
    per_round = downlink_parts[0] if varying else records[0]["downlink_bits_per_node_per_round"]
    evaluate = _evaluator(exp, per_round * config.num_nodes)
    replies = totals.replies
    done = int(engine.fetch(state.round))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.rounds, initial=done, desc=config.name, unit="round", leave=False)
    last = records[-1] if records[-1]["kind"] == "round" else None
    cumulative, encoder_counts, answers = dict(totals.cumulative), dict(totals.encoder_counts), totals.link
    start = time.perf_counter()
    while done < config.rounds:
        length = min(config.eval_every - done % config.eval_every, config.rounds - done)
        state, bits, diagnostics = engine.run_rounds(one_round, state, shards, length)
        cumulative = ledger.add_totals(cumulative, bits)  # exact Python ints at any scale
        since = None
        if link.on:  # the learner's counts of who answered are not the encoders' counts
            counts = {k: diagnostics.pop(k) for k in engine.LINK_COUNTS}
            since = qanswers.account(link.faults, counts["answered"], counts["rejected"], done, *downlink_parts,
                                     config.integrity)
            answers = qanswers.add(answers, since)
        if varying:
            replies += ledger.host_total(diagnostics.pop(engine.REPLY_BITS))
        for name, values in diagnostics.items():
            encoder_counts[name] = encoder_counts.get(name, 0) + int(np.asarray(values, np.int64).sum())
        done += length
        params = engine.fetch(engine.model_params(exp.method, state))  # the whole model, however it is held
        record = evaluate(params, done, bits, cumulative, encoder_counts, records,
                          totals.elapsed + time.perf_counter() - start, replies)
        if since is not None:
            record.update(_answers_record(since, answers))
        records.append(record)
        if results_path is not None:
            with open(results_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if manager is not None and (done % config.checkpoint_every == 0 or done == config.rounds):
            saved = {"cumulative": cumulative, "encoder_counts": encoder_counts, "wall_seconds": record["wall_seconds"]}
            if varying:
                saved["replies"] = replies
            if link.on:
                saved["link"] = answers.to_ledger()
            checkpoints.save(manager, done, state, saved)
        if bar is not None:
            bar.update(length)
            bar.set_postfix(acc=f"{record['test_accuracy']:.3f}")
        last = record
        if on_round is not None:
            on_round(record)
    if bar is not None:
        bar.close()
    return last


def _answers_record(since: qanswers.Answers, answers: qanswers.Answers) -> dict:
    """A round record's account of who answered (with faults or integrity on): per node, since the
    last record and in all; the downlink as the fault schedule makes it (:mod:`qdata.answers`)."""
    return {"answered_per_node": list(since.answered), "rejected_per_node": list(since.rejected),
            "cumulative_answered_per_node": list(answers.answered),
            "cumulative_rejected_per_node": list(answers.rejected),
            "cumulative_downlink_bits": answers.downlink}


def _evaluator(exp: Experiment, downlink_per_round: int):
    """``evaluate(params, done, bits, cumulative, encoder_counts, records, wall_seconds, replies) ->
    record``: one evaluation's round record (accuracies, training loss and the bit ledger so far);
    ``downlink_per_round`` the fixed downlink of a round (all nodes), ``replies`` the replies charged
    round by round so far, for a method whose replies vary by round (0 otherwise)."""
    config, ds = exp.config, exp.dataset
    n_fit = min(len(ds.y_train), 2048)
    x_fit, y_fit = ds.to_float(ds.x_train[:n_fit]), ds.y_train[:n_fit]
    mean_loss = jax.jit(lambda p, x, y: jnp.mean(exp.loss_fn(p, x, y)))

    def evaluate(params, done, bits, cumulative, encoder_counts, records, wall_seconds, replies):
        record = {
            "kind": "round",
            "round": done,
            "test_accuracy": float(models.accuracy(exp.model, params, ds.x_test, ds.y_test, to_float=ds.to_float)),
            "train_loss": float(mean_loss(params, x_fit, y_fit)),
            "uplink_bits_last_round_per_node": {k: ledger.host_total(v[-1]) / config.num_nodes
                                                for k, v in bits.items()},
            "cumulative_uplink_bits": dict(cumulative),
            "cumulative_uplink_bits_per_node": cumulative.get("total", 0) / config.num_nodes,
            "cumulative_downlink_bits": downlink_per_round * done + replies,
            # What the encoders counted locally (never sent), e.g. data values clipped to the range.
            "encoder_counts": dict(encoder_counts),
            "wall_seconds": wall_seconds,
        }
        if exp.x_val is not None:
            record["val_accuracy"] = float(models.accuracy(exp.model, params, exp.x_val, exp.y_val,
                                                           to_float=ds.to_float))
        if config.target_accuracy is not None:
            so_far = [r for r in records if r["kind"] == "round"] + [record]
            record["bits_to_target_per_node"] = qresults.bits_to_reach(so_far, config.target_accuracy)
        if not math.isfinite(record["train_loss"]):
            record["diverged"] = True
        return record

    return evaluate


def phase_seconds(config: RunConfig, repeats: int = 5) -> dict:
    """Wall seconds of one round's node phase (all N nodes' messages) and learner phase (g and the
    update) for ``config``, each compiled on its own from the round's own functions and timed on the
    initial state (:func:`qdata.engine.time_phases`; median of ``repeats``)."""
    if config.method == "dca":
        from qdata.methods.dca import dca_phase_seconds

        return dca_phase_seconds(config)
    if config.method == "dispatch":
        from qdata.methods.dispatch import dispatch_phase_seconds

        return dispatch_phase_seconds(config)
    exp = Experiment(config)
    mesh = engine.node_mesh(config.num_devices)
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    state = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params,
                                                        config.num_nodes, config.seed))
    state = engine.fit_nodes(exp.method, mesh, state, shards, to_float=exp.dataset.to_float)
    return engine.time_phases(exp.method, exp.optimizer, mesh, state, shards, batch_size=config.batch_size,
                              repeats=repeats, to_float=exp.dataset.to_float)


def final_params(out_dir: str | os.PathLike, config: RunConfig):
    """The parameters of the newest checkpoint in ``out_dir`` (host arrays): the whole model, as
    evaluated (:func:`qdata.engine.model_params`)."""
    exp = Experiment(config)
    mesh = engine.node_mesh(config.num_devices)
    template = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params,
                                                           config.num_nodes, config.seed))
    with ocp.CheckpointManager(Path(out_dir, "checkpoints").absolute()) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), ledger=ocp.args.JsonRestore()))
    return engine.fetch(engine.model_params(exp.method, restored["state"]))
