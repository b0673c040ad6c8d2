"""Retry copies held until due, then sent back to the queue they failed on.

A failed message goes, as a copy with a due time (``consumerd-retry-at``) and its target
queue (``consumerd-queue``), to its consumer's ``<name>.retry`` queue. Every worker
consumes those queues on a channel of their own and *holds* each copy, unacked, until its
due time; it then republishes it to its target and acks it. A copy that cannot go back (no
target, a target that is itself a retry queue, a bad due time, a queue of no consumer) is
dead-lettered instead: it must not circle for ever, nor stop the queue.

Held copies belong to the channel they came on: when it closes the broker has them back,
so :meth:`Retries.drop` forgets them. The consume loop wakes at :meth:`Retries.deadline`.
"""

from __future__ import annotations

import collections.abc
import heapq
import itertools
import logging
import math
import time
import typing

from consumerd.consumer import decoding, policy, routing

LOG = logging.getLogger("consumerd.consumer")

Message = typing.Any  # kombu.message.Message: kombu ships no type information

Republish = collections.abc.Callable[[Message, str, policy.Headers], None]
"""Publish a message's raw body to a queue with these headers (confirmed, or raises)."""
DeadLetter = collections.abc.Callable[[str, Message, str, str], None]
"""``(dead_letter_queue, message, queue, error)``: copy the message there, then ack it."""
Ack = collections.abc.Callable[[Message], None]
Clock = collections.abc.Callable[[], float]


class Retries:
    """The retry copies one worker holds (a heap by due time) and what it does with them."""

    def __init__(
        self,
        *,
        republish: Republish,
        dead_letter: DeadLetter,
        ack: Ack,
        now: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self._republish = republish
        self._dead_letter = dead_letter
        self._ack = ack
        self._now = now  # due times are Unix times: they travel between hosts
        self._monotonic = monotonic  # the loop's deadlines are monotonic
        self._channel: object = None
        self._consumers: frozenset[str] = frozenset()
        self._held: list[tuple[float, int, Message]] = []
        self._seq = itertools.count()  # ties in due time keep arrival order, never compare messages

    def watch(self, channel: object, consumers: collections.abc.Iterable[str]) -> None:
        """Take copies from ``channel``, which consumes the retry queues of ``consumers``."""
        self.drop()
        self._channel = channel
        self._consumers = frozenset(consumers)

    def drop(self) -> None:
        """Forget every held copy: their channel is gone, so the broker has them back."""
        self._held.clear()
        self._channel = None

    def deadline(self) -> float:
        """Monotonic time at which the earliest held copy is due; infinite if none is held."""
        if not self._held:
            return math.inf
        return self._monotonic() + self._held[0][0] - self._now()

    def receive(self, message: Message) -> None:
        """A copy arrived: send it back now if due, hold it if not, dead-letter it if it
        cannot go back."""
        if message.channel is not self._channel:
            return  # the channel was closed: the broker has it back
        name = message.delivery_info.get("routing_key")
        name = name.removesuffix(routing.RETRY_SUFFIX) if isinstance(name, str) else ""
        try:
            due = self._check(name, message)
        except decoding.Undecodable as exc:
            LOG.error("%s: dead-lettering a retry copy: %s", name or "?", exc)
            headers = message.headers if isinstance(message.headers, dict) else {}
            target = headers.get(policy.TARGET)
            self._dead_letter(
                routing.dead_letter_queue(name or "consumerd"),
                message,
                target if isinstance(target, str) else name,
                f"undecodable: {exc}",
            )
            return
        if due <= self._now():
            self._release(message)
        else:
            heapq.heappush(self._held, (due, next(self._seq), message))

    def release_due(self) -> None:
        """Send back every held copy whose due time has come."""
        held = self._held
        if not held:
            return
        now = self._now()
        while held and held[0][0] <= now:
            message = heapq.heappop(held)[2]
            if message.channel is self._channel:
                self._release(message)

    def _check(self, name: str, message: Message) -> float:
        """When a retry copy is due; :class:`decoding.Undecodable` if it cannot go back."""
        if name not in self._consumers:
            raise decoding.Undecodable(f"retry copy on a queue of no consumer ({name!r})")
        headers = message.headers
        if not isinstance(headers, dict):
            raise decoding.Undecodable(f"headers are a {type(headers).__name__}, not a table")
        target = headers.get(policy.TARGET)
        if not isinstance(target, str):
            raise decoding.Undecodable("retry copy without target")
        if not target or target.endswith(routing.RETRY_SUFFIX):
            # a retry copy sent back to a retry queue would circle for ever
            raise decoding.Undecodable(f"retry copy for {policy.short_repr(target)}")
        try:
            return policy.read_retry_at(headers, self._now())
        except policy.BadHeader as exc:
            raise decoding.Undecodable(str(exc)) from None

    def _release(self, message: Message) -> None:
        headers = dict(message.headers or {})
        target = headers.pop(policy.TARGET)
        headers.pop(policy.RETRY_AT, None)
        self._republish(message, target, headers)
        self._ack(message)  # only now: the copy is safely back on its queue
