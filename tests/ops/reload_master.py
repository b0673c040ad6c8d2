"""A real master whose SIGHUP re-reads its config: ``reload_master.py --config PATH``.

Workers append ``{"pid", "worker_id"}`` to $CONTROL/starts.jsonl; the master logs each
reload's outcome.
"""

import argparse
import json
import logging
import os
import threading
from pathlib import Path

from consumerd import Service, ServiceManager
from consumerd.ops import config, logs

LOG = logging.getLogger("reload_master")


class Idle(Service):
    def __init__(self, worker_id):
        super().__init__(worker_id)
        self._stop = threading.Event()

    def run(self):
        row = json.dumps({"pid": os.getpid(), "worker_id": self.worker_id}) + "\n"
        with open(Path(os.environ["CONTROL"], "starts.jsonl"), "a") as f:
            f.write(row)
        self._stop.wait()

    def terminate(self):
        self._stop.set()


def main():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    running = config.Config(vars(parser.parse_args()))
    settings = running.settings
    logs.configure(settings.log_level, settings.log_format)
    manager = ServiceManager()
    service_id = manager.add(Idle, workers=settings.workers)

    def on_reload():
        try:
            change = running.reload()
        except config.ConfigError as exc:
            LOG.error("reload rejected, the running config stays: %s", exc)
            return
        if "workers" in change.applied:
            manager.reconfigure(service_id, running.settings.workers)
        if "log_level" in change.applied:
            logs.set_level(running.settings.log_level)
        for name, (old, new) in change.needs_restart.items():
            LOG.warning("%s changed from %r to %r: applies at the next restart", name, old, new)
        LOG.info("reloaded: %s", sorted(change.applied))

    manager.register_hooks(on_reload=on_reload)
    manager.run()


if __name__ == "__main__":
    main()
