"""What the benchmark tells a runner process, through the environment.

The environment is the one channel every runner accepts: Celery and Dramatiq import the
app module themselves from their own command lines.
"""

from __future__ import annotations

import os
import time

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "")
QUEUE = os.environ.get("BENCH_QUEUE", "")
PREFETCH = int(os.environ.get("BENCH_PREFETCH", "100"))
SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))
"""Seconds each handler waits (time.sleep / asyncio.sleep): I/O-bound work; 0: no-op."""
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "1"))
"""consumerd only: handlers at once per worker."""
ASYNC = os.environ.get("BENCH_ASYNC") == "1"
"""consumerd only: the handler is ``async def`` (asyncio.sleep)."""
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "0"))
"""consumerd only: a partitioned consumer (0: none), messages published with a key out of
``KEYS``, and per-key order checked on every message."""
KEYS = int(os.environ.get("BENCH_KEYS", "1000"))


def wait() -> None:
    """The handler's I/O-bound part, if any."""
    if SLEEP:
        time.sleep(SLEEP)


def body(i: int) -> dict[str, object]:
    """A small JSON message (about 100 bytes serialised)."""
    return {"id": i, "kind": "bench", "payload": "x" * 64}


def key_of(i: int) -> str:
    """The key of message ``i`` in a keyed run; message ``i`` is number ``i // KEYS`` of
    its key (``seq``), so publish order per key is ``seq`` order."""
    return f"k{i % KEYS}"
