"""``python -m benchmarks.peers.fill <runner> <n>``: pre-fill the queue for one runner."""

from __future__ import annotations

import importlib
import sys
import time


def main() -> None:
    runner, n = sys.argv[1], int(sys.argv[2])
    module = importlib.import_module(f"benchmarks.peers.{runner}")
    started = time.monotonic()
    module.fill(n)
    print(f"filled {n} in {time.monotonic() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
