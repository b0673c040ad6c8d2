"""SIGHUP: workers re-read the app and rebind without restarting or losing messages."""

from __future__ import annotations

import signal

from tests.consumer.conftest import publish_many, wait_for


def test_sighup_rebinds_without_restart_or_loss(consumerd, broker, name):
    a, b = f"{name}a", f"{name}b"
    consumerd.configure([{"name": a, "sleep": 0.05, "prefetch": 20}])
    publish_many(broker.url, a, 100)
    consumerd.start(workers=2)
    pids = consumerd.wait_workers(2)
    wait_for(lambda: len(consumerd.ids()) >= 20, 30, "some of A handled")

    # mid-stream: A gets a new prefetch and B appears
    consumerd.configure([{"name": a, "sleep": 0.05, "prefetch": 5}, {"name": b}])
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged(f"reloaded: consuming {a}(prefetch=5), {b}(prefetch=100)", 2)
    publish_many(broker.url, b, 50, start=1000)
    wait_for(lambda: len(consumerd.ids()) == 150, 60, "all of A and B handled")
    counts = consumerd.ids()
    assert set(counts) == set(range(100)) | set(range(1000, 1050))
    assert sum(counts.values()) == 150  # nothing handled twice, nothing lost
    assert sorted(consumerd.workers()) == sorted(pids)  # same processes

    # A goes away: its new messages stay queued, B keeps working
    consumerd.configure([{"name": b}])
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged(f"reloaded: consuming {b}(prefetch=100)", 2)
    publish_many(broker.url, a, 10, start=2000)
    publish_many(broker.url, b, 10, start=3000)
    wait_for(lambda: len(consumerd.ids()) == 160, 30, "the new B messages handled")
    assert broker.depth(a) == 10
    assert sorted(consumerd.workers()) == sorted(pids)
    assert consumerd.stop() == 0
    assert broker.depth(b) == 0
    assert broker.unacked() == 0


def test_broken_app_on_reload_keeps_consuming(consumerd, broker, name):
    consumerd.configure([{"name": name}])
    consumerd.start(workers=1)
    pids = consumerd.wait_workers(1)
    consumerd.wait_logged("consuming")
    with open(consumerd.config, "w") as f:
        f.write("{ not json")
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged("reload failed, the running configuration and consumers stay")
    publish_many(broker.url, name, 10)
    wait_for(lambda: len(consumerd.ids()) == 10, 20, "messages handled by the old app")
    assert consumerd.workers() == pids
    assert consumerd.stop() == 0
