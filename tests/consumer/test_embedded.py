"""The embedded default broker: no server, durable, across processes, said at start-up."""

from __future__ import annotations

import os
import signal

from tests.consumer.conftest import Consumerd, wait_for


def test_quick_start_on_the_embedded_broker(tmp_path, name):
    consumerd = Consumerd(tmp_path, name, None)
    try:
        consumerd.configure([{"name": name, "sleep": 0.002, "prefetch": 20}])
        lines = "".join(f'{{"i": {i}}}\n' for i in range(300))
        import subprocess
        import sys

        published = subprocess.run(
            [sys.executable, "-m", "consumerd.cli", "publish", "--app", "tapp", name, "-"],
            cwd=tmp_path, env=consumerd.env(), input=lines, capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert published.returncode == 0, published.stderr
        database = tmp_path / ".consumerd" / "broker.db"
        assert database.exists()
        consumerd.start(workers=2)
        consumerd.wait_logged(f"no broker configured: using the embedded broker sqlite://{database}")
        victim = consumerd.wait_workers(2)[0]
        wait_for(lambda: len(consumerd.ids()) >= 60, 30, "60 messages handled")
        os.kill(victim, signal.SIGKILL)  # its claimed messages come back (pid gone)
        wait_for(lambda: len(consumerd.ids()) == 300, 60, "all messages handled")
        assert consumerd.stop() == 0
        ids = consumerd.ids()
        assert set(ids) == set(range(300))
        assert sum(ids.values()) - 300 <= 21
    finally:
        consumerd.kill()
