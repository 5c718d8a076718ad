"""Before/after check of a refactor: uplink bit totals and final parameters of small digits runs.

Runs a few qdata configurations on digits through the real engine (``qdata.engine.make_round``, the
round the results come from) and saves, per configuration, the exact cumulative uplink bits by part
and the final parameters. Run it on two checkouts and compare:

    git worktree add --detach /tmp/base main && cp experiments/estimator_equality.py /tmp/base/experiments/
    (cd /tmp/base && python -m experiments.estimator_equality --save /tmp/eq_base.npz)
    python -m experiments.estimator_equality --save /tmp/eq_new.npz --compare /tmp/eq_base.npz

With ``--devices 2`` the nodes are spread over 2 forced host devices (XLA_FLAGS is set before JAX
starts). ``--compare`` prints each configuration's bits and whether every parameter is bitwise
equal, and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _configs(rounds: int):
    from qdata.config import RunConfig

    common = dict(dataset="digits", model="mlp", num_nodes=4, batch_size=16, rounds=rounds, lr=0.1,
                  eval_every=rounds, checkpoint_every=0, seed=0)
    return {
        "qdata-4b": RunConfig(method="qdata", bits=4, **common),
        "qdata-4b+cache": RunConfig(method="qdata", bits=4, cache=True, **common),
        "qdata-4b+ef-topk16": RunConfig(method="qdata", bits=4, correction="ef:topk:16", **common),
        "qdata-4b+bern0.5": RunConfig(method="qdata", bits=4, gate="bernoulli", rho=0.5, **common),
        "qdata-4b+bern0.5+cache+ef-topk16": RunConfig(method="qdata", bits=4, gate="bernoulli", rho=0.5,
                                                      cache=True, correction="ef:topk:16", **common),
    }


def run_one(config, devices: int) -> tuple[dict, dict]:
    """(cumulative uplink bits by part, final parameters as flat name -> array) of ``config``."""
    import jax
    import numpy as np

    from qdata import engine
    from qdata.codecs import ledger
    from qdata.run import Experiment

    exp = Experiment(config)
    mesh = engine.node_mesh(devices)
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    state = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params,
                                                        config.num_nodes, config.seed))
    one_round = engine.make_round(exp.method, exp.optimizer, mesh, batch_size=config.batch_size,
                                  state_template=state, to_float=exp.dataset.to_float)
    state, bits, _ = engine.run_rounds(one_round, state, shards, config.rounds)
    totals = ledger.add_totals({}, bits)
    params = engine.fetch(state.params)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    return totals, flat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", required=True, help="write this checkout's results here (.npz)")
    parser.add_argument("--compare", help="a saved .npz of another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args(argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import numpy as np

    import qdata

    print(f"qdata from {qdata.__file__}, {args.devices} device(s), {args.rounds} rounds")
    saved = {}
    for name, config in _configs(args.rounds).items():
        totals, params = run_one(config, args.devices)
        saved[f"{name}/bits"] = np.asarray(json.dumps(totals))
        for key, value in params.items():
            saved[f"{name}/param{key}"] = value
        print(f"{name}: uplink bits {totals}")
    np.savez(args.save, **saved)
    if not args.compare:
        return 0
    other = dict(np.load(args.compare))
    ok = set(other) == set(saved)
    if not ok:
        print("DIFFERENT keys:", sorted(set(other) ^ set(saved)))
    for name in _configs(args.rounds):
        bits_same = str(other.get(f"{name}/bits")) == str(saved[f"{name}/bits"])
        keys = [k for k in saved if k.startswith(f"{name}/param")]
        params_same = all(k in other and other[k].dtype == saved[k].dtype and other[k].shape == saved[k].shape
                          and other[k].tobytes() == saved[k].tobytes() for k in keys)
        ok &= bits_same and params_same
        print(f"{name}: bits {'EQUAL' if bits_same else 'DIFFERENT'}, "
              f"parameters {'bitwise EQUAL' if params_same else 'DIFFERENT'} ({len(keys)} arrays)")
        if not bits_same:
            print(f"  before {other.get(f'{name}/bits')}\n  after  {saved[f'{name}/bits']}")
    print("ALL EQUAL" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
