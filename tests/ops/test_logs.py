"""--log-format json: every line a real master and its worker write parses back."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from consumerd.ops import logs
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def run_master(tmp_path: Path, fmt: str) -> tuple[str, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONTROL": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("log_master.py")), fmt],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for((tmp_path / "done").exists, 10, "the worker's messages")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err, proc.pid


def test_every_line_is_one_json_object_with_the_context(tmp_path):
    err, master_pid = run_master(tmp_path, "json")
    records = [json.loads(line) for line in err.splitlines()]  # fails on any non-JSON line
    assert records
    for record in records:
        assert {"time", "level", "logger", "message", "pid", "service", "worker_id"} <= set(record)
        assert record["time"].endswith("Z")

    handling = next(r for r in records if r["message"] == "handling m-1")
    worker_pid = handling["pid"]
    assert worker_pid != master_pid
    assert handling | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "app",
        "message": "handling m-1",
        "pid": worker_pid,
        "service": "consumers",
        "worker_id": 0,
        "queue": "orders",
        "message_id": "m-1",
        "attempt": 2,
    }
    failed = next(r for r in records if r["message"] == "handler failed")
    assert failed["level"] == "ERROR" and failed["queue"] == "orders"
    assert failed["exception"].startswith("Traceback")
    assert "ValueError: bad\npayload" in failed["exception"]
    # Outside the handler the message context is gone; the worker context stays.
    between = next(r for r in records if r["message"] == "between messages")
    assert "queue" not in between and between["worker_id"] == 0
    # The master's own records (the supervisor's) carry no worker.
    mastered = [r for r in records if r["pid"] == master_pid]
    assert mastered and all(r["worker_id"] is None and r["service"] is None for r in mastered)


def test_text_stays_the_default_format(tmp_path):
    err, _ = run_master(tmp_path, "text")
    line = next(line for line in err.splitlines() if "handling m-1" in line)
    assert " INFO [" in line and "] app: handling m-1" in line
    assert not line.startswith("{")


def test_the_formatter_keeps_odd_values_on_one_line():
    stream = io.StringIO()
    handler = logs.configure("DEBUG", "json", stream)
    try:
        log = logging.getLogger("odd")
        with logs.message("q", None):
            log.debug("naïve\r\nline", extra={"obj": object(), "n": 1.5}, stack_info=True)
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["message"] == "naïve\r\nline"
        assert record["queue"] == "q" and record["message_id"] is None
        assert record["obj"].startswith("<object object") and record["n"] == 1.5
        assert record["stack"].startswith("Stack (most recent call last)")
    finally:
        logging.getLogger().removeHandler(handler)
