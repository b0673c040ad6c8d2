"""Which partitions of its partitioned consumers a worker consumes, and when it looks again.

A worker's partitions follow from this host's worker count (:mod:`routing`'s map); it
consumes one only while it holds the partition's lease (:mod:`ownership`), so two
processes on the host never consume one partition at once. At each look
(:meth:`Partitions.rebalance`) it takes the leases it lacks and hands the consume loop one
:class:`Move` per consumer whose partitions change. The loop carries a move out in this
order: close the consumer's channel (its prefetched messages go back), then
:meth:`Partitions.release` the lost partitions' leases, then consume the new set.

Looks come every :data:`REBALANCE_EVERY`; every :data:`CLAIM_EVERY` while a wanted lease
is held by another process (said once in the log, and again when it comes). The loop
wakes at :attr:`Partitions.deadline`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
import math
import os
import time
import typing

from consumerd.consumer import routing
from consumerd.supervisor.osproc import parent_of

LOG = logging.getLogger("consumerd.consumer")

REBALANCE_EVERY = 1.0
"""How often a worker with partitioned consumers looks at this host's worker count."""
CLAIM_EVERY = 0.1
"""How often it retries a partition whose previous owner has not let go yet."""


class LeaseSet(typing.Protocol):
    """The host-wide partition leases (:class:`ownership.Leases`)."""

    def try_acquire(self, name: str) -> bool: ...
    def holder(self, name: str) -> int | None: ...
    def release(self, name: str) -> None: ...
    def release_all(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Move:
    """One consumer's change of partitions, for the loop to carry out."""

    consumer: str
    lost: frozenset[int]
    """Consumed until now, not any more: their leases go once the channel is closed."""
    gained: frozenset[int]
    """Their leases are ours now."""
    owned: frozenset[int]
    """What the consumer consumes once moved."""
    workers: int
    """This host's worker count the move follows."""


class Partitions:
    """Worker ``worker_id``'s partitions: its leases, its waits and its next look."""

    def __init__(
        self,
        leases: LeaseSet,
        workers: collections.abc.Callable[[], int],
        worker_id: int,
        clock: collections.abc.Callable[[], float] = time.monotonic,
    ) -> None:
        self._leases = leases
        self._workers = workers
        self._worker_id = worker_id
        self._clock = clock
        self._waiting: dict[tuple[str, int], float] = {}
        """(consumer, partition) we want but another process holds: since when."""
        self.deadline = math.inf
        """Monotonic time of the next look; infinite: never (no partitioned consumer)."""

    def look_soon(self, partitioned: bool) -> None:
        """After a (re)connect or a reload: look at once if a consumer is partitioned."""
        self.deadline = 0.0 if partitioned else math.inf

    def look_again_in(self, seconds: float) -> None:
        self.deadline = min(self.deadline, self._clock() + seconds)

    def rebalance(
        self,
        consumers: collections.abc.Mapping[str, tuple[int, collections.abc.Set[int]]],
        member: tuple[int, int],
    ) -> list[Move]:
        """The moves to the partition map of the current worker count, for ``consumers``
        (name -> (partition count, partitions consumed now)) on host ``member`` (index,
        count). Gained partitions' leases are taken here; lost ones are left to
        :meth:`release`, once the loop has closed their channel."""
        self.deadline = self._clock() + REBALANCE_EVERY
        index, members = member
        workers = self._workers()
        me = routing.global_worker(self._worker_id, workers, index)
        moves = []
        for name, (partitions, owned) in consumers.items():
            wanted = set(routing.owned_partitions(partitions, me, members * workers))
            lost = owned - wanted
            missing = wanted - owned
            gained = {
                p for p in missing if self._leases.try_acquire(routing.partition_queue(name, p))
            }
            self._note_waits(name, missing, gained)
            if missing - gained:
                self.look_again_in(CLAIM_EVERY)
            if lost or gained:
                new = frozenset((owned - lost) | gained)
                moves.append(Move(name, frozenset(lost), frozenset(gained), new, workers))
        return moves

    def release(self, consumer: str, partitions: collections.abc.Iterable[int]) -> None:
        """Let go of partitions no longer consumed (their channel is closed)."""
        for p in partitions:
            self._leases.release(routing.partition_queue(consumer, p))

    def leave(self, consumer: str, owned: collections.abc.Iterable[int]) -> None:
        """The consumer is gone (a reload): wait for none of its partitions any more, and
        let go of those it consumed (its channel is closed)."""
        for key in [k for k in self._waiting if k[0] == consumer]:
            del self._waiting[key]
        self.release(consumer, owned)

    def release_all(self) -> None:
        """At a stop, after every channel is closed: their messages are back."""
        self._leases.release_all()

    def _note_waits(self, consumer: str, missing: set[int], gained: set[int]) -> None:
        """Say once when a wanted partition is held by someone else, and when it comes:
        retried every CLAIM_EVERY, a wait was silent (e.g. a second instance of the app
        on this host waits for the first one's leases for as long as that one runs)."""
        now = self._clock()
        for key in [k for k in self._waiting if k[0] == consumer and k[1] not in missing]:
            del self._waiting[key]  # no longer ours to want
        for p in sorted(missing):
            key = (consumer, p)
            if p in gained:
                since = self._waiting.pop(key, None)
                if since is not None:
                    LOG.info(
                        "acquired partition %d of consumer %s after waiting %.1fs",
                        p,
                        consumer,
                        now - since,
                    )
            elif key not in self._waiting:
                self._waiting[key] = now
                holder = self._leases.holder(routing.partition_queue(consumer, p))
                # A sibling handing over during a rebalance lets go within moments;
                # anyone else (another consumerd on this host) may hold it for ever.
                sibling = holder is not None and parent_of(holder) == os.getppid()
                LOG.log(
                    logging.INFO if sibling else logging.WARNING,
                    "waiting for partition %d of consumer %s: held by another process (%s)",
                    p,
                    consumer,
                    f"pid {holder}" if holder else "pid unknown",
                )
