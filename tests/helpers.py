"""Shared tools for tests that drive real processes: wait on conditions with deadlines."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.01,
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def catches(pid: int, sig: int) -> bool:
    """True once ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc), or is gone.

    A signal sent to a master that is still importing meets the default action: SIGTERM
    and SIGHUP then kill it (exit -15 / -1) instead of asking for a graceful stop."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (FileNotFoundError, ProcessLookupError):
        return True
    return bool(int(caught.split()[1], 16) >> (sig - 1) & 1) or not pid_alive(pid)


def _children(pid: int, zombies: bool) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and (fields[0] == "Z") == zombies:
            found.append(int(entry))
    return found


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) children of ``pid``, from /proc."""
    return _children(pid, zombies=False)


def zombies_of(pid: int) -> list[int]:
    """Children of ``pid`` that exited and were not reaped."""
    return _children(pid, zombies=True)


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
