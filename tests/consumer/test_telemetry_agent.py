"""examples/telemetry_agent.py against the real RabbitMQ, fed by real oslo.messaging
notifiers: 50 resources' notifications in, every sample stored once and each resource's
samples in the order sent, across a SIGTTIN and a SIGTTOU."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.consumer.conftest import AMQP_URL, ROOT, check_broker, wait_for
from tests.consumer.test_notifications import Notifier, Rabbit
from tests.helpers import children_of

PARTITIONS = 8
ROUNDS = 9  # three before the SIGTTIN, three between it and the SIGTTOU, three after


class Telemetry:
    def __init__(self, tmp_path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.exchanges = {
            "nova": f"nova{tag}",
            "cinder": f"cinder{tag}",
            "neutron": f"neutron{tag}",
        }
        self.topic, self.pool, self.samples = f"notif{tag}", f"pool{tag}", f"samples{tag}"
        self.store = tmp_path / "samples.jsonl"
        self.log = tmp_path / "agent.log"
        self.env = dict(
            os.environ,
            PYTHONPATH=ROOT,
            TELEMETRY_STORE=str(self.store),
            NOVA_CONTROL_EXCHANGE=self.exchanges["nova"],
            CINDER_CONTROL_EXCHANGE=self.exchanges["cinder"],
            NEUTRON_CONTROL_EXCHANGE=self.exchanges["neutron"],
            TELEMETRY_TOPIC=self.topic,
            TELEMETRY_POOL=self.pool,
            TELEMETRY_SAMPLES=self.samples,
        )
        self.env.pop("CONSUMERD_BROKER", None)
        self.proc: subprocess.Popen | None = None
        self.cwd = tmp_path

    def start(self, workers: int) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "consumerd.cli",
                    "--app",
                    "examples.telemetry_agent",
                    "--broker",
                    AMQP_URL,
                    "--workers",
                    str(workers),
                    "--log-level",
                    "DEBUG",
                ],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def logged(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def workers(self) -> list[int]:
        assert self.proc is not None
        return children_of(self.proc.pid)

    def stored(self) -> list[dict]:
        if not self.store.exists():
            return []
        with open(self.store) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in children_of(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def telemetry(tmp_path):
    check_broker(AMQP_URL)  # fails, never skips, when RabbitMQ is down
    t = Telemetry(tmp_path)
    rabbit = Rabbit()
    rabbit.exchanges.update(t.exchanges.values())
    rabbit.queues.update(
        {
            t.pool,
            f"{t.topic}.info",
            f"{t.pool}.retry",
            f"{t.pool}.dlq",
            f"{t.samples}.retry",
            f"{t.samples}.dlq",
        }
        | {f"{t.samples}.p{p}" for p in range(PARTITIONS)}
    )
    notifiers: list[Notifier] = []
    yield t, rabbit, notifiers
    t.kill()
    for n in notifiers:
        n.close()
    rabbit.cleanup()


def resources(tag: str) -> list[tuple[str, str, str]]:
    """50 resources: (service, event type, resource id)."""
    out = [("nova", "compute.instance.update", f"inst-{tag}-{k}") for k in range(20)]
    out += [("cinder", "volume.resize.end", f"vol-{tag}-{k}") for k in range(15)]
    out += [("neutron", "port.update.end", f"port-{tag}-{k}") for k in range(15)]
    return out


def payload_for(event_type: str, resource_id: str, seq: int) -> dict:
    if event_type.startswith("compute."):
        return {"instance_id": resource_id, "seq": seq, "state": "active"}
    if event_type.startswith("volume."):
        return {"volume_id": resource_id, "seq": seq, "size": 10 + seq}
    return {"port": {"id": resource_id}, "seq": seq}


def test_telemetry_agent_keeps_per_resource_order_across_scaling(telemetry):
    t, rabbit, notifiers = telemetry
    senders = {}
    for service, exchange in t.exchanges.items():
        senders[service] = Notifier(exchange, t.topic)
        notifiers.append(senders[service])
    tag = t.topic.removeprefix("notif")
    all_resources = resources(tag)
    sent: collections.Counter = collections.Counter()
    dropped = 0

    def send_round(seq: int) -> None:
        nonlocal dropped
        for service, event_type, resource_id in all_resources:
            senders[service].send(
                "info", event_type, payload_for(event_type, resource_id, seq), f"{service}.host1"
            )
            sent[(resource_id, seq)] += 1
        # not a sample: filtered out by event type
        senders["nova"].send("info", "compute.metrics.update", {"seq": seq}, "nova.host1")
        dropped += 1

    t.start(workers=2)
    wait_for(
        lambda: len(t.workers()) == 2 and t.logged("consuming") >= 2, 30, "two workers consuming"
    )
    wait_for(lambda: t.logged("of 2 consumes partitions") >= 2, 30, "partitions assigned")

    for seq in range(3):
        send_round(seq)
    wait_for(lambda: len(t.stored()) >= 3 * 50, 60, "the first three rounds stored")

    t.proc.send_signal(signal.SIGTTIN)
    wait_for(lambda: t.logged("of 3 consumes partitions") >= 3, 30, "three workers' partitions")
    for seq in range(3, 6):
        send_round(seq)
    wait_for(lambda: len(t.stored()) >= 6 * 50, 60, "six rounds stored")
    before_ttou = {r["pid"] for r in t.stored()}

    t.proc.send_signal(signal.SIGTTOU)
    wait_for(lambda: len(t.workers()) == 2, 30, "back to two workers")
    wait_for(lambda: t.logged("of 2 consumes partitions") >= 4, 30, "partitions taken back")
    for seq in range(6, ROUNDS):
        send_round(seq)
    wait_for(lambda: len(t.stored()) >= ROUNDS * 50, 60, "every round stored")
    wait_for(lambda: t.logged("dropped so far)") >= dropped, 15, "the others dropped")
    t.proc.send_signal(signal.SIGTERM)
    assert t.proc.wait(30) == 0

    stored = t.stored()
    got = collections.Counter(
        (r["sample"]["resource_id"], r["sample"]["resource_metadata"]["seq"]) for r in stored
    )
    assert got == sent  # 450 samples, each once
    assert len(sent) == ROUNDS * 50
    by_resource = collections.defaultdict(list)
    for r in stored:  # file order is the order they were stored in
        by_resource[r["sample"]["resource_id"]].append(r)
    for resource_id, rows in by_resource.items():
        seqs = [r["sample"]["resource_metadata"]["seq"] for r in rows]
        assert seqs == list(range(ROUNDS)), f"{resource_id}: stored in order {seqs}"
        assert len({r["queue"] for r in rows}) == 1  # always the same partition
    assert len(before_ttou) == 3  # the third worker stored some between the signals
    moved = [rid for rid, rows in by_resource.items() if len({r["pid"] for r in rows}) > 1]
    assert moved  # some resources changed workers, and still kept their order
    assert t.logged("dropped so far)") == dropped
    assert rabbit.depth(t.pool) == 0
    assert all(rabbit.depth(f"{t.samples}.p{p}") == 0 for p in range(PARTITIONS))
    assert rabbit.depth(f"{t.samples}.dlq") == rabbit.depth(f"{t.pool}.dlq") == 0
