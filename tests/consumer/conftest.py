"""Shared helpers for the consumer runtime's tests: real brokers, real processes.

Integration tests fail (never skip) when a broker is down. Every test uses its own queue
names and deletes them afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import uuid

import amqp.exceptions
import pytest
import redis as redis_lib
from kombu import Connection

from consumerd.consumer.broker import connect
from tests.helpers import catches, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

# A test app whose behaviour is driven by environment variables, so one module covers
# every scenario. Each handled message appends one line to $T_OUT:
#   pid queue id attempt redelivered start end
APP_SOURCE = """
import faulthandler, json, logging, os, signal, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks on demand when debugging
import consumerd

CONFIG = json.load(open(os.environ["T_CONFIG"]))
app = consumerd.App("t", max_retries=CONFIG.get("retries", 2),
                    retry_delay=CONFIG.get("delay", 0.2))
OUT = os.environ["T_OUT"]
# "log": true makes handlers log as they begin and end (the JSON log context tests).
LOG = logging.getLogger("tapp") if CONFIG.get("log") else None

def write(line):
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)

def begin(body, message):
    # "pid queue id started" (4 fields) as the handler begins: tests can wait on it.
    write(f"{os.getpid()} {message.queue} {body['i']} started\\n")
    if LOG:
        LOG.info("handling %s", body["i"])
    return time.time()

def meet(count):
    # Hold the handler until ``count`` handlers have begun: they run at the same time.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(OUT) as f:
            if sum(line.endswith(" started\\n") for line in f) >= count:
                return
        time.sleep(0.01)
    raise RuntimeError(f"{count} handlers never ran at once")

def end(body, message, start):
    failing = body.get("fail_until", 0) >= message.attempt
    if LOG:
        LOG.info("handled %s", body["i"])
    # A failed attempt is an 8-field line ("failed" last); read_records skips it.
    write(f"{os.getpid()} {message.queue} {body['i']} {message.attempt} "
          f"{int(message.redelivered)} {start:.6f} {time.time():.6f}"
          f"{' failed' if failing else ''}\\n")
    if failing:
        raise RuntimeError(f"boom at attempt {message.attempt}")

def make(sleep, is_async):
    if is_async:  # the same, as a coroutine on the worker's event loop
        import asyncio

        async def handle_async(body, message):
            start = begin(body, message)
            if sleep:
                await asyncio.sleep(sleep)
            end(body, message, start)
        return handle_async

    def handle(body, message):
        start = begin(body, message)
        if sleep:
            time.sleep(sleep)
        if CONFIG.get("meet"):
            meet(CONFIG["meet"])
        end(body, message, start)
    return handle

for c in CONFIG["consumers"]:
    app.consumer(c["name"], prefetch=c.get("prefetch"), partitions=c.get("partitions"),
                 concurrency=c.get("concurrency"))(make(c.get("sleep", 0), c.get("async")))
"""


@dataclasses.dataclass
class Record:
    pid: int
    queue: str
    id: int
    attempt: int
    redelivered: bool
    start: float
    end: float


def read_records(path: str, failed: bool = False) -> list[Record]:
    """The handled messages (or, with ``failed``, the attempts that raised)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == (8 if failed else 7):
                out.append(
                    Record(
                        int(parts[0]),
                        parts[1],
                        int(parts[2]),
                        int(parts[3]),
                        parts[4] == "1",
                        float(parts[5]),
                        float(parts[6]),
                    )
                )
    return out


def check_broker(url: str) -> None:
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:
        pytest.fail(f"broker {url} is down: {exc}")


def rabbit_unacked() -> dict[str, int]:
    """Unacked messages per queue on the local RabbitMQ, as the broker counts them
    (rabbitmqctl: AMQP itself cannot tell); any error fails the test."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "messages_unacknowledged",
         "--no-table-headers", "-q"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows = [line.split("\t") for line in listed.splitlines() if line.strip()]
    return {queue: int(count) for queue, count in rows}


class Broker:
    """One real broker: queue inspection and clean-up by name.

    On Redis every test gets its own kombu ``global_keyprefix``, so the ``unacked``
    bookkeeping it counts (and deletes) is its own even while other suites run."""

    def __init__(self, kind: str, url: str, prefix: str = "", name: str = "") -> None:
        self.kind = kind
        self.name = name
        self.prefix = prefix
        self.url = f"{url}?global_keyprefix={prefix}" if prefix else url
        self.created: set[str] = set()

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url.split("?")[0])

    def consumer_url(self, port: int | None = None, **options) -> str:
        """This broker's URL, through ``port`` if given, with ``options`` added."""
        base = REDIS_URL if self.kind == "redis" else AMQP_URL
        if port is not None:
            base = base.replace(":6379/", f":{port}/").replace(":5672/", f":{port}/")
        if self.prefix:
            options["global_keyprefix"] = self.prefix
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"{base}?{query}" if query else base

    def _sqlite_count(self, where: str, *args: str) -> int:
        """Rows of the embedded broker's database matching ``where``."""
        from consumerd.consumer.transport.store import database_path

        path = database_path(self.url)
        if not os.path.exists(path):
            return 0
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            return int(
                db.execute(f"SELECT count(*) FROM messages WHERE {where}", args).fetchone()[0]
            )

    def depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (not counting unacked ones); 0 if it does not exist.
        Any other error fails the test: a broken probe must not read as "nothing left"."""
        if self.kind == "sqlite":
            return self._sqlite_count("owner IS NULL AND queue = ?", queue)
        if self.kind == "redis":
            return int(self.client().llen(self.prefix + queue))
        with connect(self.url) as conn:
            try:
                return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
            except amqp.exceptions.NotFound:
                return 0

    def unacked(self) -> int:
        """Messages of this test delivered to some consumer and not acked yet: Redis's
        ``unacked`` hash under the test's key prefix; on RabbitMQ, the broker's own count
        over the test's queues (rabbitmqctl: AMQP itself cannot tell)."""
        if self.kind == "sqlite":  # claimed by a consumer, not deleted by an ack yet
            return self._sqlite_count("owner IS NOT NULL")
        if self.kind == "redis":
            return int(self.client().hlen(self.prefix + "unacked"))
        assert self.name, "unacked() on RabbitMQ needs the test's queue name prefix"
        counts = rabbit_unacked()
        return sum(count for queue, count in counts.items() if queue.startswith(self.name))

    def publish_raw(self, queue: str, body: bytes, content_type: str, headers=None) -> None:
        from consumerd.consumer.app import declare_queue

        self.created.add(queue)
        with connect(self.url) as conn:
            conn.Producer().publish(
                body,
                exchange="",
                routing_key=queue,
                content_type=content_type,
                content_encoding="binary",
                headers=headers,
                declare=[declare_queue(queue)],
            )

    def get(self, queue: str):
        """Take one message off ``queue`` (acked), or None."""
        with connect(self.url) as conn:
            message = conn.SimpleQueue(queue, no_ack=True).queue.get(no_ack=True)
            return message

    def cleanup(self, names: list[str]) -> None:
        if self.kind == "sqlite":
            return  # the database lives in the test's own directory
        if self.kind == "redis":
            client = self.client()
            keys = list(client.scan_iter(match=self.prefix + "*")) if self.prefix else []
            if keys:
                client.delete(*keys)
            return
        with connect(self.url) as conn:
            for name in names:
                for suffix in ("", ".retry", ".dlq", *(f".p{p}" for p in range(16))):
                    with contextlib.suppress(Exception):
                        conn.default_channel.queue_delete(name + suffix)


@pytest.fixture(params=["redis", "amqp"])
def broker(request, name):
    url = REDIS_URL if request.param == "redis" else AMQP_URL
    check_broker(url)
    return Broker(request.param, url, f"{name}:" if request.param == "redis" else "", name)


@pytest.fixture
def name():
    return f"t{uuid.uuid4().hex[:10]}"


class Consumerd:
    """A ``consumerd`` master process running the test app, with its output captured."""

    def __init__(self, tmp_path, name: str, url: str | None) -> None:
        self.tmp = tmp_path
        self.name = name
        self.url = url
        self.out = str(tmp_path / "out.txt")
        self.log = str(tmp_path / "consumerd.log")
        self.config = str(tmp_path / "config.json")
        (tmp_path / "tapp.py").write_text(textwrap.dedent(APP_SOURCE))
        self.proc: subprocess.Popen | None = None

    def configure(self, consumers, **extra) -> None:
        import json

        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"consumers": consumers, **extra}, f)
        os.replace(tmp, self.config)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONPATH=f"{ROOT}:{self.tmp}", T_OUT=self.out, T_CONFIG=self.config)
        env.pop("CONSUMERD_BROKER", None)
        return env

    def cli(self, *args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "consumerd.cli", *args],
            cwd=self.tmp,
            env={**self.env(), **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(
        self, *args: str, workers: int | None = 2, url: str | None = None, cwd: str | None = None
    ) -> None:
        """``workers=None`` leaves the count to the environment or a --config file;
        ``cwd`` (default: the test's directory) is also given as $PWD, as a shell does."""
        self.logf = open(self.log, "ab")  # noqa: SIM115 - the child writes to it
        url = url or self.url
        broker = ["--broker", url] if url else []  # none: the embedded default
        count = ["--workers", str(workers)] if workers is not None else []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "consumerd.cli",
                "--app",
                "tapp",
                *broker,
                *count,
                "--log-level",
                "INFO",
                *args,
            ],
            cwd=cwd or self.tmp,
            env={**self.env(), "PWD": str(cwd or self.tmp)},
            stdout=self.logf,
            stderr=subprocess.STDOUT,
        )

    def workers(self) -> list[int]:
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return []

    def wait_workers(self, count: int, timeout: float = 15) -> list[int]:
        return wait_for(
            lambda: len(self.workers()) == count and self.workers(), timeout, f"{count} workers"
        )

    def logged(self, text: str) -> int:
        with open(self.log, errors="replace") as f:
            return f.read().count(text)

    def wait_logged(self, text: str, count: int = 1, timeout: float = 15) -> None:
        wait_for(lambda: self.logged(text) >= count, timeout, f"{count}x {text!r} in the log")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT):  # never caught
            wait_for(lambda: catches(self.proc.pid, sig), 30, f"the master to catch {sig}")
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.workers():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(5)

    def records(self) -> list[Record]:
        return read_records(self.out)

    def failures(self) -> list[Record]:
        return read_records(self.out, failed=True)

    def started(self) -> list[int]:
        """The ids whose handler began, in order (a retry counts again)."""
        if not os.path.exists(self.out):
            return []
        with open(self.out) as f:
            return [int(p[2]) for p in map(str.split, f) if len(p) == 4 and p[3] == "started"]

    def ids(self) -> collections.Counter[int]:
        return collections.Counter(r.id for r in self.records())


@pytest.fixture
def consumerd(tmp_path, name, broker):
    c = Consumerd(tmp_path, name, broker.url)
    yield c
    c.kill()
    broker.cleanup([name])


def publish_many(
    url: str,
    name: str,
    count: int,
    partitions: int | None = None,
    start: int = 0,
    *,
    keys: int = 97,
    **fields,
) -> None:
    """Publish ``count`` messages ``{"i": n}`` through the App's own routing, confirmed
    (``App.publish_many``); partitioned, message n has the key ``k{n % keys}``."""
    import consumerd
    from consumerd.consumer.app import Message

    app = consumerd.App("publisher")
    if partitions:
        app.consumer(name, partitions=partitions)(lambda body, message: None)
    app.configure(broker_url=url)
    try:
        sent = app.publish_many(
            name,
            (
                Message({"i": i, **fields}, key=f"k{i % keys}" if partitions else None)
                for i in range(start, start + count)
            ),
        )
        assert sent == count
    finally:
        app.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """A TCP proxy to a broker that the test can cut: every connection dropped at once,
    and new ones refused until :meth:`resume` — a broker flap without touching the broker."""

    def __init__(self, upstream_port: int) -> None:
        import threading

        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.accepted = 0
        self.frozen: set[socket.socket] = set()

    def resume(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                if self.listener is not listener:  # cut while we were connecting
                    client.close()
                    upstream.close()
                    return
                self.conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def freeze(self) -> None:
        """Stop forwarding on every open connection without closing any (a peer gone
        silent: a host powered off, a NAT entry dropped); new connections still work."""
        with self.lock:
            self.frozen.update(self.conns)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if src not in self.frozen:
                    dst.sendall(data)
        except OSError:
            pass
        if src in self.frozen or dst in self.frozen:
            return  # silent: not even the other side's close gets through
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        with self.lock:
            if self.listener is not None:
                # shutdown() first: it wakes the accept() blocked on it, which a bare
                # close() does not, and the port would stay taken until a client came
                with contextlib.suppress(OSError):
                    self.listener.shutdown(socket.SHUT_RDWR)
                self.listener.close()
                self.listener = None
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                # linger 0: a reset, as from a crashed broker host; shutdown() first so
                # the pump thread blocked in recv() lets go of the socket at once
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def proxy(broker):
    p = Proxy(5672 if broker.kind == "amqp" else 6379)
    yield p
    p.cut()


class RedisServer:
    """A redis-server of our own, append-only, on a free port, restartable with its data."""

    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis(port=self.port)

        def up():
            try:
                return client.ping()
            except redis_lib.ConnectionError:
                return False

        wait_for(up, 10, "redis-server up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                redis_lib.Redis(port=self.port).shutdown(save=False)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


RABBITMQ_BIN = os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin")
"""Where rabbitmq-server itself is: /usr/sbin's wrapper switches to the rabbitmq user,
whose home (and Erlang cookie) is not this node's."""


class RabbitServer:
    """A RabbitMQ node of our own (its own name, ports, cookie and state in a temp dir, no
    plugins): a broker a test may restart, where the machine's one serves everybody.

    It is driven with ``erl_call`` (a small C client): rabbitmqctl boots an Erlang VM per
    command, which took 16-24 s a command on this 2-core machine under a soak's load
    (the node itself stopped in 30 ms)."""

    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path / "rabbitmq"
        home = self.dir / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"  # our own; erl_call reads it from $HOME
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        self.port = free_port()
        self.node = f"consumerd{uuid.uuid4().hex[:8]}@localhost"
        config, plugins, env_file = (
            self.dir / name for name in ("rabbitmq.conf", "enabled_plugins", "env.conf")
        )
        config.write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        plugins.write_text("[].\n")
        env_file.write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf (the machine's node)
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 120) -> None:
        """Boot the node (11-22 s here) and wait until it takes AMQP connections."""
        server = os.path.join(RABBITMQ_BIN, "rabbitmq-server")
        assert os.path.exists(server), f"{server} not found (set $RABBITMQ_BIN)"
        with open(self.dir / "server.out", "ab") as out:
            self.proc = subprocess.Popen(
                [server], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() may end it whole
            )  # fmt: skip
        self.wait_up(timeout)

    def wait_up(self, timeout: float = 60) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited: {self.log_tail()}")
            try:
                with Connection(self.url, connect_timeout=2) as conn:
                    conn.connect()
                return True
            except Exception:
                return False

        try:
            wait_for(up, timeout, f"RabbitMQ node {self.node} up", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.log_tail()}") from None

    def log_tail(self) -> str:
        logs = [*sorted((self.dir / "log").glob("*.log")), self.dir / "server.out"]
        return " | ".join(p.read_text(errors="replace")[-1500:] for p in logs if p.exists())

    def call(self, module: str, function: str, timeout: float = 60) -> str:
        """``module:function()`` on the node; its result as Erlang prints it."""
        erl_call = shutil.which("erl_call") or "/usr/lib/erlang/bin/erl_call"
        return subprocess.run(
            [erl_call, "-n", self.node, "-a", f"{module} {function}"],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=True,
        ).stdout.strip()  # fmt: skip

    def restart(self) -> None:
        """Stop the RabbitMQ application and start it again (``rabbitmqctl stop_app`` /
        ``start_app``; the Erlang VM stays): every connection is closed, exclusive queues
        are deleted, durable ones are recovered from disk with their persistent messages."""
        assert self.call("rabbit", "stop") == "ok"
        assert self.call("rabbit", "start") == "ok"
        self.wait_up()

    def consumers(self, queue: str) -> int | None:
        """Consumers of ``queue``, None if it does not exist. A queue exclusive to another
        connection exists but will not say: 0."""
        with Connection(self.url, connect_timeout=5) as conn:
            try:
                return int(conn.channel().queue_declare(queue, passive=True).consumer_count)
            except amqp.exceptions.NotFound:
                return None
            except amqp.exceptions.ResourceLocked:
                return 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.call("init", "stop", timeout=30)  # the whole VM
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
