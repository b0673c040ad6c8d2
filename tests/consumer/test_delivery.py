"""At-least-once delivery on the real Redis and RabbitMQ: counted in and out."""

from __future__ import annotations

import signal
import time

from tests.consumer.conftest import publish_many, wait_for

N = 1500


def test_consumes_everything_once(consumerd, broker, name):
    consumerd.configure([{"name": name}])
    consumerd.start(workers=2)
    # Both consuming before anything is published: a worker that comes up first could
    # otherwise take a whole pre-filled queue on a fast machine (or a loaded one).
    consumerd.wait_logged(f"consuming {name} from", count=2)
    publish_many(broker.url, name, N)
    wait_for(lambda: len(consumerd.ids()) == N, 60, "all messages handled")
    assert consumerd.stop() == 0
    ids = consumerd.ids()
    assert set(ids) == set(range(N))
    assert sum(ids.values()) == N  # no duplicates without failures
    assert len({r.pid for r in consumerd.records()}) == 2  # both workers consumed
    assert broker.depth(name) == 0
    assert broker.unacked() == 0


def test_sigterm_mid_stream_hands_back_prefetched(consumerd, broker, name):
    """SIGTERM: the handler in flight finishes and is acked, every prefetched message is
    back in the queue at once (Redis too), then a new run handles the rest."""
    consumerd.configure([{"name": name, "sleep": 0.002, "prefetch": 100}])
    publish_many(broker.url, name, N)
    consumerd.start(workers=2)
    wait_for(lambda: len(consumerd.ids()) >= 200, 30, "200 messages handled")
    started = time.monotonic()
    assert consumerd.stop() == 0
    stop_seconds = time.monotonic() - started
    handled = consumerd.ids()
    assert sum(handled.values()) == len(handled)
    # nothing stuck as unacked: what was not handled is ready in the queue right now
    assert broker.unacked() == 0
    wait_for(
        lambda: broker.depth(name) == N - len(handled), 5, "unhandled messages back in the queue"
    )
    assert stop_seconds < 5
    consumerd.start(workers=2)
    wait_for(lambda: len(consumerd.ids()) == N, 60, "the rest handled")
    assert consumerd.stop() == 0
    assert set(consumerd.ids()) == set(range(N))
    assert sum(consumerd.ids().values()) == N


def test_sigterm_waits_for_the_handler_in_flight(consumerd, broker, name):
    consumerd.configure([{"name": name, "sleep": 1.5}])
    publish_many(broker.url, name, 3)
    consumerd.start(workers=1)
    wait_for(lambda: len(consumerd.started()) == 2, 15, "the second handler started")
    assert consumerd.stop() == 0  # SIGTERM while the second handler (1.5 s) runs
    handled = consumerd.ids()
    assert sorted(handled.elements()) == sorted(consumerd.started()[:2])
    assert broker.unacked() == 0
    wait_for(lambda: broker.depth(name) == 1, 5, "the third message back in the queue")


def test_handler_past_graceful_timeout_is_not_acked(consumerd, broker, name):
    consumerd.configure([{"name": name, "sleep": 30}])
    publish_many(broker.url, name, 2)
    consumerd.start("--graceful-timeout", "1", workers=1)
    wait_for(consumerd.started, 15, "the handler started")
    consumerd.stop()
    assert consumerd.ids() == {}
    # both the stuck message and the prefetched one are handed back, none acked
    wait_for(lambda: broker.depth(name) == 2, 10, "both messages back in the queue")


def test_sigkill_of_a_worker_mid_stream_loses_nothing(consumerd, broker, name):
    url = broker.consumer_url(visibility_timeout=3) if broker.kind == "redis" else broker.url
    consumerd.configure([{"name": name, "sleep": 0.002, "prefetch": 50}])
    publish_many(broker.url, name, N)
    consumerd.start(workers=2, url=url)
    victim = consumerd.wait_workers(2)[0]
    wait_for(lambda: len(consumerd.ids()) >= 300, 30, "300 messages handled")
    signal_time = time.monotonic()
    import os

    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in consumerd.workers() and len(consumerd.workers()) == 2,
        15,
        "the killed worker respawned",
    )
    wait_for(lambda: len(consumerd.ids()) == N, 60, "all messages handled")
    assert time.monotonic() - signal_time < 60
    assert consumerd.stop() == 0
    ids = consumerd.ids()
    assert set(ids) == set(range(N))
    duplicates = sum(ids.values()) - N
    assert duplicates <= 50 + 1  # at most the victim's prefetch window and its handler
    assert broker.depth(name) == 0
