"""Embedded brokers side by side: consumerd's SQLite transport vs kombu's filesystem transport.

Each run: one process publishes N small JSON messages (~100 B) to a fresh broker, then two
consumer processes (spawned, prefetch 100, ack each, no-op handler) are released together and
the clock runs until the shared counter reaches N. Medians of --runs runs, same machine, same run.

    python benchmarks/sqlite_transport.py                       # 20,000 messages, 3 runs
    python benchmarks/sqlite_transport.py --messages 5000 --runs 1 --peers sqlite,filesystem

Peers: ``sqlite`` (publishes fsynced, the default), ``sqlite-normal`` (publish_synchronous=NORMAL),
``filesystem`` (kombu's), and for scale ``redis`` / ``amqp`` (the services on 127.0.0.1).
Both embedded transports poll empty queues every 0.05 s here (kombu's filesystem default is 1 s).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Any

import kombu

SQLITE = "consumerd.consumer.transport.sqlite:Transport"
QUEUE = "bench"
DEADLINE = 600.0  # seconds a single run may take before it is abandoned


def broker(peer: str, folder: str) -> dict[str, Any]:
    """kombu.Connection arguments for ``peer`` with its data in ``folder``."""
    poll = {"polling_interval": 0.05}
    if peer == "sqlite":
        return {
            "hostname": f"sqlite:///{folder}/broker.db",
            "transport": SQLITE,
            "transport_options": poll,
        }
    if peer == "sqlite-normal":
        options = dict(poll, publish_synchronous="NORMAL")
        return {
            "hostname": f"sqlite:///{folder}/broker.db",
            "transport": SQLITE,
            "transport_options": options,
        }
    if peer == "filesystem":
        data = os.path.join(folder, "data")
        os.makedirs(data)
        options = dict(
            poll,
            data_folder_in=data,
            data_folder_out=data,
            control_folder=os.path.join(folder, "control"),
        )
        return {"hostname": "filesystem://", "transport_options": options}
    if peer == "redis":
        return {"hostname": "redis://127.0.0.1:6379/0"}
    if peer == "amqp":
        return {"hostname": "amqp://guest:guest@127.0.0.1:5672//"}
    raise SystemExit(f"unknown peer {peer!r}")


def publish(params: dict[str, Any], total: int) -> float:
    """Publish ``total`` messages; returns msg/s."""
    pad = "x" * 80
    with kombu.Connection(**params) as conn:
        queue = kombu.Queue(QUEUE, channel=conn.default_channel)
        queue.declare()
        queue.purge()
        producer = conn.Producer(serializer="json")
        start = time.perf_counter()
        for n in range(total):
            producer.publish({"n": n, "pad": pad}, routing_key=QUEUE)
        return total / (time.perf_counter() - start)


def consume(
    params: dict[str, Any], prefetch: int, total: int, *, counter: Any, ready: Any, go: Any
) -> None:
    with kombu.Connection(**params) as conn:

        def on_message(body: Any, message: Any) -> None:
            message.ack()
            with counter.get_lock():
                counter.value += 1

        consumer = conn.Consumer(
            kombu.Queue(QUEUE), callbacks=[on_message], accept=["json"], prefetch_count=prefetch
        )
        with consumer:
            ready.release()
            go.wait()
            while counter.value < total:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.1)


def run_once(peer: str, total: int, consumers: int, prefetch: int) -> tuple[float, float]:
    """One run: (publish msg/s, consume msg/s)."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as folder:
        params = broker(peer, folder)
        published = publish(params, total)
        counter, ready, go = ctx.Value("q", 0), ctx.Semaphore(0), ctx.Event()
        procs = [
            ctx.Process(
                target=consume,
                args=(params, prefetch, total),
                kwargs={"counter": counter, "ready": ready, "go": go},
            )
            for _ in range(consumers)
        ]
        for proc in procs:
            proc.start()
        try:
            for _ in procs:
                if not ready.acquire(timeout=60):
                    raise RuntimeError(f"{peer}: a consumer did not start")
            start = time.perf_counter()
            go.set()
            while counter.value < total:
                if time.perf_counter() - start > DEADLINE:
                    raise RuntimeError(f"{peer}: {counter.value}/{total} after {DEADLINE} s")
                time.sleep(0.002)
            consumed = total / (time.perf_counter() - start)
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    return published, consumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--peers", default="sqlite,sqlite-normal,filesystem")
    args = parser.parse_args()

    rows = []
    for peer in args.peers.split(","):
        results = []
        for run in range(args.runs):
            results.append(run_once(peer, args.messages, args.consumers, args.prefetch))
            print(
                f"  {peer} run {run + 1}: publish {results[-1][0]:,.0f} msg/s, "
                f"consume {results[-1][1]:,.0f} msg/s",
                flush=True,
            )
        rows.append((peer, [r[0] for r in results], [r[1] for r in results]))

    print(
        f"\n{args.messages:,} JSON messages (~100 B), {args.consumers} consumer processes, "
        f"prefetch {args.prefetch}, ack each; medians of {args.runs}"
    )
    print(f"| {'transport':<14} | {'publish msg/s':>13} | {'consume msg/s':>13} | consume runs |")
    print(f"|{'-' * 16}|{'-' * 15}|{'-' * 15}|{'-' * 14}|")
    for peer, published, consumed in rows:
        runs = ", ".join(f"{c:,.0f}" for c in consumed)
        print(
            f"| {peer:<14} | {statistics.median(published):>13,.0f} | "
            f"{statistics.median(consumed):>13,.0f} | {runs} |"
        )


if __name__ == "__main__":
    main()
