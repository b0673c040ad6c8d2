"""Dramatiq peer: ``dramatiq benchmarks.peers.dramatiq_app --processes 2 --threads T``.

The broker type follows the URL scheme. pika reads ``amqp://host:5672//`` as an empty
vhost, so throughput.py passes ``%2F``. Prefetch per process comes from
``$dramatiq_queue_prefetch`` (set by throughput.py to the same 100 as the others).
Default middleware is kept: it is what a Dramatiq user runs.
"""

from __future__ import annotations

import dramatiq

from benchmarks.peers import config, counter

if config.BROKER_URL.startswith("redis"):
    from dramatiq.brokers.redis import RedisBroker

    # Keys under a namespace named after the unique queue, so cleanup can find them all.
    broker: dramatiq.Broker = RedisBroker(url=config.BROKER_URL, namespace=config.QUEUE)
else:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=config.BROKER_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_noop", queue_name=config.QUEUE, max_retries=0)
def noop(body: object) -> None:
    config.wait()
    counter.hit()


def fill(n: int) -> None:
    for i in range(n):
        noop.send(config.body(i))
    broker.close()
