"""A broker that is full (Redis at maxmemory with noeviction) still drains: fetches and acks
free memory; only publishing fails, and that never makes a worker crash or reconnect."""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import threading
import time
import typing

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


def publish_if_room(url: str, name: str, i: int) -> bool:
    """Publish message ``i`` as a stock kombu producer; False if Redis is still full."""
    try:
        with kombu.Connection(url) as conn:
            conn.Producer(serializer="json").publish({"i": i, "pad": PAD}, routing_key=name)
    except Exception as exc:
        if "maxmemory" not in str(exc):
            raise
        return False
    return True


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
    c = Consumerd(tmp_path, name, full_redis.url)
    try:
        c.configure([{"name": name, "prefetch": 20}])
        c.start(workers=2)
        wait_for(lambda: len(c.ids()) >= len(before), 30, "every queued message handled")
        for i in range(30_000, 30_010):  # room comes back as the last acks land
            wait_for(lambda i=i: publish_if_room(full_redis.url, name, i), 30, "room again")
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


# -- the embedded broker on a full disk ---------------------------------------------------

EMBEDDED_QUEUED = 300


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs of our own (SQLite checkpoints its WAL at ~4 MB; the broker's
    reserve is 8 MiB). We run as root: failing to mount fails the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {disk}: {mounted.stderr.strip()}")
    yield disk
    if subprocess.run(["umount", str(disk)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # still open: detach it


def fill(disk) -> None:
    """Take every byte left on ``disk``."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    try:
        while True:  # the last partial block
            os.write(fd, b"\0")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def publish_until_refused(url: str, name: str, start: int) -> set[int]:
    """Publish ids from ``start`` on until the broker refuses one for lack of space (its
    WAL may have had room for a few); the ids accepted."""
    from consumerd.consumer import broker

    accepted: set[int] = set()
    with broker.connect(url) as conn:
        producer = conn.Producer(serializer="json")
        for i in range(start, start + 10_000):
            try:
                producer.publish({"i": i, "pad": "x" * 500}, routing_key=name)
            except Exception as exc:
                assert "disk is full" in str(exc), exc
                return accepted
            accepted.add(i)
    raise AssertionError("10,000 publishes accepted on a full disk")


def publish_one(url: str, name: str, i: int) -> bool:
    """Publish message ``i`` on a new connection; False if refused for lack of space."""
    from consumerd.consumer import broker

    try:
        with broker.connect(url) as conn:
            conn.Producer(serializer="json").publish({"i": i}, routing_key=name)
    except Exception as exc:
        assert "disk is full" in str(exc), exc
        return False
    return True


def test_the_reserve_is_spent_by_draining_and_made_again_by_publishing(small_disk, caplog):
    """The store's reserve on a real full disk: an ack refused with SQLITE_FULL deletes it
    and goes through; publishing is then refused until the reserve fits again. The acks
    need more than 2 MiB of WAL before SQLite checkpoints it and starts it over: a 2 MiB
    reserve ran out at the 168th."""
    from consumerd.consumer.transport.store import Store

    store = Store(str(small_disk / "broker.db"), {})
    store.open()
    reserve = small_disk / "broker.db.reserve"
    info = os.stat(reserve)
    assert info.st_size == 8 << 20 and info.st_blocks * 512 >= 8 << 20  # really allocated
    assert info.st_mode & 0o777 == 0o600
    store.put([("q", "x" * 500)] * 200)
    owner = store.new_owner()
    claimed = store.claim("q", owner, 200)
    fill(small_disk)
    with caplog.at_level(logging.INFO, logger="consumerd.consumer.transport.sqlite"):
        assert all(store.settle(i, owner, delete=True) for i, _, _ in claimed)
        assert not reserve.exists()
        for _ in range(3):
            with pytest.raises(sqlite3.OperationalError, match="disk is full"):
                store.put([("q", "refused")])
        assert not reserve.exists()
        os.unlink(small_disk / "filler")
        store.put([("q", "after")])
    assert reserve.exists() and os.stat(reserve).st_blocks * 512 >= 8 << 20
    assert [r[1] for r in store.claim("q", owner, 10)] == ["after"]  # in == out
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "spent its 8 MiB reserve" in caplog.records[0].message
    assert "is back" in caplog.records[1].message
    assert sorted(os.listdir(small_disk)) == [
        "broker.db",
        "broker.db-shm",
        "broker.db-wal",
        "broker.db.reserve",
    ]  # no partial one left
    store.close()


def test_the_reserve_is_not_made_without_room(small_disk, monkeypatch):
    """posix_fallocate refusing for lack of space: no reserve (and no partial file),
    the database still opens, and a publish is refused in the usual words."""
    from consumerd.consumer.transport.store import Store

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    store = Store(str(small_disk / "broker.db"), {})
    store.open()
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        store.put([("q", "refused")])
    assert not [n for n in os.listdir(small_disk) if "reserve" in n]
    monkeypatch.undo()
    store.put([("q", "in")])
    assert os.path.getsize(small_disk / "broker.db.reserve") == 8 << 20  # the default
    store.close()


def _claim_after_barrier(path: str, barrier: typing.Any, results: typing.Any) -> None:
    from consumerd.consumer.transport.store import Store

    store = Store(path, {})
    store.open()
    owner = store.new_owner()
    barrier.wait()
    try:
        results.put(len(store.claim("q", owner, 20)))
    except sqlite3.OperationalError as exc:
        results.put(str(exc))


def test_two_consumers_racing_for_the_reserve_both_drain(small_disk):
    """Two processes hit the full disk at the same moment: one spends the reserve, and the
    other's retried claim must find the room, not fail (the file system frees it a moment
    after the name is gone: without waiting for it, 4 of 15 such races lost a claim)."""
    from consumerd.consumer.transport.store import Store

    path = str(small_disk / "broker.db")
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for _ in range(10):
        for leftover in small_disk.iterdir():
            leftover.unlink()
        store = Store(path, {})
        store.open()
        store.put([("q", "x" * 500)] * 300)
        fill(small_disk)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        racers = [ctx.Process(target=_claim_after_barrier, args=(path, barrier, results))]
        racers.append(ctx.Process(target=_claim_after_barrier, args=(path, barrier, results)))
        for racer in racers:
            racer.start()
        outcomes += [results.get(timeout=60) for _ in racers]
        for racer in racers:
            racer.join(30)
        store.close()
    assert outcomes == [20] * 20, outcomes


def test_embedded_broker_on_a_full_disk_is_drained(tmp_path, name, small_disk):
    """The disk under the embedded broker is full (a filler file) with messages queued:
    the workers spend the reserve and consume and ack every queued message exactly once
    while the filler is still there, over their first connection; every publish meanwhile
    is refused in one line; once the filler is gone publishing resumes by itself."""
    from consumerd.consumer.transport.store import Store

    url = f"sqlite:///{small_disk}/broker.db"
    publish_many(url, name, EMBEDDED_QUEUED, pad="x" * 500)
    assert os.path.getsize(small_disk / "broker.db.reserve") == 8 << 20
    # A broker in use: an open connection keeps the WAL and shared memory files, which a
    # process opening the database on a full disk could not create.
    in_use = Store(str(small_disk / "broker.db"), {})
    in_use.open()
    fill(small_disk)
    accepted = publish_until_refused(url, name, 2000)  # the WAL may have had room for a few
    c = Consumerd(tmp_path, name, url)
    c.configure([{"name": name, "prefetch": 20, "sleep": 0.01}])
    refused = 0
    try:
        c.start(workers=2)
        expected = set(range(EMBEDDED_QUEUED)) | accepted
        reserve = small_disk / "broker.db.reserve"
        wait_for(lambda: not reserve.exists(), 30, "the first claim spent the reserve")

        def drained() -> bool:
            nonlocal refused
            # refused all along (the WAL's slack took some before): room is for draining
            assert not publish_one(url, name, -1)
            refused += 1
            return len(c.ids()) >= len(expected)

        wait_for(drained, 60, "every queued message handled on the full disk", interval=0.05)
        cli = c.cli("publish", "--app", "tapp", "--broker", url, name, '{"i": -2}')
        assert cli.returncode != 0
        assert cli.stderr.strip().count("\n") == 0 and "disk is full" in cli.stderr
        assert (small_disk / "filler").exists() and not reserve.exists()
        handled_while_full = c.ids()
        os.unlink(small_disk / "filler")
        publish_many(url, name, 10, start=1000)  # makes the reserve again, then goes in
        assert reserve.exists()
        wait_for(lambda: len(c.ids()) >= len(expected) + 10, 30, "the new ones")
        assert c.stop() == 0
    finally:
        c.kill()
        in_use.close()
    assert set(handled_while_full) == expected and set(handled_while_full.values()) == {1}
    counts = c.ids()
    assert set(counts) == expected | set(range(1000, 1010)) and set(counts.values()) == {1}
    print(
        f"{len(expected)} queued handled once on the full disk, {refused} publishes refused "
        f"meanwhile, 10 handled after room"
    )
    assert refused >= 1
    assert c.logged(f"consuming {name} from") == 2  # one connect per worker: no reconnect
    assert c.logged("lost the broker") == 0
    assert c.logged("exited with status") == c.logged("exited with status 0") == 2  # the stop
    assert c.logged("spent its 8 MiB reserve") == 1  # one worker spent it, once


def test_a_stop_reaches_an_idle_worker_on_a_redis_that_filled_up(tmp_path, name):
    """SIGTERM and SIGHUP wake the consume loop through a message to its wake queue; a
    Redis that fills up while the workers idle refuses that message. The stop must still
    reach them at once, not after the loop's next chore (up to a minute) or the graceful
    timeout."""
    server = RedisServer(tmp_path)
    server.start()
    client = redis_lib.Redis(port=server.port)
    c = Consumerd(tmp_path, name, server.url)
    try:
        c.configure([{"name": name}])
        c.start(workers=1)
        c.wait_logged(f"consuming {name} from", 1, timeout=30)
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 64 * 1024)
        client.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
            for i in range(10_000):
                client.set(f"{name}:filler:{i}", PAD)
        c.signal(signal.SIGTERM)
        asked = time.monotonic()
        assert c.stop(timeout=60) == 0
        took = time.monotonic() - asked
    finally:
        c.kill()
        server.stop()
    assert c.logged("exited with status 0") == 1  # the worker stopped cleanly
    assert took < 10, took  # a wait on the next chore took ~60 s
