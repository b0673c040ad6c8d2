"""Logging for ``--log-format json|text``: one JSON object per line, or readable text.

Every record is stamped with the process's service and worker_id (set once per worker,
:func:`set_worker` or the :func:`on_new_worker` hook) and, while a handler runs, with the
queue and message id (``with message(queue, message_id):`` around the handler call; a
context variable, so each thread and task sees its own). In JSON::

    {"time": "2026-11-23T12:00:00.123Z", "level": "INFO", "logger": "app", "message": "...",
     "pid": 12, "service": "consumers", "worker_id": 0, "queue": "orders",
     "message_id": "5f1c...", "exception": "Traceback ..."}

``queue``/``message_id`` appear only inside a handler, ``exception`` only with one, and
keys passed with ``extra=`` are kept. ``service`` and ``worker_id`` are null in the master.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import types
import typing

from consumerd.supervisor.service import Service

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

_message: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "consumerd_message", default=None
)
_worker: tuple[str | None, int | None] = (None, None)
_installed: logging.Handler | None = None

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "service",
    "worker_id",
    "queue",
    "message_id",
    "taskName",
}


def set_worker(service: str, worker_id: int) -> None:
    """Name the worker this process is; its records carry both from now on."""
    global _worker
    _worker = (service, worker_id)


def on_new_worker(service_id: object, worker_id: int, service: Service) -> None:
    """The ``ServiceManager`` ``on_new_worker`` hook doing :func:`set_worker`."""
    set_worker(service.name or type(service).__name__, worker_id)


class message:  # lower case: it reads like a function, ``with message(queue, id):``
    """Within it, records carry ``queue`` and ``message_id``. A class, not a generator:
    it is on the per-message path."""

    __slots__ = ("_token", "_value")

    def __init__(self, queue: str, message_id: str | None) -> None:
        self._value = (queue, message_id)

    def __enter__(self) -> None:
        self._token = _message.set(self._value)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        _message.reset(self._token)


class ContextFilter(logging.Filter):
    """Stamps records with the worker and message context where they are emitted (the
    emitting thread), so any formatter can use ``%(worker_id)s`` or ``%(queue)s``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.service, record.worker_id = _worker
        current = _message.get()
        record.queue, record.message_id = current if current is not None else (None, None)
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line; newlines inside values are escaped by JSON itself."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        entry: dict[str, typing.Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "service": getattr(record, "service", _worker[0]),
            "worker_id": getattr(record, "worker_id", _worker[1]),
        }
        queue = getattr(record, "queue", None)
        if queue is not None:
            entry["queue"] = queue
            entry["message_id"] = getattr(record, "message_id", None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(
    level: str | int = "INFO", fmt: str = "text", stream: typing.TextIO | None = None
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in ``fmt``; returns the
    handler. Replaces the handler an earlier call installed, and only that one."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    global _installed
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    handler = _installed = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str | int) -> None:
    """Change the level live (a SIGHUP reload)."""
    logging.getLogger().setLevel(level.upper() if isinstance(level, str) else level)
