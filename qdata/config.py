"""A run described as data: one :class:`RunConfig` in, one results file out.

A config can come from command-line flags, from a TOML file (keys are the field names), or from
Python. Compressors are named by short specs, parsed once the model size d is known:

=====================  =========================================================
``fp32``, ``fp16``     identity
``randk:K``            random-k, K an integer or a fraction of d (``randk:0.01``)
``randk_seed:K``       random-k with a shared seed instead of indices
``topk:K``             top-k (biased; use with error feedback)
``qsgd:S``             QSGD with S levels, one norm for the whole vector
``qsgd:S:BUCKET``      QSGD with S levels and a norm per bucket of BUCKET coordinates
``qsgd_elias:S[:B]``   the same messages charged as QSGD's Elias coding of them
``terngrad``           TernGrad
``sign``               scaled sign (biased; use with error feedback)
``powersgd:R``         PowerSGD of rank R, each node its own Q (biased; use with error feedback)
``ef:SPEC``            SPEC wrapped in error feedback (e.g. ``ef:topk:64``)
=====================  =========================================================

``powersgd_allreduce:R`` is PowerSGD as Vogels et al. publish it (P summed over the nodes before
orthogonalization, one shared Q, two reductions a round): a method of its own
(:mod:`qdata.methods.powersgd`), for ``method = "gradient"`` only; error feedback as configured.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass

from qdata.codecs import compressors
from qdata.data import check_image_size

METHODS = ("qdata", "sgd", "gradient")
QUANTIZERS = ("stochastic", "nearest", "dither", "per_sample")
GATES = ("off", "bernoulli", "top")
SCORES = ("loss", "grad_norm")


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
    correction: str = "off"
    cache: bool = False
    # gradient compression
    compressor: str = "fp32"
    error_feedback: bool = False
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

    def __post_init__(self):
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.quantizer in QUANTIZERS, f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}"),
            (self.gate in GATES, f"gate must be one of {GATES}, got {self.gate!r}"),
            (self.score in SCORES, f"score must be one of {SCORES}, got {self.score!r}"),
            (isinstance(self.bits, int) and 1 <= self.bits <= 16, f"bits must be an integer in 1..16, got {self.bits!r}"),
            (0.0 < self.rho <= 1.0, f"rho must be in (0, 1], got {self.rho}"),
            (self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 < self.stream_start <= 1.0, f"stream_start must be in (0, 1], got {self.stream_start}"),
            (self.stream_rounds >= 0, f"stream_rounds must be >= 0, got {self.stream_rounds}"),
            (self.target_accuracy is None or 0.0 < self.target_accuracy <= 1.0,
             f"target_accuracy must be in (0, 1], got {self.target_accuracy}"),
            (self.num_devices >= 1, f"num_devices must be >= 1, got {self.num_devices}"),
            (0.0 <= self.validation < 1.0, f"validation must be in [0, 1) (a share of the training set), "
                                            f"got {self.validation}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_image_size(self.image_size, self.dataset)
        if self.error_feedback and self.compressor.startswith("ef:"):
            raise ValueError(f"compressor {self.compressor!r} already has error feedback; error_feedback=True "
                             "would wrap it twice (two memories compensating the same residual)")
        if self.checkpoint_every and self.checkpoint_every % self.eval_every:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of eval_every="
                             f"{self.eval_every} (checkpoints are taken at evaluations)")
        if self.gate == "off" and self.rho != 1.0:
            raise ValueError(f"rho={self.rho} needs a gate (gate='bernoulli' or 'top'); gate='off' sends every sample")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str) -> "RunConfig":
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))


def make_compressor(spec: str, d: int):
    """Build the compressor named by ``spec`` (see the module docstring) for a model of size d."""
    name, _, arg = spec.partition(":")
    if name == "ef":
        return compressors.error_feedback(make_compressor(arg, d))

    def count(default=None) -> int:
        if not arg:
            if default is None:
                raise ValueError(f"compressor {spec!r} needs a parameter, e.g. '{name}:0.01' or '{name}:100'")
            return default
        value = float(arg)
        k = int(round(value * d)) if value < 1 else int(value)
        return max(1, k)

    if name == "fp32":
        return compressors.fp32()
    if name == "fp16":
        return compressors.fp16()
    if name == "randk":
        return compressors.randk(count())
    if name == "randk_seed":
        return compressors.randk(count(), indices="seed")
    if name == "topk":
        return compressors.topk(count())
    if name in ("qsgd", "qsgd_elias"):
        levels, _, bucket = arg.partition(":")
        return compressors.qsgd(int(levels) if levels else 4, bucket_size=int(bucket) if bucket else None,
                                coding="elias" if name == "qsgd_elias" else "fixed")
    if name == "terngrad":
        return compressors.terngrad()
    if name == "sign":
        return compressors.scaled_sign()
    if name == "powersgd":
        return compressors.powersgd(int(arg) if arg else 2)
    if name == "powersgd_allreduce":
        raise ValueError(f"{spec!r} is a method (two reductions a round, one shared Q), not a compressor of one "
                         "message: use it as method='gradient' with compressor='powersgd_allreduce:R', "
                         "not as a correction or inside another spec")
    raise ValueError(
        f"unknown compressor {spec!r}; known: fp32, fp16, randk:K, randk_seed:K, topk:K, qsgd:S[:BUCKET], qsgd_elias:S[:BUCKET], terngrad, sign, "
        "powersgd:R, powersgd_allreduce:R (method gradient only), ef:SPEC"
    )
