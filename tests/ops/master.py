"""A real master for the ops tests: a ServiceManager with metrics and the ops endpoint on.

Configuration is one JSON object in argv[1]:
- ``workers``: worker count; ``counted``: messages each worker start records;
- ``start_method``: "fork" (the default: the manager forks) or a multiprocessing one;
- ``control``: a directory; a worker reports connected while ``<control>/connected``
  exists and consuming while ``<control>/consuming`` exists;
- ``info``: where the master writes ``{"port", "directory", "pid"}`` once serving.
Each worker appends ``{"pid", "worker_id"}`` to ``<control>/starts.jsonl`` once it has
recorded its messages.
"""

import json
import logging
import multiprocessing
import os
import sys
import threading
from pathlib import Path

from consumerd import Service, ServiceManager
from consumerd.ops import endpoints, metrics

CONFIG = json.loads(sys.argv[1])
CONTROL = Path(CONFIG["control"])
logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(message)s")


def append(path, row):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


class OpsWorker(Service):
    def __init__(self, worker_id):
        super().__init__(worker_id)
        self._stop = threading.Event()
        metrics.bind_worker("ops", worker_id)

    def run(self):
        recorder = metrics.for_consumer("orders")
        for _ in range(CONFIG["counted"]):
            recorder.received()
            with recorder.handling():
                pass
            recorder.acked()
        metrics.for_consumer("orders").retried()
        metrics.flush()  # as a consume loop does when idle
        append(CONTROL / "starts.jsonl", {"pid": os.getpid(), "worker_id": self.worker_id})
        # Mirror the control files into the gauges, as a consume loop would report.
        while not self._stop.wait(0.01):
            metrics.set_connected((CONTROL / "connected").exists())
            metrics.set_consuming((CONTROL / "consuming").exists())

    def terminate(self):
        self._stop.set()


def main():
    master_metrics = metrics.enable()
    method = CONFIG.get("start_method", "fork")
    manager = ServiceManager(
        mp_context=None if method == "fork" else multiprocessing.get_context(method)
    )
    workers = CONFIG["workers"]
    service_id = manager.add(OpsWorker, workers=workers)
    master_metrics.name_service(service_id, "ops")
    manager.register_hooks(
        on_dead_worker=master_metrics.worker_died, on_terminate=master_metrics.stopping
    )
    responder = endpoints.serve(
        manager, "127.0.0.1", 0, master_metrics, expected_workers=lambda: workers
    )
    info = {
        "port": responder.address[1],
        "directory": master_metrics.directory,
        "pid": os.getpid(),
    }
    Path(CONFIG["info"]).write_text(json.dumps(info))
    manager.run()  # the metrics directory goes at exit, without anything to call


if __name__ == "__main__":
    main()
