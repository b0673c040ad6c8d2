"""The ack batcher (consumerd/consumer/acks.py) against a channel that records what would
go to the broker, with kombu's own Message: which tags a ``multiple`` ack covers."""

from __future__ import annotations

from kombu.message import Message

from consumerd.consumer.acks import Acks


class Channel:
    """What the broker would get; ``unacked`` is its view, as RabbitMQ keeps it."""

    no_ack_consumers = None

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []
        self.unacked: set[int] = set()
        self.last_tag = 0

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        assert tag in self.unacked, f"unknown delivery tag {tag}"  # RabbitMQ closes the channel
        self.sent.append(("ack", tag, multiple))
        self.unacked -= {t for t in self.unacked if t <= tag} if multiple else {tag}

    def basic_reject(self, tag: int, requeue: bool = False) -> None:
        assert tag in self.unacked, f"unknown delivery tag {tag}"
        self.sent.append(("reject", tag, requeue))
        self.unacked.discard(tag)


def deliver(acks: Acks, channel: Channel, count: int) -> list[Message]:
    messages = []
    for _ in range(count):
        channel.last_tag += 1  # a channel's delivery tags count up from 1
        tag = channel.last_tag
        message = Message(body=b"{}", delivery_tag=tag, channel=channel)
        channel.unacked.add(tag)
        acks.delivered(message)
        messages.append(message)
    return messages


def test_acks_in_delivery_order_go_as_one_multiple_ack_at_the_flush():
    channel, acks = Channel(), Acks(batched=True)
    acks.track(channel, 100, "c")
    messages = deliver(acks, channel, 10)
    for message in messages:
        acks.ack(message)
    assert channel.sent == [] and acks.held == 10
    assert all(m.acknowledged for m in messages)
    acks.flush()
    assert channel.sent == [("ack", 10, True)]
    assert channel.unacked == set() and acks.held == 0


def test_a_message_still_in_its_handler_is_never_covered():
    """Tag 1 runs long (a pool's thread): 2..5 settle first and go alone; once 1 is
    acked the run resumes from it."""
    channel, acks = Channel(), Acks(batched=True)
    acks.track(channel, 100, "c")
    first, *rest = deliver(acks, channel, 5)
    for message in rest:
        acks.ack(message)
    acks.flush()
    assert channel.sent == [("ack", t, False) for t in (2, 3, 4, 5)]
    assert channel.unacked == {1}
    acks.ack(first)
    later = deliver(acks, channel, 2)
    for message in later:
        acks.ack(message)
    acks.flush()
    assert channel.sent[4:] == [("ack", 7, True)]
    assert channel.unacked == set()


def test_the_held_acks_go_before_a_requeue_and_the_run_goes_on_past_it():
    channel, acks = Channel(), Acks(batched=True)
    acks.track(channel, 100, "c")
    a, b, c, d = deliver(acks, channel, 4)
    acks.ack(a)
    acks.ack(b)
    acks.before_reject(c)
    c.requeue()
    acks.ack(d)
    acks.flush()
    assert channel.sent == [("ack", 2, True), ("reject", 3, True), ("ack", 4, True)]


def test_a_handler_that_settled_its_own_message_is_skipped_not_acked_twice():
    channel, acks = Channel(), Acks(batched=True)
    acks.track(channel, 100, "c")
    a, b, c = deliver(acks, channel, 3)
    acks.ack(a)
    b.reject()  # by the handler, at once
    acks.ack(b)
    acks.ack(c)
    acks.close(channel)
    assert channel.sent == [("reject", 2, False), ("ack", 3, True)]
    assert acks.held == 0


def test_the_bound_sends_and_a_copy_published_acks_at_once():
    channel, acks = Channel(), Acks(batched=True)
    acks.track(channel, 8, "c")  # bound: half the prefetch
    messages = deliver(acks, channel, 6)
    for message in messages[:5]:
        acks.ack(message)
    assert channel.sent == [("ack", 4, True)]
    acks.ack(messages[5], at_once=True)
    assert channel.sent[1:] == [("ack", 6, True)]


def test_off_amqp_every_ack_goes_alone_at_once():
    channel, acks = Channel(), Acks(batched=False)
    acks.track(channel, 100, "c")
    for message in deliver(acks, channel, 3):
        acks.ack(message)
    assert channel.sent == [("ack", t, False) for t in (1, 2, 3)]
