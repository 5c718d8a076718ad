"""qdata as a training method: nodes send quantized samples (and optional corrections), not gradients.

The node side is a one-node :class:`~qdata.estimator.Estimator`, which :func:`qdata_estimator` composes
of a gate, a sample codec (the data quantizer, or a transform code whose per-node setup each node
fits on its shard, :mod:`qdata.codecs.transform_codec`, beside the exact labels, optionally wrapped
in the learner cache) and the correction; :func:`qdata_method` is the learner, which reads the N messages
and computes, in one path whatever the codec,
g = (1/N) sum_i [(1/b) sum_j a_j grad f(w; Q(x_j), y_j) + C(delta_i)] (DESIGN.md section 2, step 4).
The learner's state is, per node, its sample codec's state: with the cache, the samples it holds.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from qdata import checks
from qdata import gate as gates
from qdata.codecs.cache import learner_cache
from qdata.codecs.coefficient_ans import coefficient_ans
from qdata.codecs.context_ans import DATA_CODERS, context_ans
from qdata.codecs.data_codec import DataCodec, from_quantizer, joint
from qdata.codecs.labels import class_labels, real_targets
from qdata.codecs.payloads import Compressor, Quantizer
from qdata.codecs.refine import refined_cache
from qdata.correction import correction as make_correction, no_correction
from qdata.estimator import Estimator, estimator
from qdata.methods.base import Method

Array = jax.Array


# On CPU, N backward passes over b samples each run faster than one over N*b (batches that fit the
# caches: 0.41 s against 0.63 s for ResNet-20 at 4 x 32 on this machine); elsewhere one pass.
CPU_CHUNKS_MAX = 16


def _mean_gradient(learner_loss, params, samples):
    """(1/N) sum_i (1/b) sum_j a_ij grad f(w; Q(x_ij), y_ij) over the N nodes' received samples
    (leading axes N, b): the gradient of one weighted mean over all N*b samples, taken in one
    backward pass, or on CPU in one pass per node, summed (d-sized memory either way)."""
    num_nodes = samples[0].shape[0]
    if jax.default_backend() != "cpu" or num_nodes > CPU_CHUNKS_MAX:
        x_hat, y, a = (s.reshape((-1,) + s.shape[2:]) for s in samples)
        return jax.grad(learner_loss)(params, x_hat, y, a)
    grads = [jax.grad(learner_loss)(params, *(s[i] for s in samples)) for i in range(num_nodes)]
    return jax.tree_util.tree_map(lambda *g: sum(g) / num_nodes, *grads)


def qdata_method(estimator: Estimator, *, needs_params: bool = True, name: str = "qdata") -> Method:
    """Wrap a one-node :class:`~qdata.estimator.Estimator` as a :class:`Method` over N nodes.

    Args:
      estimator: the node message, what the learner reads off it and the bit ledger.
      needs_params: whether nodes need the model each round (they do to score samples for a gate or
        to compute a correction; a plain quantize-and-send node does not, and pays no downlink).
      name: the method's name in results.
    """

    def init_learner(params, num_nodes):
        del params
        state = estimator.init_learner()
        return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_nodes,) + a.shape), state)

    def learner_gradient(params, messages, learner_state):
        samples, learner_state = jax.vmap(estimator.received)(messages, learner_state)
        g = _mean_gradient(estimator.learner_loss, params, samples)
        corrections = jax.vmap(estimator.decoded_correction)(messages)
        if corrections is not None:
            g = jax.tree_util.tree_map(lambda u, v: u + jnp.mean(v, axis=0).astype(u.dtype), g, corrections)
        return g, learner_state

    return Method(name, estimator.init, init_learner, estimator.node_message, learner_gradient,
                  estimator.uplink_bits, needs_params=needs_params, fit_node=estimator.fit)


def _code_width(quantizer: Quantizer, sample_shape) -> int:
    """B of a quantizer's fixed-length codes, read off the static record of its payload."""
    if sample_shape is None:
        raise ValueError("coder='ans' needs sample_shape (the context of a code is its neighbours)")
    example = jax.ShapeDtypeStruct((1,) + tuple(int(s) for s in sample_shape), jnp.float32)
    payload = jax.eval_shape(quantizer.encode, jax.random.PRNGKey(0), example)
    width = getattr(payload.meta, "bits", None)
    if not isinstance(width, int) or "codes" not in payload.rows:
        raise ValueError("coder='ans' codes the fixed-length codes of a qdata.codecs quantizer "
                         f"(payload rows['codes'], meta.bits); this quantizer's payload has {sorted(payload.rows)}")
    return width


def sample_codec(quantizer: Quantizer | DataCodec, *, num_classes: int | None, target_dtype=None,
                 cache_size: int | None = None, sample_shape: tuple[int, ...] | None = None,
                 coder: str = "fixed", refine: tuple[int, int] | None = None) -> DataCodec:
    """The sample codec of :func:`qdata_estimator`: Q beside exact labels, Q's codes sent at fixed
    length or as an adaptive ANS stream, optionally cached, and the cached samples optionally
    refined (``refine = (bits, most)``, :func:`qdata.codecs.refine.refined_cache`). ``quantizer`` may
    also be a data codec of the samples itself (a transform code,
    :func:`qdata.codecs.transform_codec.transform_codec`), whose codes ``coder='ans'`` codes with a
    model per coefficient (:func:`qdata.codecs.coefficient_ans.coefficient_ans`) where a pixel
    quantizer's are coded by their spatial contexts (:func:`qdata.codecs.context_ans.context_ans`).
    Either coder sits inside the cache, so only fresh samples' codes are coded."""
    if coder not in DATA_CODERS:
        raise ValueError(f"coder must be one of {DATA_CODERS}, got {coder!r}")
    if refine is not None and cache_size is None:
        raise ValueError("refine needs cache_size: it refines the samples the learner holds")
    if refine is not None and getattr(quantizer, "delta", None) is None:
        raise ValueError("refine needs a quantizer with a dataset-wide step (delta: stochastic or nearest "
                         "rounding), the bound of the first code's error")
    labels = real_targets(target_dtype) if num_classes is None else class_labels(num_classes)
    if isinstance(quantizer, DataCodec):
        samples = quantizer
        if coder == "ans":  # a transform code: each coefficient its own adaptive model
            if sample_shape is None:
                raise ValueError("coder='ans' needs sample_shape (the shape of the codes it models)")
            samples = coefficient_ans(samples, sample_shape)
    else:
        samples = from_quantizer(quantizer)
        if coder == "ans":
            samples = context_ans(samples, _code_width(quantizer, sample_shape), sample_shape)
    codec = joint(x=samples, y=labels)
    if cache_size is None:
        return codec
    cache_size = checks.check_int(cache_size, "cache_size", lo=1)
    if sample_shape is None:
        raise ValueError("sample_shape is required with cache_size (the cache holds quantized samples)")
    example = {"x": jax.ShapeDtypeStruct((1,) + tuple(int(s) for s in sample_shape), jnp.float32),
               "y": jax.ShapeDtypeStruct((1,), jnp.int32 if num_classes is not None else jnp.float32)}
    cached = learner_cache(codec, cache_size, example)
    return cached if refine is None else refined_cache(cached, sample_shape, quantizer.delta, *refine)


def qdata_estimator(
    loss_fn: Callable[..., Array],
    quantizer: Quantizer,
    *,
    num_classes: int | None,
    target_dtype=None,
    gate: gates.Gate = gates.no_gate(),
    correction: Compressor | None = None,
    score_fn: Callable[..., Array] | None = None,
    cache_size: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    coder: str = "fixed",
    refine: tuple[int, int] | None = None,
) -> Estimator:
    """The qdata estimator of DESIGN.md section 2 from a quantizer, a gate and a compressor.

    Args:
      loss_fn: ``(params, x, y) -> (b,)`` per-sample losses f(w; x_j, y_j).
      quantizer: the data quantizer Q (:mod:`qdata.codecs.quantizers`, or any
        :class:`~qdata.codecs.payloads.Quantizer`), or a :class:`DataCodec` of the samples (a
        transform code, :func:`qdata.codecs.transform_codec.transform_codec`, whose per-node setup
        the estimator's ``fit`` computes from the node's shard).
      num_classes: C; labels are integers in 0..C-1 and travel at ceil(log2 C) bits. None for
        real-valued targets (regression): ``batch['y']`` is then a float (b,) array (integer arrays
        are taken as real values, cast), sent as ``target_dtype`` values, 8 * itemsize bits each.
      target_dtype: with ``num_classes=None``, the type the targets travel and are cached in:
        ``jnp.float32`` (default; exact for float32 targets) or ``jnp.float16`` (half the bits; the
        learner then sees y rounded to fp16, which the correction, when on, compensates: the node
        corrects against the rounded y). Must be left None with integer labels.
      gate: the importance gate (default :func:`qdata.gate.no_gate`, every sample sent).
      correction: the vector compressor C of the gradient-difference correction; None to send none.
      score_fn: ``(params, x, y) -> (b,)`` scores for the gate; default the per-sample loss.
      cache_size: turn on the learner-side cache (:mod:`qdata.codecs.cache`) for nodes holding up to
        this many samples; ``batch['pos']`` (b,) must then give each sample's position in the shard.
      sample_shape: the shape of one sample; required with ``cache_size`` or ``coder='ans'``.
      coder: how Q's codes cross the link: ``'fixed'`` (B bits each, or a transform code's widths)
        or ``'ans'`` (adaptive ANS, lossless, so the training is that of ``'fixed'`` and only the
        bits change: :func:`qdata.codecs.context_ans.context_ans` for pixel codes,
        :func:`qdata.codecs.coefficient_ans.coefficient_ans` for a transform code's).
      refine: ``(bits, most)`` to refine cached samples sent again (:mod:`qdata.codecs.refine`);
        needs ``cache_size`` and a quantizer with a dataset-wide step.

    Returns:
      An :class:`Estimator`. With the correction on and ``quantizer``, ``correction`` and ``gate`` all
      unbiased, the expected learner gradient equals ``full_gradient(loss_fn)(params, x, y)``.
    """
    if num_classes is None:
        target_dtype = checks.check_target_dtype(jnp.float32 if target_dtype is None else target_dtype)
    else:
        num_classes = checks.check_int(num_classes, "num_classes", lo=1)
        if target_dtype is not None:
            raise ValueError("target_dtype is for real-valued targets (num_classes=None); integer labels "
                             f"travel at ceil(log2 C) bits, got target_dtype={target_dtype!r} with num_classes={num_classes}")
    codec = sample_codec(quantizer, num_classes=num_classes, target_dtype=target_dtype, cache_size=cache_size,
                         sample_shape=sample_shape, coder=coder, refine=refine)
    corr = no_correction() if correction is None else make_correction(loss_fn, correction)
    check = functools.partial(checks.check_batch, num_classes=num_classes, target_dtype=target_dtype)
    as_sent = (lambda y: y) if num_classes is not None else (lambda y: y.astype(target_dtype))
    return estimator(loss_fn, codec, gate=gate, correction=corr, score_fn=score_fn, check_batch=check,
                     labels_as_sent=as_sent)
