"""Operations on a real consumerd with real brokers: worker recycling, metrics and the
health endpoints, and configuration re-read on SIGHUP."""

import json
import os
import signal
import urllib.error
import urllib.request

from tests.consumer.conftest import free_port, publish_many, wait_for


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_recycled_workers_lose_and_duplicate_nothing(consumerd, broker, name) -> None:
    total = 600
    consumerd.configure([{"name": name, "prefetch": 20}])
    publish_many(broker.url, name, total)
    consumerd.start("--max-messages-per-worker", "100", workers=2)
    wait_for(lambda: len(consumerd.records()) >= total, 90, "all messages handled")
    ids = consumerd.ids()
    assert set(ids) == set(range(total))  # nothing lost
    assert max(ids.values()) == 1  # a recycled worker acked what it handled: no duplicates
    pids = {r.pid for r in consumerd.records()}
    assert len(pids) >= 5  # 600 messages / ~100 per worker life
    assert consumerd.logged("recycling worker") >= 4
    assert consumerd.stop() == 0
    assert broker.depth(name) == 0 and broker.unacked() == 0


def test_metrics_readyz_and_healthz(consumerd, broker, name) -> None:
    port = free_port()
    consumerd.configure([{"name": name, "prefetch": 10}])
    consumerd.start("--metrics-port", str(port), "--metrics-address", "127.0.0.1", workers=2)
    wait_for(lambda: http_get(port, "/healthz")[0] == 200, 20, "/healthz")
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, 30, "/readyz ready")
    publish_many(broker.url, name, 50)
    wait_for(lambda: len(consumerd.records()) >= 50, 60, "messages handled")

    def counted() -> str | None:
        status, text = http_get(port, "/metrics")
        ok = status == 200 and metric(text, "consumerd_messages_acked_total", consumer=name) == 50
        return text if ok else None

    text = wait_for(counted, 10, "50 acked in /metrics")
    assert metric(text, "consumerd_messages_received_total", consumer=name) == 50
    assert metric(text, "consumerd_handler_duration_seconds_count", consumer=name) == 50
    assert metric(text, "consumerd_broker_connected") == 2
    # A killed worker is restarted and counted; readiness follows the respawn.
    victim = consumerd.workers()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in consumerd.workers() and len(consumerd.workers()) == 2, 20, "respawn"
    )
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, 30, "/readyz ready again")
    restarts = metric(http_get(port, "/metrics")[1], "consumerd_worker_restarts_total")
    assert restarts == 1
    assert consumerd.stop() == 0


def test_sighup_rereads_the_config_file(consumerd, broker, name, tmp_path) -> None:
    config = tmp_path / "consumerd.toml"
    config.write_text("workers = 1\n")
    consumerd.configure([{"name": name}])
    # The file sets workers; nothing on the command line overrides it.
    consumerd.start("--config", str(config), workers=None)
    consumerd.wait_workers(1)
    config.write_text("workers = 3\nlog-level = 'DEBUG'\n")
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_workers(3, timeout=20)
    config.write_text("workers = [not toml\n")
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged("configuration rejected")
    assert len(consumerd.workers()) == 3  # the running config stays
    assert consumerd.stop() == 0


def test_json_logs_carry_worker_fields(consumerd, broker, name) -> None:
    consumerd.configure([{"name": name}])
    consumerd.start("--log-format", "json", workers=1)
    consumerd.wait_logged("consuming")
    assert consumerd.stop() == 0
    with open(consumerd.log) as f:
        rows = [json.loads(line) for line in f if line.startswith("{")]
    assert rows and all({"time", "level", "message", "pid"} <= row.keys() for row in rows)
    assert any(row.get("worker_id") == 0 for row in rows)


def test_restarts_count_replaced_workers_not_a_scale_down(consumerd, broker, name) -> None:
    port = free_port()
    consumerd.configure([{"name": name}])
    consumerd.start("--metrics-port", str(port), "--metrics-address", "127.0.0.1", workers=3)
    consumerd.wait_workers(3)
    wait_for(lambda: http_get(port, "/metrics")[0] == 200, 20, "/metrics")

    def restarts() -> float:
        status, text = http_get(port, "/metrics")
        assert status == 200
        return metric(text, "consumerd_worker_restarts_total", service="consumer")

    def gone_after(action) -> int:
        """Run ``action``; wait until the master has reaped the one worker it ends. The
        hook runs in the same master loop step as the log line, and that loop serves the
        scrapes, so a scrape after the line sees the hook's count."""
        before = set(consumerd.workers())
        action()
        (gone,) = wait_for(lambda: before - set(consumerd.workers()), 20, "a worker gone")
        wait_for(
            lambda: (
                consumerd.logged(f"(pid {gone}) exited") + consumerd.logged(f"(pid {gone}) killed")
            ),
            20,
            "the master reaped it",
        )
        return gone

    assert restarts() == 0
    victim = consumerd.workers()[0]
    gone_after(lambda: os.kill(victim, signal.SIGKILL))
    consumerd.wait_workers(3)
    assert restarts() == 1
    gone_after(lambda: consumerd.signal(signal.SIGTTOU))
    consumerd.wait_workers(2)
    gone_after(lambda: consumerd.signal(signal.SIGTTOU))
    consumerd.wait_workers(1)
    assert consumerd.logged("exited with status 0") == 2  # the scale-downs, gracefully
    assert restarts() == 1
    (last,) = consumerd.workers()
    gone_after(lambda: os.kill(last, signal.SIGKILL))
    consumerd.wait_workers(1)
    assert restarts() == 2
    assert consumerd.stop() == 0


def _notify_socket(tmp_path, monkeypatch):
    """A systemd notify socket the master (started after this) reports to."""
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    received: list[str] = []

    def messages() -> list[str]:
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except BlockingIOError:
                return received

    return sock, messages


def test_all_workers_started_waits_for_a_broker(
    consumerd, broker, name, tmp_path, monkeypatch
) -> None:
    """Workers that cannot reach the broker are built but not started: no "all workers
    started", no READY=1; against the real broker both come after every worker consumes."""
    sock, messages = _notify_socket(tmp_path, monkeypatch)
    consumerd.configure([{"name": name}])
    consumerd.start(workers=2, url="redis://127.0.0.1:1/0")

    def retrying() -> set[str]:
        with open(consumerd.log) as f:
            return {line.split("[", 1)[1].split("]", 1)[0] for line in f if "unreachable (" in line}

    wait_for(lambda: len(retrying()) == 2, 30, "both workers retrying")
    # A barrier: the announcements the workers made before those retries (the master
    # reads its status pipe before it handles a signal) are handled once this is logged.
    consumerd.signal(signal.SIGTTIN)
    consumerd.wait_logged("SIGTTIN: now [3] workers")
    assert consumerd.logged("all workers started") == 0
    assert not any("READY=1" in m for m in messages())
    assert consumerd.stop() == 0

    unreachable_log = consumerd.logged("all workers started")
    consumerd.start(workers=2)
    consumerd.wait_logged("all workers started", unreachable_log + 1)
    with open(consumerd.log) as f:
        second_run = f.read().rsplit("SIGTTIN: now", 1)[1]
    started = second_run.index("all workers started")
    assert second_run[:started].count(f"consuming {name} from") == 2
    wait_for(lambda: any("READY=1" in m for m in messages()), 10, "READY=1")
    assert consumerd.stop() == 0
    sock.close()
