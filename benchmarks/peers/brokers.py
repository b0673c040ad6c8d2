"""What is left in a benchmark queue, and how to remove every trace of it.

Runners store messages differently: kombu, Celery and consumerd use kombu's layout (on
Redis a list named after the queue plus entries in kombu's shared ``unacked`` hash);
Dramatiq has its own (on RabbitMQ extra ``.DQ``/``.XQ`` queues; on Redis a list and a
``.msgs`` hash under a namespace, which dramatiq_app names after the queue).
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse

import kombu
import redis

KOMBU_UNACKED = ("unacked", "unacked_index")


def _rabbitmqctl(url: str, what: str, *columns: str) -> list[list[str]]:
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:]) or "/"
    out = subprocess.run(
        ["rabbitmqctl", what, "-q", "-p", vhost, *columns],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.split("\t") for line in out.splitlines()]


def rabbit_counts(url: str, queue: str) -> tuple[int, int] | None:
    """``(ready, unacked)`` of ``queue`` as RabbitMQ sees it, or None if it does not exist.

    rabbitmqctl is exact (AMQP's passive declare does not count unacked messages, and
    the management API's numbers are seconds old); it costs ~0.4 s, so it is only used
    outside the timed part of a run.
    """
    rows = _rabbitmqctl(url, "list_queues", "name", "messages_ready", "messages_unacknowledged")
    for name, ready, unacked in rows:
        if name == queue:
            return int(ready), int(unacked)
    return None


def rabbit_delete(url: str, queue: str) -> None:
    """Delete the queue and every queue and exchange named ``<queue>.<suffix>`` or
    ``<queue>`` (Dramatiq's ``.DQ``/``.XQ``, consumerd's ``.retry``/``.dlq``, ...)."""

    def ours(rows: list[list[str]]) -> list[str]:
        return [row[0] for row in rows if row[0] == queue or row[0].startswith(f"{queue}.")]

    queues = ours(_rabbitmqctl(url, "list_queues", "name"))
    exchanges = ours(_rabbitmqctl(url, "list_exchanges", "name"))
    with kombu.Connection(url) as conn:
        for name in queues:
            conn.default_channel.queue_delete(name)
        for name in exchanges:
            conn.default_channel.exchange_delete(name)


def _redis_kombu_unacked(client: redis.Redis, queue: str) -> list[bytes]:
    tags = []
    for tag, raw in client.hscan_iter(KOMBU_UNACKED[0]):
        _payload, exchange, routing_key = json.loads(raw)
        if queue in (exchange, routing_key):
            tags.append(tag)
    return tags


def redis_counts(url: str, queue: str, layout: str) -> tuple[int, int]:
    """``(ready, unacked)`` for ``queue`` in the given layout ("kombu" or "dramatiq")."""
    with redis.Redis.from_url(url) as client:
        return RedisProbe(client, queue, layout).counts()


class RedisProbe:
    """Cheap enough to poll every few ms on one open connection: is everything acked?"""

    def __init__(self, client: redis.Redis, queue: str, layout: str) -> None:
        self.client, self.queue, self.layout = client, queue, layout

    def _ready(self) -> int:
        if self.layout == "dramatiq":
            return int(self.client.llen(f"{self.queue}:{self.queue}"))
        # Priority 0 only: other priorities live in other lists, and the check after the
        # fill (ready == N) would catch a runner publishing there.
        return int(self.client.llen(self.queue))

    def _unacked(self, ready: int) -> int:
        if self.layout == "dramatiq":
            return int(self.client.hlen(f"{self.queue}:{self.queue}.msgs")) - ready
        return len(_redis_kombu_unacked(self.client, self.queue))

    def counts(self) -> tuple[int, int]:
        ready = self._ready()
        return ready, self._unacked(ready)

    def drained(self) -> bool:
        # The unacked side is only looked at once the (cheap) ready count is zero.
        return self._ready() == 0 and self._unacked(0) == 0


def redis_delete(url: str, queue: str) -> None:
    """Delete every key naming the queue and its entries in kombu's unacked hash."""
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"*{queue}*"))
        if keys:
            client.delete(*keys)
        tags = _redis_kombu_unacked(client, queue)
        if tags:
            client.hdel(KOMBU_UNACKED[0], *tags)
            client.zrem(KOMBU_UNACKED[1], *tags)
