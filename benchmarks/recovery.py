"""How soon a crashed consumer's messages are handled again on Redis: consumerd vs Dramatiq
vs Celery (acks_late), each on its defaults, same run, medians of ``--repeats``.

Per runner and scenario, in a fresh queue on ``redis://127.0.0.1:6379/<--db>``:

1. ``--messages`` (8, what every runner's one process takes on its defaults) are
   published, then instance A (the victim, one worker process) starts; its handler
   blocks until it is killed, so A holds all of them (the ready list is empty);
2. instance B (one worker process, a handler that returns at once) starts and is ready;
3. the benchmark SIGKILLs
   - *worker*: A's process holding the messages (consumerd: its worker, whose master
     respawns it; Dramatiq: its worker process, after which Dramatiq's main process stops
     the instance; Celery: the main process, which holds the prefetched messages);
   - *host*: A's whole process tree at once. A runs as PID 1 of its own pid namespace
     (``unshare``, root only), so its pids mean nothing to B (as on another host) and one
     SIGKILL of its PID 1 kills every process in it (as a lost host or a deleted pod);
4. it measures the time from the kill until the last of A's messages was handled again
   (by anyone), or reports "> cap" after ``--cap`` seconds (Celery's visibility timeout
   is an hour; Dramatiq's heartbeat timeout is 60 s and its requeue runs on 0.1 % of
   broker commands).

    python benchmarks/recovery.py                      # 3 runners x 2 scenarios x 3, ~15 min
    python benchmarks/recovery.py --runners consumerd --repeats 1

Queue names are unique per run; each run's keys are deleted after it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing
import uuid

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = ("consumerd", "dramatiq", "celery")
READY = {"consumerd": "consuming", "dramatiq": "is ready for action", "celery": " ready."}


def command(runner: str, name: str) -> list[str]:
    py = sys.executable
    if runner == "consumerd":
        return [
            py,
            "-m",
            "consumerd.cli",
            "--app",
            "benchmarks.peers.recovery_app:app",
            "--workers",
            "1",
            "--log-level",
            "INFO",
        ]
    if runner == "dramatiq":
        return [py, "-m", "dramatiq", "benchmarks.peers.recovery_app", "--processes", "1"]
    return [
        py,
        "-m",
        "celery",
        "-A",
        "benchmarks.peers.recovery_app",
        "worker",
        "-l",
        "INFO",
        "-n",
        f"{name}@%h",
    ]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def tree(pid: int) -> list[int]:
    out = [pid]
    for child in children(pid):
        out += tree(child)
    return out


class Instance:
    def __init__(
        self, runner: str, name: str, tmp: str, env: dict[str, str], own_namespace: bool
    ) -> None:
        self.runner = runner
        self.log = os.path.join(tmp, f"{name}.log")
        argv = command(runner, name)
        if own_namespace:
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.own_namespace = own_namespace

    @property
    def main(self) -> int:
        """The runner's main process (inside the namespace: its PID 1, seen from here)."""
        if not self.own_namespace:
            return self.proc.pid
        kids = children(self.proc.pid)
        return kids[0] if kids else self.proc.pid

    def ready(self) -> bool:
        with open(self.log, errors="replace") as f:
            return READY[self.runner] in f.read()

    def holder_pid(self) -> int:
        """The process that holds the prefetched messages."""
        if self.runner == "celery":
            return self.main
        return children(self.main)[0]

    def kill(self) -> None:
        for pid in reversed(tree(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # orphans (Celery's pool processes)
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def wait_for(
    condition: typing.Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def handled(out: str) -> list[tuple[int, float]]:
    if not os.path.exists(out):
        return []
    with open(out) as f:
        return [(int(i), float(t)) for i, t, _pid in (line.split() for line in f if line.strip())]


def ready_depth(r: redis.Redis, runner: str, queue: str) -> int:
    if runner == "dramatiq":
        return int(r.llen(f"{queue}:{queue}"))
    return sum(int(r.llen(k)) for k in (queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9))))


def cleanup(r: redis.Redis, queue: str) -> None:
    keys = list(r.scan_iter(match=f"*{queue}*"))
    if keys:
        r.delete(*keys)
    # kombu's shared unacked hash (Celery's held messages stay there for an hour).
    for tag, value in r.hscan_iter("unacked"):
        with contextlib.suppress(ValueError, IndexError):
            if json.loads(value)[2] == queue:
                r.hdel("unacked", tag)
                r.zrem("unacked_index", tag)


def run_once(runner: str, scenario: str, args: argparse.Namespace) -> float | None:
    """Seconds from the kill to the last held message handled again; None: over the cap."""
    queue = f"rec-{runner}-{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:6379/{args.db}"
    r = redis.Redis.from_url(url)
    tmp = tempfile.mkdtemp(prefix="recovery-")
    out, flag = os.path.join(tmp, "out"), os.path.join(tmp, "flag")
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "BENCH_RUNNER": runner,
        "BENCH_BROKER_URL": url,
        "BENCH_QUEUE": queue,
        "BENCH_OUT": out,
        "BENCH_FLAG": flag,
    }
    env.pop("CONSUMERD_BROKER", None)
    a = b = None
    try:
        # Published first, so A's first fetch takes them all (an idle consumer that
        # fetched one message and blocks in its handler would fetch no more).
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from benchmarks.peers import recovery_app; recovery_app.fill({args.messages})",
            ],
            env=env,
            cwd=ROOT,
            check=True,
            timeout=60,
        )
        a = Instance(runner, "a", tmp, {**env, "BENCH_HOLD": "1"}, scenario == "host")
        wait_for(a.ready, 60, "A ready")
        wait_for(lambda: ready_depth(r, runner, queue) == 0, 30, "A to take every message")
        time.sleep(0.5)  # let A settle with what it holds
        b = Instance(runner, "b", tmp, env, False)
        wait_for(b.ready, 60, "B ready")
        time.sleep(1.0)
        victim = a.holder_pid() if scenario == "worker" else a.main
        open(flag, "w").close()
        os.kill(victim, signal.SIGKILL)
        killed = time.time()

        def again() -> dict[int, float]:
            firsts: dict[int, float] = {}
            for i, t in handled(out):
                if t >= killed:
                    firsts.setdefault(i, t)
            return firsts

        deadline = time.monotonic() + args.cap
        while time.monotonic() < deadline and len(again()) < args.messages:
            time.sleep(0.05)
        done = again()
        if len(done) < args.messages:
            return None
        return max(done.values()) - killed
    finally:
        for inst in (a, b):
            if inst is not None:
                inst.kill()
        cleanup(r, queue)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--scenarios", default="worker,host")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cap", type=float, default=75.0, help="seconds to wait at most (75)")
    p.add_argument("--messages", type=int, default=8, help="messages the victim holds (8)")
    p.add_argument("--db", type=int, default=11, help="Redis database (11)")
    p.add_argument("--keep", action="store_true", help="keep each run's temp dir (logs)")
    args = p.parse_args()
    if "host" in args.scenarios and (shutil.which("unshare") is None or os.geteuid() != 0):
        sys.exit("the host scenario needs unshare(1) and root (a pid namespace)")
    results: dict[tuple[str, str], list[float | None]] = {}
    for _ in range(args.repeats):  # interleaved, so load drifts hit every runner alike
        for runner in args.runners.split(","):
            for scenario in args.scenarios.split(","):
                value = run_once(runner, scenario, args)
                results.setdefault((runner, scenario), []).append(value)
                shown = "> cap" if value is None else f"{value:.2f} s"
                print(f"{runner:10} {scenario:7} {shown}", file=sys.stderr, flush=True)

    def median(values: list[float | None]) -> str:
        capped = [v if v is not None else float("inf") for v in values]
        m = statistics.median(capped)
        return f"> {args.cap:.0f} s" if m == float("inf") else f"{m:.2f} s"

    def each(values: list[float | None]) -> str:
        return ", ".join("cap" if v is None else f"{v:.2f}" for v in values)

    print(
        f"\nSIGKILL → last of the {args.messages} held messages handled again "
        f"(Redis, defaults, median of {args.repeats}; cap {args.cap:.0f} s)\n"
    )
    print("| runner | worker SIGKILL | runs | whole host SIGKILL | runs |")
    print("|---|---:|---|---:|---|")
    for runner in args.runners.split(","):
        cells = []
        for scenario in ("worker", "host"):
            values = results.get((runner, scenario))
            cells += [median(values), each(values)] if values else ["-", ""]
        print(f"| {runner} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
