"""Partitions on the real Redis and RabbitMQ: stable map, scaling, never two consumers."""

from __future__ import annotations

import collections
import itertools
import re
import signal

from tests.consumer.conftest import publish_many, wait_for

P = 8


def _worker_ids(consumerd) -> dict[int, int]:
    ids = {}
    for pid in consumerd.workers():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode()
        match = re.search(r"\((\d+)\)", title)
        assert match, title
        ids[pid] = int(match.group(1))
    return ids


def _assert_no_overlap(records) -> None:
    """Per partition, the handling intervals of different processes never overlap."""
    by_queue = collections.defaultdict(list)
    for r in records:
        by_queue[r.queue].append(r)
    for queue, rs in by_queue.items():
        rs.sort(key=lambda r: r.start)
        for a, b in itertools.pairwise(rs):
            if a.pid != b.pid:
                assert a.end <= b.start, f"{queue}: pid {a.pid} and {b.pid} overlap"


def test_stable_map_p_mod_w(consumerd, broker, name):
    consumerd.configure([{"name": name, "partitions": P}])
    publish_many(broker.url, name, 400, partitions=P)
    consumerd.start(workers=3)
    consumerd.wait_workers(3)
    wait_for(lambda: len(consumerd.ids()) == 400, 60, "all messages handled")
    ids = _worker_ids(consumerd)
    assert consumerd.stop() == 0
    owner = {}
    for r in consumerd.records():
        partition = int(r.queue.rsplit(".p", 1)[1])
        owner.setdefault(partition, set()).add(ids[r.pid])
    assert owner == {p: {p % 3} for p in range(P)}
    _assert_no_overlap(consumerd.records())
    check = consumerd.cli("check", "--app", "tapp", "--workers", "3", "--broker", broker.url)
    assert check.returncode == 0, check.stderr
    assert "worker 0 (global 0/3): p0, p3, p6" in check.stdout
    assert "worker 2 (global 2/3): p2, p5" in check.stdout


def test_scale_up_and_down_never_two_consumers(consumerd, broker, name):
    n = 1500
    consumerd.configure([{"name": name, "partitions": P, "sleep": 0.006, "prefetch": 20}])
    publish_many(broker.url, name, n, partitions=P)
    consumerd.start(workers=2)
    consumerd.wait_workers(2)
    wait_for(lambda: len(consumerd.ids()) >= 250, 60, "250 messages handled")
    consumerd.signal(signal.SIGTTIN)
    consumerd.wait_workers(3)
    wait_for(
        lambda: len({r.pid for r in consumerd.records()}) == 3, 30, "the third worker consuming"
    )
    consumerd.wait_logged("of 3 consumes partitions", 3, timeout=30)
    consumerd.signal(signal.SIGTTOU)
    consumerd.wait_workers(2)
    wait_for(lambda: len(consumerd.ids()) == n, 90, "all messages handled")
    assert consumerd.stop() == 0
    ids = consumerd.ids()
    assert set(ids) == set(range(n))
    assert sum(ids.values()) == n  # hand-overs return messages, they never duplicate
    _assert_no_overlap(consumerd.records())
    assert broker.unacked() == 0


def test_members_share_the_partitions(tmp_path, consumerd, broker, name):
    """Two hosts (two masters here) with --member 0/2 and 1/2 split the partitions."""
    from tests.consumer.conftest import Consumerd

    consumerd.configure([{"name": name, "partitions": 4}])
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Consumerd(other_dir, name, broker.url)
    other.out = consumerd.out  # one record file for both
    other.configure([{"name": name, "partitions": 4}])
    publish_many(broker.url, name, 200, partitions=4)
    try:
        consumerd.start("--member", "0/2", workers=1)
        other.start("--member", "1/2", workers=1)
        (first,) = consumerd.wait_workers(1)
        (second,) = other.wait_workers(1)
        wait_for(lambda: len(consumerd.ids()) == 200, 60, "all messages handled")
        assert consumerd.stop() == 0
        assert other.stop() == 0
    finally:
        other.kill()
    queues = collections.defaultdict(set)
    for r in consumerd.records():
        queues[r.pid].add(r.queue)
    assert queues == {first: {f"{name}.p0", f"{name}.p2"}, second: {f"{name}.p1", f"{name}.p3"}}


def test_a_second_instance_says_it_waits_for_the_partitions(tmp_path, consumerd, broker, name):
    """Two masters of one app on one host: the second one's worker wants the partitions
    the first one's holds. It says so once per partition, naming the holder, and again
    when it gets them after the first one stops."""
    from tests.consumer.conftest import Consumerd

    consumerd.configure([{"name": name, "partitions": 4}])
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = Consumerd(other_dir, name, broker.url)
    second.out = consumerd.out  # one record file for both
    second.configure([{"name": name, "partitions": 4}])
    try:
        consumerd.start(workers=1)
        consumerd.wait_logged("of 1 consumes partitions [0, 1, 2, 3]")
        (holder,) = consumerd.workers()
        second.start(workers=1)
        (waiter,) = second.wait_workers(1)
        for p in range(4):
            second.wait_logged(
                f"WARNING [{waiter}] consumerd.consumer: waiting for partition "
                f"{p} of consumer {name}: held by another process (pid {holder})"
            )
        publish_many(broker.url, name, 100, partitions=4)
        wait_for(lambda: len(consumerd.ids()) == 100, 60, "the first 100 handled")
        assert {r.pid for r in consumerd.records()} == {holder}
        assert consumerd.stop() == 0
        for p in range(4):
            second.wait_logged(f"acquired partition {p} of consumer {name} after waiting")
        publish_many(broker.url, name, 100, partitions=4, start=100)
        wait_for(lambda: len(consumerd.ids()) == 200, 60, "the next 100 handled")
        assert second.stop() == 0
    finally:
        second.kill()
    # It waited through many claim attempts (every 0.1 s) and said so once per partition.
    assert second.logged("waiting for partition") == 4
    assert second.logged("acquired partition") == 4
    ids = consumerd.ids()
    assert set(ids) == set(range(200)) and sum(ids.values()) == 200
    assert {r.pid for r in consumerd.records() if r.id >= 100} == {waiter}
