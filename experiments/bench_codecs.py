"""Codec throughput: encode + decode of every data quantizer and vector compressor, against a copy.

Run ``python -m experiments.bench_codecs`` (``--quick`` for a small smoke run, ``--out FILE`` to
append the rows as JSON lines). Inputs (synthetic, labelled so in the output):

* data: a CIFAR-shaped batch, 128 x 3072 float32 uniform on [0, 1], for each data quantizer of
  :mod:`qdata.codecs.quantizers` at B = 4 and 8 (dataset-wide range [0, 1]);
* vector: an 11.2M-parameter float32 tensor (2728 x 4096, so that PowerSGD sees one matrix; the
  other compressors flatten it) for each compressor of :mod:`qdata.codecs.compressors` that exists
  (missing ones are skipped, and the output says so).

Each codec is timed as one jitted round trip ``key, x -> (payload, decode(payload))``: the packed
payload is an output, so it is materialised as it would be on the link, and one dispatch is paid,
as for the baseline, a jitted copy ``x -> x + 0`` (which writes a new buffer) of the same array.
Each call is ended by ``block_until_ready`` and followed by a timed copy; the medians are compared:
``ratio = t_copy / t_codec`` is the codec's throughput as a fraction of a copy's (``paired``: the
median over the (codec, copy) pairs of the same quotient). Target for the data quantizers:
ratio >= 0.25. The data quantizers are timed in 5 blocks of 100 (codec, copy) pairs each (after a
1 s warm-up of the machine), the codecs taking turns block by block: within a block a codec runs
back to back, as a node encoding batch after batch would, and each codec's blocks are spread over
the run, so that a busy spell of this shared machine falls on all of them alike. A vector compressor
is timed alternately with its copy, up to 500 times or about ``--budget`` seconds (at least 3). The
full run also times encode and decode as separate jitted calls, for information.

The quantizers are compute bound on CPU (a copy is a memcpy; a quantizer hashes, rounds, packs and
unpacks every coordinate), so the ratio depends on the code XLA emits. The codecs' own jitted
functions compile with :func:`qdata.codecs.base.codec_compiler_options` (fast min/max; 512-bit vectors
on AVX-512 CPUs); the round trips here, being jits of their own, are compiled with the same options,
and so is the copy, so that both sides of the ratio get the same compiler. ``--plain`` drops them
(XLA's defaults for both). The header prints the options and XLA_FLAGS in force; compare ratios only
between runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from qdata.codecs import base, quantizers

TARGET_RATIO = 0.25

QUANTIZERS: dict[str, Callable[[int], object]] = {
    "stochastic_rounding": lambda b: quantizers.stochastic_rounding(b, 0.0, 1.0),
    "nearest_rounding": lambda b: quantizers.nearest_rounding(b, 0.0, 1.0),
    "subtractive_dither": lambda b: quantizers.subtractive_dither(b, 0.0, 1.0),
    "per_sample_range": lambda b: quantizers.per_sample_range(b),
}

# row name -> (factory in qdata.codecs.compressors, builder(module, d) -> Compressor)
COMPRESSORS: dict[str, tuple[str, Callable]] = {
    "fp32": ("fp32", lambda m, d: m.fp32()),
    "fp16": ("fp16", lambda m, d: m.fp16()),
    "randk(d/100)": ("randk", lambda m, d: m.randk(max(1, d // 100))),
    "topk(d/100)": ("topk", lambda m, d: m.topk(max(1, d // 100))),
    "qsgd(s=16)": ("qsgd", lambda m, d: m.qsgd(16)),
    "terngrad": ("terngrad", lambda m, d: m.terngrad()),
    "scaled_sign": ("scaled_sign", lambda m, d: m.scaled_sign()),
    "powersgd(r=4)": ("powersgd", lambda m, d: m.powersgd(4)),
    "error_feedback(scaled_sign)": ("error_feedback", lambda m, d: m.error_feedback(m.scaled_sign())),
}


def _budgeted_repeats(fn: Callable, args: tuple, repeats: int, budget_s: float) -> int:
    """Compile and warm ``fn``, then time one call: at most ``repeats`` calls, fewer (at least 3)
    when one call already takes a good part of ``budget_s``."""
    jax.block_until_ready(fn(*args))
    if not math.isfinite(budget_s):
        return repeats
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return max(3, min(repeats, int(budget_s / max(time.perf_counter() - start, 1e-9))))


def _time_pair(codec: Callable, copy: Callable, codec_args: tuple, x, repeats: int,
               budget_s: float) -> tuple[float, float, float]:
    """One codec timed alternately with the copy (see :func:`_time_in_blocks`, one block), as many
    times as ``budget_s`` allows."""
    jax.block_until_ready(copy(x))
    repeats = _budgeted_repeats(codec, codec_args, repeats, budget_s)
    return _time_in_blocks({"codec": (codec, codec_args)}, copy, x, repeats, blocks=1, warm=0)["codec"]


def median_time(fn: Callable, args: tuple, repeats: int, budget_s: float = float("inf")) -> float:
    """Median wall seconds of ``fn(*args)`` (blocked until ready) after a warm-up call; at most
    ``repeats`` calls, fewer (at least 3) when one call already takes a good part of ``budget_s``."""
    times = []
    for _ in range(_budgeted_repeats(fn, args, repeats, budget_s)):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(kind: str, name: str, nbytes: int, times: tuple[float, float, float], bits: float,
         unit: str) -> dict:
    t_codec, t_copy, paired = times
    ratio = t_copy / t_codec
    return {
        "kind": kind, "codec": name, "input_bytes": nbytes, "roundtrip_ms": 1e3 * t_codec,
        "mb_per_s": nbytes / t_codec / 1e6, "copy_mb_per_s": nbytes / t_copy / 1e6, "ratio": ratio,
        "paired_ratio": paired,
        "bits": bits, "bits_unit": unit,
        "meets_target": (ratio >= TARGET_RATIO) if kind == "data" else None,
    }


def _progress(row: dict) -> None:
    print(f"  {row['codec']}: {row['roundtrip_ms']:.3f} ms, ratio {row['ratio']:.3f}", flush=True)


def _time_in_blocks(codecs: dict, copy: Callable, x, repeats: int, blocks: int = 5, warm: int = 3) -> dict:
    """For each codec ``name -> (fn, args)``: median seconds of ``fn(*args)``, of the copy timed just
    after it, and the median over those pairs of ``t_copy / t_codec``.

    Each codec is timed in ``blocks`` blocks of alternating (codec, copy) pairs, ``repeats`` pairs in
    all, and the codecs take turns block by block: within a block a codec runs back to back, as it
    would encoding batch after batch (``warm`` untimed pairs first), and its blocks are spread over
    the whole run, so that a busy spell of a shared machine falls on all codecs alike.
    """
    per_block = max(1, repeats // blocks)
    times = {name: ([], []) for name in codecs}
    for _ in range(blocks):
        for name, (fn, args) in codecs.items():
            for _ in range(warm):
                jax.block_until_ready(fn(*args))
                jax.block_until_ready(copy(x))
            for _ in range(per_block):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                t_codec = time.perf_counter() - start
                start = time.perf_counter()
                jax.block_until_ready(copy(x))
                times[name][0].append(t_codec)
                times[name][1].append(time.perf_counter() - start)
    return {name: (statistics.median(tc), statistics.median(tp),
                   statistics.median(p / c for c, p in zip(tc, tp)))
            for name, (tc, tp) in times.items()}


def bench_quantizers(x, key, bit_widths, repeats: int, split: bool, budget_s: float,
                     options: dict | None = None) -> list[dict]:
    copy = jax.jit(lambda a: a + 0, compiler_options=options)
    codecs, quants = {}, {}
    for name, make in QUANTIZERS.items():
        for b in bit_widths:
            q = make(b)

            def roundtrip(k, a, q=q):
                payload = q.encode(k, a)
                return payload, q.decode(payload)

            codecs[f"{name}(B={b})"] = (jax.jit(roundtrip, compiler_options=options), (key, x))
            quants[f"{name}(B={b})"] = q
    timed = _time_in_blocks(codecs, copy, x, repeats)
    rows = []
    for name, q in quants.items():
        payload, _ = codecs[name][0](key, x)
        row = _row("data", name, x.nbytes, timed[name], q.bits(payload) / x.shape[0], "per sample")
        if split:
            enc = jax.jit(q.encode, compiler_options=options)
            dec = jax.jit(q.decode, compiler_options=options)
            row["encode_ms"] = 1e3 * median_time(enc, (key, x), repeats, budget_s)
            row["decode_ms"] = 1e3 * median_time(dec, (payload,), repeats, budget_s)
        _progress(row)
        rows.append(row)
    return rows


def bench_compressors(tree, key, repeats: int, split: bool, budget_s: float) -> list[dict]:
    try:
        from qdata.codecs import compressors as module
    except ImportError as err:
        print(f"skipped: all vector compressors (qdata.codecs.compressors does not import: {err})")
        return []
    leaf = tree["w"]
    d = leaf.size
    copy = jax.jit(lambda a: a + 0)
    rows = []
    for name, (attr, make) in COMPRESSORS.items():
        if not hasattr(module, attr):
            print(f"skipped: {name} (qdata.codecs.compressors has no {attr})")
            continue
        try:
            comp = make(module, d)
            state = comp.init(tree)

            def roundtrip(k, t, s, comp=comp):
                payload, s = comp.encode(k, t, s)
                return payload, s, comp.decode(payload)

            roundtrip = jax.jit(roundtrip)
            times = _time_pair(roundtrip, copy, (key, tree, state), leaf, repeats, budget_s)
            payload, _, _ = roundtrip(key, tree, state)
            row = _row("vector", name, leaf.nbytes, times, comp.bits(payload), "per vector")
            if split:
                enc, dec = jax.jit(comp.encode), jax.jit(comp.decode)
                row["encode_ms"] = 1e3 * median_time(enc, (key, tree, state), repeats, budget_s)
                row["decode_ms"] = 1e3 * median_time(dec, (payload,), repeats, budget_s)
        except Exception as err:  # noqa: BLE001 - a broken or unfinished compressor must not stop the bench
            print(f"skipped: {name} ({type(err).__name__}: {err})")
            continue
        _progress(row)
        rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    split = any("encode_ms" in r for r in rows)
    head = (f"{'codec':30s} {'input':>9s} {'MB/s':>9s} {'copy MB/s':>10s} {'ratio':>7s} {'paired':>7s} "
            f"{'bits':>12s}  {'unit':10s}")
    head += f" {'enc ms':>8s} {'dec ms':>8s}" if split else ""
    head += "  target"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['codec']:30s} {r['input_bytes'] / 1e6:8.2f}M {r['mb_per_s']:9.1f} {r['copy_mb_per_s']:10.1f} "
                f"{r['ratio']:7.3f} {r['paired_ratio']:7.3f} {r['bits']:12.1f}  {r['bits_unit']:10s}")
        if split:
            line += f" {r.get('encode_ms', math.nan):8.3f} {r.get('decode_ms', math.nan):8.3f}"
        if r["meets_target"] is not None:
            line += f"  {'meets' if r['meets_target'] else 'misses'} ratio >= {TARGET_RATIO}"
        print(line)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, return the rows (dicts), optionally append them as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per codec (median)")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timed calls per codec, roughly")
    parser.add_argument("--only", choices=("data", "vector"), default=None, help="bench one family only")
    parser.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    parser.add_argument("--plain", action="store_true",
                        help="compile the data round trips and the copy with XLA's default options "
                             "instead of the codecs' own (qdata.codecs.base.codec_compiler_options)")
    args = parser.parse_args(argv)

    if args.quick:
        batch, sample, matrix, bit_widths, repeats = 8, 256, (64, 64), (4, 8), args.repeats or 3
    else:
        batch, sample, matrix, bit_widths, repeats = 128, 3072, (2728, 4096), (4, 8), args.repeats or 500
    key_x, key_v, key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(key_x, (batch, sample), jnp.float32)
    tree = {"w": jax.random.normal(key_v, matrix, jnp.float32)}
    config = {"quick": args.quick, "batch": batch, "sample": sample, "vector": math.prod(matrix),
              "repeats": repeats, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "data": "synthetic", "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "compiler_options": {} if args.plain else base.codec_compiler_options()}
    print(f"synthetic data {batch} x {sample} float32 in [0, 1]; synthetic vector d = {math.prod(matrix)} "
          f"float32; {jax.default_backend()} ({jax.devices()[0]}); XLA_FLAGS={config['xla_flags']!r}; "
          f"compiler options (round trips and copy) {config['compiler_options']}; "
          f"median of up to {repeats} round trips")

    # Warm the machine (clock, thread pool, caches) before the first timed codec, which otherwise
    # reads slower than the same codec timed later in the run.
    warm = jax.jit(lambda a: a + 0)
    start = time.perf_counter()
    while time.perf_counter() - start < (0.05 if args.quick else 1.0):
        jax.block_until_ready(warm(x))
    rows = []
    if args.only in (None, "data"):
        rows += bench_quantizers(x, key, bit_widths, repeats, not args.quick, args.budget,
                                 config["compiler_options"] or None)
    if args.only in (None, "vector"):
        rows += bench_compressors(tree, key, repeats, not args.quick, args.budget)
    _print_table(rows)
    data_rows = [r for r in rows if r["kind"] == "data"]
    met = sum(r["meets_target"] for r in data_rows)
    if data_rows:
        print(f"data quantizers meeting ratio >= {TARGET_RATIO}: {met} of {len(data_rows)}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({"config": config, **r}) + "\n")
    return rows


if __name__ == "__main__":
    main()
