"""Settling a delivery once its handler ran, or could not run: the one place that does it.

Whatever ran the handler — inline, a pool's thread, once for a whole batch — the outcome
goes through :class:`Settler`, on the consume loop's thread (kombu channels are not
thread-safe): acked (through :mod:`~consumerd.consumer.acks`), requeued at the handler's
request, retried (a copy to ``<name>.retry``) or dead-lettered (a copy to ``<name>.dlq``).
A copy is published *before* its message is acked, so a crash in between leaves a
duplicate, never a loss; and it carries the raw body, never re-serialised.
"""

from __future__ import annotations

import collections.abc
import logging
import time
import typing

from consumerd.consumer import policy, routing
from consumerd.consumer.app import ConsumerSpec, Delivery
from consumerd.ops import metrics

LOG = logging.getLogger("consumerd.consumer")

Message = typing.Any  # kombu.message.Message: kombu ships no type information


class Publisher(typing.Protocol):
    """What publishes the copies: the connection's kombu ``Producer`` (confirmed on
    RabbitMQ, so ``publish`` returns once the broker has it, or raises)."""

    def publish(self, body: typing.Any, **kwargs: typing.Any) -> object: ...


class Acker(typing.Protocol):
    """The acks of the connection (:class:`~consumerd.consumer.acks.Acks`)."""

    def ack(self, message: Message, at_once: bool = False) -> None: ...

    def before_reject(self, message: Message) -> None: ...


class Settler:
    """Settles deliveries of one connection. ``publisher`` is that connection's: the
    loop sets it at each connect and clears it when the connection is lost."""

    def __init__(
        self,
        *,
        acker: Acker,
        publisher: Publisher | None,
        recoverable: tuple[type[BaseException], ...],
        on_handled: collections.abc.Callable[[], None],
        meters: collections.abc.Callable[[str], metrics.ConsumerMetrics] = metrics.for_consumer,
    ) -> None:
        self.publisher = publisher
        self._acker = acker
        self._recoverable = recoverable
        self._on_handled = on_handled
        self._meters = meters

    def handled(
        self, spec: ConsumerSpec, deliveries: collections.abc.Sequence[Delivery], result: object
    ) -> None:
        """The handler returned for ``deliveries`` (one, or a batch): requeue them all if
        it asked to, else ack each and count it handled."""
        if result is policy.REQUEUE:
            self._requeue(spec, deliveries)
            return
        meter = self._meters(spec.name)
        for delivery in deliveries:
            self._acker.ack(delivery.raw)
            meter.acked()
            self._on_handled()

    def skipped(self, spec: ConsumerSpec, message: Message) -> None:
        """The consumer's ``prepare`` filtered the message out: acked, not handled."""
        self._acker.ack(message)
        self._meters(spec.name).acked()

    def batch_failed(
        self, spec: ConsumerSpec, deliveries: collections.abc.Sequence[Delivery], exc: BaseException
    ) -> None:
        """A batch's handler raised: every message of it takes the retry path, so a
        batch never half succeeds."""
        LOG.warning(
            "%s: a batch of %d failed (%s): retrying all of it",
            spec.name,
            len(deliveries),
            policy.describe_error(exc),
        )
        for delivery in deliveries:
            self.failed(spec, delivery, exc)

    def failed(self, spec: ConsumerSpec, delivery: Delivery, exc: BaseException) -> None:
        """The handler raised: a retry copy with its next attempt, or after the last
        attempt a dead letter."""
        message = delivery.raw
        error = policy.describe_error(exc)
        delay = spec.retry.delay_after(delivery.attempt)
        if delay is None:
            LOG.error(
                "%s: attempt %d failed (%s): dead-lettering",
                delivery.queue,
                delivery.attempt,
                error,
            )
            self.dead_letter(spec, message, delivery.queue, error)
            return
        # %g, not %.1f: that showed a 0.04 s retry as "retry in 0.0s". The delay is the
        # least wait: the copy then goes to the back of its queue, behind any backlog.
        LOG.warning(
            "%s: attempt %d failed (%s): retry in %gs",
            delivery.queue,
            delivery.attempt,
            error,
            delay,
        )
        headers = policy.retry_headers(
            message.headers, delivery.attempt + 1, time.time() + delay, delivery.queue
        )
        self.republish(message, routing.retry_queue(spec.name), headers)
        self._acker.ack(message, at_once=True)  # only now: the copy is safely published
        self._meters(spec.name).retried()

    def dead_letter(self, spec: ConsumerSpec, message: Message, queue: str, error: str) -> None:
        """Give up on a message of ``spec``'s (taken from ``queue``) with ``error``."""
        self.dead_letter_to(routing.dead_letter_queue(spec.name), message, queue, error)
        self._meters(spec.name).dead_lettered()

    def dead_letter_to(self, dead_letters: str, message: Message, queue: str, error: str) -> None:
        """Copy ``message`` to ``dead_letters`` with ``error``, then ack it. Headers the
        broker cannot take back (or an odd type) are dropped rather than stop the queue."""
        headers = message.headers if isinstance(message.headers, dict) else None
        try:
            self.republish(message, dead_letters, policy.dead_letter_headers(headers, error, queue))
        except self._recoverable:
            raise
        except Exception as exc:
            LOG.error(
                "%s: could not dead-letter a message with its headers (%s): "
                "dead-lettering it without them",
                queue,
                policy.describe_error(exc),
            )
            error = f"{error}; its headers were dropped ({policy.describe_error(exc)})"
            self.republish(
                message, dead_letters, policy.dead_letter_headers(None, error, queue), plain=True
            )
        self._acker.ack(message, at_once=True)

    def republish(
        self, message: Message, queue: str, headers: policy.Headers, plain: bool = False
    ) -> None:
        """Publish the message's raw bytes (never re-serialised) to ``queue``. ``plain``:
        the body as bytes whatever the content type said (a last resort)."""
        assert self.publisher is not None
        if "compression" in headers and not message.errors:
            # kombu decompressed the body: it goes out plain.
            headers = {k: v for k, v in headers.items() if k != "compression"}
        body = message.body
        content_type = message.content_type
        content_encoding = message.content_encoding
        if plain or not isinstance(content_type, str) or not isinstance(content_encoding, str):
            content_type, content_encoding = "application/data", "binary"
        if not isinstance(body, bytes | str):
            body = b"" if body is None else bytes(body)
        # The message id is kept: a retry or a dead letter is the same message to whoever
        # traces it.
        properties = {}
        message_id = message.properties.get("message_id")
        if message_id is not None:
            properties["message_id"] = message_id
        self.publisher.publish(
            body,
            exchange="",
            routing_key=queue,
            headers=headers,
            content_type=content_type or "application/data",
            content_encoding=content_encoding or "binary",
            delivery_mode=2,
            **properties,
        )

    def _requeue(self, spec: ConsumerSpec, deliveries: collections.abc.Sequence[Delivery]) -> None:
        """The handler asked for its messages to go back to their queue now (oslo's
        ``NotificationResult.REQUEUE``): reject with requeue, no attempt counted."""
        LOG.debug(
            "%s: requeueing %d message(s) at the handler's request", spec.name, len(deliveries)
        )
        for delivery in deliveries:
            self._acker.before_reject(delivery.raw)
            delivery.raw.requeue()
