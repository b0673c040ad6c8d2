"""Celery peer: a prefork worker, ``-c 2``, ``acks_late``, json only.

Worker command (built by throughput.py)::

    celery -A benchmarks.peers.celery_app worker -P prefork -c 2 -Q <queue>
           --prefetch-multiplier <M> --without-gossip --without-mingle --without-heartbeat

Celery prefetches for the whole worker (one connection in the parent, prefetch_count =
multiplier x concurrency) and hands tasks to the children over pipes. The multiplier is
chosen by throughput.py so the worker's prefetch equals the other runners' total (2 x 100).
Remote control and result storage are off: they add broker traffic unrelated to the work.
"""

from __future__ import annotations

import celery
from kombu import Exchange, Queue

from benchmarks.peers import config, counter

app = celery.Celery("bench", broker=config.BROKER_URL)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_default_queue=config.QUEUE,
    task_queues=[Queue(config.QUEUE, Exchange(config.QUEUE), routing_key=config.QUEUE)],
)


@app.task(name="bench.noop")
def noop(body: object) -> None:
    config.wait()
    counter.hit()


def fill(n: int) -> None:
    with app.producer_or_acquire() as producer:
        for i in range(n):
            noop.apply_async((config.body(i),), producer=producer)
