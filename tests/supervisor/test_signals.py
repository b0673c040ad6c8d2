"""Every row of the master's signal table, with real processes and real signals."""

import os
import signal
import time

from tests.helpers import children_of, pid_alive, wait_for


def test_sigterm_stops_gracefully_and_exits_0(master) -> None:
    m = master({"services": [{"name": "A", "workers": 3, "terminate_sleep": 0.3}]})
    live = m.wait_workers({0, 1, 2})
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    # every worker ran terminate() to its end, none was killed
    assert {r["pid"] for r in m.events("terminated")} == set(live.values())
    assert sorted(r["code"] for r in m.events("hook_dead_worker")) == [0, 0, 0]
    assert not any(pid_alive(p) for p in live.values())


def test_a_sigterm_to_the_whole_group_stops_each_worker_once(master) -> None:
    """Ctrl-C's cousin: a SIGTERM to the process group (a shell's kill %1, systemd's
    control-group mode) reaches every worker along with the master's own: each worker
    stops once and says so once."""
    m = master({"services": [{"name": "A", "workers": 2, "terminate_sleep": 0.3}]}, own_group=True)
    live = m.wait_workers({0, 1})
    os.killpg(m.pid, signal.SIGTERM)
    assert m.wait_exit() == 0
    assert sorted(r["pid"] for r in m.events("terminated")) == sorted(live.values())
    caught = [line for line in m.log_path.read_text().splitlines() if "caught SIGTERM" in line]
    assert sorted(caught) == sorted(
        f"{pid} consumerd.supervisor.worker caught SIGTERM, stopping A({wid}) [{pid}] gracefully"
        for wid, pid in live.items()
    )


def test_sigint_stops_at_once_and_exits_1(master) -> None:
    m = master({"services": [{"name": "A", "workers": 2, "terminate_sleep": 30}]})
    live = m.wait_workers({0, 1})
    started = time.monotonic()
    m.signal(signal.SIGINT)
    assert m.wait_exit(timeout=5) == 1
    assert time.monotonic() - started < 3  # generous: proves terminate() was not awaited
    assert not m.events("terminate")
    assert not any(pid_alive(p) for p in live.values())


def test_sighup_runs_reload_hooks_then_reloads_workers(master) -> None:
    m = master({"services": [{"name": "R", "workers": 2, "reload": True}]})
    live = m.wait_workers({0, 1})
    m.signal(signal.SIGHUP)
    reloads = m.wait_events("reload", 2)
    hook = m.events("hook_reload")
    assert len(hook) == 1 and hook[0]["pid"] == m.pid
    assert hook[0]["t"] <= min(r["t"] for r in reloads)
    assert {r["pid"] for r in reloads} == set(live.values())
    assert m.live_workers() == live  # a service with reload() keeps its process


def test_sighup_without_reload_method_respawns_same_ids(master) -> None:
    m = master({"services": [{"name": "A", "workers": 2}]})
    live = m.wait_workers({0, 1})
    m.signal(signal.SIGHUP)
    wait_for(lambda: not any(pid_alive(p) for p in live.values()), 5, "old workers gone")
    after = m.wait_workers({0, 1})
    assert set(after.values()).isdisjoint(live.values())
    # they exited 0 after terminate(), and the master did not treat that as a crash
    assert [r["code"] for r in m.events("hook_dead_worker")] == [0, 0]
    assert "failed start" not in m.output()


def test_sigttin_sigttou_scale_every_service_never_below_one(master) -> None:
    m = master({"services": [{"name": "A", "workers": 1}, {"name": "B", "workers": 2}]})
    m.wait_workers({0}, "A")
    m.wait_workers({0, 1}, "B")
    m.signal(signal.SIGTTIN)
    m.wait_workers({0, 1}, "A")
    m.wait_workers({0, 1, 2}, "B")
    for expected_b in ({0, 1}, {0}, {0}):
        m.signal(signal.SIGTTOU)
        m.wait_workers({0}, "A")
        m.wait_workers(expected_b, "B")
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_sigchld_is_handled_in_the_loop_with_one_thread(master) -> None:
    """The master has a single thread, so it can only ever fork from the main thread."""
    m = master({"services": [{"name": "A", "workers": 2}]})
    live = m.wait_workers({0, 1})
    with open(f"/proc/{m.pid}/status") as f:
        assert "Threads:\t1\n" in f.read()
    time.sleep(1.1)  # healthy run
    os.kill(live[0], signal.SIGKILL)
    wait_for(lambda: not pid_alive(live[0]), 5, "killed worker gone")
    m.wait_workers({0, 1})
    with open(f"/proc/{m.pid}/status") as f:
        assert "Threads:\t1\n" in f.read()
    assert sorted(children_of(m.pid)) == sorted(m.live_workers().values())


def test_add_reader_runs_callbacks_in_the_master_loop(master) -> None:
    m = master({"reader": True, "services": [{"name": "A", "workers": 1}]})
    got = m.wait_events("reader", 1)
    assert got[0]["data"] == "hello from 0"
    assert got[0]["pid"] == m.pid and got[0]["threads"] == 1
