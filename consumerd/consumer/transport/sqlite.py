# kombu's virtual transport has no annotations; calls into it are untyped by necessity.
# mypy: disallow-untyped-calls=False
"""Durable, server-less kombu transport on the standard library's ``sqlite3``.

consumerd's default broker: a single database file shared by every process on one host, with
at-least-once delivery that survives a consumer being SIGKILLed.

Opening it::

    kombu.Connection("sqlite:////var/lib/app/broker.db",
                     transport="consumerd.consumer.transport.sqlite:Transport")

Paths are read as SQLAlchemy reads them (:func:`consumerd.consumer.broker.sqlite_path`):
``sqlite:////var/lib/app/broker.db`` (four slashes) is absolute, ``sqlite:///broker.db`` is
relative to the working directory when the connection is made.
The transport sets ``can_parse_url``, so kombu hands the URL over untouched as
``Connection.hostname`` (``virtual_host`` is unused) and :func:`database_path` reads it.
Missing folders and the database file are created on ``connect()``; a path that cannot be used
raises :class:`~consumerd.consumer.transport.store.DatabasePathError` there, and is not
retried as a connection error.

Delivery, durability, the full-disk reserve and the file's permissions are the store's
(:mod:`consumerd.consumer.transport.store`); this module is kombu's side of it.

Waiting costs one indexed read per consumed queue every ``polling_interval``; an idle consumer
used 0.4 % of a core at 0.05 s (0.17 % at 0.1 s) on a 2-core VM.

Transport options: ``polling_interval`` (0.05 s between polls of empty queues),
``visibility_timeout`` (3600 s; ``None`` or 0 disables), ``sweep_interval`` (1 s),
``busy_timeout`` (10 s), ``publish_synchronous`` (``"FULL"``), ``reserve_mb`` (8; 0 keeps no
reserve).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import deque
from queue import Empty
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from consumerd.consumer.transport import envelope
from consumerd.consumer.transport.store import Owner, Row, Store, database_path

logger = logging.getLogger(__name__)

#: How many rows a fetch claims when the channel has no prefetch limit.
UNLIMITED_BATCH = 100


class QoS(virtual.QoS):
    """Acks and rejects go to the database; the in-memory window only counts prefetch."""

    channel: Channel

    def ack(self, delivery_tag: int) -> None:
        self.channel.settle(delivery_tag, delete=True)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        self.channel.settle(delivery_tag, delete=not requeue)
        # kombu's reject would re-publish a copy; the row already went back (or away).
        super().ack(delivery_tag)

    def restore_unacked(self) -> list[Any]:
        self._flush()
        self._delivered.clear()
        self.channel.release_claims()
        return []

    def restore_unacked_once(self, stderr: Any = None) -> None:
        # Unlike kombu's, this also runs when nothing was delivered yet but rows were claimed.
        self._on_collect.cancel()
        if self.restore_at_shutdown and self.channel.do_restore:
            self.restore_unacked()


class Channel(virtual.Channel):
    """A virtual channel whose queues, bindings and claims live in the shared database."""

    QoS = QoS
    supports_fanout = True  # bindings are shared state, so fanout works across processes

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        # connection is set to None on close, but close still needs the store.
        self.store: Store = connection.store
        self._owner: Owner | None = None
        self._buffers: dict[str, deque[Row]] = {}
        self._auto_ack: set[str] = set()
        #: queue → its dead-letter queue, for rows that are not messages (the runtime's)
        self.dead_letter_queues: dict[str, str] = {}
        self._held: list[tuple[str, str]] | None = None  # see hold_puts()

    @property
    def owner(self) -> Owner:
        if self._owner is None or self._owner.pid != os.getpid():
            self._owner = self.store.new_owner()
        return self._owner

    # -- fetching ---------------------------------------------------------------------------

    def _window(self) -> int:
        room = self.qos.can_consume_max_estimate()
        if room is None:
            return UNLIMITED_BATCH
        return int(room) - sum(map(len, self._buffers.values()))

    def _take(self, queue: str, window: int) -> dict[str, Any]:
        while True:
            buffer = self._buffers.get(queue)
            if not buffer:
                if window <= 0:
                    raise Empty()
                self.store.maybe_sweep()
                rows = self.store.claim(queue, self.owner, window)
                if not rows:
                    raise Empty()
                buffer = self._buffers[queue] = deque(rows)
            message_id, raw, deliveries = buffer.popleft()
            try:
                payload: dict[str, Any] = loads(raw)
                if isinstance(payload, dict) and isinstance(payload.get("properties"), dict):
                    # unique per row, even for fanout copies
                    payload["properties"]["delivery_tag"] = message_id
                reason = envelope.error_of(payload)
            except Exception as exc:
                reason = f"the entry is not a JSON object ({type(exc).__name__}: {exc})"
            if reason is None:
                break
            self._dead_letter_row(queue, message_id, raw, reason)
        if deliveries > 1:
            payload["properties"]["delivery_info"]["redelivered"] = True
        return payload

    def _dead_letter_row(self, queue: str, message_id: int, raw: Any, reason: str) -> None:
        """A row kombu could not make a message of goes, as it was, to the queue's
        dead-letter queue (``<queue>.dlq`` unless the runtime named another)."""
        dead_letters = self.dead_letter_queues.get(queue) or queue + ".dlq"
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
        logger.error("Dead-lettering a message of %r that kombu cannot read: %s", queue, reason)
        self.store.move(
            message_id,
            self.owner,
            dead_letters,
            dumps(envelope.dead_letter(data, queue, dead_letters, reason)),
        )

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        payload = self._take(queue, self._window())
        if queue in self._auto_ack:
            self.settle(payload["properties"]["delivery_tag"], delete=True)
        return payload

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            payload = self._take(queue, 1)
        except Empty:
            return None
        message = self.Message(payload, channel=self)
        if no_ack:
            self.settle(message.delivery_tag, delete=True)
        else:
            self.qos.append(message, message.delivery_tag)
        return message

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        if no_ack:
            self._auto_ack.add(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._auto_ack.discard(queue)
            buffered = self._buffers.pop(queue, None)
            if buffered and not self.store.closed:
                self.store.release(self.owner, [row[0] for row in buffered])
        return result

    # -- settling ---------------------------------------------------------------------------

    def settle(self, delivery_tag: int, *, delete: bool) -> None:
        if not self.store.settle(delivery_tag, self.owner, delete=delete):
            logger.warning(
                "message %s was no longer claimed by this consumer (visibility timeout?); "
                "it will be or was delivered again",
                delivery_tag,
            )

    def release_claims(self) -> None:
        self._buffers.clear()
        if self._owner is not None and not self.store.closed:
            self.store.release(self._owner)

    def close(self) -> None:
        closing = not self.closed
        try:
            super().close()
        except sqlite3.OperationalError:
            if not closing or self._owner is None:
                raise
            # Its hand-back was refused (a full disk): retiring the owner below releases
            # the claims, or leaves them to the process's next sweep.
        if closing and self._owner is not None:
            self._buffers.clear()
            self.store.retire(self._owner)

    # -- storage hooks of kombu's virtual channel -------------------------------------------

    def hold_puts(self) -> None:
        """From now on publishes wait until :meth:`flush_puts`, which writes them in one
        transaction: a window of ``App.publish_many`` costs one fsync."""
        self._held = []

    def flush_puts(self) -> None:
        assert self._held is not None, "flush_puts() without hold_puts()"
        rows, self._held = self._held, []
        self.store.put(rows)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if self._held is None:
            self.store.put([(queue, dumps(message))])
        else:
            self._held.append((queue, dumps(message)))

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        queues = {queue for _, _, queue in self.get_table(exchange)}
        if queues:
            payload = dumps(message)
            self.store.put([(queue, payload) for queue in sorted(queues)])

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.store.declare_queue(queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.has_queue(queue)

    def _size(self, queue: str) -> int:
        return self.store.size(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> int:
        if if_empty and self._size(queue):
            return 0
        self.state.queue_bindings_delete(queue)
        return self.store.delete_queue(queue)

    def exchange_declare(  # noqa: PLR0917 (kombu's signature)
        self,
        exchange: Any = None,
        type: Any = "direct",
        durable: Any = False,
        auto_delete: Any = False,
        arguments: Any = None,
        nowait: Any = False,
        passive: Any = False,
    ) -> None:
        super().exchange_declare(exchange, type, durable, auto_delete, arguments, nowait, passive)
        if exchange and not passive:
            self.store.declare_exchange(exchange, type or "direct")

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        super().exchange_delete(exchange, if_unused, nowait)
        self.store.delete_exchange(exchange)

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        # The exchange may have been declared by another process only.
        if exchange in self.state.exchanges:
            return super().typeof(exchange, default)
        return self.exchange_types[self.store.exchange_type(exchange) or default]

    def _queue_bind(
        self, exchange: str, routing_key: str | None, pattern: str | None, queue: str
    ) -> None:
        self.store.bind(exchange, routing_key, pattern, queue)

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        self.state.binding_delete(queue, exchange, routing_key)
        if exchange:
            self.store.unbind(exchange, routing_key, queue)

    def get_table(self, exchange: str) -> list[tuple[str | None, str | None, str]]:
        return self.store.table(exchange)


class Transport(virtual.Transport):
    """kombu transport class: ``transport="consumerd.consumer.transport.sqlite:Transport"``."""

    Channel = Channel
    can_parse_url = True  # the whole URL reaches us as client.hostname
    default_port: Any = 0
    polling_interval = 0.05
    driver_type = "sql"
    driver_name = "sqlite3"
    # "database is locked" past busy_timeout is transient: let kombu reconnect and retry.
    connection_errors: Any = (*virtual.Transport.connection_errors, sqlite3.OperationalError)
    implements = virtual.Transport.implements.extend(
        exchange_type=frozenset(["direct", "topic", "fanout"])
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.store = Store(database_path(client.hostname), client.transport_options)

    def establish_connection(self) -> Any:
        self.store.open()
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)
        self.store.close()

    def driver_version(self) -> str:
        return sqlite3.sqlite_version
