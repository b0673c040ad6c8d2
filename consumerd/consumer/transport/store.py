"""The embedded broker's database: messages, claims, owners, queues and bindings in one
SQLite file shared by every process on a host, with no kombu in it (the master opens it to
check a ``sqlite:`` URL before any worker starts, and the master never imports kombu).

Delivery: a fetch *claims* rows (they stay in the table, marked with the channel's owner token
and the claim time; the token maps to the owning process in ``owners``). Ack and
``reject(requeue=False)`` delete the row; ``reject(requeue=True)``, ``recover()``, cancelling a
consumer and closing the channel release the claim at once, keeping the row's place at the head of
its queue. Claims of a process that is gone (its pid no longer runs on this host, or runs another
program) are released by the next fetch of any consumer on the database, at most
``sweep_interval`` later; claims older than ``visibility_timeout`` are released whatever their
owner, as a backstop. A fetch claims up to the free prefetch window in one transaction.

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

The file and its folder: created private (0600, a new folder 0700), never following a symbolic
link, and refused when owned by another user (so are a ``-wal``/``-shm`` planted beside it).
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

from consumerd.consumer import broker
from consumerd.supervisor.osproc import pid_exists, proc_stat

# The transport's name: operators filter its log lines by it.
logger = logging.getLogger("consumerd.consumer.transport.sqlite")

_T = TypeVar("_T")


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


def _host_key() -> str:
    # Pids mean something only inside one pid namespace on one host.
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}"


def _start_time(pid: int | str) -> str | None:
    fields = proc_stat(pid) if _HAS_PROC else None
    return fields[19].decode() if fields else None


def _is_alive(pid: int, started: str | None) -> bool:
    """Whether the process that took a claim still runs (not a zombie, pid not reused)."""
    if not _HAS_PROC:
        return pid_exists(pid)
    fields = proc_stat(pid)
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
