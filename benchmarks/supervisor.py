"""Supervision core, consumerd vs cotyledon 2.2, side by side on the same run.

Each implementation runs the same master (benchmarks/_sup_target.py) with N idle workers
whose ``run()`` announces itself on a pipe with its own CLOCK_MONOTONIC stamp. Per run and
implementation, two masters are started:

* session A: start -> N workers running; master (and workers) CPU over the idle window;
  SIGKILL of each worker once (each at least ``--min-age`` s old, because consumerd
  treats a worker dying within ~1 s of its start as a failed start and backs off) ->
  replacement's ``run()``; SIGTERM of the master -> its exit seen through waitpid.
* session B: start -> N workers running; SIGKILL of the master -> every worker gone.

Exits are observed through pidfds (readable exactly when waitpid would return). Figures
are medians over all samples, with min-max. Implementations alternate within each run so
that background load hits both alike; one unmeasured start and stop of each warms the
bytecode and page caches first. The benchmark makes itself a child subreaper so orphaned
workers are reparented to it (and reaped) rather than to PID 1.

    python benchmarks/supervisor.py                 # both, 5 runs
    python benchmarks/supervisor.py --impl cotyledon --runs 3
    python benchmarks/supervisor.py --quick         # smoke run: 1 run, short idle window
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

IMPLS = ("cotyledon", "consumerd")
REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "benchmarks" / "_sup_target.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36

START_TIMEOUT = 30.0  # imports on a loaded 2-core machine can be slow
RESPAWN_TIMEOUT = 15.0  # longer than cotyledon's 5 s "forking too fast" sleep
EXIT_TIMEOUT = 15.0
SETTLE = 0.5  # after the last worker announced, before the idle window starts


class BenchError(Exception):
    """A session did not behave as expected (timeout, early exit, ...)."""


class BudgetExceeded(Exception):
    """The whole benchmark ran out of time; unlike BenchError this ends every session."""


@dataclasses.dataclass
class Samples:
    start_s: list[float] = dataclasses.field(default_factory=list)
    respawn_ms: list[float] = dataclasses.field(default_factory=list)
    first_respawn_ms: list[float] = dataclasses.field(default_factory=list)
    sigterm_ms: list[float] = dataclasses.field(default_factory=list)
    orphan_ms: list[float] = dataclasses.field(default_factory=list)
    # CPU figures do not depend on what else the machine runs, unlike the latencies.
    start_cpu_ms: list[float] = dataclasses.field(default_factory=list)
    orphan_cpu_us: list[float] = dataclasses.field(default_factory=list)
    master_ticks: list[float] = dataclasses.field(default_factory=list)
    worker_ticks: list[float] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


def now_ns() -> int:
    return time.monotonic_ns()


def ms_since(t0_ns: int, t1_ns: int) -> float:
    return (t1_ns - t0_ns) / 1e6


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces; everything after ")" is fixed.
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def thread_cpu_ns(pid: int) -> int:
    """CPU time of all live threads of ``pid``, in ns (/proc schedstat; ticks are too coarse)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def wait_readable(fds: list[int], deadline: float) -> list[int]:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return []
    ready, _, _ = select.select(fds, [], [], remaining)
    return ready


def target_env(tmp: Path) -> dict[str, str]:
    """The masters' environment: this checkout first on the path, and bytecode caching on.

    cotyledon was byte-compiled when pip installed it; consumerd here is a source tree, and
    with PYTHONDONTWRITEBYTECODE set (as on the dev machine) it would be compiled on every
    start. A private pycache (filled by the warm-up) puts both on the footing of an
    installed package without writing __pycache__ into the checkout.
    """
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Master:
    """One supervisor under test, the pipe its workers announce on, and pidfds for all."""

    def __init__(self, impl: str, workers: int, work_dir: Path) -> None:
        self.impl = impl
        self.n_workers = workers
        self.log_path = work_dir / f"{impl}-{now_ns()}.log"
        self.current: dict[int, int] = {}  # worker_id -> pid of its live process
        self.started_ns: dict[int, int] = {}  # pid -> when its run() began
        # pidfds are opened as soon as a pid is announced: signalling or polling through
        # them can never hit an unrelated process that reused the pid.
        self.pidfds: dict[int, int] = {}
        self._buf = b""
        read_fd, write_fd = os.pipe()
        self._read_fd = read_fd
        env = target_env(work_dir)
        with open(self.log_path, "wb") as log:
            self.t_start_ns = now_ns()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(TARGET),
                    "--impl",
                    impl,
                    "--workers",
                    str(workers),
                    "--fd",
                    str(write_fd),
                ],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        os.close(write_fd)
        self.pidfd = os.pidfd_open(self.proc.pid)

    def announcement(self, deadline: float) -> tuple[int, int, int]:
        """The next ``(pid, worker_id, run_started_ns)`` a worker wrote, or BenchError."""
        while b"\n" not in self._buf:
            if not wait_readable([self._read_fd], deadline):
                raise BenchError(f"{self.impl}: no worker announcement before the deadline")
            data = os.read(self._read_fd, 4096)
            if not data:
                raise BenchError(f"{self.impl}: announcement pipe closed (master and workers gone)")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        pid, worker_id, stamp = (int(x) for x in line.split())
        with contextlib.suppress(ProcessLookupError):
            self.pidfds[pid] = os.pidfd_open(pid)
        self.current[worker_id] = pid
        self.started_ns[pid] = stamp
        return pid, worker_id, stamp

    def drain_announcements(self) -> int:
        """Read announcements already written (respawns nobody asked for); return the count."""
        count = 0
        with contextlib.suppress(BenchError):
            while True:
                self.announcement(time.monotonic() + 0.001)
                count += 1
        return count

    def wait_all_running(self) -> float:
        """Seconds from just before Popen until the N-th distinct worker's run() began."""
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.current) < self.n_workers:
            self.announcement(deadline)
        return (max(self.started_ns[pid] for pid in self.current.values()) - self.t_start_ns) / 1e9

    def wait_min_age(self, min_age: float) -> None:
        youngest = max(self.started_ns[pid] for pid in self.current.values())
        remaining = min_age - (now_ns() - youngest) / 1e9
        if remaining > 0:
            time.sleep(remaining)

    def assert_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.impl}: master exited with {self.proc.returncode}")

    def close(self) -> None:
        """SIGKILL whatever is left, reap what is ours, close fds. Safe to call twice."""
        self._track_unannounced_children()
        for pidfd in [self.pidfd, *self.pidfds.values()]:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=EXIT_TIMEOUT)
        deadline = time.monotonic() + EXIT_TIMEOUT
        for pid, pidfd in self.pidfds.items():
            if wait_readable([pidfd], deadline):
                reap_if_ours(pid)
        for fd in [self.pidfd, self._read_fd, *self.pidfds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pidfds.clear()
        self.pidfd = self._read_fd = -1

    def _track_unannounced_children(self) -> None:
        """Add the master's children that never announced (stuck before run()) to pidfds."""
        if self.proc.poll() is not None:  # reaped: its pid may belong to someone else now
            return
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                    for pid in map(int, f.read().split()):
                        if pid not in self.pidfds:
                            self.pidfds[pid] = os.pidfd_open(pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + line for line in text[-lines:])


def reap_if_ours(pid: int) -> None:
    # Orphans reparented to us (we are a subreaper) must be reaped or they stay zombies.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def measure_respawns(master: Master, kills: int, min_age: float, samples: Samples) -> None:
    for i in range(kills):
        worker_id = i % master.n_workers
        old_pid = master.current[worker_id]
        age = (now_ns() - master.started_ns[old_pid]) / 1e9
        if age < min_age:
            time.sleep(min_age - age)
        master.assert_alive()
        t_kill = now_ns()
        signal.pidfd_send_signal(master.pidfds[old_pid], signal.SIGKILL)
        deadline = time.monotonic() + RESPAWN_TIMEOUT
        while True:
            pid, wid, stamp = master.announcement(deadline)
            if wid == worker_id and pid != old_pid:
                break
        samples.respawn_ms.append(ms_since(t_kill, stamp))
        if i == 0:
            samples.first_respawn_ms.append(samples.respawn_ms[-1])


def measure_sigterm(master: Master, samples: Samples) -> None:
    t_kill = now_ns()
    master.proc.send_signal(signal.SIGTERM)
    if not wait_readable([master.pidfd], time.monotonic() + EXIT_TIMEOUT):
        raise BenchError(f"{master.impl}: master still running {EXIT_TIMEOUT} s after SIGTERM")
    t_exit = now_ns()
    code = master.proc.wait(timeout=EXIT_TIMEOUT)
    samples.sigterm_ms.append(ms_since(t_kill, t_exit))
    if code != 0:
        samples.failures.append(f"{master.impl}: master exited {code} after SIGTERM (expected 0)")
    survivors = [pid for pid in master.current.values() if pid_alive(master.pidfds[pid])]
    if survivors:
        samples.failures.append(
            f"{master.impl}: workers {survivors} outlived the master's SIGTERM exit"
        )


def pid_alive(pidfd: int) -> bool:
    return not select.select([pidfd], [], [], 0)[0]


def measure_orphans(master: Master, samples: Samples) -> None:
    pending = {master.pidfds[pid]: pid for pid in master.current.values()}
    cpu_before = {pid: thread_cpu_ns(pid) for pid in pending.values()}
    deadline = time.monotonic() + EXIT_TIMEOUT
    t_kill = now_ns()
    signal.pidfd_send_signal(master.pidfd, signal.SIGKILL)
    t_last = t_kill
    while pending:
        ready = wait_readable(list(pending), deadline)
        if not ready:
            raise BenchError(
                f"{master.impl}: orphaned workers {sorted(pending.values())} "
                f"still alive {EXIT_TIMEOUT} s after the master's SIGKILL"
            )
        t_last = now_ns()
        for fd in ready:
            del pending[fd]
    samples.orphan_ms.append(ms_since(t_kill, t_last))
    master.proc.wait(timeout=EXIT_TIMEOUT)
    # With the master reaped, the workers' zombies are ours: their rusage covers all their
    # threads, so minus the CPU they had used before the kill it is the cost of exiting.
    for pid, before in cpu_before.items():
        with contextlib.suppress(ChildProcessError):
            reaped, _, usage = os.wait4(pid, os.WNOHANG)
            if reaped:
                used_us = (usage.ru_utime + usage.ru_stime) * 1e6 - before / 1e3
                samples.orphan_cpu_us.append(used_us)


def session_a(impl: str, args: argparse.Namespace, work_dir: Path, samples: Samples) -> str:
    master = Master(impl, args.workers, work_dir)
    try:
        samples.start_s.append(master.wait_all_running())
        samples.start_cpu_ms.append(thread_cpu_ns(master.proc.pid) / 1e6)
        time.sleep(SETTLE)
        master.assert_alive()
        workers = list(master.current.values())
        m0, w0 = cpu_ticks(master.proc.pid), sum(cpu_ticks(p) for p in workers)
        time.sleep(args.idle_seconds)  # the measurement window itself
        master.assert_alive()
        m1, w1 = cpu_ticks(master.proc.pid), sum(cpu_ticks(p) for p in workers)
        samples.master_ticks.append(m1 - m0)
        samples.worker_ticks.append(w1 - w0)
        if spurious := master.drain_announcements():
            samples.failures.append(f"{impl}: {spurious} worker(s) restarted while idle")
        measure_respawns(master, args.kills, args.min_age, samples)
        master.wait_min_age(args.min_age)
        master.assert_alive()
        measure_sigterm(master, samples)
        respawns = [round(ms, 1) for ms in samples.respawn_ms[-args.kills :]]
        return (
            f"start {samples.start_s[-1]:.3f} s, idle ticks {samples.master_ticks[-1]:g}, "
            f"respawn {respawns} ms, SIGTERM {samples.sigterm_ms[-1]:.1f} ms"
        )
    except BenchError:
        print(master.log_tail(), file=sys.stderr)
        raise
    finally:
        master.close()


def warm_up(impl: str, args: argparse.Namespace, work_dir: Path, samples: Samples) -> None:
    """One unmeasured start and stop: fills the pycache and the page cache."""
    master = Master(impl, args.workers, work_dir)
    try:
        master.wait_all_running()
        measure_sigterm(master, Samples())
    except BenchError as exc:
        samples.failures.append(f"warm-up: {exc}")
        print(f"{impl} warm-up FAILED: {exc}\n{master.log_tail()}", file=sys.stderr)
    finally:
        master.close()


def session_b(impl: str, args: argparse.Namespace, work_dir: Path, samples: Samples) -> str:
    master = Master(impl, args.workers, work_dir)
    try:
        samples.start_s.append(master.wait_all_running())
        samples.start_cpu_ms.append(thread_cpu_ns(master.proc.pid) / 1e6)
        master.wait_min_age(args.min_age)
        master.assert_alive()
        measure_orphans(master, samples)
        return f"start {samples.start_s[-1]:.3f} s, orphans {samples.orphan_ms[-1]:.1f} ms"
    except BenchError:
        print(master.log_tail(), file=sys.stderr)
        raise
    finally:
        master.close()


@contextlib.contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    """Bound the whole benchmark: SIGALRM raises, and every ``finally`` cleans up."""

    def expire(signum: int, frame: types.FrameType | None) -> None:
        raise BudgetExceeded(f"benchmark exceeded its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "n/a"
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "n/a"
    ma, mb = statistics.median(a), statistics.median(b)
    if mb == 0:
        return "=" if ma == 0 else "inf"
    return f"{ma / mb:.2f}x"


def print_table(results: dict[str, Samples], args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, int, float]] = [
        (f"start -> {args.workers} workers running (s)", "start_s", 3, 1),
        ("respawn after worker SIGKILL (ms)", "respawn_ms", 1, 1),
        # cotyledon sleeps wait_interval (10 ms) before a fork only while it has made no
        # more forks than it has workers, i.e. before the first respawn of each master.
        ("  of which first kill per master (ms)", "first_respawn_ms", 1, 1),
        ("master SIGTERM -> exit (ms)", "sigterm_ms", 1, 1),
        ("master SIGKILL -> all workers gone (ms)", "orphan_ms", 1, 1),
        (f"master CPU until {args.workers} workers run (ms)", "start_cpu_ms", 1, 1),
        ("worker CPU from master SIGKILL to exit (us, each)", "orphan_cpu_us", 0, 1),
        (f"master CPU over {args.idle_seconds:g} s idle (ticks)", "master_ticks", 1, 1),
        (f"master CPU over {args.idle_seconds:g} s idle (s)", "master_ticks", 3, 1 / CLK_TCK),
        (f"{args.workers} workers' CPU over idle (ticks, sum)", "worker_ticks", 1, 1),
    ]
    impls = list(results)
    header = ["figure", *(f"{impl} median (min-max)" for impl in impls)]
    if len(impls) == 2:
        header.append(f"{impls[1]}/{impls[0]}")
    table = [header]
    for label, attr, digits, scale in rows:
        cols = [[v * scale for v in getattr(results[impl], attr)] for impl in impls]
        row = [label, *(fmt(c, digits) for c in cols)]
        if len(impls) == 2:
            row.append(ratio(cols[1], cols[0]))
        table.append(row)
    counts = [
        f"{impl}: {len(results[impl].start_s)} starts, {len(results[impl].respawn_ms)} respawns"
        for impl in impls
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print()
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"\nsamples: {'; '.join(counts)}; CLK_TCK={CLK_TCK}; "
        f"load average {os.getloadavg()[0]:.2f} at end"
    )
    for impl in impls:
        for failure in results[impl].failures:
            print(f"FAILURE {failure}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", choices=(*IMPLS, "both"), default="both")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--kills", type=int, default=None, help="worker SIGKILLs per run (default: one per worker)"
    )
    parser.add_argument(
        "--min-age", type=float, default=2.0, help="seconds a worker runs before it is killed"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run, 5 s idle, 2 kills")
    parser.add_argument("--verbose", action="store_true", help="print every sample as it is taken")
    args = parser.parse_args()
    if args.quick:
        # Not shorter than 5 s idle: killing sooner after the start would trip cotyledon's
        # "more than N forks within N s" guard (a 5 s sleep), which is not respawn latency.
        args.runs, args.idle_seconds, args.kills = 1, 5.0, args.kills or 2
    if args.kills is None:
        args.kills = args.workers
    return args


def main() -> int:
    args = parse_args()
    impls = IMPLS if args.impl == "both" else (args.impl,)
    results = {impl: Samples() for impl in impls}
    become_subreaper()
    per_session = (
        START_TIMEOUT
        + args.idle_seconds
        + args.kills * (args.min_age + RESPAWN_TIMEOUT)
        + 3 * EXIT_TIMEOUT
    )
    budget = int(args.runs * len(impls) * 2 * per_session)
    try:
        run_all(args, impls, budget, results)
    except BudgetExceeded as exc:
        print(f"ABORTED: {exc}; the table holds the samples taken so far", file=sys.stderr)
        results[impls[0]].failures.append(str(exc))
    print_table(results, args)
    return 1 if any(s.failures for s in results.values()) else 0


def run_all(
    args: argparse.Namespace, impls: tuple[str, ...], budget: int, results: dict[str, Samples]
) -> None:
    with watchdog(budget), tempfile.TemporaryDirectory(prefix="sup-bench-") as tmp:
        for impl in impls:
            warm_up(impl, args, Path(tmp), results[impl])
        for run in range(args.runs):
            # Alternate which side goes first so drifting background load hits both alike.
            for impl in impls if run % 2 == 0 else impls[::-1]:
                for session in (session_a, session_b):
                    try:
                        summary = session(impl, args, Path(tmp), results[impl])
                    except BenchError as exc:
                        results[impl].failures.append(f"run {run + 1} {session.__name__}: {exc}")
                        print(
                            f"run {run + 1} {impl} {session.__name__} FAILED: {exc}",
                            file=sys.stderr,
                        )
                        continue
                    if args.verbose:
                        print(
                            f"run {run + 1} {impl} {session.__name__}: {summary}", file=sys.stderr
                        )


if __name__ == "__main__":
    sys.exit(main())
