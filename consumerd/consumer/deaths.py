"""Messages whose handling killed the worker: counted, and dead-lettered at the limit.

A handler that ends its process (``os._exit``, SIGKILL, a segfault, the OOM killer) leaves
its message unacked; the broker redelivers it, the next worker dies the same way, and the
queue stops. So each worker process notes which message it is handling, and deaths are
counted per message on this host:

* **In-flight record**: one file per worker process (``<scope>.<pid>.rec`` under the
  host's per-broker runtime directory, see :func:`~consumerd.consumer.ownership.lease_root`),
  mapped into memory: the process's start time, then :data:`SLOTS` slots, one per handler
  that may run at once (slot 0 for the loop's own thread, the others for concurrent
  handlers, see :mod:`~consumerd.consumer.dispatch`). Before a handler runs the worker
  writes the message's identity and a "handling" flag into its slot; after the message is
  settled it clears the flag. That is two stores into shared memory, no system call: the
  kernel keeps a dead process's shared pages, so the record survives any death of the
  process (not of the host).
* **Death counts**: one small JSON map per scope (``<scope>.counts``, at most
  :data:`MAX_ENTRIES` identities, the least recently counted dropped first), changed under
  an ``flock``. Whenever a worker starts, and before it handles a *redelivered* message
  (a message whose worker died always comes back redelivered, on every broker), it
  collects the records of processes that are gone (pid not running, a zombie, or reused:
  the record holds the start time): a record left "handling" adds one death to its
  message. A fresh delivery is never looked up, so the hot path costs only the record.
* **Identity**: the ``message_id`` property when there is one, else a hash of the body and
  the headers except those a redelivery changes (``redelivered``, ``x-delivery-count``).

A worker stopped by the runtime (SIGTERM past the graceful timeout) clears its record
first: only deaths count. A SIGINT fast stop or a master SIGKILL of a worker in the middle
of a handler counts as a death of that message. Messages of a batch handler are not
tracked. Counts are per host: across hosts (``--member``), quorum queues'
``x-delivery-count`` is the broker's own count.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import mmap
import os
import struct
import time
import typing
import urllib.parse

from consumerd.supervisor import osproc

LOG = logging.getLogger("consumerd.consumer")

SLOTS = 1025
"""Handlers a record can note at once: the loop's own, and the most concurrent ones."""
SLOT_SIZE = 256
MAX_ENTRIES = 1000
"""Identities kept in the death-count map; the oldest go first."""
VOLATILE_HEADERS = frozenset({"redelivered", "x-delivery-count"})
"""Headers a redelivery adds or changes: not part of a message's identity."""
_IDLE, _HANDLING = 0, 1
_START = 8  # the record begins with the process's start time
_SLOT_HEADER = 3  # state (1) + identity length (2)
# The slot's last 8 bytes: when handling began (unix time, a little-endian double), for
# the web page's "in hand since". At the end, so that the identity keeps its place.
_SINCE = SLOT_SIZE - 8
_MAX_ID = _SINCE - _SLOT_HEADER
RECORD_SIZE = _START + SLOTS * SLOT_SIZE
_DOUBLE = struct.Struct("<d")


def scope_of(app_name: str, member: int) -> str:
    """The scope of the records and counts of app ``app_name`` on member ``member``."""
    return f"{app_name}.{member}"


def in_hand(root: str, scope: str, pid: int) -> list[tuple[str, float]]:
    """What process ``pid`` of ``scope`` handles now: ``(identity, since)`` per handler
    running, oldest first; read from its record, without a lock (a value being written
    shows a moment later)."""
    path = os.path.join(root, "deaths", f"{urllib.parse.quote(scope, safe='')}.{pid}.rec")
    try:
        with open(path, "rb") as f:
            data = f.read(RECORD_SIZE)
    except OSError:
        return []
    found = []
    for at in range(_START, len(data) - SLOT_SIZE + 1, SLOT_SIZE):
        if data[at] != _HANDLING:
            continue
        length = min(int.from_bytes(data[at + 1 : at + 3], "little"), _MAX_ID)
        identity = data[at + _SLOT_HEADER : at + _SLOT_HEADER + length]
        (since,) = _DOUBLE.unpack_from(data, at + _SINCE)
        found.append((identity.decode("utf-8", "replace"), since))
    return sorted(found, key=lambda item: item[1])


def identity_of(message: typing.Any) -> str:
    """A message's identity across redeliveries (see the module docstring)."""
    message_id = message.properties.get("message_id")
    if isinstance(message_id, str) and 0 < len(message_id) <= 200:
        return "id:" + message_id
    digest = hashlib.blake2b(digest_size=16)
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if isinstance(body, bytes | bytearray):
        digest.update(body)
    headers = message.headers
    if isinstance(headers, dict) and headers:
        stable = [(k, v) for k, v in headers.items() if k not in VOLATILE_HEADERS]
        if stable:
            digest.update(repr(stable).encode("utf-8", "replace"))
    return "h:" + digest.hexdigest()


class DeathCounter:
    """This process's in-flight record, and the scope's death counts."""

    def __init__(self, root: str, scope: str) -> None:
        self._dir = os.path.join(root, "deaths")
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        self._scope = urllib.parse.quote(scope, safe="")
        self._pid = os.getpid()
        self._counts_path = os.path.join(self._dir, f"{self._scope}.counts")
        self._lock_path = os.path.join(self._dir, f"{self._scope}.lock")
        self._record_path = os.path.join(self._dir, f"{self._scope}.{self._pid}.rec")
        fd = os.open(self._record_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, RECORD_SIZE)
            self._record: mmap.mmap | None = mmap.mmap(fd, RECORD_SIZE)
        finally:
            os.close(fd)
        self._record[0:_START] = osproc.start_time(self._pid).to_bytes(_START, "little")

    # -- the hot path -----------------------------------------------------------------

    def handling(self, identity: str, slot: int = 0) -> None:
        """Note that this process is about to handle the message ``identity`` (in
        ``slot``: 0 for the loop's own thread)."""
        record = self._record
        if record is None:
            return
        at = _START + slot * SLOT_SIZE
        data = identity.encode("utf-8", "replace")[:_MAX_ID]
        record[at + _SLOT_HEADER : at + _SLOT_HEADER + len(data)] = data
        record[at + 1 : at + 3] = len(data).to_bytes(2, "little")
        _DOUBLE.pack_into(record, at + _SINCE, time.time())
        record[at] = _HANDLING

    def settled(self, slot: int = 0) -> None:
        """The message noted in ``slot`` is acked, retried or dead-lettered."""
        if self._record is not None:
            self._record[_START + slot * SLOT_SIZE] = _IDLE

    # -- deaths -----------------------------------------------------------------------

    def deaths_of(self, identity: str) -> int:
        """Deaths counted for ``identity``, after collecting those not counted yet."""
        with self._locked():
            counts = self._collect(self._load())
        entry = counts.get(identity)
        return int(entry[0]) if entry else 0

    def collect(self) -> None:
        """Count the deaths of gone processes whose records say they were handling."""
        with self._locked():
            self._collect(self._load())

    def forget(self, identity: str) -> None:
        """Drop ``identity``'s count (it was handled, or dead-lettered)."""
        with self._locked():
            counts = self._load()
            if counts.pop(identity, None) is not None:
                self._save(counts)

    def close(self) -> None:
        """Remove this process's record (a clean exit: nothing to count)."""
        record, self._record = self._record, None
        if record is not None:
            record.close()
            with contextlib.suppress(OSError):
                os.unlink(self._record_path)

    def _collect(self, counts: dict[str, list[float]]) -> dict[str, list[float]]:
        changed = False
        pattern = os.path.join(glob.escape(self._dir), f"{glob.escape(self._scope)}.*.rec")
        for path in glob.glob(pattern):
            pid_text = path[: -len(".rec")].rsplit(".", 1)[1]
            if not pid_text.isdigit() or int(pid_text) == self._pid:
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(RECORD_SIZE)
            except OSError:
                continue
            started = int.from_bytes(data[:_START], "little") if len(data) >= _START else 0
            if osproc.running(int(pid_text), started):
                continue
            for at in range(_START, len(data) - _SLOT_HEADER + 1, SLOT_SIZE):
                if data[at] != _HANDLING:
                    continue
                length = int.from_bytes(data[at + 1 : at + 3], "little")
                start = at + _SLOT_HEADER
                identity = data[start : start + length].decode("utf-8", "replace")
                entry = counts.setdefault(identity, [0, 0.0])
                entry[0] += 1
                entry[1] = time.time()
                changed = True
                LOG.warning(
                    "worker %s died while handling message %s (%d time(s) so far)",
                    pid_text,
                    identity,
                    entry[0],
                )
            with contextlib.suppress(OSError):
                os.unlink(path)
        if changed:
            self._save(counts)
        return counts

    @contextlib.contextmanager
    def _locked(self) -> typing.Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, list[float]]:
        try:
            with open(self._counts_path, "rb") as f:
                counts = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        if not isinstance(counts, dict):
            return {}
        return {
            k: v
            for k, v in counts.items()
            if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) for x in v)
        }

    def _save(self, counts: dict[str, list[float]]) -> None:
        if len(counts) > MAX_ENTRIES:
            newest = sorted(counts.items(), key=lambda kv: kv[1][1])[-MAX_ENTRIES:]
            counts = dict(newest)
        tmp = f"{self._counts_path}.{self._pid}.tmp"
        with open(tmp, "w") as f:
            json.dump(counts, f)
        os.replace(tmp, self._counts_path)
