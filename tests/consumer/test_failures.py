"""Retries, dead letters and undecodable messages on the real Redis and RabbitMQ."""

from __future__ import annotations

import json
import pickle

from consumerd.consumer import policy
from tests.consumer.conftest import publish_many, wait_for


def _dead_letters(broker, name, count):
    letters = []
    for _ in range(count):
        message = wait_for(lambda: broker.get(f"{name}.dlq"), 20, "a dead letter")
        letters.append(message)
    return letters


def test_failing_handler_is_retried_with_attempt_count(consumerd, broker, name):
    consumerd.configure([{"name": name}], retries=3, delay=0.2)
    publish_many(broker.url, name, 20, fail_until=2)  # fails on attempts 1 and 2
    consumerd.start(workers=2)
    wait_for(lambda: len(consumerd.ids()) == 20, 30, "all messages handled")
    assert consumerd.stop() == 0
    records = consumerd.records()
    assert sorted(r.id for r in records) == list(range(20))
    assert {r.attempt for r in records} == {3}
    assert broker.depth(f"{name}.dlq") == 0
    assert broker.depth(f"{name}.retry") == 0
    assert broker.unacked() == 0


def test_retry_delay_does_not_block_other_messages(consumerd, broker, name):
    consumerd.configure([{"name": name, "prefetch": 1}], retries=1, delay=3.0)
    publish_many(broker.url, name, 1, fail_until=1)
    publish_many(broker.url, name, 50, start=1)
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.ids()) == 51, 30, "every message handled")
    assert consumerd.stop() == 0
    (failed,) = consumerd.failures()
    (retried,) = [r for r in consumerd.records() if r.id == 0]
    assert (failed.attempt, retried.attempt) == (1, 2)
    # The retry waited its delay, from the end of the failed attempt...
    assert retried.start - failed.end >= 3.0
    # ...and the one worker (prefetch 1) handled other messages meanwhile, not after it.
    assert any(failed.end <= r.start < retried.start for r in consumerd.records() if r.id)
    assert sorted(consumerd.ids().elements()) == list(range(51))


def test_poison_message_goes_to_dead_letter_queue_with_error(consumerd, broker, name):
    consumerd.configure([{"name": name}], retries=2, delay=0.1)
    publish_many(broker.url, name, 1, fail_until=99)
    publish_many(broker.url, name, 10, start=1)
    consumerd.start(workers=1)
    wait_for(lambda: broker.depth(f"{name}.dlq") == 1, 30, "one dead letter")
    wait_for(lambda: len(consumerd.ids()) == 10, 10, "the good messages handled")
    assert consumerd.stop() == 0
    (letter,) = _dead_letters(broker, name, 1)
    assert json.loads(letter.body)["i"] == 0
    assert letter.headers[policy.ATTEMPT] == 3
    assert letter.headers[policy.ERROR] == "RuntimeError: boom at attempt 3"
    assert letter.headers[policy.TARGET] == name
    assert broker.depth(name) == 0
    assert broker.depth(f"{name}.retry") == 0


def test_undecodable_and_pickle_go_straight_to_dead_letters(consumerd, broker, name):
    consumerd.configure([{"name": name}], retries=3, delay=0.1)
    broker.publish_raw(name, b"{not json", "application/json")
    broker.publish_raw(name, pickle.dumps({"i": 666}), "application/x-python-serialize")
    broker.publish_raw(name, b"\x00\x01", "application/octet-stream")
    publish_many(broker.url, name, 5)
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.ids()) == 5, 20, "the good messages handled")
    wait_for(lambda: broker.depth(f"{name}.dlq") == 3, 20, "three dead letters")
    assert consumerd.stop() == 0
    letters = _dead_letters(broker, name, 3)
    bodies = sorted(letter.body for letter in letters)
    assert bodies == sorted([b"{not json", pickle.dumps({"i": 666}), b"\x00\x01"])
    for letter in letters:
        assert letter.headers[policy.ERROR].startswith("undecodable: ")
        assert letter.headers[policy.ATTEMPT] == 1  # never retried
    assert any("ContentDisallowed" in letter.headers[policy.ERROR] for letter in letters)
    assert 666 not in consumerd.ids()  # pickle never loaded
