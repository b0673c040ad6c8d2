"""The bugs reproduced against cotyledon 2.2; consumerd must not have any of them."""

import itertools
import os
import re
import signal
import time

from tests.helpers import children_of, pid_alive, wait_for


def test_signal_to_a_freshly_forked_worker_stays_in_that_worker(master) -> None:
    """cotyledon bug 1: the child inherits the master's handlers and wakeup fd, so a
    SIGTERM sent to a newborn worker is read by the master, which shuts down."""
    m = master({"services": [{"name": "Slow", "workers": 2, "init_sleep": 0.5}]})
    hit = set()
    deadline = time.monotonic() + 8
    while len(hit) < 6 and time.monotonic() < deadline:
        for pid in children_of(m.pid):
            if pid not in hit:
                os.kill(pid, signal.SIGTERM)  # before or while the worker sets itself up
                hit.add(pid)
        time.sleep(0.002)
    assert len(hit) >= 6
    assert m.proc.poll() is None, m.output()
    assert not m.events("hook_terminate")  # the master never began a shutdown
    m.wait_workers({0, 1}, timeout=30)  # and it still runs its workers
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_reconfigure_down_stops_extras_at_once_and_never_respawns_them(master) -> None:
    """cotyledon bug 2."""
    m = master({"services": [{"name": "A", "workers": 4}], "reload_workers": 2})
    live = m.wait_workers({0, 1, 2, 3})
    m.signal(signal.SIGHUP)  # the on_reload hook reconfigures to 2
    wait_for(lambda: not pid_alive(live[2]) and not pid_alive(live[3]), 5, "extras stopped")
    assert {r["wid"] for r in m.events("terminated")} >= {2, 3}
    # Reaped: the loop step that reaps a worker also fills every slot it still wants.
    wait_for(
        lambda: {r["wid"] for r in m.events("hook_dead_worker")} >= {2, 3}, 10, "extras reaped"
    )
    # A barrier instead of a sleep: a kept slot's worker killed now is respawned by a
    # later loop step than the one that reaped the extras, so once its replacement runs,
    # a respawn of an extra would have happened already.
    reloaded = m.events("hook_reload")[0]["t"]

    def started_since() -> list[dict]:
        return [r for r in m.events("init") if r["t"] > reloaded]

    # The service has no reload(): SIGHUP restarts the kept workers, once each.
    wait_for(lambda: {r["wid"] for r in started_since()} >= {0, 1}, 10, "kept ones restarted")
    kept = m.wait_workers({0, 1})
    os.kill(kept[1], signal.SIGKILL)
    wait_for(lambda: m.live_workers().get(1, kept[1]) != kept[1], 10, "worker 1 replaced")
    m.wait_workers({0, 1})
    assert sorted(r["wid"] for r in started_since()) == [0, 1, 1]


def test_master_graceful_timeout_fires_while_a_child_is_stuck(master) -> None:
    """cotyledon bug 3: a worker whose terminate() never returns (its own timeout is 0,
    wait for ever) is killed when the master's timeout expires."""
    m = master(
        {
            "graceful": 1,
            "services": [{"name": "Stuck", "workers": 1, "graceful": 0, "terminate_sleep": 3600}],
        }
    )
    live = m.wait_workers({0})
    started = time.monotonic()
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=10) == 0
    assert 0.9 < time.monotonic() - started < 6
    assert not pid_alive(live[0])
    assert [r["code"] for r in m.events("hook_dead_worker")] == [-signal.SIGKILL]


def test_shutdown_from_a_hook_in_the_main_thread_does_not_deadlock(master) -> None:
    """cotyledon bug 4."""
    m = master({"services": [{"name": "A", "workers": 2}], "reload_shutdown": True})
    m.wait_workers({0, 1})
    m.signal(signal.SIGHUP)
    assert m.wait_exit(timeout=10) == 0
    assert m.events("shutdown_returned")
    assert len(m.events("terminated")) == 2


def test_a_crash_loop_backs_off_per_slot_without_stalling_the_rest(master) -> None:
    """cotyledon bug 5: one global rate limit with a blocking sleep(5)."""
    m = master(
        {
            "services": [
                {"name": "Crash", "workers": 1, "crash_init": True},
                {"name": "Good", "workers": 2},
            ]
        }
    )
    good = m.wait_workers({0, 1}, "Good")
    m.wait_events("init", 5, timeout=20, svc="Crash")
    starts = [r["t"] for r in m.events("init", svc="Crash")]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[-1] > gaps[0] * 2, gaps  # exponential back-off, not a fixed rate
    # While Crash backs off, a healthy worker that dies is replaced at once.
    os.kill(good[1], signal.SIGKILL)
    wait_for(lambda: not pid_alive(good[1]), 5, "killed")
    m.wait_workers({0, 1}, "Good", timeout=10)
    # The master's decision, not a race against the clock: no back-off for that slot.
    assert not re.search(r"worker 1 [^\n]*\(failed start #", m.output())
    # and signals are handled at once
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=5) == 0
    assert "failed start #" in m.output()
