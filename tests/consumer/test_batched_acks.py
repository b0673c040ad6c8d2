"""Acks batched on RabbitMQ (``basic.ack multiple``, consumerd/consumer/acks.py): every
message handled is acked exactly once, none before it was handled, counted in and out on
the real broker, through SIGTERM, SIGKILL and failing handlers."""

from __future__ import annotations

import textwrap

import pytest

from consumerd.consumer import acks
from tests.consumer.conftest import AMQP_URL, Broker, check_broker, publish_many, rabbit_unacked
from tests.helpers import wait_for

# The records are those of the shared test app (conftest.APP_SOURCE), so read_records
# reads them; a message may also hold its handler at a gate file or kill its worker.
APP_SOURCE = """
import json, os, signal, time
import consumerd

CONFIG = json.load(open(os.environ["T_CONFIG"]))["consumers"]
app = consumerd.App("t", max_retries=1, retry_delay=0.05)
OUT = os.environ["T_OUT"]

def write(line):
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)

@app.consumer(CONFIG["name"], prefetch=CONFIG["prefetch"],
              concurrency=CONFIG.get("concurrency", 1))
def handle(body, message):
    start = time.time()
    gate = body.get("gate")
    while gate and not os.path.exists(gate):
        time.sleep(0.01)
    failing = body.get("fail_until", 0) >= message.attempt
    write(f"{os.getpid()} {message.queue} {body['i']} {message.attempt} "
          f"{int(message.redelivered)} {start:.6f} {time.time():.6f}"
          f"{' failed' if failing else ''}\\n")
    if body.get("kill") and not message.redelivered:
        os.kill(os.getpid(), signal.SIGKILL)  # handled, not acked: the ack never goes
    if failing:
        raise RuntimeError(f"boom at attempt {message.attempt}")
"""


@pytest.fixture
def broker(name):
    check_broker(AMQP_URL)
    return Broker("amqp", AMQP_URL, "", name)


@pytest.fixture
def app(consumerd, tmp_path):
    (tmp_path / "tapp.py").write_text(textwrap.dedent(APP_SOURCE))
    return consumerd


def publish(url: str, name: str, bodies: list[dict[str, object]]) -> None:
    import consumerd

    publisher = consumerd.App("publisher")
    publisher.configure(broker_url=url)
    try:
        for body in bodies:
            publisher.publish(name, body)
    finally:
        publisher.close()


def test_sigterm_mid_stream_sends_every_held_ack(app, broker, name):
    """A stop with acks held: what was handled is acked, the rest is back in the queue,
    and a second run handles exactly the rest."""
    n = 4000
    app.configure({"name": name, "prefetch": 100})
    publish_many(broker.url, name, n)
    app.start(workers=1)
    wait_for(lambda: len(app.ids()) >= 1000, 30, "1000 messages handled")
    assert app.stop() == 0
    handled = app.ids()
    assert sum(handled.values()) == len(handled) < n
    assert broker.unacked() == 0
    # An ack held and lost at the stop would bring its message back: one more ready.
    wait_for(lambda: broker.depth(name) == n - len(handled), 5, "exactly the rest queued")
    app.start(workers=1)
    wait_for(lambda: len(app.ids()) == n, 60, "the rest handled")
    assert app.stop() == 0
    assert sorted(app.ids().elements()) == list(range(n))


def test_sigkill_redelivers_only_what_was_not_acked(app, broker, name):
    """SIGKILL right after a handler returns: the messages redelivered and handled again
    are the last ones the victim handled (acks go out in order), at most one held batch
    and the one it died on; nothing is lost."""
    n, kill_at, prefetch = 1000, 600, 100
    app.configure({"name": name, "prefetch": prefetch})
    publish(broker.url, name, [{"i": i, "kill": i == kill_at} for i in range(n)])
    app.start(workers=1)
    victim = app.wait_workers(1)[0]
    wait_for(lambda: len(app.ids()) == n, 60, "every message handled")
    assert app.stop() == 0
    records = app.records()
    first_run = [r.id for r in records if r.pid == victim]
    assert first_run[-1] == kill_at and victim not in {r.pid for r in records[len(first_run) :]}
    ids = app.ids()
    assert set(ids) == set(range(n))  # nothing lost
    duplicated = [i for i in first_run if ids[i] > 1]
    assert all(ids[i] == 2 for i in duplicated)
    # Only messages whose ack was not sent come back: a tail of the victim's run, at most
    # the acks held (fewer than the bound: the bound-th sends them) and the killer.
    assert 1 <= len(duplicated) <= min(acks.BATCH, prefetch // 2), duplicated
    assert duplicated == first_run[-len(duplicated) :]
    assert broker.depth(name) == 0


def test_no_message_is_acked_before_it_is_handled(app, broker, name):
    """Message 0 holds its handler while 47 others (a third failing, retried or
    dead-lettered) are handled beside it: each of those is acked, message 0 is not
    (a ``multiple`` ack over it would settle it unhandled)."""
    n = 48
    bodies: list[dict[str, object]] = [{"i": 0, "gate": str(app.tmp / "gate")}]
    for i in range(1, n):
        # i % 3: 0 succeeds, 1 fails once then succeeds, 2 always fails (dead letter)
        bodies.append({"i": i, "fail_until": {0: 0, 1: 1, 2: 99}[i % 3]})
    poison = {i for i in range(1, n) if i % 3 == 2}
    app.configure({"name": name, "prefetch": 16, "concurrency": 4})
    publish(broker.url, name, bodies)
    app.start(workers=1)
    wait_for(
        lambda: (
            set(app.ids()) == set(range(1, n)) - poison
            and broker.depth(f"{name}.dlq") == len(poison)
        ),
        60,
        "all but message 0 settled",
    )
    unacked = rabbit_unacked()
    assert unacked.get(name) == 1  # message 0, still in its handler
    assert unacked.get(f"{name}.retry", 0) == 0
    (app.tmp / "gate").touch()
    wait_for(lambda: 0 in app.ids(), 30, "message 0 handled")
    assert app.stop() == 0
    assert sorted(app.ids().elements()) == sorted(set(range(n)) - poison)
    failed = [r.id for r in app.failures()]
    assert sorted(failed) == sorted([i for i in range(n) if i % 3 == 1] + 2 * sorted(poison))
    assert broker.depth(f"{name}.dlq") == len(poison)
    assert broker.unacked() == 0
