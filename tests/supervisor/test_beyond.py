"""What consumerd adds to cotyledon: respawn policy, orphans, systemd, titles, idle CPU,
start methods and PID 1."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import children_of, cpu_ticks, pid_alive, wait_for, zombies_of
from tests.supervisor.harness import TARGET


def test_idle_master_uses_no_cpu(master) -> None:
    m = master({"services": [{"name": "A", "workers": 4}]})
    m.wait_workers({0, 1, 2, 3})
    time.sleep(0.5)
    before = cpu_ticks(m.pid)
    time.sleep(3)
    assert cpu_ticks(m.pid) - before <= 1  # event-driven: no polling loop


def test_failed_start_backoff_resets_after_a_healthy_run(master, tmp_path) -> None:
    counter = tmp_path / "starts"
    m = master(
        {
            "services": [
                {
                    "name": "Flaky",
                    "workers": 1,
                    "crash_first": {"counter": str(counter), "times": 3},
                }
            ]
        }
    )
    live = m.wait_workers({0}, timeout=20)
    assert len(m.events("init")) == 4
    assert m.output().count("failed start #") == 3
    time.sleep(1.2)  # a healthy run
    os.kill(live[0], signal.SIGKILL)
    wait_for(lambda: not pid_alive(live[0]), 5, "killed")
    m.wait_workers({0}, timeout=10)
    # respawned at once: the back-off was reset (the decision is logged, no race on timing)
    assert m.output().count("failed start #") == 3


@pytest.mark.parametrize("mp", [None, "forkserver"])
def test_workers_exit_through_terminate_when_the_master_is_killed(master, mp) -> None:
    """PR_SET_PDEATHSIG (fork) and the pipe-EOF fallback (forkserver: the worker's
    parent is the fork server, so only the pipe tells)."""
    m = master({"mp": mp, "services": [{"name": "A", "workers": 3}]})
    live = m.wait_workers({0, 1, 2}, timeout=20)
    m.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: not any(pid_alive(p) for p in live.values()), 5, "orphans gone")
    assert time.monotonic() - killed < 2.0
    assert {r["pid"] for r in m.events("terminated")} == set(live.values())


@pytest.mark.parametrize("default", ["fork", "forkserver", "spawn"])
def test_workers_are_forked_whatever_pythons_default_start_method(master, default) -> None:
    """mp_context is the context in use, as in cotyledon, but never Python's default:
    under Python 3.14 (forkserver by default on Linux) the master still forks them."""
    m = master({"default_start_method": default, "services": [{"name": "A", "workers": 2}]})
    m.wait_workers({0, 1}, timeout=20)
    assert [r["start_method"] for r in m.events("master")] == ["fork"]
    assert {r["ppid"] for r in m.events("init")} == {m.pid}
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


@pytest.mark.parametrize("mp", ["spawn", "forkserver"])
def test_multiprocessing_start_methods(master, mp) -> None:
    m = master({"mp": mp, "services": [{"name": "A", "workers": 2}]})
    live = m.wait_workers({0, 1}, timeout=20)
    assert [r["start_method"] for r in m.events("master")] == [mp]
    parents = {r["ppid"] for r in m.events("init")}
    assert parents == {m.pid} if mp == "spawn" else m.pid not in parents  # the fork server's
    time.sleep(1.1)
    os.kill(live[0], signal.SIGKILL)
    wait_for(lambda: not pid_alive(live[0]), 5, "killed")
    after = m.wait_workers({0, 1}, timeout=20)
    assert after[0] != live[0]
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert len(m.events("terminated")) == 2


def test_process_titles(master) -> None:
    m = master({"services": [{"name": "Poller", "workers": 2}]})
    live = m.wait_workers({0, 1})

    def title(pid: int) -> str:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()

    assert title(m.pid).startswith("target.py: master process [")
    assert title(live[0]) == "target.py: Poller worker(0)"
    assert title(live[1]) == "target.py: Poller worker(1)"


def test_systemd_notify_protocol(master, tmp_path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        m = master(
            {"services": [{"name": "A", "workers": 3, "init_sleep": 0.3}]},
            env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
        )
        messages = []

        def receive_until(field: str) -> str:
            while True:
                msg = sock.recv(4096).decode()
                messages.append(msg)
                if field in msg.split("\n"):
                    return msg

        ready = receive_until("READY=1")
        # READY only once every initial worker had built its service
        assert len(m.events("init")) == 3
        assert "STATUS=3 workers running" in ready.split("\n")
        m.signal(signal.SIGHUP)
        reloading = receive_until("RELOADING=1")
        fields = dict(f.split("=", 1) for f in reloading.split("\n"))
        assert abs(int(fields["MONOTONIC_USEC"]) / 1e6 - time.monotonic()) < 5
        receive_until("READY=1")
        m.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert m.wait_exit() == 0
        assert messages.count("WATCHDOG=1") >= 2
    finally:
        sock.close()


def test_code_reload_keeps_the_master_pid_and_follows_a_switched_symlink(master, tmp_path) -> None:
    for version in (1, 2):
        release = tmp_path / f"release{version}"
        release.mkdir()
        (release / "appcode.py").write_text(f"VERSION = {version}\n")
        shutil.copy(TARGET, release / "main.py")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "release1")
    m = master(
        {"services": [{"name": "A", "workers": 3}]}, argv=[sys.executable, str(current / "main.py")]
    )
    old = m.wait_workers({0, 1, 2})
    assert {r["version"] for r in m.events("init")} == {1}

    tmp_link = tmp_path / "current.new"
    tmp_link.symlink_to(tmp_path / "release2")
    os.replace(tmp_link, current)  # an atomic deploy switch
    m.signal(signal.SIGUSR2)

    def all_new() -> bool:
        live = m.live_workers()
        return set(live) == {0, 1, 2} and set(live.values()).isdisjoint(old.values())

    wait_for(all_new, 30, "every worker replaced")
    wait_for(lambda: not any(pid_alive(p) for p in old.values()), 10, "old workers gone")
    assert m.proc.poll() is None and m.pid == m.proc.pid
    new_inits = [r for r in m.events("init") if r["pid"] not in old.values()]
    assert {r["version"] for r in new_inits} == {2}
    assert {r["ppid"] for r in new_inits} == {m.pid}  # same master pid
    # each old worker drained through terminate()...
    assert {r["pid"] for r in m.events("terminated")} == set(old.values())
    # ...and only once its replacement had built its service (what the master waits for
    # before it stops the old one): start the new, then stop the old, per slot. The
    # events file is appended in the order of events.
    order = {(r["e"], r["pid"]): n for n, r in enumerate(m.events())}
    for r in new_inits:
        assert order[("init", r["pid"])] < order[("terminate", old[r["wid"]])], r
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_code_reload_waits_for_the_children_the_master_watches(master, tmp_path) -> None:
    """A child the master watches (the web page's dead-letter action) would be unknown to
    the re-executed image and its outcome lost: the reload waits for it to exit."""
    release = tmp_path / "release-the-child"
    m = master({"services": [{"name": "A", "workers": 1}], "watched_child": str(release)})
    old = m.wait_workers({0})
    m.signal(signal.SIGUSR2)
    wait_for(lambda: "waiting for pid" in m.log_path.read_text(), 10, "the reload to wait")
    assert m.live_workers() == old  # nothing replaced while the child runs
    release.touch()
    wait_for(lambda: m.live_workers().keys() == {0} and m.live_workers() != old, 30, "reload")
    (exited,) = m.events("child_exit")
    assert exited["code"] == 3 and exited["pid"] == m.pid
    order = {(r["e"], r["pid"]): n for n, r in enumerate(m.events())}
    assert order[("child_exit", m.pid)] < order[("init", m.live_workers()[0])]
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root for a PID namespace",
)
def test_master_as_pid_1_reaps_orphans_and_obeys_signals(tmp_path) -> None:
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "EVENTS": str(events), "PYTHONPATH": str(TARGET.parents[2])}
    config = '{"services": [{"name": "A", "workers": 2, "grandchild": true}]}'
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, str(TARGET), config],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: events.exists() and events.read_text().count('"e": "run"') >= 2,
            15,
            "workers running",
        )
        inner = wait_for(lambda: children_of(proc.pid), 5, "the namespace's pid 1")[0]
        with open(f"/proc/{inner}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:"))
        assert nspid.split()[-1] == "1"  # the master is pid 1 of its namespace
        # the grandchildren orphaned by the workers (sleep 0.3 s) are reaped by pid 1
        time.sleep(1.0)
        assert zombies_of(inner) == []
        os.kill(inner, signal.SIGTERM)
        assert proc.wait(10) == 0
        assert events.read_text().count('"e": "terminated"') == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_service_that_announces_ready_is_started_only_once_it_says_so(master, tmp_path) -> None:
    gate = tmp_path / "ready"
    m = master(
        {
            "services": [
                {"name": "Late", "workers": 2, "ready_after": str(gate)},
                {"name": "Plain", "workers": 1},
            ]
        }
    )
    m.wait_events("run", 3)
    # A barrier: the master reads its status pipe before it handles a signal, so any
    # announcement made before the SIGTTIN is counted once its log line is out.
    m.signal(signal.SIGTTIN)
    wait_for(lambda: "SIGTTIN: now [3, 2] workers" in m.output(), 10, "SIGTTIN handled")
    assert "all workers started" not in m.output()
    gate.touch()
    wait_for(
        lambda: "all workers started: 5 workers running" in m.output(), 10, "all workers started"
    )
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
