"""The processes a test started, seen through Linux's /proc: a process's children, and whether one has ended."""
import os
import time


def _stat(pid) -> list[str]:
    """The fields of /proc/PID/stat after the command's name: state, ppid, ..."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(_stat(entry)[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def gone(pid: int, within: float) -> bool:
    """Whether ``pid`` ends within ``within`` seconds (a zombie counts: its parent died and nobody
    has reaped it yet)."""
    end = time.time() + within
    while True:
        try:
            if _stat(pid)[0] in ("Z", "X"):
                return True
        except OSError:
            return True
        if time.time() > end:
            return False
        time.sleep(0.05)
