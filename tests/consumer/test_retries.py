"""Fast unit tests of the retry holder (consumer/retries.py): a fake publisher and a fake
clock, no broker and no consume loop. The integration tests (test_failures.py) show the
loop wakes for these deadlines against the real brokers."""

from __future__ import annotations

import math

import pytest

from consumerd.consumer import policy
from consumerd.consumer.retries import Retries

CHANNEL = object()  # the retry channel being consumed


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Copy:
    """A retry copy as kombu delivers it: what the holder reads of a message."""

    def __init__(self, headers, queue="q.retry", channel=CHANNEL):
        self.headers = headers
        self.delivery_info = {} if queue is None else {"routing_key": queue}
        self.channel = channel


class Broker:
    """Records, in order, what the holder asked for."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def republish(self, message, queue, headers):
        self.events.append(("republish", message, queue, headers))

    def dead_letter(self, dead_letters, message, queue, error):
        self.events.append(("dead_letter", dead_letters, message, queue, error))

    def ack(self, message):
        self.events.append(("ack", message))


@pytest.fixture
def wall():
    return Clock(1_700_000_000.0)


@pytest.fixture
def mono():
    return Clock(500.0)


@pytest.fixture
def broker():
    return Broker()


@pytest.fixture
def retries(broker, wall, mono):
    holder = Retries(
        republish=broker.republish,
        dead_letter=broker.dead_letter,
        ack=broker.ack,
        now=wall,
        monotonic=mono,
    )
    holder.watch(CHANNEL, ["q", "other"])
    return holder


def copy_due(at, target="q", channel=CHANNEL, **more):
    headers = {policy.TARGET: target, policy.RETRY_AT: at, policy.ATTEMPT: 2, **more}
    return Copy(headers, channel=channel)


def test_a_copy_is_held_until_exactly_its_due_time_then_sent_back_and_acked(retries, broker, wall):
    due = wall.now + 30.0
    message = copy_due(due, target="q.p3", extra="kept")
    retries.receive(message)
    assert broker.events == []
    wall.now = math.nextafter(due, 0.0)  # the last instant before it is due
    retries.release_due()
    assert broker.events == []
    wall.now = due
    retries.release_due()
    headers = {policy.ATTEMPT: 2, "extra": "kept"}  # target and due time are spent
    assert broker.events == [("republish", message, "q.p3", headers), ("ack", message)]
    assert retries.deadline() == math.inf
    retries.release_due()
    assert len(broker.events) == 2  # released once


def test_a_copy_due_already_goes_back_on_arrival(retries, broker, wall):
    past, absent = copy_due(wall.now - 5.0), Copy({policy.TARGET: "q"})
    retries.receive(past)
    retries.receive(absent)  # no due time: due at once
    assert broker.events == [
        ("republish", past, "q", {policy.ATTEMPT: 2}),
        ("ack", past),
        ("republish", absent, "q", {}),
        ("ack", absent),
    ]
    assert retries.deadline() == math.inf


def test_the_deadline_is_the_earliest_due_copy_on_the_monotonic_clock(retries, wall, mono):
    assert retries.deadline() == math.inf
    retries.receive(copy_due(wall.now + 60.0))
    retries.receive(copy_due(wall.now + 12.5))
    retries.receive(copy_due(wall.now + 40.0))
    assert retries.deadline() == mono.now + 12.5
    wall.now += 2.0  # time passes on both clocks
    mono.now += 2.0
    assert retries.deadline() == 500.0 + 12.5


def test_copies_due_together_go_back_in_arrival_order(retries, broker, wall):
    due = wall.now + 1.0
    first, second, later = copy_due(due), copy_due(due), copy_due(due + 1.0)
    for message in (later, first, second):
        retries.receive(message)
    wall.now = due
    retries.release_due()
    assert [e[1] for e in broker.events if e[0] == "ack"] == [first, second]
    assert retries.deadline() != math.inf  # the later one is still held


@pytest.mark.parametrize(
    ("headers", "queue", "expected"),
    [
        ({policy.RETRY_AT: 0}, "q.retry", ("q.dlq", "q", "retry copy without target")),
        ({policy.TARGET: 7}, "q.retry", ("q.dlq", "q", "retry copy without target")),
        ({policy.TARGET: ""}, "q.retry", ("q.dlq", "", "retry copy for ''")),
        ({policy.TARGET: "q.retry"}, "q.retry", ("q.dlq", "q.retry", "retry copy for 'q.retry'")),
        ({policy.TARGET: "q", policy.RETRY_AT: "soon"}, "q.retry", ("q.dlq", "q", "not a number")),
        (
            {policy.TARGET: "q", policy.RETRY_AT: math.inf},
            "q.retry",
            ("q.dlq", "q", "not a finite"),
        ),
        ({policy.TARGET: "q", policy.RETRY_AT: 1e12}, "q.retry", ("q.dlq", "q", "days ahead")),
        ([("x", 1)], "q.retry", ("q.dlq", "q", "headers are a list, not a table")),
        ({policy.TARGET: "gone"}, "gone.retry", ("gone.dlq", "gone", "queue of no consumer")),
        ({policy.TARGET: "q"}, None, ("consumerd.dlq", "q", "queue of no consumer ('')")),
    ],
)
def test_a_copy_that_cannot_go_back_is_dead_lettered_not_held(
    retries, broker, headers, queue, expected
):
    dead_letters, named, error = expected
    message = Copy(headers, queue=queue)
    retries.receive(message)
    ((kind, sent_to, sent, queue_named, reason),) = broker.events
    assert (kind, sent_to, sent, queue_named) == ("dead_letter", dead_letters, message, named)
    assert reason.startswith("undecodable: ") and error in reason, reason
    assert retries.deadline() == math.inf


def test_a_copy_due_within_a_year_of_the_fake_clock_is_held(retries, broker, wall):
    """The year-ahead bound is measured on the holder's clock, not the machine's."""
    wall.now = 4_000_000_000.0  # 2096: the machine's clock would call this years ahead
    retries.receive(copy_due(wall.now + 300 * 86400.0))
    assert broker.events == []
    assert retries.deadline() != math.inf


def test_copies_of_a_closed_channel_are_left_to_the_broker(retries, broker, wall, mono):
    held = copy_due(wall.now + 10.0)
    retries.receive(held)
    retries.receive(copy_due(wall.now - 1.0, channel=object()))  # from a closed channel
    assert broker.events == []
    retries.drop()  # the channel closed: the broker has the held copy back
    assert retries.deadline() == math.inf
    wall.now += 20.0
    retries.release_due()
    retries.receive(copy_due(wall.now - 1.0))  # nothing is watched any more
    assert broker.events == []
    new_channel = object()
    retries.watch(new_channel, ["q"])
    again = copy_due(wall.now - 1.0, channel=new_channel)
    retries.receive(again)
    assert broker.events == [("republish", again, "q", {policy.ATTEMPT: 2}), ("ack", again)]


def test_a_copy_is_acked_only_once_it_is_republished(broker, wall, mono):
    def down(message, queue, headers):
        raise ConnectionError("broker gone")

    retries = Retries(
        republish=down, dead_letter=broker.dead_letter, ack=broker.ack, now=wall, monotonic=mono
    )
    retries.watch(CHANNEL, ["q"])
    with pytest.raises(ConnectionError):
        retries.receive(copy_due(wall.now))
    assert broker.events == []
