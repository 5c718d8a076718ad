"""The ``qdata`` command line.

    qdata compare                 # the main job: qdata vs SGD and gradient compression on digits
    qdata train --method qdata --bits 4 --correction randk_seed:64 --rounds 300
    qdata train --config run.toml --out runs/mine --resume

Every flag of ``train`` and ``compare`` is a field of :class:`qdata.config.RunConfig`; a TOML
config file sets the same fields and flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from qdata.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {field.default})")
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            base = args[0] if args else kind  # "int | None" takes an int
            parser.add_argument(flag, dest=field.name, type=base, default=None, help=f"(default {field.default})")


def _config_from(args: argparse.Namespace, base=None):
    from qdata.config import RunConfig

    config = RunConfig.from_toml(args.config) if getattr(args, "config", None) else (base or RunConfig())
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
               if getattr(args, f.name, None) is not None}
    return config.replace(**changes)


def _maybe_distributed(args: argparse.Namespace) -> None:
    if args.num_processes and args.num_processes > 1:
        from qdata.engine import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.local_devices)
    elif args.local_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", args.local_devices)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qdata", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train_p = sub.add_parser("train", help="one run; writes OUT/results.jsonl and orbax checkpoints")
    train_p.add_argument("--config", help="a TOML file of RunConfig fields")
    train_p.add_argument("--out", help="the run's directory (default runs/NAME)")
    train_p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    compare_p = sub.add_parser("compare", help="the main job: qdata vs SGD and gradient compression")
    compare_p.add_argument("--config", help="a TOML file of RunConfig fields shared by every method")
    compare_p.add_argument("--out", help="output directory (default runs/compare-TIMESTAMP)")
    compare_p.add_argument("--resume", action="store_true",
                           help="keep the finished runs in --out and continue an interrupted one")
    for p in (train_p, compare_p):
        _add_config_flags(p)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        group = p.add_argument_group("several processes (jax.distributed; gloo collectives on CPU)")
        group.add_argument("--coordinator", default="127.0.0.1:12355", help="host:port of process 0")
        group.add_argument("--num-processes", type=int, default=0)
        group.add_argument("--process-id", type=int, default=0)
        group.add_argument("--local-devices", type=int, default=0,
                           help="CPU devices in this process (a simulated multi-device machine)")
    args = parser.parse_args(argv)

    try:
        _maybe_distributed(args)
        if args.command == "train":
            from qdata.run import train

            config = _config_from(args)
            out = args.out or os.path.join("runs", config.name)
            record = train(config, out, resume=args.resume, progress=not args.no_progress)
            print(f"{config.name}: round {record['round']}, test accuracy {record['test_accuracy']:.4f}, "
                  f"uplink bits per node {record['cumulative_uplink_bits_per_node']:,.0f}; results in {out}/results.jsonl")
        else:
            from qdata.compare import DEFAULT_BASE, compare

            base = _config_from(args, DEFAULT_BASE)
            if args.resume and not args.out:
                raise ValueError("--resume needs --out, the directory of the comparison to continue")
            summary = compare(base, args.out, progress=not args.no_progress, resume=args.resume)
            print(summary["table"])
            print(f"\nwritten: {summary['out_dir']}/table.txt, summary.json, accuracy_vs_bits.png")
    except (ValueError, FileExistsError) as err:
        print(f"qdata: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
