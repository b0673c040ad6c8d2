"""README promises of the supervision core that had no test (issue #14): a worker past
its graceful timeout, systemd around a code reload and the watchdog period, raising hooks,
the respawn back-off (SIGHUP reset, cap, jitter, ``respawn_policy=``).

Real master processes and real signals; timing is only checked against the master's own
logged decisions or with generous bounds that prove a mechanism works at all."""

import itertools
import os
import re
import signal
import socket
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from tests.helpers import pid_alive, wait_for

PROMISES_TARGET = str(Path(__file__).with_name("promises_target.py"))
DECISION = re.compile(
    r"worker (\d+) [^\n]*? [\d.]+s after start \(failed start #(\d+)\): respawning in ([\d.]+)s"
)


def decisions(output: str) -> dict[int, list[tuple[int, float]]]:
    """Per worker id, the master's logged back-off decisions: (failure number, delay)."""
    found: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for wid, n, delay in DECISION.findall(output):
        found[int(wid)].append((int(n), float(delay)))
    return found


def test_worker_past_its_graceful_timeout_exits_with_status_1(master) -> None:
    """terminate() overruns the service's own 0.5 s: the worker exits by itself with
    status 1, long before terminate() would have returned and well before the master's
    own deadline (which would SIGKILL it)."""
    m = master(
        {
            "graceful": 60,
            "services": [{"name": "Slow", "workers": 2, "graceful": 0.5, "terminate_sleep": 30}],
        }
    )
    live = m.wait_workers({0, 1})
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=20) == 0  # not 30 s (terminate's sleep) nor 60 s (master's)
    assert sorted(r["code"] for r in m.events("hook_dead_worker")) == [1, 1]
    assert len(m.events("terminate")) == 2 and m.events("terminated") == []
    out = m.output()
    assert out.count("graceful shutdown timeout (0.5s) exceeded") == 2
    for pid in live.values():
        assert f"(pid {pid}) exited with status 1" in out
    assert "did not stop in time, killing it" not in out


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock, path


def test_systemd_reloading_then_ready_around_a_code_reload(master, tmp_path) -> None:
    sock, path = notify_socket(tmp_path)
    try:
        m = master({"services": [{"name": "A", "workers": 2}]}, env={"NOTIFY_SOCKET": path})

        def receive_until(field: str) -> list[str]:
            while True:
                fields = sock.recv(4096).decode().split("\n")
                if field in fields:
                    return fields

        receive_until("READY=1")
        old = m.wait_workers({0, 1})
        m.signal(signal.SIGUSR2)
        reloading = receive_until("RELOADING=1")
        at = time.monotonic()
        usec = dict(f.split("=", 1) for f in reloading)["MONOTONIC_USEC"]
        assert abs(int(usec) / 1e6 - at) < 5  # CLOCK_MONOTONIC, in microseconds
        # the old workers were still there when RELOADING=1 was sent ...
        assert all(pid_alive(p) for p in old.values()) or m.events("terminate")
        receive_until("READY=1")
        # ... and READY=1 comes once every one of them was replaced and has exited
        assert not any(pid_alive(p) for p in old.values())
        live = m.live_workers()
        assert set(live) == {0, 1} and set(live.values()).isdisjoint(old.values())
        assert m.proc.poll() is None
        m.signal(signal.SIGTERM)
        assert m.wait_exit() == 0
    finally:
        sock.close()


def test_watchdog_is_pinged_at_half_of_watchdog_usec(master, tmp_path) -> None:
    sock, path = notify_socket(tmp_path)
    try:
        m = master(
            {"services": [{"name": "A", "workers": 1}]},
            env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"},
        )
        pings: list[float] = []
        while len(pings) < 6:
            if "WATCHDOG=1" in sock.recv(4096).decode().split("\n"):
                pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # every 1 s (half of 2 s): never early, and far from the full period
        assert 0.9 < statistics.median(gaps) < 1.6, gaps
        assert min(gaps) > 0.8, gaps
        m.signal(signal.SIGTERM)
        assert m.wait_exit() == 0
    finally:
        sock.close()


def test_a_raising_hook_does_not_stop_the_other_hooks(master) -> None:
    m = master(
        {"services": [{"name": "R", "workers": 1, "reload": True}], "raising_hooks": True},
        argv=[sys.executable, PROMISES_TARGET],
    )
    live = m.wait_workers({0})
    m.signal(signal.SIGHUP)
    m.wait_events("reload", 1)  # the workers still got their SIGHUP after the hooks
    assert [r["n"] for r in m.events("hook_reload")] == [1, 2]
    os.kill(live[0], signal.SIGKILL)
    m.wait_events("hook_dead_worker", 3)  # target's own, the raising one, the last one
    m.wait_workers({0})  # and the worker was replaced
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert [r["n"] for r in m.events("hook_terminate")] == [1, 2]
    assert [r.get("n") for r in m.events("hook_dead_worker")][1:3] == [1, 2]
    out = m.output()
    for kind in ("reload", "terminate", "dead_worker"):
        assert f"RuntimeError: first {kind} hook fails" in out
    assert out.count(" raised") >= 4  # each logged (dead_worker twice: kill and stop)


def test_sighup_resets_the_back_off_of_a_crash_looping_slot(master) -> None:
    """After its first failed start the slot waits 15-30 s; a SIGHUP respawns it at once
    and the next failure is counted as the first again."""
    m = master(
        {
            "services": [{"name": "Crash", "workers": 1, "crash_init": True}],
            "policy": {"base_delay": 30, "max_delay": 60},
        },
        argv=[sys.executable, PROMISES_TARGET],
    )
    wait_for(lambda: decisions(m.output())[0], 15, "the first back-off decision")
    [(n, delay)] = decisions(m.output())[0]
    assert n == 1 and 15 <= delay <= 30
    assert len(m.events("init")) == 1
    hup = time.monotonic()
    m.signal(signal.SIGHUP)
    m.wait_events("init", 2, timeout=10)
    assert time.monotonic() - hup < 10 < delay  # not the 15-30 s the slot was waiting out
    wait_for(lambda: len(decisions(m.output())[0]) == 2, 10, "the second decision")
    assert decisions(m.output())[0][1][0] == 1  # failed start #1 again: the count was reset
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_respawn_policy_back_off_grows_is_capped_and_jittered_per_slot(master) -> None:
    """RespawnPolicy(base_delay=0.2, max_delay=0.8): the n-th failed start of a slot waits
    between half and all of min(0.8, 0.2 * 2**(n-1)); slots draw their own jitter."""
    m = master(
        {
            "services": [{"name": "Crash", "workers": 2, "crash_init": True}],
            "policy": {"base_delay": 0.2, "max_delay": 0.8, "healthy_after": 5},
        },
        argv=[sys.executable, PROMISES_TARGET],
    )
    wait_for(
        lambda: all(len(decisions(m.output())[w]) >= 7 for w in (0, 1)), 60, "7 failures per slot"
    )
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    found = decisions(m.output())
    inits: dict[int, list[float]] = defaultdict(list)
    for r in m.events("init"):
        inits[r["wid"]].append(r["t"])
    for wid in (0, 1):
        made = found[wid][:7]
        assert [n for n, _ in made] == list(range(1, 8))
        for n, delay in made:
            ceiling = min(0.8, 0.2 * 2 ** (n - 1))
            assert ceiling / 2 - 0.01 <= delay <= ceiling + 0.01, (wid, made)
        # it grew until the cap, then stayed within cap/2 .. cap
        assert made[0][1] <= 0.2 and max(d for _, d in made[3:]) <= 0.81
        # each respawn waited at least its delay (and came: a generous upper bound)
        starts = inits[wid]
        for (_, delay), a, b in zip(made, starts, starts[1:], strict=False):
            assert delay - 0.05 <= b - a <= delay + 5, (wid, made, starts)
    # jitter: the two slots, failing together, do not draw the same delays
    assert [d for _, d in found[0][:7]] != [d for _, d in found[1][:7]]
    assert len({d for _, d in found[0][2:7]}) > 1  # nor one slot a fixed capped delay
