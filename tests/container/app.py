"""The app the container test runs: each message is recorded when its handler starts and
when it ends; a message with "orphan" leaves a grandchild process behind."""

import os
import time

import consumerd

app = consumerd.App("container")


def _record(line: str) -> None:
    fd = os.open(os.environ["T_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.consumer("work", prefetch=10)
def handle(body, message):
    _record(f"start {body['i']}")
    if body.get("orphan") and os.fork() == 0:
        # Double fork: the grandchild outlives its parent and is reparented to PID 1.
        if os.fork() == 0:
            time.sleep(0.2)
        os._exit(0)
    time.sleep(body.get("sleep", 0))
    _record(f"end {body['i']}")
