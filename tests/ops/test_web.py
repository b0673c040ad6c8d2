"""The web page's server side without a broker: POST handling of the responder, and the
gate in front of the dead-letter actions (token, body, one action at a time, outcome)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import socket
import sys
import threading
import typing
import warnings

import pytest

from consumerd.consumer.app import App
from consumerd.ops import http, web


@pytest.fixture
def responder():
    """A responder with one action echoing the body, served by a thread of this test."""
    seen = []

    def echo(request: http.Request) -> http.Response:
        seen.append(request)
        return http.Response(200, request.body)

    server = http.HTTPResponder("127.0.0.1", 0, {}, actions={"/echo": echo})
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if select.select([server.fileno()], [], [], 0.05)[0]:
                server.on_ready()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server, seen
    stop.set()
    thread.join(5)
    server.close()


def exchange(server: http.HTTPResponder, *parts: bytes) -> bytes:
    with socket.create_connection(server.address, timeout=5) as sock:
        for part in parts:
            sock.sendall(part)
        return sock.makefile("rb").read()


def test_a_post_body_may_arrive_in_pieces(responder):
    server, seen = responder
    head = b"POST /echo HTTP/1.0\r\nContent-Length: 11\r\nAuthorization: Bearer x\r\n\r\n"
    reply = exchange(server, head + b"hello", b" world")
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"\r\n\r\nhello world")
    assert seen[0].headers["authorization"] == "Bearer x" and seen[0].body == b"hello world"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (f"Content-Length: {http.MAX_BODY + 1}", b"413"),
        ("Transfer-Encoding: chunked", b"411"),
        ("Content-Length: ten", b"400"),
    ],
)
def test_bodies_too_large_chunked_or_unannounced_are_refused(responder, headers, status):
    server, seen = responder
    reply = exchange(server, f"POST /echo HTTP/1.0\r\n{headers}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.0 " + status)
    assert seen == []


class FakeManager:
    def __init__(self) -> None:
        self.watched = []

    def processes(self):
        return []

    def watch_child(self, child, on_exit):
        self.watched.append((child, on_exit))

    def finish(self) -> None:
        """What the master's loop does when the child exits."""
        child, on_exit = self.watched.pop()
        on_exit(child.wait(10))


@pytest.fixture
def site():
    app = App("t")
    app.consumer("orders")(lambda body, message: None)
    app.consumer("other")(lambda body, message: None)
    token = {"value": "s3cret"}
    # The "command" prints its arguments, and fails when asked to purge.
    echo = "import sys; print(' '.join(sys.argv[1:])); sys.exit(sys.argv[1] == 'purge')"
    s = web.Site(
        manager=FakeManager(),
        metrics=None,
        app=app,
        broker="redis://",
        lease_root="/nonexistent",
        scope="t.0",
        queues=lambda: ("orders",),
        token=lambda: token["value"],
        hosts=lambda: ("consumerd.example.com",),
        command=[sys.executable, "-c", echo],
        env={},
    )
    s.token_value = token
    return s


@pytest.mark.parametrize(
    ("host", "answered"),
    [
        ("127.0.0.1:9100", True),
        ("10.1.2.3", True),
        ("[::1]:9100", True),
        ("localhost:9100", True),
        ("LocalHost", True),
        ("box.localhost:9100", True),
        ("consumerd.example.com:443", True),  # the web_hosts setting
        ("Consumerd.Example.Com.", True),
        (None, True),  # no Host: not a browser
        ("rebind.attacker.example:9100", False),
        ("localhost.attacker.example", False),
        ("127.0.0.1.attacker.example", False),
        ("example.com", False),
    ],
)
def test_the_page_answers_only_to_addresses_and_known_names(site, host, answered):
    """DNS rebinding: a page at attacker.example that points its name at 127.0.0.1 reads
    what a same-origin page may, unless the master refuses the name it sends."""
    page = web.Web(site)
    headers = {"host": host} if host is not None else {}
    for path in ("/", "/api/state", "/api/dlq/replay", "/api/dlq/purge"):
        refusal = page.gate(path, headers)
        assert (refusal is None) == answered, (path, host)
        if refusal is not None:
            assert refusal.status == 421 and b"web_hosts" in refusal.body
    # The probes and the scrape answer whatever the name: a kubelet sends the pod's IP,
    # a Prometheus its target's name.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert page.gate(path, headers) is None


def test_a_refused_host_never_reaches_the_route():
    called = []

    def route() -> http.Response:
        called.append(1)
        return http.text(200, "ok")

    def gate(path: str, headers: dict[str, str]) -> http.Response | None:
        return http.text(421, "no") if headers.get("host") == "evil" else None

    server = http.HTTPResponder("127.0.0.1", 0, {"/": route}, gate=gate)
    try:
        replies = []
        for host in (b"evil", b"127.0.0.1"):
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
                sock.setblocking(False)
                reply = b""
                while not reply.endswith(b"\n"):
                    select.select([server.fileno()], [], [], 0.05)
                    server.on_ready()
                    with contextlib.suppress(BlockingIOError):
                        reply += sock.recv(4096)
                replies.append(reply.split(b" ", 2)[1])
    finally:
        server.close()
    assert replies == [b"421", b"200"] and called == [1]


def post(page: web.Web, verb: str, body: object, auth: str | None = "Bearer s3cret"):
    headers = {"authorization": auth} if auth is not None else {}
    response = page.act(verb, http.Request(f"/api/dlq/{verb}", headers, json.dumps(body).encode()))
    return response.status, json.loads(response.body)


def test_without_a_configured_token_every_action_is_refused(site):
    site.token_value["value"] = None
    page = web.Web(site)
    for auth in (None, "Bearer ", "Bearer s3cret", "Bearer None"):
        assert post(page, "replay", {"consumer": "orders", "all": True}, auth) == (
            403,
            {"error": "read-only: no admin token is configured"},
        )
    assert site.manager.watched == []


@pytest.mark.parametrize(
    "auth", [None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret"]
)
def test_a_wrong_or_missing_token_is_refused(site, auth):
    page = web.Web(site)
    assert post(page, "replay", {"consumer": "orders", "all": True}, auth) == (
        403,
        {"error": "wrong or missing admin token"},
    )
    assert site.manager.watched == []


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"consumer": "nope", "all": True},
        {"consumer": "other", "all": True},  # not among --queues
        {"consumer": "orders"},
        {"consumer": "orders", "all": "yes"},
        {"consumer": "orders", "ids": []},
        {"consumer": "orders", "ids": ["--all"]},  # never an option of the command
        {"consumer": "orders", "ids": ["a b"]},
        {"consumer": "orders", "ids": [7]},
        {"consumer": "orders", "ids": ["x"] * (web.MAX_IDS + 1)},
    ],
)
def test_a_bad_body_is_refused(site, body):
    status, answer = post(web.Web(site), "replay", body)
    assert status == 400 and answer["error"]
    assert site.manager.watched == []


@contextlib.contextmanager
def no_file_left_open() -> typing.Iterator[None]:
    """Neither a descriptor more at the end nor a file closed only by the garbage
    collector (which would hide a leak that a kept traceback makes real)."""
    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == before


def test_an_id_no_argv_can_carry_is_refused_and_leaks_nothing(site):
    """A NUL or a lone surrogate passed the id pattern, then Popen raised ValueError: a
    500, and the output file of the action that never started stayed open."""
    page = web.Web(site)
    with no_file_left_open():
        for _ in range(20):
            for bad in ("id\x00x", "id\ud800", "id\x7f"):
                status, answer = post(page, "replay", {"consumer": "orders", "ids": [bad]})
                assert status == 400 and answer["error"], bad
    assert site.manager.watched == []


def test_a_command_that_cannot_start_closes_its_output_file(site):
    """Whatever Popen raises (here ValueError: a NUL in the environment), a 500 that
    says why, and no descriptor left behind."""
    site.env = {"BAD": "x\x00y"}
    page = web.Web(site)
    with no_file_left_open():
        for _ in range(20):
            status, answer = post(page, "replay", {"consumer": "orders", "all": True})
            assert status == 500 and "could not start the command" in answer["error"], answer
    assert site.manager.watched == []
    site.env = {}
    assert post(page, "replay", {"consumer": "orders", "all": True})[0] == 202  # not stuck
    site.manager.finish()


def test_an_action_runs_the_command_and_reports_its_outcome(site):
    page = web.Web(site)
    status, answer = post(page, "replay", {"consumer": "orders", "ids": ["id-1", "sha-2"]})
    assert status == 202 and answer["action"]["state"] == "running"
    assert answer["action"]["what"] == "replay orders id-1 sha-2"
    # One at a time: a second request waits for the first to end.
    assert post(page, "purge", {"consumer": "orders", "all": True})[0] == 409
    site.manager.finish()
    assert page._action.state == "done" and page._action.output == "replay orders id-1 sha-2"

    assert post(page, "purge", {"consumer": "orders", "all": True})[0] == 202
    site.manager.finish()
    assert page._action.state == "failed" and page._action.output == "purge orders --all"
    assert page._action.id == 2
