"""Operations on a real consumerd with real brokers: worker recycling, metrics and the
health endpoints, and configuration re-read on SIGHUP."""

import json
import os
import re
import signal
import urllib.error
import urllib.request

from tests.consumer.conftest import free_port, publish_many, wait_for
from tests.helpers import pid_alive


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


def json_rows(path: str) -> list[dict[str, object]]:
    """Every line of a JSON-format log, parsed: a line that is not JSON fails the test."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"line {number} of the log is not JSON: {line!r}") from None
    return rows


def test_json_logs_carry_worker_and_message_fields(consumerd, broker, name) -> None:
    """Every line is JSON; a handler's lines carry its queue and message id, and two
    handlers running at once in one worker (threads) each carry their own."""
    import consumerd as consumerd_app

    consumerd.configure([{"name": name, "concurrency": 2, "prefetch": 2}], log=True, meet=2)
    consumerd.start("--log-format", "json", workers=1)
    consumerd.wait_logged("consuming")
    app = consumerd_app.App("publisher")
    app.configure(broker_url=broker.url)
    try:
        for i in range(2):
            app.publish(name, {"i": i}, message_id=f"id-{name}-{i}")
    finally:
        app.close()
    wait_for(lambda: len(consumerd.records()) == 2, 30, "both messages handled")
    assert consumerd.stop() == 0
    rows = json_rows(consumerd.log)
    assert all({"time", "level", "message", "pid"} <= row.keys() for row in rows)
    assert any(row.get("worker_id") == 0 for row in rows)
    handler_rows = [row for row in rows if row.get("logger") == "tapp"]
    # Each handler logged "handling i" as it began and "handled i" once both had begun.
    assert sorted(str(row["message"]) for row in handler_rows) == [
        "handled 0", "handled 1", "handling 0", "handling 1",
    ]  # fmt: skip
    for row in handler_rows:
        i = str(row["message"]).rsplit(" ", 1)[1]
        assert row["queue"] == name and row["message_id"] == f"id-{name}-{i}", row
        assert row["worker_id"] == 0
    (pid,) = {r.pid for r in consumerd.records()}
    assert {row["pid"] for row in handler_rows} == {pid}
    # Outside a handler there is no message context.
    consuming = [row for row in rows if str(row["message"]).startswith("consuming ")]
    assert consuming and all("queue" not in row for row in consuming)


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


def scrape(port: int) -> str:
    status, text = http_get(port, "/metrics")
    assert status == 200, (status, text)
    return text


def test_readyz_follows_a_real_broker_loss(consumerd, broker, proxy, name) -> None:
    """A real consumerd through a proxy we cut: /readyz says 503 and why while the
    workers have no broker, 200 once they are back; messages published before, during
    and after the outage are each handled exactly once."""
    port = free_port()
    proxy.resume()
    consumerd.configure([{"name": name, "prefetch": 10}])
    consumerd.start("--metrics-port", str(port), workers=2, url=broker.consumer_url(proxy.port))
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, 30, "/readyz ready")
    pids = consumerd.workers()
    publish_many(broker.url, name, 40)  # before
    wait_for(lambda: len(consumerd.records()) == 40, 30, "the first 40 handled")
    # Nothing in flight at the cut: what it proves is readiness and exactly-once
    # across a reconnect (a cut mid-handler redelivers, see test_flaps.py).
    wait_for(lambda: broker.unacked() == 0, 90, "every ack at the broker")
    proxy.cut()
    consumerd.wait_logged("lost the broker", 2)

    def not_ready() -> str | None:
        status, why = http_get(port, "/readyz")
        return why if status == 503 else None

    why = wait_for(not_ready, 30, "/readyz 503")
    found = re.fullmatch(r"worker [01] \(pid (\d+)\) has no broker connection", why.strip())
    assert found and int(found[1]) in pids, why
    assert metric(scrape(port), "consumerd_broker_connected") == 0
    publish_many(broker.url, name, 40, start=40)  # during: straight to the broker
    assert http_get(port, "/readyz")[0] == 503
    proxy.resume()
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, 60, "/readyz ready again")
    assert metric(scrape(port), "consumerd_broker_connected") == 2
    publish_many(broker.url, name, 40, start=80)  # after
    wait_for(lambda: len(consumerd.records()) >= 120, 60, "all 120 handled")
    assert sorted(consumerd.workers()) == sorted(pids)  # reconnected, not respawned
    assert consumerd.stop() == 0
    assert consumerd.ids() == dict.fromkeys(range(120), 1)  # each exactly once
    assert broker.depth(name) == 0 and broker.unacked() == 0


def test_metrics_count_a_known_run_exactly(consumerd, broker, name) -> None:
    """Counters of a real run: P messages handled at once, N failing once, M always
    failing with max_retries R (attempts 1..R retried, attempt R+1 dead-lettered), then K
    workers SIGKILLed. Counts are exact, and survive the deaths of the workers that made them."""
    plain, once, always, retries, kills = 10, 6, 4, 2, 3
    port = free_port()
    consumerd.configure([{"name": name, "prefetch": 10}], retries=retries, delay=0.05)
    consumerd.start("--metrics-port", str(port), workers=2)
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, 30, "/readyz ready")
    publish_many(broker.url, name, plain)
    publish_many(broker.url, name, once, start=plain, fail_until=1)
    publish_many(broker.url, name, always, start=plain + once, fail_until=10**6)
    wait_for(lambda: broker.depth(name + ".dlq") == always, 60, f"{always} dead letters")
    wait_for(lambda: len(consumerd.records()) == plain + once, 60, "the others handled")

    def counters() -> dict[str, float]:
        text = scrape(port)
        names = ("received", "acked", "retried", "dead_lettered")
        found = {n: metric(text, f"consumerd_messages_{n}_total", consumer=name) for n in names}
        found["restarts"] = metric(text, "consumerd_worker_restarts_total", service="consumer")
        return found

    expected = {
        "received": plain + 2 * once + always * (retries + 1),
        "acked": plain + once,
        "retried": once + always * retries,
        "dead_lettered": always,
        "restarts": 0,
    }
    # A dead letter is counted just after its publish: wait for the last count, then all.
    wait_for(lambda: counters()["dead_lettered"] == always, 10, "the last dead letter counted")
    assert counters() == expected
    assert len(consumerd.failures()) == once + always * (retries + 1)  # the handler's view
    for k in range(1, kills + 1):
        victim = consumerd.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda v=victim: not pid_alive(v), 10, "the victim dead")
        consumerd.wait_logged(f"(pid {victim}) killed by SIGKILL")
        consumerd.wait_workers(2)
        # The restart is counted in the loop step that logged the death; the killed
        # worker's message counts are folded into the archive, not lost.
        assert counters() == {**expected, "restarts": k}
    assert consumerd.stop() == 0


def test_respawn_backoff_of_a_crash_looping_worker(consumerd, broker, name) -> None:
    """A worker that cannot reach its broker exits 75 every second (--broker-down-limit 1):
    /metrics shows the pending back-off (> 0, at most the delay the master chose) and it
    grows; every death is a restart."""
    port = free_port()
    consumerd.configure([{"name": name}])
    consumerd.start(
        "--metrics-port", str(port), "--broker-down-limit", "1",
        workers=1, url=broker.consumer_url(free_port()),
    )  # fmt: skip
    seen: dict[int, float] = {}
    for n in range(1, 6):
        consumerd.wait_logged(f"(failed start #{n})", timeout=60)
        text = scrape(port)
        with open(consumerd.log) as f:
            (delay,) = [
                float(line.rsplit("respawning in ", 1)[1].rstrip("s\n"))
                for line in f
                if f"(failed start #{n})" in line
            ]
        seen[n] = metric(text, "consumerd_respawn_backoff_seconds", service="consumer")
        assert metric(text, "consumerd_worker_restarts_total", service="consumer") == n
        # Scraped right after the decision: pending, and no longer than the delay chosen
        # (logged to 0.01 s). From #2 on the delay is at least 0.5 s, far above the
        # scrape's latency.
        assert seen[n] <= delay + 0.005, (n, seen[n], delay)
        if n >= 2:
            assert seen[n] > 0, (n, seen[n], delay)
    # The n-th delay is at least half its ceiling (0.25 * 2**n): #5's (>= 4 s) is above
    # #3's largest (2 s), whatever the jitter; the margin is the scrape's latency.
    assert seen[5] > seen[3] > 0, seen
    assert consumerd.stop() == 0
