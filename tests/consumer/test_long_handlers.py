"""Long handlers and dead connections on the real RabbitMQ: AMQP heartbeats, the pulse
thread that keeps a connection alive while an inline handler runs, and the warning
before the broker's consumer_timeout."""

from __future__ import annotations

import time

import pytest

from tests.consumer.conftest import AMQP_URL, Broker, Proxy, check_broker, publish_many
from tests.helpers import wait_for


@pytest.fixture
def broker(name):
    check_broker(AMQP_URL)
    return Broker("amqp", AMQP_URL, "", name)


@pytest.fixture
def proxy(broker):
    p = Proxy(5672)
    yield p
    p.cut()


def test_a_silently_dead_connection_is_seen_and_replaced(consumerd, broker, proxy, name):
    """The path to the broker stops forwarding without closing (no RST, no FIN): the
    worker sees it by heartbeats within a few intervals, reconnects, and nothing is lost."""
    heartbeat = 2
    proxy.resume()
    consumerd.configure([{"name": name, "sleep": 0.01, "prefetch": 10}])
    consumerd.start(workers=1, url=broker.consumer_url(proxy.port, heartbeat=heartbeat))
    consumerd.wait_logged(f"consuming {name} from")
    publish_many(broker.url, name, 300)
    wait_for(lambda: len(consumerd.ids()) >= 50, 30, "50 messages handled")
    proxy.freeze()
    frozen_at = time.monotonic()
    consumerd.wait_logged("lost the broker", timeout=60)
    seen_after = time.monotonic() - frozen_at
    wait_for(lambda: proxy.accepted >= 2, 30, "a new connection")
    publish_many(broker.url, name, 100, start=300)
    wait_for(lambda: set(consumerd.ids()) == set(range(400)), 60, "every message handled")
    assert consumerd.stop() == 0
    ids = consumerd.ids()
    # Redelivered at most: the prefetch window of the dead connection.
    assert sum(ids.values()) - 400 <= 10 + 1
    assert broker.unacked() == 0 and broker.depth(name) == 0
    # Mechanism bound only (2 missed intervals + a check): without heartbeats, never.
    assert seen_after < 10 * heartbeat, seen_after


def test_an_inline_handler_longer_than_the_heartbeat_keeps_its_connection(consumerd, broker, name):
    """A 7 s handler with 2 s heartbeats: the broker would close a silent connection after
    ~2 intervals and redeliver; the pulse thread's heartbeats keep it, so the message is
    handled once. With consumer_timeout said to be 5 s, the wait is warned about."""
    consumerd.configure([{"name": name, "sleep": 7}])
    publish_many(broker.url, name, 2)
    consumerd.start(workers=1, url=broker.consumer_url(heartbeat=2, consumer_timeout=5))
    wait_for(lambda: len(consumerd.ids()) == 2, 40, "both messages handled")
    assert consumerd.stop() == 0
    assert consumerd.logged("lost the broker") == 0
    assert sorted(consumerd.ids().elements()) == [0, 1]
    assert not any(r.redelivered for r in consumerd.records())
    # 0.8 x 5 s: the first message (4 s into its 7 s) and the second (waiting behind it)
    assert consumerd.logged(f"{name}: a message has been unacked for") >= 1
    assert broker.unacked() == 0 and broker.depth(name) == 0
