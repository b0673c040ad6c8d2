#!/usr/bin/env python
"""Throughput of consumerd beside its peers, on RabbitMQ and on Redis.

Workload: N small JSON messages (default 20,000, ~100 B), a no-op handler, 2 consumer
processes, prefetch 100, the queue filled *before* any consumer starts. With
``--sleep 0.005`` every handler waits 5 ms (I/O-bound work: time.sleep, asyncio.sleep for
the async runner) and consumerd runs ``--concurrency`` handlers per worker on threads, and,
with ``--async-concurrency N``, an extra row with an ``async def`` handler, N at once.
Runners:

- consumerd: ``consumerd --app benchmarks.peers.consumerd_app:app --workers 2 --prefetch 100``
- plain kombu: 2 forked processes, one connection each, ``prefetch_count=100`` in the
  ``Consumer`` constructor, ``message.ack()`` after the handler.
- kombu no-ack (``--runners ...,kombu_noack``): the same with ``no_ack=True``: the rate
  of consuming with no acknowledgement at all, the ceiling of any acking consumer.
- Celery: prefork pool, ``-c 2``, ``acks_late``, ``--prefetch-multiplier 100`` (Celery
  prefetches for the whole worker, multiplier x concurrency = 200 = 2 x 100, the same
  in-flight total as the others), gossip/mingle/heartbeat and remote control off.
- Dramatiq: ``--processes 2``, once with ``--threads 2`` and once with its default 8 (one
  table row each, ``--dramatiq-threads``), prefetch 100 per process via
  ``$dramatiq_queue_prefetch``, default middleware.

Each runner fills its queue in its own native message format, then its consumers start.
Timing runs from the first message handled to the last message acked, the same for all:
- start: the earliest handler call, timed inside the consumer processes (see
  peers/counter.py); start-up time is excluded for every runner and shown apart.
- end on Redis: when the broker is seen with the queue empty and nothing unacked
  (polled every 10 ms on one open connection; matters because consumerd's Redis
  transport and Dramatiq's Redis broker send acks in batches). The "ack tail" printed
  per run is how long after the last handler call that was.
- end on RabbitMQ: the last handler call. Every runner here acks each message right
  after its handler, and only rabbitmqctl (~0.4 s a call) counts unacked messages, too
  slow to time with; it is used to check the queue is empty with nothing unacked.
Every run also checks the handled count is exactly N (no loss, no duplicates). Then the
runner is stopped (SIGTERM; SIGKILL to its process group after 10 s) and its queue
deleted. Repeats are interleaved (rep 1 of every runner, then rep 2, ...) with the
runner order rotated, so background load on a shared machine hits all of them alike;
the table shows medians.

    python benchmarks/throughput.py                      # full run: 20,000 x 3 reps
    python benchmarks/throughput.py --count 3000 --sleep 0.005 --concurrency 8 \
        --async-concurrency 64 --dramatiq-threads 8 --runners consumerd,dramatiq,kombu
    python benchmarks/throughput.py --count 2000 --repeats 1 --brokers redis
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.peers import brokers, counter  # noqa: E402 - needs ROOT on sys.path

PY = sys.executable
STALL_SECONDS = 60.0
POLL_SECONDS = 0.01
ACK_WAIT_SECONDS = 30.0
STOP_GRACE_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Broker:
    name: str
    kind: str  # "rabbitmq" | "redis"
    url: str  # as kombu spells it

    def counts(self, queue: str, layout: str) -> tuple[int, int] | None:
        if self.kind == "rabbitmq":
            return brokers.rabbit_counts(self.url, queue)
        return brokers.redis_counts(self.url, queue, layout)

    @contextlib.contextmanager
    def drained_probe(self, queue: str, layout: str) -> Iterator[Callable[[], bool] | None]:
        """A fast "all acked?" check, or None where there is none (RabbitMQ: only
        rabbitmqctl counts unacked messages, and it takes ~0.4 s)."""
        if self.kind == "rabbitmq":
            yield None
            return
        with redis.Redis.from_url(self.url) as client:
            yield brokers.RedisProbe(client, queue, layout).drained

    def delete(self, queue: str) -> None:
        if self.kind == "rabbitmq":
            brokers.rabbit_delete(self.url, queue)
        else:
            brokers.redis_delete(self.url, queue)


@dataclasses.dataclass(frozen=True)
class Settings:
    count: int
    workers: int
    prefetch: int
    timeout: float
    sleep: float = 0.0
    concurrency: int = 1
    async_concurrency: int = 0
    partitions: int = 0
    keys: int = 1000


@dataclasses.dataclass(frozen=True)
class Runner:
    name: str  # short id, e.g. "dramatiq-8"; the family before "-" is what --runners selects
    module: str  # under benchmarks/peers: its handler and its fill()
    label: str
    layout: str  # how it stores messages: "kombu" | "dramatiq"
    command: Callable[[str, str], list[str]]  # (broker url, queue) -> argv
    url: Callable[[Broker], str] = lambda broker: broker.url
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    unavailable: Callable[[], str | None] = lambda: None
    partitions: int = 0  # its queue is that many partition queues (consumerd)

    def queues(self, queue: str) -> list[str]:
        """Where its messages are: the queue, or its partition queues."""
        if not self.partitions:
            return [queue]
        return [f"{queue}.p{p}" for p in range(self.partitions)]


def _dramatiq_url(broker: Broker) -> str:
    # pika reads "amqp://host:5672//" as the empty vhost; "/" must be spelled %2F.
    if broker.kind == "rabbitmq" and broker.url.endswith("//"):
        return broker.url[:-1] + "%2F"
    return broker.url


def _consumerd_cli() -> list[str]:
    exe = shutil.which("consumerd")
    return [exe] if exe else [PY, "-m", "consumerd"]


def _consumerd_unavailable() -> str | None:
    """Why consumerd cannot be benchmarked now (its runtime is developed in parallel)."""
    probes = [
        [PY, "-c", "import consumerd; consumerd.App"],
        [*_consumerd_cli(), "--help"],
    ]
    for probe in probes:
        try:
            done = subprocess.run(
                probe, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(probe[-2:])}: {exc}"
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["exit status"])[-1]
            return f"`{' '.join(probe[-2:])}` failed: {last}"
    return None


def make_runners(s: Settings, dramatiq_threads: list[int]) -> list[Runner]:
    """consumerd first (the ratios are against it), then its peers."""
    w, pf = s.workers, s.prefetch
    runners = [
        Runner(
            "consumerd",
            "consumerd_app",
            f"consumerd --workers {w}",
            "kombu",
            lambda url, queue: [
                *_consumerd_cli(),
                *f"--app benchmarks.peers.consumerd_app:app --workers {w} --prefetch {pf}".split(),
                *["--broker", url],
            ],
            env={"BENCH_CONCURRENCY": str(s.concurrency)},
            unavailable=_consumerd_unavailable,
        ),
    ]
    if s.async_concurrency:
        runners.append(
            Runner(
                "consumerd-async",
                "consumerd_app",
                f"consumerd async x{s.async_concurrency}",
                "kombu",
                runners[0].command,
                env={"BENCH_CONCURRENCY": str(s.async_concurrency), "BENCH_ASYNC": "1"},
                unavailable=_consumerd_unavailable,
            )
        )
    if s.partitions:
        runners.append(
            Runner(
                "consumerd-keyed",
                "consumerd_app",
                f"consumerd keyed {s.partitions}p/{s.keys:,} keys",
                "kombu",
                runners[0].command,
                env={
                    "BENCH_CONCURRENCY": str(s.concurrency),
                    "BENCH_PARTITIONS": str(s.partitions),
                    "BENCH_KEYS": str(s.keys),
                },
                unavailable=_consumerd_unavailable,
                partitions=s.partitions,
            )
        )
    runners += [
        Runner(
            "kombu",
            "kombu_consumer",
            f"plain kombu ({w} procs)",
            "kombu",
            lambda url, queue: [PY, "-m", "benchmarks.peers.kombu_consumer", str(w)],
        ),
        Runner(
            "kombu_noack",
            "kombu_consumer",
            f"kombu no-ack ({w} procs)",
            "kombu",
            lambda url, queue: [PY, "-m", "benchmarks.peers.kombu_consumer", str(w), "noack"],
        ),
    ]
    runners += [
        Runner(
            f"dramatiq-{t}",
            "dramatiq_app",
            f"Dramatiq ({w} procs x {t} thr)",
            "dramatiq",
            lambda url, queue, t=t: [
                PY,
                *f"-m dramatiq benchmarks.peers.dramatiq_app --processes {w} --threads {t}".split(),
                *["--queues", queue],
            ],
            url=_dramatiq_url,
            env={"dramatiq_queue_prefetch": str(pf)},
        )
        for t in dramatiq_threads
    ]
    runners.append(
        Runner(
            "celery",
            "celery_app",
            f"Celery prefork c{w} acks_late",
            "kombu",
            lambda url, queue: [
                PY,
                *f"-m celery -A benchmarks.peers.celery_app worker -P prefork -c {w}".split(),
                *["-Q", queue],
                # Celery prefetches per worker: multiplier x concurrency = workers x prefetch.
                *f"--prefetch-multiplier {pf} -l WARNING".split(),
                *["--without-gossip", "--without-mingle", "--without-heartbeat"],
            ],
        )
    )
    return runners


class RunFailed(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Result:
    rate: float  # messages per second, first handled -> last handled
    seconds: float
    startup: float  # runner start -> first message handled
    ack_tail: float  # last message handled -> broker seen with everything acked
    split: list[int]  # messages handled per consumer process
    cpu: float  # CPU seconds per message, all consumer processes (first -> last handled)


@contextlib.contextmanager
def _running(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group; always leave nothing of it behind."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        # SIGTERM to the leader is each framework's documented graceful stop; whatever
        # of its group is still alive afterwards is killed.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(log: Path, lines: int = 8) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return "\n      ".join(text[-lines:])


def _wait_handled(
    proc: subprocess.Popen[bytes],
    count_dir: str,
    n: int,
    deadline: float,
    drained: Callable[[], bool] | None,
) -> tuple[list[tuple[int, float, float]], float | None]:
    """Wait until n messages are handled (and, with a probe, the broker has them all
    acked). Returns the processes' reports and when the final all-acked streak began."""
    handled, progress_at = 0, time.monotonic()
    drained_since: float | None = None
    while True:
        time.sleep(POLL_SECONDS)
        now = time.monotonic()
        if drained is not None:
            drained_since = (drained_since or now) if drained() else None
        reports = counter.read_all(count_dir)
        total = sum(r[0] for r in reports)
        if total >= n and (drained is None or drained_since is not None):
            return reports, drained_since
        if total > handled:
            handled, progress_at = total, now
        if proc.poll() is not None:
            raise RunFailed(f"runner exited ({proc.returncode}) after {total}/{n} messages")
        if now > deadline or now - progress_at > STALL_SECONDS:
            raise RunFailed(f"timed out with {total}/{n} messages handled")


def _counts(broker: Broker, runner: Runner, queue: str) -> tuple[int, int] | None:
    """``(ready, unacked)`` over the runner's queues (None: the queue does not exist; a
    partition queue is declared by the first message published to it, or by a worker)."""
    total = (0, 0)
    for name in runner.queues(queue):
        counts = broker.counts(name, runner.layout)
        if counts is None and runner.partitions:
            continue
        if counts is None:
            return None
        total = (total[0] + counts[0], total[1] + counts[1])
    return total


@contextlib.contextmanager
def _drained_probe(
    broker: Broker, runner: Runner, queue: str
) -> Iterator[Callable[[], bool] | None]:
    with contextlib.ExitStack() as stack:
        probes = [
            stack.enter_context(broker.drained_probe(name, runner.layout))
            for name in runner.queues(queue)
        ]
        if any(p is None for p in probes):
            yield None
        else:
            yield lambda: all(p() for p in probes if p is not None)


def _wait_drained(broker: Broker, runner: Runner, queue: str) -> None:
    deadline = time.monotonic() + ACK_WAIT_SECONDS
    while True:
        counts = _counts(broker, runner, queue)
        if counts == (0, 0):
            return
        if time.monotonic() > deadline:
            raise RunFailed(f"queue not drained: (ready, unacked) = {counts}")
        time.sleep(0.2)


def run_once(runner: Runner, broker: Broker, s: Settings, queue: str, work: Path) -> Result:
    url = runner.url(broker)
    count_dir = tempfile.mkdtemp(prefix="counts-", dir=work)
    env = {
        **os.environ,
        **runner.env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "BENCH_BROKER_URL": url,
        "BENCH_QUEUE": queue,
        "BENCH_PREFETCH": str(s.prefetch),
        "BENCH_COUNT_DIR": count_dir,
        "BENCH_SLEEP": repr(s.sleep),
    }
    log = work / f"{queue}.log"
    broker.delete(queue)
    try:
        fill = subprocess.run(
            [PY, "-m", "benchmarks.peers.fill", runner.module, str(s.count)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=s.timeout, check=False,
        )  # fmt: skip
        if fill.returncode:
            raise RunFailed(f"fill failed: {fill.stderr.strip().splitlines()[-1:]}")
        filled = _counts(broker, runner, queue)
        if filled != (s.count, 0):
            raise RunFailed(f"after fill (ready, unacked) = {filled}, expected ({s.count}, 0)")
        started = time.monotonic()
        with (
            _drained_probe(broker, runner, queue) as probe,
            _running(runner.command(url, queue), env, log) as proc,
        ):
            try:
                reports, acked = _wait_handled(proc, count_dir, s.count, started + s.timeout, probe)
                _wait_drained(broker, runner, queue)
            except RunFailed as exc:
                raise RunFailed(f"{exc}\n      log tail: {_tail(log)}") from None
            final = counter.read_all(count_dir)
            handled = sum(r[0] for r in final)
        if handled != s.count:
            raise RunFailed(f"handled {handled} messages for {s.count} sent (duplicates)")
        broken = counter.disorders(count_dir)
        if broken:
            raise RunFailed(f"PER-KEY ORDER BROKEN {len(broken)} times, first: {broken[0]}")
        first = min(r[1] for r in reports if r[0])
        last = max(r[2] for r in reports)
        end = max(last, acked or last)
        split = sorted((r[0] for r in reports), reverse=True)
        # Each process's first message is before its CPU clock starts.
        cpu = sum(r[3] for r in final) / max(1, handled - len(final))
        return Result(s.count / (end - first), end - first, first - started, end - last, split, cpu)
    finally:
        broker.delete(queue)
        shutil.rmtree(count_dir, ignore_errors=True)


def _fmt_rate(rates: list[float], reps: int) -> str:
    if not rates:
        return "failed"
    text = f"{statistics.median(rates):,.0f}"
    return text if len(rates) == reps else f"{text} ({len(rates)}/{reps} ok)"


def _ratio(top: list[float], bottom: list[float]) -> str:
    """The ratio of two runners' medians, "n/a" where one has no run."""
    if not top or not bottom:
        return "n/a"
    return f"{statistics.median(top) / statistics.median(bottom):.2f}x"


def print_table(
    runners: list[Runner],
    brokers_: list[Broker],
    *,
    rates: dict[tuple[str, str], list[float]],
    skipped: dict[str, str],
    s: Settings,
    reps: int,
) -> None:
    col = 16
    print()
    work = f"{s.sleep * 1000:g} ms sleep handler" if s.sleep else "no-op handler"
    print(
        f"msg/s, median of {reps} (first message handled -> last acked); {s.count:,} JSON "
        f"msgs, {work}, {s.workers} processes, prefetch {s.prefetch}, queue pre-filled"
    )
    if s.sleep:
        print(
            f"ceiling: {s.workers / s.sleep:,.0f} msg/s one handler per process, "
            f"{s.workers * s.concurrency / s.sleep:,.0f} at consumerd --concurrency "
            f"{s.concurrency}"
        )
    print(f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f} (1 min)")
    print(f"consumerd tree: {_tree_version()}")
    header = f"{'runner':<34}" + "".join(f"{b.name:>{col}}" for b in brokers_)
    print(header)
    print("-" * len(header))
    for r in runners:
        cells = [
            "n/a" if r.name in skipped else _fmt_rate(rates[r.name, b.name], reps) for b in brokers_
        ]
        print(f"{r.label:<34}" + "".join(f"{c:>{col}}" for c in cells))
    if "consumerd" in skipped:
        print(f"\nconsumerd: n/a - {skipped['consumerd']}")
        return
    if all(r.name != "consumerd" for r in runners):
        return
    print()
    print(f"{'consumerd / peer (medians)':<34}" + "".join(f"{b.name:>{col}}" for b in brokers_))
    for r in runners:
        if r.name == "consumerd-keyed":
            cells = [_ratio(rates[r.name, b.name], rates["consumerd", b.name]) for b in brokers_]
            print(f"{'keyed / unordered':<34}" + "".join(f"{c:>{col}}" for c in cells))
            continue
        if r.name == "consumerd":
            continue
        cells = [_ratio(rates["consumerd", b.name], rates[r.name, b.name]) for b in brokers_]
        print(f"{'vs ' + r.label:<34}" + "".join(f"{c:>{col}}" for c in cells))


def _tree_version() -> str:
    """The commit measured (consumerd is developed while benchmarks run)."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "log", "-1", "--format=%h %cd", "--date=format:%H:%M"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "consumerd"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return f"{head}{' + uncommitted changes under consumerd/' if dirty else ''}"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=20_000, help="messages per run (20000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per runner and broker (3)")
    p.add_argument("--workers", type=int, default=2, help="consumer processes (2)")
    p.add_argument("--prefetch", type=int, default=100, help="prefetch per process (100)")
    p.add_argument(
        "--dramatiq-threads", default="2,8", help="threads per process; one row each (2,8)"
    )
    p.add_argument("--brokers", default="rabbitmq,redis", help="rabbitmq,redis")
    p.add_argument(
        "--runners",
        default="consumerd,kombu,dramatiq,celery",
        help="families (consumerd: all its rows) or single rows (consumerd-async)",
    )
    p.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672//")
    p.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/9",
        help="redis://127.0.0.1:6379/9 (a database of its own: no other user's keys)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=600, help="seconds per run (600)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds each handler waits (0)")
    p.add_argument("--concurrency", type=int, default=1, help="consumerd handlers per worker")
    p.add_argument(
        "--keyed-partitions",
        type=int,
        default=0,
        help="add a consumerd row: that many partitions, keyed messages, order checked",
    )
    p.add_argument("--keys", type=int, default=1000, help="keys of the keyed row (1000)")
    p.add_argument(
        "--async-concurrency",
        type=int,
        default=0,
        help="add a consumerd async def row, N at once (0: none)",
    )
    return p.parse_args()


def main() -> None:
    args = _parse()
    s = Settings(
        args.count,
        args.workers,
        args.prefetch,
        args.timeout,
        args.sleep,
        args.concurrency,
        args.async_concurrency,
        args.keyed_partitions,
        args.keys,
    )
    all_brokers = {
        "rabbitmq": Broker("RabbitMQ", "rabbitmq", args.rabbitmq_url),
        "redis": Broker("Redis", "redis", args.redis_url),
    }
    chosen_brokers = [all_brokers[b] for b in args.brokers.split(",")]
    wanted = set(args.runners.split(","))
    threads = [int(t) for t in args.dramatiq_threads.split(",")]
    runners = [
        r for r in make_runners(s, threads) if r.name in wanted or r.name.split("-")[0] in wanted
    ]

    skipped = {r.name: why for r in runners if (why := r.unavailable())}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    active = [r for r in runners if r.name not in skipped]

    # A SIGTERM to this script unwinds through the finally blocks that stop runners.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rates: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    print(f"consumerd tree at the start: {_tree_version()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cdbench-") as tmp:
        for rep in range(args.repeats):
            order = active[rep % len(active) :] + active[: rep % len(active)] if active else []
            for b in chosen_brokers:
                for r in order:
                    queue = f"cdbench-{os.getpid()}-{r.name}-{rep}"
                    tag = f"[{rep + 1}/{args.repeats}] {b.name:<8} {r.name:<10}"
                    try:
                        res = run_once(r, b, s, queue, Path(tmp))
                    except (RunFailed, subprocess.SubprocessError, OSError) as exc:
                        print(f"{tag} FAILED: {exc}", file=sys.stderr, flush=True)
                        continue
                    rates[r.name, b.name].append(res.rate)
                    split = "/".join(map(str, res.split))
                    print(
                        f"{tag} {res.rate:>8,.0f} msg/s ({s.count} in {res.seconds:.2f}s, "
                        f"start->first {res.startup:.2f}s; ack tail {res.ack_tail * 1000:.0f} ms; "
                        f"per process {split}; CPU {res.cpu * 1e6:.0f} us/msg; "
                        "queue drained, all acked)",
                        file=sys.stderr,
                        flush=True,
                    )
    print_table(runners, chosen_brokers, rates=rates, skipped=skipped, s=s, reps=args.repeats)


if __name__ == "__main__":
    main()
