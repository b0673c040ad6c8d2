"""The master: one loop, in the main thread, that starts, watches and stops the workers.

Everything that happens to the master (a signal, a worker exiting, a worker announcing
itself, a call from another thread) wakes the loop through a file descriptor; between
events it sleeps in ``select()`` with no timeout unless a timer (a respawn back-off, the
shutdown deadline, the systemd watchdog) is due. Forks happen only in the loop, so only
in the main thread.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import multiprocessing.context
import multiprocessing.process
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import typing
import uuid
from multiprocessing.connection import Connection

from consumerd.supervisor import osproc, reexec, worker
from consumerd.supervisor.respawn import RespawnPolicy
from consumerd.supervisor.service import Service
from consumerd.supervisor.systemd import Notifier

LOG = logging.getLogger(__name__)

ServiceId = uuid.UUID
Slot = tuple[ServiceId, int]
OnTerminateHook = typing.Callable[[], None]
OnReloadHook = typing.Callable[[], None]
OnDeadWorkerHook = typing.Callable[[ServiceId, int, int], None]
#: Starts a child process that checks the code a re-exec would run (see add_preflight).
PreflightCheck = typing.Callable[[str], "subprocess.Popen[bytes]"]

#: How long workers get to obey SIGINT before they are killed.
FAST_STOP_GRACE = 1.0
#: How long a pre-flight check of a code reload may take before it counts as failed.
PREFLIGHT_TIMEOUT = 60.0


@dataclasses.dataclass
class _ServiceConfig:
    factory: typing.Callable[..., Service]
    workers: int
    args: tuple[typing.Any, ...]
    kwargs: dict[str, typing.Any]


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """One worker process as :meth:`ServiceManager.processes` reports it."""

    worker_id: int
    pid: int
    uptime: float
    announced: bool
    stopping: bool


@dataclasses.dataclass(eq=False)
class _WorkerProcess:
    service_id: ServiceId | None  # None: adopted from a code reload, its service is gone
    worker_id: int
    pid: int
    started_at: float
    process: multiprocessing.process.BaseProcess | None = None
    announced: bool = False
    #: The master asked it to stop or reload, so its exit is not a failed start.
    signalled: bool = False
    #: It was sent SIGTERM and no longer holds its slot.
    stopping: bool = False

    @property
    def slot(self) -> tuple[ServiceId | None, int]:
        return (self.service_id, self.worker_id)

    def poll(self) -> int | None:
        """Reap the process if it has exited; returns its exit code or -signal."""
        if self.process is not None:
            return self.process.exitcode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return -signal.SIGKILL  # reaped behind our back; nothing better is known
        return osproc.exit_status(status) if pid else None

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


def _check_callable(thing: object, name: str) -> None:
    if not callable(thing):
        raise TypeError(f"'{name}' must be a callable, not {thing!r}")


def _check_workers(workers: object) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"'workers' must be an int >= 1, not {workers!r}")
    return workers


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class ServiceManager:
    """Run services in worker processes and keep them running.

    A drop-in for ``cotyledon.ServiceManager``: :meth:`add` services, optionally
    :meth:`register_hooks`, then :meth:`run` the master loop in the main thread. Only one
    manager may exist in a process.

    Signals to the master: SIGTERM stops gracefully (exit 0), SIGINT stops at once
    (exit 1), SIGHUP reloads, SIGTTIN/SIGTTOU add/remove one worker of every service,
    SIGUSR2 reloads the code from disk keeping the master's PID.

    :param wait_interval: accepted for compatibility with cotyledon, which slept that
        long between two spawns; consumerd spawns without pausing and rate-limits only
        crash-looping workers, per worker slot (see :class:`RespawnPolicy`).
    :param graceful_shutdown_timeout: seconds workers get to stop on SIGTERM before they
        are killed; 0 waits for ever. A service may set its own.
    :param mp_context: a :mod:`multiprocessing` context to start workers with (e.g.
        ``get_context("spawn")``). The default is ``get_context("fork")`` whatever
        Python's default start method is (cotyledon 2.2 takes Python's default, which
        is ``forkserver`` on Linux from Python 3.14 and ``spawn`` on macOS): services,
        their arguments (an oslo.config ``ConfigOpts``) and hooks need not be picklable,
        and SIGUSR2 code reload works. With the fork method the master forks the worker
        itself (``os.fork()`` from its only thread), with any other it uses
        ``mp_context.Process``. :attr:`mp_context` is the context in use, never None.
    :param respawn_policy: how fast failed workers are respawned.
    """

    _created: typing.ClassVar[bool] = False

    def __init__(
        self,
        wait_interval: float = 0.01,
        graceful_shutdown_timeout: float = 60,
        mp_context: multiprocessing.context.BaseContext | None = None,
        *,
        respawn_policy: RespawnPolicy | None = None,
    ) -> None:
        if ServiceManager._created:
            raise RuntimeError("Only one instance of ServiceManager per application is allowed")
        ServiceManager._created = True
        self.wait_interval = wait_interval
        self.mp_context: multiprocessing.context.BaseContext = (
            mp_context or multiprocessing.get_context("fork")
        )
        self._graceful_shutdown_timeout = graceful_shutdown_timeout
        self._policy = respawn_policy or RespawnPolicy()
        self._services: dict[ServiceId, _ServiceConfig] = {}
        self._on_terminate: list[OnTerminateHook] = []
        self._on_reload: list[OnReloadHook] = []
        self._on_new_worker: list[worker.NewWorkerHook] = []
        self._on_dead_worker: list[OnDeadWorkerHook] = []
        self._preflights: list[PreflightCheck] = []
        self._checks: list[subprocess.Popen[bytes]] = []
        self._children: list[tuple[subprocess.Popen[bytes], typing.Callable[[int], None]]] = []
        self._check_deadline: float | None = None
        #: A code reload checked and due, waiting for the watched children to exit.
        self._exec_pending = False

        self._workers: dict[int, _WorkerProcess] = {}
        self._failures: collections.Counter[Slot] = collections.Counter()
        self._not_before: dict[Slot, float] = {}
        self._status_buffer = b""
        self._running_count = 0

        self._inherited = reexec.receive()
        if self._inherited is not None:
            self._death_r, self._death_w = self._inherited.death_pipe
            self._status_r, self._status_w = self._inherited.status_pipe
            self._ready = self._inherited.ready
        else:
            self._death_r, self._death_w = os.pipe()
            self._status_r, self._status_w = os.pipe()
            self._ready = False
        os.set_blocking(self._status_r, False)
        self._cwd = reexec.logical_cwd()

        self._wakeup = osproc.WakeupPipe()
        self._wakeup.install(osproc.MASTER_SIGNALS)
        # An earlier image blocked these across its exec; pending ones arrive now.
        osproc.unblock(osproc.MASTER_SIGNALS)
        self._notifier = Notifier()
        self._selector = selectors.DefaultSelector()
        self._readers: set[int] = set()
        self._calls: list[tuple[float, int, typing.Callable[[], None]]] = []
        self._call_order = itertools.count()
        self._main_thread = threading.get_ident()

        self._exit_code: int | None = None  # set once stopping
        self._stop_deadline: float | None = None
        self._shutdown_requested = False
        self._finished = threading.Event()
        self._rolling: collections.deque[_WorkerProcess] = collections.deque()
        self._replacement: _WorkerProcess | None = None
        self._next_watchdog: float | None = None

        osproc.set_title(f"{osproc.program_name()}: master process [{' '.join(sys.argv)}]")

    # -- public API ---------------------------------------------------------------------

    def register_hooks(
        self,
        on_terminate: OnTerminateHook | None = None,
        on_reload: OnReloadHook | None = None,
        on_new_worker: worker.NewWorkerHook | None = None,
        on_dead_worker: OnDeadWorkerHook | None = None,
    ) -> None:
        """Add hooks; each call adds to the earlier ones and hooks run in the order added.

        - ``on_terminate()``: in the master on SIGTERM, before workers are stopped.
        - ``on_reload()``: in the master on SIGHUP, before workers get SIGHUP; it may call
          :meth:`reconfigure`.
        - ``on_new_worker(service_id, worker_id, service)``: in the worker, once its
          service is built.
        - ``on_dead_worker(service_id, worker_id, exit_code)``: in the master, for each
          worker that exited (``exit_code`` is ``-signal`` if a signal killed it).

        A hook that raises is logged; the next hooks still run.
        """
        for name, hook in (
            ("on_terminate", on_terminate),
            ("on_reload", on_reload),
            ("on_new_worker", on_new_worker),
            ("on_dead_worker", on_dead_worker),
        ):
            if hook is not None:
                _check_callable(hook, name)
        if on_terminate is not None:
            self._on_terminate.append(on_terminate)
        if on_reload is not None:
            self._on_reload.append(on_reload)
        if on_new_worker is not None:
            self._on_new_worker.append(on_new_worker)
        if on_dead_worker is not None:
            self._on_dead_worker.append(on_dead_worker)

    def add_preflight(self, check: PreflightCheck) -> None:
        """Check the new code before a code reload (SIGUSR2) commits to it.

        ``check(cwd)`` must start a child process (a :class:`subprocess.Popen`) that
        loads what the re-executed master would load, from ``cwd`` (the directory the
        re-exec changes to, symlinks kept), and exits 0 if it would start. The master
        keeps serving meanwhile; it re-executes only once every check exited 0. Any
        other status, or no exit within ``PREFLIGHT_TIMEOUT`` seconds, cancels the
        reload with one log line: the running master and workers stay as they are.
        """
        _check_callable(check, "check")
        self._preflights.append(check)

    def add(
        self,
        service: typing.Callable[..., Service],
        workers: int = 1,
        args: typing.Iterable[typing.Any] | None = None,
        kwargs: dict[str, typing.Any] | None = None,
    ) -> ServiceId:
        """Add a service run by ``workers`` processes; returns its service id.

        Each worker builds it with ``service(worker_id, *args, **kwargs)``.
        """
        _check_callable(service, "service")
        service_id = uuid.uuid4()
        self._services[service_id] = _ServiceConfig(
            service, _check_workers(workers), tuple(args or ()), dict(kwargs or {})
        )
        self._wakeup.wake()
        return service_id

    def reconfigure(self, service_id: ServiceId, workers: int) -> None:
        """Change the number of workers of a service; extra workers are stopped at once."""
        config = self._services.get(service_id)
        if config is None:
            raise ValueError(f"{service_id} service id doesn't exist")
        config.workers = _check_workers(workers)
        self._wakeup.wake()

    def run(self) -> None:
        """Start the workers and supervise them until stopped; exits the process.

        Raises ``SystemExit``: 0 after a graceful stop, 1 after a fast one (SIGINT).
        Must be called from the main thread.
        """
        if self._inherited is not None:
            self._adopt(self._inherited)
        if self._notifier.watchdog_interval:
            self._next_watchdog = time.monotonic()
        try:
            code = self._loop()
        finally:
            self._finished.set()
        LOG.info("master exiting with status %d", code)
        raise SystemExit(code)

    def add_reader(self, fd: int, callback: typing.Callable[[], None]) -> None:
        """Call ``callback()`` in the master's loop whenever ``fd`` is readable.

        An extension beyond cotyledon, for master-side services (e.g. a health endpoint)
        that must not add threads to the master: a thread would be forked along with it.
        The callback must not block; an exception from it is logged.
        """
        self._selector.register(fd, selectors.EVENT_READ, callback)
        self._readers.add(fd)

    def call_at(self, when: float, callback: typing.Callable[[], None]) -> None:
        """Call ``callback()`` in the master's loop once ``time.monotonic()`` reaches ``when``.

        For the same master-side services as :meth:`add_reader`, from the loop itself.
        """
        heapq.heappush(self._calls, (when, next(self._call_order), callback))

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``."""
        self._selector.unregister(fd)
        self._readers.discard(fd)

    def processes(self) -> list[WorkerInfo]:
        """The worker processes now, by worker_id: what a status page shows."""
        now = time.monotonic()
        return sorted(
            (
                WorkerInfo(p.worker_id, p.pid, now - p.started_at, p.announced, p.stopping)
                for p in self._workers.values()
            ),
            key=lambda w: (w.worker_id, w.pid),
        )

    def watch_child(
        self, child: subprocess.Popen[bytes], on_exit: typing.Callable[[int], None]
    ) -> None:
        """Call ``on_exit(returncode)`` from the loop once ``child`` (started by the
        caller from the master's thread) has exited; the loop wakes on its SIGCHLD."""
        self._children.append((child, on_exit))
        self._wakeup.wake()  # it may have exited before it was watched

    def expected_workers(self) -> int:
        """How many workers the configuration asks for now, all services together."""
        return sum(config.workers for config in self._services.values())

    def will_respawn(self, service_id: ServiceId, worker_id: int) -> bool:
        """Whether slot ``worker_id`` of ``service_id`` is to get a new worker if its
        worker exits now: not while stopping, not once the slot is no longer configured
        (SIGTTOU, :meth:`reconfigure`), not while a successor already holds it (a code
        reload's replacement). From an ``on_dead_worker`` hook: was that death a restart?
        """
        slot = (service_id, worker_id)
        return (
            self._exit_code is None
            and self._wanted(slot)
            and not any(p.slot == slot and not p.stopping for p in self._workers.values())
        )

    def respawn_backoff(self) -> dict[ServiceId, float]:
        """Per service, the longest wait before a failed worker slot is respawned."""
        now = time.monotonic()
        waits = dict.fromkeys(self._services, 0.0)
        for (service_id, _), not_before in self._not_before.items():
            if service_id in waits:
                waits[service_id] = max(waits[service_id], not_before - now)
        return waits

    def shutdown(self) -> None:
        """Stop gracefully, as on SIGTERM.

        From another thread it returns once the workers are gone; from the master's own
        thread (a hook) it returns at once and the stop follows when the hook returns.
        """
        LOG.info("manager shutdown requested")
        self._shutdown_requested = True
        self._wakeup.wake()
        if threading.get_ident() != self._main_thread:
            self._finished.wait()

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> int:
        self._selector.register(self._wakeup.read_fd, selectors.EVENT_READ)
        self._selector.register(self._status_r, selectors.EVENT_READ)
        while True:
            self._reap()
            now = time.monotonic()
            self._run_timers(now)
            if self._checks:
                self._poll_checks(now)
            if self._exit_code is not None:
                if not self._workers:
                    return self._exit_code
            else:
                self._adjust(now)
            for key, _ in self._selector.select(self._timeout(time.monotonic())):
                if key.fd == self._status_r:
                    self._read_announcements()
                elif key.data is not None:
                    self._call_hook(key.data)
            for sig in self._wakeup.drain():
                self._on_signal(sig)
            if self._shutdown_requested:
                self._shutdown_requested = False
                self._begin_stop(graceful=True)

    def _timeout(self, now: float) -> float | None:
        deadlines = [self._next_watchdog] if self._next_watchdog is not None else []
        if self._calls:
            deadlines.append(self._calls[0][0])
        if self._check_deadline is not None:
            deadlines.append(self._check_deadline)
        if self._exit_code is None:
            deadlines.extend(t for t in self._not_before.values() if t > now)
        elif self._stop_deadline is not None:
            deadlines.append(self._stop_deadline)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _run_timers(self, now: float) -> None:
        while self._calls and self._calls[0][0] <= now:
            self._call_hook(heapq.heappop(self._calls)[2])
        if self._next_watchdog is not None and now >= self._next_watchdog:
            self._notifier.watchdog()
            self._next_watchdog = now + typing.cast(float, self._notifier.watchdog_interval)
        if self._stop_deadline is not None and now >= self._stop_deadline:
            self._stop_deadline = None
            for proc in self._workers.values():
                LOG.warning(
                    "worker %d (pid %d) did not stop in time, killing it", proc.worker_id, proc.pid
                )
                proc.send(signal.SIGKILL)

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGTERM:
            self._begin_stop(graceful=True)
        elif sig == signal.SIGINT:
            self._begin_stop(graceful=False)
        elif self._exit_code is not None:
            return  # stopping: nothing else matters
        elif sig == signal.SIGHUP:
            self._reload()
        elif sig in (signal.SIGTTIN, signal.SIGTTOU):
            step = 1 if sig == signal.SIGTTIN else -1
            for config in self._services.values():
                config.workers = max(1, config.workers + step)
            LOG.info(
                "%s: now %s workers",
                signal.Signals(sig).name,
                [c.workers for c in self._services.values()],
            )
        elif sig == signal.SIGUSR2:
            self._reload_code()

    # -- starting and stopping workers ------------------------------------------------

    def _adjust(self, now: float) -> None:
        """Make the running workers match the configuration."""
        held = {p.slot for p in self._workers.values() if not p.stopping}
        for service_id, config in self._services.items():
            for worker_id in range(config.workers):
                slot = (service_id, worker_id)
                if slot not in held and self._not_before.get(slot, 0.0) <= now:
                    self._spawn(service_id, worker_id)
        for proc in list(self._workers.values()):
            if not proc.stopping and not self._wanted(proc.slot):
                LOG.info(
                    "stopping worker %d (pid %d): no longer configured", proc.worker_id, proc.pid
                )
                self._stop(proc)
        self._advance_rolling(now)

    def _wanted(self, slot: tuple[ServiceId | None, int]) -> bool:
        service_id, worker_id = slot
        config = self._services.get(service_id) if service_id is not None else None
        return config is not None and worker_id < config.workers

    def _stop(self, proc: _WorkerProcess, sig: int = signal.SIGTERM) -> None:
        proc.stopping = proc.signalled = True
        proc.send(sig)

    def _spawn(self, service_id: ServiceId, worker_id: int) -> _WorkerProcess:
        config = self._services[service_id]
        method = self.mp_context.get_start_method()
        spec = worker.WorkerSpec(
            factory=config.factory,
            args=config.args,
            kwargs=config.kwargs,
            service_id=service_id,
            worker_id=worker_id,
            graceful_shutdown_timeout=self._graceful_shutdown_timeout,
            new_worker_hooks=list(self._on_new_worker),
            death_pipe=self._death_r,
            status_pipe=self._status_w,
            master_pid=None if method == "forkserver" else os.getpid(),
            inherited_fds=self._master_fds() if method == "fork" else (),
        )
        process = None
        if method == "forkserver":
            # Started under the mask below, the server would never see SIGCHLD and so
            # never report its children's exits.
            import multiprocessing.forkserver  # noqa: PLC0415 - rarely used; lean start

            multiprocessing.forkserver.ensure_running()
        with osproc.signals_blocked(osproc.MASTER_SIGNALS):
            if method == "fork":
                pid = os.fork()
                if pid == 0:
                    worker.main(spec)
            else:
                # multiprocessing passes Connections on to spawned children itself.
                spec.death_pipe = Connection(os.dup(self._death_r), writable=False)
                spec.status_pipe = Connection(os.dup(self._status_w), readable=False)
                process = self.mp_context.Process(  # type: ignore[attr-defined]
                    target=worker.main, args=(spec,), name=f"worker({worker_id})"
                )
                process.start()
                spec.death_pipe.close()
                spec.status_pipe.close()
                pid = process.pid
                self._selector.register(process.sentinel, selectors.EVENT_READ)
        proc = _WorkerProcess(service_id, worker_id, pid, time.monotonic(), process)
        self._workers[pid] = proc
        LOG.debug("started worker %d (pid %d)", worker_id, pid)
        return proc

    def _master_fds(self) -> tuple[int, ...]:
        """Descriptors a forked worker inherits but must not keep."""
        fds = [
            self._death_w,
            self._status_r,
            self._wakeup.read_fd,
            self._wakeup.write_fd,
            self._selector.fileno(),
        ]
        notify_fd = self._notifier.fileno()
        if notify_fd is not None:
            fds.append(notify_fd)
        return tuple(fds)

    def _reap(self) -> None:
        for proc in list(self._workers.values()):
            code = proc.poll()
            if code is not None:
                self._on_exit(proc, code)
        if os.getpid() == 1:
            self._reap_adopted()
        for child, on_exit in list(self._children):
            code = child.poll()
            if code is not None:
                self._children.remove((child, on_exit))
                self._call_hook(on_exit, code)
        if self._exec_pending and not self._children:
            self._exec_pending = False
            if self._exit_code is None:  # not stopping meanwhile
                self._exec()

    def _reap_adopted(self) -> None:
        """As PID 1, reap the orphans the kernel hands us, leaving our workers to _reap."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            children = [*self._checks, *(child for child, _ in self._children)]
            check = next((c for c in children if c.pid == info.si_pid), None)
            if check is not None:
                check.poll()  # reaps it; _poll_checks reads its status
                continue
            proc = self._workers.get(info.si_pid)
            if proc is None:
                os.waitpid(info.si_pid, 0)
                LOG.debug("reaped adopted process %d", info.si_pid)
                continue
            code = proc.poll()
            if code is None:
                return
            self._on_exit(proc, code)

    def _on_exit(self, proc: _WorkerProcess, code: int) -> None:
        del self._workers[proc.pid]
        if proc.process is not None:
            self._selector.unregister(proc.process.sentinel)
            proc.process.close()
        runtime = time.monotonic() - proc.started_at
        LOG.info(
            "worker %d (pid %d) %s after %.2fs", proc.worker_id, proc.pid, _describe(code), runtime
        )
        if proc.service_id is not None:
            for hook in self._on_dead_worker:
                self._call_hook(hook, proc.service_id, proc.worker_id, code)
        self._update_status()
        if self._exit_code is not None or proc.service_id is None or not self._wanted(proc.slot):
            return
        slot = (proc.service_id, proc.worker_id)
        if self._policy.is_failed_start(runtime, proc.signalled, code):
            self._failures[slot] += 1
            delay = self._policy.delay(self._failures[slot])
            self._not_before[slot] = time.monotonic() + delay
            LOG.warning(
                "worker %d %s %.2fs after start (failed start #%d): respawning in %.2fs",
                proc.worker_id,
                _describe(code),
                runtime,
                self._failures[slot],
                delay,
            )
        else:
            self._failures.pop(slot, None)
            self._not_before.pop(slot, None)

    def _read_announcements(self) -> None:
        try:
            self._status_buffer += os.read(self._status_r, 4096)
        except BlockingIOError:
            return
        *lines, self._status_buffer = self._status_buffer.split(b"\n")
        for line in lines:
            proc = self._workers.get(int(line))
            if proc is not None:
                proc.announced = True
        self._update_status()

    def _update_status(self) -> None:
        running = sum(1 for p in self._workers.values() if p.announced and not p.stopping)
        if running == self._running_count:
            return
        self._running_count = running
        status = f"{running} workers running"
        if not self._ready and running >= sum(c.workers for c in self._services.values()):
            self._ready = True
            LOG.info("all workers started: %s", status)
            self._notifier.ready(status)
        else:
            self._notifier.status(status)

    # -- stop, reload, code reload -------------------------------------------------------

    def _begin_stop(self, graceful: bool) -> None:
        now = time.monotonic()
        if graceful:
            if self._exit_code is not None:
                return
            LOG.info("stopping gracefully")
            self._exit_code = 0
            self._notifier.stopping()
            for hook in self._on_terminate:
                self._call_hook(hook)
            if self._graceful_shutdown_timeout > 0:
                self._stop_deadline = now + self._graceful_shutdown_timeout
            for proc in self._workers.values():
                if not proc.stopping:
                    self._stop(proc)
        else:
            LOG.info("stopping at once")
            if self._exit_code is None:
                self._notifier.stopping()
            self._exit_code = 1
            self._stop_deadline = min(self._stop_deadline or float("inf"), now + FAST_STOP_GRACE)
            for proc in self._workers.values():
                self._stop(proc, signal.SIGINT)
        self._rolling.clear()
        self._replacement = None
        if self._checks:
            LOG.info("code reload cancelled: stopping")
            self._end_checks()

    def _reload(self) -> None:
        LOG.info("reloading")
        self._notifier.reloading()
        before = [p for p in self._workers.values() if not p.stopping]
        for hook in self._on_reload:
            self._call_hook(hook)
        # An operator's reload is the moment to retry failing slots without delay.
        self._failures.clear()
        self._not_before.clear()
        self._adjust(time.monotonic())
        for proc in before:
            if not proc.stopping:
                proc.signalled = True
                proc.send(signal.SIGHUP)
        self._notifier.ready(f"{self._running_count} workers running")

    def _reload_code(self) -> None:
        if self.mp_context.get_start_method() == "forkserver":
            LOG.error("code reload is not supported with the forkserver start method")
            return
        if self._checks or self._exec_pending:
            LOG.info("code reload: one is already under way")
            return
        self._notifier.reloading()
        if self._preflights:
            self._start_checks()
        else:
            self._exec_after_children()

    def _start_checks(self) -> None:
        for check in self._preflights:
            try:
                self._checks.append(check(self._cwd))
            except Exception as exc:
                LOG.error(
                    "code reload cancelled: its pre-flight check could not start (%s: %s); "
                    "the running master and workers stay",
                    type(exc).__name__,
                    exc,
                )
                self._end_checks()
                self._notifier.ready(f"{self._running_count} workers running")
                return
        self._check_deadline = time.monotonic() + PREFLIGHT_TIMEOUT
        LOG.info(
            "code reload: checking the new code from %s first (pid %s)",
            self._cwd,
            ", ".join(str(c.pid) for c in self._checks),
        )

    def _poll_checks(self, now: float) -> None:
        codes = [c.poll() for c in self._checks]
        failed = next((code for code in codes if code not in (None, 0)), None)
        if failed is None and None not in codes:
            self._end_checks()
            self._exec_after_children()
            return
        if failed is None and self._check_deadline is not None and now < self._check_deadline:
            return
        why = (
            _describe(failed)
            if failed is not None
            else f"did not finish within {PREFLIGHT_TIMEOUT:g}s"
        )
        LOG.error(
            "code reload cancelled: the new code failed its pre-flight check (%s); "
            "the running master and its %d workers stay",
            why,
            len(self._workers),
        )
        self._end_checks()
        self._notifier.ready(f"{self._running_count} workers running")

    def _end_checks(self) -> None:
        for check in self._checks:
            if check.poll() is None:
                check.kill()
                check.wait()
        self._checks.clear()
        self._check_deadline = None

    def _exec_after_children(self) -> None:
        """Re-execute now, or once the children the master watches (see
        :meth:`watch_child`) have exited: the new image would not know them, and what
        they were started for would never hear how they ended."""
        if self._children:
            self._exec_pending = True
            LOG.info(
                "code reload: waiting for pid %s, started by the master, to exit first",
                ", ".join(str(child.pid) for child, _ in self._children),
            )
            return
        self._exec()

    def _exec(self) -> None:
        LOG.info("reloading code: re-executing the master, pid %d is kept", os.getpid())
        index = {service_id: i for i, service_id in enumerate(self._services)}
        state = reexec.State(
            death_pipe=(self._death_r, self._death_w),
            status_pipe=(self._status_r, self._status_w),
            ready=self._ready,
            workers=tuple(
                reexec.AdoptedWorker(
                    service_index=index.get(p.service_id, -1) if p.service_id else -1,
                    worker_id=p.worker_id,
                    pid=p.pid,
                    started_at=p.started_at,
                    stopping=p.stopping,
                )
                for p in self._workers.values()
            ),
        )
        reexec.exec_self(state, self._cwd)

    def _adopt(self, state: reexec.State) -> None:
        """Take over the workers of the image that re-executed into this one."""
        service_ids = list(self._services)
        for adopted in state.workers:
            known = 0 <= adopted.service_index < len(service_ids)
            proc = _WorkerProcess(
                service_ids[adopted.service_index] if known else None,
                adopted.worker_id,
                adopted.pid,
                adopted.started_at,
                announced=True,
                signalled=adopted.stopping,
                stopping=adopted.stopping,
            )
            self._workers[proc.pid] = proc
            if not proc.stopping:
                self._rolling.append(proc)
        LOG.info(
            "code reload: adopted %d workers, replacing them one at a time", len(self._rolling)
        )

    def _advance_rolling(self, now: float) -> None:
        """Replace adopted workers one at a time: start the new one, and once it has
        announced itself stop the old one and wait for it to exit."""
        while self._rolling:
            old = self._rolling[0]
            if old.pid not in self._workers:
                self._rolling.popleft()
                self._replacement = None
                if not self._rolling:
                    LOG.info("code reload complete")
                    self._notifier.ready(f"{self._running_count} workers running")
                continue
            if old.stopping:
                return
            if old.service_id is None:  # nothing to replace it with
                self._stop(old)
                return
            new = self._replacement
            if new is None or new.pid not in self._workers:
                if self._not_before.get((old.service_id, old.worker_id), 0.0) <= now:
                    self._replacement = self._spawn(old.service_id, old.worker_id)
                return
            if new.announced:
                self._stop(old)
            return

    def _call_hook(self, hook: typing.Callable[..., None], *args: typing.Any) -> None:
        try:
            hook(*args)
        except Exception:
            LOG.exception("hook %r raised", hook)
