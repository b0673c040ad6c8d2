"""A dead consumer's Redis messages come back in seconds (issue #9), on real processes, the
real Redis and default settings (no ``visibility_timeout`` in the URL: kombu's is 1 h).

Each test counts messages in and out (the test app appends one line per handled message,
outside the broker) and measures, from the SIGKILL, when the dead holder's messages were
back in their queue and when the last of them was handled again.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import redis as redis_lib

from consumerd.consumer.transport import holders
from tests.consumer.conftest import (
    REDIS_URL,
    Broker,
    Consumerd,
    Proxy,
    RedisServer,
    check_broker,
    publish_many,
)
from tests.helpers import wait_for


@pytest.fixture
def redis_broker(name):
    check_broker(REDIS_URL)
    b = Broker("redis", REDIS_URL, f"{name}:")
    yield b
    b.cleanup([name])


def keys_of(broker: Broker) -> holders.Keys:
    return holders.Keys(broker.prefix + "unacked", broker.prefix + "unacked_index")


def holders_by_pid(broker: Broker) -> dict[int, str]:
    """Registered holders of this test's keys, by process id."""
    r = broker.client()
    out = {}
    for raw in r.zrange(keys_of(broker).registry, 0, -1):
        holder = raw.decode()
        out[int(holder.rsplit(":", 3)[2])] = holder
    return out


def stop_a_worker_holding(
    c: Consumerd, broker: Broker, at_least: int
) -> tuple[int, dict[int, str], set[int]] | None:
    """SIGSTOP the worker holding the most messages and return (pid, holders, its ids) if
    it holds ``at_least``; else let it go on and return None. A worker between two
    fetches holds none for a moment, and under load all may be there at once."""
    by_pid = holders_by_pid(broker)
    victim = max(c.workers(), key=lambda p: len(held_ids(broker, by_pid.get(p, ""))))
    os.kill(victim, signal.SIGSTOP)
    ids = set(held_ids(broker, by_pid.get(victim, "")))
    if len(ids) >= at_least:
        return victim, by_pid, ids
    os.kill(victim, signal.SIGCONT)
    return None


def held_ids(broker: Broker, holder: str) -> dict[int, str]:
    """id → queue of the messages ``holder`` holds unacked."""
    r = broker.client()
    keys = keys_of(broker)
    tags = list(r.hgetall(keys.holder(holder)))
    out = {}
    for value in r.hmget(keys.unacked, tags) if tags else []:
        if value is not None:
            payload, _exchange, routing_key = json.loads(value)
            body = payload["body"]
            if payload["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            out[int(json.loads(body)["i"])] = routing_key
    return out


class Measured:
    """When a dead holder's messages were back in Redis lists, and handled again."""

    def __init__(self, broker: Broker, holder: str, ids: set[int], killed_at: float) -> None:
        self.broker, self.holder, self.ids, self.killed_at = broker, holder, ids, killed_at
        self.back_at: float | None = None

    def poll_back(self, timeout: float) -> float:
        """Seconds from the kill until the holder's hash is gone (all given back)."""
        r = self.broker.client()
        key = keys_of(self.broker).holder(self.holder)
        wait_for(
            lambda: not r.exists(key), timeout, "the dead holder's messages back", interval=0.01
        )
        self.back_at = time.time()
        return self.back_at - self.killed_at

    def handled_again(self, c: Consumerd) -> float | None:
        """Seconds from the kill until the last of ``ids`` was handled again, or None."""
        firsts: dict[int, float] = {}
        for rec in c.records():
            if rec.id in self.ids and rec.start >= self.killed_at:
                firsts[rec.id] = min(firsts.get(rec.id, rec.end), rec.end)
        if len(firsts) < len(self.ids):
            return None
        return max(firsts.values()) - self.killed_at


def test_worker_sigkill_gives_its_messages_back_within_seconds(tmp_path, name, redis_broker):
    """The issue's run: 3 workers, 3,000 messages, two worker SIGKILLs and a master
    restart, default settings. Before: not finished within 90 s (1 h visibility timeout)."""
    total = 3000
    c = Consumerd(tmp_path, name, redis_broker.url)
    c.configure([{"name": name, "sleep": 0.005}])
    try:
        c.start(workers=3)
        c.wait_workers(3)
        c.wait_logged("consuming", 3)
        started = time.time()
        publish_many(redis_broker.url, name, total)
        wait_for(lambda: len(c.ids()) >= 300, 30, "the workers to be mid-stream")
        measures = []
        for _kill in range(2):
            victim, by_pid, ids = wait_for(
                lambda: stop_a_worker_holding(c, redis_broker, 20), 30, "a worker mid-stream"
            )
            os.kill(victim, signal.SIGKILL)
            m = Measured(redis_broker, by_pid[victim], ids, time.time())
            back = m.poll_back(10)
            wait_for(lambda m=m: m.handled_again(c) is not None, 30, "the held ones handled")
            measures.append((len(ids), back, m.handled_again(c)))
            print(
                f"worker SIGKILL holding {len(ids)}: back in the queue after {back:.2f} s, "
                f"all handled again after {m.handled_again(c):.2f} s"
            )
            c.wait_workers(3)
        c.stop()
        c.start(workers=3)
        wait_for(
            lambda: len(c.ids()) == total,
            90 - (time.time() - started),
            "every message within 90 s of the first publish",
        )
        elapsed = time.time() - started
        assert c.stop() == 0
    finally:
        c.kill()
    counts = c.ids()
    assert set(counts) == set(range(total))  # count in == count out
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= sum(n for n, _, _ in measures) + 2 * 500, duplicates
    for _held, back, again in measures:
        assert back < 2.0 * 1.5, back  # 2 s by design (0.5 s sweeps); margin for load
        assert again is not None and again < 5.0, again
    assert redis_broker.depth(name) == 0 and redis_broker.unacked() == 0
    assert not redis_broker.client().exists(keys_of(redis_broker).registry)
    print(f"3,000 messages, 2 worker SIGKILLs, a master restart: done in {elapsed:.1f} s")


def test_a_live_slow_handler_is_not_redelivered_while_sweeps_give_back_a_dead_one(
    tmp_path, name, redis_broker
):
    """Two workers run 17 s handlers (longer than the 15 s holder timeout: their heartbeat
    thread beats while the handler runs); the third is SIGKILLed mid-stream on another
    queue, and the busy workers' threads give its messages back. The slow messages are
    handled exactly once each."""
    slow, fast = f"{name}s", f"{name}f"
    c = Consumerd(tmp_path, name, redis_broker.url)
    c.configure([{"name": slow, "sleep": 17, "prefetch": 1}, {"name": fast, "sleep": 0.01}])
    try:
        c.start(workers=3)
        c.wait_workers(3)
        c.wait_logged("consuming", 3)
        publish_many(redis_broker.url, slow, 2, start=0)
        wait_for(
            lambda: redis_broker.unacked() == 2 and redis_broker.depth(slow) == 0,
            15,
            "both slow messages taken",
        )
        slow_started = time.time()
        by_pid = holders_by_pid(redis_broker)
        busy = {p for p, h in by_pid.items() if held_ids(redis_broker, h)}
        assert len(busy) == 2
        publish_many(redis_broker.url, fast, 1000, start=100)
        [free] = set(c.workers()) - busy
        # A worker joins the holders at its first fetch: re-read them while waiting.
        wait_for(
            lambda: len(held_ids(redis_broker, holders_by_pid(redis_broker).get(free, ""))) >= 20,
            15,
            "a fast batch",
        )
        by_pid = holders_by_pid(redis_broker)
        os.kill(free, signal.SIGSTOP)
        ids = set(held_ids(redis_broker, by_pid[free]))
        os.kill(free, signal.SIGKILL)
        m = Measured(redis_broker, by_pid[free], ids, time.time())
        back = m.poll_back(10)
        print(
            f"SIGKILLed worker's {len(ids)} messages back after {back:.2f} s, "
            f"while both other workers ran 17 s handlers"
        )
        assert back < 3.0, back
        wait_for(lambda: len(c.ids()) == 1002, 60, "everything handled")
        assert c.stop() == 0
    finally:
        c.kill()
    counts = c.ids()
    assert set(counts) == {0, 1, *range(100, 1100)}
    slow_records = [r for r in c.records() if r.queue == slow]
    assert sorted(r.id for r in slow_records) == [0, 1], slow_records  # once each
    assert all(r.end - r.start >= 17 and not r.redelivered for r in slow_records)
    assert time.time() - slow_started > 17
    assert redis_broker.unacked() == 0


def _start_in_own_pid_namespace(c: Consumerd, workers: int) -> None:
    """Start ``c`` as PID 1 of a new pid namespace with its own /proc: to the other
    instance its holders live on another host (their pids mean nothing there), and one
    SIGKILL of its master kills every process in it at once, as a lost host or a deleted
    pod."""
    c.logf = open(c.log, "ab")  # noqa: SIM115 - the child writes to it
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        sys.executable,
        "-m",
        "consumerd.cli",
        "--app",
        "tapp",
        "--broker",
        c.url,
        "--workers",
        str(workers),
        "--log-level",
        "INFO",
    ]
    c.proc = subprocess.Popen(argv, cwd=c.tmp, env=c.env(), stdout=c.logf, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare(1) and root for a pid namespace",
)
def test_whole_host_loss_gives_messages_back_via_another_instance(tmp_path, name, redis_broker):
    """Instance A (2 workers, its own pid namespace: another host) and instance B consume
    the same queue; A's master and workers are SIGKILLed together. B gives A's messages
    back once A's heartbeats are 15 s old, and handles them: nothing lost."""
    total = 3000
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Consumerd(tmp_path / "a", name, redis_broker.url)
    b = Consumerd(tmp_path / "b", name, redis_broker.url)
    for c in (a, b):
        c.configure([{"name": name, "sleep": 0.01}])
    try:
        _start_in_own_pid_namespace(a, 2)
        b.start(workers=2)
        wait_for(
            lambda: a.logged("consuming") >= 2 and b.logged("consuming") >= 2,
            30,
            "both instances consuming",
        )
        publish_many(redis_broker.url, name, total)
        wait_for(lambda: len(a.ids()) >= 200, 30, "A mid-stream")
        assert a.proc is not None
        [master] = _children(a.proc.pid)  # PID 1 of the namespace, seen from here
        a_workers = _children(master)
        for pid in [master, *a_workers]:
            os.kill(pid, signal.SIGSTOP)
        a_holders = [h for p, h in holders_by_pid(redis_broker).items() if p not in b.workers()]
        assert len(a_holders) == 2, a_holders
        ids = {i for h in a_holders for i in held_ids(redis_broker, h)}
        assert ids, "A held nothing"
        os.kill(master, signal.SIGKILL)  # PID 1 dies: the kernel kills the namespace
        killed_at = time.time()
        a.proc.wait(10)
        r = redis_broker.client()
        keys = keys_of(redis_broker)
        wait_for(
            lambda: not any(r.exists(keys.holder(h)) for h in a_holders),
            30,
            "A's messages back",
            interval=0.05,
        )
        back = time.time() - killed_at
        m = Measured(redis_broker, a_holders[0], ids, killed_at)
        wait_for(lambda: m.handled_again(b) is not None, 30, "A's messages handled by B")
        again = m.handled_again(b)
        print(
            f"host loss holding {len(ids)}: back in the queue after {back:.2f} s, "
            f"all handled again after {again:.2f} s"
        )
        wait_for(lambda: len(a.ids() | b.ids()) == total, 60, "every message")
        assert b.stop() == 0
    finally:
        a.kill()
        b.kill()
    counts: collections.Counter[int] = a.ids() + b.ids()
    assert set(counts) == set(range(total))  # count in == count out
    assert 13 < back < 30, back  # the 15 s heartbeat timeout, not the pid check
    assert again is not None and again < 30, again
    assert redis_broker.depth(name) == 0 and redis_broker.unacked() == 0
    assert not redis_lib.Redis.from_url(REDIS_URL).exists(keys.holder(a_holders[0]))


# -- the holder sweep itself (real Redis, no consumer processes) -----------------------


@pytest.fixture
def sweeper(name):
    check_broker(REDIS_URL)
    r = redis_lib.Redis.from_url(REDIS_URL)
    keys = holders.Keys(f"{name}:unacked", f"{name}:unacked_index")
    holder = holders.Holder(redis_lib.ConnectionPool.from_url(REDIS_URL), keys, 0.5, 15.0)
    yield r, keys, holder
    leftover = list(r.scan_iter(match=f"{name}:*"))
    if leftover:
        r.delete(*leftover)


def hold(r, keys: holders.Keys, holder: str, queue: str, n: int, *, beat_age: float) -> None:
    """Record ``n`` messages of ``queue`` as held by ``holder``, last heard of
    ``beat_age`` seconds ago."""
    now = float(r.time()[0])
    for i in range(n):
        tag = f"{holder}-{i}"
        payload = {
            "body": str(i),
            "headers": {},
            "properties": {
                "delivery_tag": tag,
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        }
        r.hset(keys.unacked, tag, json.dumps([payload, "", queue]))
        r.zadd(keys.index, {tag: now})
        r.hset(keys.holder(holder), tag, queue)
    r.zadd(keys.registry, {holder: now - beat_age})
    r.sadd(keys.host_set(holder.rsplit(":", 3)[1]), holder)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_gives_back_a_dead_local_process_at_once_and_spares_live_ones(sweeper, name):
    r, keys, me = sweeper
    host = me.host
    queue = f"{name}:q"
    gone = f"h:{host}:{dead_pid()}:1"
    reused = f"h:{host}:{os.getpid()}:1"  # our pid, another start time: pid reuse
    alive = f"h:{host}:{os.getppid()}:{holders.osproc.start_time(os.getppid())}"
    for holder in (gone, reused, alive):
        hold(r, keys, holder, queue, 3, beat_age=0)
    assert me.sweep() == 6
    assert r.llen(queue) == 6 and r.hlen(keys.unacked) == 3 and r.zcard(keys.index) == 3
    assert not r.exists(keys.holder(gone)) and not r.exists(keys.holder(reused))
    assert r.hlen(keys.holder(alive)) == 3
    assert {m.decode() for m in r.zrange(keys.registry, 0, -1)} == {alive, me.id}
    restored = json.loads(r.lindex(queue, -1))
    assert restored["headers"]["redelivered"] is True
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    assert me.sweep() == 0  # nothing twice


def test_sweep_gives_back_a_silent_holder_of_another_host_after_the_timeout(sweeper, name):
    r, keys, me = sweeper
    queue = f"{name}:q"
    hold(r, keys, "far:otherhost:7:1", queue, 2, beat_age=16)
    hold(r, keys, "near:otherhost:8:1", queue, 2, beat_age=10)
    assert me.sweep() == 2
    assert r.hlen(keys.holder("near:otherhost:8:1")) == 2
    assert not r.exists(keys.holder("far:otherhost:7:1"))


def test_a_holder_that_beats_again_is_not_swept(sweeper, name):
    r, keys, me = sweeper
    hold(r, keys, "far:otherhost:7:1", f"{name}:q", 2, beat_age=16)
    stale_before = repr(float(r.time()[0]) - 20)  # it beat after this
    assert me.reclaim("far:otherhost:7:1", stale_before) == 0
    assert r.hlen(keys.holder("far:otherhost:7:1")) == 2 and r.hlen(keys.unacked) == 2


def test_after_a_redis_outage_silent_holders_get_time_to_beat_again(sweeper, name):
    r, keys, me = sweeper
    hold(r, keys, "far:otherhost:7:1", f"{name}:q", 2, beat_age=60)
    r.hset(f"{keys.registry}:clock", "beat", float(r.time()[0]) - 60)  # nobody beat for 60 s
    assert me.sweep() == 0
    assert r.hlen(keys.unacked) == 2


def test_a_message_acked_meanwhile_is_not_given_back(sweeper, name):
    r, keys, me = sweeper
    queue = f"{name}:q"
    hold(r, keys, f"h:{me.host}:{dead_pid()}:1", queue, 3, beat_age=0)
    r.hdel(keys.unacked, next(iter(r.hkeys(keys.unacked))))  # acked, holder entry left
    assert me.sweep() == 2 and r.llen(queue) == 2


def test_a_worker_cut_off_from_redis_gets_its_old_holdings_back_in_seconds(tmp_path, name):
    """A network outage cuts a worker holding prefetched messages off Redis long enough
    that it cannot hand them back as its connection dies (a proxy resets every connection
    and refuses new ones, then lets them in again). The worker reconnects, and what its
    old connection held comes back within seconds, not after kombu's 1 h visibility
    timeout. Everything is handled; duplicates are bounded by what was held (acks not yet
    sent die with the connection: at-least-once)."""
    total, prefetch = 200, 20
    server = RedisServer(tmp_path)
    server.start()
    proxy = Proxy(server.port)
    proxy.resume()
    r = redis_lib.Redis(port=server.port)
    c = Consumerd(tmp_path, name, f"redis://127.0.0.1:{proxy.port}/0")
    try:
        c.configure([{"name": name, "prefetch": prefetch, "sleep": 0.02}])
        c.start(workers=1)
        c.wait_logged(f"consuming {name} from", 1, timeout=30)
        publish_many(server.url, name, total)
        wait_for(lambda: len(c.ids()) >= 40, 30, "the worker mid-stream")
        proxy.cut()
        held = r.hlen("unacked")
        c.wait_logged("unreachable", 1, timeout=30)  # reconnecting failed: an outage
        assert r.hlen("unacked") == held >= 1  # nothing handed back through the outage
        proxy.resume()
        back_at = time.time()
        wait_for(lambda: len(c.ids()) == total, 60, "every message handled after the outage")
        elapsed = time.time() - back_at
        assert c.stop() == 0
    finally:
        c.kill()
        proxy.cut()
        server.stop()
    counts = c.ids()
    assert set(counts) == set(range(total))
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= held, (duplicates, held)
    assert elapsed < 15, elapsed  # the visibility timeout would take an hour
    print(f"outage holding {held}: all {total} handled {elapsed:.1f} s after, {duplicates} twice")
