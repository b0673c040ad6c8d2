"""Broker flaps: a worker keeps its process, reconnects and resumes; nothing is lost."""

from __future__ import annotations

from tests.consumer.conftest import (
    Broker,
    Consumerd,
    RedisServer,
    publish_many,
    wait_for,
)

N = 1200


def test_redis_restart_mid_stream(tmp_path, name):
    server = RedisServer(tmp_path)
    server.start()
    consumerd = Consumerd(tmp_path, name, server.url + "?visibility_timeout=3")
    try:
        consumerd.configure([{"name": name, "sleep": 0.003, "prefetch": 50}])
        publish_many(server.url, name, N)
        consumerd.start(workers=2)
        pids = consumerd.wait_workers(2)
        wait_for(lambda: len(consumerd.ids()) >= 200, 30, "200 messages handled")
        server.stop()
        consumerd.wait_logged("lost the broker", 2)
        server.start()  # same port, same append-only file
        wait_for(lambda: len(consumerd.ids()) == N, 60, "all messages handled")
        assert sorted(consumerd.workers()) == sorted(pids)  # reconnected, not respawned
        assert consumerd.stop() == 0
        ids = consumerd.ids()
        assert set(ids) == set(range(N))
        assert sum(ids.values()) - N <= 2 * 51  # redelivered in-flight windows at most
        assert Broker("redis", server.url).depth(name) == 0
    finally:
        consumerd.kill()
        server.stop()


def test_connection_cut_mid_stream(consumerd, broker, proxy, name):
    """Every broker connection reset and refused for a while, then back."""
    options = {"visibility_timeout": 3} if broker.kind == "redis" else {}
    url = broker.consumer_url(proxy.port, **options)
    proxy.resume()
    consumerd.configure([{"name": name, "sleep": 0.003, "prefetch": 50}])
    publish_many(broker.url, name, N)
    consumerd.start(workers=2, url=url)
    pids = consumerd.wait_workers(2)
    wait_for(lambda: len(consumerd.ids()) >= 200, 30, "200 messages handled")
    proxy.cut()
    consumerd.wait_logged("lost the broker", 2)
    consumerd.wait_logged("unreachable", 2)  # retried while refused, with back-off
    proxy.resume()
    wait_for(lambda: len(consumerd.ids()) == N, 60, "all messages handled")
    assert sorted(consumerd.workers()) == sorted(pids)
    assert consumerd.stop() == 0
    ids = consumerd.ids()
    assert set(ids) == set(range(N))
    assert sum(ids.values()) - N <= 2 * 51
    assert broker.depth(name) == 0


def test_start_with_broker_down_waits_then_consumes(consumerd, broker, proxy, name):
    url = broker.consumer_url(proxy.port)
    consumerd.configure([{"name": name}])
    publish_many(broker.url, name, 50)
    consumerd.start(workers=1, url=url)
    consumerd.wait_logged("unreachable", 2)
    assert consumerd.ids() == {}
    proxy.resume()
    wait_for(lambda: len(consumerd.ids()) == 50, 30, "all messages handled")
    assert consumerd.stop() == 0


def test_broker_down_past_the_limit_exits_75_and_backs_off(consumerd, broker, proxy, name):
    url = broker.consumer_url(proxy.port)
    consumerd.configure([{"name": name}])
    consumerd.start("--broker-down-limit", "1", workers=1, url=url)
    # Each worker ran over the 1 s "healthy" mark before giving up, yet every exit 75
    # counts as a failure: the back-off grows instead of respawning at once each time.
    consumerd.wait_logged("(failed start #3)", timeout=60)
    with open(consumerd.log) as f:
        delays = [
            float(line.rsplit("respawning in ", 1)[1].rstrip("s\n"))
            for line in f
            if "exited with status 75" in line and "failed start #" in line
        ]
    assert len(delays) >= 3
    assert delays[0] < delays[2]  # #3's delay is at least #1's ceiling: 2x the minimum
    assert consumerd.proc.poll() is None  # the master stays up and respawns
    assert consumerd.stop() == 0
