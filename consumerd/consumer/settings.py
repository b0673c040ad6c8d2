"""The options a worker runs with, built by the command line in the master process."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Settings:
    app_ref: str
    """``module[:attribute]``; workers re-import it on SIGHUP."""
    broker_url: str
    workers: int
    """The ``--workers`` count: the first guess of this host's worker count (see ownership)."""
    member: tuple[int, int] = (0, 1)
    """``--member I/M``: this host is member I of M sharing the partitions."""
    prefetch: int | None = None
    """``--prefetch``: default for consumers that do not set their own."""
    graceful_timeout: float = 60.0
    broker_down_limit: float = 60.0
    """Seconds without a broker after which a worker exits with :data:`EX_TEMPFAIL`."""


EX_TEMPFAIL = 75
"""Exit code of a worker whose broker stayed unreachable past the limit (sysexits.h)."""
