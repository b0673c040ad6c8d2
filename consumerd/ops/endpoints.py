"""The master's operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one port,
and the web page (:mod:`consumerd.ops.web`) when one is given.

``serve(manager, host, port, metrics, expected_workers=...)`` binds the port and hands the
responder to the master loop; nothing else is needed.
"""

from __future__ import annotations

import typing

from consumerd.ops.http import HTTPResponder, Response, Route, text
from consumerd.ops.metrics import MasterMetrics

if typing.TYPE_CHECKING:
    from consumerd.ops.web import Web

EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Loop(typing.Protocol):
    def add_reader(self, fd: int, callback: typing.Callable[[], None]) -> None: ...

    def call_at(self, when: float, callback: typing.Callable[[], None]) -> None: ...


def routes(
    metrics: MasterMetrics,
    expected_workers: typing.Callable[[], int] | None = None,
    before_scrape: typing.Callable[[], None] | None = None,
) -> dict[str, Route]:
    """The three routes.

    ``expected_workers()`` is how many workers should be running now: ``/readyz`` fails
    while fewer report (a worker just forked has not said anything yet).
    ``before_scrape()`` refreshes master-side values (e.g. the respawn back-off) first.
    """

    def scrape() -> Response:
        if before_scrape is not None:
            before_scrape()
        return Response(200, metrics.exposition(), EXPOSITION_TYPE)

    def healthz() -> Response:
        # Answering at all proves it: the master's loop runs this.
        return text(200, "ok")

    def readyz() -> Response:
        ready, why = metrics.readiness(expected_workers() if expected_workers else None)
        return text(200 if ready else 503, why)

    return {"/metrics": scrape, "/healthz": healthz, "/readyz": readyz}


def serve(
    loop: _Loop,
    host: str,
    port: int,
    metrics: MasterMetrics,
    *,
    expected_workers: typing.Callable[[], int] | None = None,
    before_scrape: typing.Callable[[], None] | None = None,
    web: Web | None = None,
) -> HTTPResponder:
    """Bind ``host:port`` and serve the routes (and ``web``'s) from ``loop`` (a
    ``ServiceManager``)."""
    served = routes(metrics, expected_workers, before_scrape)
    if web is not None:
        served.update(web.routes())
    responder = HTTPResponder(
        host,
        port,
        served,
        actions=web.actions() if web is not None else None,
        call_at=loop.call_at,
        gate=web.gate if web is not None else None,
    )
    loop.add_reader(responder.fileno(), responder.on_ready)
    return responder
