# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial; its calls are checked at the boundary types instead)
"""The broker session of one worker: its connection and the channels the loop consumes on.

Channels: one per consumer (a :class:`Binding`, so each has its own prefetch and can be
re-bound alone), one for the retry queues, one for the wake queue. Closing a channel is
how prefetched but unstarted messages go back to their queue at once: RabbitMQ requeues
a closed channel's unacked messages, and kombu's virtual transports (Redis, SQLite)
restore them on a clean ``Channel.close()``. Every stop, rebind and partition hand-over
goes through it.

The session connects with back-off (past the limit the worker exits with
:data:`EX_TEMPFAIL`), and on Redis sweeps the messages dead workers took: a chore whose
time is :meth:`Session.deadline`, done by :meth:`Session.restore_due`.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import threading
import time
import typing

import tenacity
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Consumer, Producer

from consumerd.consumer import acks, batching, broker, retries, routing
from consumerd.consumer.app import App, ConsumerSpec, declare_queue

LOG = logging.getLogger("consumerd.consumer")

EX_TEMPFAIL = 75
"""Exit code of a worker whose broker stayed unreachable past the limit (sysexits.h)."""
RETRY_PREFETCH = 1000
"""Retry copies a worker may hold until due (they are not handled, only held)."""
RESTORE_RANGE = (0.5, 60.0)
"""Bounds of the period of the sweep that restores a dead worker's unacked messages."""
_FULL_MARKERS = ("maxmemory", "OOM command not allowed", "disk is full", "No space left")

Message = typing.Any  # kombu.message.Message: kombu ships no type information


@dataclasses.dataclass
class Binding:
    """One consumer on its own channel: the partitions it owns and what it consumes."""

    spec: ConsumerSpec
    prefetch: int
    owned: set[int] = dataclasses.field(default_factory=set)
    channel: typing.Any = None
    consumer: Consumer | None = None
    batch: batching.Batch | None = None
    settling: acks.Acks | None = None
    names: frozenset[str] = frozenset()
    """The queues consumed now: a delivery naming another (a foreign envelope on Redis)
    counts as one of the first."""
    first: str = ""

    def queue_names(self) -> list[str]:
        if not self.spec.partitions:
            return self.spec.queue_names
        return [routing.partition_queue(self.spec.name, p) for p in sorted(self.owned)]

    def open(
        self,
        connection: Connection,
        on_message: typing.Callable[..., None],
        settling: acks.Acks,
    ) -> None:
        names = self.queue_names()
        if not names:
            return
        self.names, self.first = frozenset(names), names[0]
        self.channel = connection.channel()
        self.settling = settling
        settling.track(self.channel, self.prefetch, self.spec.name)
        # Our Redis and SQLite transports move what is not a message at all there.
        dead_letters = routing.dead_letter_queue(self.spec.name)
        self.channel.dead_letter_queues = dict.fromkeys(names, dead_letters)
        # RabbitMQ's per-consumer prefetch would multiply by the number of partition
        # queues; a channel-wide limit keeps "prefetch" meaning messages per consumer.
        self.channel.basic_qos(0, self.prefetch, len(names) > 1)
        queues = [self.spec.queue(n) for n in names]
        self.batch = batching.Batch(self.spec.batch) if self.spec.batch else None
        self.consumer = Consumer(
            self.channel,
            queues=queues,
            accept=["json"],
            on_message=functools.partial(on_message, self),
            # kombu re-raises a decode error (an unknown compression, say) out of
            # drain_events without this: the worker would crash on it for ever.
            on_decode_error=functools.partial(_undecodable, functools.partial(on_message, self)),
            auto_declare=False,
        )
        self.consumer.consume()

    def close(self) -> None:
        """Stop consuming and hand prefetched, unacked messages back to the broker."""
        consumer, channel = self.consumer, self.channel
        self.consumer = self.channel = self.batch = None  # the batch goes back with them
        if channel is not None and self.settling is not None:
            self.settling.close(channel)  # what was handled is acked before the rest goes back
        if consumer is not None:
            consumer.cancel()
        if channel is not None:
            channel.close()


Receive = collections.abc.Callable[[Binding | None, Message], None]
"""kombu's callback for a delivery: of a consumer's binding, or (None) a retry copy."""


class Session:
    """One worker's connection to ``url`` and its channels; used by the loop's thread
    (but :meth:`hand_back`, a last resort from another)."""

    def __init__(
        self,
        url: str,
        *,
        amqp: bool,
        heartbeat: float,
        recoverable: tuple[type[BaseException], ...],
        acker: acks.Acks,
        retries: retries.Retries,
        receive: Receive,
        opened: collections.abc.Callable[[Binding], None],
        sleep: collections.abc.Callable[[float], None],
        stop: threading.Event,
    ) -> None:
        self._url = url
        self._amqp = amqp
        self._heartbeat = heartbeat
        self._recoverable = recoverable
        self._acks = acker
        self._retries = retries
        self._receive = receive
        self._opened = opened  # a consumer's channel is open: its pool may go on
        self._sleep = sleep  # a stop or reload cuts it short
        self._stop = stop
        self.wake_queue = f"consumerd.wake.{socket.gethostname()}.{os.getpid()}"
        self.conn: Connection | None = None
        self.producer: Producer | None = None
        self.bindings: dict[str, Binding] = {}
        self.connected_at = 0.0
        self._retry_channel: typing.Any = None
        self._wake_channel: typing.Any = None
        self._restore_every = 0.0
        self._next_restore = math.inf  # math.inf = never

    def deadline(self) -> float:
        """Monotonic time of the next sweep of a dead worker's messages (Redis)."""
        return self._next_restore

    def connect(
        self, app: App, prefetch_of: collections.abc.Callable[[ConsumerSpec], int], limit: float
    ) -> None:
        """Connect and bind ``app``'s consumers, retrying with jittered exponential
        back-off; past ``limit`` seconds exit with EX_TEMPFAIL so the master's respawn
        back-off takes over. Returns unconnected if a stop came first."""
        started = time.monotonic()

        def log_retry(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            LOG.warning(
                "broker %s unreachable (%s: %s); retry %d in %.1fs",
                broker.redact(self._url),
                type(exc).__name__,
                exc,
                state.attempt_number,
                state.upcoming_sleep,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(self._recoverable),
            stop=tenacity.stop_after_delay(limit) | tenacity.stop_when_event_set(self._stop),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=5.0),
            sleep=self._sleep,
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            retrying(self._connect_once, app, prefetch_of)
        except self._recoverable:
            if self._stop.is_set():
                return
            LOG.error(
                "broker %s unreachable for %.0fs: exiting with status %d",
                broker.redact(self._url),
                time.monotonic() - started,
                EX_TEMPFAIL,
            )
            raise SystemExit(EX_TEMPFAIL) from None

    def _connect_once(
        self, app: App, prefetch_of: collections.abc.Callable[[ConsumerSpec], int]
    ) -> None:
        conn = broker.connect(self._url, connect_timeout=5, heartbeat=self._heartbeat)
        try:
            conn.connect()
            self.conn = conn
            self.producer = Producer(conn.default_channel, serializer="json")
            self.connected_at = time.monotonic()
            try:
                self._bind_wake()
            except Exception as exc:
                if not _is_full(exc):
                    raise
                # The broker is full: consume without a wake queue (acks and fetches
                # free space); the loop notices a stop or reload within its STOP_CHECK instead.
                LOG.warning("broker full (%s); consuming without a wake queue", exc)
                self._wake_channel = None
            self._schedule_restore()
            self.bind_retry(app.consumers)
            LOG.info("consuming %s from %s", ", ".join(app.consumers), broker.redact(self._url))
            for spec in app.consumers.values():
                self.bind(spec, prefetch_of(spec), self.bindings.get(spec.name))
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Drop a broken connection without waiting on it; unacked messages come back
        from the broker (RabbitMQ at once, Redis after its visibility timeout)."""
        conn, self.conn = self.conn, None
        self.producer = None
        self._acks.forget()
        self._retries.drop()
        self._retry_channel = self._wake_channel = None
        for binding in self.bindings.values():
            binding.consumer = binding.channel = binding.batch = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    def declare(self, spec: ConsumerSpec) -> None:
        """Declare a consumer's queues (and its retry and dead-letter queues)."""
        assert self.conn is not None
        channel = self.conn.default_channel
        try:
            for name in spec.queue_names:
                spec.queue(name)(channel).declare()
            for name in (routing.retry_queue(spec.name), routing.dead_letter_queue(spec.name)):
                declare_queue(name)(channel).declare()
        except Exception as exc:
            if not _is_full(exc):
                raise
            # A full broker refuses declarations; consuming what is there frees space.
            LOG.warning("broker full (%s); consuming %s without declaring it", exc, spec.name)

    def bind(self, spec: ConsumerSpec, prefetch: int, previous: Binding | None) -> None:
        """Consume a (declared) consumer's queues; partitions keep the leases
        held before a reconnect and gain more at the next rebalance."""
        binding = Binding(spec, prefetch)
        if previous is not None and spec.partitions:
            binding.owned = {p for p in previous.owned if p < spec.partitions}
        self.bindings[spec.name] = binding
        self.open(binding)

    def open(self, binding: Binding) -> None:
        """Consume a binding's queues on a new channel."""
        assert self.conn is not None
        binding.open(self.conn, self._receive, self._acks)
        self._opened(binding)

    def unbind(self, name: str) -> Binding:
        """Stop consuming consumer ``name`` (its prefetched messages go back)."""
        binding = self.bindings.pop(name)
        binding.close()
        return binding

    def bind_retry(self, consumers: collections.abc.Mapping[str, ConsumerSpec]) -> None:
        """Declare every consumer's queues, then consume the retry queues."""
        assert self.conn is not None
        for spec in consumers.values():
            self.declare(spec)
        names = [routing.retry_queue(name) for name in consumers]
        self._retry_channel = self.conn.channel()
        self._retries.watch(self._retry_channel, consumers)
        self._acks.track(self._retry_channel, RETRY_PREFETCH, "the retry queues")
        self._retry_channel.dead_letter_queues = {
            routing.retry_queue(name): routing.dead_letter_queue(name) for name in consumers
        }
        self._retry_channel.basic_qos(0, RETRY_PREFETCH, len(names) > 1)
        on_copy = functools.partial(self._receive, None)
        Consumer(
            self._retry_channel,
            queues=[declare_queue(n) for n in names],
            on_message=on_copy,
            on_decode_error=functools.partial(_undecodable, on_copy),
            auto_declare=False,
        ).consume()

    def rebind_retry(self, consumers: collections.abc.Mapping[str, ConsumerSpec]) -> None:
        """The consumers changed: consume their retry queues on a new channel (the
        copies held from the old one go back with it)."""
        self._acks.close(self._retry_channel)
        _close_quietly(self._retry_channel)
        self._retries.drop()
        self.bind_retry(consumers)

    def restore_due(self, now: float) -> None:
        """Give back messages a dead worker took, if the sweep is due: on Redis they sit
        in the ``unacked`` hash until someone sweeps it, and kombu only sweeps from a
        blocking ``drain_events`` when a poll comes back empty, which a loop that never
        times out never sees. Every worker sweeps every visibility_timeout / 4; only
        messages older than the visibility timeout are restored."""
        if now < self._next_restore:
            return
        self._next_restore = time.monotonic() + self._restore_every
        self._wake_channel.qos.restore_visible(start=0, num=1000, interval=1)

    def hand_back(self) -> None:
        """Worker about to exit under a stuck handler: on virtual transports ask the
        broker to restore this worker's unacked messages now instead of after the
        visibility timeout. RabbitMQ requeues them itself when the socket closes."""
        if self._amqp:
            return
        for channel in [b.channel for b in self.bindings.values()] + [self._retry_channel]:
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.qos.restore_unacked_once()

    def close(self) -> None:
        """At a stop: every channel closes (what they prefetched goes back), then the
        connection."""
        conn = self.conn
        if conn is None:
            return
        for binding in self.bindings.values():
            _close_quietly(binding)
        _close_quietly(self._retry_channel)
        self._retries.drop()
        if self._wake_channel is not None and not self._amqp:
            with contextlib.suppress(Exception):
                self._wake_channel.queue_delete(self.wake_queue)
        _close_quietly(self._wake_channel)
        with contextlib.suppress(Exception):
            conn.release()
        self.conn = None

    def _bind_wake(self) -> None:
        assert self.conn is not None
        self._wake_channel = self.conn.channel()
        queue = Queue(
            self.wake_queue,
            routing_key=self.wake_queue,
            durable=False,
            exclusive=self._amqp,
            auto_delete=True,
        )
        Consumer(
            self._wake_channel,
            queues=[queue],
            no_ack=True,
            on_message=_on_wake,
            on_decode_error=lambda message, exc: None,
        ).consume()

    def _schedule_restore(self) -> None:
        self._next_restore = math.inf  # the sweep runs on this connection's wake channel
        channel = self._wake_channel
        timeout = getattr(channel, "visibility_timeout", None)
        if self._amqp or timeout is None or not hasattr(channel.qos, "restore_visible"):
            return
        low, high = RESTORE_RANGE
        self._restore_every = min(high, max(low, float(timeout) / 4))
        self._next_restore = time.monotonic() + self._restore_every


def _on_wake(message: Message) -> None:
    """Nothing to do: returning from ``drain_events`` is the point."""


def _undecodable(
    on_message: typing.Callable[[Message], None], message: Message, exc: BaseException
) -> None:
    """kombu's ``on_decode_error``: the message goes on like any other, its error noted in
    ``message.errors``, so it is dead-lettered (or, a retry copy, sent on raw)."""
    errors = getattr(message, "errors", None)
    if errors is None:
        raise exc  # not a kombu message: nothing here can settle it
    if not errors:
        errors.append((type(exc), exc, exc.__traceback__))
    on_message(message)


def _close_quietly(thing: typing.Any) -> None:
    if thing is not None:
        try:
            thing.close()
        except Exception as exc:
            LOG.debug("closing %r: %s", thing, exc)


def _is_full(exc: BaseException) -> bool:
    """The broker refused a write for lack of memory or disk, not for being gone."""
    text = str(exc)
    return any(marker in text for marker in _FULL_MARKERS)
