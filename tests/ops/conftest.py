"""A real master (tests/ops/master.py) with metrics and the ops endpoint, and an HTTP client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import pid_alive, wait_for

ROOT = Path(__file__).resolve().parents[2]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def samples(exposition: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of the samples called ``name`` in a text exposition."""
    found = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            found[head[len(name) :]] = float(value)
    return found


class OpsMaster:
    def __init__(self, tmp_path: Path, workers: int, counted: int, start_method: str) -> None:
        self.control = tmp_path / "control"
        self.control.mkdir()
        info_path = tmp_path / "info.json"
        config = {
            "workers": workers,
            "counted": counted,
            "control": str(self.control),
            "info": str(info_path),
            "start_method": start_method,
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.pop("CONSUMERD_METRICS_OWNER", None)
        self.log_path = tmp_path / "master.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("master.py")), json.dumps(config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        info = wait_for(lambda: info_path.exists() and info_path.read_text(), 10, "master up")
        info = json.loads(info)
        self.port: int = info["port"]
        self.directory = Path(info["directory"])
        self.pid: int = info["pid"]

    def get(self, path: str) -> tuple[int, str]:
        return get(self.port, path)

    def starts(self) -> list[dict[str, Any]]:
        path = self.control / "starts.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def wait_starts(self, count: int) -> list[dict[str, Any]]:
        return wait_for(
            lambda: len(self.starts()) >= count and self.starts(), 10, f"{count} worker starts"
        )

    def live_pids(self) -> set[int]:
        return {row["pid"] for row in self.starts() if pid_alive(row["pid"])}

    def report(self, connected: bool, consuming: bool) -> None:
        for name, on in (("connected", connected), ("consuming", consuming)):
            path = self.control / name
            if on:
                path.touch()
            else:
                path.unlink(missing_ok=True)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Leave nothing behind: a graceful stop removes the metrics directory itself."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.live_pids():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.log.close()


@pytest.fixture
def ops_master(tmp_path: Path) -> Iterator[Callable[..., OpsMaster]]:
    started: list[OpsMaster] = []

    def start(workers: int = 2, counted: int = 100, start_method: str = "fork") -> OpsMaster:
        master = OpsMaster(tmp_path, workers, counted, start_method)
        started.append(master)
        return master

    yield start
    for master in started:
        master.stop()
