"""Cost of one qdata round over one plain SGD round, measured in the same run.

ResNet-20 on CIFAR-shaped synthetic data (32x32x3, labelled synthetic), batch 128 per node, one node
(the per-node cost is what the ratio is about). A round is the node's message plus the learner's
gradient and optax update. The compute floor of qdata with the correction on is about 3 backward
passes (two at the node, one at the learner) against SGD's one: target ratio <= 3.5; with the
correction off (one backward pass at the learner, the node only quantizes): target <= 1.3.
Peak memory is XLA's own account of each compiled round (arguments + outputs + temporaries).

    python -m experiments.bench_step            # ResNet-20, batch 128
    python -m experiments.bench_step --quick    # a small CNN, batch 16 (a smoke run)
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

from experiments.bench_codecs import median_time
from qdata import models
from qdata.config import RunConfig
from qdata.data import load_dataset
from qdata.methods import build_method


def _round_fn(method, optimizer):
    """One whole round for one node: message, learner gradient, update (one jit)."""

    def round_fn(key, params, opt_state, node_state, learner_state, batch):
        message, node_state = method.node_message(key, params, batch, node_state)
        messages = jax.tree_util.tree_map(lambda a: a[None], message)
        grads, learner_state = method.learner_gradient(params, messages, learner_state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, node_state, learner_state

    return jax.jit(round_fn)


def _peak_bytes(fn, args) -> int | None:
    stats = fn.lower(*args).compile().memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CNN, batch 16: a smoke run")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    model_name = args.model or ("cnn" if args.quick else "resnet20")
    batch_size = args.batch_size or (16 if args.quick else 128)
    repeats = 2 if args.quick else args.repeats

    dataset = load_dataset("synthetic:32x32x3:10", max_train=batch_size, max_test=batch_size)
    model = models.make_model(model_name, dataset.num_classes)
    params = models.init_params(model, jax.random.PRNGKey(0), dataset.sample_shape)
    d = models.param_count(params)
    batch = {"x": jnp.asarray(dataset.to_float(dataset.x_train[:batch_size])),
             "y": jnp.asarray(dataset.y_train[:batch_size]),
             "id": jnp.arange(batch_size, dtype=jnp.int32), "pos": jnp.arange(batch_size, dtype=jnp.int32)}
    optimizer = optax.sgd(0.01, momentum=0.9)
    base = RunConfig(dataset="synthetic", model=model_name, batch_size=batch_size, num_nodes=1)
    settings = {
        "sgd": base.replace(method="sgd"),
        "qdata-4b (correction off)": base.replace(method="qdata", bits=4),
        "qdata-4b+corr (randk 1%)": base.replace(method="qdata", bits=4, correction="randk:0.01"),
    }
    rows = {}
    for label, config in settings.items():
        method = build_method(config, model, dataset, d)
        fn = _round_fn(method, optimizer)
        fn_args = (jax.random.PRNGKey(1), params, optimizer.init(params), method.init_node(params),
                   method.init_learner(params, 1), batch)
        rows[label] = {"seconds": median_time(fn, fn_args, repeats), "peak_bytes": _peak_bytes(fn, fn_args)}
    sgd = rows["sgd"]["seconds"]
    print(f"one round, one node: {model_name} (d={d:,}) on synthetic 32x32x3 data (labelled synthetic), "
          f"batch {batch_size}, {jax.devices()[0].platform} ({jax.device_count()} device), median of {repeats}")
    print(f"{'method':<28}{'seconds':>10}{'ratio to sgd':>14}{'target':>8}{'peak MiB':>10}")
    targets = {"qdata-4b (correction off)": 1.3, "qdata-4b+corr (randk 1%)": 3.5}
    for label, row in rows.items():
        row["ratio_to_sgd"] = row["seconds"] / sgd
        target = targets.get(label)
        row["target"] = target
        row["meets_target"] = None if target is None else row["ratio_to_sgd"] <= target
        peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f}"
        mark = "" if target is None else ("ok" if row["meets_target"] else "MISSED")
        print(f"{label:<28}{row['seconds']:>10.4f}{row['ratio_to_sgd']:>14.2f}"
              f"{'-' if target is None else f'<= {target}':>8}{peak:>10} {mark}")
    result = {"model": model_name, "d": d, "batch_size": batch_size, "platform": jax.devices()[0].platform,
              "data": "synthetic 32x32x3", "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
