"""Code reload with a stable PID: the master re-executes itself and adopts its workers.

Before ``exec`` the master writes down what the new image needs (its pipes and its live
workers) in one environment variable and keeps those pipe fds open across the exec. The
workers stay its children (the PID does not change), so the new image can wait for them
and replace them one at a time with workers forked from freshly imported code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys

from consumerd.supervisor import osproc

LOG = logging.getLogger(__name__)

ENV_VAR = "CONSUMERD_REEXEC_STATE"


@dataclasses.dataclass(frozen=True)
class AdoptedWorker:
    service_index: int
    worker_id: int
    pid: int
    started_at: float
    stopping: bool


@dataclasses.dataclass(frozen=True)
class State:
    death_pipe: tuple[int, int]
    status_pipe: tuple[int, int]
    ready: bool
    workers: tuple[AdoptedWorker, ...]

    def fds(self) -> tuple[int, ...]:
        return (*self.death_pipe, *self.status_pipe)


def receive() -> State | None:
    """The state an earlier image of this process left, if it re-executed into this one."""
    raw = os.environ.pop(ENV_VAR, None)
    if raw is None:
        return None
    import json  # noqa: PLC0415 - only a re-executed master needs it

    data = json.loads(raw)
    state = State(
        death_pipe=(data["death_pipe"][0], data["death_pipe"][1]),
        status_pipe=(data["status_pipe"][0], data["status_pipe"][1]),
        ready=data["ready"],
        workers=tuple(AdoptedWorker(**w) for w in data["workers"]),
    )
    for fd in state.fds():
        os.set_inheritable(fd, False)
    return state


def logical_cwd() -> str:
    """The working directory as the user named it, symlinks kept.

    A process's cwd pins the directory it resolved to at start; after a deploy switched a
    ``current`` symlink, the new image must change back to the symlink to see new code.
    """
    cwd = os.getcwd()
    pwd = os.environ.get("PWD")
    if pwd and os.path.isdir(pwd) and os.path.samefile(pwd, cwd):
        return pwd
    return cwd


def exec_self(state: State, cwd: str) -> None:
    """Replace this process's image with a fresh run of the same command line.

    Returns only if the exec failed, with everything restored as it was.
    """
    import json  # noqa: PLC0415 - see receive()

    payload = json.dumps(dataclasses.asdict(state))
    for fd in state.fds():
        os.set_inheritable(fd, True)
    # Signals that arrive during the exec stay pending until the new image has
    # installed its handlers and unblocks them.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, osproc.MASTER_SIGNALS)
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.chdir(cwd)
        os.environ[ENV_VAR] = payload
        _flush_logs()
        os.execv(sys.executable, argv)
    except OSError:
        LOG.exception("code reload failed: could not exec %s", argv)
        os.environ.pop(ENV_VAR, None)
        for fd in state.fds():
            os.set_inheritable(fd, False)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
