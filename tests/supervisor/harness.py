"""Run tests/supervisor/target.py as a real master process and read what it recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import pid_alive, wait_for

TARGET = Path(__file__).with_name("target.py")


class Master:
    """A running target master; ``events`` are the JSON lines its processes wrote."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict[str, Any],
        *,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        own_group: bool = False,
    ) -> None:
        """``own_group``: the master leads a process group of its own, as a shell's job
        does, so that a test can signal the whole group."""
        self.events_path = tmp_path / f"events-{os.urandom(4).hex()}.jsonl"
        self.log_path = tmp_path / "master.log"
        full_env = {**os.environ, "EVENTS": str(self.events_path), **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).parents[2]), full_env.get("PYTHONPATH")) if p
        )
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = argv or [sys.executable, str(TARGET)]
        self.proc = subprocess.Popen(
            [*command, json.dumps(config)],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            process_group=0 if own_group else None,
        )
        self.pid = self.proc.pid

    def events(self, kind: str | None = None, **match: Any) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        rows = [json.loads(line) for line in self.events_path.read_text().splitlines() if line]
        return [
            r
            for r in rows
            if (kind is None or r["e"] == kind) and all(r.get(k) == v for k, v in match.items())
        ]

    def wait_events(
        self, kind: str, count: int, timeout: float = 10.0, **match: Any
    ) -> list[dict[str, Any]]:
        return wait_for(
            lambda: len(self.events(kind, **match)) >= count and self.events(kind, **match),
            timeout,
            f"{count} {kind} {match}",
        )

    def live_workers(self, svc: str | None = None) -> dict[int, int]:
        """worker_id -> pid of the live workers whose service recorded an init."""
        latest: dict[int, int] = {}
        for row in self.events("init"):
            if (svc is None or row["svc"] == svc) and pid_alive(row["pid"]):
                latest[row["wid"]] = row["pid"]
        return latest

    def wait_workers(
        self, ids: set[int], svc: str | None = None, timeout: float = 10.0
    ) -> dict[int, int]:
        def ready() -> dict[int, int] | None:
            live = self.live_workers(svc)
            running = {r["pid"] for r in self.events("run")}
            if set(live) == ids and all(pid in running for pid in live.values()):
                return live
            return None

        return wait_for(ready, timeout, f"workers {sorted(ids)} of {svc or 'any'} running")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log = self.output()
            raise AssertionError(f"master did not exit within {timeout}s:\n{log}") from None

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Leave nothing behind, whatever the test did."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        for row in self.events("init"):
            if pid_alive(row["pid"]):
                os.kill(row["pid"], signal.SIGKILL)
        self.log.close()
