"""The :class:`consumerd.Service` that hosts the consume loop in each worker process.

kombu is imported here only inside the worker (in ``__init__``, which the supervision core
calls after the fork): the master loads this module and the app but never kombu.
"""

from __future__ import annotations

import dataclasses
import logging
import typing

from consumerd.consumer import loading
from consumerd.consumer.app import App
from consumerd.consumer.settings import Settings
from consumerd.ops import config, logs
from consumerd.supervisor import Service

if typing.TYPE_CHECKING:
    from consumerd.consumer.loop import Loop

LOG = logging.getLogger("consumerd.consumer")


class ConsumerService(Service):
    """Worker ``worker_id``: consumes the app's queues (its partitions) until SIGTERM;
    SIGHUP re-reads the configuration and the app and rebinds without restarting."""

    name = "consumer"
    announces_ready = True  # once the loop consumes, not once built: see __init__

    def __init__(self, worker_id: int, settings: Settings) -> None:
        super().__init__(worker_id)
        from consumerd.consumer.loop import Loop  # noqa: PLC0415 - see the module docstring

        # A worker forked after a SIGHUP starts from the file as it is now.
        self.settings = _refreshed(settings)
        self.loop: Loop = Loop(self._load_app(), worker_id, self.settings, self._reload_app)
        self.loop.on_consuming = self.ready

    def _load_app(self, reload: bool = False) -> App:
        app = loading.load_app(self.settings.app_ref, reload=reload)
        wanted = self.settings.queues
        if wanted:
            missing = sorted(set(wanted) - set(app.consumers))
            if missing:
                LOG.warning("--queues names consumers the app does not declare: %s", missing)
            app.consumers = {n: s for n, s in app.consumers.items() if n in wanted}
        return app

    def _reload_app(self) -> App:
        return self._load_app(reload=True)

    def run(self) -> None:
        self.loop.run()
        if self.loop.recycle:
            raise SystemExit(0)  # the master replaces this worker with the same worker_id

    def terminate(self) -> None:
        timeout = self.settings.graceful_timeout
        # Return a little before the core's own deadline so the hand-back still runs.
        self.loop.stop(max(0.1, timeout - 0.5) if timeout > 0 else None)

    def reload(self) -> None:
        self.settings = self.loop.settings = _refreshed(self.settings)
        self.loop.reload()


def _refreshed(settings: Settings) -> Settings:
    """``settings`` with the live options re-read from the configuration layers."""
    if settings.options is None:
        return settings
    try:
        fresh = config.load(settings.options)
    except config.ConfigError as exc:
        LOG.error("configuration not reloaded, the running one stays: %s", exc)
        return settings
    logs.configure(fresh.log_level, fresh.log_format)
    return dataclasses.replace(
        settings,
        prefetch=fresh.prefetch,
        queues=fresh.queues,
        broker_down_limit=fresh.broker_down_limit,
        max_messages_per_worker=fresh.max_messages_per_worker,
        max_memory_per_worker=fresh.max_memory_per_worker,
    )
