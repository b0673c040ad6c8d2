"""Prometheus metrics of the master and all its workers, in prometheus_client's multiprocess mode.

The master calls :func:`enable` before any worker is forked: it creates a fresh directory,
points ``PROMETHEUS_MULTIPROC_DIR`` at it and builds the instruments, which forked workers
inherit (each writes its own ``*_<pid>.db`` files there). When a worker dies the master
drops its live gauges and folds its counters and histograms into one archive file per type,
so a crash-looping worker cannot make every scrape read thousands of files.

Worker side, on the hot path: :func:`for_consumer` once per consumer, then
``received()``/``acked()``/``retried()``/``dead_lettered()`` and ``with handling():``
around the handler (counts reach the files within :data:`FLUSH_INTERVAL` while messages
flow; :func:`flush` when idle and before the worker exits); :func:`set_connected` and
:func:`set_consuming` report the broker connection and whether the worker consumes, which
``/readyz`` reads. When metrics are not enabled every call is a no-op.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import tempfile
import time
import types
import typing
import uuid

import prometheus_client
from prometheus_client import multiprocess, values
from prometheus_client.mmap_dict import MmapedDict

from consumerd import deps
from consumerd.supervisor.osproc import pid_exists
from consumerd.supervisor.service import Service

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The pid of the master that created the directory: a code reload (same pid, re-executed
#: image) keeps using it, anything else starts fresh.
OWNER_ENV = "CONSUMERD_METRICS_OWNER"

#: Handler durations from sub-millisecond to a minute.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# prometheus_client's multiprocess helpers carry no type hints; typed views of the few used.
_Rows = typing.Iterable[tuple[str, float, float, int]]
_read_file = typing.cast(typing.Callable[[str], _Rows], MmapedDict.read_all_values_from_file)
_mark_process_dead = typing.cast(typing.Callable[[int, str], None], multiprocess.mark_process_dead)
_new_collector = typing.cast(typing.Callable[..., object], multiprocess.MultiProcessCollector)
_new_value_class = typing.cast(typing.Callable[[], type], values.MultiProcessValue)


class _Archive(typing.Protocol):
    def read_value(self, key: str) -> tuple[float, float]: ...
    def write_value(self, key: str, value: float, timestamp: float) -> None: ...
    def close(self) -> None: ...


_open_archive = typing.cast(typing.Callable[[str], _Archive], MmapedDict)

# The internals used here (the value class, a histogram's per-bucket values, the mmap
# files the archive folds): a prometheus_client without them fails here, in one line.
deps.require(
    __name__,
    {
        values: "MultiProcessValue ValueClass",
        _new_value_class(): "_multiprocess",
        prometheus_client.Histogram: "_buckets _sum",
        MmapedDict: "read_all_values_from_file read_value write_value close",
        multiprocess: "MultiProcessCollector mark_process_dead",
    },
    "prometheus_client",
)

#: The longest a worker's counts may wait before they show in a scrape.
FLUSH_INTERVAL = 0.25
_CONNECTED = "consumerd_broker_connected"
_CONSUMING = "consumerd_worker_consuming"
_FOLDED_TYPES = ("counter", "histogram")
_SETTLED = frozenset(
    {"consumerd_messages_acked", "consumerd_messages_retried", "consumerd_messages_dead_lettered"}
)
_ARCHIVE = "archive"


class _Instruments:
    """Every metric consumerd records; built once per process, after multiprocess mode is on."""

    def __init__(self) -> None:
        per_consumer = ("consumer",)
        self.received = prometheus_client.Counter(
            "consumerd_messages_received",
            "Messages delivered to a handler.",
            per_consumer,
            registry=None,
        )
        self.acked = prometheus_client.Counter(
            "consumerd_messages_acked",
            "Messages acknowledged after handling.",
            per_consumer,
            registry=None,
        )
        self.retried = prometheus_client.Counter(
            "consumerd_messages_retried",
            "Messages sent back for another attempt.",
            per_consumer,
            registry=None,
        )
        self.dead_lettered = prometheus_client.Counter(
            "consumerd_messages_dead_lettered",
            "Messages given up on and dead-lettered.",
            per_consumer,
            registry=None,
        )
        self.duration = prometheus_client.Histogram(
            "consumerd_handler_duration_seconds",
            "Time spent in the handler.",
            per_consumer,
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.in_flight = prometheus_client.Gauge(
            "consumerd_messages_in_flight",
            "Messages being handled now.",
            per_consumer,
            multiprocess_mode="livesum",
            registry=None,
        )
        per_worker = ("service", "worker_id")  # prometheus_client adds "pid"
        self.connected = prometheus_client.Gauge(
            _CONNECTED,
            "1 while the worker holds a broker connection.",
            per_worker,
            multiprocess_mode="liveall",
            registry=None,
        )
        self.consuming = prometheus_client.Gauge(
            _CONSUMING,
            "1 while the worker consumes its queues.",
            per_worker,
            multiprocess_mode="liveall",
            registry=None,
        )
        self.queue_messages = prometheus_client.Gauge(
            "consumerd_queue_messages",
            "Messages in a consumer's queues by state (ready, unacked, retry, dead), "
            "sampled by worker 0 (consumerd.consumer.sampling).",
            ("consumer", "state"),
            multiprocess_mode="livemax",
            registry=None,
        )
        per_service = ("service",)
        self.restarts = prometheus_client.Counter(
            "consumerd_worker_restarts",
            "Workers that died and were replaced.",
            per_service,
            registry=None,
        )
        self.backoff = prometheus_client.Gauge(
            "consumerd_respawn_backoff_seconds",
            "Delay before the slowest failing worker slot of the service is respawned.",
            per_service,
            multiprocess_mode="max",
            registry=None,
        )


_instruments: _Instruments | None = None
_worker_labels: tuple[str, str] = ("", "")
_consumers: dict[str, ConsumerMetrics] = {}


def _multiprocess_values() -> None:
    """Make new metric values mmap-backed even if prometheus_client was imported before the
    directory was set (it picks its value class at import time)."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = _new_value_class()


def _get() -> _Instruments | None:
    """The instruments, built lazily in a worker started by spawn (which inherits only the
    environment); None when the master did not enable metrics."""
    global _instruments
    if _instruments is None and os.environ.get(DIR_ENV) and _started_by_master():
        _instruments = _build()
    return _instruments


def _started_by_master() -> bool:
    """A worker the master spawned, or forked by its fork server: any other process that
    inherited the environment (a program a handler runs) must not write into the
    master's directory."""
    owner = os.environ.get(OWNER_ENV)
    parent = os.getppid()
    if owner == str(parent):
        return True
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"multiprocessing.forkserver" not in f.read():
                return False
        with open(f"/proc/{parent}/stat") as f:
            grandparent = f.read().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return False
    return owner == grandparent


def _build() -> _Instruments:
    _multiprocess_values()
    return _Instruments()


# -- worker side ------------------------------------------------------------------------


class ConsumerMetrics:
    """What one consumer records per message; this base records nothing (metrics off)."""

    def received(self) -> None:
        """A message was delivered to the handler."""

    def acked(self) -> None:
        """The message was acknowledged."""

    def retried(self) -> None:
        """The message was sent back for another attempt."""

    def dead_lettered(self) -> None:
        """The message was given up on."""

    def handling(self) -> contextlib.AbstractContextManager[object]:
        """Wrap the handler call: counts it in flight and times it."""
        return contextlib.nullcontext()

    def started(self) -> None:
        """A handler began on another thread (what :meth:`handling` does on entry)."""

    def finished(self, seconds: float) -> None:
        """That handler ended after ``seconds`` (what :meth:`handling` does on exit)."""


class _Recording(ConsumerMetrics):
    """Counts in plain integers and writes them to the shared files at most every
    :data:`FLUSH_INTERVAL` (and on :func:`flush`): one write costs ~2-3 µs (a lock, a
    getpid, the mmap), and six a message would cost more than the rest of the consume
    loop. The in-flight gauge is written at once when it rises, so that a long handler
    shows while it runs, and lazily when it falls. Meant for one thread, the consume loop's.
    """

    __slots__ = (
        "_active",
        "_buckets",
        "_counters",
        "_due",
        "_duration",
        "_in_flight",
        "_pending",
        "_seconds",
        "_shown",
    )

    # Label lookups cost microseconds: resolve them once per consumer, not per message.
    def __init__(self, instruments: _Instruments, name: str) -> None:
        self._counters = tuple(
            c.labels(name)
            for c in (
                instruments.received,
                instruments.acked,
                instruments.retried,
                instruments.dead_lettered,
            )
        )
        self._pending = [0, 0, 0, 0]  # the four counters above
        self._duration = instruments.duration.labels(name)
        self._buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self._seconds = 0.0
        self._in_flight = instruments.in_flight.labels(name)
        self._active = 0  # handlers running now
        self._shown = 0  # the in-flight value last written
        self._due = time.monotonic() + FLUSH_INTERVAL

    def received(self) -> None:
        self._pending[0] += 1
        self._maybe_flush()

    def acked(self) -> None:
        self._pending[1] += 1
        self._maybe_flush()

    def retried(self) -> None:
        self._pending[2] += 1
        self._maybe_flush()

    def dead_lettered(self) -> None:
        self._pending[3] += 1
        self._maybe_flush()

    def handling(self) -> _Timing:
        return _Timing(self)

    def started(self) -> None:
        self._active += 1
        if self._active > self._shown:
            self._in_flight.set(self._active)
            self._shown = self._active

    def finished(self, seconds: float) -> None:
        self._active -= 1
        self._buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self._seconds += seconds
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() >= self._due:
            self.flush()

    def flush(self) -> None:
        self._due = time.monotonic() + FLUSH_INTERVAL
        for i, count in enumerate(self._pending):
            if count:
                self._counters[i].inc(count)
                self._pending[i] = 0
        if any(self._buckets):
            # prometheus_client observes one value at a time; adding a batch means writing
            # its per-bucket values (stored non-cumulative in multiprocess mode) directly.
            for value, count in zip(self._duration._buckets, self._buckets, strict=True):
                if count:
                    value.inc(count)
            self._duration._sum.inc(self._seconds)
            self._buckets = [0] * len(self._buckets)
            self._seconds = 0.0
        if self._shown != self._active:
            self._in_flight.set(self._active)
            self._shown = self._active


class _Timing:
    """One handler call; a class rather than a generator context manager: it is about
    1 µs cheaper."""

    __slots__ = ("_recorder", "_start")

    def __init__(self, recorder: _Recording) -> None:
        self._recorder = recorder
        self._start = 0.0

    def __enter__(self) -> _Timing:
        self._recorder.started()
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._recorder.finished(time.perf_counter() - self._start)


_OFF = ConsumerMetrics()


def flush() -> None:
    """Write what is not written yet. Call it whenever the consume loop is idle (e.g. a
    drain timeout) and before the worker exits: until then the last counts of a burst and
    an in-flight gauge going back to 0 wait for the next message."""
    for recorder in _consumers.values():
        if isinstance(recorder, _Recording):
            recorder.flush()


def for_consumer(name: str) -> ConsumerMetrics:
    """The recorder of consumer ``name`` in this process (keep it; it is cached anyway)."""
    found = _consumers.get(name)
    if found is None:
        instruments = _get()
        found = _Recording(instruments, name) if instruments is not None else _OFF
        _consumers[name] = found
    return found


def bind_worker(service: str, worker_id: int) -> None:
    """Name this worker in the per-worker gauges and report it not ready yet.

    Call it first thing in the worker (the ``on_new_worker`` hook): from then on
    ``/readyz`` counts the worker, and waits for it to report connected and consuming.
    """
    global _worker_labels
    _worker_labels = (service, str(worker_id))
    set_connected(False)
    set_consuming(False)


def on_new_worker(service_id: object, worker_id: int, service: Service) -> None:
    """The ``ServiceManager`` ``on_new_worker`` hook doing :func:`bind_worker`."""
    bind_worker(service.name or type(service).__name__, worker_id)


def set_connected(connected: bool) -> None:
    """Report whether this worker holds a broker connection."""
    instruments = _get()
    if instruments is not None:
        instruments.connected.labels(*_worker_labels).set(1 if connected else 0)


def set_consuming(consuming: bool) -> None:
    """Report whether this worker consumes its queues (it is ready for ``/readyz``)."""
    instruments = _get()
    if instruments is not None:
        instruments.consuming.labels(*_worker_labels).set(1 if consuming else 0)


def enabled() -> bool:
    """True in a worker of a master that serves metrics."""
    return _get() is not None


def directory() -> str | None:
    """The master's metrics directory, in a worker of a master that serves metrics."""
    return os.environ.get(DIR_ENV) if enabled() else None


def set_queue_messages(consumer: str, state: str, value: float) -> None:
    """Report a sampled queue depth (see :mod:`consumerd.consumer.sampling`)."""
    instruments = _get()
    if instruments is not None:
        instruments.queue_messages.labels(consumer, state).set(value)


# -- master side ------------------------------------------------------------------------


@dataclasses.dataclass
class _WorkerState:
    service: str = ""
    worker_id: str = ""
    connected: float = 0.0
    consuming: float = 0.0


def _pid_of(path: str) -> int | None:
    """The pid in ``counter_123.db`` / ``gauge_liveall_123.db``, None for other files."""
    stem = os.path.basename(path)[: -len(".db")]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


class _Supervisor(typing.Protocol):
    def will_respawn(self, service_id: uuid.UUID, worker_id: int) -> bool: ...


class MasterMetrics:
    """The master's view: exposition, readiness, and bookkeeping of dead workers."""

    def __init__(self, directory: str, owned: bool, instruments: _Instruments) -> None:
        self.directory = directory
        self._owned = owned
        self._pid = os.getpid()
        self._instruments = instruments
        self._names: dict[uuid.UUID, str] = {}
        self._stopping = False
        self._supervisor: _Supervisor | None = None
        self._registry = prometheus_client.CollectorRegistry(auto_describe=False)
        _new_collector(self._registry, path=directory)

    # Hooks of the ServiceManager -------------------------------------------------------

    def name_service(self, service_id: uuid.UUID, name: str) -> None:
        """Label the service ``service_id`` (from ``manager.add``) as ``name``."""
        self._names[service_id] = name
        # Exported from the start, so that a first restart is a rise from 0, not a new series.
        self._instruments.restarts.labels(name)
        self._instruments.backoff.labels(name).set(0)

    def follow(self, supervisor: _Supervisor) -> None:
        """Count as restarts only the deaths whose slot ``supervisor`` (the
        ``ServiceManager``) fills again. Without it a scale-down (SIGTTOU) counted as a
        restart: the hook gets cotyledon's arguments, which do not say."""
        self._supervisor = supervisor

    def service_name(self, service_id: uuid.UUID) -> str:
        return self._names.get(service_id, str(service_id))

    def worker_died(
        self, service_id: uuid.UUID, worker_id: int, exit_code: int, pid: int | None = None
    ) -> None:
        """The ``on_dead_worker`` hook: counts a restart if the worker is to be replaced
        (see :meth:`follow`) and cleans the dead worker's files.

        Without ``pid`` every file of a process that no longer exists is cleaned: the
        manager has reaped the worker before it calls the hook.
        """
        supervisor = self._supervisor
        if not self._stopping and (
            supervisor is None or supervisor.will_respawn(service_id, worker_id)
        ):
            self._instruments.restarts.labels(self.service_name(service_id)).inc()
        if pid is not None:
            self._forget(pid)
        else:
            self.sweep()

    def stopping(self) -> None:
        """The ``on_terminate`` hook: workers exiting from now on are not restarts."""
        self._stopping = True

    def set_backoff(self, delays: typing.Mapping[uuid.UUID, float]) -> None:
        """Publish the pending respawn delay of each service, in seconds (0 when none is
        pending, as for a named service missing from ``delays``)."""
        for service_id in self._names.keys() | delays.keys():
            seconds = max(0.0, delays.get(service_id, 0.0))
            self._instruments.backoff.labels(self.service_name(service_id)).set(seconds)

    # Reading ---------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text exposition of the master and all workers."""
        return prometheus_client.generate_latest(self._registry)

    def workers(self) -> dict[int, _WorkerState]:
        """The per-worker gauges of the live workers, by pid."""
        found: dict[int, _WorkerState] = {}
        for pid, key, value in self._live_values("gauge_liveall"):
            metric, _name, labels, _help = json.loads(key)
            state = found.setdefault(pid, _WorkerState())
            state.service = labels.get("service", "")
            state.worker_id = labels.get("worker_id", "")
            if metric == _CONNECTED:
                state.connected = value
            elif metric == _CONSUMING:
                state.consuming = value
        return found

    def settled(self) -> dict[int, int]:
        """Messages each live worker has acked, retried or dead-lettered, by pid."""
        found: dict[int, int] = {}
        for pid, key, value in self._live_values("counter"):
            if json.loads(key)[0] in _SETTLED:
                found[pid] = found.get(pid, 0) + int(value)
        return found

    def _live_values(self, kind: str) -> typing.Iterator[tuple[int, str, float]]:
        """``(pid, key, value)`` from each live worker's ``<kind>_<pid>.db`` file (not the
        archive of dead workers, whose name carries no pid)."""
        for path in glob.glob(os.path.join(self.directory, f"{kind}_*.db")):
            pid = _pid_of(path)
            if pid is None:
                continue
            try:
                rows = _read_file(path)
            except FileNotFoundError:
                continue  # the worker died and was cleaned since the glob
            for key, value, _timestamp, _pos in rows:
                yield pid, key, value

    def counters(self, names: typing.Iterable[str]) -> dict[tuple[str, str], float]:
        """The totals of the per-consumer counters ``names`` over all workers, dead ones
        included, by ``(name, consumer)``."""
        wanted = set(names)
        found: dict[tuple[str, str], float] = {}
        for family in self._registry.collect():
            if family.name not in wanted:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and "consumer" in sample.labels:
                    found[family.name, sample.labels["consumer"]] = sample.value
        return found

    def readiness(self, expected: int | None = None) -> tuple[bool, str]:
        """Ready when every worker (at least ``expected`` of them) reports connected and
        consuming; otherwise False and why."""
        workers = self.workers()
        if not workers:
            return False, "no worker has reported yet"
        if expected is not None and len(workers) < expected:
            return False, f"{len(workers)} of {expected} workers have reported"
        for pid, state in sorted(workers.items()):
            if not state.connected:
                return False, f"worker {state.worker_id} (pid {pid}) has no broker connection"
            if not state.consuming:
                return False, f"worker {state.worker_id} (pid {pid}) is not consuming"
        return True, f"{len(workers)} workers connected and consuming"

    # Files of dead workers -------------------------------------------------------------

    def sweep(self) -> None:
        """Clean the files of every process that no longer exists."""
        pids = {_pid_of(p) for p in glob.glob(os.path.join(self.directory, "*.db"))}
        for pid in pids:
            if pid is not None and pid != self._pid and not pid_exists(pid):
                self._forget(pid)

    def _forget(self, pid: int) -> None:
        _mark_process_dead(pid, self.directory)
        for typ in _FOLDED_TYPES:
            self._fold(os.path.join(self.directory, f"{typ}_{pid}.db"), typ)
        # A forked worker also re-creates, at zero, the master's non-live gauges (all of a
        # process's values move to its own files at its first write); they mean nothing.
        for path in glob.glob(os.path.join(self.directory, f"gauge_*_{pid}.db")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def _fold(self, path: str, typ: str) -> None:
        """Add a dead worker's counts to the archive file of their type, then remove it.

        The collector sums counters and histogram buckets over files, so the totals are
        unchanged; only the number of files stays bounded.
        """
        try:
            rows = list(_read_file(path))
        except FileNotFoundError:
            return
        archive = _open_archive(os.path.join(self.directory, f"{typ}_{_ARCHIVE}.db"))
        try:
            for key, value, _timestamp, _pos in rows:
                before, _ = archive.read_value(key)
                archive.write_value(key, before + value, 0.0)
        finally:
            archive.close()
        os.remove(path)

    def close(self) -> None:
        """Remove the directory if this master created it."""
        if self._owned and os.getpid() == self._pid:
            shutil.rmtree(self.directory, ignore_errors=True)


def enable(directory: str | None = None) -> MasterMetrics:
    """Turn metrics on in the master; call before the first worker is forked.

    Creates a fresh temporary directory (or uses ``directory``, which must be empty or
    absent), exports it to the workers, and returns the master's handle. The directory is
    removed when the master exits, if it created it. A master re-executed by a code reload
    finds its own directory in the environment and keeps it, counts included. Enable
    before importing the app, so that metrics the app defines at import are multiprocess.
    """
    global _instruments
    if _instruments is not None:
        # prometheus_client keeps the open files of a process for good: one directory only.
        raise RuntimeError("metrics are already enabled in this process")
    inherited = os.environ.get(DIR_ENV)
    if (
        directory is None
        and inherited
        and os.environ.get(OWNER_ENV) == str(os.getpid())
        and os.path.isdir(inherited)
    ):
        path, owned = inherited, True
    elif directory is None:
        path, owned = tempfile.mkdtemp(prefix="consumerd-metrics-"), True
    else:
        os.makedirs(directory, exist_ok=True)
        if os.listdir(directory):
            raise ValueError(f"metrics directory {directory} is not empty")
        path, owned = directory, False
    os.environ[DIR_ENV] = path
    os.environ[OWNER_ENV] = str(os.getpid())
    _instruments = _build()
    master = MasterMetrics(path, owned, _instruments)
    # Runs when the master exits (manager.run() raises SystemExit), not on a code reload's
    # exec, and never in a worker (workers leave with os._exit; close() checks the pid too).
    atexit.register(master.close)
    return master
