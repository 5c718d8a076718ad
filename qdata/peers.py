"""Liveness of the other processes of a multi-process run, watched from Python.

When a peer dies mid-run, the survivor blocks in a collective until JAX's coordination service
misses the peer's heartbeats and aborts the process with a C++ fatal log, which Python cannot
catch or word. :func:`watch_peers` gets there first: every process bumps a counter of its own in
the coordination service's key-value store a few times per ``timeout`` and reads the others'; a
peer whose counter has not moved for ``timeout`` seconds ends this process with one clear line
and exit status 2. Checkpoints are written whole or not at all (orbax renames a finished save into
place), so the last finished one is intact whatever moment the peer died at. JAX's own heartbeat
timeout is set above ``timeout`` (:func:`jax_heartbeat_seconds`) so that its abort never comes first.

The coordination service lives in process 0. When process 0 dies (or leaves the run early on an
error), JAX's client in every other process finds the service gone at once and aborts that process
with its C++ fatal log before this watch can speak (the client takes a ``missed_heartbeat_callback``,
but its Python binding cannot pass the status: ``std::bad_cast``, jax 0.10.2). That abort is worded
from outside the process: ``qdata train`` and ``qdata compare`` work in a child process under a
supervising parent (:mod:`qdata.supervise`), which keeps JAX's log in ``OUT/process-K.crash.log``
and prints one line.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Callable

KEY = "qdata/alive/{}"
TICKS_PER_TIMEOUT = 5
MAX_PEER_TIMEOUT = 3600.0
_watched: dict = {}  # process_id, num_processes, describe: set by watch_peers


def watching() -> bool:
    """Whether this process watches the peers of a multi-process run (see :func:`watch_peers`)."""
    return bool(_watched)


def collective_failed(err: BaseException) -> str:
    """The one line for an error raised in this process while the peers are watched: when a peer
    dies while this process waits inside a collective, gloo's socket closes and the collective
    fails at once, before the watch's timeout."""
    what = " ".join(str(err).split()[:20])
    return (f"process {_watched['process_id']} of {_watched['num_processes']}: a step with the other processes "
            f"failed, a peer died or left the run ({type(err).__name__}: {what}); {_watched['describe']()}")


def jax_heartbeat_seconds(timeout: float) -> int:
    """JAX's heartbeat timeout for a run watched with ``timeout``: late enough never to fire first."""
    return int(timeout) + 60


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("watch_peers needs jax.distributed to be initialized")
    return client


def _read(client, key: str) -> str | None:
    """A key's value, or None before its process first wrote it (other store errors propagate)."""
    try:
        return client.key_value_try_get(key)
    except Exception as err:
        if "NOT_FOUND" in str(err):
            return None
        raise


def _lost_peer(values: dict, seen: dict, timeout: float, now: float) -> str | None:
    """What was lost (a sentence), or None while every peer's counter moves.

    ``values``: each peer's counter as just read; ``seen``: each peer's last value and when it
    changed (updated here)."""
    for peer, value in values.items():
        last, since = seen.setdefault(peer, (value, now))
        if value != last:
            seen[peer] = (value, now)
        elif now - since > timeout:
            return f"process {peer} stopped answering for {timeout:g} s (it died, hangs or lost the network)"
    return None


def _end(process_id: int, num_processes: int, lost: str, describe: Callable[[], str],
         exit: Callable[[int], None] = os._exit) -> None:
    print(f"qdata: error: process {process_id} of {num_processes}: {lost}; {describe()}", file=sys.stderr, flush=True)
    exit(2)


def watch_peers(process_id: int, num_processes: int, timeout: float, describe: Callable[[], str],
                exit: Callable[[int], None] = os._exit) -> threading.Event:
    """Start a daemon thread that ends this process when a peer of the run is lost.

    Args:
      process_id, num_processes: this process and the run's size (jax.distributed initialized).
      timeout: seconds a peer may stay silent.
      describe: called once at the end for the rest of the message (e.g. the last checkpoint).
      exit: how to end the process (``os._exit``: other threads are blocked in a collective).

    Returns:
      An event; set it to stop watching (the run finished).
    """
    client, stop = _client(), threading.Event()
    _watched.update(process_id=process_id, num_processes=num_processes, describe=describe)
    seen: dict[int, tuple] = {}

    def beat():
        count = 0
        while not stop.wait(timeout / TICKS_PER_TIMEOUT):
            count += 1
            try:
                client.key_value_set(KEY.format(process_id), str(count), allow_overwrite=True)
                values = {p: _read(client, KEY.format(p)) for p in range(num_processes) if p != process_id}
            except Exception as err:  # JaxRuntimeError: the store went with process 0, or the network
                lost = f"the coordinator (process 0) stopped answering ({' '.join(str(err).split()[:12])})"
            else:
                lost = _lost_peer(values, seen, timeout, time.monotonic())
            if lost and not stop.is_set():
                _end(process_id, num_processes, lost, describe, exit)
                return

    threading.Thread(target=beat, name="qdata-peers", daemon=True).start()
    # Registered after jax.distributed's own exit handler, so it runs first: the processes leave the
    # run one by one and a peer that has left must not read as a lost one.
    atexit.register(stop.set)
    return stop
