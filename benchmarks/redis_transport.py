"""kombu's stock Redis transport vs consumerd's batched one, on the Redis at 127.0.0.1:6379.

Each run: N JSON messages (~100 B) are published to a fresh queue with the stock transport
(same wire format for both), then two consumer processes (spawned, prefetch 100, no-op
handler, ack each) are released together and the clock runs until the shared counter
reaches N. Runs of the peers alternate; the table shows medians of --runs runs.

    python benchmarks/redis_transport.py                   # 20,000 messages, 3 runs
    python benchmarks/redis_transport.py --messages 5000 --runs 1

Each run also checks that every message was counted once, the queue is empty and the
unacked hash/index are empty afterwards (acks all reached Redis). Uses db 14.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import time
import uuid
from typing import Any

import kombu
import redis

URL = "redis://127.0.0.1:6379/14"  # a db of its own: the unacked check below is db-wide
PEERS = {
    "kombu redis (stock)": "redis",
    "consumerd redis": "consumerd.consumer.transport.redis:Transport",
}
DEADLINE = 600.0  # seconds a single run may take before it is abandoned


def publish(queue: str, total: int) -> None:
    pad = "x" * 80
    with kombu.Connection(URL) as conn:
        producer = conn.Producer(serializer="json")
        kombu.Queue(queue, routing_key=queue, channel=conn.default_channel).declare()
        for n in range(total):
            producer.publish({"n": n, "pad": pad}, routing_key=queue)


def consume(transport: str, queue: str, total: int, prefetch: int, shared: tuple[Any, ...]) -> None:
    """One consumer process: wait for ``start``, ack until ``done`` reaches ``total``."""
    start, done, last = shared
    with kombu.Connection(URL, transport=transport) as conn:
        state = {"last": 0.0}

        def on_message(body: Any, message: Any) -> None:
            message.ack()
            with done.get_lock():
                done.value += 1
            state["last"] = time.perf_counter()

        q = kombu.Queue(queue, routing_key=queue)
        with conn.Consumer([q], callbacks=[on_message], prefetch_count=prefetch, accept=["json"]):
            start.wait()
            deadline = time.monotonic() + DEADLINE
            while done.value < total and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)
        with last.get_lock():
            last.value = max(last.value, state["last"])


def run_once(transport: str, total: int, workers: int, prefetch: int) -> float:
    queue = f"bench.redis.{uuid.uuid4().hex[:8]}"
    publish(queue, total)
    ctx = multiprocessing.get_context("spawn")
    start, done, last = ctx.Event(), ctx.Value("l", 0), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=consume, args=(transport, queue, total, prefetch, (start, done, last)))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let both processes import kombu and register their consumers
    began = time.perf_counter()
    start.set()
    for p in procs:
        p.join(DEADLINE + 30)
        if p.is_alive():
            p.kill()
            raise SystemExit(f"{transport}: consumer did not finish")
    r = redis.Redis.from_url(URL)
    left, unacked = r.llen(queue), r.hlen("unacked") + r.zcard("unacked_index")
    r.delete(queue, f"_kombu.binding.{queue}")
    if done.value != total or left or unacked:
        raise SystemExit(
            f"{transport}: consumed {done.value} of {total}, {left} left in "
            f"queue, {unacked} unacked entries"
        )
    return total / (last.value - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=100)
    args = parser.parse_args()
    r = redis.Redis.from_url(URL)
    r.ping()  # fail loudly if Redis is down
    results: dict[str, list[float]] = {name: [] for name in PEERS}
    for n in range(args.runs):
        for name, transport in PEERS.items():
            rate = run_once(transport, args.messages, args.workers, args.prefetch)
            results[name].append(rate)
            print(f"run {n + 1}: {name:<22} {rate:8,.0f} msg/s", flush=True)
    stock = statistics.median(results["kombu redis (stock)"])
    print()
    print(
        f"{args.messages:,} messages, {args.workers} consumer processes, "
        f"prefetch {args.prefetch}, ack each; medians of {args.runs}"
    )
    print("| transport | msg/s (median) | runs | vs stock |")
    print("|---|---|---|---|")
    for name, rates in results.items():
        median = statistics.median(rates)
        runs = ", ".join(f"{x:,.0f}" for x in rates)
        print(f"| {name} | {median:,.0f} | {runs} | {median / stock:.2f}x |")


if __name__ == "__main__":
    main()
