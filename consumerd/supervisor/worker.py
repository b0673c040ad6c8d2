"""The worker side: what runs in each child process the master starts.

The main thread owns every signal and the exit; the service's ``run()``, ``terminate()``
and ``reload()`` run in threads and report back through the worker's wakeup pipe, so a
stuck ``terminate()`` can never keep the worker past its graceful timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import threading
import time
import typing
from multiprocessing.connection import Connection

from consumerd.supervisor import osproc
from consumerd.supervisor.service import Service

LOG = logging.getLogger(__name__)

#: A worker's status when service code raised.
EXIT_EXCEPTION = 2
#: A worker's status when it was stopped at once (SIGINT) or overran its graceful timeout.
EXIT_FORCED = 1

NewWorkerHook = typing.Callable[[typing.Any, int, Service], None]
#: A pipe end: a plain fd when forked, a Connection when multiprocessing passes it on.
PipeEnd = int | Connection


def _fileno(end: PipeEnd) -> int:
    return end.fileno() if isinstance(end, Connection) else end


#: How this process tells its master it is started; set in a worker process only.
_announce: typing.Callable[[], None] | None = None


def ready() -> None:
    """Announce this worker to the master (:meth:`Service.ready`); once, from any thread."""
    if _announce is not None:
        _announce()


@dataclasses.dataclass
class WorkerSpec:
    """Everything a worker process needs; picklable for the spawn and forkserver methods."""

    factory: typing.Callable[..., Service]
    args: tuple[typing.Any, ...]
    kwargs: dict[str, typing.Any]
    service_id: typing.Any
    worker_id: int
    graceful_shutdown_timeout: float
    new_worker_hooks: list[NewWorkerHook]
    #: Read end of a pipe only the master writes to: EOF means the master is gone.
    death_pipe: PipeEnd
    #: Write end of the pipe the worker announces itself on once its service is built.
    status_pipe: PipeEnd
    #: The pid the worker's parent must have; None when a fork server is the parent.
    master_pid: int | None
    #: The master's own descriptors, which a forked worker inherits and must close.
    inherited_fds: tuple[int, ...] = ()


def exit_code_of(exc: SystemExit) -> int:
    """The status the interpreter would exit with for ``exc``."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def main(spec: WorkerSpec) -> typing.NoReturn:
    """Entry point of a worker process; never returns."""
    code = EXIT_EXCEPTION
    for fd in spec.inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        code = _Worker(spec).serve()
    except SystemExit as exc:
        code = exit_code_of(exc)
    except BaseException:
        LOG.exception("worker %d of %s failed to start", spec.worker_id, spec.factory)
    osproc.flush_and_exit(code)


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._wakeup = osproc.WakeupPipe()
        self._wakeup.install(osproc.WORKER_SIGNALS)
        for sig in osproc.MASTER_SIGNALS - osproc.WORKER_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        orphaned = False
        if spec.master_pid is not None:
            osproc.set_parent_death_signal(signal.SIGTERM)
            # The master may have died before prctl(): then no signal will ever come.
            orphaned = os.getppid() != spec.master_pid
        # Signals sent since the fork were held by the master's mask; they reach our
        # handlers now, never the master's.
        osproc.unblock(osproc.MASTER_SIGNALS)

        self._lock = threading.Lock()
        self._exit_code: int | None = None
        self._deadline: float | None = None
        self._terminating = False
        self._announced = threading.Event()
        self.title = f"worker({spec.worker_id}) [{os.getpid()}]"  # until the service is built

        global _announce
        _announce = self._announce  # before the factory: a service may be ready in __init__
        self.service = spec.factory(spec.worker_id, *spec.args, **spec.kwargs)
        # Services that forget to call Service.__init__ still get their id.
        self.service.worker_id = spec.worker_id
        self.title = f"{self.service.name}({spec.worker_id}) [{os.getpid()}]"
        osproc.set_title(f"{osproc.program_name()}: {self.service.name} worker({spec.worker_id})")
        for hook in spec.new_worker_hooks:
            try:
                hook(spec.service_id, spec.worker_id, self.service)
            except Exception:
                LOG.exception("on_new_worker hook %r failed", hook)
        if orphaned:
            LOG.info("master is gone, stopping %s", self.title)
            self._begin_terminate()

    def serve(self) -> int:
        self._spawn(self._run_service, "run")
        if not getattr(self.service, "announces_ready", False):
            self._announce()  # cotyledon's meaning: built is started
        death_fd = _fileno(self._spec.death_pipe)
        with selectors.DefaultSelector() as selector:
            selector.register(self._wakeup.read_fd, selectors.EVENT_READ)
            selector.register(death_fd, selectors.EVENT_READ)
            while True:
                timeout = None
                if self._deadline is not None:
                    timeout = max(0.0, self._deadline - time.monotonic())
                for key, _ in selector.select(timeout):
                    if key.fd == death_fd and not os.read(death_fd, 1):
                        selector.unregister(death_fd)
                        LOG.info("master is gone, stopping %s", self.title)
                        self._begin_terminate()
                for sig in self._wakeup.drain():
                    self._on_signal(sig)
                if self._exit_code is not None:
                    return self._exit_code
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    LOG.warning(
                        "graceful shutdown timeout (%ss) exceeded, exiting %s now",
                        self._timeout(),
                        self.title,
                    )
                    return EXIT_FORCED

    def _announce(self) -> None:
        # Two threads may race past this check: a second line only repeats the first.
        if self._announced.is_set():
            return
        self._announced.set()
        try:
            os.write(_fileno(self._spec.status_pipe), f"{os.getpid()}\n".encode())
        except OSError:
            LOG.debug("could not announce %s to the master", self.title, exc_info=True)

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGTERM:
            if not self._terminating:  # a group signal and the master's both arrive
                LOG.info("caught SIGTERM, stopping %s gracefully", self.title)
            self._begin_terminate()
        elif sig == signal.SIGINT:
            LOG.info("caught SIGINT, exiting %s at once", self.title)
            self._finish(EXIT_FORCED)
        elif sig == signal.SIGHUP and not self._terminating:
            self._spawn(self._reload_service, "reload")

    def _timeout(self) -> float:
        own = self.service.graceful_shutdown_timeout
        return self._spec.graceful_shutdown_timeout if own is None else own

    def _begin_terminate(self) -> None:
        if self._terminating:
            return
        self._terminating = True
        timeout = self._timeout()
        if timeout > 0:
            self._deadline = time.monotonic() + timeout
        self._spawn(self._terminate_service, "terminate")

    def _finish(self, code: int) -> None:
        if self._exit_code is None:
            self._exit_code = code
        self._wakeup.wake()

    def _spawn(self, target: typing.Callable[[], None], what: str) -> None:
        threading.Thread(target=target, name=f"{self.title} {what}", daemon=True).start()

    def _guarded(self, method: typing.Callable[[], None], what: str) -> int | None:
        """Run a service method; returns an exit code if the worker must exit."""
        try:
            method()
        except SystemExit as exc:
            return exit_code_of(exc)
        except BaseException:
            LOG.exception("%s of %s raised", what, self.title)
            return EXIT_EXCEPTION
        return None

    def _run_service(self) -> None:
        code = self._guarded(self.service.run, "run()")
        if code is not None:
            self._finish(code)

    def _terminate_service(self) -> None:
        with self._lock:
            code = self._guarded(self.service.terminate, "terminate()")
        # Exit from here: handing the exit back to the main thread costs a wake-up and
        # GIL hand-offs between three threads (measured: +14% CPU per stopping worker).
        # The main thread still enforces the graceful deadline meanwhile.
        osproc.flush_and_exit(0 if code is None else code)

    def _reload_service(self) -> None:
        # A reload never runs beside another reload or a terminate().
        if not self._lock.acquire(blocking=False):
            return
        try:
            code = self._guarded(self.service.reload, "reload()")
        finally:
            self._lock.release()
        if code is not None:
            self._finish(code)
