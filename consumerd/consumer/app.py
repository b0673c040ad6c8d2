# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial)
"""The app contract: an :class:`App` holds consumer declarations and publishes messages.

An app is plain data plus a producer: importing it neither connects nor imports kombu, so
``consumerd check`` and the master process load it without a broker, and workers forked
from the master inherit no kombu state. Only workers and producers import kombu.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import typing
import uuid

from consumerd.consumer import batching, broker, notifications, policy, publishing, routing

Handler = typing.Callable[[typing.Any, "Delivery"], object]
_HandlerT = typing.TypeVar("_HandlerT", bound=Handler)
_NotificationHandlerT = typing.TypeVar(
    "_NotificationHandlerT", notifications.NotificationHandler, notifications.BatchHandler
)

DEFAULT_PREFETCH = 100


class Delivery:
    """What a handler gets beside the body: headers, delivery info, redelivered flag.

    The runtime acks (or retries, or dead-letters) after the handler returns; handlers do
    not ack themselves. ``raw`` is the underlying :class:`kombu.message.Message`.
    """

    __slots__ = ("attempt", "delivery_info", "headers", "queue", "raw", "redelivered")

    def __init__(self, raw: typing.Any, queue: str) -> None:
        self.raw = raw
        self.queue = queue
        self.headers: dict[str, typing.Any] = raw.headers or {}
        self.delivery_info: dict[str, typing.Any] = raw.delivery_info
        self.redelivered = bool(
            self.delivery_info.get("redelivered") or self.headers.get("redelivered")
        )
        self.attempt = policy.attempt_of(self.headers)

    def __repr__(self) -> str:
        return f"<Delivery queue={self.queue!r} attempt={self.attempt}>"


@dataclasses.dataclass(frozen=True)
class ConsumerSpec:
    """One ``@app.consumer`` declaration."""

    name: str
    handler: Handler
    prefetch: int | None
    partitions: int
    """0: one plain queue; P > 0: queues ``<name>.p0`` … ``<name>.p{P-1}``."""
    retry: policy.RetryPolicy
    source: QueueSource | None = None
    """Where the queues come from when they are not named after the consumer."""
    prepare: typing.Callable[[typing.Any], typing.Any] | None = None
    """Turns the decoded body into what the handler gets; None means ack and skip it."""
    batch: batching.BatchPolicy | None = None
    """Set: the handler gets lists, ``handler(bodies, deliveries)``."""
    max_deaths: int = policy.MAX_DEATHS
    """Deliveries of one message that may end with the worker's death; at the limit it is
    dead-lettered without calling the handler (see :mod:`consumerd.consumer.deaths`)."""
    concurrency: int | None = None
    """Handlers of this consumer running at once in one worker (None: the default)."""

    @property
    def queue_names(self) -> list[str]:
        if self.source is not None:
            return self.source.queue_names
        if not self.partitions:
            return [self.name]
        return [routing.partition_queue(self.name, p) for p in range(self.partitions)]

    def queue_name(self, partition: int | None) -> str:
        return self.name if partition is None else routing.partition_queue(self.name, partition)

    def binding_key(self) -> tuple[object, ...]:
        """What a change of forces the worker to re-subscribe (the handler does not)."""
        return (self.name, self.prefetch, self.partitions, self.source, self.batch)

    def queue(self, name: str) -> typing.Any:
        """The kombu Queue to declare and consume for one of :attr:`queue_names`."""
        if self.source is not None:
            return self.source.queue(name)
        return declare_queue(name, bool(self.partitions))


class QueueSource(typing.Protocol):
    """Queues other than the consumer's own: e.g. bound to topic exchanges."""

    @property
    def queue_names(self) -> list[str]: ...

    def queue(self, name: str) -> typing.Any: ...


def declare_queue(name: str, single_active: bool = False) -> typing.Any:
    """A durable queue on the default exchange (routing key = queue name).

    Partition queues ask RabbitMQ for single-active-consumer so the broker itself never
    lets two workers consume one partition at once; virtual transports ignore the
    argument. Producers and workers build queues here so their arguments always match.
    """
    from kombu.entity import Queue  # noqa: PLC0415 - see the module docstring

    arguments = {"x-single-active-consumer": True} if single_active else None
    return Queue(name, routing_key=name, durable=True, queue_arguments=arguments)


@dataclasses.dataclass(frozen=True)
class Message:
    """One message for :meth:`App.publish_many` with its own ``key``, ``headers`` or
    ``message_id`` (any other item of the iterable is a body)."""

    body: typing.Any
    key: str | bytes | int | None = None
    headers: dict[str, typing.Any] | None = None
    message_id: str | None = None


class App:
    """A set of consumer declarations plus a producer using the same routing.

    ``broker``: the app's default broker URL; ``--broker`` and ``$CONSUMERD_BROKER``
    win over it. ``prefetch``, ``concurrency``, ``max_retries``, ``retry_delay``,
    ``max_retry_delay`` and ``max_deaths`` are defaults for every consumer.
    """

    def __init__(
        self,
        name: str,
        broker: str | None = None,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        concurrency: int = 1,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        max_deaths: int = policy.MAX_DEATHS,
    ) -> None:
        self.name = name
        self.broker = broker
        self.prefetch = _positive("prefetch", prefetch)
        self.max_deaths = _positive("max_deaths", max_deaths)
        self.concurrency = _positive("concurrency", concurrency)
        self.retry = policy.RetryPolicy(max_retries, retry_delay, max_retry_delay)
        self.consumers: dict[str, ConsumerSpec] = {}
        self._broker_override: str | None = None
        self._publisher: publishing.Publisher | None = None
        self._lock = threading.Lock()
        self._round_robin = itertools.count()

    def __repr__(self) -> str:
        return f"<consumerd.App {self.name!r} consumers={list(self.consumers)}>"

    # -- declarations -----------------------------------------------------------------

    def consumer(
        self,
        name: str,
        *,
        prefetch: int | None = None,
        partitions: int | None = None,
        concurrency: int | None = None,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        max_retry_delay: float | None = None,
        max_deaths: int | None = None,
    ) -> typing.Callable[[_HandlerT], _HandlerT]:
        """Declare ``handler(body, delivery)`` as the consumer of queue ``name``.

        ``partitions=P`` splits the queue into P partition queues, each consumed by
        exactly one worker; publish with ``key=`` to keep per-key order.
        ``max_deaths=N``: a message whose handling ended with the worker's death N times
        is dead-lettered without calling the handler again.

        ``concurrency=N`` runs up to N handlers at once in each worker: plain functions
        on threads, ``async def`` handlers as tasks of the worker's event loop. Messages
        of one partition key never run at the same time and finish in publish order;
        unpartitioned consumers are unordered.
        """
        self._check_new(name)
        retry = self._retry_of(max_retries, retry_delay, max_retry_delay)
        prefetch = None if prefetch is None else _positive("prefetch", prefetch)
        parts = 0 if partitions is None else _positive("partitions", partitions)
        deaths = self._max_deaths_of(max_deaths)
        concurrency = None if concurrency is None else _positive("concurrency", concurrency)

        def register(handler: _HandlerT) -> _HandlerT:
            if not callable(handler):
                raise TypeError(f"consumer {name!r}: {handler!r} is not callable")
            self._add(
                ConsumerSpec(
                    name,
                    handler,
                    prefetch,
                    parts,
                    retry,
                    max_deaths=deaths,
                    concurrency=concurrency,
                )
            )
            return handler

        return register

    def notifications(
        self,
        name: str,
        *,
        exchanges: typing.Sequence[str],
        topic: str = "notifications",
        priorities: typing.Sequence[str] = ("info",),
        event_types: typing.Sequence[str] = (),
        batch_size: int | None = None,
        batch_timeout: float = 1.0,
        durable: bool = False,
        auto_delete: bool = False,
        queue_arguments: dict[str, typing.Any] | None = None,
        pool: str | None = None,
        publisher_id: str | None = None,
        prefetch: int | None = None,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        max_retry_delay: float | None = None,
        max_deaths: int | None = None,
    ) -> typing.Callable[[_NotificationHandlerT], _NotificationHandlerT]:
        """Declare an OpenStack notification listener: ``handler(notification)``, or with
        ``batch_size`` ``handler([notification, …])``.

        It consumes queues ``<topic>.<priority>`` bound to each topic exchange (e.g.
        ``nova``) with that routing key; ``durable``, ``auto_delete`` and
        ``queue_arguments`` must match the notifiers' oslo.messaging settings
        (``amqp_durable_queues``, ``amqp_auto_delete``, quorum queues). With ``pool``
        it consumes one queue named ``pool`` bound with all those routing keys, as an
        oslo.messaging listener pool: every pool gets every notification. Notifications
        whose event type matches none of the fnmatch-style ``event_types``, or whose
        publisher id does not :func:`re.match` the ``publisher_id`` regex, are acked and
        dropped. A batch is handled when ``batch_size`` notifications are in or
        ``batch_timeout`` seconds after its first; it is acked, or retried, as a whole.
        A handler returning ``NotificationResult.REQUEUE`` puts its notification (or
        batch) back on the queue at once. See :mod:`consumerd.consumer.notifications`.
        """
        self._check_new(name)
        retry = self._retry_of(max_retries, retry_delay, max_retry_delay)
        deaths = self._max_deaths_of(max_deaths)
        listener = notifications.Listener(
            tuple(exchanges),
            topic,
            tuple(priorities),
            tuple(event_types),
            durable,
            auto_delete,
            queue_arguments,
            pool,
            publisher_id,
        )
        batch = None if batch_size is None else batching.BatchPolicy(batch_size, batch_timeout)
        prefetch = None if prefetch is None else _positive("prefetch", prefetch)
        if batch is not None and prefetch is not None and prefetch < batch.size:
            raise ValueError(
                f"notifications {name!r}: prefetch {prefetch} is below "
                f"batch_size {batch.size}: a batch could never fill"
            )

        def register(handler: _NotificationHandlerT) -> _NotificationHandlerT:
            if not callable(handler):
                raise TypeError(f"notifications {name!r}: {handler!r} is not callable")
            self._add(
                ConsumerSpec(
                    name,
                    notifications.adapt(handler),
                    prefetch,
                    0,
                    retry,
                    source=listener,
                    prepare=listener.prepare,
                    batch=batch,
                    max_deaths=deaths,
                )
            )
            return handler

        return register

    def _add(self, spec: ConsumerSpec) -> None:
        """Register ``spec``; two consumers of one queue would each take a share of it."""
        for other in self.consumers.values():
            shared = sorted(set(spec.queue_names) & set(other.queue_names))
            if shared:
                raise ValueError(
                    f"consumers {other.name!r} and {spec.name!r} of app "
                    f"{self.name!r} both consume {', '.join(shared)}"
                )
        self.consumers[spec.name] = spec

    def _check_new(self, name: str) -> None:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"consumer name must be a non-empty word, not {name!r}")
        if name in self.consumers:
            raise ValueError(f"consumer {name!r} is declared twice in app {self.name!r}")

    def _retry_of(
        self, max_retries: int | None, retry_delay: float | None, max_retry_delay: float | None
    ) -> policy.RetryPolicy:
        return policy.RetryPolicy(
            self.retry.max_retries if max_retries is None else max_retries,
            self.retry.delay if retry_delay is None else retry_delay,
            self.retry.max_delay if max_retry_delay is None else max_retry_delay,
        )

    def _max_deaths_of(self, max_deaths: int | None) -> int:
        return self.max_deaths if max_deaths is None else _positive("max_deaths", max_deaths)

    def prefetch_of(
        self, spec: ConsumerSpec, override: int | None = None, concurrency: int | None = None
    ) -> int:
        """``@consumer(prefetch=)`` wins, then ``--prefetch``, then ``App(prefetch=)``;
        at least the consumer's concurrency (``concurrency``: the ``--concurrency``
        override), or handlers would wait for messages the broker holds back; a batched
        consumer's at least its batch size, or a batch could never fill."""
        if spec.prefetch is not None:
            value = spec.prefetch
        else:
            value = self.prefetch if override is None else override
        value = max(value, self.concurrency_of(spec, concurrency))
        return value if spec.batch is None else max(value, spec.batch.size)

    def concurrency_of(self, spec: ConsumerSpec, override: int | None = None) -> int:
        """``@consumer(concurrency=)`` wins, then ``--concurrency``, then
        ``App(concurrency=)``. A batched consumer runs one batch at a time."""
        if spec.batch is not None:
            return 1
        if spec.concurrency is not None:
            return spec.concurrency
        return self.concurrency if override is None else override

    # -- producing --------------------------------------------------------------------

    @property
    def broker_url(self) -> str:
        return broker.resolve_url(self._broker_override, self.broker)

    def configure(self, *, broker_url: str | None = None) -> None:
        """Set the broker chosen on the command line (wins over everything else)."""
        with self._lock:
            self._broker_override = broker_url
            self._drop_publisher()

    def route(self, name: str, key: str | bytes | int | None = None) -> tuple[str, bool]:
        """The queue a message for ``name`` goes to, and whether it is a partition queue.

        A key picks a partition with a stable hash; no key spreads round-robin. A name
        this app does not declare is a plain queue.
        """
        spec = self.consumers.get(name)
        if spec is None or not spec.partitions:
            return name, False
        if key is None:
            partition = next(self._round_robin) % spec.partitions
        else:
            partition = routing.partition_of(key, spec.partitions)
        return routing.partition_queue(name, partition), True

    def publish(
        self,
        name: str,
        body: typing.Any,
        *,
        key: str | bytes | int | None = None,
        headers: dict[str, typing.Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Send ``body`` (JSON-serialisable) to consumer ``name``; returns the queue used.

        Persistent delivery; returns once the broker has the message (RabbitMQ: its
        publisher confirm); raises :class:`~consumerd.consumer.publishing.PublishError`
        if it cannot. The queue is declared first (once per connection) so a message sent
        before any worker started is kept. The message carries ``message_id`` (a fresh
        uuid4 hex if not given): handlers' log records show it, and its retry copies and
        dead letter keep it.
        """
        message = self._outgoing(name, Message(body, key, headers, message_id), None, None)
        self._send(name, [message], publishing.WINDOW)
        return message.queue

    def publish_many(
        self,
        name: str,
        bodies: typing.Iterable[typing.Any],
        *,
        key: str | bytes | int | None = None,
        headers: dict[str, typing.Any] | None = None,
        window: int = publishing.WINDOW,
    ) -> int:
        """Send every body of ``bodies`` to consumer ``name`` as :meth:`publish` does, in
        order, and return how many were sent.

        ``key`` and ``headers`` apply to every message; an item that is a
        :class:`Message` brings its own (its ``headers`` added to the common ones).
        Every message is confirmed, but ``window`` at a time: RabbitMQ confirms a
        window's messages together, Redis stores them in one round trip (MULTI/EXEC),
        the embedded broker in one transaction. ``bodies`` is read as it goes, and
        outside the App's lock, so a generator is fine, even a slow one or one that
        publishes itself. If some are not confirmed (refused, a lost connection that
        did not come back, a body that is not JSON) it stops at that window and raises
        :class:`~consumerd.consumer.publishing.PublishError`, whose ``confirmed``,
        ``unconfirmed`` (positions, from 0) and ``sent`` say what to send again.
        """
        window = _positive("window", window)
        messages = (self._outgoing(name, item, key, headers) for item in bodies)
        return self._send(name, messages, window)

    def _outgoing(
        self,
        name: str,
        item: typing.Any,
        key: str | bytes | int | None,
        headers: dict[str, typing.Any] | None,
    ) -> publishing.Outgoing:
        if isinstance(item, Message):
            key = item.key if item.key is not None else key
            headers = {**(headers or {}), **item.headers} if item.headers else headers
            body, message_id = item.body, item.message_id
        else:
            body, message_id = item, None
        queue, partitioned = self.route(name, key)
        if partitioned and key is not None:
            headers = {**(headers or {}), policy.KEY: routing.key_text(key)}
        return publishing.Outgoing(
            queue, partitioned, body, headers, message_id or uuid.uuid4().hex
        )

    def _send(self, name: str, messages: typing.Iterable[publishing.Outgoing], window: int) -> int:
        return publishing.send(name, messages, window, self._confirm)

    def _confirm(self, window: publishing.Window) -> None:
        with self._lock:
            if self._publisher is None:
                self._publisher = publishing.Publisher(self.broker_url)
            self._publisher.confirm(window)

    def close(self) -> None:
        """Release the producer's connection."""
        with self._lock:
            self._drop_publisher()

    def _drop_publisher(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
        self._publisher = None


def _positive(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, not {value!r}")
    return value
