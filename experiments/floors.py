"""The one-shot floors of a setting: what each node pays to ship its shard once (qdata/floors.py).

Run ``python -m experiments.floors --dataset digits --nodes 8`` (``--bits none,2,4,8``,
``--rounding nearest,stochastic``, ``--layout stack,each``, ``--coders png,webp,zstd``,
``--out FILE`` to append the rows as JSON lines). For every (layout, B, rounding) it codes every
node's shard with every coder, checks that each payload decodes (bit-identical shard, or the
quantizer's levels), and prints the bits per node: 8 times the real coded bytes, labels included
(``ceil(log2 C)`` bits each, packed). The partition is ``--partition`` (iid) with ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from qdata import data, floors


def _bits_list(text: str) -> list[int | None]:
    return [None if b.strip().lower() in ("none", "lossless") else int(b) for b in text.split(",")]


def measure(dataset, nodes, coder: str, bits, rounding: str, layout: str, seed: int) -> dict:
    """One floor: its payloads coded, decoded and checked, and its bits per node."""
    start = time.perf_counter()
    payloads = floors.floor_payloads(dataset, nodes.index, nodes.counts, coder, bits, rounding=rounding,
                                     layout=layout, seed=seed)
    seconds = time.perf_counter() - start
    for i, (p, (x, y)) in enumerate(zip(payloads, floors.node_shards(dataset, nodes.index, nodes.counts))):
        got_x, got_y = floors.decode_floor(p)
        want_x = x if bits is None else floors.quantize_levels(
            dataset, dataset.x_train[nodes.index[i]], bits, rounding,
            jax.random.fold_in(jax.random.PRNGKey(seed), i))[: x.shape[0]]
        if not (np.array_equal(got_x, want_x) and np.array_equal(got_y, y)):
            raise AssertionError(f"node {i}: the {coder} floor does not decode to what was sent")
    counted = [floors.floor_bits(p) for p in payloads]
    per_node = np.array([c["total"] for c in counted])
    samples = nodes.counts.astype(np.float64)
    return {"dataset": dataset.name, "nodes": len(payloads), "coder": coder, "layout": layout, "bits": bits,
            "rounding": rounding if bits is not None else None, "bits_per_node": per_node.tolist(),
            "label_bits_per_node": [c["labels"] for c in counted], "mean_bits_per_node": float(per_node.mean()),
            "bits_per_value": float((per_node / (samples * dataset.n)).mean()),
            "encode_seconds": round(seconds, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=_bits_list, default=_bits_list("none,2,4,8"))
    parser.add_argument("--rounding", default="nearest")
    parser.add_argument("--layout", default="stack")
    parser.add_argument("--coders", default=",".join(floors.CODERS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dataset = data.load_dataset(args.dataset, seed=args.seed)
    nodes = data.stack_nodes(data.partition(args.partition, dataset, args.nodes, args.seed))
    print(f"{dataset.name}: {dataset.num_train} training samples of n = {dataset.n} over {args.nodes} "
          f"{args.partition} nodes (seed {args.seed}), {nodes.counts.min()}..{nodes.counts.max()} per node")
    print(f"{'layout':<7}{'B':>5}{'rounding':>11}{'coder':>6}{'mean bits/node':>16}{'bits/value':>11}  bits per node")
    for layout in args.layout.split(","):
        for bits in args.bits:
            for rounding in (args.rounding.split(",") if bits is not None else ["nearest"]):
                for coder in args.coders.split(","):
                    if floors.cannot_code(dataset, coder, bits):
                        continue
                    row = measure(dataset, nodes, coder, bits, rounding, layout, args.seed)
                    print(f"{layout:<7}{'-' if bits is None else bits:>5}{row['rounding'] or 'lossless':>11}"
                          f"{coder:>6}{row['mean_bits_per_node']:>16,.0f}{row['bits_per_value']:>11.3f}  "
                          f"{row['bits_per_node']}", flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
