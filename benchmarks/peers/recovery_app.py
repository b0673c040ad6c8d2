"""The app of ``benchmarks/recovery.py``, for the runner ``$BENCH_RUNNER`` names.

consumerd: ``--app benchmarks.peers.recovery_app:app``; Dramatiq:
``dramatiq benchmarks.peers.recovery_app``; Celery: ``celery -A benchmarks.peers.recovery_app``.
Every runner on its defaults (Celery with ``acks_late``, which at-least-once needs).

The handler appends ``<id> <time> <pid>`` to ``$BENCH_OUT``. With ``$BENCH_HOLD`` set (the
victim instance) a message started while the file ``$BENCH_FLAG`` does not exist blocks
until the process dies; the benchmark creates the flag just before the kill, so a
process of the victim that is respawned afterwards handles messages normally.
"""

from __future__ import annotations

import os
import time
import typing

from benchmarks.peers import config

RUNNER = os.environ.get("BENCH_RUNNER", "consumerd")


def handle(body: dict[str, typing.Any]) -> None:
    if os.environ.get("BENCH_HOLD") and not os.path.exists(os.environ["BENCH_FLAG"]):
        time.sleep(600)  # taken before the kill: held until the process dies
    line = f"{body['id']} {time.time():.6f} {os.getpid()}\n"
    fd = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)


app: typing.Any
if RUNNER == "consumerd":
    import consumerd

    app = consumerd.App("recovery", broker=config.BROKER_URL or None)

    @app.consumer(config.QUEUE or "recovery-q")
    def consumerd_handle(body: dict[str, typing.Any], message: object) -> None:
        handle(body)

    def fill(n: int) -> None:
        for i in range(n):
            app.publish(config.QUEUE, {"id": i})
        app.close()

elif RUNNER == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    # Keys under a namespace named after the unique queue, so cleanup finds them all.
    broker = RedisBroker(url=config.BROKER_URL, namespace=config.QUEUE)
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name="recovery", queue_name=config.QUEUE, max_retries=0)
    def dramatiq_handle(body: dict[str, typing.Any]) -> None:
        handle(body)

    def fill(n: int) -> None:
        for i in range(n):
            dramatiq_handle.send({"id": i})
        broker.close()

else:
    import celery
    from kombu import Exchange, Queue

    app = celery.Celery("recovery", broker=config.BROKER_URL)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_default_queue=config.QUEUE,
        task_queues=[Queue(config.QUEUE, Exchange(config.QUEUE), routing_key=config.QUEUE)],
    )

    @app.task(name="recovery.handle")
    def celery_handle(body: dict[str, typing.Any]) -> None:
        handle(body)

    def fill(n: int) -> None:
        with app.producer_or_acquire() as producer:
            for i in range(n):
                celery_handle.apply_async(({"id": i},), producer=producer)
