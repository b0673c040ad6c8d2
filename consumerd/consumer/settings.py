"""The options a worker runs with, built by the command line in the master process."""

from __future__ import annotations

import dataclasses
import typing


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
    max_messages_per_worker: int | None = None
    """Recycle a worker after about this many messages (up to 10% more, at random)."""
    max_memory_per_worker: int | None = None
    """Recycle a worker whose resident memory exceeds about this many MB."""
    queues: tuple[str, ...] | None = None
    """Consume only these of the app's consumers (None: all)."""
    options: typing.Mapping[str, typing.Any] | None = None
    """The command-line options, so a worker can re-read the configuration layers (see
    :mod:`consumerd.ops.config`) when it starts and on SIGHUP."""


EX_TEMPFAIL = 75
"""Exit code of a worker whose broker stayed unreachable past the limit (sysexits.h)."""
