"""An OpenStack-telemetry-style notification agent.

Nova, Neutron, Glance and Cinder publish oslo.messaging notifications to their control
exchanges (``nova``, ``neutron``, ``glance``, ``openstack``) with routing keys
``notifications.<priority>``. This agent consumes the queues ``notifications.info`` and
``notifications.error`` bound to all of them, and Nova's versioned notifications:

    consumerd --app examples.notification_agent --workers 2 \\
        --broker amqp://guest:guest@127.0.0.1:5672//

``durable``/``auto_delete`` must match the services' ``[oslo_messaging_rabbit]``
``amqp_durable_queues``/``amqp_auto_delete`` (both False by default), or RabbitMQ refuses
the declaration with PRECONDITION_FAILED; with ``rabbit_quorum_queue = true`` pass
``durable=True, queue_arguments={"x-queue-type": "quorum"}``.
"""

import collections
import logging

import consumerd

app = consumerd.App("notification-agent", max_retries=5, retry_delay=2.0)
log = logging.getLogger("examples.notification_agent")

EXCHANGES = ["nova", "neutron", "glance", "cinder", "openstack"]


@app.notifications(
    "telemetry",
    exchanges=EXCHANGES,
    priorities=["info", "error"],
    event_types=["compute.instance.*", "volume.*", "image.*", "network.*", "port.*"],
    batch_size=100,
    batch_timeout=2.0,
)
def store_samples(notifications):
    """100 notifications at a time, or whatever came in the 2 s after the first one.

    Raising sends the whole batch back for a later retry (after max_retries, to the
    ``telemetry.dlq`` queue); returning acks all of it.
    """
    counts = collections.Counter(n.event_type for n in notifications)
    for n in notifications:
        if n.priority == "error":
            log.warning("%s from %s: %s", n.event_type, n.publisher_id, n.payload)
    log.info("stored %d samples: %s", len(notifications), dict(counts))


@app.notifications(
    "instance-updates",
    exchanges=["nova"],
    topic="versioned_notifications",
    event_types=["instance.update"],
)
def instance_update(notification):
    """One at a time: Nova's versioned notifications (queue ``versioned_notifications.info``)."""
    data = notification.payload.get("nova_object.data", {})
    log.info("instance %s is %s", data.get("uuid"), data.get("state"))
