"""Fast unit tests of the partition decisions (consumer/partitions.py): fake leases, a fake
worker count and a fake clock, no broker and no consume loop. test_partitions.py checks
the same decisions carried out by real workers against the real brokers."""

from __future__ import annotations

import logging
import math
import os

import pytest

from consumerd.consumer import routing
from consumerd.consumer.ownership import Leases
from consumerd.consumer.partitions import CLAIM_EVERY, REBALANCE_EVERY, Move, Partitions

ONE_HOST = (0, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeLeases:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.elsewhere: dict[str, int | None] = {}  # held by another process: its pid

    def try_acquire(self, name):
        if name in self.elsewhere:
            return False
        self.held.add(name)
        return True

    def holder(self, name):
        return self.elsewhere.get(name)

    def release(self, name):
        self.held.discard(name)

    def release_all(self):
        self.held.clear()


class Host:
    """A worker's view of the host: its leases, the worker count, the time."""

    def __init__(self, worker_id=0, workers=1) -> None:
        self.leases = FakeLeases()
        self.workers = workers
        self.clock = Clock()
        self.partitions = Partitions(self.leases, lambda: self.workers, worker_id, self.clock)


def q(p):
    return routing.partition_queue("q", p)


def test_a_first_look_takes_every_partition_of_a_lone_worker():
    host = Host()
    assert host.partitions.deadline == math.inf
    host.partitions.look_soon(True)
    assert host.partitions.deadline == 0.0
    moves = host.partitions.rebalance({"q": (4, set()), "r": (2, {0, 1})}, ONE_HOST)
    assert moves == [Move("q", frozenset(), frozenset({0, 1, 2, 3}), frozenset({0, 1, 2, 3}), 1)]
    assert host.leases.held == {q(0), q(1), q(2), q(3)}  # r's are unchanged: no move
    assert host.partitions.deadline == host.clock.now + REBALANCE_EVERY


def test_a_second_worker_takes_half_and_leases_go_only_when_the_loop_releases_them():
    host = Host(worker_id=0, workers=1)
    host.partitions.rebalance({"q": (4, set())}, ONE_HOST)
    host.workers = 2
    (move,) = host.partitions.rebalance({"q": (4, {0, 1, 2, 3})}, ONE_HOST)
    assert move == Move("q", frozenset({1, 3}), frozenset(), frozenset({0, 2}), 2)
    assert host.leases.held == {q(0), q(1), q(2), q(3)}  # the channel is not closed yet
    host.partitions.release("q", move.lost)
    assert host.leases.held == {q(0), q(2)}
    assert host.partitions.rebalance({"q": (4, {0, 2})}, ONE_HOST) == []


def test_hosts_split_partitions_by_member_index():
    host = Host(worker_id=0, workers=2)
    (move,) = host.partitions.rebalance({"q": (8, set())}, (1, 2))  # second of two hosts
    me = routing.global_worker(0, 2, 1)
    assert move.owned == frozenset(routing.owned_partitions(8, me, 4)) == {2, 6}


def test_a_partition_held_elsewhere_is_waited_for_said_once_and_claimed_when_let_go(caplog):
    caplog.set_level(logging.INFO, "consumerd.consumer")
    host = Host(worker_id=1, workers=2)
    host.leases.elsewhere = {q(1): None, q(3): 4242}
    assert host.partitions.rebalance({"q": (4, set())}, ONE_HOST) == []
    assert host.partitions.deadline == host.clock.now + CLAIM_EVERY
    waits = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert waits == [
        (
            logging.WARNING,
            "waiting for partition 1 of consumer q: held by another process (pid unknown)",
        ),
        (
            logging.WARNING,
            "waiting for partition 3 of consumer q: held by another process (pid 4242)",
        ),
    ]
    caplog.clear()
    host.clock.now += 1.0
    assert host.partitions.rebalance({"q": (4, set())}, ONE_HOST) == []
    assert caplog.records == []  # still waiting: not said again
    host.clock.now += 1.5
    del host.leases.elsewhere[q(3)]
    (move,) = host.partitions.rebalance({"q": (4, set())}, ONE_HOST)
    assert (move.gained, move.owned) == ({3}, {3})
    assert [r.getMessage() for r in caplog.records] == [
        "acquired partition 3 of consumer q after waiting 2.5s"
    ]
    assert host.partitions.deadline == host.clock.now + CLAIM_EVERY  # 1 is still awaited


def test_a_sibling_worker_holding_a_partition_is_only_news(caplog):
    """A worker of the same master hands over within moments: INFO, not WARNING."""
    caplog.set_level(logging.INFO, "consumerd.consumer")
    host = Host()
    host.leases.elsewhere = {q(0): os.getpid()}  # a child of our parent: a sibling
    host.partitions.rebalance({"q": (1, set())}, ONE_HOST)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.INFO,
            f"waiting for partition 0 of consumer q: held by another process (pid {os.getpid()})",
        )
    ]


def test_a_wait_no_longer_wanted_is_forgotten(caplog):
    caplog.set_level(logging.INFO, "consumerd.consumer")
    host = Host(worker_id=1, workers=2)  # wants 1 and 3 of 4
    host.leases.elsewhere = {q(1): None, q(3): None}
    host.partitions.rebalance({"q": (4, set())}, ONE_HOST)
    host.workers = 3  # now wants 1 only
    host.partitions.rebalance({"q": (4, set())}, ONE_HOST)
    host.workers = 2  # 3 again: a new wait, said again; 1 is the same wait
    caplog.clear()
    host.partitions.rebalance({"q": (4, set())}, ONE_HOST)
    assert [r.getMessage() for r in caplog.records] == [
        "waiting for partition 3 of consumer q: held by another process (pid unknown)"
    ]


def test_leaving_forgets_waits_and_lets_go_of_owned_partitions(caplog):
    caplog.set_level(logging.INFO, "consumerd.consumer")
    host = Host()
    host.leases.elsewhere = {q(1): None}
    (move,) = host.partitions.rebalance({"q": (2, set())}, ONE_HOST)
    assert host.leases.held == {q(0)}
    host.partitions.leave("q", move.owned)
    assert host.leases.held == set()
    del host.leases.elsewhere[q(1)]
    caplog.clear()
    host.partitions.rebalance({"q": (2, set())}, ONE_HOST)
    assert "acquired partition" not in caplog.text  # the wait was forgotten with the consumer


def test_the_next_look_is_the_earliest_asked_for():
    host = Host()
    host.partitions.look_soon(False)
    assert host.partitions.deadline == math.inf
    host.partitions.rebalance({"q": (1, set())}, ONE_HOST)
    host.partitions.look_again_in(0.005)  # handlers still run on a channel to close
    assert host.partitions.deadline == host.clock.now + 0.005
    host.partitions.look_again_in(CLAIM_EVERY)
    assert host.partitions.deadline == host.clock.now + 0.005


@pytest.mark.parametrize("workers", [2, 3])
def test_two_workers_hand_over_through_real_leases(tmp_path, workers):
    """With ownership.Leases (flock) the gaining worker waits until the losing one has
    released, then every partition has exactly one owner."""
    counts = {"n": 1}
    first = Partitions(Leases(str(tmp_path)), lambda: counts["n"], 0, Clock())
    owned = {0: set(first.rebalance({"q": (6, set())}, ONE_HOST)[0].owned)}
    counts["n"] = workers
    others = {
        w: Partitions(Leases(str(tmp_path)), lambda: counts["n"], w, Clock())
        for w in range(1, workers)
    }
    for w, other in others.items():
        assert other.rebalance({"q": (6, set())}, ONE_HOST) == []  # all held by worker 0
        owned[w] = set()
    (move,) = first.rebalance({"q": (6, owned[0])}, ONE_HOST)
    first.release("q", move.lost)
    owned[0] = set(move.owned)
    for w, other in others.items():
        (gain,) = other.rebalance({"q": (6, owned[w])}, ONE_HOST)
        owned[w] = set(gain.owned)
    assert sorted(p for mine in owned.values() for p in mine) == list(range(6))
