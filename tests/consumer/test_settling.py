"""The Settler (consumerd/consumer/settling.py) with a fake publisher and a fake acker that
write to one journal: what is published, acked, requeued, counted, and in which order."""

from __future__ import annotations

import collections
import time

import pytest

from consumerd.consumer import policy
from consumerd.consumer.app import ConsumerSpec, Delivery
from consumerd.consumer.settling import Settler

RETRY = policy.RetryPolicy(max_retries=2, delay=1.0)


class Message:
    def __init__(self, journal, tag, body=b'{"a": 1}', headers=None, message_id="m-1"):
        self.journal = journal
        self.tag = tag
        self.body = body
        self.content_type = "application/json"
        self.content_encoding = "utf-8"
        self.headers = {} if headers is None else headers
        self.delivery_info = {"routing_key": "q"}
        self.properties = {} if message_id is None else {"message_id": message_id}
        self.errors = []

    def requeue(self):
        self.journal.append(("requeue", self.tag))


class Acker:
    def __init__(self, journal):
        self.journal = journal

    def ack(self, message, at_once=False):
        self.journal.append(("ack", message.tag, at_once))

    def before_reject(self, message):
        self.journal.append(("before_reject", message.tag))


class Publisher:
    def __init__(self, journal, refuse=lambda kwargs: None):
        self.journal = journal
        self.refuse = refuse  # raises to refuse a publish
        self.sent = []

    def publish(self, body, **kwargs):
        self.refuse(kwargs)
        self.sent.append((body, kwargs))
        self.journal.append(("publish", kwargs["routing_key"]))


class Meter:
    def __init__(self, counts):
        self.counts = counts

    def acked(self):
        self.counts["acked"] += 1

    def retried(self):
        self.counts["retried"] += 1

    def dead_lettered(self):
        self.counts["dead_lettered"] += 1


class World:
    """A Settler and everything it was given, the journal shared by the fakes."""

    def __init__(self, refuse=lambda kwargs: None):
        self.journal = []
        self.counts = collections.Counter()
        self.handled = 0
        self.publisher = Publisher(self.journal, refuse)
        self.settler = Settler(
            acker=Acker(self.journal),
            publisher=self.publisher,
            recoverable=(ConnectionError,),
            on_handled=self.count_handled,
            meters=self.meter,
        )
        self.spec = ConsumerSpec("q", print, None, 0, RETRY)
        self.tags = iter(range(1, 1000))

    def count_handled(self):
        self.handled += 1

    def meter(self, name):
        assert name == "q"
        return Meter(self.counts)

    def delivery(self, **kwargs):
        return Delivery(Message(self.journal, next(self.tags), **kwargs), "q")


def _refuse_user_headers(kwargs):
    if "x-odd" in kwargs["headers"]:
        raise TypeError("cannot encode x-odd")


def test_a_handled_delivery_is_acked_and_counted():
    w = World()
    w.settler.handled(w.spec, [w.delivery()], None)
    assert w.journal == [("ack", 1, False)]  # not at once: it may join a multiple ack
    assert w.counts == {"acked": 1} and w.handled == 1
    assert w.publisher.sent == []


def test_requeue_at_the_handlers_request_rejects_without_acking_or_counting():
    w = World()
    w.settler.handled(w.spec, [w.delivery(), w.delivery()], policy.REQUEUE)
    assert w.journal == [("before_reject", 1), ("requeue", 1), ("before_reject", 2), ("requeue", 2)]
    assert w.counts == {} and w.handled == 0


def test_a_filtered_message_is_acked_but_not_counted_handled():
    w = World()
    w.settler.skipped(w.spec, w.delivery().raw)
    assert w.journal == [("ack", 1, False)]
    assert w.counts == {"acked": 1} and w.handled == 0


def test_a_failure_publishes_a_retry_copy_then_acks():
    w = World()
    delivery = w.delivery(headers={"x-trace": "t"})
    before = time.time()
    w.settler.failed(w.spec, delivery, ValueError("nope"))
    assert w.journal == [("publish", "q.retry"), ("ack", 1, True)]
    ((body, kwargs),) = w.publisher.sent
    assert body == b'{"a": 1}'  # the raw bytes, never re-serialised
    headers = kwargs["headers"]
    assert headers["x-trace"] == "t"
    assert headers[policy.ATTEMPT] == 2 and headers[policy.TARGET] == "q"
    assert before + RETRY.delay <= headers[policy.RETRY_AT] <= time.time() + RETRY.delay
    assert (kwargs["content_type"], kwargs["content_encoding"]) == ("application/json", "utf-8")
    assert kwargs["delivery_mode"] == 2
    assert w.counts == {"retried": 1} and w.handled == 0


def test_the_retry_delay_grows_with_the_attempt():
    w = World()
    before = time.time()
    w.settler.failed(w.spec, w.delivery(headers={policy.ATTEMPT: 2}), ValueError("nope"))
    ((_, kwargs),) = w.publisher.sent
    assert kwargs["headers"][policy.ATTEMPT] == 3
    assert kwargs["headers"][policy.RETRY_AT] >= before + 2 * RETRY.delay


@pytest.mark.parametrize("last", [False, True])
def test_a_copy_lost_with_the_connection_leaves_the_message_unacked(last):
    lost = []

    def down_once(kwargs):
        if not lost:
            lost.append(kwargs["routing_key"])
            raise ConnectionError("broker gone")

    w = World(refuse=down_once)
    headers = {policy.ATTEMPT: RETRY.max_retries + 1} if last else {}
    with pytest.raises(ConnectionError):
        w.settler.failed(w.spec, w.delivery(headers=headers), ValueError("nope"))
    assert lost == ["q.dlq" if last else "q.retry"]
    # not sent again without its headers: the message comes back with the connection
    assert w.journal == [] and w.counts == {}


def test_after_the_last_attempt_it_is_dead_lettered_then_acked():
    w = World()
    delivery = w.delivery(headers={policy.ATTEMPT: RETRY.max_retries + 1, "x-trace": "t"})
    w.settler.failed(w.spec, delivery, ValueError("nope"))
    assert w.journal == [("publish", "q.dlq"), ("ack", 1, True)]
    ((body, kwargs),) = w.publisher.sent
    assert body == b'{"a": 1}'
    headers = kwargs["headers"]
    assert headers[policy.ERROR] == "ValueError: nope"
    assert headers[policy.TARGET] == "q" and headers["x-trace"] == "t"
    assert headers[policy.ATTEMPT] == RETRY.max_retries + 1
    assert w.counts == {"dead_lettered": 1}


def test_headers_the_publisher_refuses_are_dropped_from_the_dead_letter():
    w = World(refuse=_refuse_user_headers)
    message = w.delivery(headers={"x-odd": object()}).raw
    w.settler.dead_letter(w.spec, message, "q", "undecodable: junk")
    assert w.journal == [("publish", "q.dlq"), ("ack", 1, True)]  # one copy, then the ack
    ((body, kwargs),) = w.publisher.sent
    assert body == b'{"a": 1}'
    assert "x-odd" not in kwargs["headers"]
    error = kwargs["headers"][policy.ERROR]
    assert error.startswith("undecodable: junk; its headers were dropped (TypeError: ")
    # plain: the bytes as they came, whatever the content type claimed
    assert (kwargs["content_type"], kwargs["content_encoding"]) == ("application/data", "binary")
    assert w.counts == {"dead_lettered": 1}


def test_a_retry_copy_the_broker_cannot_take_back_is_dead_lettered_without_its_headers():
    w = World(refuse=_refuse_user_headers)
    w.settler.dead_letter_to("other.dlq", w.delivery(headers={"x-odd": 1}).raw, "q", "bad")
    assert w.journal == [("publish", "other.dlq"), ("ack", 1, True)]
    assert w.counts == {}  # a retry copy's dead letter is not one of the consumer's messages


@pytest.mark.parametrize(("errors", "kept"), [([], False), ([("Err", None, None)], True)])
def test_the_compression_header_goes_only_with_a_body_still_compressed(errors, kept):
    w = World()
    delivery = w.delivery(headers={"compression": "application/x-gzip"})
    delivery.raw.errors = errors  # an error: kombu could not decompress it
    w.settler.failed(w.spec, delivery, ValueError("nope"))
    ((_, kwargs),) = w.publisher.sent
    assert ("compression" in kwargs["headers"]) is kept


@pytest.mark.parametrize("message_id", ["m-7", None])
def test_the_message_id_is_kept(message_id):
    w = World()
    w.settler.failed(w.spec, w.delivery(message_id=message_id), ValueError("nope"))
    ((_, kwargs),) = w.publisher.sent
    assert kwargs.get("message_id") == message_id
    assert ("message_id" in kwargs) is (message_id is not None)


def test_a_body_that_is_not_bytes_goes_out_as_bytes():
    w = World()
    w.settler.failed(w.spec, w.delivery(body=None), ValueError("nope"))
    w.settler.failed(w.spec, w.delivery(body=bytearray(b"xy")), ValueError("nope"))
    assert [body for body, _ in w.publisher.sent] == [b"", b"xy"]


def test_a_handled_batch_is_all_acked():
    w = World()
    w.settler.handled(w.spec, [w.delivery() for _ in range(3)], None)
    assert w.journal == [("ack", 1, False), ("ack", 2, False), ("ack", 3, False)]
    assert w.counts == {"acked": 3} and w.handled == 3


def test_a_failed_batch_is_all_retried_each_copy_before_its_ack():
    w = World()
    last = {policy.ATTEMPT: RETRY.max_retries + 1}
    batch = [w.delivery(), w.delivery(), w.delivery(headers=last)]
    w.settler.batch_failed(w.spec, batch, ValueError("nope"))
    assert w.journal == [
        ("publish", "q.retry"),
        ("ack", 1, True),
        ("publish", "q.retry"),
        ("ack", 2, True),
        ("publish", "q.dlq"),  # each message's own attempt decides
        ("ack", 3, True),
    ]
    assert w.counts == {"retried": 2, "dead_lettered": 1} and w.handled == 0
