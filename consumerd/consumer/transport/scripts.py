"""Lua scripts that keep running when Redis is full (``maxmemory`` with ``noeviction``).

A full Redis refuses every command that may grow memory: a consumer whose fetch or ack
were refused would never drain the queue, and draining is what frees the memory. The
scripts that only move or delete data (fetch with acks, hand-backs, re-stamps, holder
sweeps, heartbeats) are registered through :func:`register`:

* Redis >= 7 (the version is read once per connection pool, at connect): the script
  starts with ``#!lua flags=allow-oom`` and runs whatever the memory. Nothing that
  publishes is flagged, so a full Redis still refuses new messages.
* Redis 6.2 parses no flags (the line is a syntax error there): the script goes
  unflagged. Redis < 7 refuses a memory-growing command in a script only when it is the
  script's first write ("a script cannot be stopped half-way"). The fetch, ack, hand-back
  and sweep scripts always pop or delete before they record, so they drain a full 6.2
  too, and the heartbeat starts with its EXPIRE for the same reason. What a full 6.2
  refuses is the re-stamp of messages held longer than half the visibility timeout: the
  consumer then reconnects, and its holder's messages go back to their queues.
"""

from __future__ import annotations

import weakref

import redis
from redis.commands.core import Script

ALLOW_OOM = "#!lua flags=allow-oom\n"
"""The shebang line of a script Redis >= 7 runs even at ``maxmemory``."""

FLAGS_SINCE = (7, 0)
"""The first Redis version that reads script flags."""

_flags: weakref.WeakKeyDictionary[redis.ConnectionPool, bool] = weakref.WeakKeyDictionary()


def version(client: redis.Redis) -> tuple[int, ...]:
    """The server's version, e.g. ``(7, 0, 15)``; ``(0,)`` if it does not say."""
    text = str(client.info("server").get("redis_version", "0"))
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)


def takes_flags(client: redis.Redis) -> bool:
    """Whether ``client``'s server reads script flags (asked once per connection pool)."""
    pool = client.connection_pool
    known = _flags.get(pool)
    if known is None:
        known = _flags[pool] = version(client) >= FLAGS_SINCE
    return known


def register(client: redis.Redis, source: str) -> Script:
    """``source`` as a script that runs on a full Redis (see the module docstring)."""
    return client.register_script(ALLOW_OOM + source if takes_flags(client) else source)
