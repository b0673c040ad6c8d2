#!/usr/bin/env python
"""Publishing throughput: consumerd's confirmed publishing beside a stock kombu producer.

Workload: N small JSON messages (default 10,000, ~100 B, as in throughput.py), persistent,
to one durable queue on the default exchange, from one process. Runners:

- consumerd ``publish_many``: ``App.publish_many(queue, bodies)``, every message confirmed
  a window at a time (RabbitMQ publisher confirms, Redis MULTI/EXEC per window).
- consumerd ``publish`` one by one: ``App.publish`` in a loop, each call confirmed before
  it returns.
- stock kombu, unconfirmed: ``Producer.publish(body, routing_key=q, declare=[queue])`` in
  a loop on kombu's own transports (its Redis transport, py-amqp without confirms).
- stock kombu, ``confirm_publish=True`` (RabbitMQ only: py-amqp waits for each confirm).

Each run connects and publishes one message outside the timing (so connecting and
declaring are not counted), then times the N publishes, then checks the queue holds exactly
N + 1 messages and deletes it. Repeats are interleaved (rep 1 of every runner, then rep 2,
...) with the runner order rotated, so background load hits all of them alike; the table
shows medians and, per broker, each runner against stock kombu unconfirmed.

    python benchmarks/publish.py                       # 10,000 x 3 reps, both brokers
    python benchmarks/publish.py --count 2000 --repeats 1 --brokers redis
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kombu  # noqa: E402

import consumerd  # noqa: E402 - needs ROOT on sys.path
from benchmarks.peers import config  # noqa: E402
from consumerd.consumer import broker as brokers  # noqa: E402
from consumerd.consumer.app import declare_queue  # noqa: E402

URLS = {"rabbitmq": "amqp://guest:guest@127.0.0.1:5672//", "redis": "redis://127.0.0.1:6379/0"}
#: (name, label, brokers it runs on)
RUNNERS = [
    ("many", "consumerd publish_many (confirmed)", ("rabbitmq", "redis")),
    ("single", "consumerd publish, one by one", ("rabbitmq", "redis")),
    ("kombu", "stock kombu, unconfirmed", ("rabbitmq", "redis")),
    ("kombu-confirm", "stock kombu, confirm_publish=True", ("rabbitmq",)),
]


def _consumerd(url: str, bulk: bool) -> Callable[[str, int], float]:
    def run(queue: str, count: int) -> float:
        app = consumerd.App("bench")
        app.configure(broker_url=url)
        try:
            app.publish(queue, config.body(-1))
            started = time.perf_counter()
            if bulk:
                app.publish_many(queue, (config.body(i) for i in range(count)))
            else:
                for i in range(count):
                    app.publish(queue, config.body(i))
            return time.perf_counter() - started
        finally:
            app.close()

    return run


def _kombu(url: str, confirm: bool) -> Callable[[str, int], float]:
    def run(queue: str, count: int) -> float:
        options = {"confirm_publish": True} if confirm else {}
        with kombu.Connection(url, transport_options=options) as conn:
            producer = conn.Producer(serializer="json")
            declare = [declare_queue(queue)]
            producer.publish(config.body(-1), routing_key=queue, declare=declare)
            started = time.perf_counter()
            for i in range(count):
                producer.publish(config.body(i), routing_key=queue, declare=declare)
            return time.perf_counter() - started

    return run


def _runner(name: str, url: str) -> Callable[[str, int], float]:
    if name in ("many", "single"):
        return _consumerd(url, bulk=name == "many")
    return _kombu(url, confirm=name == "kombu-confirm")


def _depth_and_delete(url: str, queue: str) -> int:
    with brokers.connect(url) as conn:
        channel = conn.default_channel
        if brokers.is_amqp(conn):
            depth = channel.queue_declare(queue, passive=True).message_count
        else:
            depth = channel.client.llen(queue)
        channel.queue_delete(queue)
    return int(depth)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=10_000, help="messages per run (10000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per runner and broker (3)")
    p.add_argument("--brokers", default="rabbitmq,redis", help="rabbitmq,redis")
    args = p.parse_args()
    chosen = args.brokers.split(",")
    rates: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        order = RUNNERS[rep % len(RUNNERS) :] + RUNNERS[: rep % len(RUNNERS)]
        for b in chosen:
            for name, label, where in order:
                if b not in where:
                    continue
                queue = f"benchpub{uuid.uuid4().hex[:8]}"
                seconds = _runner(name, URLS[b])(queue, args.count)
                depth = _depth_and_delete(URLS[b], queue)
                if depth != args.count + 1:
                    raise SystemExit(f"{label} on {b}: {depth} in the queue, not {args.count + 1}")
                rate = args.count / seconds
                rates.setdefault((name, b), []).append(rate)
                print(f"rep {rep + 1} {b:<9} {label:<36} {rate:>9,.0f} msg/s", file=sys.stderr)
    col = 20
    print(
        f"\nmsg/s, median of {args.repeats}; {args.count:,} JSON messages (~100 B), "
        f"persistent, one process; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    header = f"{'publisher':<36}" + "".join(f"{b:>{col}}" for b in chosen)
    print(header)
    print("-" * len(header))
    for name, label, _ in RUNNERS:
        cells = []
        for b in chosen:
            ours, base = rates.get((name, b)), rates.get(("kombu", b))
            if not ours:
                cells.append("n/a")
                continue
            text = f"{statistics.median(ours):,.0f}"
            if base and name != "kombu":
                text += f" ({statistics.median(ours) / statistics.median(base):.2f}x)"
            cells.append(text)
        print(f"{label:<36}" + "".join(f"{c:>{col}}" for c in cells))
    print("(x: against stock kombu unconfirmed on the same broker)")


if __name__ == "__main__":
    main()
