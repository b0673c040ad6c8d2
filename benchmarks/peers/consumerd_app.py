"""consumerd under test, written against its documented contract::

    consumerd --app benchmarks.peers.consumerd_app:app --workers 2 --prefetch 100 --broker URL

The runtime acks after the handler returns (handlers do not ack themselves).
"""

from __future__ import annotations

import asyncio
import threading

import consumerd
from benchmarks.peers import config, counter

app = consumerd.App("bench", broker=config.BROKER_URL or None)
PARTITIONS = config.PARTITIONS or None


class KeyOrder:
    """Per key, the ``seq`` of the last message that started and of the last that ended
    in this process: each must grow by publish order, or the run fails. (A key handed to
    another worker starts afresh there; within a process its order is the promise.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # handlers run on a pool's threads
        self._started: dict[str, int] = {}
        self._ended: dict[str, int] = {}

    def check(self, body: dict[str, object], ends: dict[str, int], what: str) -> None:
        i, seq = body["id"], body["seq"]
        assert isinstance(i, int) and isinstance(seq, int)
        name = config.key_of(i)
        with self._lock:
            last = ends.get(name, -1)
            ends[name] = seq
        if seq <= last:
            counter.disorder(f"key {name}: message {seq} {what} after message {last}")

    def started(self, body: dict[str, object]) -> None:
        self.check(body, self._started, "started")

    def ended(self, body: dict[str, object]) -> None:
        self.check(body, self._ended, "ended")


ORDER = KeyOrder() if PARTITIONS else None


if config.ASYNC:

    @app.consumer(
        config.QUEUE or "bench-q", prefetch=config.PREFETCH, concurrency=config.CONCURRENCY
    )
    async def handle_async(body: object, message: object) -> None:
        if config.SLEEP:
            await asyncio.sleep(config.SLEEP)
        counter.hit()

elif ORDER is not None:

    @app.consumer(
        config.QUEUE or "bench-q",
        prefetch=config.PREFETCH,
        concurrency=config.CONCURRENCY,
        partitions=PARTITIONS,
    )
    def handle_keyed(body: dict[str, object], message: object) -> None:
        ORDER.started(body)
        config.wait()
        ORDER.ended(body)
        counter.hit()

else:

    @app.consumer(
        config.QUEUE or "bench-q", prefetch=config.PREFETCH, concurrency=config.CONCURRENCY
    )
    def handle(body: object, message: object) -> None:
        config.wait()
        counter.hit()


def fill(n: int) -> None:
    for i in range(n):
        if PARTITIONS:
            body = {**config.body(i), "seq": i // config.KEYS}
            app.publish(config.QUEUE, body, key=config.key_of(i))
        else:
            app.publish(config.QUEUE, config.body(i))
    app.close()
