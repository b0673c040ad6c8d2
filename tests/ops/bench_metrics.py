"""Per-message cost of the worker-side metrics calls, in µs (medians of runs).

    python tests/ops/bench_metrics.py [messages] [runs]

Each message makes the calls a consume loop makes: received(), handling() around a no-op
handler, acked(). Measured in a forked worker of a master that enabled metrics (so the
values are the mmap-backed multiprocess ones), against metrics off and a bare loop.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from consumerd.ops import metrics


def handler() -> None:
    pass


def bare(n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        handler()
    return time.perf_counter() - started


def recorded(recorder: metrics.ConsumerMetrics, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        recorder.received()
        with recorder.handling():
            handler()
        recorder.acked()
    return time.perf_counter() - started


def in_worker(n: int, runs: int) -> None:
    """Runs in the forked worker; prints the table."""
    on = metrics.for_consumer("bench")
    off = metrics.ConsumerMetrics()
    rows = {"bare loop": [], "metrics off": [], "metrics on (multiprocess)": []}
    for _ in range(runs):
        rows["bare loop"].append(bare(n))
        rows["metrics off"].append(recorded(off, n))
        rows["metrics on (multiprocess)"].append(recorded(on, n))
    base = statistics.median(rows["bare loop"])
    print(f"{n:,} messages x {runs} runs, median per message")
    print(f"| {'case':<27} | {'µs/msg':>7} | {'overhead µs':>11} |")
    print(f"|{'-' * 29}|{'-' * 9}|{'-' * 13}|")
    for name, times in rows.items():
        per = statistics.median(times) / n * 1e6
        print(f"| {name:<27} | {per:7.2f} | {per - base / n * 1e6:11.2f} |")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    master = metrics.enable()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                in_worker(n, runs)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    finally:
        master.close()


if __name__ == "__main__":
    main()
