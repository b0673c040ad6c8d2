# mypy: disallow-untyped-calls=False
# (kombu's and py-amqp's annotations are partial)
"""What the operator's commands read and move on a broker: queue depths and dead letters.

One small class per broker kind, each answering the same questions:

- :meth:`Inspector.depths`: for each queue, the messages *ready* (waiting to be
  delivered), *unacked* (delivered to a consumer and not settled yet) and the *consumers*
  attached. Where a broker cannot tell a number, it is ``None`` and
  :attr:`Inspector.unknown` says why — never a made-up 0:

  ============  =============================  ===============================  =========
  broker        ready                          unacked                          consumers
  ============  =============================  ===============================  =========
  RabbitMQ      passive ``queue.declare``      only through the management      passive
                                               API, which we do not use: None   declare
                                               while a consumer is attached,
                                               0 when none is
  Redis         ``LLEN`` of the list and its   entries of kombu's ``unacked``   None: no
                priority sub-lists             hash whose routing key is the    registry
                                               queue (prefetched ones too)
  embedded      rows not claimed               rows claimed by a consumer       None
  ============  =============================  ===============================  =========

  RabbitMQ's 0 with no consumer attached assumes that nobody holds messages through
  ``basic.get`` without acking them (consumerd never does, except ``consumerd dlq`` on a
  dead-letter queue while it runs).

- :meth:`Inspector.dead_letters`: a session over one dead-letter queue — its messages,
  oldest first, and two moves on each, both exact and all-or-nothing for one message
  even if the process is SIGKILLed at any point (no loss, no duplicate):

  * RabbitMQ: the messages are taken with ``basic.get`` (not acked: anything not moved
    goes back when the session's channel closes) on a channel in transaction mode; a
    replay is ``publish`` + ``ack`` + ``tx.commit``, a purge ``ack`` + ``tx.commit``.
    An uncommitted transaction dies with the connection, and the unacked message is
    requeued by the broker.
  * Redis: one Lua script removes the exact entry from the list (``LREM`` count 1) and
    pushes the rewritten entry to the target list only if the removal happened.
  * embedded (SQLite): delete the row and insert the rewritten one in one transaction.

Message identity: the ``message_id`` property (``App.publish`` sets one), or, where a
message has none, ``sha-`` and the start of the SHA-256 of its body.

Nothing here runs in the master process: kombu is imported by the RabbitMQ class only.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import time
import typing
import urllib.parse
import uuid
from collections.abc import Iterator

from consumerd.consumer import broker, policy

if typing.TYPE_CHECKING:
    import redis

#: Headers a replayed message loses: it starts again at attempt 1.
REPLAY_DROPS = (policy.ATTEMPT, policy.ERROR, policy.RETRY_AT, policy.TARGET, policy.DEAD_AT)

#: kombu's Redis transport: ``<queue>`` holds priority 0, ``<queue>\x06\x16<n>`` priority n.
REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITIES = range(1, 10)

# KEYS: source list, target list. ARGV: the exact entry, the rewritten one.
_REDIS_MOVE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    if ARGV[2] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[2]) end
    return 1
end
return 0
"""

_CONNECT_TIMEOUT = 5.0


class Unreachable(Exception):
    """The broker cannot be reached or answered with an error: one line, for the user."""


class Unsupported(Exception):
    """A broker URL whose kind these commands do not inspect."""


@dataclasses.dataclass(frozen=True)
class Depth:
    """Messages of one queue; None where the broker cannot tell (see the module doc)."""

    ready: int
    unacked: int | None
    consumers: int | None


@dataclasses.dataclass
class DeadLetter:
    """One message of a dead-letter queue, decoded enough to show and move it."""

    id: str
    body: bytes
    headers: dict[str, typing.Any]
    properties: dict[str, typing.Any]
    handle: typing.Any = dataclasses.field(repr=False, default=None)
    """The broker's own handle of the message (delivery tag, list entry, row id)."""

    @property
    def error(self) -> str:
        return str(self.headers.get(policy.ERROR, ""))

    @property
    def attempt(self) -> int:
        return policy.attempt_of(self.headers)

    @property
    def origin(self) -> str | None:
        """The queue it was dead-lettered from (a partition's own), if it says."""
        value = self.headers.get(policy.TARGET)
        return value if isinstance(value, str) else None

    @property
    def dead_at(self) -> float | None:
        value = self.headers.get(policy.DEAD_AT)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return None
        try:
            return float(value)
        except ValueError:
            return None

    @property
    def content_type(self) -> str:
        return str(self.properties.get("content_type") or "")

    def replay_headers(self) -> dict[str, typing.Any]:
        return {k: v for k, v in self.headers.items() if k not in REPLAY_DROPS}


def identity(message_id: object, body: bytes) -> str:
    if isinstance(message_id, str) and message_id:
        return message_id
    return "sha-" + hashlib.sha256(body).hexdigest()[:16]


class DeadLetterSession(typing.Protocol):
    """The dead letters of one queue, taken for moving; see :meth:`Inspector.dead_letters`."""

    letters: list[DeadLetter]

    def replay(self, letter: DeadLetter, target: str) -> bool:
        """Move ``letter`` to ``target`` without the retry headers; False: it was gone."""

    def purge(self, letter: DeadLetter) -> bool:
        """Delete ``letter``; False: it was gone."""


class Inspector(typing.Protocol):
    kind: typing.ClassVar[str]
    unknown: typing.ClassVar[dict[str, str]]
    """Why a field of :class:`Depth` is None on this broker, by field name."""

    def depths(self, queues: list[str]) -> dict[str, Depth]: ...

    def prepare(self, queues: list[typing.Any]) -> None:
        """Make sure the (kombu) queues a replay sends to exist."""

    def dead_letters(
        self, queue: str, limit: int | None = None
    ) -> contextlib.AbstractContextManager[DeadLetterSession]:
        """The dead letters of ``queue``, oldest first (the first ``limit`` of them)."""

    def close(self) -> None: ...


def open_inspector(url: str) -> Inspector:
    """An inspector connected to the broker at ``url``.

    Raises :class:`Unsupported` for a kind of broker it cannot inspect and
    :class:`Unreachable` when the broker does not answer.
    """
    scheme = broker.validate(url)
    if scheme in ("redis", "rediss"):
        return RedisInspector(url)
    if scheme in ("amqp", "amqps", "pyamqp"):
        return RabbitInspector(url)
    if scheme == "sqlite":
        return SQLiteInspector(url)
    raise Unsupported(
        f"{scheme}:// brokers cannot be inspected (RabbitMQ, Redis and the embedded broker can)"
    )


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


# -- kombu's virtual-transport payload (Redis and the embedded broker) -------------------


def _payload_letter(raw: str | bytes, handle: typing.Any) -> DeadLetter:
    payload = json.loads(raw)
    properties = dict(payload.get("properties") or {})
    body = payload.get("body") or ""
    if properties.get("body_encoding") == "base64":
        data = base64.b64decode(body)
    else:
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    properties["content_type"] = payload.get("content-type")
    properties["content_encoding"] = payload.get("content-encoding")
    headers = payload.get("headers") or {}
    return DeadLetter(
        identity(properties.get("message_id"), data),
        data,
        headers if isinstance(headers, dict) else {},
        properties,
        (raw, payload),
    )


def _payload_for(letter: DeadLetter, target: str) -> str:
    """The stored entry of ``letter`` sent to ``target`` anew, attempt count reset."""
    payload = dict(letter.handle[1])
    payload["headers"] = letter.replay_headers()
    properties = dict(payload.get("properties") or {})
    properties["delivery_info"] = {"exchange": "", "routing_key": target}
    properties["delivery_tag"] = str(uuid.uuid4())
    payload["properties"] = properties
    return json.dumps(payload)


# -- Redis -------------------------------------------------------------------------------


class RedisInspector:
    """kombu's Redis layout (stock or ours): lists per queue, ``unacked`` hash of
    ``[payload, exchange, routing_key]`` entries, keys under ``global_keyprefix``."""

    kind: typing.ClassVar[str] = "redis"
    unknown: typing.ClassVar[dict[str, str]] = {
        "consumers": "Redis keeps no list of consumers (kombu consumers poll the lists)",
    }

    def __init__(self, url: str) -> None:
        import redis as redis_lib  # noqa: PLC0415 - the master never imports this module

        parts = urllib.parse.urlsplit(url)
        options = dict(urllib.parse.parse_qsl(parts.query))
        self.prefix = options.get("global_keyprefix", "")
        self.unacked_key = self.prefix + options.get("unacked_key", "unacked")
        self.client: redis.Redis = redis_lib.Redis.from_url(
            url.split("?", 1)[0],
            socket_timeout=float(options.get("socket_timeout", 10)),
            socket_connect_timeout=float(options.get("socket_connect_timeout", _CONNECT_TIMEOUT)),
        )
        self._errors: tuple[type[Exception], ...] = (redis_lib.RedisError,)
        self._call(self.client.ping)
        self._move = self.client.register_script(_REDIS_MOVE)

    def _call(self, fn: typing.Callable[..., typing.Any], *args: typing.Any) -> typing.Any:
        try:
            return fn(*args)
        except self._errors as exc:
            raise Unreachable(f"Redis: {_one_line(exc)}") from None

    def _keys(self, queue: str) -> list[str]:
        base = self.prefix + queue
        return [base, *(f"{base}{REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITIES)]

    def _held(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, value in self._call(lambda: list(self.client.hscan_iter(self.unacked_key))):
            with contextlib.suppress(ValueError, TypeError, IndexError):
                routing_key = json.loads(value)[2]
                counts[routing_key] = counts.get(routing_key, 0) + 1
        return counts

    def depths(self, queues: list[str]) -> dict[str, Depth]:
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            for key in self._keys(queue):
                pipe.llen(key)
        lengths = iter(self._call(pipe.execute))
        held = self._held()
        return {
            queue: Depth(
                sum(next(lengths) for _ in _REDIS_PRIORITIES) + next(lengths),
                held.get(queue, 0),
                None,
            )
            for queue in queues
        }

    @contextlib.contextmanager
    def dead_letters(self, queue: str, limit: int | None = None) -> Iterator[DeadLetterSession]:
        pipe = self.client.pipeline(transaction=False)
        keys = self._keys(queue)
        for key in keys:
            pipe.lrange(key, -limit if limit else 0, -1)
        letters = []
        # Consumers pop from the right: the oldest entry is last, the top priority first.
        for key, entries in reversed(list(zip(keys, self._call(pipe.execute), strict=True))):
            for raw in reversed(entries):
                letter = _payload_letter(raw, None)
                letter.handle = (raw, letter.handle[1], key)
                letters.append(letter)
        yield _RedisSession(self, queue, letters[:limit])

    def prepare(self, queues: list[typing.Any]) -> None:
        """Lists need no declaring."""

    def close(self) -> None:
        self.client.close()


class _RedisSession:
    def __init__(self, inspector: RedisInspector, queue: str, letters: list[DeadLetter]) -> None:
        self.inspector = inspector
        self.queue = queue
        self.letters = letters

    def _run(self, letter: DeadLetter, target_key: str, entry: str) -> bool:
        raw, _, key = letter.handle
        moved = self.inspector._call(self.inspector._move, [key, target_key], [raw, entry])
        return bool(moved)

    def replay(self, letter: DeadLetter, target: str) -> bool:
        key = letter.handle[2]
        # Same priority sub-list in the target as in the dead-letter queue.
        suffix = key[len(self.inspector.prefix + self.queue) :]
        return self._run(
            letter, self.inspector.prefix + target + suffix, _payload_for(letter, target)
        )

    def purge(self, letter: DeadLetter) -> bool:
        return self._run(letter, letter.handle[2], "")


# -- the embedded broker (SQLite) -----------------------------------------------------------


class SQLiteInspector:
    """consumerd's embedded broker: rows in ``messages``; claimed rows are held ones."""

    kind: typing.ClassVar[str] = "sqlite"
    unknown: typing.ClassVar[dict[str, str]] = {
        "consumers": "the embedded broker keeps no list of consumers (they poll the table)",
    }

    def __init__(self, url: str) -> None:
        from consumerd.consumer.transport import store  # noqa: PLC0415

        self.path = store.database_path(url.split("?", 1)[0])
        if not os.path.exists(self.path):
            raise Unreachable(
                f"no embedded broker database at {self.path} (nothing was "
                f"published or run with this broker from this directory)"
            )
        try:
            self.db = sqlite3.connect(
                f"file:{self.path}?mode=rw", uri=True, timeout=10, isolation_level=None
            )
            self.db.execute("SELECT 1 FROM messages LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise Unreachable(f"embedded broker {self.path}: {_one_line(exc)}") from None

    def _query(self, sql: str, params: typing.Iterable[typing.Any] = ()) -> list[typing.Any]:
        try:
            return self.db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise Unreachable(f"embedded broker {self.path}: {_one_line(exc)}") from None

    def depths(self, queues: list[str]) -> dict[str, Depth]:
        marks = ", ".join("?" * len(queues))
        rows = self._query(
            f"SELECT queue, count(*) - count(owner), count(owner) FROM messages "
            f"WHERE queue IN ({marks}) GROUP BY queue",
            queues,
        )
        found = {queue: Depth(ready, held, None) for queue, ready, held in rows}
        return {queue: found.get(queue, Depth(0, 0, None)) for queue in queues}

    @contextlib.contextmanager
    def dead_letters(self, queue: str, limit: int | None = None) -> Iterator[DeadLetterSession]:
        rows = self._query(
            "SELECT id, payload FROM messages WHERE queue = ? AND owner IS NULL ORDER BY id "
            "LIMIT ?",
            (queue, -1 if limit is None else limit),
        )
        letters = []
        for row_id, raw in rows:
            letter = _payload_letter(raw, None)
            letter.handle = (row_id, letter.handle[1])
            letters.append(letter)
        yield _SQLiteSession(self, queue, letters)

    def prepare(self, queues: list[typing.Any]) -> None:
        """A replay's insert declares its queue."""

    def close(self) -> None:
        self.db.close()


class _SQLiteSession:
    def __init__(self, inspector: SQLiteInspector, queue: str, letters: list[DeadLetter]) -> None:
        self.inspector = inspector
        self.queue = queue
        self.letters = letters

    def _move(self, letter: DeadLetter, target: str | None) -> bool:
        db = self.inspector.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = db.execute(
                    "DELETE FROM messages WHERE id = ? AND queue = ? AND owner IS NULL",
                    (letter.handle[0], self.queue),
                ).rowcount
                if gone == 1 and target is not None:
                    db.execute("INSERT OR IGNORE INTO queues VALUES (?)", (target,))
                    db.execute(
                        "INSERT INTO messages (queue, payload) VALUES (?, ?)",
                        (target, _payload_for(letter, target)),
                    )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise Unreachable(f"embedded broker {self.inspector.path}: {_one_line(exc)}") from None
        return gone == 1

    def replay(self, letter: DeadLetter, target: str) -> bool:
        return self._move(letter, target)

    def purge(self, letter: DeadLetter) -> bool:
        return self._move(letter, None)


# -- RabbitMQ -------------------------------------------------------------------------------


class RabbitInspector:
    """AMQP 0-9-1 only (no management API): passive declares, ``basic.get`` and
    transactions."""

    kind: typing.ClassVar[str] = "rabbitmq"
    unknown: typing.ClassVar[dict[str, str]] = {
        "unacked": "AMQP does not tell how many messages consumers hold; only RabbitMQ's "
        "management API (not used here) or rabbitmqctl does (0 is shown when no "
        "consumer is attached)",
    }

    def __init__(self, url: str) -> None:
        import amqp.exceptions  # noqa: PLC0415 - the master never imports this module
        from kombu.exceptions import OperationalError  # noqa: PLC0415

        self._not_found = amqp.exceptions.NotFound
        self._errors: tuple[type[BaseException], ...] = (
            OperationalError,
            OSError,
            amqp.exceptions.AMQPError,
        )
        self.connection = broker.connect(url, connect_timeout=_CONNECT_TIMEOUT)
        # Transactions and publisher confirms exclude each other on a channel.
        options = typing.cast(dict[str, typing.Any], self.connection.transport_options)
        options["confirm_publish"] = False
        try:
            self.connection.connect()
        except self._errors as exc:
            raise Unreachable(f"RabbitMQ: {_one_line(exc)}") from None

    @contextlib.contextmanager
    def _errors_as_unreachable(self) -> Iterator[None]:
        try:
            yield
        except self._not_found:
            raise
        except self._errors as exc:
            raise Unreachable(f"RabbitMQ: {_one_line(exc)}") from None

    def _declared(self, channel: typing.Any, queue: str) -> tuple[typing.Any, int, int] | None:
        """``(channel, ready, consumers)``; None if the queue does not exist (which closes
        the channel: the caller needs a new one)."""
        try:
            ok = channel.queue_declare(queue, passive=True)
        except self._not_found:
            return None
        return channel, int(ok.message_count), int(ok.consumer_count)

    def depths(self, queues: list[str]) -> dict[str, Depth]:
        out = {}
        with self._errors_as_unreachable():
            channel = self.connection.channel()
            try:
                for queue in queues:
                    declared = self._declared(channel, queue)
                    if declared is None:
                        out[queue] = Depth(0, 0, 0)
                        channel = self.connection.channel()
                        continue
                    _, ready, consumers = declared
                    out[queue] = Depth(ready, None if consumers else 0, consumers)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return out

    def prepare(self, queues: list[typing.Any]) -> None:
        """Declare them as consumerd does: the default exchange drops a message sent to a
        queue that does not exist."""
        with self._errors_as_unreachable():
            channel = self.connection.channel()
            try:
                for queue in queues:
                    queue(channel).declare()
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    @contextlib.contextmanager
    def dead_letters(self, queue: str, limit: int | None = None) -> Iterator[DeadLetterSession]:
        with self._errors_as_unreachable():
            channel = self.connection.channel()
            try:
                declared = self._declared(channel, queue)
                letters = []
                if declared is not None:
                    channel.tx_select()
                    # At most what was there: dead letters arriving meanwhile wait.
                    for _ in range(declared[1] if limit is None else min(limit, declared[1])):
                        message = channel.basic_get(queue, no_ack=False)
                        if message is None:
                            break
                        letters.append(self._letter(message))
                yield _RabbitSession(self, channel, letters)
            finally:
                # What was not moved goes back to the queue, in its place.
                with contextlib.suppress(Exception):
                    channel.close()

    @staticmethod
    def _letter(message: typing.Any) -> DeadLetter:
        properties = dict(message.properties)
        headers = properties.pop("application_headers", None) or {}
        body = message.body
        if isinstance(body, str):
            body = body.encode(properties.get("content_encoding") or "utf-8")
        return DeadLetter(
            identity(properties.get("message_id"), body),
            body,
            headers,
            properties,
            message.delivery_tag,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.release()


class _RabbitSession:
    def __init__(
        self, inspector: RabbitInspector, channel: typing.Any, letters: list[DeadLetter]
    ) -> None:
        self.inspector = inspector
        self.channel = channel
        self.letters = letters

    def replay(self, letter: DeadLetter, target: str) -> bool:
        import amqp  # noqa: PLC0415

        properties = {**letter.properties, "application_headers": letter.replay_headers()}
        with self.inspector._errors_as_unreachable():
            self.channel.basic_publish(
                amqp.Message(letter.body, **properties), exchange="", routing_key=target
            )
            self.channel.basic_ack(letter.handle)
            self.channel.tx_commit()
        return True

    def purge(self, letter: DeadLetter) -> bool:
        with self.inspector._errors_as_unreachable():
            self.channel.basic_ack(letter.handle)
            self.channel.tx_commit()
        return True


def age(letter: DeadLetter, now: float | None = None) -> float | None:
    """Seconds since ``letter`` was dead-lettered, if it says when."""
    dead_at = letter.dead_at
    return None if dead_at is None else max(0.0, (time.time() if now is None else now) - dead_at)
