"""A real master logging in JSON: one worker handles a "message" inside the message
context, logs from it (one record with an exception), then reports on $CONTROL/done."""

import logging
import os
import sys
from pathlib import Path

from consumerd import Service, ServiceManager
from consumerd.ops import logs

LOG = logging.getLogger("app")


class Handler(Service):
    name = "consumers"

    def run(self):
        LOG.info("worker up")
        with logs.message("orders", "m-1"):
            LOG.info("handling %s", "m-1", extra={"attempt": 2})
            try:
                raise ValueError("bad\npayload")
            except ValueError:
                LOG.exception("handler failed")
        LOG.info("between messages")
        Path(os.environ["CONTROL"], "done").touch()


def main():
    logs.configure("INFO", sys.argv[1])
    manager = ServiceManager()
    manager.add(Handler, workers=1)
    manager.register_hooks(on_new_worker=logs.on_new_worker)
    manager.run()


if __name__ == "__main__":
    main()
