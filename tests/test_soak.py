"""The chaos soak, short version: benchmarks/soak.py --messages 5000 --quick on Redis and
RabbitMQ (worker SIGKILLs, two broker restarts, SIGHUP, SIGTTIN/SIGTTOU, a SIGUSR2 code
reload, a master restart; 1% of the messages poison of five kinds) must lose nothing and
dead-letter every poison. Both brokers are servers of the soak's own (redis-server, a
RabbitMQ node), really restarted; after each RabbitMQ restart every worker must have
re-declared its queues and consume again. About two minutes; fails when either server
cannot be started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.consumer.conftest import RABBITMQ_BIN, ROOT

MESSAGES = 5000


def test_quick_soak_loses_nothing(tmp_path):
    assert shutil.which("redis-server"), "redis-server is not installed"
    assert os.path.exists(os.path.join(RABBITMQ_BIN, "rabbitmq-server")), RABBITMQ_BIN
    results_path = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "soak.py"),
            "--messages",
            str(MESSAGES),
            "--quick",
            "--brokers",
            "redis,amqp",
            "--json",
            str(results_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert results_path.exists(), report
    results = {r["broker"]: r for r in json.loads(results_path.read_text())}
    assert set(results) == {"redis", "amqp"}, report
    for broker, r in results.items():
        assert r["sent"] == MESSAGES, f"{broker}: {report}"
        assert r["lost"] == 0, f"{broker} lost {r['lost_ids']}: {report}"
        # 1% poison of five kinds (#8), every one in the dead-letter queue
        assert r["poison"] == MESSAGES // 100 == r["dead_unique"], f"{broker}: {report}"
        assert r["broker_restarts"] == 2 and r["kills"] > 0, f"{broker}: {report}"
        # RabbitMQ: after each restart, every worker's wake queue (exclusive: deleted by
        # the restart) back and one consumer per worker on the queue
        assert r["redeclared"] == (2 if broker == "amqp" else 0), f"{broker}: {report}"
        assert r["code_reloads"] == 1 and r["master_restarts"] == 1, f"{broker}: {report}"
        # the SIGHUP rebound workers (a worker SIGKILLed meanwhile may not log it); one
        # worker added and one removed
        assert r["sighup"] >= 1 and r["scaled"] == "1 up, 1 down", f"{broker}: {report}"
        assert r["exit_codes"] == "0, 0", f"{broker}: {report}"  # both master stops clean
        assert r["left_over"] == 0, f"{broker}: {report}"
    assert proc.returncode == 0, report
