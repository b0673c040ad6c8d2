"""Small Linux/POSIX process primitives the master and the workers share."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import signal
import socket
import sys
import typing

import setproctitle

_PR_SET_PDEATHSIG = 1

#: Signals the master handles through its loop.
MASTER_SIGNALS = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGUSR2,
        signal.SIGCHLD,
    }
)
#: Signals a worker handles through its loop; the master's others go back to their defaults.
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@functools.cache
def _libc() -> typing.Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # noqa: PLC0415 - only workers need it; keeps the master's start lean

    return ctypes.CDLL(None, use_errno=True)


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits.

    Returns False where the call does not exist (non-Linux); callers keep a portable
    fallback (a pipe whose EOF means the master is gone) for that case.
    """
    libc = _libc()
    return libc is not None and libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts: it is not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def parent_of(pid: int) -> int | None:
    """The parent pid of a live process, None if it is gone or cannot be read (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: fields resume after the last ')'.
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def host_id() -> str:
    """Names the pid namespace this process lives in, the same for every process of it
    and different on another host or container: the kernel's boot id plus the
    namespace's inode (hostnames repeat across hosts, namespace inodes across kernels)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:12]


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)


def program_name() -> str:
    return os.path.basename(sys.argv[0]) or "python"


@contextlib.contextmanager
def signals_blocked(signals: typing.Iterable[int]) -> typing.Iterator[None]:
    """Block ``signals`` for the duration, so a fork made inside cannot run the
    parent's handlers in the child: the child installs its own before unblocking."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unblock(signals: typing.Iterable[int]) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def _ignore_signal(signum: int, frame: object) -> None:
    """A Python-level handler is needed for the C handler to write to the wakeup fd;
    the signal itself is read back from the pipe by the owner's loop."""


class WakeupPipe:
    """A self-pipe fed by :func:`signal.set_wakeup_fd` and by :meth:`wake` from threads.

    Each received signal arrives as one byte holding its number; :meth:`wake` writes a
    zero byte, which :meth:`drain` does not report as a signal.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self, signals: typing.Iterable[int]) -> None:
        for sig in signals:
            signal.signal(sig, _ignore_signal)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.write_fd, b"\0")

    def drain(self) -> list[int]:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 4096):
                data += chunk
        return [sig for sig in data if sig]

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def exit_status(status: int) -> int:
    """A waitpid status as multiprocessing reports it: the exit code, or -signal."""
    return os.waitstatus_to_exitcode(status)


def flush_and_exit(code: int) -> typing.NoReturn:
    """Leave a worker process at once (no atexit, no inherited cleanup) after flushing logs."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def proc_stat(pid: int | str) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat from the state on (index 0 = state), None if no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return data.rpartition(b")")[2].split()


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot; 0 where /proc cannot say): with the
    pid, it names one process even after the pid is reused."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else 0


def running(pid: int, started: int = 0) -> bool:
    """Whether ``pid`` runs (not a zombie: exited, not reaped yet) and, given ``started``
    (its :func:`start_time`), is still that process, not a new one reusing the pid."""
    fields = proc_stat(pid)
    if fields is None:
        return pid_exists(pid) if not os.path.exists("/proc/self/stat") else False
    if fields[0] in (b"Z", b"X"):
        return False
    return not started or int(fields[19]) == started
