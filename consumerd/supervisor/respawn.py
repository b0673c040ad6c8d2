"""When to respawn a worker slot: at once after a healthy run, later after a failed start."""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class RespawnPolicy:
    """Per-slot exponential back-off with jitter for workers that die soon after starting.

    A worker that lived at least ``healthy_after`` seconds, or that exited because the
    master asked it to, is replaced at once and clears its slot's failure count. One that
    died sooner counts as a failed start: the ``n``-th consecutive one delays the next
    spawn of that slot by about ``base_delay * 2**(n-1)`` seconds, capped at ``max_delay``.
    The jitter keeps slots that fail together (a broker outage) from retrying in lockstep.

    An exit status in ``failure_codes`` counts as a failure however long the worker ran:
    a worker that gave up on an unreachable resource after trying for a while (75,
    EX_TEMPFAIL of sysexits.h, by default) must not be respawned at once every time.
    """

    healthy_after: float = 1.0
    base_delay: float = 0.5
    max_delay: float = 30.0
    failure_codes: frozenset[int] = frozenset({75})

    def is_failed_start(self, runtime: float, requested: bool, code: int | None = None) -> bool:
        if requested:
            return False
        return runtime < self.healthy_after or (code is not None and code in self.failure_codes)

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        ceiling = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        # "Equal jitter": at least half the ceiling, so back-off always grows.
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))
