"""A run described as data: one :class:`RunConfig` in, one results file out.

A config can come from command-line flags, from a TOML file (keys are the field names), or from
Python. Every field is checked when the config is made, type included (a bool is a bool, an integer
an integer, a float finite, a spec string well formed), and so is every combination of fields: a
setting the chosen method would ignore is refused rather than silently dropped. An error names the
field and its allowed values (:data:`FIELD_RULES`).

Compressors are named by short specs (:func:`parse_compressor_spec`, checked at config time; K is
checked against the model size d once d is known, in :func:`make_compressor`):

=====================  =========================================================
``fp32``, ``fp16``     identity
``randk:K``            random-k, K an integer >= 1 or a fraction of d in (0, 1) (``randk:0.01``)
``randk_seed:K``       random-k with a shared seed instead of indices
``topk:K``             top-k (biased; use with error feedback)
``qsgd:S``             QSGD with S levels, one norm for the whole vector
``qsgd:S:BUCKET``      QSGD with S levels and a norm per bucket of BUCKET coordinates
``qsgd_elias:S[:B]``   the same messages charged as QSGD's Elias coding of them
``terngrad``           TernGrad
``sign``               scaled sign (biased; use with error feedback)
``powersgd:R``         PowerSGD of rank R, each node its own Q (biased; use with error feedback)
``ef:SPEC``            SPEC wrapped in error feedback (e.g. ``ef:topk:64``), once
=====================  =========================================================

``powersgd_allreduce:R`` is PowerSGD as Vogels et al. publish it (P summed over the nodes before
orthogonalization, one shared Q, two reductions a round): a method of its own
(:mod:`qdata.methods.powersgd`), for ``method = "gradient"`` only; error feedback as configured.
``significance:S`` is Gaia's significance filter (Hsieh et al. 2017; :mod:`qdata.methods.significance`):
each node accumulates its gradients and sends the coordinates whose update ``lr |a_j|`` exceeds S times
``|w_j|`` (S > 0, e.g. 0.01); a method, for ``method = "gradient"`` only, without error feedback (it
keeps what it has not sent by itself).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from qdata import faults as _faults
from qdata.codecs import compressors
from qdata.codecs.context_ans import DATA_CODERS
from qdata.data import check_image_size

METHODS = ("qdata", "sgd", "gradient", "dca", "dispatch", "split")
DCA_VALUES = ("float32", "float16")
SPLIT_MODES = ("parallel", "sequential")  # split learning: every node every round (SplitFed), or in turns
DISPATCH_ROUTES = ("nearest", "vote")  # a test point to its nearest centre's model, or its p nearest ones vote
QUANTIZERS = ("stochastic", "nearest", "dither", "per_sample")
TRANSFORMS = ("none", "dct", "pca")  # qdata's data codes: per pixel, or in a 2-D DCT / node PCA basis
TRANSFORM_ROUNDINGS = ("stochastic", "dither")  # the quantizers a transform code rounds its coefficients with
GATES = ("off", "bernoulli", "top")
SCORES = ("loss", "grad_norm")
OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("iid", "dirichlet:ALPHA", "similarity", "similarity:unbalanced")
COMPRESSOR_SPECS = ("fp32", "fp16", "randk:K", "randk_seed:K", "topk:K", "qsgd[:S[:BUCKET]]",
                    "qsgd_elias[:S[:BUCKET]]", "terngrad", "sign", "powersgd[:R]",
                    "powersgd_allreduce[:R] (method gradient only)", "significance:S (method gradient only)", "ef:SPEC")
INT_MAX = 2**31 - 1  # integers travel as int32 inside the compiled round


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (and nothing else)."""

    name: str = "run"
    dataset: str = "digits"
    model: str = "mlp"
    method: str = "qdata"
    # qdata: data quantizer, gate, correction, cache
    bits: int = 4
    quantizer: str = "stochastic"
    gate: str = "off"
    rho: float = 1.0
    score: str = "loss"
    gate_floor: float = 1e-3  # the Bernoulli gate's uniform mix: p_j >= gate_floor * rho (qdata.gate.water_fill)
    correction: str = "off"
    cache: bool = False
    coder: str = "fixed"  # how the data codes cross the link: fixed length, or adaptive ANS (pixel or coefficient codes)
    # transform codes (qdata.codecs.transform_codec): each node fits a setup on its shard, sent once;
    # sample_bits is then the code bits of one sample (a multiple of 8) instead of n * bits
    transform: str = "none"
    sample_bits: int | None = None
    # refinement of cached samples (qdata.codecs.refine): a held sample sent again gets a residual of
    # refine_bits a coordinate (0: off), at most refine_max times
    refine_bits: int = 0
    refine_max: int = 1
    # gradient compression
    compressor: str = "fp32"
    error_feedback: bool = False
    # data collaboration analysis (method "dca", one-shot; qdata.methods.dca)
    dca_dim: int = 16  # m: each node's PCA dimension, and the collaboration representation's
    dca_anchors: int = 128  # r: anchor points, drawn from the data range with a shared seed
    dca_values: str = "float32"  # how the mapped values travel
    # data-dependent dispatch with local models (method "dispatch", one-shot; qdata.methods.dispatch):
    # k = num_nodes balanced clusters, each sample sent to the nodes of its p nearest centres, one
    # model per node trained on its own shard, a test point routed by its nearest centre(s)
    dispatch_replication: int = 1  # p, in 1..num_nodes
    dispatch_balanced: bool = True  # cluster sizes bounded (floor or ceil of N p / k), else raw k-means
    dispatch_route: str = "nearest"  # "vote": the p nearest centres' models average their probabilities
    dispatch_fit_samples: int = 64  # m: raw samples each node sends for the k-means fit (all of a smaller shard)
    # split learning (method "split"; qdata.methods.split): layers at the node, activation bits (0: fp32)
    split_cut: int = 1
    split_bits: int = 0
    split_top: int = 0  # U-shaped when >= 1: the node also holds the last split_top layers and the labels
    split_mode: str = "parallel"  # "sequential": the nodes take turns, the lower layers handed on via the learner
    split_turn: int = 1  # sequential: rounds per turn (the hand-off is paid once a turn)
    # the distributed setting
    num_nodes: int = 8
    partition: str = "iid"
    stream_start: float = 1.0  # streaming nodes: share of each node's data present at round 0 (1 = off)
    stream_rounds: int = 0  # ... and the round by which all of it has arrived (0: the last round)
    batch_size: int = 32
    rounds: int = 300
    # the learner's optimizer (optax)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0
    # bookkeeping
    target_accuracy: float | None = None  # results then carry the uplink bits to first reach it
    eval_every: int = 10
    checkpoint_every: int = 100
    num_devices: int = 1
    # share of the training set held out as a validation split (0: none); each evaluation then
    # records the validation accuracy beside the test accuracy, for choosing settings on it
    validation: float = 0.0
    max_train: int | None = None
    max_test: int | None = None
    data_dir: str | None = None
    # tensorflow-datasets only: images resized and centre-cropped to image_size x image_size
    # (required for datasets of varying image size, such as imagenet2012)
    image_size: int | None = None
    # reliability (issue 12, items 2-3; qdata.faults, qdata.integrity): a schedule of faulty nodes and
    # links ("none", or rules such as "drop:1:0.5,leave:3:100"), and a checked header on every message
    # (96 bits a message, charged as the part 'integrity'; off in every measured figure)
    faults: str = "none"
    integrity: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, check_field(field.name, getattr(self, field.name)))
        check_image_size(self.image_size, self.dataset)
        _check_combination(self)
        _check_nothing_ignored(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        check_values(values)
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str) -> "RunConfig":
        """The config of a TOML file of RunConfig fields; every error names the file."""
        values = read_toml(path)
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def check_values(values: dict) -> None:
    """Check a table of RunConfig fields one by one (unknown keys, types, ranges), before the
    combination is checked by constructing the config."""
    if not isinstance(values, dict):
        raise ValueError(f"a config must be a table of RunConfig fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELD_RULES))
    if unknown:
        hint = " (this looks like a lineup file: qdata compare --config FILE runs it)" if {"base", "run"} & set(unknown) else ""
        raise ValueError(f"unknown config key(s) {unknown}{hint}; known keys: {sorted(FIELD_RULES)}")
    for name, value in values.items():
        check_field(name, value)


def read_toml(path) -> dict:
    """The table of a TOML file; a missing, unreadable or malformed file is a ValueError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise ValueError(f"config file {str(path)!r} is a directory, not a TOML file") from None
    except OSError as err:
        raise ValueError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None


# ----------------------------------------------------------------------------------------------
# One field at a time: its type, then its allowed values.


class Rule(NamedTuple):
    """What a field may hold: ``kind`` (bool, int, float or str; floats finite, an int accepted for a
    float), ``allowed`` in words for the error, and ``ok(value) -> bool`` (or a ValueError saying why)."""

    kind: type
    allowed: str
    ok: Callable[[Any], bool] = lambda value: True
    optional: bool = False


def _ints(lo: int, hi: int = INT_MAX, optional: bool = False) -> Rule:
    words = f"an integer in {lo}..{hi}" + (" or None" if optional else "")
    return Rule(int, words, lambda v: lo <= v <= hi, optional)


def _one_of(values) -> Rule:
    return Rule(str, "one of " + ", ".join(repr(v) for v in values), lambda v: v in values)


def _spec(allowed: str, parse: Callable[[str], Any]) -> Rule:
    return Rule(str, allowed, lambda v: bool(parse(v)))


FIELD_RULES: dict[str, Rule] = {
    "name": Rule(str, "a non-empty string without '/' or control characters",
                 lambda v: bool(v.strip()) and "/" not in v and v.isprintable()),
    "dataset": Rule(str, "a dataset spec: digits, a tensorflow-datasets name, idx:PATH or synthetic:SHAPE:CLASSES",
                    lambda v: bool(v.strip()) and v.isprintable()),
    "model": _spec("a model: logreg, mlp, mlp:WIDTHS (e.g. mlp:128x64), cnn, resnet20, resnet18, resnet18_imagenet",
                   lambda v: _check_model(v)),
    "method": _one_of(METHODS),
    "bits": _ints(1, 16),
    "quantizer": _one_of(QUANTIZERS),
    "gate": _one_of(GATES),
    "rho": Rule(float, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "score": _one_of(SCORES),
    "gate_floor": Rule(float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "correction": _spec("'off' or a compressor spec: " + ", ".join(COMPRESSOR_SPECS),
                        lambda v: v == "off" or parse_compressor_spec(v)),
    "cache": Rule(bool, "true or false"),
    "coder": _one_of(DATA_CODERS),
    "transform": _one_of(TRANSFORMS),
    "sample_bits": Rule(int, "a multiple of 8 in 8..2^20 (code bits per sample) or None",
                        lambda v: 8 <= v <= 1 << 20 and v % 8 == 0, optional=True),
    "refine_bits": Rule(int, "0 (off) or an integer in 2..16", lambda v: v == 0 or 2 <= v <= 16),
    "refine_max": _ints(1, 64),
    "compressor": _spec("a compressor spec: " + ", ".join(COMPRESSOR_SPECS), lambda v: parse_compressor_spec(v)),
    "error_feedback": Rule(bool, "true or false"),
    "dca_dim": _ints(1),
    "dca_anchors": _ints(1),
    "dca_values": _one_of(DCA_VALUES),
    "dispatch_replication": _ints(1),
    "dispatch_balanced": Rule(bool, "true or false"),
    "dispatch_route": _one_of(DISPATCH_ROUTES),
    "dispatch_fit_samples": _ints(1),
    "split_cut": _ints(1),
    "split_bits": _ints(0, 16),
    "split_top": _ints(0),
    "split_mode": _one_of(SPLIT_MODES),
    "split_turn": _ints(1),
    "num_nodes": _ints(1),
    "partition": _spec("one of " + ", ".join(PARTITIONS) + " (ALPHA a number > 0)", lambda v: _check_partition(v)),
    "stream_start": Rule(float, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "stream_rounds": _ints(0),
    "batch_size": _ints(1),
    "rounds": _ints(1),
    "optimizer": _one_of(OPTIMIZERS),
    "lr": Rule(float, "a finite number > 0", lambda v: v > 0),
    "momentum": Rule(float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "seed": _ints(0),
    "target_accuracy": Rule(float, "a number in (0, 1] or None", lambda v: 0.0 < v <= 1.0, optional=True),
    "eval_every": _ints(1),
    "checkpoint_every": _ints(0),
    "num_devices": _ints(1),
    "validation": Rule(float, "a number in [0, 1) (a share of the training set)", lambda v: 0.0 <= v < 1.0),
    "max_train": _ints(1, optional=True),
    "max_test": _ints(1, optional=True),
    "data_dir": Rule(str, "a directory path or None", lambda v: bool(v) and v.isprintable(), optional=True),
    "image_size": Rule(int, "a positive integer (the side in pixels of the square images, e.g. 64 or 224) or None",
                       lambda v: 1 <= v <= INT_MAX, optional=True),
    # reliability (issue 12)
    "faults": _spec("'none' or comma-separated rules " + ", ".join(_faults.SPECS[1:]),
                    lambda v: _faults.parse_faults(v) is not None),
    "integrity": Rule(bool, "true or false"),
}


def _type_ok(kind: type, value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return kind is bool
    if kind is int:
        return isinstance(value, (int, np.integer))
    if kind is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    return isinstance(value, kind)


def check_field(name: str, value):
    """``value`` checked against :data:`FIELD_RULES` ``[name]``, as a plain Python value (numpy scalars
    become int/float/bool, an int given for a float field a float); a ValueError names the field, its
    allowed values and what it got."""
    rule = FIELD_RULES[name]
    if value is None and rule.optional:
        return None
    ok = _type_ok(rule.kind, value)
    if ok:
        value = rule.kind(value)
        try:
            ok = bool(rule.ok(value))
        except ValueError as err:  # a spec's parser says what is wrong with it, and what it allows
            raise ValueError(f"{name}: {err}") from None
    if not ok:
        raise ValueError(f"{name} must be {rule.allowed}, got {value!r} ({type(value).__name__})")
    return value


def _check_model(spec: str) -> bool:
    from qdata import models

    models.make_model(spec, 10)
    return True


def _check_partition(spec: str) -> bool:
    if spec in ("iid", "similarity", "similarity:unbalanced"):
        return True
    head, _, alpha = spec.partition(":")
    return head == "dirichlet" and _finite_number(alpha) is not None and _finite_number(alpha) > 0


def _finite_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Fields together: combinations that cannot run, and settings the chosen method would ignore.


def _check_combination(config: RunConfig) -> None:
    if config.error_feedback and config.compressor.startswith("ef:"):
        raise ValueError(f"compressor {config.compressor!r} already has error feedback; error_feedback=True "
                         "would wrap it twice (two memories compensating the same residual)")
    if config.checkpoint_every and config.checkpoint_every % config.eval_every:
        raise ValueError(f"checkpoint_every={config.checkpoint_every} must be a multiple of eval_every="
                         f"{config.eval_every} (checkpoints are taken at evaluations), or 0 (no checkpoints)")
    if config.correction != "off" and parse_compressor_spec(config.correction).name in METHOD_SPECS:
        _not_a_compressor(config.correction)
    if config.coder == "ans" and config.transform == "none" and config.bits > 8:
        raise ValueError(f"coder='ans' codes B <= 8 bits a coordinate (its context counts hold 2^B symbols), "
                         f"got bits={config.bits}; use coder='fixed' or bits in 1..8")
    _faults.check_nodes(_faults.parse_faults(config.faults), config.num_nodes, config.faults)  # reliability
    if config.coder == "ans" and _faults.parse_faults(config.faults).has("corrupt", "truncate") and not config.integrity:
        raise ValueError(f"coder='ans' with faults={config.faults!r} needs integrity=true: a damaged message the "
                         "learner accepted would leave its context counts apart from the node's, and every later "
                         "stream would be charged under a model the learner lacks")
    if parse_compressor_spec(config.compressor).name == "significance" and (
            config.error_feedback or config.compressor.startswith("ef:")):
        raise ValueError(f"compressor {config.compressor!r} keeps what it has not sent (its accumulator): "
                         "error feedback would keep it twice; set error_feedback=False and drop any 'ef:'")
    if config.method == "dca" and (config.stream_start < 1.0 or config.dca_anchors < config.dca_dim):
        raise ValueError(f"method='dca' is one-shot: it needs every sample at the start (stream_start=1, got "
                         f"{config.stream_start}) and dca_anchors >= dca_dim (got {config.dca_anchors} < "
                         f"{config.dca_dim})")
    if config.method == "dispatch":
        _check_dispatch(config)
    if config.method == "split":
        _check_split(config)
    _check_transform(config)
    _check_refine(config)
    if config.gate == "off" and config.rho != 1.0:
        raise ValueError(f"rho={config.rho} needs a gate (gate='bernoulli' or 'top'); gate='off' sends every sample")


def _check_dispatch(config: RunConfig) -> None:
    """One-shot dispatch: p within the nodes, a vote among at least two, every sample present at the
    start, one device, and no fault schedule or checked messages (not built for the one exchange)."""
    if config.dispatch_replication > config.num_nodes:
        raise ValueError(f"dispatch_replication must be an integer in 1..num_nodes={config.num_nodes} (each sample "
                         f"goes to p distinct nodes), got {config.dispatch_replication}")
    if config.dispatch_route == "vote" and config.dispatch_replication < 2:
        raise ValueError("dispatch_route='vote' lets a test point's p nearest centres' models vote: it needs "
                         f"dispatch_replication >= 2 (got {config.dispatch_replication}; with p = 1 use 'nearest')")
    if config.stream_start < 1.0:
        raise ValueError(f"method='dispatch' is one-shot: it dispatches every sample once, at the start "
                         f"(stream_start=1, got {config.stream_start})")
    if config.faults != "none" or config.integrity or config.num_devices != 1:
        raise ValueError(f"method='dispatch' trains its local models on one device without faulty nodes or checked "
                         f"messages: it needs faults='none', integrity=false and num_devices=1 (got {config.faults!r}, "
                         f"{config.integrity}, {config.num_devices})")


def _check_split(config: RunConfig) -> None:
    from qdata import models
    from qdata.methods.split import check_cut

    check_cut(models.make_model(config.model, 10), config.split_cut, config.split_top)  # layers do not depend on C
    if config.faults != "none":
        raise ValueError(f"method='split' with faults={config.faults!r} is not built: the learner's record of "
                         "the averaged lower layers, which evaluation composes, assumes every node answers")
    if config.split_mode == "sequential" and (config.split_top or config.integrity):
        raise ValueError(f"split_mode='sequential' with split_top={config.split_top}, integrity={config.integrity} is "
                         "not built: the nodes take turns with the labels at the learner (split_top=0), and "
                         "without checked messages (integrity=false: a header would be charged to nodes that send "
                         "nothing in rounds not theirs)")


def _check_transform(config: RunConfig) -> None:
    """A transform code needs its budget, rounds with stochastic rounding or dither, and fits its
    setup once on data present from the start, sent in round 0 (a lost or refused first message
    would leave the learner without it, and with coder='ans' without the widths its counts follow).
    Its codes cross at fixed length or, coder='ans', with a model per coefficient."""
    if config.transform == "none" or config.method != "qdata":
        return
    if config.sample_bits is None:
        raise ValueError(f"transform={config.transform!r} needs sample_bits, the code bits of one sample "
                         "(a multiple of 8, e.g. 400)")
    if config.quantizer not in TRANSFORM_ROUNDINGS:
        raise ValueError(f"quantizer={config.quantizer!r} with transform={config.transform!r}: a transform code "
                         f"rounds its coefficients with one of {TRANSFORM_ROUNDINGS}")
    if config.stream_start < 1.0 or config.faults != "none" or config.integrity:
        raise ValueError(f"transform={config.transform!r} fits each node's setup on its whole shard and sends it "
                         "once, in round 0: it needs stream_start=1, faults='none' and integrity=false (got "
                         f"{config.stream_start}, {config.faults!r}, {config.integrity})")


def _check_refine(config: RunConfig) -> None:
    """Refinement adds residuals to the samples the learner caches, within the first code's step on a
    dataset-wide range; node and learner must see the same messages."""
    if config.refine_bits == 0 or config.method != "qdata":
        return
    needs = {"cache": (config.cache, "true"), "quantizer": (config.quantizer in ("stochastic", "nearest"),
                                                            "'stochastic' or 'nearest' (a dataset-wide step)"),
             "transform": (config.transform == "none", "'none'"), "faults": (config.faults == "none", "'none'"),
             "integrity": (not config.integrity, "false")}
    wrong = [f"{name}={getattr(config, name)!r} (needs {allowed})" for name, (ok, allowed) in needs.items() if not ok]
    if wrong:
        raise ValueError(f"refine_bits={config.refine_bits} refines the learner's cached pixel codes, both ends "
                         "keeping each sample's reconstruction: " + "; ".join(wrong))


# field -> (whether the config uses it, the condition in words)
_USED_WHEN = {
    **{name: (lambda c: c.method == "qdata", "method='qdata'")
       for name in ("quantizer", "gate", "rho", "score", "correction", "cache", "coder", "transform", "refine_bits")},
    "gate_floor": (lambda c: c.method == "qdata" and c.gate == "bernoulli", "method='qdata' and gate='bernoulli'"),
    "refine_max": (lambda c: c.method == "qdata" and c.refine_bits > 0, "method='qdata' and refine_bits >= 2"),
    "bits": (lambda c: c.method == "qdata" and c.transform == "none", "method='qdata' and transform='none'"),
    "sample_bits": (lambda c: c.method == "qdata" and c.transform != "none",
                    "method='qdata' and transform='dct' or 'pca'"),
    **{name: (lambda c: c.method == "dca", "method='dca'") for name in ("dca_dim", "dca_anchors", "dca_values")},
    **{name: (lambda c: c.method == "dispatch", "method='dispatch'")
       for name in ("dispatch_replication", "dispatch_balanced", "dispatch_route", "dispatch_fit_samples")},
    **{name: (lambda c: c.method == "split", "method='split'")
       for name in ("split_cut", "split_bits", "split_top", "split_mode")},
    "split_turn": (lambda c: c.method == "split" and c.split_mode == "sequential",
                   "method='split' and split_mode='sequential'"),
    "compressor": (lambda c: c.method == "gradient", "method='gradient'"),
    "error_feedback": (lambda c: c.method == "gradient", "method='gradient'"),
    "momentum": (lambda c: c.optimizer == "sgd", "optimizer='sgd'"),
    "stream_rounds": (lambda c: c.stream_start < 1.0, "stream_start < 1 (streaming nodes)"),
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}


def _check_nothing_ignored(config: RunConfig) -> None:
    """A field set away from its default that the chosen setting ignores is an error, not a no-op."""
    ignored = [(name, when) for name, (used, when) in _USED_WHEN.items()
               if getattr(config, name) != _DEFAULTS[name] and not used(config)]
    if config.method == "qdata" and config.gate == "off" and config.score != _DEFAULTS["score"]:
        ignored.append(("score", "a gate (gate='bernoulli' or 'top')"))
    if ignored:
        said = "; ".join(f"{name}={getattr(config, name)!r} is used only with {when}" for name, when in ignored)
        raise ValueError(f"{said}: this run (method={config.method!r}, optimizer={config.optimizer!r}) would "
                         "ignore it; leave it at its default")


# ----------------------------------------------------------------------------------------------
# Compressor specs.


class CompressorSpec(NamedTuple):
    """A parsed compressor spec: ``name``, its ``args`` (a count K as ``("count", k)`` or
    ``("fraction", f)``; levels, bucket, rank as ints) and whether it is wrapped in error feedback."""

    name: str
    args: tuple
    error_feedback: bool = False


def _count(spec: str, text: str) -> tuple[str, float]:
    value = _finite_number(text)
    if value is None or value <= 0 or (value >= 1 and value != int(value)):
        raise ValueError(f"spec {spec!r}: K must be an integer >= 1 or a fraction of d in (0, 1), got {text!r}")
    return ("fraction", value) if value < 1 else ("count", int(value))


def _positive_int(spec: str, what: str, text: str, hi: int = INT_MAX) -> int:
    if not text.isdigit() or not 1 <= int(text) <= hi:
        raise ValueError(f"spec {spec!r}: {what} must be an integer in 1..{hi}, got {text!r}")
    return int(text)


def parse_compressor_spec(spec: str) -> CompressorSpec:
    """Parse a compressor spec (module docstring); a ValueError names the spec and what it allows."""
    if not isinstance(spec, str):
        raise ValueError(f"a compressor spec must be a string, one of {', '.join(COMPRESSOR_SPECS)}, got {spec!r}")
    body, wrapped = (spec[3:], True) if spec.startswith("ef:") else (spec, False)
    if wrapped and (body == "ef" or body.startswith("ef:")):
        raise ValueError(f"spec {spec!r}: error feedback wraps a compressor once ('ef:ef:...' is refused)")
    return _parse_plain(spec, body)._replace(error_feedback=wrapped)


def _parse_plain(spec: str, body: str) -> CompressorSpec:
    """``body``, a spec without its ``ef:``; errors name the whole ``spec``."""
    name, *args = body.split(":")
    arity = {"fp32": (0, 0), "fp16": (0, 0), "terngrad": (0, 0), "sign": (0, 0), "randk": (1, 1),
             "randk_seed": (1, 1), "topk": (1, 1), "qsgd": (0, 2), "qsgd_elias": (0, 2), "powersgd": (0, 1),
             "powersgd_allreduce": (0, 1), "significance": (1, 1)}
    if name not in arity:
        raise ValueError(f"unknown compressor spec {spec!r}; known: {', '.join(COMPRESSOR_SPECS)}")
    lo, hi = arity[name]
    if not lo <= len(args) <= hi:
        form = next(s for s in COMPRESSOR_SPECS if s.split(":")[0].split("[")[0] == name)
        raise ValueError(f"spec {spec!r} must be written {('ef:' if body != spec else '') + form!r}")
    if name in ("randk", "randk_seed", "topk"):
        return CompressorSpec(name, (_count(spec, args[0]),))
    if name in ("qsgd", "qsgd_elias"):
        levels = _positive_int(spec, "the levels S", args[0], compressors._MAX_LEVELS) if args else 4
        bucket = _positive_int(spec, "the bucket size", args[1]) if len(args) > 1 else None
        return CompressorSpec(name, (levels, bucket))
    if name in ("powersgd", "powersgd_allreduce"):
        return CompressorSpec(name, (_positive_int(spec, "the rank R", args[0]) if args else 2,))
    if name == "significance":
        threshold = _finite_number(args[0])
        if threshold is None or threshold <= 0:
            raise ValueError(f"spec {spec!r}: the threshold S must be a number > 0 (e.g. 0.01), got {args[0]!r}")
        return CompressorSpec(name, (threshold,))
    return CompressorSpec(name, ())


def _resolve_count(spec: str, count: tuple[str, float], d: int) -> int:
    kind, value = count
    k = max(1, int(round(value * d))) if kind == "fraction" else int(value)
    if k > d:
        raise ValueError(f"spec {spec!r} keeps K={k} coordinates of a model of d={d}: K must be in 1..{d} "
                         f"(or a fraction of d in (0, 1))")
    return k


METHOD_SPECS = ("powersgd_allreduce", "significance")  # specs that name a method, not a compressor


def _not_a_compressor(spec: str):
    raise ValueError(f"{spec!r} is a method (its nodes keep state the learner's reply or the model shapes), "
                     "not a compressor of one message: use it as method='gradient' with "
                     "compressor='powersgd_allreduce:R' or 'significance:S', not as a correction or inside "
                     "another spec")


def make_compressor(spec: str, d: int):
    """Build the compressor named by ``spec`` (see the module docstring) for a model of size d."""
    parsed = parse_compressor_spec(spec)
    name, args = parsed.name, parsed.args
    if name in ("randk", "randk_seed", "topk"):
        k = _resolve_count(spec, args[0], d)
        inner = {"randk": lambda: compressors.randk(k), "randk_seed": lambda: compressors.randk(k, indices="seed"),
                 "topk": lambda: compressors.topk(k)}[name]()
    else:
        inner = {"fp32": compressors.fp32, "fp16": compressors.fp16, "terngrad": compressors.terngrad,
                 "sign": compressors.scaled_sign,
                 "qsgd": lambda: compressors.qsgd(args[0], bucket_size=args[1]),
                 "qsgd_elias": lambda: compressors.qsgd(args[0], bucket_size=args[1], coding="elias"),
                 "powersgd": lambda: compressors.powersgd(args[0]),
                 "powersgd_allreduce": lambda: _not_a_compressor(spec),
                 "significance": lambda: _not_a_compressor(spec)}[name]()
    return compressors.error_feedback(inner) if parsed.error_feedback else inner
