"""The :class:`consumerd.Service` that hosts the consume loop in each worker process.

kombu is imported here only inside the worker (in ``__init__``, which the supervision core
calls after the fork): the master loads this module and the app but never kombu.
"""

from __future__ import annotations

import logging
import typing

from consumerd.config import Config, ConfigError
from consumerd.consumer import loading
from consumerd.ops import logs
from consumerd.supervisor import Service

if typing.TYPE_CHECKING:
    from consumerd.consumer.loop import Loop

LOG = logging.getLogger("consumerd.consumer")


class ConsumerService(Service):
    """Worker ``worker_id``: consumes the app's queues (its partitions) until SIGTERM;
    SIGHUP re-reads the configuration and the app and rebinds without restarting.

    ``config`` is the master's :class:`~consumerd.config.Config` as it stood at the fork
    (a SIGHUP before it is already applied).
    """

    name = "consumer"
    announces_ready = True  # once the loop consumes, not once built: see __init__

    def __init__(self, worker_id: int, config: Config) -> None:
        super().__init__(worker_id)
        from consumerd.consumer.loop import Loop  # noqa: PLC0415 - see the module docstring

        self.config = config
        app = loading.load_app(typing.cast(str, config.settings.app))
        self.loop: Loop = Loop(loading.select(app, config.settings.queues), worker_id, config)
        self.loop.on_consuming = self.ready

    def run(self) -> None:
        self.loop.run()
        if self.loop.recycle:
            raise SystemExit(0)  # the master replaces this worker with the same worker_id

    def terminate(self) -> None:
        timeout = self.config.settings.graceful_timeout
        # Return a little before the core's own deadline so the hand-back still runs.
        self.loop.stop(max(0.1, timeout - 0.5) if timeout > 0 else None)

    def reload(self) -> None:
        """Re-read the configuration and re-import the app; on any error in either, log
        it and keep both as they run (the master checked the same way and kept its own)."""
        ref = typing.cast(str, self.config.settings.app)
        try:
            # First in a child: an app that calls os._exit() or crashes the interpreter
            # at import must not take this worker (and its messages in flight) with it.
            loading.check_in_child(ref)
            app = loading.load_app(ref, reload=True)
            change = self.config.reload(check=lambda fresh: loading.check_queues(app, fresh.queues))
        except (loading.AppLoadError, ConfigError) as exc:
            LOG.error("reload failed, the running configuration and consumers stay: %s", exc)
            return
        settings = self.config.settings
        if {"log_level", "log_format"} & change.applied.keys():
            logs.configure(settings.log_level, settings.log_format)
        self.loop.reload(loading.select(app, settings.queues))
