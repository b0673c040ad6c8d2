"""Message ids, end to end on the real Redis and RabbitMQ: what ``consumerd publish`` and
``App.publish`` give a message is what the handler's JSON log lines show, on every attempt,
and what its dead letter keeps."""

from __future__ import annotations

import json
import re
import textwrap

from consumerd import App
from consumerd.consumer.app import declare_queue
from consumerd.consumer.broker import connect
from tests.helpers import wait_for

APP = """
import logging
import consumerd

app = consumerd.App("ids", max_retries=1, retry_delay=0.1)
log = logging.getLogger("tapp")

@app.consumer({name!r})
def handle(body, delivery):
    log.info("handling %s attempt %d", body["i"], delivery.attempt)
    if body.get("fail_until", 0) >= delivery.attempt:
        raise RuntimeError("boom")
"""


def _peek_ids(broker, queue: str, count: int) -> list[str | None]:
    """The message ids of the first ``count`` messages of ``queue``, left in the queue:
    taken unacked, then handed back by closing the channel."""
    with connect(broker.url) as conn:
        channel = conn.channel()
        bound = declare_queue(queue)(channel)
        messages = [
            wait_for(lambda: bound.get(no_ack=False), 10, "a message") for _ in range(count)
        ]
        ids = [m.properties.get("message_id") for m in messages]
        channel.close()
    wait_for(lambda: broker.depth(queue) == count, 10, "the peeked messages back")
    return ids


def _records(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by the file being read while written
    return out


def test_published_ids_reach_the_handler_logs_and_dead_letters(consumerd, broker, name):
    (consumerd.tmp / "tapp.py").write_text(textwrap.dedent(APP.format(name=name)))
    published = consumerd.cli("publish", "--broker", broker.url, name, '{"i": 0}', '{"i": 1}')
    assert published.returncode == 0, published.stderr
    app = App("producer")
    app.configure(broker_url=broker.url)
    try:
        app.publish(name, {"i": 2})
        app.publish(name, {"i": 3}, message_id="caller-chosen-3")
        app.publish(name, {"i": 4, "fail_until": 1})  # retried once, then handled
        app.publish(name, {"i": 5, "fail_until": 9})  # dead-lettered after 2 attempts
    finally:
        app.close()
    ids = _peek_ids(broker, name, 6)
    assert ids[3] == "caller-chosen-3"
    generated = [ids[i] for i in (0, 1, 2, 4, 5)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", str(i)) for i in generated), ids
    assert len(set(ids)) == 6

    consumerd.start("--log-format", "json", workers=1)
    wait_for(lambda: broker.depth(f"{name}.dlq") == 1, 30, "the dead letter")

    def handling() -> dict[int, list[str]]:
        seen: dict[int, list[str]] = {}
        for r in _records(consumerd.log):
            if r.get("logger") == "tapp":
                seen.setdefault(int(r["message"].split()[1]), []).append(r["message_id"])
        return seen

    expected = {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2}  # log lines per message: its attempts
    wait_for(
        lambda: {i: len(v) for i, v in handling().items()} == expected, 30, "every attempt logged"
    )
    assert consumerd.stop() == 0
    for i, logged in handling().items():
        assert logged == [ids[i]] * expected[i], (i, logged)
    letter = broker.get(f"{name}.dlq")
    assert json.loads(letter.body)["i"] == 5
    assert letter.properties["message_id"] == ids[5]
    assert broker.depth(name) == 0
    assert broker.depth(f"{name}.retry") == 0
