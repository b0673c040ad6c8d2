"""A master as an OpenStack service writes it with cotyledon: an oslo.config ``ConfigOpts``
parsed from a file, ``oslo_config_glue.setup(manager, conf)``, services that read ``conf``.

argv[-1]: JSON ``{"config_file", "reload_method", "workers", "stuck", "reload"}``. Every
step is a JSON line in $EVENTS: what the master and each worker see of the options.
"""

import json
import logging
import os
import sys
import threading
import time

from oslo_config import cfg

import consumerd as cotyledon  # the drop-in promise
from consumerd import oslo_config_glue

CONFIG = json.loads(sys.argv[-1])
EVENTS = os.environ["EVENTS"]
logging.basicConfig(level=logging.DEBUG, format="%(process)d %(name)s %(message)s")

OPTS = [
    cfg.StrOpt("colour", default="red", mutable=True, help="a mutable option"),
    cfg.StrOpt("shape", default="square", help="an immutable option"),
]


def record(event, **fields):
    line = json.dumps({"e": event, "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def seen(conf):
    return {
        "colour": conf.colour,
        "shape": conf.shape,
        "timeout": conf.graceful_shutdown_timeout,
        "log_options": conf.log_options,
    }


class Agent(cotyledon.Service):
    def __init__(self, worker_id, conf):
        super().__init__(worker_id)
        self.conf = conf
        self.stopped = threading.Event()
        record("start", wid=worker_id, **seen(conf))

    def run(self):
        self.stopped.wait()

    def terminate(self):
        record("terminate", wid=self.worker_id)
        if CONFIG.get("stuck"):
            time.sleep(3600)  # only the graceful shutdown timeout ends this worker
        self.stopped.set()


class ReloadableAgent(Agent):
    def reload(self):
        record(
            "reload",
            wid=self.worker_id,
            own_timeout=self.graceful_shutdown_timeout,
            **seen(self.conf),
        )


def main():
    conf = cfg.ConfigOpts()
    conf.register_opts(OPTS)
    conf(["--config-file", CONFIG["config_file"]], project="gluetest")
    manager = cotyledon.ServiceManager()
    service = ReloadableAgent if CONFIG.get("reload", True) else Agent
    manager.add(service, workers=CONFIG.get("workers", 2), args=(conf,))
    oslo_config_glue.setup(manager, conf, reload_method=CONFIG.get("reload_method", "reload"))
    manager.register_hooks(
        on_reload=lambda: record(
            "master_reload", manager_timeout=manager._graceful_shutdown_timeout, **seen(conf)
        )
    )
    record("master", manager_timeout=manager._graceful_shutdown_timeout, **seen(conf))
    manager.run()


if __name__ == "__main__":
    main()
