# mypy: disallow-untyped-calls=False, disallow-subclassing-any=False
# (kombu ships no type information; its classes are Any to mypy)
"""kombu's Redis transport with batched fetches and batched acks.

Stock kombu spends three round trips per message (BRPOP; MULTI/EXEC to record it as
unacked; MULTI/EXEC to ack) and builds a ``redis.Redis`` object for each of them. Here
one Lua script pops up to the channel's free prefetch window *and* records every popped
message in the ``unacked`` hash + ``unacked_index`` zset in the same atomic step, and
carries the acks the application made since the previous fetch. With a busy queue that
is one round trip per batch instead of three per message.

Data layout, wire format and the unacked bookkeeping are exactly stock kombu's, so stock
producers and consumers interoperate both ways, and a crashed consumer's messages are
restored by the stock ``visibility_timeout`` sweep of any consumer (stock or this one).
On top, the scripts record which process holds each message (the last key of each script,
see :mod:`.holders`), and a thread per process gives back a dead holder's messages within
``holder_sweep_interval`` (0.5 s) if it ran on this host, ``holder_timeout`` (15 s) if not.

Use: ``kombu.Connection(url, transport="consumerd.consumer.transport.redis:Transport")``.

Delivery
    ``drain_events`` still hands out one message per call (like stock), from the fetched
    batch, so a loop that checks a stop flag between messages stops after the current
    one. Other channels of the connection are polled (without blocking) before each
    buffered delivery, so a wake-up queue is not starved by a big batch.

Idle wait: no message ever leaves Redis unrecorded
    Stock BRPOP pops a message in Redis and records it as unacked one round trip
    later: a consumer killed in between (or a reply lost with its connection) loses it
    for good. Here a message leaves its list only inside the fetch script, which
    records it in the same atomic step. When a fetch finds nothing the channel blocks
    in ``BLMOVE key key RIGHT RIGHT timeout``: it waits until the list is non-empty,
    then moves its last element back to where it was (the list is unchanged, nothing
    is popped), and the fetch script runs next. Another consumer taking the message
    first is fine: that fetch finds nothing and the channel waits again.
    BLMOVE watches one key; Redis has no blocking command that watches several lists
    without popping. So with one key (one queue, ``priority_steps=[0]``) the wait is
    ``brpop_timeout`` (stock's, 1 s by default; 0: for ever), and with several keys
    (several queues, or priority sub-queues, which stock has by default) it watches
    the first key in consume order (the top-priority list of one queue, the queues
    taking turns) for at most ``rescan_interval`` (default 0.1 s), then fetches from
    every key: a message on the watched key wakes the channel at once, one on another
    key within ``rescan_interval`` plus Redis's timer resolution (its ``hz``: 100 ms
    by default), measured 200 ms at most. An idle channel on several keys makes two
    cheap round trips per wait, about 5 a second (0.4 % of a core measured, stock
    0.1 %). Finer alternatives (keyspace notifications, client-side caching
    invalidations) need server configuration or a second connection per channel.
    Held messages are re-stamped in the index once they reach half the visibility
    timeout (slow handlers, big prefetch), so no sweep restores them while held; one a
    sweep restored anyway is dropped here instead of being delivered twice.

Acks
    ``message.ack()`` only marks the tag; the marked tags are deleted from the unacked
    hash/zset by the next fetch, or by an explicit flush when: an idle wait is outstanding
    (the app's next ``drain_events``), the oldest mark is ``ack_flush_interval`` old at
    the next delivery or ack, ``ack_batch_max`` marks are waiting, or the channel closes
    or restores. Nothing is ever deleted before the application acked it. A consumer
    killed with marks not yet sent gets those messages redelivered (at-least-once).

Handing messages back (what the runtime should call)
    * ``Channel.close()``: sends pending acks, then returns the prefetched messages and
      the delivered-but-unacked ones to the head of their queues, original order, in one
      round trip (no visibility-timeout wait). The runtime's stop path uses this.
    * ``Channel.requeue_prefetched()``: returns only the prefetched messages never
      delivered to the application (safe while a handler is running), in order.
    * ``Channel.basic_recover(requeue=True)``: everything delivered and not acked plus
      the prefetched ones, to the head, in order, one round trip. Only when no handler
      is still running (a running message would be delivered twice).
    * ``message.requeue()`` / ``reject(requeue=True)``: one round trip, to the tail of
      the queue like stock kombu.

Half-open connections
    Every wait for Redis is bounded, so a connection that went half-open (broker host
    gone without a reset, a NAT that forgot the flow) ends in a connection error instead
    of a hang. Socket reads use ``socket_timeout``; where it is unset (stock: wait for
    ever) it is :data:`REPLY_TIMEOUT`. The wait for a fetch or BLMOVE reply happens in
    the poller, where no socket timeout applies: a reply not there by the time a live
    Redis sends it (at once for a fetch, after its timeout for BLMOVE) plus that
    same timeout ends ``drain_events`` with ``redis.ConnectionError`` and drops the
    connection, so the next call reconnects. Only a single-key wait told to last for
    ever (``brpop_timeout=0``) has no bound. An idle poll still sleeps until the reply or
    the bound: no polling.

A full Redis (``maxmemory``, ``noeviction``)
    Fetches, acks and hand-backs keep running (see :mod:`.scripts`): draining is what
    frees memory. The idle wait's BLMOVE is refused there (Redis counts it as a write that
    may grow memory): the channel then fetches once per idle wait instead, sleeping in
    the poll in between. Stock's visibility-timeout sweep (its mutex is a SET) is
    skipped until there is room. Publishing fails, as it should.

Transport options (on top of stock ones): ``fetch_batch_size`` (cap per fetch, default
200, also the batch when prefetch is unlimited), ``ack_flush_interval`` (seconds,
default 0.1), ``ack_batch_max`` (default 500) and ``rescan_interval`` (seconds, default
0.1, see above), ``holder_sweep_interval`` and ``holder_timeout`` (seconds, 0.5 and 15,
see :mod:`.holders`). ``ack_emulation=False`` falls back to
the stock code paths. Fanout (pub/sub) and ``basic_get`` run the stock code; priority
sub-queues are fetched in stock order and messages go back to the sub-queue they came from.
Needs Redis >= 6.2 (RPOP with a count, BLMOVE, CLIENT UNBLOCK).
"""

from __future__ import annotations

import collections
import contextlib
import select
import threading
import typing
from queue import Empty
from time import monotonic, time

import redis
import redis.connection
from kombu.log import get_logger
from kombu.transport import redis as stock
from kombu.transport import virtual
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.commands.core import Script

from consumerd import deps
from consumerd.consumer.transport import envelope, holders, scripts

LOG = get_logger(__name__)

# Everything below reaches into: a kombu or redis-py release without one of these fails
# here, in one line, instead of with an AttributeError in the middle of consuming.
deps.require(
    __name__,
    {
        stock.Channel: """_active_queues _basic_cancel _brpop_read _brpop_start _closing
            _connparams _in_listen _in_poll _q_for_pri _qos _queue_cycle ack_emulation
            active_queues brpop_timeout do_restore from_transport_options global_keyprefix
            priority_steps sep socket_timeout unacked_index_key unacked_key
            visibility_timeout""",
        stock.QoS: """_delivered _flush can_consume_max_estimate restore_at_shutdown
            restore_by_tag restore_unacked_once restore_visible""",
        stock.MultiChannelPoller: """_channels _in_protected_read after_read handle_event
            maybe_restore_messages on_poll_start poller""",
        stock.Transport: "_deliver cycle",
        virtual.Message: "_raw",
        redis.connection.Connection: "_sock read_response send_command",
        redis.Redis: "client_unblock register_script",
        Script: "script sha",
    },
    "kombu",
    "redis",
)

Payload = dict[str, typing.Any]

_WAIT = "BLMOVE"

_FLUSH_REAUTH = hasattr(stock.Channel, "_flush_brpop_reauth")

REPLY_TIMEOUT = 10.0
"""Seconds a reply may be late before the connection counts as dead, when the
``socket_timeout`` transport option does not say (consumerd's default there too)."""

# Both scripts start by applying acks: ARGV[ack_at] = count, then that many tags.
# Their last key is the holder's hash (tag -> source key, see holders.py). A tag this
# holder fetched is deleted only if it still holds it: if a sweep gave it back meanwhile
# (this process was taken for dead), the unacked entry may now be another consumer's
# fetch of the same message, and deleting it would lose the message if that one dies.
# A tag starting with NUL was recorded without a holder (basic_get): deleted as stock.
_ACKS_LUA = """
local function apply_acks(at)
  local n = tonumber(ARGV[at])
  for i = at + 1, at + n do
    local tag = ARGV[i]
    local unheld = string.byte(tag, 1) == 0
    if unheld then tag = string.sub(tag, 2) end
    if unheld or redis.call('HDEL', KEYS[#KEYS], tag) == 1 then
      redis.call('ZREM', KEYS[2], tag)
      redis.call('HDEL', KEYS[1], tag)
    end
  end
  return at + n + 1
end
"""

# KEYS: unacked hash, unacked index zset, N queue keys in consume order, the N
# dead-letter queue keys of those queues, then the holder hash (see holders.py).
# ARGV: limit, now, acks..., then (queue name, dead-letter queue name) for each queue key.
# Returns flat (key number, recorded, item) triples; recorded is 1 for a message recorded
# as unacked (and as held by this holder), 2 for an entry that is not a kombu message at
# all (no delivery tag to record it under): it went, in the same atomic step, to the
# dead-letter queue inside an envelope whose body is the entry byte for byte (as text if
# it is ASCII, else in base64), so no entry is ever lost nor fetched again. The hash
# value is stock kombu's
# ``[payload, exchange, routing_key]``, built around the untouched payload text.
FETCH_LUA = (
    _ACKS_LUA
    + """
local limit, now = tonumber(ARGV[1]), ARGV[2]
local names = apply_acks(3)
local nq = (#KEYS - 3) / 2
local out = {}
local B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function b64(s)
  local parts = {}
  for i = 1, #s, 3 do
    local a, b, c = string.byte(s, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1, c2 = math.floor(n / 262144) % 64, math.floor(n / 4096) % 64
    local c3, c4 = math.floor(n / 64) % 64, n % 64
    parts[#parts + 1] = B64:sub(c1 + 1, c1 + 1) .. B64:sub(c2 + 1, c2 + 1)
      .. (b and B64:sub(c3 + 1, c3 + 1) or '=') .. (c and B64:sub(c4 + 1, c4 + 1) or '=')
  end
  return table.concat(parts)
end
local function dead_letter(k, item, why)
  local queue, dlq = ARGV[names + 2 * (k - 1)], ARGV[names + 2 * (k - 1) + 1]
  local seed = now .. ':' .. k .. ':' .. #out .. ':' .. #item
  local props = {delivery_tag = redis.sha1hex and redis.sha1hex(seed .. item) or seed,
    delivery_mode = 2, priority = 0, delivery_info = {exchange = '', routing_key = dlq}}
  local msg = {['content-type'] = 'application/octet-stream', properties = props,
    headers = {['consumerd-error'] = 'undecodable: not a kombu message envelope: ' .. why,
      ['consumerd-queue'] = queue, ['consumerd-attempt'] = 1}}
  if string.find(item, '[\\128-\\255]') then
    msg['body'], msg['content-encoding'], props['body_encoding'] = b64(item), 'binary', 'base64'
  else
    msg['body'], msg['content-encoding'] = item, 'utf-8'  -- ASCII: exact as JSON text
  end
  redis.call('LPUSH', KEYS[2 + nq + k], cjson.encode(msg))
end
local function take(k, item)
  local recorded = 2
  local ok, msg = pcall(cjson.decode, item)
  if not ok or type(msg) ~= 'table' then
    dead_letter(k, item, 'the entry is not a JSON object')
  elseif msg[1] ~= nil then
    dead_letter(k, item, 'the entry is a JSON array, not an object')
  elseif type(msg['properties']) ~= 'table' then
    dead_letter(k, item, 'properties is not an object')
  else
    local props = msg['properties']
    local tag, info = props['delivery_tag'], props['delivery_info']
    if type(tag) ~= 'string' then
      dead_letter(k, item, 'delivery_tag is not a string')
    elseif type(info) ~= 'table' then
      dead_letter(k, item, 'delivery_info is not an object')
    else
      redis.call('ZADD', KEYS[2], now, tag)
      redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
        .. ',' .. cjson.encode(info['routing_key']) .. ']')
      redis.call('HSET', KEYS[#KEYS], tag, KEYS[2 + k])
      recorded = 1
    end
  end
  out[#out + 1] = k
  out[#out + 1] = recorded
  out[#out + 1] = item
end
for k = 1, nq do
  if limit <= 0 then break end
  local items = redis.call('RPOP', KEYS[2 + k], limit)
  if items then
    for _, item in ipairs(items) do take(k, item) end
    limit = limit - #items
  end
end
return out
"""
)

# KEYS: unacked hash, unacked index zset, destination queue keys, holder hash.
# ARGV: 'RPUSH' (head of the queue) or 'LPUSH' (tail), acks..., then (tag, key number,
# payload) triples in push order. A message is pushed only if this call removed its
# holder entry and its unacked entry, so neither a concurrent visibility-timeout restore
# nor a holder sweep (see holders.py) can duplicate it, nor clobber a later fetch of it.
RESTORE_LUA = (
    _ACKS_LUA
    + """
local push = ARGV[1]
local restored = 0
for i = apply_acks(2), #ARGV, 3 do
  if redis.call('HDEL', KEYS[#KEYS], ARGV[i]) == 1
      and redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call(push, KEYS[2 + tonumber(ARGV[i + 1])], ARGV[i + 2])
    restored = restored + 1
  end
end
return restored
"""
)


# KEYS: unacked index zset. ARGV: now, tags. Re-stamps the tags still indexed (not
# restored by a visibility-timeout sweep meanwhile); returns 1 for those, 0 for others.
TOUCH_LUA = """
local out = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


class _Prefetched(typing.NamedTuple):
    """A fetched message recorded as unacked but not yet given to the application."""

    queue: str
    key: str  # the Redis key it was popped from (priority suffix included)
    tag: str
    item: bytes  # the exact text popped, pushed back unchanged if never delivered
    payload: Payload
    fetched_at: float  # monotonic time its unacked entry was (re-)stamped


class _Restore(typing.NamedTuple):
    tag: str
    key: str
    payload: bytes | str


class QoS(stock.QoS):
    """Ack emulation whose acks and restores go through the channel's batches."""

    def append(self, message: typing.Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel.fetched_keys:
            VirtualQoS.append(self, message, delivery_tag)  # recorded by the fetch
            self.channel.in_hand(delivery_tag, message)
        else:
            super().append(message, delivery_tag)  # basic_get, fanout: stock

    def ack(self, delivery_tag: str) -> None:
        self.channel.ack_later(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel.restore_delivered([self._delivered[delivery_tag]], head=False)
        else:
            self.channel.ack_later(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def restore_unacked(self, client: typing.Any = None) -> None:
        self._flush()
        messages = list(self._delivered.values())
        self._delivered.clear()
        self.channel.restore_delivered(messages, head=True)

    def restore_visible(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        try:
            super().restore_visible(*args, **kwargs)
        except redis.exceptions.OutOfMemoryError:
            # Its mutex is a SET a full Redis refuses: skip this last-resort sweep until
            # draining made room, rather than drop a connection that drains.
            LOG.debug("Redis is full: visibility-timeout sweep skipped")

    def restore_unacked_once(self, stderr: typing.Any = None) -> None:
        # Prefetched messages are newer than delivered ones: pushed to the head first,
        # they end up behind them, so the queue keeps its order.
        self.channel.flush_acks()
        if self.restore_at_shutdown and self.channel.do_restore:
            self.channel.requeue_prefetched()
        super().restore_unacked_once(stderr)


class Channel(stock.Channel):
    """Redis channel fetching and acking in batches (see the module docstring)."""

    QoS = QoS

    #: A message whose channel closed while its handler ran is still settled through it
    #: (the holder sends the ack): the reconnect left it recorded, not given back.
    settles_after_close = True

    fetch_batch_size = 200
    ack_flush_interval = 0.1
    ack_batch_max = 500
    rescan_interval = 0.1
    holder_sweep_interval = holders.SWEEP_INTERVAL
    holder_timeout = holders.TIMEOUT

    from_transport_options = (  # type: ignore[assignment]  # kombu types it fixed-length
        *stock.Channel.from_transport_options,
        "fetch_batch_size",
        "ack_flush_interval",
        "ack_batch_max",
        "rescan_interval",
        "holder_sweep_interval",
        "holder_timeout",
    )

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        self._prefetched: collections.deque[_Prefetched] = collections.deque()
        #: tag → source key of every message fetched here and not yet acked/restored
        self.fetched_keys: dict[str, str] = {}
        self._pending_acks: list[str] = []
        self._acks_lock = threading.Lock()
        self._pending_since = 0.0
        self._no_ack_queues: set[str] = set()
        self._queue_empty = False  # the last fetch found nothing: wait (BLMOVE) next
        self._outstanding: tuple[str, list[str], list[str]] | None = None
        self._blocking_id: tuple[object, int] | None = None  # (socket, CLIENT ID)
        self._reply_due: float | None = None  # monotonic; None: no bound (wait 0)
        self._full_until = 0.0  # monotonic: a full Redis refused the idle wait
        self._sync: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}
        #: queue → its dead-letter queue, for entries that are not messages (the runtime's)
        self.dead_letter_queues: dict[str, str] = {}
        self._holder: holders.Holder | None = None
        self._held: redis.client.Pipeline | None = None  # see hold_puts()
        super().__init__(*args, **kwargs)
        self._fast = bool(self.ack_emulation)
        # Transport options may arrive as strings (URL query parameters).
        self.fetch_batch_size = int(self.fetch_batch_size)
        self.ack_flush_interval = float(self.ack_flush_interval)
        self.ack_batch_max = int(self.ack_batch_max)
        self.rescan_interval = float(self.rescan_interval)

    # -- plumbing ---------------------------------------------------------------------

    @property
    def sync_client(self) -> redis.Redis:
        """One client for acks and restores (stock builds one per operation).

        Plain, not key-prefixing: the scripts get fully prefixed keys from :meth:`_key`.
        """
        pool = self.pool
        if self._sync is None or self._sync.connection_pool is not pool:
            self._sync = redis.Redis(connection_pool=pool)
            # They only move or delete: they must run on a full Redis (drain it).
            self._scripts = {
                "fetch": scripts.register(self._sync, FETCH_LUA),
                "restore": scripts.register(self._sync, RESTORE_LUA),
                "touch": scripts.register(self._sync, TOUCH_LUA),
            }
        return self._sync

    def reply_timeout(self) -> float:
        return float(self.socket_timeout or REPLY_TIMEOUT)

    def _connparams(self, asynchronous: bool = False) -> dict[str, typing.Any]:
        params: dict[str, typing.Any] = super()._connparams(asynchronous)
        # Stock's None lets any read on a half-open connection block for ever.
        params["socket_timeout"] = self.reply_timeout()
        return params

    def _script(self, name: str) -> Script:
        self.sync_client  # noqa: B018 - (re)builds the scripts with the current pool
        return self._scripts[name]

    def _key(self, name: str) -> str:
        return self.global_keyprefix + name

    def _bookkeeping_keys(self) -> list[str]:
        return [self._key(self.unacked_key), self._key(self.unacked_index_key)]

    def _holder_key(self) -> str:
        """The scripts' last key: this process's holder hash (see holders.py). A channel
        joins the holder (registered, beating) before its first fetch, so a process that
        only publishes runs no heartbeat thread."""
        if self._holder is None:
            keys = holders.Keys(self._key(self.unacked_key), self._key(self.unacked_index_key))
            self._holder = holders.attach(
                self,
                self._connparams(),
                keys,
                float(self.holder_sweep_interval),
                float(self.holder_timeout),
            )
        return self._holder.key

    def _consume_keys(self) -> list[str]:
        """Queue keys in stock BRPOP order: every queue's top priority first."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        return [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]

    def _fetch_args(self, limit: int, acks: list[str]) -> list[typing.Any]:
        return [limit, repr(time()), len(acks), *acks]

    def _window(self) -> int:
        free = self.qos.can_consume_max_estimate()
        batch = self.fetch_batch_size
        return batch if free is None else min(free - len(self._prefetched), batch)

    def _take_acks(self) -> list[str]:
        with self._acks_lock:
            acks, self._pending_acks = self._pending_acks, []
        return acks

    def _unsent_acks(self, acks: list[str]) -> None:
        """Put back acks whose sending failed: ZREM/HDEL are idempotent, resend later."""
        with self._acks_lock:
            self._pending_acks[:0] = acks

    # -- acks -------------------------------------------------------------------------

    def ack_later(self, tag: str) -> None:
        """Mark ``tag`` acked; it is deleted from Redis with the next batch."""
        held = self.fetched_keys.pop(tag, None) is not None
        if self._holder is not None and self.closed:
            self._holder.ack_late(tag)  # a handler outlived the channel: it sends no more
            return
        if self._holder is not None:
            self._holder.in_hand.pop(tag, None)
        with self._acks_lock:  # kombu allows acks from other threads
            if not self._pending_acks:
                self._pending_since = monotonic()
            self._pending_acks.append(tag if held else "\0" + tag)  # see _ACKS_LUA
        if len(self._pending_acks) >= self.ack_batch_max or self._acks_overdue():
            self.flush_acks()

    def _acks_overdue(self) -> bool:
        return bool(self._pending_acks) and (
            monotonic() - self._pending_since >= self.ack_flush_interval
        )

    def flush_acks(self) -> None:
        """Send the marked acks now (one round trip, nothing if none)."""
        acks = self._take_acks()
        if not acks:
            return
        try:
            self._script("fetch")(
                keys=[*self._bookkeeping_keys(), self._holder_key()],
                args=self._fetch_args(0, acks),
            )
        except BaseException:
            self._unsent_acks(acks)
            raise

    def acks_need_flush(self) -> bool:
        """Whether marked acks would wait for a reply that may take a while."""
        if not self._pending_acks:
            return False
        blocked = self._outstanding is not None and self._outstanding[0] == _WAIT
        blocked = blocked or monotonic() < self._full_until
        return blocked or not self.active_queues or not self.qos.can_consume()

    # -- fetching ---------------------------------------------------------------------

    def _brpop_start(self, timeout: float | None = None) -> None:
        wait = self._idle_wait(timeout)
        # A live Redis replies by then (a wait of 0 never times out: nothing to bound).
        self._reply_due = monotonic() + wait + self.reply_timeout() if wait else None
        if not self._fast:
            super()._brpop_start(timeout)
            return None
        if self._prefetched:
            return None  # deliver what we hold before asking for more
        if monotonic() < self._full_until:
            return None  # a full Redis: the poll sleeps instead (reply_wait_bound)
        keys = self._consume_keys()
        if not keys:
            return None
        conn = self.client.connection
        if self._queue_empty and not self._pending_acks:
            self._remember_client_id(conn)
            # Moves the last element back where it was: blocks until the list is
            # non-empty and takes nothing, so no message is ever only in this process.
            watched = self._key(keys[0])
            command = [_WAIT, watched, watched, "RIGHT", "RIGHT", wait]
            self._outstanding = (_WAIT, keys, [])
        else:
            acks = self._take_acks()
            queues = [self._queue_of(key) for key in keys]
            dead = [self.dead_letter_queue_of(queue) for queue in queues]
            prefixed = [
                *self._bookkeeping_keys(),
                *map(self._key, keys),
                *map(self._key, dead),
                self._holder_key(),
            ]
            command = [
                "EVALSHA",
                self._script("fetch").sha,
                len(prefixed),
                *prefixed,
                *self._fetch_args(max(self._window(), 1), acks),
                *(name for pair in zip(queues, dead, strict=True) for name in pair),
            ]
            self._outstanding = ("EVALSHA", keys, acks)
            self._reply_due = monotonic() + self.reply_timeout()  # a script replies at once
        self._in_poll = conn
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # stock does so too
        conn.send_command(*command)
        return None

    def _idle_wait(self, timeout: float | None = None) -> float:
        """Seconds the idle wait blocks server-side (0: for ever). It watches one key;
        with several (queues, priority sub-queues) it ends every ``rescan_interval`` to
        fetch from all of them, so that is the longest a message on another key waits."""
        wait = float((self.brpop_timeout if timeout is None else timeout) or 0)
        if not self._fast or len(self.active_queues) * len(self.priority_steps) < 2:
            return wait
        return min(wait, self.rescan_interval) if wait else self.rescan_interval

    def _remember_client_id(self, conn: typing.Any) -> None:
        """Learn the blocking connection's id once per socket, so close() can unblock it.
        The read is bounded by the socket timeout :meth:`_connparams` always sets."""
        sock = conn._sock
        if sock is None or self._blocking_id is None or self._blocking_id[0] is not sock:
            conn.send_command("CLIENT", "ID")
            client_id = conn.read_response()
            self._blocking_id = (conn._sock, int(client_id))

    def reply_wait_bound(self, now: float) -> float | None:
        """How long a poll may wait for this channel's outstanding reply, or for the one
        it may send next; None: no bound."""
        if self._in_poll:  # past due and still here: it is readable, the poll sees it
            due = self._reply_due
            return None if due is None or due <= now else due - now
        if not self.active_queues:
            return None  # sends nothing
        if now < self._full_until:
            return self._full_until - now
        wait = self._idle_wait()
        return wait + self.reply_timeout() if wait else None

    def drop_if_reply_overdue(self, now: float) -> None:
        """Raise ``redis.ConnectionError`` and drop the connection if the reply to the
        outstanding fetch or wait is overdue: the connection is half-open."""
        conn: typing.Any = self._in_poll
        if not conn or self._reply_due is None or now < self._reply_due:
            return
        sock = conn._sock
        if sock is not None and _readable(sock):
            return  # arrived just now: the next poll reads it
        late = now - self._reply_due + self.reply_timeout()
        command = "BRPOP" if self._outstanding is None else self._outstanding[0]  # None: stock
        if self._outstanding is not None:
            # A lost fetch is harmless: what it popped is recorded, the visibility
            # timeout restores it. Its acks may not have been applied: resend them.
            self._unsent_acks(self._outstanding[2])
            self._outstanding = None
        self._in_poll = None  # type: ignore[assignment]  # stock does so too
        conn.disconnect()
        raise redis.exceptions.ConnectionError(
            f"no reply to {command} from Redis {late:.1f} s after it was due "
            "(half-open connection?): dropped the connection"
        )

    def _brpop_read(self, **options: typing.Any) -> bool:
        if not self._fast or self._outstanding is None:
            return bool(super()._brpop_read(**options))
        command, keys, acks = self._outstanding
        conn = self.client.connection
        try:
            # Read raw: no response callbacks, no un-prefixing, so keys are ours as sent.
            reply = conn.read_response()
        except BaseException as exc:
            self._unsent_acks(acks)
            if isinstance(exc, redis.exceptions.NoScriptError):
                self.sync_client.script_load(self._script("fetch").script)  # Redis restarted
                raise Empty() from None
            if command == _WAIT and isinstance(exc, redis.exceptions.OutOfMemoryError):
                # A full Redis refuses BLMOVE (it could grow a list), though it takes
                # nothing here. Fetch (allowed: it drains) once per idle wait instead,
                # sleeping in the poll in between, until draining made room.
                self._full_until = monotonic() + (self._idle_wait() or 1.0)
                self._queue_empty = False
                raise Empty() from None
            if isinstance(exc, self.connection_errors):
                conn.disconnect()
            raise
        finally:
            self._in_poll = None  # type: ignore[assignment]  # stock does so too
            self._outstanding = None
            if _FLUSH_REAUTH:  # kombu >= 5.7: a re-auth token is sent while nothing waits
                self._flush_brpop_reauth()
        if command == _WAIT:
            # Nothing was popped. The watched key got a message (another consumer may
            # take it first), or the wait ended: with several keys, any other may have
            # one. Either way the fetch, sent at the next poll, pops from every key.
            if reply is not None or len(keys) > 1:
                self._queue_empty = False
            if reply is None:
                self._queue_cycle.rotate(keys[0].rsplit(self.sep, 1)[0])  # watch the next
            raise Empty()
        self._queue_empty = not reply
        self._stash(keys, reply)
        if self._closing:
            return False  # close() hands them back
        if not self.connection.cycle._in_protected_read:  # an event loop: no buffering
            while self._prefetched and self.qos.can_consume():
                self.deliver_prefetched()
            return True
        if not self.deliver_prefetched():
            raise Empty()
        return True

    def _queue_of(self, key: str) -> str:
        """The queue a Redis key (maybe a priority sub-queue) belongs to."""
        return key.rsplit(self.sep, 1)[0]

    def dead_letter_queue_of(self, queue: str) -> str:
        """Where an entry of ``queue`` that is not a message goes: the runtime names it in
        ``dead_letter_queues``; ``<queue>.dlq`` otherwise."""
        return self.dead_letter_queues.get(queue) or queue + ".dlq"

    def _stash(self, keys: list[str], flat: list[typing.Any]) -> None:
        queue, now = None, monotonic()
        bad: list[_Restore] = []
        for i in range(0, len(flat), 3):
            key, recorded, item = keys[int(flat[i]) - 1], int(flat[i + 1]), flat[i + 2]
            queue = self._queue_of(key)
            if recorded == 2:  # the script moved it to the dead-letter queue already
                LOG.error(
                    "Dead-lettered an entry of %r that is not a kombu message: %r",
                    queue,
                    item[:200],
                )
                continue
            payload: typing.Any = None
            try:
                payload = loads(bytes_to_str(item))
                reason = envelope.error_of(payload)
            except Exception as exc:
                reason = f"the entry is not a JSON object ({type(exc).__name__}: {exc})"
            if reason is None:
                tag = payload["properties"]["delivery_tag"]
                self.fetched_keys[tag] = key
                self._prefetched.append(_Prefetched(queue, key, tag, item, payload, now))
                continue
            tag = _recorded_tag(payload)
            if tag is not None:
                # Recorded as unacked: moved from there to the dead-letter queue in one
                # atomic step below, so a death in between loses nothing.
                LOG.error(
                    "Dead-lettering a message of %r that kombu cannot read: %s", queue, reason
                )
                dlq = self.dead_letter_queue_of(queue)
                bad.append(
                    _Restore(
                        tag,
                        dlq,
                        dumps(
                            envelope.dead_letter(
                                item if isinstance(item, bytes) else item.encode(),
                                queue,
                                dlq,
                                reason,
                            )
                        ),
                    )
                )
                continue
            # Cannot happen (the script found a tag Python does not): left to the sweep.
            LOG.error(
                "Left an unreadable entry of %r in the unacked hash: %s: %r",
                queue,
                reason,
                item[:200],
            )
        if bad:
            self._restore_many(bad, head=False)
        if queue is not None:
            self._queue_cycle.rotate(queue)  # fair turns between queues, as stock

    # -- delivering -------------------------------------------------------------------

    def in_hand(self, tag: str, message: typing.Any) -> None:
        """``message`` went to the application: its holder keeps it while it lives."""
        if self._holder is not None:
            self._holder.in_hand[tag] = message

    def can_deliver_prefetched(self) -> bool:
        return bool(self._prefetched) and bool(self.qos.can_consume())

    def deliver_prefetched(self) -> bool:
        """Hand one fetched message to its consumer; False if none is held."""
        if not self._prefetched:
            return False
        if self._acks_overdue():
            self.flush_acks()
        if monotonic() - self._prefetched[0].fetched_at > float(self.visibility_timeout) / 2:
            self._restamp_prefetched()
            if not self._prefetched:
                return False
        entry = self._prefetched.popleft()
        if entry.queue in self._no_ack_queues:
            self.ack_later(entry.tag)
        self.connection._deliver(entry.payload, entry.queue)
        return True

    def _restamp_prefetched(self) -> None:
        """Slow handlers let held messages age toward the visibility timeout, after which
        any consumer may restore them: re-stamp them, and drop any already restored."""
        held = list(self._prefetched)
        alive = self._script("touch")(
            keys=[self._key(self.unacked_index_key)], args=[repr(time()), *(e.tag for e in held)]
        )
        now = monotonic()
        self._prefetched = collections.deque(
            e._replace(fetched_at=now) for e, ok in zip(held, alive, strict=True) if ok
        )
        for entry, ok in zip(held, alive, strict=True):
            if not ok:
                self.fetched_keys.pop(entry.tag, None)
                LOG.warning(
                    "Prefetched message %s was restored by another consumer "
                    "(visibility_timeout): not delivering it here",
                    entry.tag,
                )

    def basic_consume(
        self, queue: str, no_ack: bool, *args: typing.Any, **kwargs: typing.Any
    ) -> typing.Any:
        # A no_ack consumer's messages are recorded like the others and acked on delivery.
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _basic_cancel(self, consumer_tag: str) -> typing.Any:
        ret = super()._basic_cancel(consumer_tag)
        if not self._closing:  # close() hands back everything itself (if do_restore)
            active = set(self._active_queues)
            self.requeue_prefetched(lambda entry: entry.queue not in active)
        return ret

    # -- handing back -----------------------------------------------------------------

    def requeue_prefetched(self, which: typing.Callable[[_Prefetched], bool] | None = None) -> int:
        """Return prefetched, never-delivered messages to the head of their queues, in
        order, in one round trip. Returns how many went back."""
        keep, back = collections.deque[_Prefetched](), list[_Prefetched]()
        for entry in self._prefetched:
            (back if which is None or which(entry) else keep).append(entry)
        self._prefetched = keep
        for entry in back:
            self.fetched_keys.pop(entry.tag, None)
        return self._restore_many([_Restore(e.tag, e.key, e.item) for e in back], head=True)

    def restore_delivered(self, messages: list[typing.Any], head: bool) -> int:
        """Return delivered messages (oldest first), marked redelivered, in one round
        trip. Messages this channel did not fetch (``basic_get``) go the stock way."""
        ours = []
        for message in messages:
            key = self.fetched_keys.pop(message.delivery_tag, None)
            if key is None:
                self.qos.restore_by_tag(message.delivery_tag, leftmost=not head)
            else:
                payload = dumps(_redelivered(message._raw))
                ours.append(_Restore(message.delivery_tag, key, payload))
        restored = self._restore_many(ours, head=head)
        if self._holder is not None:  # not before: a failed hand-back keeps them in hand
            for restore in ours:
                self._holder.in_hand.pop(restore.tag, None)
        return restored

    def basic_recover(self, requeue: bool = False) -> None:
        if not self._fast:
            super().basic_recover(requeue)
            return None
        if not requeue:
            raise NotImplementedError("Does not support recover(requeue=False)")
        self.flush_acks()
        self.requeue_prefetched()
        self.qos.restore_unacked()
        return None

    def _restore_many(self, restores: list[_Restore], head: bool) -> int:
        if not restores and not self._pending_acks:
            return 0
        keys = list(dict.fromkeys(r.key for r in restores))
        keyno = {key: n for n, key in enumerate(keys, 1)}
        # RPUSH puts the last pushed at the head: push newest first to keep the order.
        ordered = reversed(restores) if head else restores
        triples = [x for r in ordered for x in (r.tag, keyno[r.key], r.payload)]
        acks = self._take_acks()
        try:
            restored = self._script("restore")(
                keys=[*self._bookkeeping_keys(), *map(self._key, keys), self._holder_key()],
                args=["RPUSH" if head else "LPUSH", len(acks), *acks, *triples],
            )
        except BaseException:
            self._unsent_acks(acks)
            raise
        return int(restored)

    # -- publishing -------------------------------------------------------------------

    def hold_puts(self) -> None:
        """From now on publishes wait in a MULTI/EXEC pipeline until :meth:`flush_puts`:
        a window of ``App.publish_many`` is one round trip, stored whole or not at all."""
        self._held = self.sync_client.pipeline(transaction=True)

    def flush_puts(self) -> None:
        """Write the held publishes at once. Raises if Redis refused them (maxmemory:
        then none is stored) or the connection was lost (then it is not known)."""
        assert self._held is not None, "flush_puts() without hold_puts()"
        self._held.execute()  # the pipeline empties itself, whatever the outcome

    def _put(self, queue: str, message: typing.Any, **kwargs: typing.Any) -> None:
        if self._held is None:
            super()._put(queue, message, **kwargs)
            return
        # Stock's LPUSH, held (the sync client does not prefix keys: _key() does). Not
        # stock's PEXPIRE for x-expires queues: App never declares those.
        priority = self._get_message_priority(message, reverse=False)
        self._held.lpush(self._key(self._q_for_pri(queue, priority)), dumps(message))

    def close(self) -> None:
        try:
            if self._fast and not self.closed:
                self._closing = True
                # A lost fetch reply is harmless (recorded: the visibility timeout
                # restores it); the hand-back below uses another connection.
                with contextlib.suppress(*self.connection_errors):
                    self._finish_outstanding()
                if self._in_poll:  # Redis unreachable: stock's close would read it
                    self._in_poll = self._outstanding = None  # type: ignore[assignment]
                if self._qos is not None or self._prefetched or self._pending_acks:
                    self._hand_back_at_close()
        finally:
            try:
                super().close()
            except self.connection_errors as exc:
                # Raising would stop kombu closing the connection's other channels: the
                # holder would never see its last user go (see _hand_back_at_close).
                LOG.debug("closing a channel of a lost connection: %s", exc)
            finally:
                if self._holder is not None:
                    self._holder.remove_user(self)

    def _hand_back_at_close(self) -> None:
        try:
            self.qos.restore_unacked_once()
        except self.connection_errors as exc:
            # Raising would stop kombu closing the connection's other channels, and the
            # holder would never see its last channel go: what this one held stays
            # recorded, and the holder gives it back when the process reconnects.
            LOG.warning(
                "Could not hand back this channel's messages (%s: %s): given back at "
                "the next connect",
                type(exc).__name__,
                exc,
            )
            # Acks that die with the channel would let that give-back deliver their
            # handled messages again: the holder sends them first.
            if self._holder is not None:
                for tag in self._take_acks():
                    self._holder.ack_late(tag.removeprefix("\0"))

    def _finish_outstanding(self) -> None:
        """Collect an in-flight fetch reply (its messages are handed back like the
        others), or end the idle wait at once (it pops nothing)."""
        if not self._in_poll or self._outstanding is None:
            return
        sock = self.client.connection._sock
        if self._outstanding[0] == _WAIT and self._blocking_id and self._blocking_id[0] is sock:
            self.sync_client.client_unblock(self._blocking_id[1])
        with contextlib.suppress(Empty):
            self._brpop_read()


def _recorded_tag(payload: typing.Any) -> str | None:
    """The delivery tag the fetch script recorded a bad envelope under, if Python sees it."""
    with contextlib.suppress(Exception):
        tag = payload["properties"]["delivery_tag"]
        if isinstance(tag, str):
            return tag
    return None


def _readable(sock: typing.Any) -> bool:
    """Whether ``sock`` has data (or EOF) to read, without reading it: the poller must
    still see it readable afterwards."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _redelivered(raw: Payload) -> Payload:
    """A copy of ``raw`` flagged as redelivered the way stock kombu restores do."""
    payload = dict(raw)
    payload["headers"] = {**(raw.get("headers") or {}), "redelivered": True}
    properties = dict(raw.get("properties") or {})
    properties["delivery_info"] = {**(properties.get("delivery_info") or {}), "redelivered": True}
    payload["properties"] = properties
    return payload


class _Poller(stock.MultiChannelPoller):
    """Delivers fetched batches one message per ``drain_events`` call, fairly."""

    _turn = 0
    _swept_at = 0.0  # monotonic

    def get(self, callback: typing.Callable[..., typing.Any], timeout: float | None = None) -> None:
        ready = [c for c in self._channels if isinstance(c, Channel) and c.can_deliver_prefetched()]
        if not ready:
            self._flush_waiting_acks()
            return self._wait(callback, timeout)
        self._in_protected_read = True
        try:
            if self._deliver_io_without_waiting():
                return None
            self._turn += 1
            if not ready[self._turn % len(ready)].deliver_prefetched():
                raise Empty()  # all it held had been restored elsewhere
        finally:
            self._in_protected_read = False
            while self.after_read:
                self.after_read.pop()()
        return None

    def _wait(self, callback: typing.Callable[..., typing.Any], timeout: float | None) -> None:
        """Stock's poll, waiting no longer than a live Redis takes to reply, so a
        half-open connection raises instead of blocking ``drain_events`` for ever."""
        ours = [c for c in self._channels if isinstance(c, Channel)]
        now = monotonic()
        for channel in ours:
            channel.drop_if_reply_overdue(now)
        bounds = [b for b in (c.reply_wait_bound(now) for c in ours) if b is not None]
        if bounds:
            timeout = min(bounds) if timeout is None else min(timeout, *bounds)
        try:
            super().get(callback, timeout)
        except Empty:
            now = monotonic()
            for channel in ours:
                channel.drop_if_reply_overdue(now)
            self._sweep_if_due(now, ours)
            raise

    def _sweep_if_due(self, now: float, ours: list[Channel]) -> None:
        """Stock sweeps for visibility-timeout restores when a poll times out, about
        every ``brpop_timeout`` when idle. An idle wait on several keys ends (a readable
        reply, no time-out) every ``rescan_interval``: sweep from here, no more often."""
        every = min((float(c.brpop_timeout or 1) for c in ours), default=1.0)
        if now - self._swept_at >= every:
            self._swept_at = now
            self.maybe_restore_messages()

    def on_poll_start(self) -> None:
        if not self._in_protected_read:
            # An event loop's tick (not drain_events): hand out what is held, or a batch
            # cut short by the prefetch window would wait for the next fetch forever.
            for channel in list(self._channels):
                while isinstance(channel, Channel) and channel.can_deliver_prefetched():
                    channel.deliver_prefetched()
            self._flush_waiting_acks()
        super().on_poll_start()

    def _flush_waiting_acks(self) -> None:
        for channel in self._channels:
            if isinstance(channel, Channel) and channel.acks_need_flush():
                channel.flush_acks()

    def _deliver_io_without_waiting(self) -> bool:
        """Let channels with nothing buffered (a wake-up queue) take their turn."""
        self.on_poll_start()
        if not any(c._in_poll or c._in_listen for c in self._channels):
            return False  # nothing can be readable: spare the syscall
        for fileno, event in self.poller.poll(0) or ():
            try:
                if self.handle_event(fileno, event):
                    return True
            except Empty:
                continue
        return False


class Transport(stock.Transport):
    """kombu Redis transport with batched fetch and ack (see the module docstring)."""

    Channel = Channel

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = _Poller()  # type: ignore[assignment]  # stock does so too
