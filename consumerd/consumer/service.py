"""The :class:`consumerd.Service` that hosts the consume loop in each worker process.

kombu is imported here only inside the worker (in ``__init__``, which the supervision core
calls after the fork): the master loads this module and the app but never kombu.
"""

from __future__ import annotations

import typing

from consumerd.consumer import loading
from consumerd.consumer.settings import Settings
from consumerd.supervisor import Service

if typing.TYPE_CHECKING:
    from consumerd.consumer.loop import Loop


class ConsumerService(Service):
    """Worker ``worker_id``: consumes the app's queues (its partitions) until SIGTERM;
    SIGHUP re-reads the app and rebinds without restarting the process."""

    name = "consumer"

    def __init__(self, worker_id: int, settings: Settings) -> None:
        super().__init__(worker_id)
        from consumerd.consumer.loop import Loop  # noqa: PLC0415 - see the module docstring

        self.settings = settings
        app = loading.load_app(settings.app_ref)
        self.loop: Loop = Loop(app, worker_id, settings, self._reload_app)

    def _reload_app(self) -> typing.Any:
        return loading.load_app(self.settings.app_ref, reload=True)

    def run(self) -> None:
        self.loop.run()

    def terminate(self) -> None:
        timeout = self.settings.graceful_timeout
        # Return a little before the core's own deadline so the hand-back still runs.
        self.loop.stop(max(0.1, timeout - 0.5) if timeout > 0 else None)

    def reload(self) -> None:
        self.loop.reload()
