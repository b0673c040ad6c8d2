"""Per-message cost of the worker-side metrics calls, in µs (medians of runs), and the
cost of a scrape in the master with the files of many dead workers, folded or not.

    python benchmarks/metrics_overhead.py [messages] [runs] [dead workers]

Each message makes the calls a consume loop makes: received(), handling() around a no-op
handler, acked(). Measured in a forked worker of a master that enabled metrics (so the
values are the mmap-backed multiprocess ones), against metrics off and a bare loop.
Times are CPU time of the process (time.process_time), less disturbed by a busy machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import prometheus_client
from prometheus_client import multiprocess

from consumerd.ops import metrics


def handler() -> None:
    pass


def bare(n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        handler()
    return time.process_time() - started


def recorded(recorder: metrics.ConsumerMetrics, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        recorder.received()
        with recorder.handling():
            handler()
        recorder.acked()
    return time.process_time() - started


def direct(n: int) -> float:
    """The same with prometheus_client's own calls, one file write each (no batching)."""
    received = prometheus_client.Counter("direct_received", "", registry=None)
    acked = prometheus_client.Counter("direct_acked", "", registry=None)
    in_flight = prometheus_client.Gauge(
        "direct_in_flight", "", registry=None, multiprocess_mode="livesum"
    )
    duration = prometheus_client.Histogram(
        "direct_seconds", "", registry=None, buckets=metrics.DURATION_BUCKETS
    )
    started = time.process_time()
    for _ in range(n):
        received.inc()
        in_flight.inc()
        begun = time.perf_counter()
        handler()
        duration.observe(time.perf_counter() - begun)
        in_flight.dec()
        acked.inc()
    return time.process_time() - started


def in_worker(n: int, runs: int) -> None:
    """Runs in the forked worker; prints the table."""
    on = metrics.for_consumer("bench")
    off = metrics.ConsumerMetrics()
    rows = {
        "bare loop": [],
        "metrics off": [],
        "metrics on (multiprocess)": [],
        "prometheus_client, unbatched": [],
    }
    for _ in range(runs):
        rows["bare loop"].append(bare(n))
        rows["metrics off"].append(recorded(off, n))
        rows["metrics on (multiprocess)"].append(recorded(on, n))
        rows["prometheus_client, unbatched"].append(direct(n))
    base = statistics.median(rows["bare loop"])
    print(f"{n:,} messages x {runs} runs, median per message")
    print(f"| {'case':<29} | {'µs/msg':>7} | {'overhead µs':>11} |")
    print(f"|{'-' * 31}|{'-' * 9}|{'-' * 13}|")
    for name, times in rows.items():
        per = statistics.median(times) / n * 1e6
        print(f"| {name:<29} | {per:7.2f} | {per - base / n * 1e6:11.2f} |")


def scrape_ms(master: metrics.MasterMetrics, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.process_time()
        master.exposition()
        times.append(time.process_time() - started)
    return statistics.median(times) * 1e3


def dead_workers(master: metrics.MasterMetrics, count: int, runs: int) -> None:
    """``count`` workers each record on 3 consumers and exit; scrape before and after the
    master folds their files."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            metrics.bind_worker("bench", 0)
            for name in ("a", "b", "c"):
                recorder = metrics.for_consumer(name)
                recorder.received()
                with recorder.handling():
                    handler()
                recorder.acked()
            metrics.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        pids.append(pid)
    rows = []
    for pid in pids:  # what prometheus_client alone offers: drop the live gauges
        multiprocess.mark_process_dead(pid, master.directory)
    rows.append(
        ("mark_process_dead only", len(os.listdir(master.directory)), scrape_ms(master, runs))
    )
    master.sweep()
    rows.append(("folded (consumerd)", len(os.listdir(master.directory)), scrape_ms(master, runs)))
    print(f"\nscrape in the master after {count} dead workers, median of {runs}")
    print(f"| {'dead workers files':<22} | {'files':>5} | {'ms/scrape':>9} |")
    print(f"|{'-' * 24}|{'-' * 7}|{'-' * 11}|")
    for name, files, ms in rows:
        print(f"| {name:<22} | {files:5d} | {ms:9.2f} |")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    dead = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    master = metrics.enable()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                in_worker(n, runs)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        dead_workers(master, dead, runs)
    finally:
        master.close()


if __name__ == "__main__":
    main()
