"""Master process driven by benchmarks/supervisor.py: N idle workers under one supervisor.

``--impl cotyledon`` imports cotyledon 2.2, ``--impl consumerd`` imports consumerd under the
same name, so both run this exact code. Each worker's ``run()`` writes one line
``<pid> <worker_id> <CLOCK_MONOTONIC ns>`` to the inherited pipe ``--fd``; the benchmark
timestamps events from those lines (the clock is system-wide, so the worker's own stamp
is more precise than when the benchmark gets round to reading the pipe).
"""

from __future__ import annotations

import argparse
import importlib
import os
import threading
import time


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=("cotyledon", "consumerd"), required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--fd", type=int, required=True)
    return parser.parse_args()


# Module level (not in main()) so the Service class stays picklable should an
# implementation start workers with "spawn": the child re-imports this module with the
# same argv and finds the same base class.
ARGS = _parse_args()
cotyledon = importlib.import_module(ARGS.impl)


class IdleWorker(cotyledon.Service):  # type: ignore[misc,name-defined]
    """Announces itself, then blocks like a consumer waiting for messages."""

    def __init__(self, worker_id: int, fd: int) -> None:
        super().__init__(worker_id)
        self._fd = fd
        self._stop = threading.Event()

    def run(self) -> None:
        line = f"{os.getpid()} {self.worker_id} {time.monotonic_ns()}\n"
        os.write(self._fd, line.encode())  # shorter than PIPE_BUF: atomic among workers
        self._stop.wait()

    def terminate(self) -> None:
        self._stop.set()


def main() -> None:
    manager = cotyledon.ServiceManager()
    manager.add(IdleWorker, workers=ARGS.workers, args=(ARGS.fd,))
    manager.run()


if __name__ == "__main__":
    main()
