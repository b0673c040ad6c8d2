"""The responder on its own, driven by a select() loop like the master's, in this process."""

from __future__ import annotations

import contextlib
import select
import socket
import time

import pytest

from consumerd.ops.http import GRACE, HTTPResponder, Response, text


@pytest.fixture
def responder():
    server = HTTPResponder(
        "127.0.0.1",
        0,
        {
            "/big": lambda: Response(200, b"x" * (32 << 20)),
            "/ok": lambda: text(200, "ok"),
            "/boom": lambda: 1 / 0,
        },
        budget=1.0,
        max_connections=4,
    )
    yield server
    server.close()


def turn(server: HTTPResponder, timeout: float = 0.05) -> float:
    """One turn of a master loop; returns how long the responder's callback took.

    The callback runs on every turn, readable or not: it stands in for the loop's timer
    (``call_at``), which wakes a full responder when a connection may be pushed out.
    """
    select.select([server.fileno()], [], [], timeout)
    started = time.monotonic()
    server.on_ready()
    return time.monotonic() - started


def test_a_response_larger_than_the_socket_buffers_never_blocks_the_loop(responder):
    client = socket.create_connection(responder.address)
    client.setblocking(False)
    client.sendall(b"GET /big HTTP/1.0\r\n\r\n")
    received = bytearray()
    slowest = 0.0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        slowest = max(slowest, turn(responder))
        # The client reads only now and then; meanwhile the responder must not wait for it.
        try:
            chunk = client.recv(1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            break
        received += chunk
    client.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert len(body) == 32 << 20
    # Each wake-up sends what fits and returns; copying a few MB is all it may cost.
    assert slowest < 0.5


def test_a_failing_route_answers_500(responder):
    with socket.create_connection(responder.address) as client:
        client.sendall(b"GET /boom HTTP/1.0\r\n\r\n")
        client.settimeout(0)
        reply = b""
        while not reply.endswith(b"\n") or b"\r\n\r\n" not in reply:
            turn(responder)
            with contextlib.suppress(BlockingIOError):
                reply += client.recv(4096)
    assert reply.startswith(b"HTTP/1.0 500")


def test_connections_beyond_the_limit_push_out_the_oldest_after_their_grace(responder):
    clients = []
    connected = []
    for _ in range(6):
        clients.append(socket.create_connection(responder.address))
        connected.append(time.monotonic())
        clients[-1].setblocking(False)
    try:
        closed: dict[int, float] = {}
        deadline = time.monotonic() + 30
        while len(closed) < 2 and time.monotonic() < deadline:
            turn(responder)
            for i, client in enumerate(clients):
                if i not in closed:
                    with contextlib.suppress(BlockingIOError):
                        assert client.recv(1) == b""
                        closed[i] = time.monotonic()
        # The two oldest made room for the two newest, and neither before its grace: a
        # client that connects and has not sent yet keeps its connection that long.
        assert sorted(closed) == [0, 1]
        assert all(closed[i] - connected[i] >= GRACE for i in closed)
        with socket.create_connection(responder.address, timeout=5) as probe:
            probe.sendall(b"GET /ok HTTP/1.0\r\n\r\n")
            probe.setblocking(False)
            reply = b""
            while not reply.endswith(b"ok\n"):
                turn(responder)
                with contextlib.suppress(BlockingIOError):
                    reply += probe.recv(4096)
        assert reply.startswith(b"HTTP/1.0 200")
    finally:
        for client in clients:
            client.close()


def test_an_ipv6_address_binds_an_ipv6_socket():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        server = HTTPResponder("::1", 0, {"/ok": lambda: text(200, "ok")})
    except OSError as exc:
        pytest.skip(f"::1 unavailable: {exc}")
    try:
        with socket.create_connection(("::1", server.address[1]), timeout=5) as client:
            client.sendall(b"GET /ok HTTP/1.0\r\n\r\n")
            client.setblocking(False)
            reply = b""
            while not reply.endswith(b"ok\n"):
                turn(server)
                with contextlib.suppress(BlockingIOError):
                    reply += client.recv(4096)
        assert reply.startswith(b"HTTP/1.0 200")
    finally:
        server.close()
