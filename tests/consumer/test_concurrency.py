"""Several handlers at once in one worker, on the real Redis and RabbitMQ: threads and
coroutines, per-key order on partitioned consumers, and every guarantee with N in flight
(counted in and out)."""

from __future__ import annotations

import collections
import itertools
import os
import signal
import threading
from pathlib import Path

import pytest

from tests.consumer.conftest import Broker, Consumerd, Proxy, Record, RedisServer, publish_many
from tests.helpers import wait_for

#: Keys of the partitioned tests: few, so that a key's next message is close behind.
KEYS = 8


def most_at_once(records: list[Record]) -> int:
    """The largest number of handlers whose [start, end] intervals overlap."""
    edges = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("is_async", [False, True], ids=["threads", "coroutines"])
def test_n_handlers_run_at_once_and_never_more(consumerd, broker, name, is_async):
    n = 16 if is_async else 8
    consumerd.configure([{"name": name, "concurrency": n, "sleep": 0.3, "async": is_async}])
    publish_many(broker.url, name, 3 * n)
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.ids()) == 3 * n, 60, "every message handled")
    assert consumerd.stop() == 0
    records = consumerd.records()
    assert sorted(consumerd.ids().elements()) == list(range(3 * n))
    assert most_at_once(records) == n  # all slots used, the limit never passed
    assert broker.depth(name) == 0
    assert broker.unacked() == 0


def test_one_key_never_runs_twice_at_once_and_keeps_publish_order(consumerd, broker, name):
    consumerd.configure([{"name": name, "partitions": 4, "concurrency": 8, "sleep": 0.02}])
    count = 300  # keys k0..k7: a key's next message is close behind, for 8 handlers to race
    publish_many(broker.url, name, count, partitions=4, keys=KEYS)
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.ids()) == count, 60, "every message handled")
    assert consumerd.stop() == 0
    assert sorted(consumerd.ids().elements()) == list(range(count))
    by_key: dict[int, list[Record]] = collections.defaultdict(list)
    for r in sorted(consumerd.records(), key=lambda r: r.start):
        by_key[r.id % KEYS].append(r)
    for key, runs in by_key.items():
        assert [r.id for r in runs] == sorted(r.id for r in runs), f"k{key} out of order"
        for earlier, later in itertools.pairwise(runs):
            assert earlier.end <= later.start, f"k{key}: two at once"
    # ...while different keys, even of one partition, ran side by side.
    assert most_at_once(consumerd.records()) > 1


def test_per_key_order_holds_while_workers_scale(consumerd, broker, name):
    """Partitions move between workers on SIGTTIN and SIGTTOU while a stream is being
    published and handled, 8 handlers at once per worker: every message handled once,
    and a key's messages never run two at once and start in publish order, whichever
    worker ran them."""
    consumerd.configure([{"name": name, "partitions": 4, "concurrency": 8, "sleep": 0.01}])
    consumerd.start(workers=2)
    wait_for(lambda: consumerd.logged("of 2 consumes partitions") >= 2, 30, "partitions held")
    published = 0
    done = threading.Event()

    def stream() -> None:
        nonlocal published
        while not done.is_set():
            # 8 keys: a key's next message is never far behind, for 8 handlers to race
            publish_many(broker.url, name, 20, partitions=4, start=published, keys=KEYS)
            published += 20
            done.wait(0.02)  # a steady stream, not a burst the first owners drain at once

    publisher = threading.Thread(target=stream)
    publisher.start()
    try:
        wait_for(lambda: len(consumerd.ids()) >= 100, 60, "the stream handled")
        first_two = set(consumerd.workers())
        consumerd.signal(signal.SIGTTIN)
        wait_for(lambda: consumerd.logged("of 3 consumes partitions") >= 3, 30, "three hold some")
        third = set(consumerd.workers()) - first_two
        wait_for(lambda: {r.pid for r in consumerd.records()} & third, 30, "the third handling")
        consumerd.signal(signal.SIGTTOU)
        wait_for(lambda: consumerd.logged("of 2 consumes partitions") >= 4, 30, "two again")
        handled = len(consumerd.ids())
        wait_for(lambda: len(consumerd.ids()) >= handled + 100, 60, "the stream on two")
    finally:
        done.set()
        publisher.join(30)
    wait_for(lambda: len(consumerd.ids()) >= published, 90, "every message handled")
    assert consumerd.stop() == 0
    assert sorted(consumerd.ids().elements()) == list(range(published))  # each once
    records = consumerd.records()
    assert len({r.pid for r in records}) >= 3  # the partitions did move
    by_key: dict[int, list[Record]] = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: r.start):
        by_key[r.id % KEYS].append(r)
    for key, runs in by_key.items():
        assert [r.id for r in runs] == sorted(r.id for r in runs), f"k{key} out of order"
        for earlier, later in itertools.pairwise(runs):
            assert earlier.end <= later.start, f"k{key}: two at once"


@pytest.mark.parametrize("is_async", [False, True], ids=["threads", "coroutines"])
def test_sigterm_lets_running_handlers_finish_and_hands_back_the_rest(
    consumerd, broker, name, is_async
):
    consumerd.configure(
        [{"name": name, "concurrency": 16, "sleep": 1.0, "async": is_async, "prefetch": 40}]
    )
    publish_many(broker.url, name, 40)
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.started()) == 16, 30, "16 handlers running")
    assert consumerd.stop() == 0
    started, handled = consumerd.started(), consumerd.ids()
    assert len(started) == 16  # nothing new started once the stop was asked
    assert sorted(handled.elements()) == sorted(started)  # each running one finished, acked
    assert broker.unacked() == 0
    # every prefetched, unstarted message is back in the queue at once
    wait_for(lambda: broker.depth(name) == 24, 10, "24 messages back in the queue")
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.ids()) == 40, 60, "the rest handled")
    assert consumerd.stop() == 0
    assert sorted(consumerd.ids().elements()) == list(range(40))  # no duplicate


@pytest.mark.parametrize("is_async", [False, True], ids=["threads", "coroutines"])
def test_retries_and_dead_letters_from_pool_handlers(consumerd, broker, name, is_async):
    consumerd.configure(
        [{"name": name, "concurrency": 8, "async": is_async}], retries=2, delay=0.05
    )
    publish_many(broker.url, name, 20, fail_until=1)  # fail once, then succeed
    publish_many(broker.url, name, 4, start=20, fail_until=99)  # never succeed
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.ids()) == 20, 30, "the retried messages handled")
    wait_for(lambda: broker.depth(f"{name}.dlq") == 4, 30, "four dead letters")
    assert consumerd.stop() == 0
    assert {r.attempt for r in consumerd.records()} == {2}
    failures = collections.Counter(r.id for r in consumerd.failures())
    assert failures == {**dict.fromkeys(range(20), 1), **dict.fromkeys(range(20, 24), 3)}
    assert broker.depth(name) == 0 and broker.depth(f"{name}.retry") == 0


def test_sigkill_with_handlers_in_flight_loses_nothing(consumerd, broker, name):
    url = broker.consumer_url(visibility_timeout=3) if broker.kind == "redis" else broker.url
    consumerd.configure([{"name": name, "concurrency": 8, "sleep": 0.01}])
    publish_many(broker.url, name, 600)
    consumerd.start(workers=2, url=url)
    victim = consumerd.wait_workers(2)[0]
    wait_for(lambda: len(consumerd.ids()) >= 100, 30, "100 messages handled")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(consumerd.ids()) == 600, 60, "all messages handled")
    assert consumerd.stop() == 0
    assert set(consumerd.ids()) == set(range(600))
    assert broker.depth(name) == 0


def test_sighup_changes_concurrency_live(consumerd, broker, name, tmp_path: Path):
    consumerd.configure([{"name": name, "sleep": 0.3}])
    cfg = tmp_path / "consumerd.toml"
    cfg.write_text(f'app = "tapp"\nbroker = "{broker.url}"\nconcurrency = 2\n')
    consumerd.url = None
    consumerd.start("--config", str(cfg), workers=1)
    publish_many(broker.url, name, 8)
    wait_for(lambda: len(consumerd.ids()) == 8, 30, "8 at concurrency 2")
    assert most_at_once(consumerd.records()) == 2
    cfg.write_text(f'app = "tapp"\nbroker = "{broker.url}"\nconcurrency = 6\n')
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged("reloaded: consuming")
    publish_many(broker.url, name, 18, start=8)
    wait_for(lambda: len(consumerd.ids()) == 26, 30, "18 more at concurrency 6")
    assert consumerd.stop() == 0
    assert most_at_once([r for r in consumerd.records() if r.id >= 8]) == 6
    assert sorted(consumerd.ids().elements()) == list(range(26))


def test_pool_handlers_that_outlive_a_lost_redis_connection_are_settled(tmp_path, name):
    """Four handlers are running when the connection to Redis is lost for a while. The
    reconnect gives back what the old connection held but for those four (their handlers
    still have them: never redelivered while they run); when they finish, their acks must
    still reach Redis (the holder sends them). Before, the loop dropped the result of a
    handler whose channel had closed, and its message sat in Redis's unacked hash until
    the 1 h visibility timeout or the worker's exit, then ran a second time."""
    server = RedisServer(tmp_path)
    server.start()
    proxy = Proxy(server.port)
    proxy.resume()
    c = Consumerd(tmp_path, name, f"redis://127.0.0.1:{proxy.port}/0")
    broker = Broker("redis", server.url)
    try:
        c.configure([{"name": name, "concurrency": 4, "prefetch": 8, "sleep": 3.0}])
        c.start(workers=1)
        c.wait_logged(f"consuming {name} from", 1, timeout=30)
        publish_many(server.url, name, 8)
        wait_for(lambda: len(c.started()) == 4, 30, "four handlers running")
        proxy.cut()
        # Redis stays out of reach until the worker has tried to reconnect: its closing
        # channel could not hand the four back (had it reached Redis, they would run
        # again, as on any broker after a lost connection: at-least-once).
        c.wait_logged("unreachable", 1, timeout=30)
        proxy.resume()
        wait_for(lambda: len(c.ids()) == 8, 60, "every message handled")
        wait_for(lambda: broker.unacked() == 0, 30, "nothing left held in Redis")
        assert c.stop() == 0
    finally:
        c.kill()
        proxy.cut()
        server.stop()
    assert c.ids() == collections.Counter(range(8))  # none lost, none twice
    assert sorted(c.started()) == list(range(8))  # the four running were not redelivered
