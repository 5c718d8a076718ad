"""The ``qdata`` command line.

    qdata compare                 # the main job: qdata vs SGD and gradient compression on digits
    qdata train --method qdata --bits 4 --cache --correction ef:topk:32 --rounds 300
    qdata train --config run.toml --out runs/mine --resume

Every flag of ``train`` and ``compare`` is a field of :class:`qdata.config.RunConfig`; a TOML
config file sets the same fields and flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import threading
import typing
import warnings
from pathlib import Path

from qdata import peers, supervise

DEFAULT_COORDINATOR = "127.0.0.1:12355"
# jax.distributed aborts the process after its own fixed initialization timeout of 300 s.
MAX_INIT_TIMEOUT = 290.0


HELP = {
    "dataset": "digits | a tensorflow-datasets name (cifar10, mnist, imagenet2012 with --image-size, ...) | "
               "idx:PATH | synthetic:32x32x3:10",
    "model": "logreg | mlp | mlp:128x64 | cnn | resnet20 | resnet18 (CIFAR stem: 3x3 conv) | resnet18_imagenet "
             "(ImageNet stem: 7x7 stride-2 conv and 3x3 stride-2 max-pool, for imagenet2012)",
    "method": "qdata (send quantized data) | sgd (fp32 gradients) | gradient (compressed gradients) | "
              "dca (one-shot data collaboration analysis: PCA-mapped data and anchors, trained centrally) | "
              "dispatch (one-shot: samples dispatched to the nodes of their nearest k-means centres, a local "
              "model per node, test points routed by their nearest centre) | "
              "split (split learning: lower layers at the nodes, activations up, their gradients down)",
    "split_cut": "split: the number of layers at the node (the learner holds the rest)",
    "split_bits": "split: bits per activation (per-sample-range stochastic rounding), 0 = fp32",
    "split_top": "split: 0, or U-shaped: the node also holds the last SPLIT_TOP layers and the labels",
    "split_mode": "split: parallel (every node every round, lower layers averaged: SplitFed) | sequential (the "
                  "nodes take turns, round robin; the lower layers and their optimizer state handed on via the "
                  "learner)",
    "split_turn": "split with --split-mode sequential: rounds per turn, >= 1 (the hand-off is paid once a turn)",
    "dca_dim": "dca: each node's PCA dimension m (and the collaboration representation's)",
    "dca_anchors": "dca: shared anchor points r (drawn from the data range with a shared seed; r >= m)",
    "dca_values": "dca: float32 | float16, how the mapped values travel",
    "dispatch_replication": "dispatch: p, the nodes each sample is sent to (its p nearest centres), 1..num_nodes",
    "dispatch_balanced": "dispatch: cluster sizes bounded to floor or ceil of N p / k (--no-dispatch-balanced: "
                         "raw nearest-centre sizes)",
    "dispatch_route": "dispatch: nearest (a test point to its nearest centre's model) | vote (its p nearest "
                      "centres' models average their probabilities; p >= 2)",
    "bits": "qdata: bits per data coordinate, 1..16",
    "quantizer": "qdata: the data quantizer",
    "gate": "qdata: importance gate (off sends every sample)",
    "rho": "qdata: the gate's budget, the expected fraction of samples sent, in (0, 1]",
    "score": "qdata: the gate's importance score",
    "correction": "qdata: off, or the compressor of the gradient-difference correction (e.g. ef:topk:32, randk:64)",
    "cache": "qdata: the learner keeps received samples; a sample crosses the link once",
    "coder": ("qdata: how the data codes cross the link: fixed (B bits each, or a transform code's widths) or ans "
              "(adaptive ANS, lossless: pixel codes by their neighbours, transform codes by coefficient)"),
    "transform": "qdata: none (per-pixel codes of --bits bits) | dct (2-D DCT) | pca (each node's PCA basis, sent "
                 "once): codes in a transform basis, bits allocated by reverse water-filling",
    "sample_bits": "qdata with --transform dct|pca: code bits per sample, a multiple of 8 (e.g. 400)",
    "gate_floor": "qdata with --gate bernoulli: the uniform share mixed into the sampling probabilities "
                  "(p_j >= gate_floor * rho, weights 1/p_j <= 1 / (gate_floor * rho)), in [0, 1)",
    "refine_bits": "qdata with --cache: a held sample sent again gets a residual of this many bits a pixel "
                   "(0 off, 2..16)",
    "refine_max": "qdata with --refine-bits: the most refinements of one sample (1..64)",
    "compressor": "gradient: fp32 | fp16 | randk:K | randk_seed:K | topk:K | qsgd:S[:BUCKET] | terngrad | sign | "
                  "powersgd:R | powersgd_allreduce:R | significance:S (Gaia's filter, S e.g. 0.01) | ef:SPEC "
                  "(K an integer or a fraction of d)",
    "error_feedback": "gradient: wrap the compressor in error feedback",
    "partition": "iid | dirichlet:ALPHA | similarity (with --method dispatch: where the samples sit before they "
                 "are dispatched)",
    "stream_start": "streaming nodes: share of each node's data present at round 0 (1 = all)",
    "stream_rounds": "streaming nodes: the round by which all data has arrived (0 = the last round)",
    "batch_size": "samples per node per round",
    "optimizer": "the learner's optax optimizer: sgd (with --momentum) | adam",
    "target_accuracy": "record the uplink bits to first reach this test accuracy",
    "checkpoint_every": "rounds between orbax checkpoints (a multiple of --eval-every; 0 = none)",
    "num_devices": "devices the nodes are spread over (shard_map); over all processes",
    "max_train": "use at most this many training samples",
    "max_test": "use at most this many test samples",
    "data_dir": "tensorflow-datasets data_dir with prepared datasets",
    "image_size": "tensorflow-datasets only: resize each image's shorter side to SIZE and centre-crop it to "
                  "SIZExSIZE (required by datasets of varying image size, such as imagenet2012)",
    "faults": "faulty nodes and links: 'none' or comma-separated rules drop:NODE:P, leave:NODE:ROUND, "
              "corrupt:NODE:P, truncate:NODE:P (NODE an index or '*'; see qdata/faults.py)",
    "integrity": "seal every message behind a checked 96-bit header (charged as 'integrity'); rejected "
                 "messages are not applied and are counted",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from qdata import config as qconfig
    from qdata.config import RunConfig

    choices = {"method": qconfig.METHODS, "dispatch_route": qconfig.DISPATCH_ROUTES,
               "split_mode": qconfig.SPLIT_MODES, "quantizer": qconfig.QUANTIZERS, "transform": qconfig.TRANSFORMS, "gate": qconfig.GATES,
               "score": qconfig.SCORES, "optimizer": ("sgd", "adam")}
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        text = f"{HELP.get(field.name, '')} (default {field.default})".strip()
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            base = args[0] if args else kind  # "int | None" takes an int
            parser.add_argument(flag, dest=field.name, type=base, default=None, help=text,
                                choices=choices.get(field.name))


def _config_from(args: argparse.Namespace):
    """The flags over the TOML file's fields: each value of the file is checked first (an error there
    names the file), then the combination."""
    from qdata.config import RunConfig, check_field, check_values, read_toml

    values = {}
    if getattr(args, "config", None):
        values = read_toml(args.config)
        try:
            check_values(values)
        except ValueError as err:
            raise ValueError(f"--config {args.config}: {err}") from None
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    for name, value in flags.items():
        try:
            check_field(name, value)
        except ValueError as err:
            raise ValueError(f"--{name.replace('_', '-')} {value}: {err}") from None
    try:
        return RunConfig.from_dict({**values, **flags})
    except ValueError as err:
        where = f"--config {args.config}" + (" with the flags" if flags else "") if values else ""
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


# What one run of a lineup is: set per run in the lineup file, never for all runs from a flag.
PER_METHOD = ("method", "bits", "quantizer", "gate", "rho", "score", "gate_floor", "correction", "cache", "coder",
              "transform", "sample_bits", "refine_bits", "refine_max", "compressor", "error_feedback", "dca_dim",
              "dca_anchors", "dca_values", "dispatch_replication", "dispatch_balanced", "dispatch_route", "split_cut",
              "split_bits", "split_top", "split_mode", "split_turn", "name")


def _compare_changes(args: argparse.Namespace) -> dict:
    from qdata.config import RunConfig

    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
               if getattr(args, f.name, None) is not None}
    per_method = sorted(set(changes) & set(PER_METHOD))
    if per_method:
        flags = ", ".join("--" + f.replace("_", "-") for f in per_method)
        raise ValueError(f"{flags}: qdata compare runs a lineup of methods, each set in the lineup file "
                         "(--config FILE, see experiments/compare_digits.toml); qdata train takes these flags")
    return changes


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line naming the flag (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_out(out: str) -> None:
    """``--out`` must be a writable directory, or one that can be created (it is): before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r} exists and is not a directory")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out {out!r} cannot be created: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r} is not writable (no write permission on {str(probe)!r})")
    try:  # permissions alone do not tell (root, read-only or virtual file systems): make it
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out!r} cannot be created: {err.strerror}") from None


def _check_processes(args: argparse.Namespace) -> None:
    """The multi-process flags, checked before any work: counts, and a coordinator that resolves."""
    for flag, value in (("--num-processes", args.num_processes), ("--local-devices", args.local_devices)):
        if value < 0:
            raise ValueError(f"{flag} must be an integer >= 0, got {value}")
    if not 0 < args.init_timeout <= MAX_INIT_TIMEOUT:
        raise ValueError(f"--init-timeout must be in (0, {MAX_INIT_TIMEOUT}] seconds, got {args.init_timeout}")
    if not 0 < args.peer_timeout <= peers.MAX_PEER_TIMEOUT:
        raise ValueError(f"--peer-timeout must be in (0, {peers.MAX_PEER_TIMEOUT:g}] seconds, got {args.peer_timeout}")
    if args.num_processes <= 1:
        extra = [f for f, v in (("--coordinator", args.coordinator), ("--process-id", args.process_id)) if v is not None]
        if extra:
            raise ValueError(f"{' and '.join(extra)} {'need' if len(extra) > 1 else 'needs'} --num-processes > 1 "
                             "(a multi-process run)")
        return
    if not 0 <= (args.process_id or 0) < args.num_processes:
        raise ValueError(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    coordinator = args.coordinator or DEFAULT_COORDINATOR
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--coordinator must be HOST:PORT with PORT in 1..65535, got {coordinator!r}")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"--coordinator {coordinator!r}: host {host!r} does not resolve ({err})") from None


def _join_processes(args: argparse.Namespace) -> None:
    """jax.distributed over the processes, or a clear error if they do not all join within
    ``--init-timeout`` seconds. JAX itself would abort the process with a C++ fatal log after its
    own fixed 300 s, so a watchdog thread (the join releases the GIL) ends it first, with exit status 2."""
    from qdata.engine import initialize_distributed

    coordinator = args.coordinator or DEFAULT_COORDINATOR

    def give_up():
        print(f"qdata: error: process {args.process_id or 0} of {args.num_processes}: not every process joined "
              f"the run at --coordinator {coordinator} within --init-timeout {args.init_timeout:g} s (a peer that "
              "never started, a wrong address or port, or a busy port)", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(args.init_timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        initialize_distributed(coordinator, args.num_processes, args.process_id or 0, args.local_devices or None,
                               heartbeat_seconds=peers.jax_heartbeat_seconds(args.peer_timeout))
    finally:
        watchdog.cancel()


def _train_checkpoint_note(out: str, crash_log: str | None = None) -> str:
    """The end of a multi-process run's error line: the last finished checkpoint, the crash log's
    clause if there is one (:mod:`qdata.supervise`), and how to go on."""
    from qdata import checkpoints

    steps = checkpoints.saved_steps(Path(out)) if os.path.isdir(out) else []
    where = f"the last finished checkpoint in {out} (round {steps[-1]}) is intact" if steps else \
        f"no finished checkpoint in {out} yet"
    return f"{where}; {crash_log + '; ' if crash_log else ''}run again with --resume once every process can start"


def _compare_note(out: str, crash_log: str | None = None) -> str:
    """The end of a multi-process comparison's error line: what is kept, the crash log's clause if
    there is one (:mod:`qdata.supervise`), and how to go on."""
    return (f"the finished runs in {out} are kept (each run's last finished checkpoint too); "
            f"{crash_log + '; ' if crash_log else ''}continue with --resume --out {out} once every process can start")


def _supervised(args: argparse.Namespace, argv: list[str], out: str, note) -> int | None:
    """In the process the user started of a multi-process run: do the work (the same command line)
    in a child under a supervising parent that words JAX's abort of it (:mod:`qdata.supervise`);
    returns the exit status. None where this process does the work itself (one process, or the child).

    ``note(crash_log)``: the error line's end (what is kept in ``out``, how to go on)."""
    if args.num_processes <= 1 or supervise.is_child():
        return None
    process_id = args.process_id or 0
    return supervise.supervise([sys.executable, "-m", "qdata", *argv], process_id, args.num_processes,
                               Path(out) / f"process-{process_id}.crash.log", note)


def _maybe_distributed(args: argparse.Namespace, describe=lambda: "") -> None:
    if args.num_processes > 1:
        _join_processes(args)
        peers.watch_peers(args.process_id or 0, args.num_processes, args.peer_timeout, describe)
    elif args.local_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", args.local_devices)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdata", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="one run; writes OUT/results.jsonl and orbax checkpoints")
    train_p.add_argument("--config", help="a TOML file of RunConfig fields")
    train_p.add_argument("--out", help="the run's directory (default runs/NAME)")
    train_p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out "
                         "(the config must be the run's; name, num_devices, checkpoint_every, data_dir and a "
                         "longer rounds may change)")
    compare_p = sub.add_parser("compare", help="the main job: qdata vs SGD and gradient compression")
    compare_p.add_argument("--config", help="a lineup TOML file (default experiments/compare_digits.toml; "
                                            "see qdata.lineup); a flag the lineup sets is refused")
    compare_p.add_argument("--out", help="output directory (default runs/compare-TIMESTAMP)")
    compare_p.add_argument("--resume", action="store_true",
                           help="keep the finished runs in --out and continue an interrupted one")
    for p in (train_p, compare_p):
        _add_config_flags(p)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        group = p.add_argument_group("several processes (jax.distributed; gloo collectives on CPU)")
        group.add_argument("--coordinator", default=None, help=f"host:port of process 0 (default {DEFAULT_COORDINATOR})")
        group.add_argument("--num-processes", type=int, default=0)
        group.add_argument("--process-id", type=int, default=None)
        group.add_argument("--local-devices", type=int, default=0,
                           help="CPU devices in this process (a simulated multi-device machine)")
        group.add_argument("--init-timeout", type=float, default=60.0,
                           help=f"seconds to wait for every process to join, in (0, {MAX_INIT_TIMEOUT}] (default 60)")
        group.add_argument("--peer-timeout", type=float, default=60.0,
                           help="seconds a process of a running run may stay silent before the others stop with "
                                f"an error, in (0, {peers.MAX_PEER_TIMEOUT:g}] (default 60)")
    return parser


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from qdata.run import train

    config = _config_from(args)
    out = args.out or os.path.join("runs", config.name)
    _check_processes(args)
    _check_out(out)
    status = _supervised(args, argv, out, lambda crash_log: _train_checkpoint_note(out, crash_log))
    if status is not None:
        return status
    _maybe_distributed(args, lambda: _train_checkpoint_note(out))
    record = train(config, out, resume=args.resume, progress=not args.no_progress)
    print(f"{config.name}: round {record['round']}, test accuracy {record['test_accuracy']:.4f}, "
          f"uplink bits per node {record['cumulative_uplink_bits_per_node']:,.0f}; results in {out}/results.jsonl")
    return 0


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    from qdata.compare import DEFAULT_LINEUP, compare
    from qdata.lineup import load_lineup, with_overrides

    if args.resume and not args.out:
        raise ValueError("--resume needs --out, the directory of the comparison to continue")
    lineup = with_overrides(load_lineup(args.config or DEFAULT_LINEUP), _compare_changes(args))
    _check_processes(args)
    out = args.out
    if out is None and args.num_processes > 1:  # each process would pick its own timestamped directory
        raise ValueError(f"--num-processes {args.num_processes} needs --out, the one directory of the comparison "
                         "that every process is given (its runs, checkpoints and crash logs)")
    if out:
        _check_out(out)
    status = _supervised(args, argv, out, lambda crash_log: _compare_note(out, crash_log))
    if status is not None:
        return status
    _maybe_distributed(args, lambda: _compare_note(out))
    summary = compare(lineup, out, progress=not args.no_progress, resume=args.resume)
    import jax

    if jax.process_index() == 0:  # the one that wrote them
        print(summary["table"])
        print(f"\nwritten: {summary['out_dir']}/table.txt, summary.json, accuracy_vs_bits.png")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line, the message alone: a warning here says what qdata did about a file (e.g. a torn
    # results line dropped, a broken checkpoint set aside), not where in the source it was raised.
    print(f"qdata: warning: {' '.join(str(message).splitlines())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    if supervise.is_child():
        supervise.follow_parent()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.command == "train":
                return _train(args, argv)
            return _compare(args, argv)
    except (ValueError, FileExistsError) as err:
        return _fail(' '.join(str(err).splitlines()))
    except OSError as err:  # a file or directory the run reads or writes
        return _fail(str(err))
    except Exception as err:
        if not peers.watching():
            raise
        return _fail(peers.collective_failed(err))  # not a traceback, and not JAX's abort at exit


def _fail(message: str) -> int:
    print(f"qdata: error: {message}", file=sys.stderr, flush=True)
    if peers.watching():
        # A process that leaves a multi-process run alone: JAX's exit handler would wait at a shutdown
        # barrier its peers never reach and abort with a C++ fatal log; the peers' watch reports this
        # process gone instead.
        os._exit(2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
