"""A supervising parent for one process of a multi-process run, so that JAX's abort is worded too.

The coordination service of a multi-process run lives in process 0. When process 0 dies, JAX's
client in every other process aborts that process at once with a C++ fatal log (``F1204 ...``,
``*** Check failure stack trace: ***`` and the frames), before :mod:`qdata.peers` can speak; Python
cannot catch an abort. So the process the user started (``qdata train`` or ``qdata compare``) does
not do the work: it runs it as a child (:func:`supervise`), passes its stdout through and its
stderr line by line, holds back JAX's log blocks (:class:`StderrFilter`), and when the child ends
by a signal or an abort prints one line and exits 2. Any other exit status of the child is passed
through unchanged (0, or 2 after the child's own error line). What JAX logged goes to
``OUT/process-K.crash.log`` when the child ends abnormally, and that line, or the child's own,
names it; after a normal end it is forwarded. SIGINT and SIGTERM are
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
QUIET_SECONDS = 1.0  # a log block ends after this long without a line
HOLD_SECONDS = 10.0  # what is held for the child's end is forwarded once the child has run on this long
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
    """The child's stderr, forwarded as it comes except JAX's log blocks and the child's last words.

    A line in absl's log format (:data:`LOG_LINE`) and the lines after it are a block, ended by
    :data:`QUIET_SECONDS` without a line. A fatal (``F``) line makes the blocks held so far, its own
    and everything after it (the stack trace, the frames, and the child's own error line if its
    Python ended it in the same instant) the crash log (:attr:`held`). A block without a fatal line
    is held too (:attr:`waiting`): JAX's warnings are worth reading in a run that goes on and are
    noise beside an abort's one line, so they are forwarded once the child shows it goes on (other
    text from it, or :data:`HOLD_SECONDS` more of running) or at its end by :meth:`release`
    (the supervisor calls it after a normal end; after an abnormal one they join the crash log).
    The child's own error line (``qdata: error: ...``, its last word: it exits right after) is held
    to its end (:attr:`last_words`), so that the line the user reads can name the crash log, or
    forwarded after :data:`HOLD_SECONDS` should the child linger; qdata's other lines pass at once.
    Text that ends without a newline (a progress bar) is forwarded at once unless it could be the
    start of a log line.
    """

    def __init__(self):
        self.partial = ""  # the text after the last newline
        self.pending: list[str] = []  # the log block still growing, not yet known to be fatal
        self.waiting: list[str] = []  # ended blocks with no fatal line, not yet forwarded
        self.waiting_since = 0.0  # when the oldest waiting block ended
        self.held: list[str] = []  # the fatal block and all after it: the crash log
        self.fatal: str | None = None  # the first fatal line
        self.last_words: list[str] = []  # the child's own error line (before any fatal line), not yet forwarded
        self.worded_at: float | None = None  # when the child wrote it
        self.last = 0.0  # when the pending block or the partial text last grew

    def _text(self, text: str, out: list) -> None:
        """Plain text from the child: it goes on, so the blocks held so far go first."""
        if text:
            out.extend(self.waiting)
            self.waiting = []
            out.append(text)

    def _line(self, line: str, now: float, out: list) -> None:
        if self.fatal is not None:
            self.held.append(line)
        elif line.startswith("qdata: error: "):
            self.last_words.append(line)
            self.worded_at = now if self.worded_at is None else self.worded_at
        elif line.startswith("qdata: "):
            out.append(line)
        elif found := LOG_LINE.search(line):  # a log line, perhaps after a progress bar's text on the same line
            self._text(line[:found.start()], out)
            line = line[found.start():]
            if line.startswith("F"):
                self.fatal, self.held = line.strip(), self.waiting + self.pending + [line]
                self.waiting, self.pending = [], []
            else:
                self.pending.append(line)
                self.last = now
        elif self.pending:
            self.pending.append(line)
            self.last = now
        else:
            self._text(line, out)

    def feed(self, text: str, now: float) -> str:
        """Take the next text the child wrote at time ``now``; returns the text to forward now."""
        out: list[str] = []
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self._line(line + "\n", now, out)
        if self.fatal is None and not self.pending and self.partial:
            cut = LOG_START.search(self.partial)
            keep = cut.start() if cut else len(self.partial)
            self._text(self.partial[:keep], out)
            self.partial = self.partial[keep:]
            self.last = now
        return "".join(out)

    def _end_block(self, now: float) -> None:
        if not self.waiting:
            self.waiting_since = now
        self.waiting, self.pending = self.waiting + self.pending, []

    def tick(self, now: float) -> str:
        """The text to forward at ``now`` for the time that passed: a partial text that turned out
        not to start a log line, the held blocks of a child that went on running, the error line
        of one that lingers."""
        out: list[str] = []
        if self.fatal is None and now - self.last >= QUIET_SECONDS:
            if self.pending:
                self.pending += [self.partial] if self.partial else []
                self._end_block(now)
            else:
                self._text(self.partial, out)
            self.partial = ""
        if self.waiting and now - self.waiting_since >= HOLD_SECONDS:
            out, self.waiting = self.waiting + out, []
        if self.last_words and now - self.worded_at >= HOLD_SECONDS:  # a child that lingers after its words
            out, self.last_words = out + self.last_words, []
        return "".join(out)

    def finish(self) -> str:
        """At the child's end: the plain text still to forward (the blocks stay held)."""
        out: list[str] = []
        if self.partial:
            self._line(self.partial, self.last, out)
            self.partial = ""
        if self.pending:
            self._end_block(self.last)
        return "".join(out)

    def release(self) -> str:
        """After a normal end: the held blocks without a fatal line, to forward."""
        out, self.waiting = "".join(self.waiting), []
        return out

    def crash_log(self) -> str:
        """What JAX logged that was not forwarded: the fatal block and all after it, or the blocks
        still held at an abnormal end."""
        return "".join(self.held + self.waiting)


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


def _write_crash_log(path: Path, text: str) -> str:
    """Write what JAX logged; the clause naming the file (or saying why it could not be written)."""
    try:
        path.write_text(text)
    except OSError as err:
        return f"JAX's log could not be kept in {path} ({err.strerror})"
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


def with_crash_log(line: str, describe: Callable[[str | None], str], logged: str | None) -> str:
    """The child's own error line, naming the crash log where one was written: its closing note
    (``describe(None)``, as the child wrote it) told again with the crash log's clause, or the
    clause added at the end."""
    line = line.rstrip("\n")
    if logged is None:
        return line
    note = describe(None)
    if note and line.endswith(note):
        return line[:-len(note)] + describe(logged)
    return f"{line}; {logged}"


def _aborted(kept: StderrFilter, returncode: int) -> bool:
    """Whether the child was ended by a signal or an abort (JAX's fatal log), not by its own exit."""
    return returncode < 0 or returncode == 134 or (returncode != 0 and kept.fatal is not None)


def _end_line(kept: StderrFilter, returncode: int, stopped: bool, process_id: int, num_processes: int,
              describe: Callable[[str | None], str], crash_log: Path) -> str | None:
    """At the child's end, with the text it wrote forwarded: what JAX logged goes to ``crash_log``
    (or, after a normal end, to stderr); returns the line that says how the child ended, if one is
    due (none for a child ``stopped`` by a signal forwarded to it)."""
    aborted, worded = not stopped and _aborted(kept, returncode), kept.worded_at is not None
    if not (aborted or worded):  # a normal end, or one its own output explains (a traceback)
        sys.stderr.write(kept.release())
    text = kept.crash_log()
    logged = _write_crash_log(crash_log, text) if text else None
    if worded:  # the child's own error line said it (forwarded already if it lingered after it)
        *before, last = kept.last_words or [None]
        return None if last is None else "".join(before) + with_crash_log(last, describe, logged)
    if aborted:
        reason = _abort_reason(process_id, returncode, kept.fatal)
        return f"qdata: error: process {process_id} of {num_processes}: {reason}; {describe(logged)}"
    return None


def supervise(command: list[str], process_id: int, num_processes: int, crash_log: Path,
              describe: Callable[[str | None], str]) -> int:
    """Run ``command`` (this process's work) as a child and word how it ends (module docstring).

    Args:
      command: the child's command line (the same ``qdata train`` or ``qdata compare`` arguments).
      process_id, num_processes: this process and the run's size, for the message.
      crash_log: where what JAX logged goes, if the child ends abnormally after logging.
      describe: the rest of the message (what is kept, how to resume), given the crash log's clause
        (None where none was written).

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
    stopped = bool(forwarded) and returncode < 0
    line = _end_line(kept, returncode, stopped, process_id, num_processes, describe, crash_log)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    if stopped:  # stopped as asked: end by the signal that asked
        signum = forwarded[-1][0]
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return 2 if _aborted(kept, returncode) else returncode
