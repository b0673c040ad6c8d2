"""Who holds each unacked Redis message, so a dead holder's messages come back in seconds.

kombu's Redis transport records a fetched message in the ``unacked`` hash + the
``unacked_index`` zset and restores it only once it is ``visibility_timeout`` old (an hour
by default): a consumer SIGKILLed with 100 prefetched messages delays them by an hour.
Here every consumer process is a *holder* (``<hostname>:<host id>:<pid>:<start time>``,
unique per process incarnation) and the fetch script also writes each tag it records into
the holder's hash ``<unacked_key>_holder:<holder>`` (tag → source list key); acks and
hand-backs delete it there too. Each holder process runs one thread that, every
``holder_sweep_interval`` (0.5 s):

* beats: ``ZADD <unacked_key>_holders <Redis server time> <holder>`` (and keeps the holder in
  its host's set ``<unacked_key>_holders:<host id>``), so a live holder is known live;
* sweeps: gives back, at the head of their source lists and marked redelivered (as stock's
  restore does), the messages of every holder that is dead, which is either
  - on this host (same pid namespace) and its process is gone, a zombie, or its pid now
    runs another process (``/proc/<pid>/stat`` start time): a worker SIGKILLed, OOM-killed
    or crashed is noticed by its live siblings (or its replacement, which sweeps as it
    starts) within one interval; or
  - not heard from for ``holder_timeout`` (15 s) by the Redis clock: a host lost with all
    its processes (power, network, a deleted pod) is noticed by any live holder elsewhere.

A live holder is never swept: its thread beats while its handlers run, however slow, so a
slow handler's message is not delivered twice. The restore is one Lua script per batch of
tags that pushes a message only if it removed both its holder entry and its ``unacked``
entry, so sweeps of several processes never duplicate a message, and a late ack makes the
restore skip it. After a Redis outage (nobody beat for ``holder_timeout`` / 3) stale
heartbeats are not trusted until every live holder has had that long to beat again.

What is left to the stock ``visibility_timeout`` sweep: messages recorded by stock kombu
consumers (no holder), and a holder process that lives on but is stuck for good (its
thread still beats). A holder judged dead by its heartbeat while it still runs (paused
more than ``holder_timeout``, or cut off from Redis that long) gets its messages delivered
again elsewhere: at-least-once, as with the visibility timeout; its late acks skip them
(the transport's ack script deletes an ``unacked`` entry only while its holder holds it).

This module uses redis-py only (no kombu): the sweep thread has its own connection pool,
so it never shares a socket with the consuming thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import threading
import typing
import weakref
from time import monotonic

import redis
from redis.commands.core import Script

from consumerd.consumer.transport import scripts
from consumerd.supervisor import osproc

LOG = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.5
"""Seconds between two beats (and sweeps) of a holder process."""
TIMEOUT = 15.0
"""Seconds without a beat after which a holder on another host counts as dead."""
RECLAIM_BATCH = 500
"""Tags given back per script call."""

# KEYS: registry zset, this host's holder set. ARGV: holder ('' to only look), timeout,
# limit. Beats with the Redis clock (no skew between hosts) and returns
# {now, holders silent for timeout (none just after an outage), this host's holders}.
# A beat rewrites entries that exist (one per live holder): it runs on a full Redis
# (see scripts.py; its EXPIRE comes first for Redis < 7), because a holder whose beats
# were refused would be taken for dead by other hosts and its messages delivered twice.
BEAT_LUA = """
local clock = KEYS[1] .. ':clock'
redis.call('EXPIRE', clock, 86400)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local timeout = tonumber(ARGV[2])
local last = tonumber(redis.call('HGET', clock, 'beat') or now)
if now - last > timeout / 3 then
  redis.call('HSET', clock, 'resumed', tostring(now))  -- nobody beat: an outage
end
redis.call('HSET', clock, 'beat', tostring(now))
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[1])
end
local stale = {}
local resumed = tonumber(redis.call('HGET', clock, 'resumed') or 0)
if now - resumed > timeout then
  stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. tostring(now - timeout),
                     'LIMIT', 0, tonumber(ARGV[3]))
end
return {tostring(now), stale, redis.call('SMEMBERS', KEYS[2])}
"""

# KEYS: unacked hash, unacked index zset, the holder's hash, registry zset, the holder's
# host set. ARGV: holder, stale_before ('' if its process is known to be gone), then
# (tag, source key, payload) triples; an empty payload only drops the holder's entry, an
# empty source key acks the message (a late ack: see Holder.ack_late).
# Returns how many were pushed back, or -1 if the holder beat again meanwhile.
RECLAIM_LUA = """
if ARGV[2] ~= '' then
  local score = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if score and tonumber(score) >= tonumber(ARGV[2]) then return -1 end
end
local restored = 0
for i = 3, #ARGV, 3 do
  local tag, source, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HDEL', KEYS[3], tag) == 1 then
    if source == '' then
      redis.call('HDEL', KEYS[1], tag)
      redis.call('ZREM', KEYS[2], tag)
    elseif payload ~= '' and redis.call('HDEL', KEYS[1], tag) == 1 then
      redis.call('ZREM', KEYS[2], tag)
      redis.call('RPUSH', source, payload)
      restored = restored + 1
    end
  end
end
if redis.call('HLEN', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('SREM', KEYS[5], ARGV[1])
end
return restored
"""


def holder_of_this_process() -> str:
    pid = os.getpid()
    hostname = os.uname().nodename.replace(":", "_")
    return f"{hostname}:{osproc.host_id()}:{pid}:{osproc.start_time(pid)}"


def _gone(holder: str, host: str) -> bool:
    """Whether ``holder`` ran on this host (pid namespace) and its process is gone."""
    try:
        _, holder_host, pid, started = holder.rsplit(":", 3)
        return holder_host == host and not osproc.running(int(pid), int(started or 0))
    except ValueError:
        return False  # not ours to judge: its heartbeat will tell


def redelivered(value: bytes) -> str:
    """An ``unacked`` hash value (``[payload, exchange, routing_key]``) → the payload's
    JSON, marked redelivered the way stock kombu's restore marks it."""
    payload = json.loads(value)[0]
    with contextlib.suppress(KeyError, TypeError):
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
    return json.dumps(payload)


@dataclasses.dataclass(frozen=True)
class Keys:
    """Fully prefixed key names (kombu's ``global_keyprefix`` applied)."""

    unacked: str
    index: str

    @property
    def registry(self) -> str:
        return f"{self.unacked}_holders"

    def host_set(self, host: str) -> str:
        return f"{self.unacked}_holders:{host}"

    def holder(self, holder: str) -> str:
        return f"{self.unacked}_holder:{holder}"


class Holder:
    """This process as a holder on one Redis database: beats and sweeps from a thread
    while any channel using it is open. Get it with :func:`attach`."""

    def __init__(
        self, pool: redis.ConnectionPool, keys: Keys, interval: float, timeout: float
    ) -> None:
        self.id = holder_of_this_process()
        self.host = osproc.host_id()
        self.keys = keys
        self.key = keys.holder(self.id)  # the hash the fetch script writes
        self.interval = interval
        self.timeout = timeout
        self._client = redis.Redis(connection_pool=pool)
        # Both must run on a full Redis: see BEAT_LUA, and a reclaim only moves.
        self._beat: Script = scripts.register(self._client, BEAT_LUA)
        self._reclaim: Script = scripts.register(self._client, RECLAIM_LUA)
        self._users: weakref.WeakSet[object] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # the running beat thread's
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        #: tag → message delivered to the application and not settled, whatever its
        #: channel: never given back by this process while the message object lives (a
        #: handler has it); one a lost connection's loop dropped unhandled goes with it
        self.in_hand: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
        self._late_acks: list[str] = []
        self._late_lock = threading.Lock()

    # -- lifetime ----------------------------------------------------------------------

    def add_user(self, user: object) -> None:
        with self._lock:
            self._users.add(user)
            if self._thread is None or not self._thread.is_alive():
                # No channel was open: whatever this holder still holds, a closed
                # connection fetched and could not hand back (Redis was unreachable as
                # it closed). The process beat all along, so no sweep would take it:
                # give it back now, but for what a handler still has in hand.
                self.send_late_acks()
                gc.collect()  # a message only a dropped reference cycle holds is not in hand
                self.reclaim(self.id, keep=frozenset(self.in_hand.keys()))
                # Registered before the first fetch: a holder nobody knows of would be
                # left to the visibility timeout.
                self.sweep(beat=True)
                # A new event: a thread stopped while its beat blocked (longer than
                # remove_user waits) must still end once that call returns.
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run,
                    args=(self._stop,),
                    name="consumerd-holder-beat",
                    daemon=True,
                )
                self._thread.start()

    def remove_user(self, user: object) -> None:
        with self._lock:
            self._users.discard(user)
            if self._users or self._thread is None:
                return
            self._stop.set()
            thread, self._thread = self._thread, None
        thread.join(5)
        # Deregisters if the hash is empty (everything acked or handed back); if not,
        # the holder goes silent and any live one gives its messages back in time.
        with contextlib.suppress(redis.RedisError):
            self._reclaim(keys=self._reclaim_keys(self.id), args=[self.id, ""])

    def ack_late(self, tag: str) -> None:
        """Ack ``tag``, in hand when its channel closed, with the next beat."""
        self.in_hand.pop(tag, None)
        with self._late_lock:
            self._late_acks.append(tag)

    def send_late_acks(self) -> None:
        with self._late_lock:
            acks, self._late_acks = self._late_acks, []
        if not acks:
            return
        try:
            args = [self.id, "", *(x for tag in acks for x in (tag, "", ""))]
            self._reclaim(keys=self._reclaim_keys(self.id), args=args)
        except BaseException:
            with self._late_lock:
                self._late_acks[:0] = acks
            raise

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.send_late_acks()
                self.sweep(beat=True)
            except redis.RedisError as exc:
                self._failed(exc)
            else:
                self._failing_since = None

    def _failed(self, exc: Exception) -> None:
        now = monotonic()
        if self._failing_since is None:
            self._failing_since = now
            LOG.warning(
                "holder heartbeat to Redis failed (%s: %s); retrying every %.1f s",
                type(exc).__name__,
                exc,
                self.interval,
            )
        elif now - self._failing_since > self.timeout:
            LOG.warning(
                "holder heartbeat failing for %.0f s: other consumers may give this "
                "process's messages back (duplicates)",
                now - self._failing_since,
            )
            self._failing_since = now

    # -- the sweep ---------------------------------------------------------------------

    def sweep(self, beat: bool = True) -> int:
        """Beat (if ``beat``), then give back the messages of every dead holder; returns
        how many went back."""
        keys = self.keys
        now, stale, here = self._beat(
            keys=[keys.registry, keys.host_set(self.host)],
            args=[self.id if beat else "", self.timeout, 100],
        )
        dead: dict[str, str] = {}  # holder → stale_before ('': its process is gone)
        for raw in stale:
            dead[raw.decode()] = repr(float(now) - self.timeout)
        for raw in here:
            holder = raw.decode()
            if holder != self.id and _gone(holder, self.host):
                dead[holder] = ""
        dead.pop(self.id, None)
        return sum(self.reclaim(holder, stale_before) for holder, stale_before in dead.items())

    def reclaim(
        self, holder: str, stale_before: str = "", keep: frozenset[str] = frozenset()
    ) -> int:
        """Give back ``holder``'s unacked messages but those in ``keep``, marked
        redelivered, at the head of the lists they came from; forget the holder once its
        hash is empty."""
        hkey = self.keys.holder(holder)
        restored, cursor = 0, 0
        while True:
            cursor, chunk = typing.cast(
                "tuple[int, dict[bytes, bytes]]",
                self._client.hscan(hkey, cursor, count=RECLAIM_BATCH),
            )
            tags = [tag for tag in chunk if tag.decode() not in keep]
            values = typing.cast(
                "list[bytes | None]", self._client.hmget(self.keys.unacked, tags) if tags else []
            )
            args: list[typing.Any] = [holder, stale_before]
            for tag, value in zip(tags, values, strict=True):
                payload = ""
                if value is not None:
                    with contextlib.suppress(ValueError, TypeError, IndexError, KeyError):
                        payload = redelivered(value)
                args += [tag, chunk[tag], payload]
            done = int(self._reclaim(keys=self._reclaim_keys(holder), args=args))
            if done < 0:
                return restored  # it beat again: alive after all
            restored += done
            if cursor == 0:
                break
        if restored and holder == self.id:
            LOG.warning("gave back %d message(s) a lost connection of this process held", restored)
        elif restored:
            how = "its process is gone" if not stale_before else f"silent {self.timeout:.0f} s"
            LOG.warning(
                "gave back %d message(s) held by dead consumer %s (%s)", restored, holder, how
            )
        return restored

    def _reclaim_keys(self, holder: str) -> list[str]:
        try:
            host = holder.rsplit(":", 3)[1]
        except IndexError:
            host = ""
        keys = self.keys
        return [keys.unacked, keys.index, keys.holder(holder), keys.registry, keys.host_set(host)]


_holders: dict[tuple[typing.Any, ...], Holder] = {}
_holders_lock = threading.Lock()


def attach(
    user: object, params: dict[str, typing.Any], keys: Keys, interval: float, timeout: float
) -> Holder:
    """This process's holder on the Redis database ``params`` names (one per process and
    database, whatever the number of channels), with ``user`` counted among its users."""
    where = ("host", "port", "path", "db", "username", "connection_class")
    ident = (os.getpid(), keys, *(repr(params.get(name)) for name in where))
    with _holders_lock:
        holder = _holders.get(ident)
        if holder is None:
            pool = redis.ConnectionPool(**{**params, "max_connections": 2})
            holder = _holders[ident] = Holder(pool, keys, interval, timeout)
    holder.add_user(user)
    return holder
