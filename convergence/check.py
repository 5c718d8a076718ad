"""The empirical check of the rate bounds, and the communication claim (DESIGN.md section 6).

For an :class:`~convergence.objectives.Objective` and an estimator :class:`Setting` (fp32 SGD, or
qdata with B bits, correction on/off, gate on/off), :func:`check_setting`:

1. builds the estimator from the real modules (:func:`qdata.methods.qdata.qdata_estimator`,
   :func:`qdata.methods.gradient.sgd` / ``gradient_compression``) and its noise model
   (:func:`convergence.bounds.qdata_noise` / ``compressed_gradient_noise``) from the objective's
   constants and the codecs' own parameters (``quantizer.delta``, ``compressor.omega(d)``); the gate's
   terms (its Horvitz-Thompson variance and m = E mean_j 1/p_j) are *estimated*: exact expectations
   over the gate's coins, Monte Carlo over minibatches, maximum over probe points of the region,
   times a safety factor (:func:`gate_statistics`);
2. for each horizon T of a geometric grid, takes the step the bound prescribes for that T
   (:func:`convergence.bounds.prescribed_steps`) and runs T rounds of SGD from w0 for several seeds.
   Because the step depends on T, each horizon is its own run (the total cost is sum_T T, about
   2 T_max for a doubling grid); one compiled program serves all horizons (T and eta are traced
   values), with ``jax.lax.fori_loop`` inside ``jax.jit`` and ``jax.vmap`` over seeds. Within a run
   the averaged iterate and the minimum over t are prefix quantities, accumulated in the loop;
3. reports the empirical quantity (convex: F(w_bar_T) - F*; strongly convex: ||w_T - w*||^2;
   non-convex: min over K equally spaced t < T of the seed-mean ||grad F(w_t)||^2, which is >= the
   minimum over all t < T, hence conservative) with a 95% Student-t band over seeds, the bound, the
   ratio, and the fitted log-log slopes of both.

A check passes when (a) the seed-mean stays under the bound at every T, (b) the empirical slope is
at most the bound's own fitted slope plus ``slope_tol`` (the bound is an upper bound: the curve must
decay at least as fast as predicted; decaying faster is reported, not failed), both slopes fitted on
the horizons where the bound is informative (below the quantity's value at w0; a bound above it
predicts no rate, and with fewer than two such horizons the slope test is not applicable), (c) every
iterate of every run stayed inside the region W where the constants hold, (d) everything is finite
and (e) the step is one the bounds admit (eta <= 1/(2L)). The table also says whether the bound is
informative at T_max: a vacuous bound that holds is reported as such, not as evidence.

:func:`communication_claim` lifts d by random features at fixed n and reports the exact uplink bits
per round (from the estimators' own ``uplink_bits``) and the rounds to a fixed accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from convergence import bounds as B
from convergence import figures
from convergence import objectives as O
from qdata.codecs import compressors, quantizers
from qdata.codecs.ledger import host_per_entry, host_total
from qdata.gate import bernoulli_gate, loss_score, no_gate
from qdata.methods.gradient import gradient_compression, sgd
from qdata.methods.qdata import qdata_estimator, qdata_method

Array = jax.Array

# The runs draw their randomness from XLA's RngBitGenerator ("rbg") rather than threefry: the
# estimator draws several keys per round, and threefry's unrolled hash makes every compiled program
# two to three times slower to compile for the same statistics.
PRNG_IMPL = "rbg"
# The run programs are compiled at XLA's backend optimization level 1 (default 2): ~20% less compile
# time, the same run time on these small problems (level 0 runs ~8x slower). Compilation dominates
# the default run: one program per (objective, setting).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


# ----------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True, eq=False)
class Setting:
    """One estimator configuration.

    Attributes:
      name: label in tables and figures.
      method: "sgd" (fp32 gradients), "compressed" (the minibatch gradient through ``compressor``)
        or "qdata".
      bits: B of the data quantizer (qdata).
      correction: send the gradient-difference correction through ``compressor`` (default random-k
        with k = ``k`` or ceil(d/2)).
      gate: use the Bernoulli importance gate with budget ``rho`` and loss scores.
      rho: the gate's budget fraction.
      k: random-k size of the correction (None: ceil(d/2)).
      compressor: a :class:`qdata.codecs.base.Compressor` overriding the correction's (qdata) or the
        gradient's ("compressed") compressor. The bound uses its *claimed* ``unbiased``/``omega``, so a
        mis-scaled compressor that claims to be unbiased is caught by the check (negative control).
      quantizer: "stochastic" or "nearest" rounding.
      step_over_L: None to use the step the bound prescribes; a number c to run with the fixed step
        eta = c / L at every horizon (the bound is then evaluated at that step and flagged invalid if
        c > 1/2, the largest step the bounds admit).
      gate_override: a :class:`qdata.gate.Gate` run in place of the Bernoulli gate (``gate`` on); the
        bound still uses the Bernoulli gate's terms, so a gate that breaks its claims is caught
        (negative control, :func:`unweighted_gate`).
    """

    name: str
    method: str = "qdata"
    bits: int | None = None
    correction: bool = False
    gate: bool = False
    rho: float = 0.5
    k: int | None = None
    compressor: Any = None
    quantizer: str = "stochastic"
    step_over_L: float | None = None
    gate_override: Any = None

    def __post_init__(self):
        if self.method not in ("sgd", "compressed", "qdata"):
            raise ValueError(f"method must be 'sgd', 'compressed' or 'qdata', got {self.method!r}")
        if self.method == "qdata" and self.bits is None:
            raise ValueError("a qdata setting needs bits")
        if self.method == "compressed" and self.compressor is None:
            raise ValueError("a 'compressed' setting needs a compressor")
        if self.quantizer not in ("stochastic", "nearest"):
            raise ValueError(f"quantizer must be 'stochastic' or 'nearest', got {self.quantizer!r}")
        if self.step_over_L is not None and not (math.isfinite(self.step_over_L) and self.step_over_L > 0):
            raise ValueError(f"step_over_L must be a positive number, got {self.step_over_L}")
        if not 0.0 < float(self.rho) <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.gate_override is not None and not (self.method == "qdata" and self.gate):
            raise ValueError("gate_override replaces the gate of a qdata setting: it needs method='qdata', gate=True")

    def describe(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "method", "bits", "correction", "gate", "rho", "k",
                                             "quantizer", "step_over_L")}
        out["compressor"] = None if self.compressor is None else "custom"
        out["gate_override"] = None if self.gate_override is None else "custom"
        return out


def default_settings(bits: Sequence[int] = (2, 4, 8), rho: float = 0.5) -> list[Setting]:
    """fp32 SGD, then qdata for every B in ``bits`` with correction off/on and gate off/on."""
    out = [Setting("fp32 SGD", method="sgd")]
    for b in bits:
        for corr in (False, True):
            for gate in (False, True):
                name = f"qdata B={b}" + (" +corr" if corr else "") + (" +gate" if gate else "")
                out.append(Setting(name, bits=b, correction=corr, gate=gate, rho=rho))
    return out


def unscaled_randk(k: int):
    """Negative control: random-k *without* the d/k scale, still claiming unbiased with omega = d/k - 1.

    A wrapper of :func:`qdata.codecs.compressors.randk` whose decode multiplies by k/d, so
    E[C(x)] = (k/d) x: a gradient shrunk by k/d, i.e. a step k/d times smaller than the bound assumes.
    """
    base = compressors.randk(k)

    def decode(payload):
        return jax.tree_util.tree_map(lambda v: v * (k / payload.meta.spec.size), base.decode(payload))

    return base._replace(decode=decode)


def offset_fp32(offset):
    """Negative control: fp32 gradients plus a constant vector, claiming unbiased with omega = 0."""
    base = compressors.fp32()
    return base._replace(decode=lambda payload: jax.tree_util.tree_map(jnp.add, base.decode(payload), offset))


def unweighted_gate(rho: float):
    """Negative control on the qdata path: the Bernoulli importance gate without its 1/p weights.

    Samples are drawn with the same p_j, but weighted a_j = m_j instead of m_j / p_j (nothing crosses
    the link for the weights), while the gate still claims to be unbiased: E[a_j] = p_j, so the
    learner's g is (1/b) sum_j p_j grad f_j, shrunk about rho-fold and tilted towards high-loss samples.
    """
    base = bernoulli_gate(rho)

    def select(key, scores):
        chosen = base.select(key, scores)
        return chosen._replace(weight=chosen.mask)

    return base._replace(select=select, weighted=False)


# The unweighted gate's budget. Measured (T = 2^6..2^15, 4 seeds, B = 8): on control_objective() the
# learner without 1/p plateaus, ratio to the bound 1.05 at T = 2^12, 1.35 at 2^13, 2.0 at 2^15, slope
# -0.18 against the bound's -0.49, while the same gate with its weights stays under 0.21. On the
# default least_squares (512 samples, real targets) it converges nonetheless (ratio <= 0.86 up to
# 2^15): the tilt towards high-loss samples barely moves that minimizer, and the check cannot see it.
CONTROL_RHO = 0.1


def control_objective() -> O.Objective:
    """The objective the negative controls run on (the CLI and the tests alike): least squares on 256
    samples, identity features, +-1 labels (misspecified, so a biased estimator settles away from w*)."""
    return O.least_squares(10, num_samples=256, features="identity", seed=0)


def negative_controls(objective: O.Objective) -> list[Setting]:
    """Estimators the check must report as failing (a checker that cannot fail is worthless).

    * random-k (k = 1) without its d/k scale: biased towards 0, too slow for the bound it claims;
    * fp32 SGD with eta = 2.5 / L, above 2 / L (divergent on the top curvature direction);
    * fp32 gradients plus a constant bias of norm 0.3 along the first coordinate;
    * qdata (B = 8) with the Bernoulli gate stripped of its 1/p weights (:func:`unweighted_gate`).
    """
    bias = np.zeros(objective.d, np.float32)
    bias[0] = 0.3
    return [
        Setting("CONTROL randk k=1, no d/k", method="compressed", compressor=unscaled_randk(1)),
        Setting("CONTROL eta = 2.5/L", method="sgd", step_over_L=2.5),
        Setting("CONTROL fp32 + bias 0.3", method="compressed", compressor=offset_fp32(jnp.asarray(bias))),
        Setting(f"CONTROL qdata B=8 +gate rho={CONTROL_RHO}, no 1/p", bits=8, gate=True, rho=CONTROL_RHO,
                gate_override=unweighted_gate(CONTROL_RHO)),
    ]


class Round(NamedTuple):
    """One round of one node, as the checker runs it.

    ``step(key, w, batch, state) -> (g, state, uplink_bits_total)``, the bits an exact
    :class:`qdata.codecs.ledger.Bits` (converted to Python ints on the host).
    """

    init: Callable
    step: Callable


def _round_from_method(method) -> Round:
    def step(key, w, batch, state):
        msg, state = method.node_message(key, w, batch, state)
        stacked = jax.tree_util.tree_map(lambda a: a[None], msg)
        g, _ = method.learner_gradient(w, stacked, method.init_learner(w, 1))
        return g, state, method.uplink_bits(msg)["total"]

    return Round(method.init_node, step)


def _quantizer(objective: O.Objective, setting: Setting):
    make = quantizers.stochastic_rounding if setting.quantizer == "stochastic" else quantizers.nearest_rounding
    return make(setting.bits, objective.lo, objective.hi)


def _correction(objective: O.Objective, setting: Setting):
    if setting.compressor is not None:
        return setting.compressor
    k = setting.k if setting.k is not None else math.ceil(objective.d / 2)
    return compressors.randk(k)


def _gate(setting: Setting):
    if setting.gate_override is not None:
        return setting.gate_override
    return bernoulli_gate(setting.rho) if setting.gate else no_gate()


def build_round(objective: O.Objective, setting: Setting) -> Round:
    """The estimator of ``setting`` on ``objective``, from the real qdata modules."""
    if setting.method == "sgd":
        return _round_from_method(sgd(objective.loss_fn))
    if setting.method == "compressed":
        return _round_from_method(gradient_compression(objective.loss_fn, setting.compressor))
    # num_classes None (real targets): the estimator sends each transmitted target as an fp32 value,
    # exactly, so the bounds' noise terms are those of integer labels.
    est = qdata_estimator(
        objective.loss_fn, _quantizer(objective, setting), num_classes=objective.num_classes, gate=_gate(setting),
        correction=_correction(objective, setting) if setting.correction else None,
        score_fn=loss_score(objective.loss_fn),
    )
    return _round_from_method(qdata_method(est))


# ----------------------------------------------------------------------------------------------
# The gate's variance terms (estimated).


class GateStats(NamedTuple):
    """sup over probe points (times the safety factor) of the gate's terms."""

    variance: float  # E (1/b^2) sum_j (1/p_j - 1) ||grad f(w; x_j)||^2
    mean_inv_p: float  # E (1/b) sum_j 1/p_j
    method: str


# Keyed by the objective itself (weakly), so a freed objective's id cannot be reused by a new one.
_GATE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gate_statistics(objective: O.Objective, rho: float, batch: int, *, probes: int = 16, batches: int = 256,
                    safety: float = 1.5, seed: int = 0) -> GateStats:
    """Estimate the gate's variance terms of :func:`convergence.bounds.qdata_noise`.

    At each of the region's centre, w0 and ``probes`` points of the region, and for ``batches``
    minibatches (drawn like the run's, with replacement), the expectation over the gate's coins is
    exact given the probabilities p_j that :func:`qdata.gate.bernoulli_gate` returns (the fp16 p~_j it
    sends): Var = (1/b^2) sum_j (1/p_j - 1) ||grad f_j||^2 and m = (1/b) sum_j 1/p_j. The mean over
    minibatches estimates the expectation; the maximum over points, times ``safety``, estimates the
    sup over the region. An estimate, not a certified bound: the report says so.
    """
    cache_key = (rho, batch, probes, batches, safety, seed)
    cached = _GATE_CACHE.get(objective, {})
    if cache_key in cached:
        return cached[cache_key]
    gate = bernoulli_gate(rho)
    score = loss_score(objective.loss_fn)
    x, y = jnp.asarray(objective.x), jnp.asarray(objective.y)
    per_sample = jax.vmap(jax.grad(lambda w, xi, yi: objective.loss_fn(w, xi[None], yi[None])[0]),
                          in_axes=(None, 0, 0))

    @jax.jit
    def stats(w, key):
        def one(k):
            kb, kg = jax.random.split(k)
            idx = jax.random.randint(kb, (batch,), 0, x.shape[0])
            xb, yb = x[idx], y[idx]
            p = gate.select(kg, score(w, xb, yb)).prob
            g2 = jnp.sum(jnp.square(per_sample(w, xb, yb)), axis=1)
            inv = 1.0 / p
            return jnp.sum((inv - 1.0) * g2) / batch**2, jnp.mean(inv)

        v, m = jax.vmap(one)(jax.random.split(key, batches))
        return jnp.mean(v), jnp.mean(m)

    pts = O.probe_points(objective, probes, seed)
    keys = jax.random.split(jax.random.key(seed, impl=PRNG_IMPL), len(pts))
    vals = [stats(jnp.asarray(p, jnp.float32), k) for p, k in zip(pts, keys)]
    var = safety * max(float(v) for v, _ in vals)
    m = safety * max(float(m) for _, m in vals)
    out = GateStats(var, m, f"estimated: {safety:g} x max over {len(pts)} points of the region of the exact "
                            f"expectation over the gate's coins, Monte Carlo over {batches} minibatches")
    _GATE_CACHE.setdefault(objective, {})[cache_key] = out
    return out


def noise_model(objective: O.Objective, setting: Setting, batch: int) -> tuple[B.NoiseModel, dict]:
    """The :class:`~convergence.bounds.NoiseModel` of ``setting`` on ``objective`` and how it was obtained."""
    d = objective.d
    info: dict = {}
    if setting.method == "sgd":
        comp = compressors.fp32()
    elif setting.method == "compressed":
        comp = setting.compressor
    else:
        comp = _correction(objective, setting) if setting.correction else None
    if comp is not None and (not comp.unbiased or comp.omega is None):
        raise ValueError(f"setting {setting.name}: the bounds need an unbiased compressor with omega(d)")
    if setting.method in ("sgd", "compressed"):
        noise = B.compressed_gradient_noise(variance_sup=objective.variance_sup, batch=batch,
                                            omega=float(comp.omega(d)), grad_sup=objective.grad_sup)
        info["omega"] = float(comp.omega(d))
        return noise, info
    q = _quantizer(objective, setting)
    gstats = gate_statistics(objective, setting.rho, batch) if setting.gate else None
    noise = B.qdata_noise(
        variance_sup=objective.variance_sup, batch=batch, L_x=objective.L_x, n=objective.n, delta=q.delta,
        correction_omega=float(comp.omega(d)) if comp is not None else None,
        gate_variance=gstats.variance if gstats else 0.0, mean_inv_p=gstats.mean_inv_p if gstats else None,
        quantizer_unbiased=q.unbiased, L_xx=objective.L_xx,
    )
    info.update(delta=q.delta, omega=float(comp.omega(d)) if comp is not None else None)
    if gstats:
        info.update(gate_variance=gstats.variance, mean_inv_p=gstats.mean_inv_p, gate_method=gstats.method)
    return noise, info


# ----------------------------------------------------------------------------------------------
# Running SGD.


class RunOutput(NamedTuple):
    """Per seed: final iterate, averaged iterate (t = 1..T), K checkpoints (t = kT/K), the largest
    distance to the region's centre over t = 0..T, the first round's bits (exact, int64) and the mean
    bits (float32 statistic)."""

    w_last: np.ndarray
    w_avg: np.ndarray
    checkpoints: np.ndarray
    max_dist: np.ndarray
    bits_first: np.ndarray
    bits_mean: np.ndarray


def make_runner(objective: O.Objective, rnd: Round, batch: int, checkpoints: int):
    """A jitted ``run(keys (S,), eta, T) -> RunOutput`` (vmapped over seeds; eta and T traced).

    Each round draws b sample indices uniformly with replacement, so the sampling part of the
    estimator's variance is exactly V(w)/b. T must be a multiple of ``checkpoints``.
    """
    x, y = jnp.asarray(objective.x), jnp.asarray(objective.y)
    num = x.shape[0]
    w0 = jnp.asarray(objective.w0, jnp.float32)
    center = jnp.asarray(objective.center, jnp.float32)
    K = checkpoints

    def run(key, eta, T):
        steps = T // K
        state0 = rnd.init(w0)
        # The first round's exact Bits ride in the loop carry: a zero of their (static) structure.
        first_batch = {"x": x[jnp.zeros((batch,), jnp.int32)], "y": y[jnp.zeros((batch,), jnp.int32)]}
        bits_shape = jax.eval_shape(lambda k: rnd.step(k, w0, first_batch, state0)[2], key)
        no_bits = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), bits_shape)

        def step(t, carry):
            w, state, w_sum, max_dist, bits_first, bits_sum = carry
            kb, ke = jax.random.split(jax.random.fold_in(key, t))
            idx = jax.random.randint(kb, (batch,), 0, num)
            g, state, bits = rnd.step(ke, w, {"x": x[idx], "y": y[idx]}, state)
            w = w - eta * g
            bits_first = jax.tree_util.tree_map(lambda a, b: jnp.where(t == 0, a, b), bits, bits_first)
            # The mean is a statistic: float32 on device is enough (the first round's count is exact).
            return (w, state, w_sum + w, jnp.maximum(max_dist, jnp.linalg.norm(w - center)), bits_first,
                    bits_sum + bits.as_float(jnp.float32))

        def chunk(c, carry):
            inner, ckpt = carry
            ckpt = ckpt.at[c].set(inner[0])
            return jax.lax.fori_loop(c * steps, (c + 1) * steps, step, inner), ckpt

        init = (w0, state0, jnp.zeros_like(w0), jnp.linalg.norm(w0 - center), no_bits, jnp.float32(0))
        (w, _, w_sum, max_dist, bits_first, bits_sum), ckpt = jax.lax.fori_loop(
            0, K, chunk, (init, jnp.zeros((K,) + w0.shape, jnp.float32)))
        Tf = T.astype(jnp.float32)
        return w, w_sum / Tf, ckpt, max_dist, bits_first, bits_sum / Tf

    vrun = jax.jit(jax.vmap(run, in_axes=(0, None, None)), compiler_options=COMPILER_OPTIONS)

    def call(keys, eta, T):
        if T % K:
            raise ValueError(f"T={T} must be a multiple of the number of checkpoints {K}")
        w_last, w_avg, ckpt, max_dist, bits_first, bits_mean = vrun(keys, jnp.float32(eta), jnp.int32(T))
        return RunOutput(np.asarray(w_last), np.asarray(w_avg), np.asarray(ckpt), np.asarray(max_dist),
                         host_per_entry(jax.device_get(bits_first)), np.asarray(bits_mean))

    return call


_GRAD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _grad_sq_norms(objective: O.Objective, ws: np.ndarray) -> np.ndarray:
    """||grad F(w)||^2 for a stack of iterates (..., d), float32 autodiff over the full data."""
    if objective not in _GRAD_CACHE:
        x, y = jnp.asarray(objective.x), jnp.asarray(objective.y)
        grad = jax.grad(lambda w: jnp.mean(objective.loss_fn(w, x, y)))
        _GRAD_CACHE[objective] = jax.jit(jax.vmap(lambda w: jnp.sum(jnp.square(grad(w)))))
    flat = ws.reshape(-1, ws.shape[-1])
    return np.asarray(_GRAD_CACHE[objective](jnp.asarray(flat)), np.float64).reshape(ws.shape[:-1])


def _band(values: np.ndarray) -> tuple[float, float]:
    """(mean, half width of the 95% Student-t interval) over the leading axis (seeds)."""
    from scipy import stats

    s = values.shape[0]
    mean = float(np.mean(values))
    if s < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, s - 1) * np.std(values, ddof=1) / math.sqrt(s))


def empirical(objective: O.Objective, kind: str, out: RunOutput) -> tuple[float, float, np.ndarray]:
    """(seed mean, 95% half width, per-seed values) of the quantity the bound of ``kind`` controls."""
    if kind == "convex":
        vals = np.array([objective.full_loss(w) for w in out.w_avg]) - objective.F_star
    elif kind == "strongly_convex":
        vals = np.sum((out.w_last.astype(np.float64) - objective.w_star) ** 2, axis=1)
    else:
        g2 = _grad_sq_norms(objective, out.checkpoints)  # (S, K)
        k_min = int(np.argmin(g2.mean(axis=0)))
        vals = g2[:, k_min]
    mean, half = _band(vals)
    return mean, half, vals


# ----------------------------------------------------------------------------------------------
# One check.


def _validated_horizons(objective: O.Objective, kind: str, T_grid: Sequence[int], seeds: int,
                        checkpoints: int) -> np.ndarray:
    """The sorted horizons T (int64) of :func:`check_setting`; raises where the check cannot run."""
    if kind not in B.KINDS:
        raise ValueError(f"kind must be one of {B.KINDS}, got {kind!r}")
    if kind != "nonconvex" and objective.w_star is None:
        raise ValueError(f"the {kind} bound needs w*; objective {objective.name} has none")
    if kind == "strongly_convex" and not objective.mu > 0:
        raise ValueError(f"the strongly convex bound needs mu > 0; objective {objective.name} has mu = {objective.mu}")
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise ValueError(f"checkpoints must be a positive integer, got {checkpoints!r}")
    T = np.asarray(sorted(int(t) for t in T_grid), np.int64)
    if len(T) < 2 or np.any(T % checkpoints):
        raise ValueError(f"T_grid needs >= 2 horizons, each a multiple of checkpoints={checkpoints}, got {list(T)}")
    if seeds < 2:
        raise ValueError(f"seeds must be >= 2 for a confidence band, got {seeds}")
    return T


def _steps_and_bound(objective: O.Objective, setting: Setting, kind: str, T: np.ndarray,
                     noise: B.NoiseModel) -> tuple[np.ndarray, np.ndarray, bool]:
    """The step eta_T at each horizon and the bound of ``kind`` there.

    eta_T is the step the bound prescribes for T (:func:`convergence.bounds.prescribed_steps`), or
    the fixed c / L of ``setting.step_over_L``, valid only if c <= 1/2 (eta <= 1/(2L)).

    Returns:
      ``(etas, bound, step_valid)``.
    """
    consts = dict(L=objective.L, noise=noise, D0=objective.D0 if kind != "nonconvex" else None,
                  F_gap=objective.F0 - objective.F_inf, mu=objective.mu)
    if setting.step_over_L is None:
        etas = B.prescribed_steps(kind, T, **consts)
        step_valid = True
    else:
        etas = np.full(T.shape, setting.step_over_L / objective.L)
        step_valid = setting.step_over_L <= 0.5
    return etas, B.bound_at(kind, T, etas, radius=objective.radius, **consts), step_valid


class _Curves(NamedTuple):
    """The empirical side of one check, one entry per horizon T (seed mean and 95% half width of the
    bounded quantity, mean uplink bits per round), and over all horizons the largest distance of an
    iterate to the region's centre, the first round's exact bits and the first call's seconds."""

    means: np.ndarray
    halves: np.ndarray
    bits_mean: list
    max_dist: float
    bits_first: int | None
    first_call: float | None


def _run_horizons(objective: O.Objective, setting: Setting, kind: str, T: np.ndarray, etas: np.ndarray, *,
                  seeds: int, batch: int, checkpoints: int, seed: int) -> _Curves:
    """Run ``setting`` for T rounds at step eta_T from w0, for every horizon T and ``seeds`` seeds,
    with one compiled program (:func:`make_runner`), and measure the quantity of ``kind``
    (:func:`empirical`)."""
    rnd = build_round(objective, setting)
    runner = make_runner(objective, rnd, batch, checkpoints)
    keys = jax.random.split(jax.random.key(seed, impl=PRNG_IMPL), seeds)
    means, halves, max_dist, bits_first, bits_mean = [], [], 0.0, None, []
    first_call = None
    for t, eta in zip(T, etas):
        t_call = time.time()
        out = runner(keys, float(eta), int(t))
        first_call = time.time() - t_call if first_call is None else first_call
        mean, half, _ = empirical(objective, kind, out)
        means.append(mean)
        halves.append(half)
        max_dist = max(max_dist, float(np.max(out.max_dist)) if np.all(np.isfinite(out.max_dist)) else math.inf)
        bits_first = int(out.bits_first[0])
        bits_mean.append(float(np.mean(out.bits_mean)))
    return _Curves(np.asarray(means), np.asarray(halves), bits_mean, max_dist, bits_first, first_call)


def _start_value(objective: O.Objective, kind: str) -> float:
    """The bounded quantity at w0: F(w0) - F* (convex), ||w0 - w*||^2 (strongly convex) or
    ||grad F(w0)||^2 (non-convex). A bound above it says nothing (vacuous)."""
    if kind == "convex":
        return objective.F0 - objective.F_star
    if kind == "strongly_convex":
        return objective.D0
    return float(_grad_sq_norms(objective, objective.w0[None].astype(np.float32))[0])


def _slope_test(T: np.ndarray, means: np.ndarray, bound: np.ndarray, useful: np.ndarray, finite: bool,
                slope_tol: float) -> tuple[float, float, bool]:
    """Fitted log-log slopes of the empirical curve and of the bound on the informative horizons
    ``useful``, and whether slope_emp <= slope_bound + ``slope_tol``.

    With fewer than two informative horizons the bound predicts no rate: the slopes are nan and the
    test passes; a non-finite curve fails.

    Returns:
      ``(slope_emp, slope_bound, slope_ok)``.
    """
    if finite and np.sum(useful) >= 2:
        slope_emp = B.loglog_slope(T[useful], means[useful])
        slope_bound = B.loglog_slope(T[useful], bound[useful])
        return slope_emp, slope_bound, bool(math.isfinite(slope_emp) and slope_emp <= slope_bound + slope_tol)
    if finite:
        return float("nan"), float("nan"), True  # a bound vacuous on (almost) the whole range predicts no rate
    return float("nan"), float("nan"), False


class _Verdict(NamedTuple):
    """The tests of one check (module docstring): finite, bound holds (seed mean / bound = ``ratio``
    <= 1 at every T), slope, region, and ``passed`` = all of them and a valid step; ``useful`` marks
    the informative horizons (bound < ``start_value``, the quantity at w0)."""

    finite: bool
    ratio: np.ndarray
    holds: bool
    start_value: float
    useful: np.ndarray
    slope_emp: float
    slope_bound: float
    slope_ok: bool
    region_ok: bool
    passed: bool


def _verdict(objective: O.Objective, kind: str, T: np.ndarray, bound: np.ndarray, curves: _Curves,
             step_valid: bool, slope_tol: float) -> _Verdict:
    """Judge the empirical curves against the bound (tests (a) to (e) of the module docstring)."""
    means = curves.means
    finite = bool(np.all(np.isfinite(means)))
    ratio = means / bound
    holds = bool(finite and np.all(ratio <= 1.0))
    # Where the bound is above the quantity's value at w0 it says nothing (vacuous) and predicts no
    # rate, so the slopes are fitted on the informative horizons only (>= 2 needed).
    start_value = _start_value(objective, kind)
    useful = bound < start_value
    slope_emp, slope_bound, slope_ok = _slope_test(T, means, bound, useful, finite, slope_tol)
    region_ok = bool(curves.max_dist <= objective.radius)
    passed = bool(holds and slope_ok and region_ok and finite and step_valid)
    return _Verdict(finite, ratio, holds, start_value, useful, slope_emp, slope_bound, slope_ok, region_ok, passed)


def check_setting(
    objective: O.Objective,
    setting: Setting,
    *,
    T_grid: Sequence[int] = tuple(2**k for k in range(6, 14)),
    seeds: int = 8,
    batch: int = 8,
    checkpoints: int = 32,
    slope_tol: float = 0.25,
    kind: str | None = None,
    seed: int = 0,
) -> dict:
    """Run ``setting`` on ``objective`` over ``T_grid`` and compare with the bound (module docstring).

    Args:
      objective: the objective. setting: the estimator.
      T_grid: increasing horizons, each a multiple of ``checkpoints``.
      seeds: independent runs per horizon. batch: b. checkpoints: K (non-convex minimum, averages).
      slope_tol: tolerance of the slope test (empirical slope <= bound slope + slope_tol).
      kind: override the objective's bound (e.g. "convex" on a strongly convex objective).
      seed: base PRNG seed.

    Returns:
      A JSON-ready dict: the curves, the bound, ratios, slopes, the noise terms and the verdict.
    """
    kind = kind or objective.kind
    T = _validated_horizons(objective, kind, T_grid, seeds, checkpoints)
    start = time.time()
    noise, noise_info = noise_model(objective, setting, batch)
    etas, bound, step_valid = _steps_and_bound(objective, setting, kind, T, noise)
    curves = _run_horizons(objective, setting, kind, T, etas, seeds=seeds, batch=batch, checkpoints=checkpoints,
                           seed=seed)
    means, halves = curves.means, curves.halves
    v = _verdict(objective, kind, T, bound, curves, step_valid, slope_tol)
    return {
        "objective": objective.name, "setting": setting.describe(), "kind": kind,
        "quantity": {"convex": "E F(w_bar_T) - F*", "strongly_convex": "E ||w_T - w*||^2",
                     "nonconvex": "min_t E ||grad F(w_t)||^2"}[kind],
        "T": [int(t) for t in T],
        "eta": [float(e) for e in etas],
        "empirical_mean": [float(m) for m in means],
        "empirical_halfwidth95": [float(h) for h in halves],
        "bound": [float(b) for b in bound],
        "ratio": [float(r) for r in v.ratio],
        "worst_ratio": float(np.max(v.ratio)) if v.finite else math.inf,
        "start_value": v.start_value,
        "informative": bool(v.useful[-1]),
        "slope_horizons": [int(t) for t in T[v.useful]] if v.finite else [],
        "upper_band_under_bound": bool(v.finite and np.all(means + np.nan_to_num(halves) <= bound)),
        "slope_empirical": v.slope_emp, "slope_bound": v.slope_bound,
        "predicted_order": B.PREDICTED_ORDER[kind], "slope_tol": slope_tol,
        "noise": noise.as_dict(), "noise_info": noise_info,
        "max_dist_to_center": curves.max_dist, "region_radius": objective.radius,
        "uplink_bits_first_round": curves.bits_first, "uplink_bits_mean": float(np.mean(curves.bits_mean)),
        "seeds": seeds, "batch": batch, "checkpoints": checkpoints,
        "step_valid": step_valid, "bound_holds": v.holds, "slope_ok": v.slope_ok, "region_ok": v.region_ok,
        "finite": v.finite, "passed": v.passed,
        "seconds": time.time() - start,
        "seconds_first_call": curves.first_call,  # compilation + the shortest horizon
    }


# ----------------------------------------------------------------------------------------------
# Default objectives, tables.


def default_objectives(num_samples: int = 512, n: int = 10, targets: str = "real") -> list[O.Objective]:
    """The five objectives of the default run (synthetic data, constants computed at construction).

    The two regressions (least squares, ridge) fit real-valued targets t = s + noise by default
    (``targets="real"``: qdata sends each as an fp32 value, 32 bits); ``targets="binary"`` fits the
    labels 1[t > 0] coded as +-1 instead (least-squares classification, 1-bit labels). The three
    classifiers always use binary labels.
    """
    return [
        O.least_squares(n, num_samples=num_samples, features="identity", targets=targets, name="least_squares"),
        O.ridge(n, 64, num_samples=num_samples, features="random", lam=0.05, targets=targets, name="ridge_rf"),
        O.logistic_regression(n, num_samples=num_samples, features="identity", name="logistic"),
        O.sigmoid_classifier(n, num_samples=num_samples, features="identity", name="sigmoid"),
        O.tanh_network(n, 8, num_samples=num_samples, name="tanh_net"),
    ]


def format_table(results: Sequence[dict]) -> str:
    """One row per (objective, setting): bound holds, worst ratio, slope vs prediction, verdict.

    Columns: holds (seed mean <= bound at every T), worst ratio (max_T empirical / bound), at T_max
    (the ratio at the longest horizon), slope emp
    and slope bnd (fitted log-log slopes over the T grid), order (the bound's asymptotic order with
    the tuned step), region (every iterate stayed in the region W), inform (the bound at T_max is below
    the quantity's value at w0, i.e. not vacuous), PASS (holds, slope emp <= slope bnd + tol, region
    ok, finite, valid step).
    """
    head = (f"{'objective':<14} {'setting':<24} {'kind':<15} {'holds':>5} {'worst ratio':>11} "
            f"{'at T_max':>8} {'slope emp':>9} {'slope bnd':>9} {'order':>6} {'region':>6} {'inform':>6} {'PASS':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['objective']:<14} {r['setting']['name']:<24} {r['kind']:<15} {'yes' if r['bound_holds'] else 'NO':>5} "
            f"{r['worst_ratio']:>11.3g} {r['ratio'][-1]:>8.3g} {r['slope_empirical']:>9.2f} {r['slope_bound']:>9.2f} "
            f"{r['predicted_order']:>6.2f} {'ok' if r['region_ok'] else 'LEFT':>6} "
            f"{'yes' if r['informative'] else 'no':>6} {'yes' if r['passed'] else 'NO':>5}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The communication claim.


def uplink_bits_per_round(objective: O.Objective, setting: Setting, batch: int, seed: int = 0) -> int:
    """Exact uplink bits of one node's message at w0 on one minibatch, from the estimator's ledger.

    Without a gate the count does not depend on the data or the round (fixed-length codes).
    """
    rnd = build_round(objective, setting)
    w0 = jnp.asarray(objective.w0)
    idx = np.random.default_rng(seed).integers(0, objective.num_samples, batch)
    b = {"x": jnp.asarray(objective.x[idx]), "y": jnp.asarray(objective.y[idx])}
    step = jax.jit(lambda key: rnd.step(key, w0, b, rnd.init(w0))[2])
    return host_total(jax.device_get(step(jax.random.key(seed, impl=PRNG_IMPL))))


def _comm_settings(bits: int, k: int, qsgd_levels: int) -> dict[str, Setting]:
    """The four estimators of :func:`communication_claim` by label: fp32 SGD, QSGD with s levels,
    qdata with B bits, and qdata with the correction through random-k of fixed k."""
    qsgd_label = f"QSGD s={qsgd_levels}"
    plain_label, corr_label = f"qdata B={bits}", f"qdata B={bits} +corr(randk k={k})"
    return {
        "fp32 SGD": Setting("fp32 SGD", method="sgd"),
        qsgd_label: Setting(qsgd_label, method="compressed", compressor=compressors.qsgd(qsgd_levels)),
        plain_label: Setting(plain_label, bits=bits),
        corr_label: Setting(corr_label, bits=bits, correction=True, k=k),
    }


def _predicted_rounds(obj: O.Objective, setting: Setting, batch: int, grid: np.ndarray, target: float,
                      seed: int) -> dict:
    """Exact bits per round, and the smallest T of ``grid`` at which the strongly convex bound with the
    step it prescribes for T reaches E||w_T - w*||^2 <= ``target`` (inf if none; eta None then).

    Returns:
      The setting's entry of a :func:`communication_claim` row, its measured rounds still None.
    """
    noise, _ = noise_model(obj, setting, batch)
    etas, vals = B.tuned_step_strongly_convex(grid, obj.D0, noise.sigma2, obj.mu, B.max_step(obj.L), noise.bias)
    hit = np.nonzero(vals <= target)[0]
    return {"bits_per_round": uplink_bits_per_round(obj, setting, batch, seed),
            "rounds_predicted": float(grid[hit[0]]) if hit.size else math.inf,
            "eta": float(etas[hit[0]]) if hit.size else None,
            "sigma2": noise.sigma2, "bias": noise.bias,
            "rounds_measured": None, "rounds_at_fp32_step": None}


def _rounds_to_target(runner, keys, obj: O.Objective, eta: float, horizon: float, target: float, *,
                      checkpoints: int, max_rounds: int) -> float:
    """The first of K = ``checkpoints`` equally spaced rounds t (and the last, T) at which the seed
    mean of ||w_t - w*||^2 is <= ``target``, running T = min(max_rounds, horizon) rounds (a multiple
    of K, at least K) at step ``eta``; inf if not within the run."""
    horizon = max(checkpoints, int(min(max_rounds, horizon)) // checkpoints * checkpoints)
    out = runner(keys, eta, horizon)
    dist = np.sum((out.checkpoints.astype(np.float64) - obj.w_star) ** 2, axis=2).mean(axis=0)
    final = float(np.mean(np.sum((out.w_last.astype(np.float64) - obj.w_star) ** 2, axis=1)))
    curve_t = np.append(np.arange(checkpoints) * (horizon // checkpoints), horizon)
    hit_e = np.nonzero(np.append(dist, final) <= target)[0]
    return float(curve_t[hit_e[0]]) if hit_e.size else math.inf


def _measure_rounds(obj: O.Objective, entry: dict, settings: dict[str, Setting], labels: Sequence[str], *,
                    batch: int, keys, target: float, checkpoints: int, max_rounds: int) -> dict:
    """Rounds measured for each of ``labels`` (fp32 SGD first): (a) at the setting's own prescribed
    step and predicted horizon (if it has one) and (b) at fp32 SGD's step and horizon (the largest
    admitted step and ``max_rounds`` where fp32 has no prediction).

    Returns:
      label -> {"rounds_measured": ..., "rounds_at_fp32_step": ...} (None where not run).
    """
    fp32 = entry["fp32 SGD"]
    common_eta = fp32["eta"] if fp32["eta"] is not None else B.max_step(obj.L)
    common_horizon = fp32["rounds_predicted"] if math.isfinite(fp32["rounds_predicted"]) else max_rounds
    measured = {}
    for label in labels:
        runner = make_runner(obj, build_round(obj, settings[label]), batch, checkpoints)
        e = entry[label]
        rounds = None
        if e["eta"] is not None:
            rounds = _rounds_to_target(runner, keys, obj, e["eta"], e["rounds_predicted"], target,
                                       checkpoints=checkpoints, max_rounds=max_rounds)
        at_fp32 = rounds if label == "fp32 SGD" else _rounds_to_target(
            runner, keys, obj, common_eta, common_horizon, target, checkpoints=checkpoints, max_rounds=max_rounds)
        measured[label] = {"rounds_measured": rounds, "rounds_at_fp32_step": at_fp32}
    return measured


def _communication_verdicts(rows: list[dict], settings: dict[str, Setting]) -> dict:
    """Growth of the bits from d_min to d_max and the two claims of :func:`communication_claim`.

    ``settings`` is :func:`_comm_settings`' dict (fp32 SGD, QSGD, qdata, qdata + correction, in that order).

    Returns:
      ``bits_growth``, ``bits_slope`` (log-log slope of bits against d), ``log_factor``,
      ``linear_factor``, ``bits_claim_holds`` and ``rounds_claim_holds``.
    """
    _, qsgd_label, plain_label, corr_label = settings
    labels = [lab for lab in rows[0] if isinstance(rows[0][lab], dict)]
    d0, d1 = rows[0], rows[-1]
    growth = {lab: d1[lab]["bits_per_round"] / d0[lab]["bits_per_round"] for lab in labels}
    log_factor = d1["index_width"] / d0["index_width"]
    lin_factor = d1["d"] / d0["d"]
    # Log-log slope of bits against d: 1 for bits proportional to d (QSGD's fixed 32-bit norm lowers
    # it a little at small d), 0 for bits independent of d.
    slope = {lab: math.log(growth[lab]) / math.log(lin_factor) for lab in labels}
    bits_ok = (all(growth[lab] <= log_factor for lab in (plain_label, corr_label))
               and all(slope[lab] >= 0.9 for lab in ("fp32 SGD", qsgd_label)))
    rounds_ok = all(r[lab]["rounds_measured"] is None or r[lab]["rounds_measured"] <= r[lab]["rounds_predicted"]
                    for r in rows for lab in labels)
    return {"bits_growth": growth, "bits_slope": slope, "log_factor": log_factor, "linear_factor": lin_factor,
            "bits_claim_holds": bool(bits_ok), "rounds_claim_holds": bool(rounds_ok)}


def communication_claim(
    dims: Sequence[int] = (100, 1000, 10000),
    *,
    n: int = 10,
    num_samples: int = 512,
    bits: int = 8,
    k: int = 16,
    qsgd_levels: int = 16,
    batch: int = 8,
    lam: float = 0.05,
    accuracy: float = 0.2,
    seeds: int = 4,
    max_rounds: int = 4096,
    checkpoints: int = 64,
    measure_rounds: bool = True,
    max_prediction: int = 2**16,
    targets: str = "real",
    seed: int = 0,
) -> dict:
    """Bits per round and rounds to a fixed accuracy as d is lifted by random features at fixed n.

    The objective is ridge regression on random features (:func:`convergence.objectives.ridge`) with
    the *same* data (x, y) for every d (the teacher lives in data space), with real-valued targets
    by default (``targets="binary"``: 1-bit labels, see :func:`default_objectives`). For each d:

    * uplink bits per node per round, read off the packed messages by the estimators' own
      ``uplink_bits``: qdata with B bits (n B bits per sample, plus its target: 32 bits for an fp32
      real target, 1 bit for a binary label) and the correction through random-k of fixed k (k values
      in fp32 plus k indices of ceil(log2 d) bits), qdata without correction, fp32 SGD (32 d) and
      QSGD with s levels (fixed-length code);
    * rounds to reach E||w_t - w*||^2 <= accuracy * ||w0 - w*||^2. Predicted: the smallest T on a
      grid of quarter powers of two at which the strongly convex bound, with the step it prescribes
      for T, reaches the target (inf beyond ``max_prediction``, or when the bias floor is above it).
      Measured (first of ``checkpoints`` equally spaced rounds at which the seed mean is under the
      target; inf if not within the run): (a) with the method's own prescribed step, which checks
      the prediction, and (b) with fp32 SGD's prescribed step for every method, which isolates the
      effect of d on the process from the bound's (conservative) choice of step. qdata's predicted
      rounds grow with d through omega(d) = d/k - 1 of the random-k correction; the claim is that
      measured rounds do not grow beyond that.

    Returns:
      A JSON-ready dict with one row per d and two verdicts: ``bits_claim_holds`` (qdata's bits grow
      by at most ceil(log2 d_max) / ceil(log2 d_min) while fp32's and QSGD's grow linearly: log-log
      slope of bits against d >= 0.9) and ``rounds_claim_holds`` (at every d, rounds measured at the prescribed step <= the
      predicted rounds). With ``measure_rounds=False`` only bits and predictions are computed.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2 or sorted(set(dims)) != dims or dims[0] <= k:
        raise ValueError(f"dims must be >= 2 increasing dimensions, all > k = {k}, got {dims}")
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"accuracy must be in (0, 1), a fraction of ||w0 - w*||^2, got {accuracy}")
    if targets not in O.TARGETS:
        raise ValueError(f"targets must be one of {O.TARGETS}, got {targets!r}")
    grid = np.unique(np.round(2 ** np.arange(4, np.log2(max_prediction) + 0.01, 0.25)).astype(np.int64))
    rows = []
    for d in dims:
        obj = O.ridge(n, int(d), num_samples=num_samples, features="random", lam=lam, teacher="data",
                      targets=targets, seed=seed, name=f"ridge_rf_d{d}")
        entry = {"d": int(d), "index_width": int(math.ceil(math.log2(d))), "L": obj.L, "mu": obj.mu,
                 "L_x": obj.L_x, "D0": obj.D0}
        settings = _comm_settings(bits, k, qsgd_levels)
        target = accuracy * obj.D0
        keys = jax.random.split(jax.random.key(seed, impl=PRNG_IMPL), seeds)
        for label, setting in settings.items():
            entry[label] = _predicted_rounds(obj, setting, batch, grid, target, seed)
        if measure_rounds:
            _, _, plain_label, corr_label = settings
            measured = _measure_rounds(obj, entry, settings, ("fp32 SGD", plain_label, corr_label), batch=batch,
                                       keys=keys, target=target, checkpoints=checkpoints, max_rounds=max_rounds)
            for label, rounds in measured.items():
                entry[label].update(rounds)
        rows.append(entry)
    return {"dims": [int(d) for d in dims], "n": n, "N": num_samples, "targets": targets, "bits": bits, "k": k,
            "qsgd_levels": qsgd_levels, "batch": batch, "lam": lam, "accuracy": accuracy, "seeds": seeds,
            "max_rounds": max_rounds, "rows": rows} | _communication_verdicts(rows, settings)


def format_communication(comm: dict) -> str:
    """The communication claim as two small tables (bits per round; rounds to the target accuracy)."""
    labels = [k for k in comm["rows"][0] if isinstance(comm["rows"][0][k], dict)]
    head = f"{'d':>7} {'ceil(log2 d)':>12} " + " ".join(f"{lab:>28}" for lab in labels)
    lines = [f"Communication (synthetic ridge on random features, n={comm['n']}, N={comm['N']}, b={comm['batch']}, "
             f"{comm.get('targets', 'binary')} targets): uplink bits per node per round, exact from uplink_bits",
             head, "-" * len(head)]
    for r in comm["rows"]:
        lines.append(f"{r['d']:>7} {r['index_width']:>12} " + " ".join(f"{r[lab]['bits_per_round']:>28d}" for lab in labels))
    lines.append("growth d_min -> d_max: " + ", ".join(
        f"{lab} x{comm['bits_growth'][lab]:.3g} (slope {comm['bits_slope'][lab]:.2f})" for lab in labels)
        + f"; log factor x{comm['log_factor']:.3g}, linear x{comm['linear_factor']:.3g}")
    measured = [lab for lab in labels if comm["rows"][0][lab]["rounds_at_fp32_step"] is not None
                or comm["rows"][0][lab]["rounds_measured"] is not None]
    if measured:
        lines.append(f"rounds to E||w_t - w*||^2 <= {comm['accuracy']} ||w0 - w*||^2, {comm['seeds']} seeds: "
                     "predicted by the bound / measured at that step / measured at fp32's step ('-' not run)")
        fmt = lambda v: "-" if v is None else ("inf" if v == math.inf else f"{v:.0f}")
        head = f"{'d':>7} " + " ".join(f"{lab:>28}" for lab in measured)
        lines += [head, "-" * len(head)]
        for r in comm["rows"]:
            cells = [f"{fmt(r[lab]['rounds_predicted'])} / {fmt(r[lab]['rounds_measured'])} / "
                     f"{fmt(r[lab]['rounds_at_fp32_step'])}" for lab in measured]
            lines.append(f"{r['d']:>7} " + " ".join(f"{c:>28}" for c in cells))
    lines.append(f"bits claim holds: {comm['bits_claim_holds']}; rounds claim (measured <= predicted at every d) "
                 f"holds: {comm['rounds_claim_holds']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point.


def run_all(objectives, settings, *, T_grid, seeds, batch, checkpoints, slope_tol, log=print) -> list[dict]:
    results = []
    for obj in objectives:
        for s in settings:
            r = check_setting(obj, s, T_grid=T_grid, seeds=seeds, batch=batch, checkpoints=checkpoints,
                              slope_tol=slope_tol)
            log(f"  {obj.name:<14} {s.name:<24} holds={r['bound_holds']!s:<5} worst={r['worst_ratio']:.3g} "
                f"slope={r['slope_empirical']:.2f}/{r['slope_bound']:.2f} pass={r['passed']} "
                f"({r['seconds']:.1f}s, first call {r['seconds_first_call']:.1f}s)")
            results.append(r)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m convergence", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/convergence", help="output directory (JSON report and figures)")
    p.add_argument("--tmin", type=int, default=6, help="smallest horizon 2^tmin")
    p.add_argument("--tmax", type=int, default=13, help="largest horizon 2^tmax")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--objectives", nargs="+", default=None, help="subset of objective names")
    p.add_argument("--settings", nargs="+", default=None, help="subset of setting names (e.g. 'fp32 SGD')")
    p.add_argument("--slope-tol", type=float, default=0.25)
    p.add_argument("--targets", choices=O.TARGETS, default="real",
                   help="targets of least squares, ridge and the communication claim: real values (fp32 on the "
                        "link) or binary labels (1 bit)")
    p.add_argument("--no-comm", action="store_true", help="skip the communication claim")
    p.add_argument("--no-controls", action="store_true", help="skip the negative controls")
    p.add_argument("--comm-dims", type=int, nargs="+", default=[100, 1000, 10000])
    args = p.parse_args(argv)

    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    T_grid = [2**k for k in range(args.tmin, args.tmax + 1)]
    objectives = default_objectives(targets=args.targets)
    if args.objectives:
        objectives = [o for o in objectives if o.name in args.objectives]
        if not objectives:
            raise SystemExit(f"no objective among {args.objectives}")
    settings = default_settings(args.bits)
    if args.settings:
        settings = [s for s in settings if s.name in args.settings]
        if not settings:
            raise SystemExit(f"no setting among {args.settings}")
    print(f"convergence check: {len(objectives)} objectives x {len(settings)} settings, "
          f"T = 2^{args.tmin}..2^{args.tmax}, {args.seeds} seeds, b = {args.batch} (synthetic data)")
    results = run_all(objectives, settings, T_grid=T_grid, seeds=args.seeds, batch=args.batch, checkpoints=32,
                      slope_tol=args.slope_tol)
    controls = []
    if not args.no_controls:
        print("negative controls (each must FAIL):")
        control_obj = control_objective()
        controls = run_all([control_obj], negative_controls(control_obj), T_grid=T_grid, seeds=args.seeds,
                           batch=args.batch, checkpoints=32, slope_tol=args.slope_tol)
    comm = None
    if not args.no_comm:
        comm = communication_claim(args.comm_dims, batch=args.batch, targets=args.targets)
    wall = time.time() - start
    report = {
        "config": vars(args) | {"T_grid": T_grid},
        "objectives": {o.name: o.constants() | {"methods": o.info["methods"], "description": o.describe()}
                       for o in objectives},
        "results": results,
        "negative_controls": controls,
        "communication": comm,
        "wall_seconds": wall,
    }
    report_path = os.path.join(args.out, "report.json")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1, default=float)
    # The figures are drawn from the file just written, as they are redrawn later (python -m paper_figures).
    drawn = figures.draw_report(report_path, args.out)
    with open(os.path.join(args.out, "captions.txt"), "w") as f:
        f.writelines(f"{os.path.basename(path)}: {caption}\n" for path, caption in drawn)
    print()
    print(format_table(results))
    if controls:
        print("\nnegative controls (must fail):")
        print(format_table(controls))
    if comm is not None:
        print()
        print(format_communication(comm))
    n_pass = sum(r["passed"] for r in results)
    n_caught = sum(not r["passed"] for r in controls)
    print(f"\n{n_pass}/{len(results)} checks passed; {n_caught}/{len(controls)} negative controls failed as they "
          f"must; report and figures in {args.out}; wall time {wall:.0f} s")
    return 0
