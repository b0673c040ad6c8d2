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


RETRY_APP = """
import logging, time
import consumerd

app = consumerd.App("delays", max_retries=3, retry_delay=0.03)
log = logging.getLogger("tapp")

@app.consumer({name!r})
def handle(body, delivery):
    log.info("start %d %d %.6f", body["i"], delivery.attempt, time.time())
    if body["fail_until"] >= delivery.attempt:
        raise RuntimeError("boom")
"""


def test_retry_log_states_the_policy_delay_and_the_retry_waits_for_it(consumerd, broker, name):
    """The log says the delay the policy gives each attempt (0.03 s was "0.0s"), and
    no attempt starts before the previous one's failure plus that delay."""
    import datetime
    import re
    import textwrap

    (consumerd.tmp / "tapp.py").write_text(textwrap.dedent(RETRY_APP.format(name=name)))
    publish_many(broker.url, name, 1, fail_until=3)  # attempts 1-3 fail, 4 succeeds
    consumerd.start("--log-format", "json", workers=1)

    def records() -> list[dict]:
        with open(consumerd.log) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    wait_for(
        lambda: any(r["message"].startswith("start 0 4 ") for r in records()),
        30,
        "the fourth attempt",
    )
    assert consumerd.stop() == 0
    starts, failures = {}, {}
    for r in records():
        if r["logger"] == "tapp":
            _, _, attempt, at = r["message"].split()
            starts[int(attempt)] = float(at)
        elif "failed" in r["message"]:
            attempt, delay = re.search(
                r"attempt (\d+) failed .*: retry in (\S+)s$", r["message"]
            ).groups()
            # The record's time is before the retry's due time is computed, and is
            # truncated to the millisecond: a lower bound of when the failure was seen.
            when = datetime.datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
            failures[int(attempt)] = (when.timestamp(), float(delay))
    retry = policy.RetryPolicy(3, 0.03)
    assert {a: d for a, (_, d) in failures.items()} == {a: retry.delay_after(a) for a in (1, 2, 3)}
    assert {a: d for a, (_, d) in failures.items()} == {1: 0.03, 2: 0.06, 3: 0.12}
    for attempt, (failed_at, delay) in failures.items():
        assert starts[attempt + 1] >= failed_at + delay, attempt
