"""Queue depths for ``/metrics``: worker 0 samples them; the master never talks to a broker.

A daemon thread of worker 0 (only when metrics are on) asks the broker, through
:mod:`consumerd.consumer.inspection`, for the depths of each consumer's queues at start
and then every :data:`SAMPLE_EVERY` seconds — a bounded rate whatever the scrape rate
and the worker count — and writes them as ``consumerd_queue_messages{consumer, state}``
gauges in the multiprocess metrics, which the master serves:

- ``ready``: waiting in the consumer's queues (all partitions);
- ``unacked``: held by consumers — absent where the broker cannot tell (RabbitMQ while a
  consumer is attached), never a made-up 0;
- ``retry``: in ``<name>.retry`` (on RabbitMQ only the copies not held by a worker);
- ``dead``: in ``<name>.dlq``.

A failed sample is logged once per failure streak and retried at the next period.
"""

from __future__ import annotations

import logging
import threading
import typing

from consumerd.consumer import inspection, routing
from consumerd.consumer.app import App
from consumerd.ops import metrics

LOG = logging.getLogger("consumerd.consumer")

SAMPLE_EVERY = 15.0
"""Seconds between two samples."""


class DepthSampler:
    """Samples the queue depths of the app ``app()`` returns, on ``url``, until :meth:`stop`."""

    def __init__(
        self, app: typing.Callable[[], App], url: str, every: float = SAMPLE_EVERY
    ) -> None:
        self.app = app
        self.url = url
        self.every = every
        self._stopped = threading.Event()
        self._inspector: inspection.Inspector | None = None
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="consumerd-depths", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.sample()
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    LOG.warning(
                        "queue depths for /metrics: sampling failed (%s: %s); retrying every %gs",
                        type(exc).__name__,
                        exc,
                        self.every,
                    )
                self._failing = True
                self._close()
            self._stopped.wait(self.every)
        self._close()

    def _close(self) -> None:
        inspector, self._inspector = self._inspector, None
        if inspector is not None:
            try:
                inspector.close()
            except Exception as exc:  # closing a broken connection: nothing left to do
                LOG.debug("closing the depth inspector: %s", exc)

    def sample(self) -> None:
        if self._inspector is None:
            self._inspector = inspection.open_inspector(self.url)
        specs = list(self.app().consumers.values())
        names: list[str] = []
        for spec in specs:
            names += [
                *spec.queue_names,
                routing.retry_queue(spec.name),
                routing.dead_letter_queue(spec.name),
            ]
        depths = self._inspector.depths(names)
        for spec in specs:
            mine = [depths[q] for q in spec.queue_names]
            metrics.set_queue_messages(spec.name, "ready", sum(d.ready for d in mine))
            held = [d.unacked for d in mine]
            if all(h is not None for h in held):
                metrics.set_queue_messages(spec.name, "unacked", sum(h or 0 for h in held))
            retry = depths[routing.retry_queue(spec.name)]
            metrics.set_queue_messages(spec.name, "retry", retry.ready + (retry.unacked or 0))
            metrics.set_queue_messages(
                spec.name, "dead", depths[routing.dead_letter_queue(spec.name)].ready
            )
