# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial)
"""OpenStack (oslo.messaging) notifications: queues, envelopes and event-type filters.

oslo.messaging's notifier publishes every notification to a *topic* exchange (the
service's control exchange: ``nova``, ``neutron``, ``glance`` …) with the routing key
``<topic>.<priority>`` (``notifications.info``), and declares a queue of that name bound
to it, so that nothing is lost before a listener starts. A listener consumes those
queues. We declare exchange and queue with the rabbit driver's flags: durable only with
``amqp_durable_queues`` (default False) or quorum queues, auto-delete only with
``amqp_auto_delete`` (default False), arguments only for quorum or HA queues. RabbitMQ
refuses a re-declaration with other flags (``PRECONDITION_FAILED``), so these must match
the notifier's configuration.

With a *pool* (oslo.messaging's ``get_notification_listener(..., pool=NAME)``) the rabbit
driver declares one queue named exactly ``NAME`` (not ``<topic>-<pool>``: read in
``amqpdriver.listen_for_notifications``, which passes ``queue_name=pool`` to
``declare_topic_consumer``), bound to every exchange once per ``<topic>.<priority>``. So
each pool gets every notification once, shared among that pool's listeners, whatever the
other pools and the pool-less listeners (on ``<topic>.<priority>``) do. The notifier only
declares the pool-less queues: a pool's queue exists once a listener of it has started.

Filters, as oslo.messaging's ``NotificationFilter``: ``publisher_id`` is a regular
expression matched with :func:`re.match` (from the start, not to the end unless it ends
with ``$``). ``event_types`` are fnmatch patterns (consumerd's own; write a regex-free
``compute.instance.*``).

A handler may return :attr:`NotificationResult.REQUEUE` (oslo's value, ``"requeue"``):
the notification (the whole batch, for a batch handler) goes back to its queue at once,
as oslo.messaging does with ``allow_requeue=True``; see :func:`adapt`.

The message is either the 2.0 envelope ``{"oslo.version": "2.0", "oslo.message": "<json>"}``
or, from old notifiers, the plain dict; :func:`decode` accepts both.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import functools
import json
import logging
import re
import typing

from consumerd.consumer import policy

LOG = logging.getLogger("consumerd.consumer.notifications")

PRIORITIES = frozenset({"audit", "debug", "info", "warn", "error", "critical", "sample"})
"""The priorities oslo.messaging's notifier sends (``Notifier.warning`` sends ``warn``)."""
CONTEXT_PREFIX = "_context_"


class NotificationResult:
    """What a handler may return, as ``oslo_messaging.NotificationResult`` (same values,
    so an endpoint returning oslo's constant works unchanged)."""

    HANDLED = "handled"
    REQUEUE = "requeue"


NotificationHandler = typing.Callable[["Notification"], object]
BatchHandler = typing.Callable[[list["Notification"]], object]


@dataclasses.dataclass(frozen=True)
class Notification:
    """One notification as the notifier sent it."""

    event_type: str
    payload: typing.Any
    publisher_id: str
    priority: str
    """Lower case, as in the routing key (the notifier puts ``INFO`` in the body)."""
    timestamp: str | None
    """The notifier's UTC time as it wrote it (``2026-11-23 13:19:13.123456``)."""
    message_id: str | None
    context: dict[str, typing.Any]
    """The request context, from the ``_context_*`` keys, without the prefix."""

    @property
    def time(self) -> datetime.datetime | None:
        """:attr:`timestamp` as an aware UTC datetime, or None if absent or unreadable."""
        if not self.timestamp:
            return None
        try:
            value = datetime.datetime.fromisoformat(self.timestamp)
        except ValueError:
            return None
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def decode(body: typing.Any) -> Notification:
    """A notification from a decoded JSON body; ValueError if it is not one."""
    if not isinstance(body, dict):
        raise ValueError(f"a notification is a JSON object, not {type(body).__name__}")
    message: typing.Any = body
    if "oslo.message" in body:
        version = str(body.get("oslo.version", ""))
        if version.partition(".")[0] != "2":
            raise ValueError(f"unsupported oslo.version {version!r}")
        raw = body["oslo.message"]
        if not isinstance(raw, str):
            raise ValueError("oslo.message is not a JSON string")
        message = json.loads(raw)
        if not isinstance(message, dict):
            raise ValueError("oslo.message is not a JSON object")
    event_type = message.get("event_type")
    if not isinstance(event_type, str) or not event_type:
        raise ValueError("the notification has no event_type")
    return Notification(
        event_type=event_type,
        payload=message.get("payload"),
        publisher_id=str(message.get("publisher_id") or ""),
        priority=str(message.get("priority") or "").lower(),
        timestamp=_optional_str(message.get("timestamp")),
        message_id=_optional_str(message.get("message_id")),
        context={
            k[len(CONTEXT_PREFIX) :]: v for k, v in message.items() if k.startswith(CONTEXT_PREFIX)
        },
    )


def _optional_str(value: typing.Any) -> str | None:
    return None if value is None else str(value)


def event_type_matcher(patterns: typing.Sequence[str]) -> typing.Callable[[str], bool]:
    """A test of event types against fnmatch-style ``patterns`` (``compute.instance.*``),
    case-sensitive; no patterns accepts everything."""
    if not patterns:
        return lambda event_type: True
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda event_type: regex.match(event_type) is not None


@dataclasses.dataclass(eq=True)
class Listener:
    """Where one ``@app.notifications`` consumer reads, and which notifications it keeps.

    It is the consumer's queue source (queues ``<topic>.<priority>`` bound to every
    exchange in ``exchanges``) and its ``prepare`` step (envelope → :class:`Notification`,
    None for an event type the filter drops).
    """

    exchanges: tuple[str, ...]
    topic: str = "notifications"
    priorities: tuple[str, ...] = ("info",)
    event_types: tuple[str, ...] = ()
    durable: bool = False
    """oslo.messaging's ``amqp_durable_queues`` (True as well with ``rabbit_quorum_queue``)."""
    auto_delete: bool = False
    """oslo.messaging's ``amqp_auto_delete``."""
    queue_arguments: dict[str, typing.Any] | None = None
    """What oslo.messaging adds, e.g. ``{"x-queue-type": "quorum"}``."""
    pool: str | None = None
    """oslo.messaging's listener ``pool``: one queue of that name gets every notification."""
    publisher_id: str | None = None
    """A regex the publisher id must :func:`re.match` (``NotificationFilter(publisher_id=)``)."""
    _matches: typing.Callable[[str], bool] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    _publisher: re.Pattern[str] | None = dataclasses.field(init=False, repr=False, compare=False)
    _dropped: int = dataclasses.field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.exchanges or not all(_is_word(e) for e in self.exchanges):
            raise ValueError(f"exchanges must be non-empty names, not {self.exchanges!r}")
        if not _is_word(self.topic):
            raise ValueError(f"topic must be a non-empty word, not {self.topic!r}")
        unknown = sorted(set(self.priorities) - PRIORITIES)
        if not self.priorities or unknown:
            raise ValueError(
                f"priorities must be some of {sorted(PRIORITIES)}, not {list(self.priorities)!r}"
            )
        if len(set(self.priorities)) != len(self.priorities):
            raise ValueError(f"priorities listed twice in {list(self.priorities)!r}")
        if self.pool is not None and not _is_word(self.pool):
            raise ValueError(f"pool must be a non-empty word, not {self.pool!r}")
        self._matches = event_type_matcher(self.event_types)
        try:
            self._publisher = None if self.publisher_id is None else re.compile(self.publisher_id)
        except (re.error, TypeError) as exc:
            raise ValueError(f"publisher_id {self.publisher_id!r} is not a regex: {exc}") from None

    @property
    def routing_keys(self) -> list[str]:
        return [f"{self.topic}.{priority}" for priority in self.priorities]

    @property
    def queue_names(self) -> list[str]:
        return [self.pool] if self.pool is not None else self.routing_keys

    def queue(self, name: str) -> typing.Any:
        """Queue ``name`` bound to every exchange with routing key ``name``, or for a pool
        with every ``<topic>.<priority>`` (a kombu Queue)."""
        from kombu.entity import Exchange, Queue, binding  # noqa: PLC0415 - kombu only in workers

        keys = self.routing_keys if self.pool is not None else [name]
        bindings = [
            binding(
                Exchange(exchange, "topic", durable=self.durable, auto_delete=self.auto_delete),
                routing_key=key,
            )
            for exchange in self.exchanges
            for key in keys
        ]
        return Queue(
            name,
            bindings=bindings,
            durable=self.durable,
            auto_delete=self.auto_delete,
            queue_arguments=self.queue_arguments,
        )

    def prepare(self, body: typing.Any) -> Notification | None:
        notification = decode(body)
        if self._matches(notification.event_type) and (
            self._publisher is None or self._publisher.match(notification.publisher_id)
        ):
            return notification
        self._dropped += 1
        LOG.debug(
            "dropped %s notification %s from %s (%d dropped so far)",
            notification.event_type,
            notification.message_id,
            notification.publisher_id,
            self._dropped,
        )
        return None


def _is_word(text: object) -> bool:
    return isinstance(text, str) and bool(text) and not any(c.isspace() for c in text)


def adapt(handler: typing.Callable[..., object]) -> typing.Callable[..., object]:
    """The runtime calls ``handler(body, delivery)`` or, batched, ``handler(bodies,
    deliveries)``; notification handlers take only the notification (or the list), and
    their :attr:`NotificationResult.REQUEUE` becomes :data:`policy.REQUEUE`.

    Requeueing is oslo.messaging's (``basic.reject`` with requeue): the message is back
    at the head of its queue at once, not counted as an attempt, never dead-lettered, so a
    handler that always requeues it loops on it. Raising instead takes the retry path
    (back-off, then ``<name>.dlq``); oslo.messaging would requeue it at once, or with its
    default ``allow_requeue=False`` ack and lose it.
    """

    @functools.wraps(handler)
    def call(notifications: typing.Any, deliveries: typing.Any) -> object:
        result = handler(notifications)
        return policy.REQUEUE if result == NotificationResult.REQUEUE else result

    return call
