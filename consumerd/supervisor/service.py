"""The unit of work a :class:`~consumerd.ServiceManager` runs in each worker process."""

from __future__ import annotations

import os
import signal
import typing


class Service:
    """Base class for a service run by a :class:`~consumerd.ServiceManager`.

    Each worker process builds one instance with ``factory(worker_id, *args, **kwargs)``.
    ``worker_id`` is stable: with N workers the ids are exactly ``0..N-1`` and a respawned
    worker gets the id of the one it replaces, so it can be used to split work.

    Override any of :meth:`run`, :meth:`terminate` and :meth:`reload`. An exception raised
    by any of them is logged and the worker exits with status 2.
    """

    name: typing.ClassVar[str | None] = None
    """Shown in the process title and logs next to the worker_id; defaults to the class name."""

    graceful_shutdown_timeout: typing.ClassVar[int | float | None] = None
    """Seconds :meth:`terminate` may take: ``None`` means the manager's, ``0`` for ever."""

    announces_ready: typing.ClassVar[bool] = False
    """False (as in cotyledon): the worker counts as started as soon as the service is
    built. True: only once the service calls :meth:`ready`, e.g. when it reached what it
    serves. The master says "all workers started" (and systemd READY=1) when every worker
    has, and a code reload stops an old worker only once its replacement has."""

    def __init_subclass__(cls, **kwargs: typing.Any) -> None:
        super().__init_subclass__(**kwargs)
        # Each class is named after itself unless it names itself.
        if cls.__dict__.get("name") is None:
            cls.name = cls.__name__

    def __init__(self, worker_id: int) -> None:
        super().__init__()
        self.worker_id = worker_id

    def ready(self) -> None:
        """Tell the master this worker is started (see :attr:`announces_ready`).

        Safe from any thread and at any time, ``__init__`` included; only the first call
        counts. Outside a worker process it does nothing.
        """
        from consumerd.supervisor import worker  # noqa: PLC0415 - worker imports this module

        worker.ready()

    def run(self) -> None:
        """The service's activity, run in a thread of the worker.

        It may block for ever or return; when it returns the worker keeps waiting for a
        signal. If not overridden the worker only waits for a signal.
        """

    def terminate(self) -> None:
        """Stop gracefully; called on SIGTERM (and when the master dies).

        It has the service's graceful timeout to return; the worker then exits 0, or with
        ``n`` if this raises ``SystemExit(n)``.
        """

    def reload(self) -> None:
        """Reload on SIGHUP.

        If not overridden the worker stops gracefully and the master starts a fresh one
        with the same worker_id.
        """
        os.kill(os.getpid(), signal.SIGTERM)


Service.name = "Service"
