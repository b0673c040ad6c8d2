"""SIGHUP to a real master re-reads its TOML file: a broken file is rejected with a clear
log line and changes nothing; a good one applies the worker count at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import pid_alive, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_sighup_rejects_a_broken_file_and_applies_a_good_one(tmp_path):
    path = tmp_path / "consumerd.toml"
    path.write_text("workers = 1\nlog-format = 'json'\n")
    log_path = tmp_path / "master.log"
    starts = tmp_path / "starts.jsonl"

    def live() -> dict[int, int]:
        rows = [json.loads(x) for x in starts.read_text().splitlines()] if starts.exists() else []
        return {r["worker_id"]: r["pid"] for r in rows if pid_alive(r["pid"])}

    def records() -> list[dict]:
        return [json.loads(line) for line in log_path.read_text().splitlines()]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONTROL": str(tmp_path)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("reload_master.py")),
             "--config", str(path)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: set(live()) == {0}, 10, "one worker")

        path.write_text("workers = 3\nprefetch = \n")  # not TOML
        proc.send_signal(signal.SIGHUP)
        rejected = wait_for(
            lambda: [r for r in records() if r["message"].startswith("reload rejected")],
            10, "the rejection",
        )
        assert rejected[0]["level"] == "ERROR"
        assert f"config file {path} is not valid TOML" in rejected[0]["message"]

        path.write_text("workers = 2\nlog-format = 'json'\nmetrics-port = 9999\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(live()) == {0, 1}, 10, "two workers")
        messages = [r["message"] for r in records()]
        assert "reloaded: ['workers']" in messages
        assert "metrics_port changed from None to 9999: applies at the next restart" in messages
        # The broken file never took effect: at no point were there three workers.
        assert 2 not in {json.loads(x)["worker_id"] for x in starts.read_text().splitlines()}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in live().values():
            os.kill(pid, signal.SIGKILL)
