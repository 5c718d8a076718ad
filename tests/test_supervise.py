"""The supervising parent of a multi-process run's process (qdata.supervise): which lines of the
child's stderr pass and which are kept as the crash log, and how the child's end is worded, with
real children (an abort, an exit status, a forwarded signal, a parent killed). The end-to-end case
(process 0 killed mid-run) is in test_faults.py."""
import signal
import subprocess
import sys
import time

from qdata.supervise import QUIET_SECONDS, TERM_GRACE_SECONDS, HOLD_SECONDS, StderrFilter, with_crash_log
from tests import processes

FATAL_BLOCK = (
    "W1204 14:03:22.123456    4266 preemption_sync_manager.cc:147] Failed to retrieve preemption notice\n"
    "Additional GRPC error information from remote target coordination_service:\n"
    "E1204 14:03:22.123500    4266 coordination_service_agent.cc:289] Polled an error from coordination service\n"
    "F1204 14:03:22.123510    4266 client.h:80] Terminating process because the JAX distributed service "
    "detected fatal errors.\n"
    "*** Check failure stack trace: ***\n"
    "    @     0x7f68e2c40634  absl::log_internal::LogMessage::SendToLog()\n"
    "    @     0x7f68ea2a71f5  (unknown)\n"
)


def test_lines_pass_at_once_and_the_fatal_block_is_held_with_all_after_it():
    kept = StderrFilter()
    assert kept.feed("qdata: warning: a torn results line dropped\nplain text\n", 0.0) == \
        "qdata: warning: a torn results line dropped\nplain text\n"
    assert kept.feed("\rsgd-digits:  45%|####5     | 90/200", 0.1) == "\rsgd-digits:  45%|####5     | 90/200"
    assert kept.feed("\rsgd-digits:  46%|####6     | 92/200" + FATAL_BLOCK[:40], 0.2) == \
        "\rsgd-digits:  46%|####6     | 92/200"  # a log line glued to the bar: the bar passes, the line waits
    assert kept.feed(FATAL_BLOCK[40:], 0.3) == ""
    assert kept.feed("qdata: error: process 1 of 2: a step with the other processes failed\n", 0.4) == ""
    assert kept.tick(10.0) == "" and kept.finish() == ""
    assert kept.fatal.startswith("F1204 14:03:22.123510") and kept.worded_at is None
    held = "".join(kept.held)
    assert held.startswith("W1204 ") and "*** Check failure stack trace: ***" in held and "(unknown)\n" in held
    assert held.endswith("qdata: error: process 1 of 2: a step with the other processes failed\n")


WARNING = FATAL_BLOCK.split("E1204")[0]  # a W line and its continuation: no fatal line
NOTE = "the last finished checkpoint in out (round 6) is intact; run again with --resume"
OWN_LINE = f"qdata: error: process 1 of 2: a step with the other processes failed; {NOTE}\n"


def _note(crash_log):
    return NOTE.replace("; run", f"; {crash_log}; run") if crash_log else NOTE


def test_a_warning_block_is_held_until_the_child_goes_on_and_forwarded_then():
    kept = StderrFilter()
    assert kept.feed(WARNING, 1.0) == "" and kept.tick(1.0 + QUIET_SECONDS / 2) == ""
    assert kept.tick(1.0 + QUIET_SECONDS) == ""  # the block has ended; still held, the child may yet abort
    assert kept.feed("qdata: warning: a torn results line dropped\n", 3.0) == \
        "qdata: warning: a torn results line dropped\n"  # qdata's lines pass at once, the block waits
    assert kept.feed("round 8 done\n", 4.0) == WARNING + "round 8 done\n"  # it goes on: the block first
    assert kept.feed(WARNING, 5.0) == "" and kept.tick(5.0 + QUIET_SECONDS) == ""
    assert kept.tick(5.0 + QUIET_SECONDS + HOLD_SECONDS) == WARNING  # it ran on for the hold time
    assert kept.feed("E1204 14:03:22.1 1 x.cc:2] last words", 30.0) == "" and kept.finish() == ""
    assert kept.release() == "E1204 14:03:22.1 1 x.cc:2] last words"  # a normal end: what was held passes
    assert kept.crash_log() == "" and kept.held == [] and kept.worded_at is None


def test_the_childs_own_error_line_is_held_to_its_end_and_names_the_crash_log():
    kept = StderrFilter()  # the child's own line wins the race against JAX's abort
    assert kept.feed(WARNING + OWN_LINE, 1.0) == "" and kept.tick(1.0 + QUIET_SECONDS + HOLD_SECONDS / 2) == ""
    assert kept.feed(FATAL_BLOCK[len(WARNING):], 1.2) == "" and kept.finish() == ""
    assert kept.last_words == [OWN_LINE] and kept.crash_log() == FATAL_BLOCK  # the warning before it too
    logged = "the crash log is out/process-1.crash.log"
    assert with_crash_log(OWN_LINE, _note, logged) == OWN_LINE.replace(NOTE, _note(logged)).rstrip("\n")
    assert with_crash_log(OWN_LINE, _note, None) == OWN_LINE.rstrip("\n")
    other = "qdata: error: process 1 of 2: not every process joined the run\n"  # no closing note: the clause is added
    assert with_crash_log(other, _note, logged) == f"{other.rstrip()}; {logged}"
    lingers = StderrFilter()  # a child still running long after its last words: they are forwarded
    assert lingers.feed(OWN_LINE, 1.0) == "" and lingers.tick(1.0 + HOLD_SECONDS / 2) == ""
    assert lingers.tick(1.0 + HOLD_SECONDS) == OWN_LINE and lingers.last_words == [] and lingers.worded_at == 1.0


CHILD = r"""
import os, sys
sys.stderr.write("qdata: warning: before\n"); sys.stderr.flush()
print("on stdout", flush=True)
if len(sys.argv) > 2:
    os.write(2, sys.argv[2].encode())
if sys.argv[1] == "abort":
    os.abort()
sys.exit(int(sys.argv[1]))
"""


def _supervised(tmp_path, *child_args, process_id=1):
    script = ("import sys; from pathlib import Path; from qdata import supervise; "
              f"sys.exit(supervise.supervise(sys.argv[1:], {process_id}, 2, Path({str(tmp_path)!r}) / 'crash.log', "
              "lambda log: 'checkpoint note; ' + (log + '; ' if log else '') + 'resume'))")
    return subprocess.run([sys.executable, "-c", script, sys.executable, "-c", CHILD, *child_args],
                          capture_output=True, text=True, timeout=60)


def test_an_aborted_child_is_one_line_and_exit_2_with_the_fatal_log_kept(tmp_path):
    done = _supervised(tmp_path, "abort", FATAL_BLOCK)
    said = done.stderr.splitlines()
    assert done.returncode == 2 and done.stdout == "on stdout\n", done.stderr
    assert said == ["qdata: warning: before",
                    "qdata: error: process 1 of 2: the coordinator (process 0) stopped answering, it died, left the "
                    f"run or lost the network (JAX aborted this process); checkpoint note; the crash log is "
                    f"{tmp_path / 'crash.log'}; resume"]
    assert (tmp_path / "crash.log").read_text() == FATAL_BLOCK
    done = _supervised(tmp_path, "abort", FATAL_BLOCK, process_id=0)
    assert done.stderr.splitlines()[-1].startswith("qdata: error: process 0 of 2: JAX aborted this process "
                                                   "(Terminating process because the JAX distributed service")
    done = _supervised(tmp_path, "abort", "")  # no fatal log: not blamed on the coordinator
    assert done.returncode == 2 and "ended by SIGABRT from outside qdata" in done.stderr.splitlines()[-1]


def test_a_childs_own_exit_status_passes_through(tmp_path):
    for status in (0, 2, 3):
        done = _supervised(tmp_path, str(status))
        assert done.returncode == status and done.stderr == "qdata: warning: before\n", done.stderr
    assert not (tmp_path / "crash.log").exists()



def test_jaxs_warnings_are_forwarded_after_a_normal_end_and_kept_in_the_crash_log_after_an_error(tmp_path):
    done = _supervised(tmp_path, "0", WARNING)
    assert done.returncode == 0 and done.stderr == "qdata: warning: before\n" + WARNING, done.stderr
    assert not (tmp_path / "crash.log").exists()
    own = "qdata: error: process 1 of 2: a step with the other processes failed; checkpoint note; resume\n"
    done = _supervised(tmp_path, "2", WARNING + own)  # the child's own line, JAX's warning before it
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "qdata: warning: before", own.replace("note; ", f"note; the crash log is {tmp_path / 'crash.log'}; ").strip()]
    assert (tmp_path / "crash.log").read_text() == WARNING
    done = _supervised(tmp_path, "abort", WARNING + own + FATAL_BLOCK[len(WARNING):])  # its line, then JAX's abort
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == \
        own.replace("note; ", f"note; the crash log is {tmp_path / 'crash.log'}; ").strip(), done.stderr
    assert (tmp_path / "crash.log").read_text() == FATAL_BLOCK

SLEEPER = r"""
import signal, sys, time
from qdata import supervise
if supervise.is_child():
    supervise.follow_parent()
    if sys.argv[1] == "deaf":  # as JAX's preemption notifier does
        signal.signal(signal.SIGTERM, lambda *_: None)
    print("child", flush=True)
    time.sleep(60)
sys.exit(supervise.supervise([sys.executable, *sys.argv], 1, 2, __import__("pathlib").Path("unused"), str))
"""


def _child_of(parent: subprocess.Popen) -> int:
    assert parent.stdout.readline() == "child\n"
    (child,) = processes.children(parent.pid)
    return child


def test_sigterm_is_forwarded_and_a_killed_parent_takes_its_child_along(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    for signum, child_kind in ((signal.SIGTERM, "plain"), (signal.SIGTERM, "deaf"), (signal.SIGKILL, "plain")):
        parent = subprocess.Popen([sys.executable, str(script), child_kind], stdout=subprocess.PIPE, text=True)
        child = _child_of(parent)
        sent = time.monotonic()
        parent.send_signal(signum)
        # SIGTERM: the child ends by it (a deaf one is killed after the grace), the parent the same way
        assert parent.wait(timeout=30) == -signum
        assert processes.gone(child, within=10), (signum, child_kind)
        if child_kind == "deaf":
            assert TERM_GRACE_SECONDS <= time.monotonic() - sent < TERM_GRACE_SECONDS + 10
