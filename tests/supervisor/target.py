"""A configurable program under test: a ServiceManager whose services and hooks record
every step they take as JSON lines in $EVENTS, so tests can count and order them.

Configuration is one JSON object in argv[1]; see the keys read below.
"""

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import consumerd as cotyledon  # the drop-in promise: code written for cotyledon runs as is

CONFIG = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
EVENTS = os.environ["EVENTS"]
logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(message)s")


def record(event, **fields):
    line = json.dumps({"e": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def bump(path):
    """A counter kept in a file, so it survives worker restarts."""
    count = int(Path(path).read_text()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(count))
    return count


class Worker(cotyledon.Service):
    def __init__(self, worker_id, conf):
        super().__init__(worker_id)
        self.conf = conf
        self.stop = threading.Event()
        time.sleep(conf.get("init_sleep", 0))
        record(
            "init",
            svc=conf["name"],
            wid=worker_id,
            ppid=os.getppid(),
            version=_version(),
            threads=threading.active_count(),
        )
        if (
            conf.get("crash_first")
            and bump(conf["crash_first"]["counter"]) <= conf["crash_first"]["times"]
        ):
            raise RuntimeError("crash on start")
        if conf.get("crash_init"):
            raise RuntimeError("crash on start")

    def run(self):
        record("run", svc=self.conf["name"], wid=self.worker_id)
        if self.conf.get("ready_after"):  # announces_ready: started once that file exists
            while not os.path.exists(self.conf["ready_after"]) and not self.stop.is_set():
                self.stop.wait(0.01)
            self.ready()
        if "READER_FD" in os.environ:
            os.write(int(os.environ["READER_FD"]), f"hello from {self.worker_id}".encode())
        if self.conf.get("run_raises"):
            raise RuntimeError("run failed")
        # Double fork: the grandchild is orphaned and reparented to PID 1 (or a subreaper).
        if self.conf.get("grandchild") and os.fork() == 0:
            if os.fork() == 0:
                time.sleep(0.3)
                os._exit(0)
            os._exit(0)
        self.stop.wait()

    def terminate(self):
        record("terminate", svc=self.conf["name"], wid=self.worker_id)
        time.sleep(self.conf.get("terminate_sleep", 0))
        self.stop.set()
        record("terminated", svc=self.conf["name"], wid=self.worker_id)
        if self.conf.get("terminate_raises"):
            raise RuntimeError("terminate failed")
        if "exit_code" in self.conf:
            sys.exit(self.conf["exit_code"])


class Reloadable(Worker):
    def reload(self):
        record("reload", svc=self.conf["name"], wid=self.worker_id)


def _version():
    try:
        import appcode  # only present in the code-reload test
    except ImportError:
        return None
    return appcode.VERSION


def on_new_worker(service_id, worker_id, service):
    # Module level: spawn and forkserver pickle the hooks that run in workers.
    record("hook_new_worker", wid=worker_id, name=service.name)


def make_class(conf):
    base = Reloadable if conf.get("reload") else Worker
    cls = type(conf["name"], (base,), {})
    if "graceful" in conf:
        cls.graceful_shutdown_timeout = conf["graceful"]
    if conf.get("ready_after"):
        cls.announces_ready = True
    return cls


# Classes must be importable by name for the spawn and forkserver start methods.
for _conf in CONFIG.get("services", []):
    globals()[_conf["name"]] = make_class(_conf)


def main():
    if CONFIG.get("default_start_method"):  # e.g. forkserver, Python 3.14's default on Linux
        multiprocessing.set_start_method(CONFIG["default_start_method"])
    kwargs = {"graceful_shutdown_timeout": CONFIG.get("graceful", 10)}
    if CONFIG.get("mp"):
        kwargs["mp_context"] = multiprocessing.get_context(CONFIG["mp"])
    manager = cotyledon.ServiceManager(**kwargs)
    ids = []
    for conf in CONFIG.get("services", [{"name": "Svc", "workers": 1}]):
        cls = globals().setdefault(conf["name"], make_class(conf))
        ids.append(manager.add(cls, workers=conf.get("workers", 1), args=(conf,)))

    def on_reload():
        record("hook_reload")
        if "reload_workers" in CONFIG:
            manager.reconfigure(ids[0], CONFIG["reload_workers"])
        if CONFIG.get("reload_shutdown"):
            manager.shutdown()
            record("shutdown_returned")

    manager.register_hooks(
        on_terminate=lambda: record("hook_terminate", n=1),
        on_reload=on_reload,
        on_new_worker=on_new_worker,
        on_dead_worker=lambda sid, wid, code: record("hook_dead_worker", wid=wid, code=code),
    )
    manager.register_hooks(on_terminate=lambda: record("hook_terminate", n=2))
    if CONFIG.get("reader"):
        # A pipe the workers write to, watched by the master's own loop.
        read_end, write_end = os.pipe()
        os.environ["READER_FD"] = str(write_end)
        manager.add_reader(
            read_end,
            lambda: record(
                "reader", data=os.read(read_end, 64).decode(), threads=threading.active_count()
            ),
        )
    if "watched_child" in CONFIG:
        # A child of the master's (as the web page's dead-letter action is): it exits
        # with status 3 once the test creates the file it waits for.
        wait = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)"
        argv = [sys.executable, "-c", wait + "\nsys.exit(3)", CONFIG["watched_child"]]
        child = subprocess.Popen(argv)
        manager.watch_child(child, lambda code: record("child_exit", code=code))
    record(
        "master",
        threads=threading.active_count(),
        start_method=manager.mp_context.get_start_method(),
    )
    manager.run()


if __name__ == "__main__":
    main()
