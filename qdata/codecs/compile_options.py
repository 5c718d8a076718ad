"""How the codecs' own jitted functions are compiled (XLA:CPU options)."""

from __future__ import annotations

import functools
from typing import Callable

import jax


@functools.cache
def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def codec_compiler_options() -> dict:
    """XLA options for the codecs' jitted encode/decode (``jax.jit(..., compiler_options=...)``).

    On the CPU backend the quantizers are compute bound (hash, round, pack every coordinate): where
    the CPU has AVX-512, ``xla_cpu_prefer_vector_width=512`` (XLA's default is 256) makes the 4-bit
    round trip about 1.3-1.5x faster (``experiments/bench_codecs.py``). Elsewhere, no options.
    (``xla_cpu_enable_fast_min_max`` was measured too: it slows XLA's min/max reductions 4x.)

    The options apply to an executable as a whole: they take effect when a codec is called on its
    own (``q.encode(key, x)``), not when it is traced inside an enclosing ``jax.jit``, which compiles
    with that jit's options (pass these there too if wanted, as the benchmark does). A new dict each
    call.
    """
    if jax.default_backend() == "cpu" and _cpu_has_avx512():
        return {"xla_cpu_prefer_vector_width": 512}
    return {}


def codec_jit(fn: Callable) -> Callable:
    """``jax.jit(fn)``, compiled with :func:`codec_compiler_options` when called at top level.

    JAX accepts compiler options on a top-level jit only, so a call with traced arguments (inside an
    enclosing ``jit``, ``vmap``, ``grad``) goes to the plain ``jax.jit(fn)`` and is compiled with
    the enclosing computation.
    """
    plain = jax.jit(fn)
    options = codec_compiler_options()
    if not options:
        return plain
    tuned = jax.jit(fn, compiler_options=options)

    @functools.wraps(fn)
    def call(*args):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args)):
            return plain(*args)
        try:
            return tuned(*args)
        except ValueError as err:  # concrete arguments, but inside another trace
            if "compiler_options" not in str(err):
                raise
            return plain(*args)

    return call
