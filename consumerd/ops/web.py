"""The web page at ``/`` on the metrics port: workers, queues, partitions, dead letters.

Served by the master's loop like ``/metrics`` (:mod:`consumerd.ops.http`: never blocked by
a slow client) and built only from what the master can read without a broker and without
kombu:

- workers: the manager's own table (pid, worker_id, uptime, started or stopping), the
  per-worker gauges of the metrics (connected, consuming), each live worker's counter file
  (messages settled: acked, retried or dead-lettered) and its in-flight record
  (:mod:`consumerd.consumer.deaths`: what it handles and since when);
- consumers: depths and the first dead letters from worker 0's sample
  (:mod:`consumerd.consumer.sampling`, a JSON file in the metrics directory: ``/api/state``
  marks the page watched, and worker 0 then samples every 2 s instead of every 15 s), and
  the message counters of all workers, from which the page draws rates;
- partitions: the holder of each partition's lease (:mod:`consumerd.consumer.ownership`).

``GET /api/state`` returns all of it as JSON; the page polls it every 2 s and keeps the
last 300 points (10 minutes) of each consumer's counters itself, for its chart of rates.
Nothing is kept in the master between polls but the state of the last action.

Actions: ``POST /api/dlq/replay`` and ``POST /api/dlq/purge`` with ``{"consumer": NAME,
"ids": [...]}`` or ``{"consumer": NAME, "all": true}``. Refused (403) unless the
``admin_token`` setting is set and the request carries it (``Authorization: Bearer …``,
compared in constant time); without a token configured the page is read-only.

Hosts: the page and its API answer only requests whose ``Host`` is an IP address,
``localhost`` (or a name under it) or a name in the ``web_hosts`` setting (421 otherwise).
A web page elsewhere can point a name of its own at 127.0.0.1 (DNS rebinding) and would
then read the dead letters as a same-origin page; its requests carry its own name. The master
runs the tested command, ``python -m consumerd.cli dlq replay|purge NAME …``, as a child
with the master's app and broker, its output in a file; the manager calls back when it
exits (:meth:`~consumerd.supervisor.ServiceManager.watch_child`) and ``/api/state`` shows
the outcome. One action at a time (409 while one runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import importlib.resources
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import typing

from consumerd.consumer import deaths, ownership, routing, sampling
from consumerd.consumer.app import App, ConsumerSpec
from consumerd.ops.http import Action, Request, Response, Route
from consumerd.ops.metrics import MasterMetrics

if typing.TYPE_CHECKING:
    from consumerd.supervisor.manager import WorkerInfo

#: Ids one request may name.
MAX_IDS = 500
#: The tail of an action's output kept for the page.
OUTPUT_SHOWN = 2000
#: A message id as an argument of the command: not an option; printable, which also keeps
#: out what an argv cannot carry (NUL) or encode (a lone surrogate).
_ID = re.compile(r"[^\s-][^\s]{0,199}")
_COUNTERS = {
    "consumerd_messages_received": "received",
    "consumerd_messages_acked": "acked",
    "consumerd_messages_retried": "retried",
    "consumerd_messages_dead_lettered": "dead_lettered",
}
_SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src data:; connect-src 'self'; frame-ancestors 'none'; form-action 'none'",
    ),
)


class Manager(typing.Protocol):
    def processes(self) -> list[WorkerInfo]: ...

    def watch_child(
        self, child: subprocess.Popen[bytes], on_exit: typing.Callable[[int], None]
    ) -> None: ...


@dataclasses.dataclass
class Site:
    """What the page is about: the app as the master loaded it, and where things are."""

    manager: Manager
    metrics: MasterMetrics
    app: App
    broker: str  # redacted, for showing
    lease_root: str
    scope: str  # of the in-flight records, see deaths.scope_of
    queues: typing.Callable[[], tuple[str, ...] | None]  # the live --queues setting
    token: typing.Callable[[], str | None]  # the live admin_token setting
    hosts: typing.Callable[[], tuple[str, ...]]  # the live web_hosts setting
    command: list[str]  # the dlq command line, up to the action
    env: dict[str, str]  # its environment

    def consumers(self) -> list[ConsumerSpec]:
        wanted = self.queues()
        return [s for n, s in self.app.consumers.items() if wanted is None or n in wanted]


@dataclasses.dataclass
class _Action:
    id: int
    what: str
    started: float
    state: str = "running"  # then "done" or "failed"
    output: str = ""
    ended: float | None = None


class Web:
    """The page's routes over a :class:`Site`."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self._action: _Action | None = None
        self._count = 0
        self._page = importlib.resources.files(__package__).joinpath("web.html").read_bytes()
        self._paths = frozenset(self.routes()) | frozenset(self.actions())  # what gate() guards

    def routes(self) -> dict[str, Route]:
        return {"/": self.page, "/api/state": self.state}

    def actions(self) -> dict[str, Action]:
        return {
            "/api/dlq/replay": lambda request: self.act("replay", request),
            "/api/dlq/purge": lambda request: self.act("purge", request),
        }

    def gate(self, path: str, headers: dict[str, str]) -> Response | None:
        """Refuse a request for the page or its API under a host name it does not know
        (see the module's docstring); the probes and /metrics answer whatever the name."""
        if path not in self._paths:
            return None
        host = _host_name(headers.get("host", ""))
        if not host or _known_host(host, self.site.hosts()):
            return None
        return _json(
            421,
            {
                "error": f"this page does not answer to the host name {host!r}: use an IP "
                "address or localhost, or add the name to the web_hosts setting"
            },
        )

    # -- reading ------------------------------------------------------------------------

    def page(self) -> Response:
        return Response(200, self._page, "text/html; charset=utf-8", _SECURITY_HEADERS)

    def state(self) -> Response:
        return _json(200, self.snapshot())

    def snapshot(self) -> dict[str, typing.Any]:
        site = self.site
        sampling.mark_watched(site.metrics.directory)
        sample = sampling.read_snapshot(site.metrics.directory) or {}
        processes = site.manager.processes()
        return {
            "time": time.time(),
            "app": site.app.name,
            "broker": site.broker,
            "read_only": not site.token(),
            "sampled_at": sample.get("sampled_at"),
            "workers": self._workers(processes),
            "consumers": self._consumers(sample.get("consumers") or {}, processes),
            "action": None if self._action is None else dataclasses.asdict(self._action),
        }

    def _workers(self, processes: list[WorkerInfo]) -> list[dict[str, typing.Any]]:
        gauges = self.site.metrics.workers()
        handled = self.site.metrics.settled()
        now = time.time()
        out = []
        for proc in processes:
            gauge = gauges.get(proc.pid)
            if proc.stopping:
                state = "stopping"
            elif gauge is None or not proc.announced:
                state = "starting"
            elif not gauge.connected:
                state = "no broker"
            else:
                state = "consuming" if gauge.consuming else "not consuming"
            in_hand = deaths.in_hand(self.site.lease_root, self.site.scope, proc.pid)
            out.append(
                {
                    "worker_id": proc.worker_id,
                    "pid": proc.pid,
                    "state": state,
                    "uptime": round(proc.uptime, 1),
                    "handled": handled.get(proc.pid, 0),
                    "in_hand": [
                        {"id": identity, "age": round(max(0.0, now - since), 1)}
                        for identity, since in in_hand
                    ],
                }
            )
        return out

    def _consumers(
        self, sampled: dict[str, typing.Any], processes: list[WorkerInfo]
    ) -> list[dict[str, typing.Any]]:
        totals = self.site.metrics.counters(_COUNTERS)
        worker_of = {proc.pid: proc.worker_id for proc in processes if not proc.stopping}
        leases = ownership.Leases(self.site.lease_root)
        out = []
        for spec in self.site.consumers():
            entry: dict[str, typing.Any] = {
                "name": spec.name,
                "dead_letter_queue": routing.dead_letter_queue(spec.name),
                "sampled": sampled.get(spec.name),
                "counters": {
                    short: totals.get((metric, spec.name), 0) for metric, short in _COUNTERS.items()
                },
                "partitions": None,
            }
            if spec.partitions:
                entry["partitions"] = []
                for queue in spec.queue_names:
                    pid = leases.holder(queue)
                    entry["partitions"].append(
                        {"queue": queue, "pid": pid, "worker_id": worker_of.get(pid or 0)}
                    )
            out.append(entry)
        return out

    # -- actions ------------------------------------------------------------------------

    def act(self, verb: str, request: Request) -> Response:
        token = self.site.token()
        if not token:
            return _json(403, {"error": "read-only: no admin token is configured"})
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            return _json(403, {"error": "wrong or missing admin token"})
        try:
            argv = self._arguments(verb, json.loads(request.body or b"null"))
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        if self._action is not None and self._action.state == "running":
            return _json(409, {"error": f"action {self._action.id} is still running"})
        self._count += 1
        action = _Action(self._count, " ".join(argv), time.time())
        out = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the child exits
        try:
            child = subprocess.Popen(
                [*self.site.command, *argv],
                env=self.site.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        except Exception as exc:  # OSError, or ValueError (a NUL in the environment): no leak
            out.close()
            return _json(500, {"error": f"could not start the command: {exc}"})
        self._action = action
        self.site.manager.watch_child(child, lambda code: self._finished(action, code, out))
        return _json(202, {"action": dataclasses.asdict(action)})

    def _arguments(self, verb: str, body: object) -> list[str]:
        """The ``dlq`` arguments for a request body; ValueError if it is not valid."""
        if not isinstance(body, dict):
            raise ValueError('expected {"consumer": NAME, "ids": [...]} or "all": true')
        name = body.get("consumer")
        if name not in {spec.name for spec in self.site.consumers()}:
            raise ValueError(f"no consumer {name!r}")
        ids = body.get("ids")
        if body.get("all") is True and ids is None:
            return [verb, name, "--all"]
        if (
            not isinstance(ids, list)
            or not 0 < len(ids) <= MAX_IDS
            or not all(isinstance(i, str) and _ID.fullmatch(i) and i.isprintable() for i in ids)
        ):
            raise ValueError(f'"ids": 1 to {MAX_IDS} message ids, or "all": true')
        return [verb, name, *ids]

    @staticmethod
    def _finished(action: _Action, code: int, out: typing.BinaryIO) -> None:
        with contextlib.closing(out):
            out.seek(max(0, out.seek(0, os.SEEK_END) - OUTPUT_SHOWN))
            action.output = out.read().decode("utf-8", "replace").strip()
        action.state = "done" if code == 0 else "failed"
        action.ended = time.time()


def dlq_command() -> list[str]:
    """The command line of ``consumerd dlq`` in this interpreter."""
    return [sys.executable, "-m", "consumerd.cli", "dlq"]


def _json(status: int, data: object) -> Response:
    return Response(
        status, json.dumps(data).encode(), "application/json", (("Cache-Control", "no-store"),)
    )


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, lower case, without its port or IPv6 brackets."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _known_host(host: str, names: tuple[str, ...]) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True  # a rebinding page has a name of its own, never an address
    host = host.rstrip(".")
    return (
        host == "localhost"
        or host.endswith(".localhost")  # browsers resolve these to loopback themselves
        or host in {name.lower().rstrip(".") for name in names}
    )
