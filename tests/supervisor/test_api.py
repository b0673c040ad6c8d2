"""The cotyledon 2.2 public API, its argument checks and the worker_id promise."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.helpers import pid_alive, wait_for

CHECKS = textwrap.dedent(
    """
    import uuid
    import consumerd as cotyledon

    class S(cotyledon.Service):
        pass

    def raises(exc, fn, *args):
        try:
            fn(*args)
        except exc:
            return True
        return False

    m = cotyledon.ServiceManager()
    sid = m.add(S, workers=2, args=(), kwargs={})
    print(isinstance(sid, uuid.UUID))
    print(raises(TypeError, m.add, "foo"))
    for bad in (0, -1, "2", 1.5, True, None):
        print(raises(ValueError, m.add, S, bad))
    print(raises(ValueError, m.reconfigure, uuid.uuid4(), 2))
    for bad in (0, -3, "4"):
        print(raises(ValueError, m.reconfigure, sid, bad))
    print(raises(TypeError, m.register_hooks, "not callable"))
    print(raises(RuntimeError, cotyledon.ServiceManager))
    print(S.name == "S" and cotyledon.Service.name == "Service")
    print(S.graceful_shutdown_timeout is None)
    """
)


def test_bad_arguments_raise_at_once() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert out == ["True"] * len(out) and len(out) == 16, out


def test_worker_ids_are_stable_across_respawns_and_scaling(master) -> None:
    m = master({"services": [{"name": "A", "workers": 3}]})
    live = m.wait_workers({0, 1, 2})
    # Past RespawnPolicy.healthy_after the respawn is immediate; the id is the same.
    time.sleep(1.1)
    os.kill(live[1], signal.SIGKILL)
    wait_for(lambda: not pid_alive(live[1]), 5, "the killed worker to be gone")
    after = m.wait_workers({0, 1, 2})
    assert after[1] != live[1] and after[0] == live[0] and after[2] == live[2]
    m.signal(signal.SIGTTIN)
    m.wait_workers({0, 1, 2, 3})
    # One at a time: the kernel merges a signal sent while the same one is pending.
    m.signal(signal.SIGTTOU)
    m.wait_workers({0, 1, 2})
    m.signal(signal.SIGTTOU)
    m.wait_workers({0, 1})
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    dead = [(r["wid"], r["code"]) for r in m.events("hook_dead_worker")]
    assert (1, -signal.SIGKILL) in dead


def test_exit_codes_of_service_methods(master) -> None:
    m = master(
        {
            "services": [
                {"name": "Code3", "workers": 1, "exit_code": 3},
                {"name": "TermRaises", "workers": 1, "terminate_raises": True},
                {"name": "Clean", "workers": 1},
            ]
        }
    )
    m.wait_workers({0}, "Code3")
    m.wait_workers({0}, "TermRaises")
    m.wait_workers({0}, "Clean")
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert sorted(r["code"] for r in m.events("hook_dead_worker")) == [0, 2, 3]
    out = m.output()
    for svc, status in (("Code3", 3), ("TermRaises", 2), ("Clean", 0)):
        pid = m.events("init", svc=svc)[0]["pid"]
        assert f"(pid {pid}) exited with status {status}" in out


def test_run_raising_exits_nonzero_and_is_respawned(master) -> None:
    m = master({"services": [{"name": "Boom", "workers": 1, "run_raises": True}]})
    m.wait_events("hook_dead_worker", 2, timeout=15)
    assert {r["code"] for r in m.events("hook_dead_worker")} == {2}
    assert len(m.events("init")) >= 2


def test_hooks_run_in_order_and_in_the_right_process(master) -> None:
    m = master({"services": [{"name": "A", "workers": 2}]})
    live = m.wait_workers({0, 1})
    new = m.wait_events("hook_new_worker", 2)
    assert {r["pid"] for r in new} == set(live.values())  # ran in the children
    assert {r["name"] for r in new} == {"A"}
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    master_pid = m.pid
    term = m.events("hook_terminate")
    assert [r["n"] for r in term] == [1, 2] and {r["pid"] for r in term} == {master_pid}
    assert {r["pid"] for r in m.events("hook_dead_worker")} == {master_pid}
    # on_terminate hooks ran before any worker was asked to stop
    assert max(r["t"] for r in term) <= min(r["t"] for r in m.events("terminate"))
