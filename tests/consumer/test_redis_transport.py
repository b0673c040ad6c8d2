"""consumerd's batched Redis transport, against the real Redis at 127.0.0.1:6379 (db 13).

Every test uses its own queue and its own unacked hash/index/mutex keys (stock transport
options, so stock consumers in the interop tests share them), and deletes them after.
Integration tests fail, never skip, when Redis is down. The script tests at the end run
on fakeredis.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import typing
import uuid

import fakeredis
import kombu
import pytest
import redis

from consumerd.consumer.transport import holders
from consumerd.consumer.transport import redis as fast
from tests.consumer.conftest import Proxy
from tests.helpers import wait_for

URL = "redis://127.0.0.1:6379/13"
OURS = "consumerd.consumer.transport.redis:Transport"
STOCK = "redis"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Broker:
    """One test's queue and unacked keys on the real Redis."""

    def __init__(self) -> None:
        self.r = redis.Redis.from_url(URL)
        self.r.ping()  # a down Redis fails the test here
        self.name = f"t.fast.{uuid.uuid4().hex[:10]}"
        self.options = {
            "unacked_key": f"{self.name}.unacked",
            "unacked_index_key": f"{self.name}.unacked_index",
            "unacked_mutex_key": f"{self.name}.unacked_mutex",
        }
        self.queue = kombu.Queue(self.name, routing_key=self.name)

    def connect(self, transport: str = OURS, url: str = URL, **options) -> kombu.Connection:
        return kombu.Connection(
            url, transport=transport, transport_options={**self.options, **options}
        )

    def publish(self, count: int, start: int = 0, transport: str = STOCK) -> None:
        with self.connect(transport) as conn:
            producer = conn.Producer(serializer="json")
            for n in range(start, start + count):
                producer.publish(
                    {"n": n, "pad": "x" * 80}, routing_key=self.name, declare=[self.queue]
                )

    def queued(self) -> int:
        return int(self.r.llen(self.name))

    def unacked(self) -> int:
        return int(self.r.hlen(self.options["unacked_key"]))

    def indexed(self) -> int:
        return int(self.r.zcard(self.options["unacked_index_key"]))

    def queued_bodies(self) -> list[dict]:
        """Queue contents in consume order (RPOP end first), without consuming."""
        return [json.loads(raw) for raw in reversed(self.r.lrange(self.name, 0, -1))]

    def cleanup(self) -> None:
        self.r.delete(self.name, f"_kombu.binding.{self.name}", *self.options.values())


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.cleanup()


def body_n(payload: dict) -> int:
    body = payload["body"]
    if payload["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return json.loads(body)["n"]


def consume(conn, queue, count, prefetch=100, ack=True, *, timeout=20.0, no_ack=False):
    """Drain until ``count`` messages arrived; returns (numbers, messages)."""
    got, messages = [], []

    def on_message(body, message):
        got.append(body["n"])
        messages.append(message)
        if ack and not no_ack:
            message.ack()

    consumer = conn.Consumer(
        [queue], callbacks=[on_message], prefetch_count=prefetch, accept=["json"], no_ack=no_ack
    )
    consumer.consume()
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"got {len(got)} of {count}"
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)
    return got, messages, consumer


# -- batched consume and ack ----------------------------------------------------------


def test_batched_consume_and_ack_counts_in_and_out(broker):
    """2,000 messages come in batches of the prefetch window, one fetch each: what each
    fetch returned is counted (idle waits and empty fetches, whose number depends on the
    machine's speed, are not batches)."""
    broker.publish(2000)
    batches = []

    with broker.connect() as conn:
        channel = conn.default_channel
        stash = channel._stash

        def counting_stash(keys, flat):
            if flat:
                batches.append(len(flat) // 3)  # (key number, recorded, item) triples
            return stash(keys, flat)

        channel._stash = counting_stash
        got, _, _ = consume(conn, broker.queue, 2000)
        assert got == list(range(2000))  # one consumer: FIFO order kept
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.3)  # idle: pending acks are flushed
    assert broker.queued() == 0
    assert broker.unacked() == 0 and broker.indexed() == 0
    # Each handler acks before the next delivery, so every fetch asks for the whole window.
    assert batches == [100] * 20


def test_a_fetch_records_the_whole_batch_as_stock_kombu_does(broker):
    broker.publish(30)
    with broker.connect() as conn:
        got, messages, _ = consume(conn, broker.queue, 1, prefetch=10, ack=False)
        assert got == [0]
        assert broker.queued() == 20  # ten popped in one step
        assert broker.unacked() == 10 and broker.indexed() == 10
        stored = json.loads(broker.r.hget(broker.options["unacked_key"], messages[0].delivery_tag))
        # Stock kombu's layout: [payload, exchange, routing_key]
        assert stored == [messages[0]._raw, "", broker.name]
        score = broker.r.zscore(broker.options["unacked_index_key"], messages[0].delivery_tag)
        assert abs(score - time.time()) < 60
        messages[0].ack()
    # close: the acked one is gone, the other nine went back
    assert broker.queued() == 29 and broker.unacked() == 0 and broker.indexed() == 0


def test_prefetch_window_is_respected(broker):
    broker.publish(50)
    with broker.connect() as conn:
        _, messages, _ = consume(conn, broker.queue, 5, prefetch=5, ack=False)
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.3)  # window full: nothing more arrives
        assert len(messages) == 5 and broker.queued() == 45 and broker.unacked() == 5
        for m in messages:
            m.ack()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1)
        assert broker.queued() == 40  # the window refilled with five more


def test_no_ack_consumer_leaves_no_unacked_entries(broker):
    broker.publish(300)
    with broker.connect() as conn:
        got, _, _ = consume(conn, broker.queue, 300, no_ack=True)
        assert sorted(got) == list(range(300))
    assert broker.queued() == 0 and broker.unacked() == 0 and broker.indexed() == 0


def test_acks_are_sent_soon_even_while_the_batch_is_still_being_handled(broker):
    broker.publish(20)
    with broker.connect(ack_flush_interval=0.05) as conn:
        _, messages, _ = consume(conn, broker.queue, 1, prefetch=20)
        assert broker.unacked() == 20  # the first ack is only marked
        time.sleep(0.1)
        conn.drain_events(timeout=1)  # the next delivery sends the overdue ack first
        assert broker.unacked() == 19
        assert broker.r.hget(broker.options["unacked_key"], messages[0].delivery_tag) is None


def test_survives_a_script_cache_flush(broker):
    broker.publish(400)
    with broker.connect() as conn:
        got, _, _ = consume(conn, broker.queue, 100)
        broker.r.script_flush()
        more, _, _ = consume(conn, broker.queue, 300)
        assert sorted(got + more) == list(range(400))


def test_held_messages_are_restamped_before_the_visibility_timeout(broker):
    broker.publish(10)
    index = broker.options["unacked_index_key"]
    with broker.connect(visibility_timeout=600) as conn:
        _, messages, _ = consume(conn, broker.queue, 1, prefetch=10)
        channel = conn.default_channel
        held = [e.tag for e in channel._prefetched]
        stamped = broker.r.zscore(index, held[-1])
        # A sweep elsewhere restored one held message meanwhile (as stock does it).
        broker.r.zrem(index, held[0])
        broker.r.hdel(broker.options["unacked_key"], held[0])
        # Held past half the visibility timeout: aged here rather than waited for, so no
        # sweep of ours can restore them on a machine slow enough to pass the whole of it.
        channel._prefetched = collections.deque(
            e._replace(fetched_at=e.fetched_at - 301) for e in channel._prefetched
        )
        got, _, _ = consume(conn, broker.queue, 1)
        assert broker.r.zscore(index, held[-1]) > stamped  # re-stamped, still ours
        more, _, _ = consume(conn, broker.queue, 7)
        assert sorted(got + more) == list(range(2, 10))  # the restored one not delivered here
    assert messages[0].delivery_tag not in held


def test_without_ack_emulation_the_stock_code_runs(broker):
    broker.publish(50)
    with broker.connect(ack_emulation=False) as conn:
        got, _, _ = consume(conn, broker.queue, 50)
        assert not conn.default_channel._prefetched
    assert sorted(got) == list(range(50))
    assert broker.queued() == 0 and broker.unacked() == 0


# -- interop with stock kombu ---------------------------------------------------------


def test_stock_consumer_reads_what_this_transport_publishes(broker):
    broker.publish(200, transport=OURS)
    with broker.connect(STOCK) as conn:
        got, _, _ = consume(conn, broker.queue, 200)
    assert got == list(range(200))
    assert broker.unacked() == 0


def test_stock_restores_what_this_transport_left_unacked(broker):
    """Our consumer dies holding a batch; a stock consumer restores it after the
    visibility timeout and gets everything."""
    broker.publish(100)
    with broker.connect() as conn:
        consume(conn, broker.queue, 1, prefetch=10, ack=False)
        assert broker.unacked() == 10
        conn.default_channel.do_restore = False  # leave them behind, as a crash would
    assert broker.unacked() == 10 and broker.queued() == 90
    with broker.connect(STOCK, visibility_timeout=1, unacked_restore_throttle=1) as conn:
        got, messages, _ = consume(conn, broker.queue, 100, timeout=30)
    assert sorted(got) == list(range(100))
    assert sum(bool(m.delivery_info.get("redelivered")) for m in messages) == 10
    assert broker.unacked() == 0 and broker.queued() == 0


def test_this_transport_restores_what_stock_left_unacked(broker):
    broker.publish(60)
    with broker.connect(STOCK) as conn:
        consume(conn, broker.queue, 5, prefetch=5, ack=False)
        conn.default_channel.do_restore = False  # leave them behind, as a crash would
    assert broker.unacked() == 5
    with broker.connect(visibility_timeout=1, unacked_restore_throttle=1) as conn:
        got, _, _ = consume(conn, broker.queue, 60, timeout=30)
    assert sorted(got) == list(range(60))
    assert broker.unacked() == 0 and broker.queued() == 0


def test_global_keyprefix_is_honoured(broker):
    prefix = f"{broker.name}:"
    broker.options["global_keyprefix"] = prefix
    try:
        broker.publish(100)
        assert broker.r.llen(prefix + broker.name) == 100
        with broker.connect() as conn:
            consume(conn, broker.queue, 1, prefetch=10, ack=False)
            assert broker.r.hlen(prefix + broker.options["unacked_key"]) == 10
            assert broker.r.zcard(prefix + broker.options["unacked_index_key"]) == 10
        assert broker.r.llen(prefix + broker.name) == 100
        with broker.connect() as conn:
            got, _, _ = consume(conn, broker.queue, 100)
            wait_for(lambda: idle_wait_pending(conn), 5, "the idle wait (after the last acks)")
            broker.publish(1, start=100)
            conn.drain_events(timeout=5)  # the wait wakes under the prefix too
        assert sorted(got) == list(range(101))
        assert broker.r.hlen(prefix + broker.options["unacked_key"]) == 0
        assert broker.r.llen(prefix + broker.name) == 0
    finally:
        broker.r.delete(
            *(
                prefix + k
                for k in (
                    broker.name,
                    f"_kombu.binding.{broker.name}",
                    broker.options["unacked_key"],
                    broker.options["unacked_index_key"],
                )
            )
        )
        del broker.options["global_keyprefix"]


# -- handing messages back ------------------------------------------------------------


def test_clean_close_restores_prefetched_at_once_in_order(broker):
    broker.publish(50)
    with broker.connect() as conn:
        _, messages, _ = consume(conn, broker.queue, 3, prefetch=20, ack=False)
        messages[0].ack()
        assert broker.queued() == 30
    # no waiting: close() put them back
    bodies = broker.queued_bodies()
    assert [body_n(b) for b in bodies] == list(range(1, 50))
    redelivered = [b["properties"]["delivery_info"].get("redelivered", False) for b in bodies]
    assert redelivered[:2] == [True, True]  # delivered, unacked
    assert not any(redelivered[2:])  # prefetched only: put back untouched
    assert broker.unacked() == 0 and broker.indexed() == 0


def test_acks_not_yet_sent_when_redis_is_lost_are_not_redelivered_after(broker):
    """Acked messages whose acks still waited for their batch when the connection was
    cut: the close cannot send them, the reconnect gives back what the old connection
    held, and those are acked first (late acks), not delivered again. Prefetched ones
    come back, each once."""
    broker.publish(30)
    proxy = Proxy(6379)
    proxy.resume()
    url = f"redis://127.0.0.1:{proxy.port}/13"
    # Acks wait for a full batch or for their interval: neither comes in this test.
    options = {"ack_flush_interval": 3600, "ack_batch_max": 1000}
    try:
        with broker.connect(url=url, **options) as conn:
            got, _, _ = consume(conn, broker.queue, 20, prefetch=30)
            assert broker.unacked() == 30  # 20 acked here, not in Redis yet
            proxy.cut()
            conn.collect()  # what the runtime does with a broken connection
        assert broker.unacked() == 30  # the close could hand nothing back
        proxy.resume()
        with broker.connect(url=url, **options) as conn:
            more, _, _ = consume(conn, broker.queue, 10)
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)  # a duplicate would come in now
    finally:
        proxy.cut()
    assert sorted(got + more) == list(range(30)), sorted(got + more)  # each once
    assert broker.queued() == 0 and broker.unacked() == 0 and broker.indexed() == 0


def test_requeue_prefetched_keeps_delivered_ones(broker):
    broker.publish(30)
    with broker.connect() as conn:
        _, messages, _ = consume(conn, broker.queue, 2, prefetch=10, ack=False)
        assert conn.default_channel.requeue_prefetched() == 8
        assert [body_n(b) for b in broker.queued_bodies()] == list(range(2, 30))
        assert broker.unacked() == 2
        for m in messages:
            m.ack()
        conn.default_channel.flush_acks()
        assert broker.unacked() == 0


def test_basic_recover_returns_everything_in_order(broker):
    broker.publish(30)
    with broker.connect() as conn:
        consume(conn, broker.queue, 3, prefetch=10, ack=False)
        conn.default_channel.basic_recover(requeue=True)
        assert [body_n(b) for b in broker.queued_bodies()] == list(range(30))
        assert broker.unacked() == 0


def test_requeue_goes_to_the_tail_like_stock(broker):
    broker.publish(10)
    with broker.connect() as conn:
        _, messages, _ = consume(conn, broker.queue, 1, prefetch=1, ack=False)
        messages[0].requeue()
        assert [body_n(b) for b in broker.queued_bodies()][-1] == 0
        assert broker.unacked() == 0
        got, _, _ = consume(conn, broker.queue, 10)
    assert got == [*range(1, 10), 0]


def test_close_of_an_idle_consumer_is_immediate(broker):
    # One key: the idle wait lasts 60 s server-side.
    with broker.connect(polling_interval=60, priority_steps=[0]) as conn:
        consumer = conn.Consumer([broker.queue], callbacks=[], accept=["json"])
        consumer.consume()
        wait_for(lambda: idle_wait_pending(conn), 10, "the idle wait")
        started = time.monotonic()
        conn.default_channel.close()
        # CLIENT UNBLOCK, not the end of the 60 s wait (a generous bound, for slow machines)
        assert time.monotonic() - started < 30


@pytest.mark.parametrize("steps", [[0], [0, 3, 6, 9]])  # one key; several (stock default)
def test_message_arriving_while_closing_is_not_lost(broker, steps):
    """The idle wait that a message ended right before close() popped nothing."""
    with broker.connect(polling_interval=10, priority_steps=steps) as conn:
        consumer = conn.Consumer([broker.queue], callbacks=[], accept=["json"])
        consumer.consume()
        channel = conn.default_channel
        wait_for(lambda: idle_wait_pending(conn), 5, "the idle wait")
        broker.publish(1)
        sock = channel.client.connection._sock
        wait_for(lambda: fast._readable(sock), 5, "the wait's reply")
        assert broker.queued() == 1  # woken, nothing popped
    assert broker.queued() == 1 and broker.unacked() == 0


def idle_wait_pending(conn) -> bool:
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=0.05)
    outstanding = conn.default_channel._outstanding
    return outstanding is not None and outstanding[0] == fast._WAIT


# -- idle behaviour and fairness ------------------------------------------------------


class Activity:
    """Counts what an idle consumer does: Redis commands sent by this process and rounds
    of its connection's poller (one per ``drain_events`` wait, or a poll that timed out).
    A consumer that waits server-side makes a few per second, however fast or slow the
    machine (each ends when Redis ends a wait); one that polls makes thousands. Counted
    rather than timed: CPU time would count every thread of the test process."""

    def __init__(self, conn, monkeypatch) -> None:
        self.commands = self.rounds = 0
        send = redis.connection.Connection.send_command

        def counting_send(connection, *args, **kwargs):
            self.commands += 1
            return send(connection, *args, **kwargs)

        monkeypatch.setattr(redis.connection.Connection, "send_command", counting_send)
        cycle = conn.transport.cycle
        get = cycle.get

        def counting_get(*args, **kwargs):
            self.rounds += 1
            return get(*args, **kwargs)

        monkeypatch.setattr(cycle, "get", counting_get)

    def per_second(self, seconds: float) -> tuple[float, float]:
        return self.commands / seconds, self.rounds / seconds


def drain_for(conn, seconds: float) -> float:
    """``drain_events`` for ``seconds``; returns how long it really took."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=max(0.01, seconds - (time.monotonic() - started)))
    return time.monotonic() - started


def test_idle_consumer_does_not_spin(broker, monkeypatch):
    """Several keys (stock priority sub-queues): a wait ends every ``rescan_interval``
    (0.1 s) and a fetch follows, about ten commands and rounds a second at most."""
    with broker.connect() as conn:
        conn.Consumer([broker.queue], callbacks=[], prefetch_count=100, accept=["json"]).consume()
        wait_for(lambda: idle_wait_pending(conn), 10, "the idle wait")
        activity = Activity(conn, monkeypatch)
        commands, rounds = activity.per_second(drain_for(conn, 2.0))
    print(f"idle on 4 keys: {commands:.1f} commands/s, {rounds:.1f} poll rounds/s")
    assert 0 < commands <= 40 and 0 < rounds <= 40  # waiting server-side (BLMOVE), not polling


def test_idle_consumer_wakes_at_once(broker, monkeypatch):
    """One key, a 60 s wait: only the wait ending on the push can deliver the message
    before its end, and it does so without another command."""
    with broker.connect(priority_steps=[0]) as conn:
        # Not polling_interval=60: kombu's drain_events() also sleeps that long after a
        # poll that delivered nothing, and a woken wait delivers at the next poll.
        conn.default_channel.brpop_timeout = 60
        got = []
        conn.Consumer(
            [broker.queue],
            callbacks=[lambda b, m: (got.append(b), m.ack())],
            prefetch_count=100,
            accept=["json"],
        ).consume()
        wait_for(lambda: idle_wait_pending(conn), 10, "the idle wait")
        activity = Activity(conn, monkeypatch)
        broker.publish(1)
        published = activity.commands
        woke = time.monotonic()
        conn.drain_events(timeout=30)
        assert got and time.monotonic() - woke < 30  # generous: the wait lasts 60 s
        # What the wake-up took: the fetch (a wait that had ended by timing out would
        # have been followed by the fetch too, but not within 30 s).
        assert activity.commands - published <= 2


def test_other_channels_are_served_while_a_batch_is_held(broker):
    """A wake-up queue on a second channel is not starved by a 100-message batch."""
    wake = kombu.Queue(f"{broker.name}.wake", routing_key=f"{broker.name}.wake")
    broker.publish(200)
    try:
        with broker.connect() as conn:
            held_at_wake = []
            work = conn.channel()

            def on_work(body, message):
                time.sleep(0.005)
                message.ack()

            conn.Consumer(
                [broker.queue],
                channel=work,
                prefetch_count=100,
                accept=["json"],
                callbacks=[on_work],
            ).consume()
            conn.Consumer(
                [wake],
                channel=conn.channel(),
                no_ack=True,
                accept=["json"],
                callbacks=[lambda b, m: held_at_wake.append(len(work._prefetched))],
            ).consume()
            conn.drain_events(timeout=5)
            assert len(work._prefetched) >= 90
            conn.Producer().publish({"n": -1}, routing_key=wake.name, declare=[wake])
            deadline = time.monotonic() + 10
            while not held_at_wake and time.monotonic() < deadline:
                conn.drain_events(timeout=5)
            assert held_at_wake and held_at_wake[0] > 0  # served before the batch ran out
    finally:
        broker.r.delete(wake.name, f"_kombu.binding.{wake.name}")


def test_event_loop_mode_delivers_everything(broker):
    """kombu's Hub (Celery's event loop) path: no drain_events, batches cut by the
    prefetch window are still delivered."""
    from kombu.asynchronous import Hub

    broker.publish(300)
    hub = Hub()
    try:
        with broker.connect() as conn:
            conn.transport.register_with_event_loop(conn.connection, hub)
            got = []
            conn.Consumer(
                [broker.queue],
                callbacks=[lambda b, m: (got.append(b["n"]), m.ack())],
                prefetch_count=7,
                accept=["json"],
            ).consume()
            deadline = time.monotonic() + 30
            while len(got) < 300 and time.monotonic() < deadline:
                hub.run_once()
            assert got == list(range(300))
    finally:
        hub.close()
    assert broker.queued() == 0 and broker.unacked() == 0


# -- a consumer killed mid-stream -----------------------------------------------------

CONSUMER = textwrap.dedent("""
    import json, os, signal, sys, time, kombu
    names, out, options = sys.argv[1].split(","), sys.argv[2], json.loads(sys.argv[3])
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    conn = kombu.Connection({url!r}, transport={ours!r}, transport_options=options)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    def on_message(body, message):
        os.write(fd, b"%d\\n" % body["n"])  # recorded before the ack: a kill in between
        time.sleep(0.001)                   # makes a duplicate, never a loss
        message.ack()
    queues = [kombu.Queue(name, routing_key=name) for name in names]
    with conn.Consumer(queues, callbacks=[on_message], prefetch_count=50, accept=["json"]):
        while not stop:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
    conn.close()
""").format(url=URL, ours=OURS)


def read_numbers(path) -> list[int]:
    with open(path) as f:
        return [int(line) for line in f.read().split()]


def test_sigkilled_consumer_loses_nothing(broker, tmp_path):
    total = 3000
    broker.publish(total)
    options = {**broker.options, "visibility_timeout": 2, "unacked_restore_throttle": 1}
    env = dict(os.environ, PYTHONPATH=ROOT)
    outs = [tmp_path / "a.out", tmp_path / "b.out"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONSUMER, broker.name, str(out), json.dumps(options)], env=env
        )
        for out in outs
    ]
    try:
        wait_for(
            lambda: outs[0].exists() and len(read_numbers(outs[0])) >= 300,
            60,
            "the first consumer to be mid-stream",
        )
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        assert broker.queued() > 0, "the kill was not mid-stream"
        held = broker.unacked()  # includes what the killed one held
        assert held > 0

        def everything_seen():
            seen = set(read_numbers(outs[0])) | set(read_numbers(outs[1]))
            return len(seen) == total

        wait_for(everything_seen, 90, "every message to be handled", interval=0.2)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(10) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    numbers = read_numbers(outs[0]) + read_numbers(outs[1])
    counts = collections.Counter(numbers)
    assert set(counts) == set(range(total))  # count in == count out: nothing lost
    duplicates = sum(c - 1 for c in counts.values())
    # Only what the killed consumer held (prefetch 50 + acks not yet sent) comes twice.
    assert duplicates <= 50 + fast.Channel.ack_batch_max, duplicates
    assert broker.queued() == 0 and broker.unacked() == 0 and broker.indexed() == 0


def start_consumer(names: list[str], out, options: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    argv = [sys.executable, "-c", CONSUMER, ",".join(names), str(out), json.dumps(options)]
    return subprocess.Popen(argv, env=env)


def blocked_in_idle_wait(broker: Broker, after_id: int) -> bool:
    """Whether a client connected after ``after_id`` is blocked in the idle wait."""
    return any(
        int(c["id"]) > after_id and "b" in c["flags"] and c["cmd"] == fast._WAIT.lower()
        for c in broker.r.client_list()
        if c["db"] == "13"
    )


@pytest.mark.parametrize("several", [False, True], ids=["one key", "two queues x 4 priorities"])
def test_consumer_killed_while_its_idle_wait_is_answered_loses_nothing(broker, tmp_path, several):
    """Stock BRPOP pops the message when it replies: a consumer frozen (SIGSTOP) in
    BRPOP, then killed, lost the message published meanwhile. Here it stays queued."""
    names = [broker.name, f"{broker.name}.b"] if several else [broker.name]
    queues = [kombu.Queue(name, routing_key=name) for name in names]
    steps = {} if several else {"priority_steps": [0]}  # stock default [0, 3, 6, 9]
    options = {**broker.options, **steps, "visibility_timeout": 2, "unacked_restore_throttle": 1}
    priorities = [None, 9] if several else [None]  # 9: a priority sub-queue key

    def publish(start: int) -> int:
        n = start
        with broker.connect(STOCK, **steps) as conn:
            producer = conn.Producer(serializer="json")
            for queue in queues:
                for priority in priorities:
                    producer.publish(
                        {"n": n}, routing_key=queue.name, declare=[queue], priority=priority
                    )
                    n += 1
        return n - start

    def handled() -> list[int]:
        return [n for out in outs if out.exists() for n in read_numbers(out)]

    def in_redis() -> int:
        keys = [f"{name}\x06\x16{p}" if p else name for name in names for p in (0, 3, 6, 9)]
        return sum(int(broker.r.llen(k)) for k in keys) + broker.unacked()

    outs = [tmp_path / "frozen.out", tmp_path / "after.out"]
    before = max(int(c["id"]) for c in broker.r.client_list())
    procs = [start_consumer(names, outs[0], options)]
    try:
        sent = publish(0)
        wait_for(lambda: len(handled()) == sent, 30, "the first messages")
        wait_for(lambda: blocked_in_idle_wait(broker, before), 10, "the idle wait")
        procs[0].send_signal(signal.SIGSTOP)
        frozen = publish(sent)
        sent += frozen
        # The wait was answered, or is about to be (several keys: within 0.1 s), and
        # its reply sits unread: every message must still be in Redis.
        wait_for(lambda: not blocked_in_idle_wait(broker, before), 5, "the wait to end")
        assert in_redis() == frozen
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        assert in_redis() == frozen
        procs.append(start_consumer(names, outs[1], options))
        wait_for(lambda: len(set(handled())) == sent, 60, "every message", interval=0.1)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(10) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        broker.r.delete(
            *(f"{n}\x06\x16{p}" for n in names for p in (3, 6, 9)),
            *(f"{pre}{n}" for n in names[1:] for pre in ("", "_kombu.binding.")),
        )
    assert sorted(handled()) == list(range(sent))  # count in == count out, no duplicate
    assert in_redis() == 0


# -- half-open connections ------------------------------------------------------------


class HalfOpenProxy:
    """A TCP proxy to the real Redis that can make its connections half-open: both
    sockets stay open but whatever either side sends is silently dropped, like a broker
    host gone without a reset or a NAT that forgot the flow."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/13"
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._trigger: bytes | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.upstream_addrs: set[str] = set()  # as Redis sees the proxied clients
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, once_sent: bytes | None = None) -> None:
        """Drop everything from now on, or from the first client write containing
        ``once_sent`` (that write included)."""
        if once_sent is None:
            self._forwarding.clear()
        else:
            self._trigger = once_sent

    def resume(self) -> None:
        self._trigger = None
        self._forwarding.set()

    def dropping(self) -> bool:
        return not self._forwarding.is_set()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", 6379))
            except OSError:
                return  # closed
            with self._lock:
                self._sockets += [client, server]
                host, port = server.getsockname()[:2]
                self.upstream_addrs.add(f"{host}:{port}")
            for src, dst, from_client in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, from_client), daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            trigger = self._trigger
            if from_client and trigger is not None and trigger in data:
                self._forwarding.clear()
            if self._forwarding.is_set():
                try:
                    dst.sendall(data)
                except OSError:
                    break
        for sock in (src, dst):  # an end closed: pass it on (unless dropping)
            if not self.dropping():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy():
    p = HalfOpenProxy()
    yield p
    p.close()


def blocked_through(broker: Broker, proxy: HalfOpenProxy) -> int:
    """Clients of the proxy that Redis still has blocked (BRPOP, BLMOVE)."""
    return sum(
        1 for c in broker.r.client_list() if c["addr"] in proxy.upstream_addrs and "b" in c["flags"]
    )


def drain_until_error(conn, within: float) -> tuple[BaseException, float]:
    """``drain_events()`` with no timeout (the runtime's idle wait) in a thread, until
    it raises; returns the error and how long it took."""
    result: dict[str, typing.Any] = {}

    def run():
        started = time.monotonic()
        try:
            while True:
                conn.drain_events()
        except BaseException as exc:
            result["error"], result["after"] = exc, time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"drain_events() still blocked after {within} s"
    return result["error"], result["after"]


@pytest.mark.parametrize(
    ("where", "options"),
    [
        # One key: the wait lasts brpop_timeout (1 s), a drain_events(0.2) returns in it.
        ("waiting idle", {"socket_timeout": 2, "priority_steps": [0]}),
        ("waiting idle", {"socket_timeout": 2, "ack_emulation": False}),  # stock code: BRPOP
        ("asking the CLIENT ID", {"socket_timeout": 2}),
        ("asking the CLIENT ID", {"socket_timeout": None}),
        ("fetching", {"socket_timeout": 2, "priority_steps": [0]}),  # one key, as above
    ],
)
def test_half_open_connection_raises_in_bounded_time_and_loses_nothing(
    broker, proxy, where, options
):
    """Messages handled before the fault, waiting in the queue when it hits (published
    before it), published while it is not yet noticed, and published after it: each is
    handled exactly once, through a new connection once the flow is back."""
    stock = options.get("ack_emulation") is False
    broker.publish(20)
    sent = 20
    with broker.connect(url=proxy.url, **options) as conn:
        got, _, _ = consume(conn, broker.queue, 20)
        channel = conn.default_channel

        def in_brpop():
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
            outstanding = channel._outstanding  # always None on the stock code path
            waiting = outstanding is None or outstanding[0] == fast._WAIT
            return bool(channel._in_poll) and waiting

        if where == "waiting idle":
            wait_for(in_brpop, 10, "an idle wait")
            proxy.drop()
            if not stock:
                # Redis may still hold the wait, whose reply is dropped: our wait takes
                # nothing off the list, so these stay there. (Stock BRPOP would pop one
                # into the void: it gets them only once Redis has ended its wait, below.)
                broker.publish(10, start=sent)
                sent += 10
        elif where == "fetching":
            # Idle (so the acks of the first 20 reached Redis), then messages published
            # before the fault: the fetch they wake is the write that is dropped.
            wait_for(in_brpop, 10, "an idle wait")
            assert broker.unacked() == 0
            proxy.drop(once_sent=b"EVALSHA")
            broker.publish(25, start=sent)
            sent += 25
        else:  # a new connection's first idle wait is preceded by CLIENT ID, once
            proxy.drop(once_sent=b"CLIENT\r\n$2\r\nID")
        error, after = drain_until_error(conn, within=30)
        assert proxy.dropping()
        assert isinstance(error, conn.connection_errors), repr(error)
        # A live Redis answers the idle wait within brpop_timeout (1 s), CLIENT ID at once; the
        # margin for a slow reply is socket_timeout, or the transport's own default.
        print(f"half-open {where}, {options}: {type(error).__name__} after {after:.2f} s")
        # Generous (10 s for a slow machine): what it proves is that the wait ends at all.
        assert after <= 1 + (options["socket_timeout"] or fast.REPLY_TIMEOUT) + 10, after
        # Publish only once no BRPOP is pending through the dead flow: a message popped
        # into a dropped reply is lost (stock kombu has the same window).
        wait_for(lambda: blocked_through(broker, proxy) == 0, 10, "Redis to end the idle wait")
        broker.publish(30, start=sent)
        sent += 30
        conn.collect()  # what the runtime does with a broken connection
    proxy.resume()
    with broker.connect(url=proxy.url, **options) as conn:
        more, _, _ = consume(conn, broker.queue, sent - 20)
    assert sorted(got + more) == list(range(sent))  # count in == count out, each once
    assert broker.queued() == 0 and broker.unacked() == 0 and broker.indexed() == 0


def test_a_beat_blocked_through_a_restart_of_the_holder_ends(broker, proxy):
    """A channel closes while the holder's beat waits for a reply that never comes (the
    stop outlasts remove_user's join), and a new channel starts a new beat thread: the
    old one ends once its read times out, instead of beating beside the new one for
    good (one more thread on a pool of 2 connections per outage)."""

    class User:
        pass

    before = set(threading.enumerate())

    def beats() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t.name == "consumerd-holder-beat" and t not in before
        ]

    pool = redis.ConnectionPool.from_url(
        proxy.url, socket_timeout=fast.REPLY_TIMEOUT, max_connections=2
    )
    keys = holders.Keys(broker.options["unacked_key"], broker.options["unacked_index_key"])
    holder = holders.Holder(pool, keys, interval=0.1, timeout=holders.TIMEOUT)
    first, second = User(), User()
    try:
        holder.add_user(first)
        proxy.drop(once_sent=b"EVALSHA")  # the next beat's request, never answered
        wait_for(proxy.dropping, 10, "a beat sent into the void")
        proxy.resume()  # Redis is back, but that beat waits for its reply until timeout
        holder.remove_user(first)
        assert len(beats()) == 1  # still blocked: the join gave up on it
        holder.add_user(second)
        wait_for(lambda: len(beats()) == 1, fast.REPLY_TIMEOUT + 20, "one beat thread left")
    finally:
        holder.remove_user(second)
        broker.r.delete(*broker.r.scan_iter(f"{keys.unacked}_holder*"))
    assert not beats()


def test_idle_wait_without_timeout_is_quiet_and_wakes_at_once(broker, monkeypatch):
    """The bound on the wait for a reply is no polling: an idle drain_events() sleeps,
    and returns with the message published later, not before."""
    with broker.connect() as conn:
        got = []
        conn.Consumer(
            [broker.queue], callbacks=[lambda b, m: (got.append(b), m.ack())], accept=["json"]
        ).consume()
        published = threading.Event()

        def publish():
            broker.publish(1)
            published.set()

        sender = threading.Timer(2.0, publish)
        activity = Activity(conn, monkeypatch)
        drained = threading.Thread(target=conn.drain_events, daemon=True)
        started = time.monotonic()
        sender.start()
        drained.start()
        drained.join(30)  # generous: it wakes within rescan_interval of the publish
        took = time.monotonic() - started
        sender.join()
        assert not drained.is_alive(), "drain_events() did not return after the publish"
        assert published.is_set() and got  # returned with the message, after it was sent
        commands, rounds = activity.per_second(took)
        print(f"drain_events() idle on 4 keys: {commands:.1f} commands/s, {rounds:.1f} rounds/s")
        assert 0 < commands <= 40 and 0 < rounds <= 40  # waits server-side, not polling


# -- the scripts, on fakeredis --------------------------------------------------------


def kombu_message(n: int, tag: str, queue: str = "q") -> bytes:
    return json.dumps(
        {
            "body": json.dumps({"n": n}),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "delivery_tag": tag,
                "body_encoding": "base64",
                "delivery_info": {"exchange": "ex", "routing_key": queue},
                "priority": 0,
            },
        }
    ).encode()


@pytest.fixture
def fake():
    r = fakeredis.FakeRedis()
    return r, r.register_script(fast.FETCH_LUA), r.register_script(fast.RESTORE_LUA)


def test_fetch_script_pops_in_priority_order_and_records(fake):
    r, fetch, _ = fake
    r.lpush("q", kombu_message(0, "t0"), kombu_message(1, "t1"))
    r.lpush("q\x06\x163", kombu_message(2, "t2"))
    out = fetch(
        keys=["h", "z", "q", "q\x06\x163", "q.dlq", "q.dlq", "held"],
        args=[10, "100.5", 0, "q", "q.dlq", "q", "q.dlq"],
    )
    assert [out[i] for i in range(0, len(out), 3)] == [1, 1, 2]
    assert [json.loads(out[i])["properties"]["delivery_tag"] for i in range(2, len(out), 3)] == [
        "t0",
        "t1",
        "t2",
    ]
    assert json.loads(r.hget("h", "t1")) == [json.loads(kombu_message(1, "t1")), "ex", "q"]
    assert r.zscore("z", "t2") == 100.5
    assert r.hgetall("held") == {b"t0": b"q", b"t1": b"q", b"t2": b"q\x06\x163"}


def test_fetch_script_limit_and_acks(fake):
    r, fetch, _ = fake
    r.hset("h", "old", "x")
    r.zadd("z", {"old": 1})
    r.hset("held", "old", "q")
    r.lpush("q", *(kombu_message(n, f"t{n}") for n in range(5)))
    out = fetch(keys=["h", "z", "q", "q.dlq", "held"], args=[3, "1", 1, "old", "q", "q.dlq"])
    assert len(out) == 9
    assert r.hget("h", "old") is None and r.zscore("z", "old") is None
    assert sorted(r.hkeys("h")) == [b"t0", b"t1", b"t2"]
    assert r.llen("q") == 2
    fetch(keys=["h", "z", "held"], args=[0, "1", 1, "t1"])  # an ack alone
    assert sorted(r.hkeys("held")) == [b"t0", b"t2"] and r.hget("h", "t1") is None


def test_an_ack_deletes_only_what_this_holder_still_holds(fake):
    """A sweep that took this holder for dead gave "gone" back, and another consumer
    fetched it again (same tag): a late ack must not delete that consumer's entry.
    A NUL-prefixed tag was recorded without a holder (basic_get): deleted as stock."""
    r, fetch, _ = fake
    for tag in ("gone", "stock"):
        r.hset("h", tag, "x")
        r.zadd("z", {tag: 1})
    fetch(keys=["h", "z", "held"], args=[0, "1", 2, "gone", "\0stock"])
    assert r.hkeys("h") == [b"gone"] and r.zrange("z", 0, -1) == [b"gone"]


def test_fetch_script_does_not_record_garbage(fake):
    r, fetch, _ = fake
    r.lpush("q", b"not json")
    out = fetch(keys=["h", "z", "q", "q.dlq", "held"], args=[10, "1", 0, "q", "q.dlq"])
    # not recorded (no tag to record it under): dead-lettered, byte for byte, at once
    assert out == [1, 2, b"not json"] and r.hlen("h") == 0 and r.hlen("held") == 0
    (letter,) = [json.loads(x) for x in r.lrange("q.dlq", 0, -1)]
    assert letter["body"] == "not json" and letter["properties"]["delivery_info"] == {
        "exchange": "",
        "routing_key": "q.dlq",
    }
    assert letter["headers"]["consumerd-error"] == (
        "undecodable: not a kombu message envelope: the entry is not a JSON object"
    )


def test_touch_script_restamps_only_indexed_tags(fake):
    r, _, _ = fake
    touch = r.register_script(fast.TOUCH_LUA)
    r.zadd("z", {"a": 1, "c": 1})
    assert touch(keys=["z"], args=["50", "a", "b", "c"]) == [1, 0, 1]
    assert r.zscore("z", "a") == 50 and r.zscore("z", "b") is None


def test_restore_script_pushes_only_what_it_removed(fake):
    r, fetch, restore = fake
    r.lpush("q", *(kombu_message(n, f"t{n}") for n in range(3)))
    fetch(keys=["h", "z", "q", "q.dlq", "held"], args=[10, "1", 0, "q", "q.dlq"])
    r.hdel("h", "t1")  # someone else (a visibility-timeout sweep) restored t1 already
    r.zrem("z", "t1")
    args = ["RPUSH", 0]
    for n in (2, 1, 0):  # newest first: RPUSH leaves the oldest at the head
        args += [f"t{n}", 1, kombu_message(n, f"t{n}")]
    assert restore(keys=["h", "z", "q", "held"], args=args) == 2
    assert [
        json.loads(m)["properties"]["delivery_tag"] for m in reversed(r.lrange("q", 0, -1))
    ] == ["t0", "t2"]
    assert r.hlen("h") == 0 and r.zcard("z") == 0 and r.hlen("held") == 0
