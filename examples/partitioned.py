"""A partitioned consumer: per-key order, each partition owned by exactly one worker.

consumerd check --app examples.partitioned --workers 3
consumerd publish --app examples.partitioned samples '{"v": 3}' --key resource-42
consumerd --app examples.partitioned --workers 3
kill -TTIN <master pid>    # one worker more: partitions move, never consumed twice
"""

import logging
import os

import consumerd

app = consumerd.App("partitioned")
log = logging.getLogger("examples.partitioned")


@app.consumer("samples", partitions=8, prefetch=20)
def handle_sample(body, message):
    log.info("pid %d got %s from %s", os.getpid(), body, message.queue)


if __name__ == "__main__":
    for n in range(20):
        app.publish("samples", {"v": n}, key=f"resource-{n % 5}")
    app.close()
