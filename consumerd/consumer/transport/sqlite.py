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
raises :class:`DatabasePathError` there, and is not retried as a connection error.

Delivery: a fetch *claims* rows (they stay in the table, marked with the channel's owner token
and the claim time; the token maps to the owning process in ``owners``). Ack and
``reject(requeue=False)`` delete the row; ``reject(requeue=True)``, ``recover()``, cancelling a
consumer and closing the channel release the claim at once, keeping the row's place at the head of
its queue. Claims of a process that is gone (its pid no longer runs on this host, or runs another
program) are released by the next fetch of any consumer on the database, at most
``sweep_interval`` later; claims older than ``visibility_timeout`` are released whatever their
owner, as a backstop. A fetch claims up to the free prefetch window in one transaction.

Routing: bindings and exchange types live in the database, so direct, topic and fanout exchanges
route the same in every process. FIFO per queue; priorities are ignored.

Durability: a publish commits with ``synchronous=FULL`` (fsync before it returns) unless
``publish_synchronous`` says otherwise; claims and acks commit with ``NORMAL``, since losing one to
a power cut only redelivers a message. Every process must run on the same host (WAL mode).

A full disk: the database keeps ``<db>.reserve`` beside it, ``reserve_mb`` MiB really
allocated, set aside while there is room. A claim, ack, release or sweep that SQLite refuses
with SQLITE_FULL deletes the reserve and is tried once more, so consumers go on draining (a
delete or claim still appends to the WAL). The default, 8 MiB, is twice what the WAL grows to
before SQLite checkpoints it (1000 pages of 4 KiB): a full WAL, plus the database file growing
by the pages that checkpoint copies back. While the reserve is missing a publish first makes it
again, when the disk has twice its size free, and is refused ("database or disk is full")
when it cannot: the room freed is kept for draining, and publishing resumes by itself once
the disk has that room again.

Waiting costs one indexed read per consumed queue every ``polling_interval``; an idle consumer
used 0.4 % of a core at 0.05 s (0.17 % at 0.1 s) on a 2-core VM.

Transport options: ``polling_interval`` (0.05 s between polls of empty queues),
``visibility_timeout`` (3600 s; ``None`` or 0 disables), ``sweep_interval`` (1 s),
``busy_timeout`` (10 s), ``publish_synchronous`` (``"FULL"``), ``reserve_mb`` (8; 0 keeps no
reserve).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sqlite3
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from queue import Empty
from typing import Any, NamedTuple, TypeVar

from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from consumerd.consumer import broker
from consumerd.consumer.transport import envelope
from consumerd.supervisor.osproc import pid_exists

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How many rows a fetch claims when the channel has no prefetch limit.
UNLIMITED_BATCH = 100

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        payload TEXT NOT NULL,
        owner TEXT,
        claimed_at REAL,
        deliveries INTEGER NOT NULL DEFAULT 0)""",
    # Partial indexes: fetches walk only ready rows, sweeps only claimed ones.
    "CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, id) WHERE owner IS NULL",
    """CREATE INDEX IF NOT EXISTS messages_claimed ON messages (owner, claimed_at)
        WHERE owner IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS owners (
        token TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started TEXT)""",
    "CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS exchanges (name TEXT PRIMARY KEY, type TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS bindings (
        exchange TEXT NOT NULL, routing_key TEXT, pattern TEXT, queue TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS bindings_exchange ON bindings (exchange)",
)

_RELEASE = "UPDATE messages SET owner = NULL, claimed_at = NULL"

_HAS_PROC = os.path.exists("/proc/self/stat")

# Connections inherited over fork(): the child must neither use nor close them (closing runs
# SQLite's last-connection cleanup against files the parent still uses), so they are kept here.
_INHERITED: list[sqlite3.Connection] = []

# Owners whose channel closed while the database refused writes (a full disk): their
# process lives on, so no sweep would release their claims before the visibility timeout.
# The process's next sweep does, once the database takes writes again.
_UNRETIRED: set[Owner] = set()


class DatabasePathError(RuntimeError):
    """The broker database cannot be created, opened or written at the configured path."""


class Owner(NamedTuple):
    """Who holds a claim: a channel's token and the process it lives in."""

    token: str
    host: str
    pid: int
    started: str | None


Row = tuple[int, str, int]  # id, payload, deliveries


def database_path(url: str | None) -> str:
    """Absolute database path for a ``sqlite:////abs/path`` or ``sqlite:///rel/path`` URL."""
    if url and "?" in url:
        raise DatabasePathError(f"options go in transport_options, not in the URL: {url!r}")
    try:
        return broker.sqlite_path(url or "")
    except broker.BrokerURLError as exc:
        raise DatabasePathError(str(exc)) from None


def _proc_stat(pid: int | str) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat from the state on (index 0 = state), None if no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return data.rpartition(b")")[2].split()


def _host_key() -> str:
    # Pids mean something only inside one pid namespace on one host.
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}"


def _start_time(pid: int | str) -> str | None:
    fields = _proc_stat(pid) if _HAS_PROC else None
    return fields[19].decode() if fields else None


def _is_alive(pid: int, started: str | None) -> bool:
    """Whether the process that took a claim still runs (not a zombie, pid not reused)."""
    if not _HAS_PROC:
        return pid_exists(pid)
    fields = _proc_stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return False
    return started is None or fields[19].decode() == started


class Store:
    """The database: one sqlite3 connection per kombu connection, one short transaction a call."""

    def __init__(self, path: str, options: Mapping[str, Any]) -> None:
        self.path = path
        self.busy_timeout = float(options.get("busy_timeout", 10.0))
        self.publish_synchronous = str(options.get("publish_synchronous", "FULL")).upper()
        timeout = options.get("visibility_timeout", 3600.0)
        self.visibility_timeout = float(timeout) if timeout and float(timeout) > 0 else None
        self.sweep_interval = float(options.get("sweep_interval", 1.0))
        self.reserve_size = int(float(options.get("reserve_mb", 8)) * 1024 * 1024)
        self.reserve_path = path + ".reserve"
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._host = _host_key()
        self._next_sweep = 0.0

    # -- connection -------------------------------------------------------------------------

    def open(self) -> None:
        """Create folder, file and schema if missing; check the database is writable."""
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                return
            try:
                _private_file(self.path)
                db = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout,
                    isolation_level=None,  # we issue BEGIN IMMEDIATE/COMMIT ourselves
                    check_same_thread=False,  # kombu may ack from another thread; _lock guards
                )
                self._init_schema(db)
                self._make_reserve()
            except (OSError, sqlite3.DatabaseError) as exc:
                if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                    raise
                raise DatabasePathError(
                    f"cannot use {self.path!r} as the broker database: {exc}"
                ) from exc
            if self._db is not None:
                _INHERITED.append(self._db)
            self._db, self._pid = db, os.getpid()

    def _init_schema(self, db: sqlite3.Connection) -> None:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode=WAL refused (got {mode!r})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")  # also proves we can write
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- the reserve for a full disk --------------------------------------------------------

    def _make_reserve(self) -> bool:
        """Make sure the reserve exists, whole; False if the disk has no room for it: less
        than twice its size free. While posix_fallocate runs it holds what it took, and on
        a nearly full disk that was all the room the consumers were draining with."""
        if not self.reserve_size or os.path.lexists(self.reserve_path):
            return True
        disk = os.statvfs(os.path.dirname(self.path))
        if disk.f_bavail * disk.f_frsize < 2 * self.reserve_size:
            return False
        # Allocated under a name of its own, then linked: no process ever sees a partial one.
        tmp = f"{self.reserve_path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.reserve_size)
                finally:
                    os.close(fd)
                os.link(tmp, self.reserve_path)  # never replaces one another process made
            finally:
                os.unlink(tmp)
        except FileExistsError:
            return True  # another process made it meanwhile
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return False
        return True

    def _draining(self, write: Callable[[], _T]) -> _T:
        """Run a write that drains (claim, ack, release, sweep); refused for a full disk,
        delete the reserve and try it once more."""
        try:
            return write()
        except sqlite3.OperationalError as exc:
            if not self.reserve_size or "disk is full" not in str(exc):
                raise
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            self._await_spent_reserve()
        else:
            logger.warning(
                "the disk under the broker is full: spent its %d MiB reserve (%s) so that "
                "consumers keep draining; publishing is refused until the reserve fits again",
                self.reserve_size // (1024 * 1024),
                self.reserve_path,
            )
        return write()

    def _await_spent_reserve(self) -> None:
        """Another process spent the reserve: its room may be what this write needs, but
        the file system frees it a moment after the name is gone (measured on tmpfs: a
        write retried at once failed in 4 of 15 two-worker races). Wait, up to a second,
        for half of it to show as free."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            disk = os.statvfs(os.path.dirname(self.path))
            if disk.f_bavail * disk.f_frsize >= self.reserve_size // 2:
                return
            time.sleep(0.005)

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            elif self._db is not None:
                _INHERITED.append(self._db)
            self._db = None

    @property
    def closed(self) -> bool:
        return self._db is None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():
            self.open()
        assert self._db is not None
        return self._db

    @contextmanager
    def _transaction(self, synchronous: str = "NORMAL") -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._connection()
            if synchronous != "NORMAL":
                db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                if synchronous != "NORMAL":
                    db.execute("PRAGMA synchronous=NORMAL")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        with self._lock:
            return self._connection().execute(sql, tuple(params)).fetchall()

    def _write(self, sql: str, params: Iterable[Any] = ()) -> int:
        # One statement in autocommit mode is its own (write-locking) transaction.
        with self._lock:
            return self._connection().execute(sql, tuple(params)).rowcount

    # -- identity ---------------------------------------------------------------------------

    def new_owner(self) -> Owner:
        pid = os.getpid()
        return Owner(uuid.uuid4().hex, self._host, pid, _start_time(pid))

    # -- messages ---------------------------------------------------------------------------

    def put(self, rows: Iterable[tuple[str, str]]) -> None:
        """Insert (queue, payload) rows in one transaction: one fsync for all of them.
        Refused while the reserve is spent and cannot be made again: that room is for draining."""
        if self.reserve_size and not os.path.lexists(self.reserve_path):
            if not self._make_reserve():
                raise sqlite3.OperationalError(
                    "database or disk is full (the broker keeps its reserve for consumers)"
                )
            logger.info("the broker's reserve (%s) is back: publishing resumes", self.reserve_path)
        with self._transaction(self.publish_synchronous) as db:
            db.executemany("INSERT INTO messages (queue, payload) VALUES (?, ?)", rows)

    def claim(self, queue: str, owner: Owner, limit: int) -> list[Row]:
        """Claim up to ``limit`` ready messages of ``queue``, oldest first."""
        ready = "SELECT id FROM messages WHERE queue = ? AND owner IS NULL ORDER BY id LIMIT ?"
        if not self._query(ready, (queue, 1)):
            return []  # an idle poll stays a read: no write lock

        def take() -> list[Row]:
            with self._transaction() as db:
                db.execute("INSERT OR IGNORE INTO owners VALUES (?, ?, ?, ?)", owner)
                return list(
                    db.execute(
                        "UPDATE messages SET owner = ?, claimed_at = ?, deliveries = deliveries"
                        f" + 1 WHERE id IN ({ready}) RETURNING id, payload, deliveries",
                        (owner.token, time.time(), queue, limit),
                    ).fetchall()
                )

        rows = self._draining(take)
        rows.sort()  # RETURNING gives no order
        return rows

    def move(self, message_id: int, owner: Owner, queue: str, payload: str) -> bool:
        """Replace one claimed message by ``payload`` on ``queue``, in one transaction (a
        dead-lettering is part of draining: it may spend the reserve)."""

        def move() -> bool:
            with self._transaction(self.publish_synchronous) as db:
                gone = db.execute(
                    "DELETE FROM messages WHERE id = ? AND owner = ?", (message_id, owner.token)
                ).rowcount
                if gone == 1:
                    db.execute(
                        "INSERT INTO messages (queue, payload) VALUES (?, ?)", (queue, payload)
                    )
            return gone == 1

        return self._draining(move)

    def settle(self, message_id: int, owner: Owner, *, delete: bool) -> bool:
        """Delete (ack) or release (requeue) one claimed message; False if no longer ours."""
        where = " WHERE id = ? AND owner = ?"
        sql = ("DELETE FROM messages" if delete else _RELEASE) + where
        return self._draining(lambda: self._write(sql, (message_id, owner.token))) == 1

    def release(self, owner: Owner, ids: Iterable[int] | None = None) -> int:
        """Release ``ids`` (default: every claim) held by ``owner``."""
        if ids is None:
            return self._draining(
                lambda: self._write(f"{_RELEASE} WHERE owner = ?", (owner.token,))
            )
        pairs = [(i, owner.token) for i in ids]

        def release() -> int:
            with self._transaction() as db:
                return db.executemany(f"{_RELEASE} WHERE id = ? AND owner = ?", pairs).rowcount

        return self._draining(release)

    def retire(self, owner: Owner) -> None:
        """Release every claim of ``owner`` and forget it (a channel closing)."""
        with self._lock:
            if self.closed or self._pid != os.getpid():
                return

            def retire() -> None:
                with self._transaction() as db:
                    db.execute(f"{_RELEASE} WHERE owner = ?", (owner.token,))
                    db.execute("DELETE FROM owners WHERE token = ?", (owner.token,))

            try:
                self._draining(retire)
            except sqlite3.OperationalError as exc:
                _UNRETIRED.add(owner)
                logger.warning(
                    "could not release this channel's claims (%s): released at the next "
                    "fetch that can write",
                    exc,
                )

    def maybe_sweep(self) -> None:
        """Release claims of dead owners and expired claims, at most once per sweep_interval."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval
        dead = [
            token
            for token, host, pid, started in self._query("SELECT * FROM owners")
            if host == self._host and not _is_alive(pid, started)
        ]
        unretired = [o for o in list(_UNRETIRED) if o.pid == os.getpid()]
        dead += [o.token for o in unretired]
        expired = "owner IS NOT NULL AND claimed_at < ?"
        cutoff = time.time() - (self.visibility_timeout or 0.0)
        stale = self.visibility_timeout is not None and bool(
            self._query(f"SELECT 1 FROM messages WHERE {expired} LIMIT 1", (cutoff,))
        )
        if not dead and not stale:
            return

        def sweep() -> int:
            released = 0
            with self._transaction() as db:
                for token in dead:
                    released += db.execute(f"{_RELEASE} WHERE owner = ?", (token,)).rowcount
                    db.execute("DELETE FROM owners WHERE token = ?", (token,))
                if stale:
                    released += db.execute(f"{_RELEASE} WHERE {expired}", (cutoff,)).rowcount
            return released

        released = self._draining(sweep)
        _UNRETIRED.difference_update(unretired)
        if released:
            logger.warning(
                "released %d message(s) claimed by %d dead consumer(s) or past the %s s "
                "visibility timeout",
                released,
                len(dead),
                self.visibility_timeout,
            )

    # -- queues, exchanges, bindings --------------------------------------------------------

    def declare_queue(self, queue: str) -> None:
        self._write("INSERT OR IGNORE INTO queues VALUES (?)", (queue,))

    def has_queue(self, queue: str) -> bool:
        return bool(self._query("SELECT 1 FROM queues WHERE name = ?", (queue,)))

    def size(self, queue: str) -> int:
        sql = "SELECT count(*) FROM messages WHERE queue = ? AND owner IS NULL"
        return int(self._query(sql, (queue,))[0][0])

    def purge(self, queue: str) -> int:
        return self._write("DELETE FROM messages WHERE queue = ? AND owner IS NULL", (queue,))

    def delete_queue(self, queue: str) -> int:
        with self._transaction() as db:
            count = db.execute("DELETE FROM messages WHERE queue = ?", (queue,)).rowcount
            db.execute("DELETE FROM bindings WHERE queue = ?", (queue,))
            db.execute("DELETE FROM queues WHERE name = ?", (queue,))
        return int(count)

    def declare_exchange(self, exchange: str, kind: str) -> None:
        self._write("INSERT OR IGNORE INTO exchanges VALUES (?, ?)", (exchange, kind))

    def exchange_type(self, exchange: str) -> str | None:
        rows = self._query("SELECT type FROM exchanges WHERE name = ?", (exchange,))
        return str(rows[0][0]) if rows else None

    def delete_exchange(self, exchange: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM bindings WHERE exchange = ?", (exchange,))
            db.execute("DELETE FROM exchanges WHERE name = ?", (exchange,))

    def bind(self, exchange: str, routing_key: str | None, pattern: str | None, queue: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO bindings SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM bindings"
                " WHERE exchange = ? AND routing_key IS ? AND queue = ?)",
                (exchange, routing_key, pattern, queue, exchange, routing_key, queue),
            )

    def unbind(self, exchange: str, routing_key: str | None, queue: str) -> None:
        self._write(
            "DELETE FROM bindings WHERE exchange = ? AND routing_key IS ? AND queue = ?",
            (exchange, routing_key, queue),
        )

    def table(self, exchange: str) -> list[tuple[str | None, str | None, str]]:
        sql = "SELECT routing_key, pattern, queue FROM bindings WHERE exchange = ?"
        return [tuple(row) for row in self._query(sql, (exchange,))]


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


def _private_file(path: str) -> None:
    """Create the database's folder (0700) and file (0600) if missing, so that other users
    cannot read the messages; an existing file of ours loses its access for others (older
    releases made it 0644). SQLite gives ``-wal`` and ``-shm`` the file's mode, so the
    file's mode is what protects the messages: an existing folder is left as it is — it
    may be /tmp or a project's directory, and a root consumerd that narrowed /tmp to
    1770 locked every other user out of it. Refuses a symlink planted in place of the
    file.

    Never opens the database file itself: SQLite's locks on it are POSIX advisory locks,
    owned by the process, and closing *any* descriptor of the file drops every one this
    process holds, those of its open connections included (the poke connection of a
    reload did so). The other processes then saw the database unused, the last one to
    close a connection checkpointed and deleted the WAL, and this process went on
    claiming and acking in the unlinked WAL: acks that no one else ever saw. A missing
    file is created under a temporary name and linked into place, so the only
    descriptor ever closed is one of a file no connection can have open yet."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    if not os.path.lexists(path):
        _create_private(path)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise OSError(errno.ELOOP, "the database path is a symbolic link", path)
    owner = info.st_uid
    for name in (path, path + "-wal", path + "-shm"):
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        _check_companion(name, info, owner)
        if stat.S_ISREG(info.st_mode):
            _narrow(name, info)


def _check_companion(name: str, info: os.stat_result, owner: int) -> None:
    """Refuse a ``-wal`` or ``-shm`` that another user could read: a symlink (SQLite
    follows it), or a file not owned by the database file's owner, planted before SQLite
    made it (SQLite keeps a file it finds, with its owner and mode). The database's owner
    rather than ours: SQLite run by root gives these files to the database's owner."""
    if stat.S_ISLNK(info.st_mode):
        raise OSError(errno.ELOOP, "the database's companion file is a symbolic link", name)
    if info.st_uid != owner:
        raise OSError(
            errno.EPERM,
            f"the database's companion file belongs to uid {info.st_uid}, "
            f"not to the database's owner (uid {owner})",
            name,
        )


def _create_private(path: str) -> None:
    """An empty (valid) database file at ``path``, mode 0600, unless one appeared."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)  # a file only we know of: no lock of any connection is on it
    try:
        os.link(tmp, path)  # never replaces a file another process created meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _narrow(path: str, info: os.stat_result) -> None:
    """Take away the access of other users from our own ``path`` (a chmod, no open)."""
    if info.st_uid == os.geteuid() and info.st_mode & 0o007:
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o007)
