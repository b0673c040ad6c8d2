"""consumerd under test, written against its documented contract::

    consumerd --app benchmarks.peers.consumerd_app:app --workers 2 --prefetch 100 --broker URL

The runtime acks after the handler returns (handlers do not ack themselves).
"""

from __future__ import annotations

import consumerd
from benchmarks.peers import config, counter

app = consumerd.App("bench", broker=config.BROKER_URL or None)


@app.consumer(config.QUEUE or "bench-q", prefetch=config.PREFETCH)
def handle(body: object, message: object) -> None:
    counter.hit()


def fill(n: int) -> None:
    for i in range(n):
        app.publish(config.QUEUE, config.body(i))
    app.close()
