"""A broker that is full (Redis at maxmemory with noeviction) still drains: fetches and acks
free memory; only publishing fails, and that never makes a worker crash or reconnect."""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import threading
import time

import kombu
import pytest
import redis as redis_lib

from consumerd.consumer.transport import scripts
from tests.consumer.conftest import Consumerd, RedisServer, publish_many, wait_for

PAD = "x" * 1000
QUEUED = 500


@pytest.fixture
def full_redis(tmp_path, name):
    """Our own redis-server holding QUEUED messages of ``name`` and no room for more."""
    server = RedisServer(tmp_path)
    server.start()
    client = redis_lib.Redis(port=server.port)
    publish_many(server.url, name, QUEUED, pad=PAD)
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 64 * 1024)
    client.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(Exception, match="maxmemory"):  # full: another publish is refused
        publish_many(server.url, name, 1000, start=10_000, pad=PAD)
    yield server
    server.stop()


def queued_ids(server: RedisServer, name: str) -> set[int]:
    """The ids in ``name``'s list (kombu envelopes with base64 JSON bodies)."""
    raw = redis_lib.Redis(port=server.port).lrange(name, 0, -1)
    return {json.loads(base64.b64decode(json.loads(item)["body"]))["i"] for item in raw}


class Producer(threading.Thread):
    """Publishes new ids one at a time until stopped, as a stock kombu producer, keeping
    the Redis full: counts every publish accepted and every one refused for lack of
    memory; any other error is kept (and fails the test)."""

    def __init__(self, url: str, name: str, start: int) -> None:
        super().__init__(daemon=True)
        self.url, self.name, self.next = url, name, start
        self.accepted: list[int] = []
        self.refused = 0
        self.other: list[BaseException] = []
        self.done = threading.Event()

    def run(self) -> None:
        with kombu.Connection(self.url) as conn:
            producer = conn.Producer(serializer="json")
            while not self.done.is_set():
                try:
                    producer.publish({"i": self.next, "pad": PAD}, routing_key=self.name)
                except Exception as exc:
                    if "maxmemory" not in str(exc):
                        self.other.append(exc)
                        return
                    self.refused += 1
                    self.done.wait(0.002)  # as fast as room is made, no faster
                else:
                    self.accepted.append(self.next)
                    self.next += 1

    def stop(self) -> None:
        self.done.set()
        self.join(30)
        assert not self.is_alive()


def test_workers_on_a_full_redis_drain_it_without_crashing_or_reconnecting(
    tmp_path, name, full_redis
):
    """A producer keeps the Redis at maxmemory the whole time (each ack makes room for
    about one more message): the workers consume and ack every accepted message exactly
    once over their first connection, and every refused publish is just refused."""
    before = queued_ids(full_redis, name)
    assert len(before) >= QUEUED  # the fixture's refused batch got some in before it filled
    c = Consumerd(tmp_path, name, full_redis.url)
    # Handlers slower than the producer: whatever room an ack makes is taken at once.
    c.configure([{"name": name, "prefetch": 20, "sleep": 0.01}])
    refused = c.cli("publish", "--app", "tapp", "--broker", full_redis.url, name, '{"i": -1}')
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1 and "maxmemory" in refused.stderr
    producer = Producer(full_redis.url, name, 20_000)
    try:
        producer.start()
        c.start(workers=2)
        c.wait_logged(f"consuming {name} from", 2, timeout=30)
        refused_at_start = producer.refused
        wait_for(
            lambda: (
                producer.other
                or (len(c.ids()) >= len(before) and producer.refused >= refused_at_start + 20)
            ),
            60,
            "the queued messages handled while new publishes were refused",
        )
        assert not producer.other, producer.other
        producer.stop()
        expected = before | set(producer.accepted)
        wait_for(lambda: len(c.ids()) >= len(expected), 60, "every accepted message handled")
        crashed = c.logged("exited with status")
        assert c.stop() == 0
    finally:
        producer.done.set()
        c.kill()
    assert not producer.other, producer.other
    counts = c.ids()
    assert set(counts) == expected and set(counts.values()) == {1}  # in == out, once each
    assert -1 not in counts  # the refused CLI publish never got in
    print(
        f"{len(before)} queued + {len(producer.accepted)} accepted while full, "
        f"{producer.refused} publishes refused, every accepted one handled once"
    )
    assert c.logged(f"consuming {name} from") == 2  # one connect per worker: no reconnect
    assert c.logged("lost the broker") == 0
    assert crashed == 0, "a worker crashed"
    assert c.logged("holder heartbeat") == 0  # the heartbeat runs at maxmemory too


def test_redis_at_maxmemory_noeviction_is_drained(tmp_path, name, full_redis):
    """Draining makes room: after it, publishing works again and is consumed."""
    before = queued_ids(full_redis, name)
    client = redis_lib.Redis(port=full_redis.port)
    limit = int(client.config_get("maxmemory")["maxmemory"])
    c = Consumerd(tmp_path, name, full_redis.url)
    try:
        c.configure([{"name": name, "prefetch": 20}])
        c.start(workers=2)
        wait_for(lambda: len(c.ids()) >= len(before), 30, "every queued message handled")
        # Redis gives back the clients' buffers (a fetch reply) within about a second
        wait_for(
            lambda: int(client.info("memory")["used_memory"]) < limit - 64 * 1024,
            30,
            "room made by draining",
        )
        publish_many(full_redis.url, name, 10, start=30_000, pad=PAD)  # room again
        wait_for(lambda: len(c.ids()) >= len(before) + 10, 30, "the new ones handled")
        assert c.stop() == 0
    finally:
        c.kill()
    counts = c.ids()
    assert set(counts) == before | set(range(30_000, 30_010))
    assert set(counts.values()) == {1}
    assert client.llen(name) == 0 and client.hlen("unacked") == 0


def test_a_server_without_script_flags_is_drained_too(name, full_redis, monkeypatch, caplog):
    """Redis 6.2 reads no ``#!lua flags=``: the scripts go unflagged there, and drain a
    full Redis because each pops or deletes before it records (see scripts.py). Shown on
    this 7.0 server told it is older: unflagged scripts run under the pre-7 rule."""
    monkeypatch.setattr(scripts, "FLAGS_SINCE", (99,))
    before = queued_ids(full_redis, name)
    got: collections.Counter[int] = collections.Counter()

    def handle(body, message):
        got[body["i"]] += 1
        message.ack()

    transport = "consumerd.consumer.transport.redis:Transport"
    with (
        caplog.at_level(logging.WARNING),
        kombu.Connection(full_redis.url, transport=transport) as conn,
    ):
        channel = conn.channel()
        channel.basic_qos(0, 20, False)
        queue = kombu.Queue(name, routing_key=name)
        with kombu.Consumer(channel, [queue], callbacks=[handle], auto_declare=False):
            deadline = time.monotonic() + 30
            while sum(got.values()) < len(before) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
            assert channel.sync_client.script_exists(channel._script("fetch").sha) == [True]
            assert not channel._script("fetch").script.startswith("#!")
        channel.close()
    assert set(got) == before and set(got.values()) == {1}
    client = redis_lib.Redis(port=full_redis.port)
    assert client.llen(name) == 0 and client.hlen("unacked") == 0
    assert not [r for r in caplog.records if "heartbeat" in r.getMessage()]
