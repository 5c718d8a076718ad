"""A supervising parent for one process of a multi-process run, so that JAX's abort is worded too.

The coordination service of a multi-process run lives in process 0. When process 0 dies, JAX's
client in every other process aborts that process at once with a C++ fatal log (``F1204 ...``,
``*** Check failure stack trace: ***`` and the frames), before :mod:`qdata.peers` can speak; Python
cannot catch an abort. So the process the user started does not train: it runs the training as a
child (:func:`supervise`), passes its stdout through and its stderr line by line, holds back the
C++ fatal-log block (:class:`StderrFilter`) into ``OUT/process-K.crash.log``, and when the child
ends by a signal or an abort prints one line and exits 2. Any other exit status of the child is
passed through unchanged (0, or 2 after the child's own error line). SIGINT and SIGTERM are
forwarded to the child (JAX's preemption notifier catches SIGTERM in the child and goes on, so a
child still running :data:`TERM_GRACE_SECONDS` later is killed); the child dies with the parent
(:func:`follow_parent`: Linux's ``PR_SET_PDEATHSIG``), so a parent killed with SIGKILL leaves no
training process behind.
"""
from __future__ import annotations

import codecs
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

CHILD_ENV = "QDATA_SUPERVISED_BY"  # set in the child: the parent's pid
# absl's log line: severity, MMDD, time, thread id, file:line] (what JAX's C++ client writes)
LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\s\]]+:\d+\] ")
LOG_START = re.compile(r"[IWEF]\d")  # where a log line, not yet ended by a newline, may start
QUIET_SECONDS = 1.0  # a block of non-fatal log lines is forwarded after this long without an F line
FORWARDED = (signal.SIGINT, signal.SIGTERM)
TERM_GRACE_SECONDS = 5.0  # a child still running this long after a forwarded SIGTERM is killed
PR_SET_PDEATHSIG = 1


def is_child() -> bool:
    """Whether this process is the training child of a supervising parent."""
    return CHILD_ENV in os.environ


def follow_parent() -> None:
    """In the child: be killed (SIGKILL) when the parent dies, however it dies (Linux; elsewhere a
    parent killed with SIGKILL leaves the child running). A parent already gone ends this process."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(os.environ[CHILD_ENV]):  # the parent died before prctl took effect
        os._exit(2)


class StderrFilter:
    """The child's stderr, forwarded as it comes except JAX's C++ fatal-log block.

    A line in absl's log format (:data:`LOG_LINE`) and the lines after it are held as a block; the
    block is forwarded once :data:`QUIET_SECONDS` pass without a fatal (``F``) line, and qdata's own
    lines (``qdata: ...``) meanwhile at once. A fatal line makes the block and everything after it
    (the stack trace, the frames, and the child's own error line if its Python ended it in the same
    instant) the crash log. Text that ends without a newline (a progress bar) is forwarded at once
    unless it could be the start of a log line.
    """

    def __init__(self):
        self.partial = ""  # the text after the last newline
        self.pending: list[str] = []  # a log block not yet known to be fatal
        self.held: list[str] = []  # the fatal block and all after it: the crash log
        self.fatal: str | None = None  # the first fatal line
        self.last = 0.0  # when the pending block last grew
        self.worded = False  # whether the child's own error line was forwarded

    def _line(self, line: str, now: float, out: list) -> None:
        if self.fatal is not None:
            self.held.append(line)
            return
        if line.startswith("qdata: "):
            self.worded = self.worded or line.startswith("qdata: error: ")
            out.append(line)
            return
        found = LOG_LINE.search(line)
        if found:  # a log line, perhaps after a progress bar's text on the same line
            out.append(line[:found.start()])
            line = line[found.start():]
            if line.startswith("F"):
                self.fatal, self.held, self.pending = line.strip(), self.pending + [line], []
                return
        if found or self.pending:
            self.pending.append(line)
            self.last = now
        else:
            out.append(line)

    def feed(self, text: str, now: float) -> str:
        """Take the next text the child wrote at time ``now``; returns the text to forward now."""
        out: list[str] = []
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self._line(line + "\n", now, out)
        if self.fatal is None and not self.pending and self.partial:
            cut = LOG_START.search(self.partial)
            keep = cut.start() if cut else len(self.partial)
            out.append(self.partial[:keep])
            self.partial = self.partial[keep:]
            self.last = now
        return "".join(out)

    def tick(self, now: float) -> str:
        """The text to forward at ``now`` for the time that passed: a quiet, non-fatal block."""
        if self.fatal is not None or not (self.pending or self.partial) or now - self.last < QUIET_SECONDS:
            return ""
        out, self.pending, self.partial = "".join(self.pending) + self.partial, [], ""
        return out

    def finish(self) -> str:
        """At the child's end: the text still to forward (the crash log stays in :attr:`held`)."""
        out: list[str] = []
        if self.partial:
            self._line(self.partial, self.last, out)
            self.partial = ""
        if self.fatal is None:
            out, self.pending = out + self.pending, []
        return "".join(out)


def _pump(stream, write: Callable[[str], None], tick: Callable[[float], None]) -> StderrFilter:
    """Read ``stream`` (the child's stderr) to its end through a :class:`StderrFilter`; ``tick(now)``
    is called a few times per :data:`QUIET_SECONDS` meanwhile."""
    kept, decode, fd = StderrFilter(), codecs.getincrementaldecoder("utf-8")("replace").decode, stream.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], QUIET_SECONDS / 4)
        now = time.monotonic()
        if ready:
            data = os.read(fd, 65536)
            if not data:
                break
            write(kept.feed(decode(data), now))
        write(kept.tick(now))
        tick(now)
    write(kept.feed(decode(b"", final=True), time.monotonic()) + kept.finish())
    return kept


def _forward_signals(child: subprocess.Popen, forwarded: list) -> dict:
    """SIGINT and SIGTERM to this process go to the child, each with the time it came, except one
    this process was started ignoring (a background job's SIGINT); returns the handlers replaced."""

    def forward(signum, frame):
        forwarded.append((signum, time.monotonic()))
        child.send_signal(signum)

    return {s: signal.signal(s, forward) for s in FORWARDED if signal.getsignal(s) != signal.SIG_IGN}


def _kill_if_deaf(child: subprocess.Popen, forwarded: list, now: float) -> None:
    if any(s == signal.SIGTERM and now - t > TERM_GRACE_SECONDS for s, t in forwarded) and child.poll() is None:
        child.kill()


def _write_crash_log(path: Path, held: list[str]) -> str:
    """Write the held fatal-log block; the clause naming it (or saying why it could not be written)."""
    try:
        path.write_text("".join(held))
    except OSError as err:
        return f"JAX's fatal log could not be kept in {path} ({err.strerror})"
    return f"the crash log is {path}"


def _abort_reason(process_id: int, returncode: int, fatal: str | None) -> str:
    if fatal is None:
        try:
            name = signal.Signals(-returncode).name if returncode < 0 else f"exit status {returncode}"
        except ValueError:
            name = f"signal {-returncode}"
        return f"the training process was ended by {name} from outside qdata (killed, or out of memory)"
    if process_id != 0:
        return ("the coordinator (process 0) stopped answering, it died, left the run or lost the network "
                "(JAX aborted this process)")
    message = fatal.split("] ", 1)[-1]
    return f"JAX aborted this process ({' '.join(message.split()[:16])})"


def supervise(command: list[str], process_id: int, num_processes: int, crash_log: Path,
              describe: Callable[[str | None], str]) -> int:
    """Run ``command`` (this process's training) as a child and word how it ends (module docstring).

    Args:
      command: the child's command line (the same ``qdata train`` arguments).
      process_id, num_processes: this process and the run's size, for the message.
      crash_log: where JAX's fatal-log block goes, if the child writes one.
      describe: the rest of the message (the last checkpoint, how to resume), given the crash log's clause.

    Returns:
      The exit status for this process: the child's, or 2 after an abort (with one line on stderr).
      A signal forwarded to the child that ended it ends this process the same way.
    """
    env = {**os.environ, CHILD_ENV: str(os.getpid())}
    forwarded: list[tuple[int, float]] = []
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, process_group=0)
    previous = _forward_signals(child, forwarded)
    try:
        kept = _pump(child.stderr, lambda text: (sys.stderr.write(text), sys.stderr.flush()),
                     lambda now: _kill_if_deaf(child, forwarded, now))
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logged = _write_crash_log(crash_log, kept.held) if kept.held else None
    if forwarded and returncode < 0:  # stopped as asked: end by the signal that asked
        signum = forwarded[-1][0]
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    aborted = returncode < 0 or returncode == 134 or (returncode != 0 and kept.fatal is not None)
    if not aborted or kept.worded:  # the child's own status, or its own error line said it
        return 2 if aborted else returncode
    reason = _abort_reason(process_id, returncode, kept.fatal)
    print(f"qdata: error: process {process_id} of {num_processes}: {reason}; {describe(logged)}",
          file=sys.stderr, flush=True)
    return 2
