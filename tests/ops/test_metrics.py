"""Worker-side recording and master-side reading, each case in a fresh interpreter (metrics
can be enabled once per process, as in a real master)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str, *args: str) -> dict:
    """Run ``code`` as a script (``sys.argv[0]`` is its path); returns its last line's JSON."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PROMETHEUS_MULTIPROC_DIR", "CONSUMERD_METRICS_OWNER")
    }
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(textwrap.dedent(code))
    try:
        result = subprocess.run(
            [sys.executable, script.name, *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.unlink(script.name)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_counts_are_batched_then_flushed_and_durations_land_in_their_buckets():
    out = run("""
        import json, os, time
        import prometheus_client  # imported before enable(): must not matter
        from consumerd.ops import metrics
        master = metrics.enable()

        def value(name, labels='{consumer="c"}'):
            for line in master.exposition().decode().splitlines():
                if line.startswith(name + labels + " "):
                    return float(line.rsplit(" ", 1)[1])
            return None

        c = metrics.for_consumer("c")
        assert metrics.for_consumer("c") is c
        c.received()
        with c.handling():
            during = value("consumerd_messages_in_flight")
            time.sleep(0.003)
        c.acked()
        before = value("consumerd_messages_received_total")
        falling = value("consumerd_messages_in_flight")  # written lazily on the way down
        metrics.flush()
        print(json.dumps({
            "in_flight_during": during,
            "in_flight_before_flush": falling,
            "in_flight_after": value("consumerd_messages_in_flight"),
            "received_before_flush": before,
            "received": value("consumerd_messages_received_total"),
            "acked": value("consumerd_messages_acked_total"),
            "le_0025": value("consumerd_handler_duration_seconds_bucket",
                             '{consumer="c",le="0.0025"}'),
            "le_inf": value("consumerd_handler_duration_seconds_bucket",
                            '{consumer="c",le="+Inf"}'),
            "slept": value("consumerd_handler_duration_seconds_sum") >= 0.003,
            "count": value("consumerd_handler_duration_seconds_count"),
        }))
        master.close()
    """)
    assert out == {
        "in_flight_during": 1.0,
        "in_flight_before_flush": 1.0,
        "in_flight_after": 0.0,
        "received_before_flush": 0.0,
        "received": 1.0,
        "acked": 1.0,
        "le_0025": 0.0,
        "le_inf": 1.0,
        "slept": True,
        "count": 1.0,
    }


def test_counts_are_flushed_by_time_without_an_explicit_flush():
    out = run("""
        import json, time
        from consumerd.ops import metrics
        master = metrics.enable()
        c = metrics.for_consumer("c")
        c.received()
        time.sleep(metrics.FLUSH_INTERVAL + 0.05)
        c.acked()  # the first call past the interval writes everything
        text = master.exposition().decode()
        print(json.dumps({"received": 'consumerd_messages_received_total{consumer="c"} 1.0' in text,
                          "acked": 'consumerd_messages_acked_total{consumer="c"} 1.0' in text}))
        master.close()
    """)
    assert out == {"received": True, "acked": True}


def test_off_unless_enabled_and_enabled_once():
    out = run("""
        import json
        from consumerd.ops import metrics
        off = metrics.for_consumer("c")
        off.received()
        with off.handling():
            pass
        metrics.set_connected(True)
        master = metrics.enable()
        try:
            metrics.enable()
            twice = "allowed"
        except RuntimeError:
            twice = "refused"
        print(json.dumps({"off": type(off).__name__, "twice": twice}))
        master.close()
    """)
    assert out == {"off": "ConsumerMetrics", "twice": "refused"}


def test_a_code_reload_keeps_the_directory_and_the_counts():
    # Re-executing the master (SIGUSR2) keeps its pid: the new image finds its directory.
    out = run(
        """
        import json, os, sys, uuid
        from consumerd.ops import metrics
        master = metrics.enable()
        sid = uuid.UUID(int=1)
        master.name_service(sid, "svc")
        master.worker_died(sid, 0, -9)
        if sys.argv[1] == "first":
            os.execv(sys.executable, [sys.executable, sys.argv[0], "second", master.directory])
        text = master.exposition().decode()
        restarts = 'consumerd_worker_restarts_total{service="svc"} 2.0' in text
        print(json.dumps({"same_dir": master.directory == sys.argv[2], "restarts": restarts}))
        master.close()
    """,
        "first",
    )
    assert out == {"same_dir": True, "restarts": True}


def test_readiness_counts_reporting_workers_and_forgets_dead_ones():
    out = run("""
        import json, os, uuid
        from consumerd.ops import metrics
        master = metrics.enable()
        steps = {"none": master.readiness(1)}
        reported_r, reported_w = os.pipe()
        leave_r, leave_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: reports, then waits for the master to let it exit
            metrics.bind_worker("svc", 0)
            metrics.set_connected(True)
            metrics.set_consuming(True)
            os.write(reported_w, b"x")
            os.read(leave_r, 1)
            os._exit(0)
        os.read(reported_r, 1)
        steps["short"] = master.readiness(2)
        steps["ready"] = master.readiness(1)
        steps["workers"] = {str(k == pid): [v.service, v.worker_id]
                            for k, v in master.workers().items()}
        os.write(leave_w, b"x")
        os.waitpid(pid, 0)
        master.worker_died(uuid.UUID(int=1), 0, 0)  # no pid: it sweeps
        steps["after"] = master.readiness(None)
        steps["files"] = sorted(f for f in os.listdir(master.directory) if str(pid) in f)
        print(json.dumps(steps))
        master.close()
    """)
    assert out == {
        "none": [False, "no worker has reported yet"],
        "short": [False, "1 of 2 workers have reported"],
        "ready": [True, "1 workers connected and consuming"],
        "workers": {"True": ["svc", "0"]},
        "after": [False, "no worker has reported yet"],
        "files": [],
    }


def test_respawn_backoff_is_refreshed_before_each_scrape():
    out = run("""
        import json, uuid
        from consumerd.ops import endpoints, metrics
        master = metrics.enable()
        a, b = uuid.UUID(int=1), uuid.UUID(int=2)
        master.name_service(a, "a")
        master.name_service(b, "b")
        pending = {a: 4.0}
        scrape = endpoints.routes(master, before_scrape=lambda: master.set_backoff(pending))
        first = scrape["/metrics"]().body.decode()
        pending.clear()
        second = scrape["/metrics"]().body.decode()
        def line(text, name):
            head = f'consumerd_respawn_backoff_seconds{{service="{name}"}}'
            return [x for x in text.splitlines() if x.startswith(head)]

        print(json.dumps([line(first, "a"), line(first, "b"), line(second, "a")]))
        master.close()
    """)
    assert out == [
        ['consumerd_respawn_backoff_seconds{service="a"} 4.0'],
        ['consumerd_respawn_backoff_seconds{service="b"} 0.0'],
        ['consumerd_respawn_backoff_seconds{service="a"} 0.0'],
    ]


def test_a_program_a_worker_runs_does_not_record_into_the_masters_directory():
    out = run("""
        import json, os, subprocess, sys
        from consumerd.ops import metrics
        master = metrics.enable()
        probe = "from consumerd.ops import metrics; print(type(metrics.for_consumer('x')).__name__)"
        spawned = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a forked worker running a program of its own
            result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
            os.write(w, result.stdout.strip().encode())
            os._exit(0)
        os.waitpid(pid, 0)
        program = os.read(r, 100).decode()
        print(json.dumps({"worker": spawned.stdout.strip(), "its program": program}))
        master.close()
    """)
    assert out == {"worker": "_Recording", "its program": "ConsumerMetrics"}
