"""The sd_notify protocol: one datagram per state change to $NOTIFY_SOCKET.

Implemented here rather than through a binding because it is a single sendto() and
every binding on PyPI either needs libsystemd or is unmaintained.
"""

from __future__ import annotations

import logging
import os
import socket
import time

LOG = logging.getLogger(__name__)


class Notifier:
    """Sends state to systemd; a no-op when the process was not started by it."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = self._watchdog_interval()

    @staticmethod
    def _watchdog_interval() -> float | None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        # Ping at half the period, as sd_watchdog_enabled(3) recommends.
        return int(usec) / 2_000_000

    def fileno(self) -> int | None:
        return self._sock.fileno() if self._sock else None

    def notify(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError:
            LOG.warning("systemd notification %r failed", fields, exc_info=True)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
