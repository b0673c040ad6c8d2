"""What the benchmark tells a runner process, through the environment.

The environment is the one channel every runner accepts: Celery and Dramatiq import the
app module themselves from their own command lines.
"""

from __future__ import annotations

import os

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "")
QUEUE = os.environ.get("BENCH_QUEUE", "")
PREFETCH = int(os.environ.get("BENCH_PREFETCH", "100"))


def body(i: int) -> dict[str, object]:
    """A small JSON message (about 100 bytes serialised)."""
    return {"id": i, "kind": "bench", "payload": "x" * 64}
