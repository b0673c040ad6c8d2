"""The smallest consumerd app.

consumerd publish --app examples.minimal orders '{"id": 1}'
consumerd --app examples.minimal --workers 2
"""

import logging

import consumerd

app = consumerd.App("minimal")
log = logging.getLogger("examples.minimal")


@app.consumer("orders", prefetch=50)
def handle_order(body, message):
    log.info("order %s (attempt %d)", body, message.attempt)
