#!/usr/bin/env python
"""Chaos soak: push messages through consumerd on Redis and RabbitMQ under a storm of faults
and count that every one of them was handled (or dead-lettered, for the poison ones).

For each broker a ``consumerd`` master (2 workers, prefetch 50, graceful timeout 10 s) runs
a small app whose handler sleeps ``--handler-ms`` and then appends ``<id> <attempt>
<redelivered>`` to a file of its own process (``O_APPEND``, one line per message): the
record lives outside the broker, so a message the broker forgot still counts as lost.
A publisher thread spreads ``--messages`` evenly over the first 90 % of a chaos window of
``--duration`` seconds (default: messages / 200, so 50,000 -> 250 s; ``--quick``: 18 s).
Every 500th message fails its first attempt (a retry); every 2500th always fails (it must
end in the dead-letter queue ``<queue>.dlq``, and counts as delivered if it does).

The schedule, in fractions of the window (each step logged with its time):

- all along, every ~0.5 s: SIGKILL a random worker that has lived >= 1.2 s. Younger ones
  are spared so the supervisor's back-off for failed starts (a worker dead within 1 s)
  does not turn the soak into a measure of back-off;
- 0.10 SIGHUP (workers rebind), 0.35 SIGTTIN (+1 worker), 0.45 SIGTTOU (-1 worker),
  0.70 SIGUSR2 (code reload: the master re-executes and replaces its workers one by one);
- 0.20 and 0.55: a broker restart.
  Redis: our own ``redis-server`` (``--appendonly yes --appendfsync always --save ""``,
  free port, temp dir; the machine's shared one keeps nothing on disk and serves others)
  gets SIGTERM and, 2 s later, starts again on the same dir so the AOF reloads. The
  publisher pauses over the restart so that "sent" only counts acknowledged pushes.
  RabbitMQ: our own node (tests/consumer/conftest.py's ``RabbitServer``: its own name,
  ports, cookie and state in the temp dir; the machine's node serves others) has its
  application stopped and started again (``stop_app`` / ``start_app``, about 3 s): every
  connection closes, the exclusive wake queues are deleted, the durable queues come back
  from disk. The publisher (publisher confirms) pauses over it too. Kills pause over it
  and until every live worker's wake queue exists again, the queue has one consumer per
  worker, and some are workers that lived through it: they re-declared and re-subscribed.
- 0.80: SIGTERM the master (it lets workers finish and ack), start it again 2 s after it
  exited, with no more kills, to finish the queue while the publisher completes.

Every broker runs on consumerd's defaults (no ``visibility_timeout`` in the URL: a killed
Redis worker's messages come back through the holder sweep, see transport/holders.py).
Then it waits until every id is accounted for, or until nothing progressed for
:data:`PATIENCE` seconds, stops the master, drains the dead-letter queue and prints a
table. Exit status 1 if any message was lost.

    python benchmarks/soak.py                                 # 50,000 per broker, ~10 min
    python benchmarks/soak.py --messages 5000 --quick         # ~1 min, run by tests/test_soak.py
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import amqp.exceptions  # noqa: E402
import redis  # noqa: E402

import consumerd  # noqa: E402
from consumerd.cli import PREFLIGHT_ENV  # noqa: E402
from consumerd.consumer import routing  # noqa: E402
from consumerd.consumer.app import declare_queue  # noqa: E402
from consumerd.consumer.broker import connect  # noqa: E402
from tests.consumer.conftest import (  # noqa: E402 - needs ROOT on the path
    Consumerd,
    RabbitServer,
    RedisServer,
)

PATIENCE = 45.0
"""Seconds without progress before the soak gives up on the tail: three times the holder
heartbeat timeout (15 s), the slowest recovery on the defaults (a lost host)."""
WORKERS = 2
PREFETCH = 50
KILL_EVERY = 0.5
KILL_MIN_AGE = 1.2  # above the supervisor's healthy_after (1 s)
TRANSIENT_EVERY, POISON_EVERY = 500, 100
#: 1% of the messages are poison, of these kinds in turn (issue #8): a handler that always
#: raises, raises SystemExit, raises a BaseException; a compression kombu cannot undo; an
#: attempt header no int can hold. Every one must end in the dead-letter queue.
POISON_KINDS = ("raises", "system-exit", "base-exception", "compression", "attempt")

# The consumer app, written to the run's temp dir as tapp.py (the name Consumerd starts).
# Config: $T_CONFIG (JSON, written by Consumerd.configure); records: one file per process
# in the directory $T_OUT.
APP_SOURCE = """
import json, os, time
import consumerd

CONFIG = json.load(open(os.environ["T_CONFIG"]))
SPEC = CONFIG["consumers"][0]
app = consumerd.App("soak", max_retries=2, retry_delay=0.2)
_out = {}


def record(line):
    pid = os.getpid()
    if pid not in _out:  # a file per process; a forked worker opens its own
        path = os.path.join(os.environ["T_OUT"], f"{pid}.log")
        _out[pid] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_out[pid], line.encode())


@app.consumer(SPEC["name"], prefetch=SPEC["prefetch"])
def handle(body, message):
    if SPEC["sleep"]:
        time.sleep(SPEC["sleep"])
    if body.get("poison") == "system-exit":
        raise SystemExit(3)
    if body.get("poison") == "base-exception":
        raise BaseException("soak: a BaseException from a handler")
    if body.get("fail_until", 0) >= message.attempt:
        raise RuntimeError(f"soak: {body['i']} fails attempt {message.attempt}")
    record(f"{body['i']} {message.attempt} {int(message.redelivered)} {time.time():.3f}\\n")
"""


def log(text: str) -> None:
    print(f"{time.time():.3f} {text}", flush=True)


def is_preflight(pid: int) -> bool:
    """Whether the master's child ``pid`` is a code reload's pre-flight check, not a
    worker: killing it cancels the reload."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{PREFLIGHT_ENV}=1".encode() in f.read().split(b"\0")
    except OSError:
        return False


def poison_kind(i: int) -> str | None:
    if i % POISON_EVERY != POISON_EVERY // 2:
        return None
    return POISON_KINDS[(i // POISON_EVERY) % len(POISON_KINDS)]


def fail_until(i: int) -> int:
    if poison_kind(i) == "raises":
        return 99
    return 1 if i % TRANSIENT_EVERY == TRANSIENT_EVERY // 2 else 0


def message_of(i: int) -> tuple[dict[str, object], dict[str, str] | None]:
    """Message ``i``: its body and the headers of its poison kind, if any."""
    kind = poison_kind(i)
    body: dict[str, object] = {"i": i, "fail_until": fail_until(i)}
    if kind in ("system-exit", "base-exception"):
        body["poison"] = kind
    headers = {"compression": "x"} if kind == "compression" else None
    if kind == "attempt":
        headers = {"consumerd-attempt": "1e999"}
    return body, headers


@dataclasses.dataclass
class Result:
    broker: str
    sent: int = 0
    processed: int = 0
    lost: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    dead_unique: int = 0
    poison: int = 0
    kills: int = 0
    worker_deaths: int = 0
    broker_restarts: int = 0
    redeclared: int = 0  # RabbitMQ restarts after which every worker re-declared
    sighup: int = 0
    code_reloads: int = 0
    scaled: str = ""
    master_restarts: int = 0
    exit_codes: str = ""
    left_over: int = 0
    seconds: float = 0.0
    lost_ids: list[int] = dataclasses.field(default_factory=list)
    lost_in_unacked: int = 0  # Redis: lost ids still in the ``unacked`` hash
    notes: list[str] = dataclasses.field(default_factory=list)


class Target:
    """One broker under test: the URLs to use and how to restart it."""

    kind = ""
    consumer_url = ""
    publisher_url = ""
    direct_url = ""  # for inspection and clean-up, never cut

    def __init__(self) -> None:
        self.outage = threading.Lock()  # held while publishing must wait

    def restart(self) -> None:
        raise NotImplementedError

    def close(self, queue: str) -> None:
        raise NotImplementedError


class OwnRedis(Target):
    kind = "redis"

    def __init__(self, tmp: pathlib.Path, options: str) -> None:
        super().__init__()
        self.server = RedisServer(tmp)
        self.server.start()
        url = self.server.url
        self.consumer_url = f"{url}?{options}" if options else url  # the defaults
        self.publisher_url = self.direct_url = url

    def restart(self) -> None:
        with self.outage:
            proc = self.server.proc
            assert proc is not None
            proc.send_signal(signal.SIGTERM)  # a clean shutdown: the AOF is complete
            proc.wait(30)
            time.sleep(2)
            self.server.start()  # same dir: the AOF is replayed

    def close(self, queue: str) -> None:
        self.server.stop()


class OwnRabbit(Target):
    kind = "amqp"

    def __init__(self, tmp: pathlib.Path) -> None:
        super().__init__()
        self.server = RabbitServer(tmp)
        self.server.start()
        self.consumer_url = self.direct_url = self.server.url
        self.publisher_url = f"{self.server.url}?confirm_publish=1"

    def restart(self) -> None:
        with self.outage:
            self.server.restart()

    def close(self, queue: str) -> None:
        self.server.stop()


class Publisher(threading.Thread):
    """Publishes ids 0..count-1 spread over ``seconds``; ``sent`` counts acknowledged ones."""

    def __init__(self, target: Target, queue: str, count: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.target, self.queue, self.count, self.seconds = target, queue, count, seconds
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        app = consumerd.App("soak-publisher")
        app.configure(broker_url=self.target.publisher_url)
        start = time.monotonic()
        try:
            for i in range(self.count):
                delay = start + i * self.seconds / self.count - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._publish(app, *message_of(i))
                self.sent += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            app.close()

    def _publish(
        self, app: consumerd.App, body: dict[str, object], headers: dict[str, str] | None
    ) -> None:
        for attempt in range(20):
            with self.target.outage:
                try:
                    app.publish(self.queue, body, headers=headers)
                    return
                except Exception as exc:  # a dead connection from before a restart
                    log(f"publisher: {exc!r}, reconnecting")
                    app.configure(broker_url=self.target.publisher_url)
            time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"could not publish {body}")


class Soak:
    def __init__(self, target: Target, tmp: pathlib.Path, args: argparse.Namespace) -> None:
        self.target, self.args = target, args
        self.queue = f"soak{uuid.uuid4().hex[:8]}"
        self.out = tmp / "records"
        self.out.mkdir()
        self.master = Consumerd(tmp, self.queue, target.consumer_url)
        (tmp / "tapp.py").write_text(APP_SOURCE)
        self.master.out = str(self.out)
        self.master.configure(
            [{"name": self.queue, "prefetch": PREFETCH, "sleep": args.handler_ms / 1000}]
        )
        self.result = Result(target.kind)
        self.first_seen: dict[int, float] = {}
        self.exit_codes: list[int] = []
        self.master_pids: list[int] = []  # one per start that brought its workers up
        self.dead: list[int] = []  # ids taken off the dead-letter queue so far
        self.rng = random.Random(args.seed)
        self.checking = threading.Event()  # no kills over a RabbitMQ restart and its check
        self.reloading = threading.Event()  # nor over a SIGHUP until a worker reports it
        self.restarting = threading.Lock()  # one restart (and its check) at a time

    # -- the run -----------------------------------------------------------------------

    def run(self) -> Result:
        args, r = self.args, self.result
        window = args.duration
        began = time.monotonic()
        self.start_master()
        publisher = Publisher(self.target, self.queue, args.messages, 0.9 * window)
        publisher.start()
        log(f"{self.target.kind}: t={time.monotonic() - began:.1f}s publishing")
        steps = [
            (0.10, "SIGHUP", self.reload),
            (0.20, "broker restart", self.restart_broker),
            (0.35, "SIGTTIN", lambda: self.signal(signal.SIGTTIN)),
            (0.45, "SIGTTOU", lambda: self.signal(signal.SIGTTOU)),
            (0.55, "broker restart", self.restart_broker),
            (0.70, "SIGUSR2", lambda: self.signal(signal.SIGUSR2)),
        ]
        next_kill = began + 1.0
        outages: list[threading.Thread] = []
        while steps or time.monotonic() < began + 0.8 * window:
            now = time.monotonic()
            self.watch_workers(now)
            # A code reload's new worker counts as started once it consumes: not while a
            # broker restart is under way (the master would be stopped before it ends).
            due = steps and now >= began + steps[0][0] * window
            if due and not (steps[0][1] == "SIGUSR2" and self.restarting.locked()):
                _, what, action = steps.pop(0)
                log(f"{self.target.kind}: t={now - began:.1f}s {what}")
                if action == self.restart_broker:  # kills go on (Redis) meanwhile
                    outages.append(threading.Thread(target=action, daemon=True))
                    outages[-1].start()
                else:
                    action()
                continue
            if now >= next_kill:
                self.kill_one(now)
                next_kill = now + KILL_EVERY * self.rng.uniform(0.8, 1.2)
            time.sleep(0.02)
        for outage in outages:
            outage.join(60)
        with contextlib.suppress(AssertionError):  # counted (or not) in the table
            self.master.wait_logged("code reload complete", timeout=60)
        log(f"{self.target.kind}: t={time.monotonic() - began:.1f}s SIGTERM master")
        self.stop_master(timeout=60)
        time.sleep(2)
        log(f"{self.target.kind}: t={time.monotonic() - began:.1f}s master started again")
        self.start_master()
        publisher.join(window + 120)
        if publisher.error is not None or publisher.is_alive():
            raise RuntimeError(f"publisher failed: {publisher.error!r}")
        r.sent = publisher.sent
        self.wait_tail()
        self.stop_master(timeout=60)
        r.seconds = time.monotonic() - began
        self.count()
        return r

    def start_master(self) -> None:
        started = self.master.logged("all workers started") if self.master.proc else 0
        self.master.start("--graceful-timeout", "10", workers=WORKERS)
        # Consuming, not only forked: a SIGHUP before that has nothing to rebind.
        self.master.wait_logged("all workers started", started + 1, timeout=60)
        assert self.master.proc is not None
        self.master_pids.append(self.master.proc.pid)

    def stop_master(self, timeout: float) -> None:
        self.exit_codes.append(self.master.stop(timeout))

    def signal(self, sig: int) -> None:
        self.master.signal(sig)

    def reload(self) -> None:
        """SIGHUP, with kills held until a worker reports its rebind: a worker checks the
        new code in a child first, and one killed meanwhile (every 0.5 s here, a loaded
        machine) never logs it; its replacement starts on the new configuration anyway, so
        the rebind would go unseen, not undone. Not reported within 30 s: counted as 0."""
        before = self.master.logged("reloaded: consuming")
        self.reloading.set()
        try:
            self.signal(signal.SIGHUP)
            with contextlib.suppress(AssertionError):
                self.master.wait_logged("reloaded: consuming", before + 1, timeout=30)
        finally:
            self.reloading.clear()

    def restart_broker(self) -> None:
        rabbit = isinstance(self.target, OwnRabbit)
        with self.restarting:
            if rabbit:  # the workers that live through it must re-declare, not new ones
                self.checking.set()
            try:
                before = set(self.master.workers())
                began = time.monotonic()
                self.target.restart()
                self.result.broker_restarts += 1
                log(f"{self.target.kind}: broker back after {time.monotonic() - began:.1f}s")
                if isinstance(self.target, OwnRabbit):
                    self.check_redeclared(self.target.server, before)
            finally:
                self.checking.clear()

    def check_redeclared(self, server: RabbitServer, before: set[int]) -> None:
        """Count the restart as ridden out once every live worker's exclusive wake queue
        (deleted by the restart) exists again, the queue has a consumer per worker, and
        some of them are workers that lived through the restart (not replacements)."""
        host = socket.gethostname()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = self.master.workers()
            wakes = [server.consumers(f"consumerd.wake.{host}.{pid}") for pid in workers]
            consumers = server.consumers(self.queue)
            survivors = before & set(workers)
            if survivors and None not in wakes and consumers == len(workers):
                self.result.redeclared += 1
                log(f"amqp: {len(workers)} workers re-declared and consuming")
                return
            time.sleep(0.5)
        self.result.notes.append(
            f"60 s after a restart: {consumers} consumers, wake queues {wakes} of "
            f"{workers}, {before} before"
        )

    def watch_workers(self, now: float) -> None:
        for pid in self.master.workers():
            self.first_seen.setdefault(pid, now)

    def kill_one(self, now: float) -> None:
        if self.checking.is_set() or self.reloading.is_set():
            return
        old = [
            p
            for p in self.master.workers()
            if now - self.first_seen.get(p, now) >= KILL_MIN_AGE and not is_preflight(p)
        ]
        if old:
            victim = self.rng.choice(old)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
                self.result.kills += 1
                if self.args.verbose:
                    log(f"{self.target.kind}: SIGKILL {victim}")

    # -- accounting --------------------------------------------------------------------

    def records(self) -> collections.Counter[int]:
        counts: collections.Counter[int] = collections.Counter()
        for path in self.out.glob("*.log"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4:
                    counts[int(parts[0])] += 1
        return counts

    def expected(self) -> tuple[set[int], set[int]]:
        """(ids the handler must record, poison ids the dead-letter queue must hold)"""
        poison = {i for i in range(self.result.sent) if poison_kind(i) is not None}
        return set(range(self.result.sent)) - poison, poison

    def depth(self, name: str) -> int:
        """Ready messages in queue ``name``."""
        if self.target.kind == "redis":
            return int(redis.Redis.from_url(self.target.direct_url).llen(name))
        with connect(self.target.direct_url) as conn:
            try:
                return int(conn.default_channel.queue_declare(name, passive=True).message_count)
            except amqp.exceptions.NotFound:  # never declared: empty; any other error counts
                return 0

    def wait_tail(self) -> None:
        """Until every id is in, or nothing moved for PATIENCE seconds."""
        handled, poison = self.expected()
        patience = PATIENCE
        last, last_change = -1, time.monotonic()
        while True:
            # The dead-letter queue may hold a poison twice (a worker killed between the
            # dead letter and the ack): count ids, not its depth.
            self.dead.extend(self.drain_dlq())
            done = len(handled & set(self.records())) + len(poison & set(self.dead))
            if done == self.result.sent:
                return
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > patience:
                log(
                    f"{self.target.kind}: no progress for {patience}s at {done}/"
                    f"{self.result.sent}, giving up"
                )
                return
            time.sleep(0.5)

    def drain_dlq(self) -> list[int]:
        ids = []
        name = routing.dead_letter_queue(self.queue)
        with connect(self.target.direct_url) as conn:
            channel = conn.default_channel
            declare_queue(name)(channel).declare()
            # basic_get, not Queue.get: that re-raises a body it cannot decompress, and
            # the "compression" poison keeps its header in the dead-letter queue.
            while (raw := channel.basic_get(name, no_ack=True)) is not None:
                ids.append(int(json.loads(channel.message_to_python(raw).body)["i"]))
        return ids

    def count(self) -> None:
        r = self.result
        counts = self.records()
        handled, poison = self.expected()
        self.dead.extend(self.drain_dlq())
        dead = self.dead
        r.processed = len(counts)
        r.duplicates = sum(counts.values()) - len(counts)
        r.dead_lettered = len(dead)
        r.dead_unique = len(set(dead))
        r.poison = len(poison)
        missing = (handled - set(counts)) | (poison - set(dead))
        r.lost, r.lost_ids = len(missing), sorted(missing)
        r.worker_deaths = self.master.logged("killed by SIGKILL")
        r.sighup = self.master.logged("reloaded: consuming")
        r.code_reloads = self.master.logged("code reload complete")
        r.scaled = (
            f"{self.master.logged('SIGTTIN: now')} up, {self.master.logged('SIGTTOU: now')} down"
        )
        r.exit_codes = ", ".join(map(str, self.exit_codes))
        r.master_restarts = len(set(self.master_pids)) - 1
        r.left_over = self.left_over()
        if self.target.kind == "redis":
            self.redis_diagnosis(missing)

    def redis_diagnosis(self, missing: set[int]) -> None:
        """Where lost ids are: still in the unacked hash (a sweep would give them back
        some day) or nowhere on the broker; and whether kombu's sweep lock is held."""
        r, client = self.result, redis.Redis.from_url(self.target.direct_url)
        in_unacked = set()
        for value in client.hvals("unacked"):
            with contextlib.suppress(ValueError, KeyError, TypeError):  # not one of ours
                payload = json.loads(value)[0]
                in_unacked.add(int(json.loads(base64.b64decode(payload["body"]))["i"]))
        r.lost_in_unacked = len(missing & in_unacked)
        if r.lost:
            r.notes.append(
                f"{r.lost_in_unacked} of the lost ids are still in the unacked "
                f"hash, {r.lost - r.lost_in_unacked} are nowhere on the broker"
            )
        ttl = client.pttl("unacked_mutex")
        if ttl > 0:
            r.notes.append(
                f"kombu's unacked_mutex (the sweep lock) is held by nobody alive, "
                f"expires in {ttl / 1000:.0f}s: no sweep restores anything till then"
            )

    def left_over(self) -> int:
        """Messages still in the main or retry queue (or Redis's unacked hash)."""
        total = sum(self.depth(n) for n in (self.queue, routing.retry_queue(self.queue)))
        if self.target.kind == "redis":
            total += int(redis.Redis.from_url(self.target.direct_url).hlen("unacked"))
        return total


ROWS = [
    ("sent", "sent"),
    ("processed (unique ids)", "processed"),
    ("lost", "lost"),
    ("duplicates (handled again)", "duplicates"),
    ("dead-lettered", "dead"),
    ("left in broker after stop", "left_over"),
    ("worker SIGKILLs sent", "kills"),
    ("worker deaths seen by master", "worker_deaths"),
    ("broker restarts", "broker_restarts"),
    ("RabbitMQ restarts re-declared", "redeclared"),
    ("SIGHUP rebinds (worker logs)", "sighup"),
    ("SIGTTIN / SIGTTOU", "scaled"),
    ("SIGUSR2 code reloads completed", "code_reloads"),
    ("master SIGTERM + restart", "master_restarts"),
    ("master exit codes", "exit_codes"),
    ("wall time, s", "seconds"),
]


def cell(r: Result, key: str) -> str:
    if key == "dead":
        return f"{r.dead_lettered} ({r.dead_unique} ids; {r.poison} poison sent)"
    value = getattr(r, key)
    if isinstance(value, float):
        return f"{value:.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: list[Result]) -> str:
    header = "| | " + " | ".join(r.broker for r in results) + " |"
    lines = [header, "|---|" + "---:|" * len(results)]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(r, key) for r in results) + " |")
    return "\n".join(lines)


def soak_one(kind: str, args: argparse.Namespace) -> Result:
    with contextlib.ExitStack() as stack:
        tmp_dir = tempfile.mkdtemp(prefix=f"soak-{kind}-")
        if args.keep:
            log(f"{kind}: keeping {tmp_dir}")
        else:
            stack.callback(shutil.rmtree, tmp_dir, ignore_errors=True)
        tmp = pathlib.Path(tmp_dir)
        target: Target = OwnRedis(tmp, args.redis_options) if kind == "redis" else OwnRabbit(tmp)
        soak = Soak(target, tmp, args)
        try:
            return soak.run()
        finally:
            soak.master.kill()
            target.close(soak.queue)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50000)
    parser.add_argument("--brokers", default="redis,amqp", help="comma-separated: redis,amqp")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="chaos window in seconds (default: messages / 200)",
    )
    parser.add_argument("--quick", action="store_true", help="an 18 s chaos window")
    parser.add_argument(
        "--handler-ms",
        type=float,
        default=1.0,
        help="handler sleep, so kills hit messages in flight",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temp dirs (records, consumerd.log) and print them",
    )
    parser.add_argument("--verbose", action="store_true", help="log every kill")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--redis-options",
        default="",
        metavar="K=V&...",
        help="more transport options for the consumers' Redis URL, e.g. unacked_mutex_expire=20",
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 18.0 if args.quick else max(18.0, args.messages / 200)
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    if not set(kinds) <= {"redis", "amqp"}:
        parser.error(f"unknown broker in {args.brokers!r}")
    log(
        f"soak: {args.messages:,} messages per broker, chaos window {args.duration:.0f}s, "
        f"handler {args.handler_ms} ms, brokers {', '.join(kinds)}"
    )
    results = [soak_one(kind, args) for kind in kinds]
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    for r in results:
        if r.lost:
            print(f"{r.broker}: LOST {r.lost} ids, first: {r.lost_ids[:20]}")
        for note in r.notes:
            print(f"{r.broker}: {note}")
    return 1 if any(r.lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
