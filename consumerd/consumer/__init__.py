"""The consumer runtime: apps declare consumers, supervised workers consume them with kombu.

Layers, each in its own module (dramatiq-like, one job each):

* :mod:`~consumerd.consumer.app` - :class:`App`, the consumer declarations and ``publish``;
* :mod:`~consumerd.consumer.publishing` - publishing with every message confirmed, a
  window at a time;
* :mod:`~consumerd.consumer.routing` - queue names, partition hashing and the
  partition → worker map;
* :mod:`~consumerd.consumer.broker` - broker URL → :class:`kombu.Connection`;
* :mod:`~consumerd.consumer.policy` - retry / dead-letter decisions and their headers;
* :mod:`~consumerd.consumer.ownership` - host-wide partition leases and worker membership;
* :mod:`~consumerd.consumer.partitions` - which partitions a worker consumes, and when
  it looks again;
* :mod:`~consumerd.consumer.retries` - retry copies held until due, then sent back;
* :mod:`~consumerd.consumer.settling` - settling a delivery after its handler: ack,
  requeue, retry copy or dead letter;
* :mod:`~consumerd.consumer.session` - a worker's broker connection and the channels it
  consumes on;
* :mod:`~consumerd.consumer.loop` - the consume loop run in each worker process;
* :mod:`~consumerd.consumer.service` - the :class:`consumerd.Service` glue;
* :mod:`~consumerd.consumer.loading` - importing an app from ``module[:attribute]``.
"""

from consumerd.consumer.app import App, Delivery

__all__ = ["App", "Delivery"]
