"""``consumerd health``: the container health check, run as a separate short process.

Healthy means: the master named in the pidfile is alive (not a zombie) and has at least
one live worker. It reads /proc only, so it needs no network and no broker; the HTTP
probes (``/healthz``, ``/readyz``) answer the finer question of readiness.
"""

from __future__ import annotations

import os
from pathlib import Path


class Unhealthy(Exception):
    """Why the check failed, in one line."""


def _stat(pid: int) -> tuple[str, int]:
    """(state, parent pid) of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def check(pidfile: str) -> str:
    """Return a one-line summary if healthy; raise :class:`Unhealthy` otherwise."""
    try:
        master = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError) as exc:
        raise Unhealthy(f"no master pid in {pidfile}: {exc}") from None
    try:
        state, _ = _stat(master)
    except (OSError, IndexError):
        raise Unhealthy(f"master pid {master} is not running") from None
    if state in ("Z", "X"):
        raise Unhealthy(f"master pid {master} is dead")
    workers = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state, parent = _stat(int(entry))
            except (OSError, IndexError):
                continue  # exited while we looked
            workers += parent == master and state not in ("Z", "X")
    if not workers:
        raise Unhealthy(f"master pid {master} has no live worker")
    return f"master pid {master} with {workers} worker(s)"
