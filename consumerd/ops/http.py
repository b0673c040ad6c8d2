"""A tiny HTTP/1.0 responder for ``/metrics``, the probes and the web page, run by the master loop.

The master is single-threaded (a thread would be forked along with every worker), so the
responder never blocks: every socket is non-blocking and watched by a private selector
whose own descriptor the master's loop watches (``manager.add_reader(server.fileno(),
server.on_ready)``). One request per connection: read up to the end of the headers,
answer, close. A client that sends nothing or stops reading costs a descriptor, not a
stall: it is dropped ``budget`` seconds after it last made progress (checked whenever the
responder wakes up), or when ``max_connections`` newer ones push it out.

A flood of idle connections (a leaking client pool, a slowloris; measured: 300 from one
local client left /healthz at 2 of 20 answered) must not starve the liveness probe. A
request already sent when its connection is accepted is answered in the same turn. When
``max_connections`` are open, a new one pushes out an idle one (nothing received, nothing
waiting in its socket) of the peer holding the most connections, oldest first, but only
one open for :data:`GRACE` seconds at least: a client descheduled between its connect and
its send (a loaded machine) is not pushed out by a flood that reconnects faster than it
sends. While no connection can be pushed out the responder stops accepting until one can
(a ``call_at`` from the loop wakes it); new connections wait in the listen backlog, in
order, so a probe waits behind at most the flood's own connections.

``GET``/``HEAD`` go to ``routes``; ``POST`` to ``actions``, with a body of at most
:data:`MAX_BODY` bytes announced by ``Content-Length`` (no chunked bodies), received
within the same ``budget`` as the headers.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import http
import logging
import os
import selectors
import socket
import time
import typing
import weakref

LOG = logging.getLogger(__name__)
MAX_REQUEST = 8192
MAX_BODY = 16384
#: Connections accepted per turn of the loop; the others wait in the listen backlog.
ACCEPTS_PER_TURN = 16
#: Seconds a new connection has to send its request before a newer one may push it out.
GRACE = 0.25
#: The listen backlog (the kernel caps it at net.core.somaxconn): a flood's connections
#: wait there while the responder is full, so a probe's is queued, not dropped.
BACKLOG = 1024


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, head_only: bool) -> bytes:
        reason = http.HTTPStatus(self.status).phrase
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        head = (
            f"HTTP/1.0 {self.status} {reason}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            f"{extra}"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        return head if head_only else head + self.body


@dataclasses.dataclass(frozen=True)
class Request:
    """A POST: its headers (names in lower case) and body."""

    path: str
    headers: dict[str, str]
    body: bytes


Route = typing.Callable[[], Response]
Action = typing.Callable[[Request], Response]
#: ``gate(path, headers)``: a refusal for a request (headers' names in lower case), or None.
Gate = typing.Callable[[str, dict[str, str]], Response | None]
#: ``call_at(when, callback)``: have the loop call ``callback()`` at monotonic time ``when``.
CallAt = typing.Callable[[float, typing.Callable[[], None]], None]


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


@dataclasses.dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str
    opened: float
    #: The request must be in by then; while answering, each send that makes progress
    #: moves it: a client reading a large response slowly is not a stalled one.
    deadline: float
    received: bytearray = dataclasses.field(default_factory=bytearray)
    response: bytes = b""
    sent: int = 0

    @property
    def idle(self) -> bool:
        """Nothing received yet (its socket may hold bytes not read yet)."""
        return not self.received and not self.response


class HTTPResponder:
    """Serve ``routes`` (path → function returning a :class:`Response`) on ``host:port``.

    ``call_at`` is the loop's timer (``ServiceManager.call_at``); without one, whoever
    drives the responder must call :meth:`on_ready` now and then while it is full.
    ``gate`` sees every request before its route and may refuse it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        routes: collections.abc.Mapping[str, Route],
        *,
        actions: collections.abc.Mapping[str, Action] | None = None,
        budget: float = 2.0,
        max_connections: int = 256,
        call_at: CallAt | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.gate = gate
        self.actions = dict(actions or {})
        self.budget = budget
        self.max_connections = max_connections
        self._call_at = call_at
        #: While full with nothing to push out: when accepting may resume.
        self._resume_at: float | None = None
        self._selector = selectors.DefaultSelector()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(BACKLOG)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._connections: dict[int, _Connection] = {}
        # Forked workers inherit these descriptors; a worker holding a client's socket
        # would keep that connection open after the master closed it.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(ref))

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def fileno(self) -> int:
        """The descriptor that becomes readable when the responder has work to do."""
        return self._selector.fileno()

    def on_ready(self) -> None:
        """Do all the work there is, without blocking; the callback for ``add_reader``."""
        now = time.monotonic()
        self._expire(now)
        if self._resume_at is not None and now >= self._resume_at:
            self._resume()
        for key, events in self._selector.select(0):
            if key.fileobj is self._listener:
                self._accept(now)
            else:
                conn = self._connections.get(key.fd)
                if conn is not None:
                    self._serve(conn, events)

    def close(self) -> None:
        for conn in list(self._connections.values()):
            self._drop(conn)
        self._selector.close()
        self._listener.close()

    def forget(self) -> None:
        """Close this process's copies of the descriptors; the sockets' state is untouched."""
        for conn in self._connections.values():
            conn.sock.close()
        self._connections.clear()
        self._selector.close()
        self._listener.close()

    # -- connections -----------------------------------------------------------------

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of descriptors: free one, or the pending connection would keep the
                # listener readable and the master's loop spinning.
                if self._connections:
                    self._drop(min(self._connections.values(), key=lambda c: c.opened))
                return
            sock.setblocking(False)
            peer = str(address[0]) if isinstance(address, tuple) else ""
            conn = _Connection(sock, peer, now, now + self.budget)
            self._connections[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ)
            self._serve(conn, selectors.EVENT_READ)  # a probe's request is often there
            # Room is made only for a connection in hand: the backlog may be empty.
            while len(self._connections) > self.max_connections:
                if not self._make_room(now):
                    self._pause()
                    return

    def _make_room(self, now: float) -> bool:
        """Push out an idle connection past its grace (see the module's docstring)."""
        held = collections.Counter(c.peer for c in self._connections.values())
        candidates = sorted(
            (c for c in self._connections.values() if c.idle and now - c.opened >= GRACE),
            key=lambda c: (-held[c.peer], c.opened),
        )
        for conn in candidates:
            if _has_bytes(conn.sock):
                self._serve(conn, selectors.EVENT_READ)  # a late request, not an idle one
                if len(self._connections) < self.max_connections:
                    return True
                continue
            self._drop(conn)
            return True
        return False

    def _pause(self) -> None:
        """Stop accepting until a connection ends or the first one can be pushed out; the
        one just accepted stays, one over the limit."""
        conns = self._connections.values()
        self._resume_at = min(
            [c.opened + GRACE for c in conns if c.idle] + [c.deadline for c in conns]
        )
        self._selector.unregister(self._listener)
        if self._call_at is not None:
            self._call_at(self._resume_at, self.on_ready)

    def _resume(self) -> None:
        self._resume_at = None
        self._selector.register(self._listener, selectors.EVENT_READ)

    def _serve(self, conn: _Connection, events: int) -> None:
        if events & selectors.EVENT_READ and not conn.response:
            self._read(conn)
        if conn.response:
            self._write(conn)

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        conn.received += chunk
        found = _end_of_headers(conn.received)
        if found is None:
            if len(conn.received) > MAX_REQUEST:
                self._respond(conn, text(431, "request headers too large"), head_only=False)
            return
        end, body_start = found
        head = bytes(conn.received[:end])
        method, path = _request_line(head)
        response = self.gate(path, _headers(head)) if self.gate is not None else None
        if response is None:
            response = self._route(conn, method, path, head, body_start)
        if response is not None:  # else more of a POST's body is to come
            self._respond(conn, response, head_only=method == "HEAD")

    def _route(
        self, conn: _Connection, method: str, path: str, head: bytes, body_start: int
    ) -> Response | None:
        if method == "POST":
            return self._post(conn, path, head, body_start)
        if method not in ("GET", "HEAD"):
            return text(405, "only GET, HEAD and POST")
        return self._call(method, path, self.routes.get(path))

    def _post(self, conn: _Connection, path: str, head: bytes, body_start: int) -> Response | None:
        """The answer to a POST, or None while its body is not all in."""
        headers = _headers(head)
        if "transfer-encoding" in headers:
            return text(411, "send a Content-Length, not a chunked body")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return text(400, "bad Content-Length")
        if not 0 <= length <= MAX_BODY:
            return text(413, f"request body larger than {MAX_BODY} bytes")
        if len(conn.received) < body_start + length:
            return None
        body = bytes(conn.received[body_start : body_start + length])
        action = self.actions.get(path)
        return self._call("POST", path, action and (lambda: action(Request(path, headers, body))))

    def _call(self, method: str, path: str, route: Route | None) -> Response:
        if route is None:
            return text(404, "not found")
        try:
            return route()
        except Exception:
            LOG.exception("%s %s failed", method, path)
            return text(500, "internal error, see the master's log")

    def _respond(self, conn: _Connection, response: Response, head_only: bool) -> None:
        conn.response = response.encode(head_only)
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)

    def _write(self, conn: _Connection) -> None:
        try:
            conn.sent += conn.sock.send(memoryview(conn.response)[conn.sent :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.deadline = time.monotonic() + self.budget
        if conn.sent == len(conn.response):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self._drop(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._connections.values() if now > c.deadline]:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        self._connections.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        if self._resume_at is not None:
            self._resume()


def _forget_in_child(ref: weakref.ref[HTTPResponder]) -> None:
    responder = ref()
    if responder is not None:
        responder.forget()


def _has_bytes(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset by the peer: reading it will drop it


def _end_of_headers(data: bytearray) -> tuple[int, int] | None:
    """Where the headers end and where the body starts, if they have ended."""
    for terminator in (b"\r\n\r\n", b"\n\n"):
        end = data.find(terminator)
        if end >= 0:
            return end, end + len(terminator)
    return None


def _headers(head: bytes) -> dict[str, str]:
    """The header fields after the request line, names in lower case."""
    found = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return found


def _request_line(head: bytes) -> tuple[str, str]:
    """``(method, path)`` of the request, query string dropped; ``("", "")`` if garbled."""
    line = head.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split()
    if len(parts) < 2:
        return "", ""
    return parts[0].upper(), parts[1].split("?", 1)[0]
