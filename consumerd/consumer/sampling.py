"""Queue depths for ``/metrics``: worker 0 samples them; the master never talks to a broker.

A daemon thread of worker 0 (only when metrics are on) asks the broker, through
:mod:`consumerd.consumer.inspection`, for the depths of each consumer's queues at start
and then every :data:`SAMPLE_EVERY` seconds — a bounded rate whatever the scrape rate
and the worker count — and writes them as ``consumerd_queue_messages{consumer, state}``
gauges in the multiprocess metrics, which the master serves:

- ``ready``: waiting in the consumer's queues (all partitions);
- ``unacked``: held by consumers — absent where the broker cannot tell (RabbitMQ while a
  consumer is attached), never a made-up 0;
- ``retry``: in ``<name>.retry`` (on RabbitMQ only the copies not held by a worker);
- ``dead``: in ``<name>.dlq``.

A failed sample is logged once per failure streak and retried at the next period.

The same sample feeds the web page at ``/`` (:mod:`consumerd.ops.web`), through files in
the metrics directory (private to the master's user, like the metrics themselves):

- ``web-state.json``: the depths above and, while the page is watched, the first
  :data:`DEAD_LETTERS_SHOWN` dead letters of each consumer (id, error, attempt, when,
  queue), written whole and renamed into place, so the master never reads half of one;
- ``web-watched``: touched by the master each time the page polls. While it is fresh
  (:data:`WATCH_WINDOW`), samples come every :data:`LIVE_EVERY` seconds instead of
  :data:`SAMPLE_EVERY`, and list dead letters; nobody watching, no listing at all.
- ``web-dlq.lock``: listing dead letters on RabbitMQ holds them (``basic.get``) for a
  moment, and a replay running then would miss them. The replays and purges the page
  starts hold this ``flock`` while they run (``CONSUMERD_DLQ_LOCK``, see
  :mod:`consumerd.admin`); a sample that finds it taken skips its listing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
import typing

from consumerd.consumer import inspection, routing
from consumerd.consumer.app import App
from consumerd.ops import metrics

LOG = logging.getLogger("consumerd.consumer")

SAMPLE_EVERY = 15.0
"""Seconds between two samples."""
LIVE_EVERY = 2.0
"""Seconds between two samples while the web page is watched."""
WATCH_WINDOW = 30.0
"""The page is watched this long after its last poll."""
DEAD_LETTERS_SHOWN = 50
"""Dead letters listed per consumer for the page (the oldest)."""
ERROR_SHOWN = 500
"""Characters of a dead letter's error kept for the page."""
SNAPSHOT = "web-state.json"
WATCHED = "web-watched"
LOCK = "web-dlq.lock"
#: Set by the master for the dlq commands its web page starts: the lock file to hold.
LOCK_ENV = "CONSUMERD_DLQ_LOCK"


def mark_watched(directory: str) -> None:
    """The master: the page polled now."""
    path = os.path.join(directory, WATCHED)
    try:
        os.utime(path)
    except FileNotFoundError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))


def watched(directory: str) -> bool:
    try:
        return time.time() - os.stat(os.path.join(directory, WATCHED)).st_mtime < WATCH_WINDOW
    except OSError:
        return False


def read_snapshot(directory: str) -> dict[str, typing.Any] | None:
    """The last sample written, None before the first one."""
    try:
        with open(os.path.join(directory, SNAPSHOT), "rb") as f:
            found = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


@contextlib.contextmanager
def dead_letter_lock(path: str, wait: bool) -> typing.Iterator[bool]:
    """Hold the ``flock`` of ``path``; without ``wait``, yields False if it is taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _letter(letter: inspection.DeadLetter, now: float) -> dict[str, typing.Any]:
    return {
        "id": letter.id,
        "error": letter.error[:ERROR_SHOWN],
        "attempt": letter.attempt,
        "age": inspection.age(letter, now),
        "queue": letter.origin,
    }


class DepthSampler:
    """Samples the queue depths of the app ``app()`` returns, on ``url``, until :meth:`stop`."""

    def __init__(
        self, app: typing.Callable[[], App], url: str, every: float = SAMPLE_EVERY
    ) -> None:
        self.app = app
        self.url = url
        self.every = every
        self._stopped = threading.Event()
        self._inspector: inspection.Inspector | None = None
        self._failing = False
        self.directory = metrics.directory()
        self._thread = threading.Thread(target=self._run, name="consumerd-depths", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        due = 0.0
        while not self._stopped.is_set():
            now = time.monotonic()
            live = self.directory is not None and watched(self.directory)
            if live or now >= due:
                due = now + self.every
                self._sample(live)
            self._stopped.wait(min(LIVE_EVERY, self.every))
        self._close()

    def _sample(self, live: bool) -> None:
        try:
            self.sample(letters=live)
            self._failing = False
        except Exception as exc:
            if not self._failing:
                LOG.warning(
                    "queue depths for /metrics: sampling failed (%s: %s); retrying every %gs",
                    type(exc).__name__,
                    exc,
                    self.every,
                )
            self._failing = True
            self._close()

    def _close(self) -> None:
        inspector, self._inspector = self._inspector, None
        if inspector is not None:
            try:
                inspector.close()
            except Exception as exc:  # closing a broken connection: nothing left to do
                LOG.debug("closing the depth inspector: %s", exc)

    def sample(self, letters: bool = False) -> None:
        """Sample the depths into the gauges and the page's snapshot; with ``letters``,
        list the first dead letters too."""
        if self._inspector is None:
            self._inspector = inspection.open_inspector(self.url)
        specs = list(self.app().consumers.values())
        names: list[str] = []
        for spec in specs:
            names += [
                *spec.queue_names,
                routing.retry_queue(spec.name),
                routing.dead_letter_queue(spec.name),
            ]
        depths = self._inspector.depths(names)
        shown: dict[str, dict[str, typing.Any]] = {}
        for spec in specs:
            mine = [depths[q] for q in spec.queue_names]
            held = [d.unacked for d in mine]
            retry = depths[routing.retry_queue(spec.name)]
            counts = {
                "ready": sum(d.ready for d in mine),
                "unacked": sum(h or 0 for h in held) if None not in held else None,
                "retry": retry.ready + (retry.unacked or 0),
                "dead": depths[routing.dead_letter_queue(spec.name)].ready,
            }
            for state, value in counts.items():
                if value is not None:
                    metrics.set_queue_messages(spec.name, state, value)
            shown[spec.name] = counts
        if self.directory is not None:
            if letters:
                self._list_dead_letters(self._inspector, specs, shown)
            self._write(shown)

    def _list_dead_letters(
        self,
        inspector: inspection.Inspector,
        specs: list[typing.Any],
        shown: dict[str, dict[str, typing.Any]],
    ) -> None:
        with dead_letter_lock(
            os.path.join(typing.cast(str, self.directory), LOCK), wait=False
        ) as free:
            if not free:
                return  # a replay or purge runs: the next sample lists them
            now = time.time()
            for spec in specs:
                queue = routing.dead_letter_queue(spec.name)
                with inspector.dead_letters(queue, limit=DEAD_LETTERS_SHOWN) as session:
                    shown[spec.name]["dead_letters"] = [_letter(x, now) for x in session.letters]

    def _write(self, shown: dict[str, dict[str, typing.Any]]) -> None:
        directory = typing.cast(str, self.directory)
        data = json.dumps({"sampled_at": time.time(), "consumers": shown}).encode()
        fd, tmp = tempfile.mkstemp(prefix=".web-state.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(directory, SNAPSHOT))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
