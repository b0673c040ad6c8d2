"""consumerd under test, written against its documented contract::

    consumerd --app benchmarks.peers.consumerd_app:app --workers 2 --prefetch 100 --broker URL

The runtime acks after the handler returns (handlers do not ack themselves).
"""

from __future__ import annotations

import asyncio

import consumerd
from benchmarks.peers import config, counter

app = consumerd.App("bench", broker=config.BROKER_URL or None)


if config.ASYNC:

    @app.consumer(
        config.QUEUE or "bench-q", prefetch=config.PREFETCH, concurrency=config.CONCURRENCY
    )
    async def handle_async(body: object, message: object) -> None:
        if config.SLEEP:
            await asyncio.sleep(config.SLEEP)
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
        app.publish(config.QUEUE, config.body(i))
    app.close()
