"""Training methods behind one interface (:class:`Method`): qdata, SGD, gradient compression and
PowerSGD as published (two reductions a round), Gaia's significance filter, split learning. The
one-shot methods, data collaboration analysis (:mod:`qdata.methods.dca`) and data-dependent dispatch
with local models (:mod:`qdata.methods.dispatch`), run outside the round loop (:func:`qdata.run.train`)."""

from __future__ import annotations

from qdata.methods.base import Exchange, Method
from qdata.methods.gradient import gradient_compression, sgd
from qdata.methods.powersgd import powersgd_allreduce
from qdata.methods.qdata import qdata_method
from qdata.methods.significance import significance_filter
from qdata.methods.split import sequential_split_learning, split_learning


def build_method(config, model, dataset, d: int, *, node_size: int | None = None) -> Method:
    """The method a :class:`~qdata.config.RunConfig` names, for ``model`` on ``dataset`` (d parameters).

    ``node_size`` (the most samples a node holds) sizes the learner's cache when ``config.cache``.
    """
    from qdata import gate as gates
    from qdata import models
    from qdata.codecs import quantizers
    from qdata.codecs.transform_codec import transform_codec
    from qdata.config import make_compressor
    from qdata.methods.qdata import qdata_estimator

    loss_fn = models.per_sample_loss(model)
    if config.method == "dca":
        raise ValueError("method='dca' is one-shot (each node ships its mapped data once, the learner trains "
                         "centrally), not a per-round method: run it with qdata.run.train")
    if config.method == "dispatch":
        raise ValueError("method='dispatch' is one-shot (each sample sent once to the node of its cluster, a local "
                         "model per node), not a per-round method: run it with qdata.run.train")
    if config.method == "sgd":
        return sgd(loss_fn)
    if config.method == "split":
        from qdata.run import make_optimizer  # each node runs the run's optimizer on its lower layers

        if config.split_mode == "sequential":
            return sequential_split_learning(model, config.split_cut, make_optimizer(config),
                                             num_classes=dataset.num_classes, sample_shape=dataset.sample_shape,
                                             batch_size=config.batch_size, num_nodes=config.num_nodes,
                                             bits=config.split_bits or None, turn=config.split_turn)
        return split_learning(model, config.split_cut, make_optimizer(config), num_classes=dataset.num_classes,
                              sample_shape=dataset.sample_shape, batch_size=config.batch_size,
                              bits=config.split_bits or None, top=config.split_top)
    if config.method == "gradient":
        wrapped = config.compressor.startswith("ef:")
        name, _, rank = config.compressor.removeprefix("ef:").partition(":")
        if name == "powersgd_allreduce":
            # The shared initial Q is drawn from the run's seed, so seeds vary it as they vary the data.
            return powersgd_allreduce(loss_fn, int(rank) if rank else 2,
                                      error_feedback=config.error_feedback or wrapped, seed=config.seed)
        if name == "significance":
            return significance_filter(loss_fn, float(rank), config.lr)
        return gradient_compression(loss_fn, make_compressor(config.compressor, d),
                                    error_feedback=config.error_feedback, name="gradient")
    lo, hi = dataset.value_range
    if config.transform != "none":  # codes in a transform basis, a setup fitted per node (its fit)
        quantizer = transform_codec(dataset.sample_shape, config.sample_bits, basis=config.transform,
                                    rounding=config.quantizer)
    else:
        quantizer = {
            "stochastic": lambda: quantizers.stochastic_rounding(config.bits, lo, hi),
            "nearest": lambda: quantizers.nearest_rounding(config.bits, lo, hi),
            "dither": lambda: quantizers.subtractive_dither(config.bits, lo, hi),
            "per_sample": lambda: quantizers.per_sample_range(config.bits),
        }[config.quantizer]()
    gate = {"off": gates.no_gate, "bernoulli": lambda: gates.bernoulli_gate(config.rho, config.gate_floor),
            "top": lambda: gates.top_fraction_gate(config.rho)}[config.gate]()
    score_fn = None
    if config.score == "grad_norm":
        score_fn = gates.gradient_norm_score(models.logits_and_features(model), models.cross_entropy)
    correction = None if config.correction == "off" else make_compressor(config.correction, d)
    if config.cache and node_size is None:
        raise ValueError("config.cache needs node_size, the most samples a node holds")
    estimator = qdata_estimator(loss_fn, quantizer, num_classes=dataset.num_classes, gate=gate,
                                correction=correction, score_fn=score_fn,
                                cache_size=node_size if config.cache else None,
                                sample_shape=dataset.sample_shape, coder=config.coder,
                                refine=(config.refine_bits, config.refine_max) if config.refine_bits else None)
    # The model goes down to the nodes only if they use it: to score samples or to correct.
    needs_params = correction is not None or (config.gate != "off" and config.rho < 1.0)
    return qdata_method(estimator, needs_params=needs_params)


__all__ = ["Exchange", "Method", "build_method", "gradient_compression", "powersgd_allreduce", "qdata_method", "sgd",
           "significance_filter", "split_learning", "sequential_split_learning"]
