"""/metrics, /healthz and /readyz served by a real master to real HTTP clients."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time

import pytest

from consumerd.ops.http import GRACE
from tests.helpers import wait_for
from tests.ops.conftest import get, samples


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_readyz_flips_when_every_worker_is_connected_and_consuming(ops_master, start_method):
    master = ops_master(workers=2, start_method=start_method)
    master.wait_starts(2)
    assert master.get("/healthz") == (200, "ok\n")

    status, why = master.get("/readyz")
    assert status == 503 and "no broker connection" in why

    master.report(connected=True, consuming=False)
    wait_for(lambda: "not consuming" in master.get("/readyz")[1], 5, "connected, not consuming")
    assert master.get("/readyz")[0] == 503

    master.report(connected=True, consuming=True)
    status, why = wait_for(lambda: (r := master.get("/readyz"))[0] == 200 and r, 5, "ready")
    assert why == "2 workers connected and consuming\n"

    _, text = master.get("/metrics")
    assert samples(text, "consumerd_messages_received_total") == {'{consumer="orders"}': 200}

    # A worker losing its broker makes the whole master unready again.
    master.report(connected=False, consuming=True)
    wait_for(lambda: master.get("/readyz")[0] == 503, 5, "unready after disconnect")


def test_metrics_sum_all_workers_and_keep_counts_of_dead_ones(ops_master):
    master = ops_master(workers=2, counted=100)
    master.report(connected=True, consuming=True)
    first = master.wait_starts(2)

    _, text = master.get("/metrics")
    assert samples(text, "consumerd_messages_received_total") == {'{consumer="orders"}': 200}
    assert samples(text, "consumerd_messages_acked_total") == {'{consumer="orders"}': 200}
    assert samples(text, "consumerd_messages_retried_total") == {'{consumer="orders"}': 2}
    assert samples(text, "consumerd_handler_duration_seconds_count") == {'{consumer="orders"}': 200}
    assert samples(text, "consumerd_worker_restarts_total") == {'{service="ops"}': 0}
    assert len(samples(text, "consumerd_worker_consuming")) == 2

    # Kill both workers twice over: 6 starts in all, each recorded 100 messages.
    for round_ in (1, 2):
        for row in master.starts()[-2:]:
            os.kill(row["pid"], signal.SIGKILL)
        master.wait_starts(2 + 2 * round_)
    starts = master.wait_starts(6)
    wait_for(lambda: master.get("/readyz")[0] == 200, 10, "ready after respawns")

    _, text = master.get("/metrics")
    assert samples(text, "consumerd_messages_received_total") == {'{consumer="orders"}': 600}
    assert samples(text, "consumerd_messages_acked_total") == {'{consumer="orders"}': 600}
    assert samples(text, "consumerd_handler_duration_seconds_count") == {'{consumer="orders"}': 600}
    assert samples(text, "consumerd_worker_restarts_total") == {'{service="ops"}': 4}
    # Only the live workers appear in the per-worker gauges.
    live = {row["pid"] for row in starts[-2:]}
    consuming = samples(text, "consumerd_worker_consuming")
    assert {int(k.split('pid="')[1].split('"')[0]) for k in consuming} == live
    assert samples(text, "consumerd_messages_in_flight") == {'{consumer="orders"}': 0}

    # No file of a dead worker is left: theirs were folded into one archive per type.
    dead = {row["pid"] for row in first} | {row["pid"] for row in starts[2:4]}
    files = sorted(os.listdir(master.directory))
    assert not [f for f in files if any(f.endswith(f"_{pid}.db") for pid in dead)], files
    assert "counter_archive.db" in files and "histogram_archive.db" in files


def test_the_metrics_directory_is_removed_when_the_master_exits(ops_master):
    master = ops_master(workers=1)
    master.wait_starts(1)
    assert master.directory.is_dir()
    master.proc.send_signal(signal.SIGTERM)
    assert master.proc.wait(10) == 0
    assert not master.directory.exists()


def closed(sock: socket.socket) -> bool:
    """True once the peer closed ``sock`` (EOF), without blocking."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def test_a_stalled_client_does_not_stall_the_master(ops_master):
    master = ops_master(workers=1)
    [first] = master.wait_starts(1)
    opened = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", master.port))  # sends nothing
    partial = socket.create_connection(("127.0.0.1", master.port))
    partial.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n")  # never ends its headers
    # A client that asks for /metrics and never reads it, with a tiny receive window.
    greedy = socket.socket()
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    greedy.connect(("127.0.0.1", master.port))
    greedy.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    # A worker forked now inherits the open connections; it must not keep them open.
    os.kill(first["pid"], signal.SIGKILL)
    master.wait_starts(2)
    try:
        for _ in range(20):  # each within the probe's own timeout, while the others stall
            assert get(master.port, "/healthz", timeout=2) == (200, "ok\n")
        # The stalled ones are dropped once their budget (2 s) is spent, at the next wake-up.
        wait_for(
            lambda: get(master.port, "/healthz")[0] == 200 and closed(silent) and closed(partial),
            10,
            "stalled clients dropped",
        )
        assert time.monotonic() - opened >= 2.0
    finally:
        for sock in (silent, partial, greedy):
            sock.close()


def test_bad_requests_get_clear_statuses(ops_master):
    master = ops_master(workers=1)
    assert master.get("/nope")[0] == 404
    with socket.create_connection(("127.0.0.1", master.port), timeout=5) as sock:
        sock.sendall(b"PUT /metrics HTTP/1.0\r\n\r\n")
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.0 405")
    with socket.create_connection(("127.0.0.1", master.port), timeout=5) as sock:
        sock.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")  # a GET route takes no POST
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.0 404")
    with socket.create_connection(("127.0.0.1", master.port), timeout=5) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.0\r\n\r\n")
        reply = sock.makefile("rb").read()
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", master.port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"x" * 9000)
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.0 431")
    assert master.get("/healthz?verbose=1")[0] == 200


class Flood:
    """One local client holding ``count`` idle connections to ``port``, opening a new one
    each time the server drops one (as a leaking client pool or a slowloris does)."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.stopped = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        self.opened += 1
        return sock

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.count)]
        while not self.stopped.is_set():
            readable, _, _ = select.select(socks, [], [], 0.05)
            for sock in readable:  # readable while idle: the server closed it
                socks.remove(sock)
                sock.close()
                socks.append(self._open())
        for sock in socks:
            sock.close()

    def __enter__(self) -> Flood:
        self.thread.start()
        wait_for(lambda: self.opened >= self.count, 10, "the flood's connections")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(10)


def slow_probe(port: int, pause: float, timeout: float = 10) -> int:
    """GET /healthz from a client that is descheduled for ``pause`` seconds between its
    connect and its send, as a probe on a loaded node can be; the status it gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        time.sleep(pause)
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def test_healthz_answers_while_one_client_floods_the_port(ops_master):
    """300 idle connections from one local client (a leak, or a flood) must not starve the
    liveness probe: a Kubernetes pod is killed when /healthz stops answering. Half the
    probes wait a fifth of the responder's grace between connect and send: the flood
    reconnects far faster than that, and must not push them out."""
    master = ops_master(workers=1)
    master.wait_starts(1)
    with Flood(master.port, 300):
        started = time.monotonic()
        results: list[object] = []
        for i in range(20):
            try:
                if i % 2:
                    results.append(slow_probe(master.port, GRACE / 5))
                else:
                    results.append(get(master.port, "/healthz", timeout=10)[0])
            except OSError as exc:
                results.append(repr(exc))
        elapsed = time.monotonic() - started
    assert results == [200] * 20, results
    assert elapsed < 60  # generous: the point is that every probe is answered
