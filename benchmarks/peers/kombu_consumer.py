"""The baseline: a plain kombu consumer, one connection per process, ack after handler.

``python -m benchmarks.peers.kombu_consumer <processes> [noack]`` forks that many consumers
and waits; SIGTERM to the parent stops them. ``noack``: consume with ``no_ack=True`` (the
broker forgets a message as it sends it), the rate with no acknowledgement at all.
Prefetch is set in the ``Consumer`` constructor (a later ``qos()`` is too late on
RabbitMQ: the backlog goes to one process).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import types

import kombu

from benchmarks.peers import config, counter


def queue() -> kombu.Queue:
    # Same layout consumerd uses: durable queue on the default exchange.
    return kombu.Queue(config.QUEUE, routing_key=config.QUEUE, durable=True)


def fill(n: int) -> None:
    with kombu.Connection(config.BROKER_URL) as conn:
        producer = conn.Producer(serializer="json")
        q = queue()
        q(conn.default_channel).declare()
        for i in range(n):
            producer.publish(config.body(i), exchange="", routing_key=config.QUEUE, delivery_mode=2)


def handle(body: object, message: kombu.Message) -> None:
    config.wait()
    counter.hit()
    message.ack()


def handle_no_ack(body: object, message: kombu.Message) -> None:
    config.wait()
    counter.hit()


def consume(no_ack: bool) -> None:
    stopping = False

    def stop(_signo: int, _frame: types.FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    with (
        kombu.Connection(config.BROKER_URL) as conn,
        conn.Consumer(
            queue(),
            callbacks=[handle_no_ack if no_ack else handle],
            accept=["json"],
            prefetch_count=config.PREFETCH,
            no_ack=no_ack,
        ),
    ):
        while not stopping:
            with contextlib.suppress(TimeoutError):  # wake up to check `stopping`
                conn.drain_events(timeout=1)


def main() -> None:
    no_ack = sys.argv[2:] == ["noack"]
    procs = [
        multiprocessing.Process(target=consume, args=(no_ack,)) for _ in range(int(sys.argv[1]))
    ]
    for p in procs:
        p.start()

    def forward(_signo: int, _frame: types.FrameType | None) -> None:
        for p in procs:
            p.terminate()

    signal.signal(signal.SIGTERM, forward)
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
