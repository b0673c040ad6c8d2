"""Per-process message counter shared by every runner's no-op handler.

Each consumer process counts handled messages in memory and remembers the monotonic
time of its first and last one, and the process's CPU time (all its threads) at each:
the CPU a runner spends per message, less swayed by a busy machine than its rate. A
daemon thread writes ``count first last cpu`` to ``$BENCH_COUNT_DIR/<pid>`` (atomic
rename) at most every 50 ms, so the handler itself does no I/O; the benchmark sums the
files to detect completion and takes the timing from the timestamps, not from when it
happened to poll. ``time.monotonic`` is
CLOCK_MONOTONIC on Linux, which is comparable across processes.

State is created on first use and forgotten in a forked child, so a module imported in
a parent and then forked (Celery prefork, Dramatiq) counts per child, with its own thread.
"""

from __future__ import annotations

import os
import threading
import time

FLUSH_INTERVAL = 0.05


class _Counter:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, str(os.getpid()))
        self.lock = threading.Lock()  # Dramatiq runs handlers on several threads
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        threading.Thread(target=self._flush_forever, name="bench-counter", daemon=True).start()

    def hit(self) -> None:
        now, cpu = time.monotonic(), time.process_time()
        with self.lock:
            if not self.count:
                self.first, self.cpu_first = now, cpu
            self.count += 1
            self.last, self.cpu_last = now, cpu

    def _flush_forever(self) -> None:
        written = -1
        while True:
            with self.lock:
                line = (
                    f"{self.count} {self.first!r} {self.last!r} "
                    f"{self.cpu_last - self.cpu_first!r}\n"
                )
                count = self.count
            if count != written:
                tmp = f"{self.path}.tmp"
                with open(tmp, "w") as f:
                    f.write(line)
                os.replace(tmp, self.path)
                written = count
            time.sleep(FLUSH_INTERVAL)


_counter: _Counter | None = None
_create_lock = threading.Lock()


def _forget_parent() -> None:
    global _counter, _create_lock
    _counter = None
    _create_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent)


def hit() -> None:
    """Record one handled message (call from the handler)."""
    global _counter
    if _counter is None:
        with _create_lock:
            if _counter is None:
                _counter = _Counter(os.environ["BENCH_COUNT_DIR"])
    _counter.hit()


def disorder(what: str) -> None:
    """Record a broken promise of order (a keyed run): the benchmark fails on it."""
    path = os.path.join(os.environ["BENCH_COUNT_DIR"], f"{os.getpid()}.disorder")
    with open(path, "a") as f:
        f.write(what + "\n")


def disorders(directory: str) -> list[str]:
    """Every broken order recorded so far, by any process."""
    out: list[str] = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".disorder"):
            with open(os.path.join(directory, name)) as f:
                out += f.read().splitlines()
    return out


def read_all(directory: str) -> list[tuple[int, float, float, float]]:
    """``(count, first, last, cpu)`` of every process that has reported so far; ``cpu``:
    the process's CPU seconds from its first message handled to its last."""
    out = []
    for name in os.listdir(directory):
        if name.endswith((".tmp", ".disorder")):
            continue
        with open(os.path.join(directory, name)) as f:
            count, first, last, cpu = f.read().split()
        out.append((int(count), float(first), float(last), float(cpu)))
    return out
