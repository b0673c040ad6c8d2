"""``App.publish_many`` and ``consumerd publish``: every message confirmed, a window at a
time, on the real brokers; a failure mid-bulk says exactly which messages are stored."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import redis as redis_lib

import consumerd
from consumerd.consumer.app import Message
from consumerd.consumer.publishing import PublishError
from tests.consumer.conftest import (
    AMQP_URL,
    REDIS_URL,
    Broker,
    Consumerd,
    RedisServer,
    check_broker,
    wait_for,
)

N = 2500
WINDOW = 100


@pytest.fixture(params=["redis", "amqp", "sqlite"])
def any_broker(request, tmp_path, name):
    kind = request.param
    if kind == "sqlite":
        b = Broker("sqlite", f"sqlite:///{tmp_path}/broker.db")
    else:
        url = REDIS_URL if kind == "redis" else AMQP_URL
        check_broker(url)
        b = Broker(kind, url, f"{name}:" if kind == "redis" else "", name)
    yield b
    b.cleanup([name])


def app_on(url: str) -> consumerd.App:
    app = consumerd.App("publisher")
    app.configure(broker_url=url)
    return app


def drain(b: Broker, queue: str, partition: bool = False) -> list:
    """Take every message off ``queue`` (a partition queue if ``partition``), in order."""
    from consumerd.consumer.app import declare_queue
    from consumerd.consumer.broker import connect

    taken = []
    with connect(b.url) as conn:
        simple = conn.SimpleQueue(declare_queue(queue, partition), no_ack=True)
        while (message := simple.queue.get(no_ack=True)) is not None:
            taken.append(message)
    return taken


def cli(c: Consumerd, *args: str, stdin: str) -> subprocess.CompletedProcess:
    """``consumerd ARGS`` with ``stdin`` as its input."""
    return subprocess.run(
        [sys.executable, "-m", "consumerd.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=60, env=c.env(), cwd=c.tmp,
        check=False,
    )  # fmt: skip


def handled_by_consumerd(tmp_path, name: str, url: str, count: int) -> list[int]:
    """Run a real consumerd over ``name`` until it handled ``count`` messages; their ids."""
    c = Consumerd(tmp_path, name, url)
    try:
        c.configure([{"name": name}])
        c.start(workers=2)
        wait_for(lambda: len(c.ids()) >= count, 60, f"{count} messages handled")
        assert c.stop() == 0
        return sorted(r.id for r in c.records())
    finally:
        c.kill()


def test_every_message_arrives_once_in_order_with_its_headers(any_broker, name):
    """N in, N in the queue, in publish order; common and per-message headers, keys'
    and ids as given; several windows."""
    app = app_on(any_broker.url)
    items = (
        Message({"i": i}, headers={"n": str(i)}, message_id=f"id-{i}") if i % 7 == 0 else {"i": i}
        for i in range(N)
    )
    try:
        assert app.publish_many(name, items, headers={"batch": "b1"}, window=WINDOW) == N
    finally:
        app.close()
    assert any_broker.depth(name) == N
    taken = drain(any_broker, name)
    assert [m.payload["i"] for m in taken] == list(range(N))
    for i, m in enumerate(taken):
        expected = {"batch": "b1", "n": str(i)} if i % 7 == 0 else {"batch": "b1"}
        assert m.headers == expected, (i, m.headers)
        given = f"id-{i}" if i % 7 == 0 else None
        assert m.properties["message_id"] == given or (
            given is None and len(m.properties["message_id"]) == 32
        )


def test_a_partitioned_consumer_gets_each_key_on_its_partition(any_broker, name):
    app = app_on(any_broker.url)
    app.consumer(name, partitions=4)(lambda body, message: None)
    try:
        sent = app.publish_many(
            name, (Message({"i": i}, key=f"k{i % 10}") for i in range(400)), window=WINDOW
        )
    finally:
        app.close()
    assert sent == 400
    seen = {}
    for p in range(4):
        for m in drain(any_broker, f"{name}.p{p}", partition=True):
            key = m.headers["consumerd-key"]
            assert seen.setdefault(key, p) == p, f"key {key} on two partitions"
            assert key == f"k{m.payload['i'] % 10}"
    assert len(seen) == 10


def test_published_in_bulk_is_handled_by_consumerd_exactly_once(tmp_path, any_broker, name):
    app = app_on(any_broker.url)
    try:
        app.publish_many(name, ({"i": i} for i in range(N)), window=WINDOW)
        assert app.publish(name, {"i": N}) == name  # one more, alone, same connection
    finally:
        app.close()
    assert any_broker.depth(name) == N + 1
    assert handled_by_consumerd(tmp_path, name, any_broker.url, N + 1) == list(range(N + 1))
    assert any_broker.depth(name) == 0


def test_a_body_that_is_not_json_stops_after_what_came_before(any_broker, name):
    """Position 150 cannot be serialised: 0-149 are stored and confirmed, nothing after."""
    app = app_on(any_broker.url)
    bodies = [{"i": i} for i in range(300)]
    bodies[150] = {"i": object()}
    try:
        with pytest.raises(PublishError) as raised:
            app.publish_many(name, bodies, window=WINDOW)
    finally:
        app.close()
    error = raised.value
    assert (error.confirmed, error.unconfirmed, error.sent) == (150, [], 150)
    assert "not JSON serializable" in str(error)
    assert [m.payload["i"] for m in drain(any_broker, name)] == list(range(150))


def test_an_iterable_that_raises_keeps_what_it_gave_first(any_broker, name):
    def bodies():
        yield from ({"i": i} for i in range(130))
        raise LookupError("the source went away")

    app = app_on(any_broker.url)
    try:
        with pytest.raises(PublishError, match="LookupError: the source went away") as raised:
            app.publish_many(name, bodies(), window=WINDOW)
    finally:
        app.close()
    assert raised.value.confirmed == 130
    assert isinstance(raised.value.__cause__, LookupError)
    assert any_broker.depth(name) == 130


def test_an_iterable_may_publish_and_does_not_hold_up_other_threads(any_broker, name):
    """The iterable given to ``publish_many`` is read outside the App's lock: one that
    publishes itself (an audit message per 10 items) does not deadlock, and while it is
    being read another thread's ``publish`` goes through. Run in a thread so that a
    regression fails on the join instead of hanging the suite."""
    audit = f"{name}.audit"
    app = app_on(any_broker.url)
    other: list[str] = []

    def bodies():
        for i in range(250):
            if i % 10 == 0:
                app.publish(audit, {"audit": i})
            if i == 55:  # a slow source: another thread publishes while it waits
                meanwhile = threading.Thread(
                    target=lambda: other.append(app.publish(audit, {"other": True}))
                )
                meanwhile.start()
                meanwhile.join(30)
            yield {"i": i}

    sent: list[int] = []
    publisher = threading.Thread(
        target=lambda: sent.append(app.publish_many(name, bodies(), window=WINDOW)),
        daemon=True,
    )
    publisher.start()
    publisher.join(60)
    try:  # not closed if deadlocked: close() would wait for the same lock
        assert not publisher.is_alive(), "publish_many deadlocked on its own iterable"
        app.close()
        assert sent == [250]
        assert other == [audit], "another thread's publish waited for the whole bulk"
        assert any_broker.depth(name) == 250
        assert any_broker.depth(audit) == 26
        assert [m.payload["i"] for m in drain(any_broker, name)] == list(range(250))
    finally:
        any_broker.cleanup([audit])


@pytest.fixture
def rabbit_policy(name):
    """A RabbitMQ policy: queue ``name`` holds 250 messages and refuses (nacks) more."""
    check_broker(AMQP_URL)
    definition = json.dumps({"max-length": 250, "overflow": "reject-publish"})
    subprocess.run(
        ["rabbitmqctl", "set_policy", "--apply-to", "queues", name, f"^{name}$", definition],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    b = Broker("amqp", AMQP_URL, "", name)
    yield b
    subprocess.run(
        ["rabbitmqctl", "clear_policy", name], capture_output=True, timeout=60, check=True
    )
    b.cleanup([name])


def test_rabbitmq_nacks_mid_bulk_are_reported_exactly(tmp_path, rabbit_policy, name):
    """The broker takes 250 and nacks the rest of the third window: 250 confirmed,
    250-299 refused, nothing sent after; exactly 0-249 are handled."""
    app = app_on(AMQP_URL)
    try:
        with pytest.raises(PublishError, match=r"refused \(nack\) 50 message") as raised:
            app.publish_many(name, ({"i": i} for i in range(1000)), window=WINDOW)
    finally:
        app.close()
    error = raised.value
    assert error.confirmed == 250
    assert error.unconfirmed == list(range(250, 300))
    assert error.sent == 300
    assert rabbit_policy.depth(name) == 250
    assert handled_by_consumerd(tmp_path, name, AMQP_URL, 250) == list(range(250))


def test_a_full_redis_mid_bulk_stores_whole_windows_only(tmp_path, name):
    """Redis at maxmemory refuses a window's MULTI/EXEC: whole windows are stored, the
    error says how many, and exactly those are handled once there is room again."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        client = redis_lib.Redis(port=server.port)
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 400_000)
        client.config_set("maxmemory-policy", "noeviction")
        app = app_on(server.url)
        bodies = ({"i": i, "pad": "x" * 1000} for i in range(2000))
        try:
            with pytest.raises(PublishError, match="maxmemory") as raised:
                app.publish_many(name, bodies, window=WINDOW)
        finally:
            app.close()
        error = raised.value
        stored = client.llen(name)
        assert 0 < error.confirmed < 2000
        assert error.confirmed == stored
        assert stored % WINDOW == 0  # a window is stored whole or not at all
        assert error.unconfirmed == list(range(stored, stored + WINDOW))
        assert error.sent == stored + WINDOW
        client.config_set("maxmemory", 0)
        assert handled_by_consumerd(tmp_path, name, server.url, stored) == list(range(stored))
    finally:
        server.stop()


def test_a_connection_cut_between_windows_is_reconnected_and_nothing_lost(broker, proxy, name):
    """The connection is reset while the bulk runs; the window is sent again on a new
    connection: all N are in the queue, each once."""
    proxy.resume()
    app = app_on(broker.consumer_url(proxy.port))
    before_cut = []

    def bodies():
        for i in range(1000):
            if i == 450:  # the next window goes out on a dead connection
                before_cut.append(proxy.accepted)
                proxy.cut()
                proxy.resume()
            yield {"i": i}

    try:
        assert app.publish_many(name, bodies(), window=WINDOW) == 1000
    finally:
        app.close()
    assert proxy.accepted > before_cut[0], "the publisher never reconnected"
    assert [m.payload["i"] for m in drain(broker, name)] == list(range(1000))


def test_the_cli_publishes_stdin_lines_in_bulk(tmp_path, any_broker, name):
    c = Consumerd(tmp_path, name, any_broker.url)
    lines = "".join(f'{{"i": {i}}}\n' + ("\n" if i % 100 == 0 else "") for i in range(N))
    done = cli(c, "publish", "--broker", any_broker.url, name, "-", "--header", "h=v", stdin=lines)
    assert done.returncode == 0, done.stderr
    assert f"published {N} message(s) to {name}" in done.stderr
    taken = drain(any_broker, name)
    assert [m.payload["i"] for m in taken] == list(range(N))
    assert all(m.headers == {"h": "v"} for m in taken)


def test_a_bad_stdin_line_is_exit_2_with_its_number_and_publishes_nothing(
    tmp_path, any_broker, name
):
    c = Consumerd(tmp_path, name, any_broker.url)
    lines = '{"i": 0}\n\n{"i": 1}\n{"i": 2,}\n{"i": 3}\n'
    done = cli(c, "publish", "--broker", any_broker.url, name, stdin=lines)
    assert done.returncode == 2
    assert done.stderr.startswith("consumerd: error: line 4: body is not JSON ("), done.stderr
    assert done.stderr.rstrip().endswith("'{\"i\": 2,}'; nothing published")
    assert len(done.stderr.strip().splitlines()) == 1
    assert any_broker.depth(name) == 0


def test_the_cli_names_the_lines_to_send_again_after_a_refusal(tmp_path, rabbit_policy, name):
    c = Consumerd(tmp_path, name, AMQP_URL)
    lines = "".join(f'{{"i": {i}}}\n' for i in range(1200))
    done = cli(c, "publish", "--broker", AMQP_URL, name, stdin=lines)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "consumerd: error: publish to amqp://guest:***@127.0.0.1:5672// failed: 250 of 1200 "
        "message(s) confirmed; not confirmed, to send again: line(s) 251-1200: "
        "the broker refused (nack) 750 message(s)"
    )
    assert rabbit_policy.depth(name) == 250
