"""A Ceilometer-style notification agent: notifications in, samples out, per-resource order.

Two stages in one app, both run by every worker:

1. ``telemetry-agent``: Nova, Cinder and Neutron publish oslo.messaging notifications to
   their control exchanges (``nova``, ``cinder``, ``neutron``) with routing key
   ``notifications.info``. This listener pool (queue ``telemetry-agent``, bound to all
   three) keeps the instance, volume and port events, takes them 50 at a time (or what
   came within 0.5 s) and turns each into a sample, published to stage 2 with the
   resource id as the key. The pool's queue is single-active-consumer: one worker at a
   time forwards, in the queue's order, and another takes over at once if it stops.
   (It is our queue, not the notifiers', so we may choose its arguments. Drop the
   argument to spread stage 1 over every worker, if two notifications about one resource
   arriving within one batch window may be forwarded out of order.)
2. ``samples``: 8 partition queues; ``crc32(resource_id) % 8`` picks one and each
   partition is consumed by exactly one worker, so one resource's samples are always
   processed by one worker, in the order they were forwarded, also while SIGTTIN/SIGTTOU
   move partitions between workers (a partition changes hands only after its old owner
   handed back what it had prefetched).

    consumerd --app examples.telemetry_agent --workers 4 \\
        --broker amqp://guest:guest@127.0.0.1:5672//
    kill -TTIN <master pid>     # one worker more; partitions move, order is kept

The names are Ceilometer's settings, from the environment here:
``NOVA_CONTROL_EXCHANGE`` (``nova``), ``CINDER_CONTROL_EXCHANGE`` (``cinder``),
``NEUTRON_CONTROL_EXCHANGE`` (``neutron``), ``TELEMETRY_TOPIC`` (``notifications``, as
``[oslo_messaging_notifications] topics``), ``TELEMETRY_POOL`` (``telemetry-agent``) and
``TELEMETRY_SAMPLES`` (``telemetry-samples``). Samples are appended as JSON lines to
``$TELEMETRY_STORE`` if set (a stand-in for Gnocchi), else logged.
"""

import json
import logging
import os

import consumerd

log = logging.getLogger("examples.telemetry_agent")

EXCHANGES = [
    os.environ.get("NOVA_CONTROL_EXCHANGE", "nova"),
    os.environ.get("CINDER_CONTROL_EXCHANGE", "cinder"),
    os.environ.get("NEUTRON_CONTROL_EXCHANGE", "neutron"),
]
TOPIC = os.environ.get("TELEMETRY_TOPIC", "notifications")
POOL = os.environ.get("TELEMETRY_POOL", "telemetry-agent")
SAMPLES = os.environ.get("TELEMETRY_SAMPLES", "telemetry-samples")
STORE = os.environ.get("TELEMETRY_STORE")

app = consumerd.App("telemetry-agent", max_retries=5, retry_delay=1.0)


def to_sample(n):
    """A Ceilometer-like sample from a notification, or None if it carries no resource."""
    payload = n.payload if isinstance(n.payload, dict) else {}
    if n.event_type.startswith("compute.instance."):
        name, resource_id, volume, unit = "instance", payload.get("instance_id"), 1, "instance"
    elif n.event_type.startswith("volume."):
        name, resource_id, volume, unit = (
            "volume.size",
            payload.get("volume_id"),
            payload.get("size", 0),
            "GB",
        )
    else:  # port.*
        port = payload.get("port") or {}
        name, resource_id, volume, unit = "port", port.get("id"), 1, "port"
    if not resource_id:
        return None
    return {
        "name": name,
        "resource_id": resource_id,
        "volume": volume,
        "unit": unit,
        "timestamp": n.timestamp,
        "message_id": n.message_id,
        "event_type": n.event_type,
        "project_id": n.context.get("project_id"),
        "resource_metadata": payload,
    }


@app.notifications(
    POOL,  # the consumer's name: its retries and dead letters go to <POOL>.retry / .dlq
    exchanges=EXCHANGES,
    topic=TOPIC,
    priorities=["info"],
    event_types=["compute.instance.*", "volume.*", "port.*"],
    pool=POOL,
    queue_arguments={"x-single-active-consumer": True},
    batch_size=50,
    batch_timeout=0.5,
)
def forward_samples(notifications):
    """Publish each sample to its resource's partition before the batch is acked: a worker
    dying before the ack means the batch is forwarded again (duplicates, never a loss)."""
    for n in notifications:
        sample = to_sample(n)
        if sample is not None:
            app.publish(SAMPLES, sample, key=sample["resource_id"])


@app.consumer(SAMPLES, partitions=8, prefetch=50)
def store_sample(sample, message):
    """One resource's samples arrive here in order, in one worker at a time."""
    if STORE is None:
        log.info(
            "%s %s = %s %s (%s)",
            sample["resource_id"],
            sample["name"],
            sample["volume"],
            sample["unit"],
            message.queue,
        )
        return
    line = json.dumps({"pid": os.getpid(), "queue": message.queue, "sample": sample}) + "\n"
    fd = os.open(STORE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
