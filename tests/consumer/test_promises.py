"""README promises of the consumer runtime that had no test (issue #14), each on a real
``consumerd`` with real brokers (Redis, RabbitMQ and, where it applies, the embedded
SQLite broker), real signals, and messages counted in and out.

The test app here records, for each message, a JSON line when its handler starts and one
when it is done, with the worker's pid, the queue and the message's headers; a consumer
declared with ``"gate": true`` holds its handler until the test creates ``<out>.gate``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import amqp.exceptions
import kombu
import pytest

from consumerd.consumer.broker import connect
from tests.consumer.conftest import (
    AMQP_URL,
    REDIS_URL,
    ROOT,
    Broker,
    Consumerd,
    check_broker,
    publish_many,
)
from tests.helpers import pid_alive, wait_for

APP = """
import json, os, time
import consumerd

CONFIG = json.load(open(os.environ["T_CONFIG"]))
app = consumerd.App("p", max_retries=2, retry_delay=0.1)
OUT = os.environ["T_OUT"]


def write(row):
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps(row) + "\\n").encode())
    os.close(fd)


def make(c):
    def handle(body, message):
        headers = {str(k): str(v) for k, v in (message.headers or {}).items()}
        row = {"pid": os.getpid(), "queue": message.queue, "i": body["i"], "headers": headers}
        write({**row, "state": "started"})
        if c.get("gate"):
            deadline = time.monotonic() + 120
            while not os.path.exists(OUT + ".gate") and time.monotonic() < deadline:
                time.sleep(0.01)
        write({**row, "state": "done"})
    return handle


for c in CONFIG["consumers"]:
    app.consumer(c["name"], prefetch=c.get("prefetch"), partitions=c.get("partitions"))(
        make(c))
"""


@pytest.fixture(params=["redis", "amqp", "sqlite"])
def anybroker(request, name, tmp_path):
    if request.param == "sqlite":
        yield Broker("sqlite", f"sqlite:///{tmp_path}/broker.db")
        return
    url = REDIS_URL if request.param == "redis" else AMQP_URL
    check_broker(url)
    b = Broker(request.param, url, f"{name}:" if request.param == "redis" else "", name)
    yield b
    b.cleanup([name, f"{name}a", f"{name}b"])


class App(Consumerd):
    """``consumerd`` running :data:`APP`."""

    def __init__(self, tmp_path, name: str, url: str | None) -> None:
        super().__init__(tmp_path, name, url)
        (tmp_path / "tapp.py").write_text(textwrap.dedent(APP))

    def rows(self, state: str = "done") -> list[dict]:
        if not os.path.exists(self.out):
            return []
        with open(self.out) as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]
        return [r for r in rows if r["state"] == state]

    def done(self) -> collections.Counter[int]:
        return collections.Counter(r["i"] for r in self.rows())

    def open_gate(self) -> None:
        open(self.out + ".gate", "w").close()


@pytest.fixture
def app(tmp_path, name, anybroker):
    a = App(tmp_path, name, anybroker.url)
    yield a
    a.open_gate()
    a.kill()


# -- 1. consumerd health ------------------------------------------------------------------


def test_health_command_fails_without_a_master_or_a_worker_and_passes_with_both(tmp_path, name):
    """On the embedded broker (health reads /proc only)."""
    c = App(tmp_path, name, None)
    c.configure([{"name": name}])
    pidfile = str(tmp_path / "consumerd.pid")

    def health() -> tuple[int, list[str], str]:
        done = c.cli("health", "--pidfile", pidfile)
        return done.returncode, done.stderr.splitlines(), done.stdout

    def unhealthy(why: str) -> None:
        code, err, out = health()
        assert code == 1 and out == "", (code, err, out)
        assert len(err) == 1 and err[0].startswith("consumerd: unhealthy: "), err
        assert why in err[0], err

    unhealthy(f"no master pid in {pidfile}")  # no pidfile yet
    try:
        c.start("--pidfile", pidfile, workers=2)
        workers = c.wait_workers(2)
        wait_for(lambda: health()[0] == 0, 15, "healthy")
        assert health()[2].strip() == f"master pid {c.proc.pid} with 2 worker(s)"

        # a master with no live worker: stopped (so it cannot respawn), workers killed
        c.signal(signal.SIGSTOP)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in workers), 10, "workers dead")
        unhealthy(f"master pid {c.proc.pid} has no live worker")
        c.signal(signal.SIGCONT)
        wait_for(lambda: health()[0] == 0, 15, "healthy again once respawned")

        # a dead master: a zombie first, then gone, its pidfile left behind by SIGKILL
        master = c.proc.pid
        c.signal(signal.SIGKILL)
        wait_for(lambda: not pid_alive(master), 10, "master dead")
        unhealthy(f"master pid {master} is dead")
        c.proc.wait(10)
        assert os.path.exists(pidfile)
        unhealthy(f"master pid {master} is not running")
    finally:
        c.kill()


# -- 2. consumerd publish --header ----------------------------------------------------------


def test_publish_header_reaches_the_handler(app, anybroker, name):
    app.configure([{"name": name}])
    done = app.cli(
        "publish",
        "--broker",
        anybroker.url,
        "--header",
        "x-trace=abc-1",
        "--header",
        "tenant=t=1",
        name,
        '{"i": 1}',
        '{"i": 2}',
        '{"i": 3}',
    )
    assert done.returncode == 0, done.stderr
    assert anybroker.depth(name) == 3
    app.start(workers=1)
    wait_for(lambda: len(app.rows()) == 3, 30, "the 3 messages handled")
    assert app.stop() == 0
    assert app.done() == {1: 1, 2: 1, 3: 1}
    for row in app.rows():
        assert row["headers"].get("x-trace") == "abc-1", row
        assert row["headers"].get("tenant") == "t=1", row  # split at the first '='
    assert anybroker.depth(name) == 0


# -- 3. --queues and --prefetch at run time -----------------------------------------------


def test_queues_option_consumes_only_the_named_consumers(app, anybroker, name):
    a, b = f"{name}a", f"{name}b"
    app.configure([{"name": a}, {"name": b}])
    publish_many(anybroker.url, a, 30)
    publish_many(anybroker.url, b, 20, start=100)
    app.start("--queues", a, workers=2)
    wait_for(lambda: len(app.rows()) >= 30, 30, "the 30 messages of a handled")
    app.wait_logged(f"consuming {a} from", 2)
    assert app.stop() == 0
    assert app.done() == collections.Counter(range(30))  # each of a's once, none of b's
    assert {r["queue"] for r in app.rows("started")} == {a}
    assert anybroker.depth(a) == 0
    assert anybroker.depth(b) == 20  # b's stay queued, all of them
    assert anybroker.unacked() == 0


def test_prefetch_option_bounds_what_a_stalled_worker_holds(app, anybroker, name):
    """The handler is held on its first message: the worker then holds exactly --prefetch
    messages unacked (that one and the prefetched), the rest stay ready in the queue."""
    total, prefetch = 50, 7
    app.configure([{"name": name, "gate": True}])
    publish_many(anybroker.url, name, total)
    app.start("--prefetch", str(prefetch), workers=1)
    wait_for(lambda: app.rows("started"), 30, "the first handler started")
    wait_for(
        lambda: (anybroker.unacked(), anybroker.depth(name)) == (prefetch, total - prefetch),
        30,
        f"{prefetch} unacked, {total - prefetch} ready",
    )
    assert len(app.rows("started")) == 1
    app.open_gate()
    wait_for(lambda: len(app.rows()) == total, 60, "every message handled")
    assert app.stop() == 0
    assert app.done() == collections.Counter(range(total))
    assert anybroker.depth(name) == 0 and anybroker.unacked() == 0


# -- 4. --max-memory-per-worker -----------------------------------------------------------


def test_max_memory_per_worker_recycles_with_the_same_worker_id_and_loses_nothing(
    app, anybroker, name
):
    """A 1 MB limit: every worker is over it, so each recycles at the first check, after
    64 messages; the master replaces it at once in slot 0."""
    total = 200
    app.configure([{"name": name, "prefetch": 20}])
    publish_many(anybroker.url, name, total)
    app.start("--max-memory-per-worker", "1", workers=1)
    wait_for(lambda: len(app.rows()) >= total, 90, "all messages handled")
    assert app.stop() == 0
    done = app.done()
    assert set(done) == set(range(total)) and max(done.values()) == 1  # none lost, none twice
    pids = list(dict.fromkeys(r["pid"] for r in app.rows()))
    assert len(pids) >= 4  # 64 + 64 + 64 + 8
    per_life = collections.Counter(r["pid"] for r in app.rows())
    assert [per_life[p] for p in pids[:3]] == [64, 64, 64]
    assert app.logged("recycling worker 0: resident memory") >= 3
    for pid in pids[:3]:
        assert app.logged(f"worker 0 (pid {pid}) exited with status 0") == 1
    assert anybroker.depth(name) == 0 and anybroker.unacked() == 0


# -- 11. a partition-count change on SIGHUP ---------------------------------------------


def test_sighup_applies_a_new_partition_count(app, anybroker, name):
    # Found by this test: on RabbitMQ the reload consumed the new partition queues without
    # declaring them (NOT_FOUND: both workers died and came back with the old app).
    app.configure([{"name": name, "partitions": 2}])
    app.start(workers=2)
    pids = app.wait_workers(2)
    publish_many(anybroker.url, name, 20, partitions=2)
    wait_for(lambda: len(app.rows()) == 20, 30, "the first 20 handled")

    app.configure([{"name": name, "partitions": 4}])
    app.signal(signal.SIGHUP)
    app.wait_logged("reloaded: consuming", 2)
    for worker, owned in ((0, "[0, 2]"), (1, "[1, 3]")):
        app.wait_logged(f"{name}: worker {worker} of 2 consumes partitions {owned}")
    publish_many(anybroker.url, name, 80, partitions=4, start=100)
    wait_for(lambda: len(app.rows()) == 100, 60, "the 80 on 4 partitions handled")
    assert sorted(app.workers()) == sorted(pids)  # the same processes
    assert app.stop() == 0

    done = app.done()
    assert set(done) == set(range(20)) | set(range(100, 180)) and max(done.values()) == 1
    queues = collections.defaultdict(set)
    for r in app.rows():
        queues[r["queue"]].add(r["pid"])
    assert set(queues) == {f"{name}.p{p}" for p in range(4)}  # the new ones are consumed
    assert all(len(owners) == 1 for owners in queues.values())  # each by one worker
    assert queues[f"{name}.p0"] == queues[f"{name}.p2"] != queues[f"{name}.p1"]
    assert queues[f"{name}.p1"] == queues[f"{name}.p3"]
    assert all(anybroker.depth(f"{name}.p{p}") == 0 for p in range(4))
    assert anybroker.unacked() == 0


# -- 10. RabbitMQ single-active-consumer on partition queues -----------------------------


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_rabbitmq_holds_off_a_second_consumer_of_a_partition(tmp_path, broker, name):
    """A plain kombu consumer on <name>.p0 stands by while consumerd's worker holds it:
    it gets nothing; once consumerd stops it becomes the active one."""
    app = App(tmp_path, name, broker.url)
    got: list[int] = []
    try:
        app.configure([{"name": name, "partitions": 2}])
        app.start(workers=1)
        app.wait_logged(f"{name}: worker 0 of 1 consumes partitions [0, 1]")
        with connect(AMQP_URL) as conn:
            queue = kombu.Queue(f"{name}.p0", no_declare=True)

            def on_message(body, message):
                got.append(body["i"])
                message.ack()

            def drain_until(condition, timeout: float, what: str) -> None:
                def step():
                    with contextlib.suppress(socket.timeout):
                        conn.drain_events(timeout=0.1)
                    return condition()

                wait_for(step, timeout, what, interval=0)

            with conn.Consumer(queue, callbacks=[on_message], accept=["json"], prefetch_count=10):
                publish_many(broker.url, name, 60, partitions=2)
                drain_until(lambda: len(app.rows()) == 60, 30, "consumerd handled all 60")
                assert app.done() == collections.Counter(range(60))
                p0 = [r["i"] for r in app.rows() if r["queue"] == f"{name}.p0"]
                assert p0  # p0 had messages, and consumerd took every one
                assert got == []
                assert app.stop() == 0
                with connect(broker.url) as producer_conn:
                    producer = producer_conn.Producer(serializer="json")
                    for i in range(1000, 1010):
                        producer.publish({"i": i}, exchange="", routing_key=f"{name}.p0")
                drain_until(lambda: len(got) == 10, 15, "the stand-by consumer taking over")
        assert got == list(range(1000, 1010))
        assert broker.depth(f"{name}.p0") == broker.depth(f"{name}.p1") == 0
    finally:
        app.kill()
        broker.cleanup([name])


# -- 9. dead letters of notification consumers -------------------------------------------

# The notification agent's handler, with a payload {"doom": true} failing every time.
DOOM = """
@app.notifications(CONFIG["name"], **CONFIG["declare"])
def handle(notes):
    notes = notes if isinstance(notes, list) else [notes]
    if any(n.payload.get("doom") for n in notes):
        record(os.environ["T_OUT"] + ".failed", notes)
        raise RuntimeError("doomed batch")
    record(os.environ["T_OUT"], notes)
"""


@pytest.fixture
def notification_agent(tmp_path):
    from tests.consumer import test_notifications as tn

    check_broker(AMQP_URL)
    rabbit = tn.Rabbit()
    tag = os.urandom(4).hex()
    name, topic, exchanges = f"agent{tag}", f"notif{tag}", [f"nova{tag}"]
    rabbit.exchanges.update(exchanges)
    rabbit.queues.update({f"{name}.retry", f"{name}.dlq", f"{topic}.info", f"{topic}.error"})
    made = []

    def make(declare: dict):
        agent = tn.Agent(tmp_path, name, {"exchanges": exchanges, "topic": topic, **declare})
        source = tn.AGENT_SOURCE.replace("max_retries=3", "max_retries=2")
        declared = '@app.notifications(CONFIG["name"], **CONFIG["declare"])\ndef handle(notes):\n'
        source = source.replace(declared, DOOM.lstrip("\n") + "\n\ndef _old(notes):\n")
        (tmp_path / "tagent.py").write_text(textwrap.dedent(source))
        notifier = tn.Notifier(exchanges[0], topic)
        made.append((agent, notifier))
        return agent, notifier, name, topic

    yield make, rabbit
    for agent, notifier in made:
        agent.kill()
        notifier.close()
    rabbit.cleanup()


def depth(queue: str) -> int:
    """Ready messages in ``queue``; 0 while the agent has not declared it yet."""
    with connect(AMQP_URL) as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except amqp.exceptions.NotFound:
            return 0


def dlq_messages(queue: str) -> list:
    out = []
    with connect(AMQP_URL) as conn:
        while (message := conn.SimpleQueue(queue).queue.get(no_ack=True)) is not None:
            out.append(message)
    return out


def test_a_message_that_is_not_a_notification_is_dead_lettered(notification_agent):
    make, rabbit = notification_agent
    agent, notifier, name, topic = make({"priorities": ["info"]})
    agent.start(workers=1)
    wait_for(lambda: agent.logged("consuming") >= 1, 20, "the agent consuming")
    sent = [
        notifier.send("info", "compute.instance.update", {"i": i}, "compute.h1") for i in range(3)
    ]
    not_notifications = [b'{"hello": "world"}', b"[1, 2, 3]", b"not json at all"]
    with connect(AMQP_URL) as conn:
        producer = conn.Producer()
        for body in not_notifications:
            producer.publish(
                body,
                exchange="",
                routing_key=f"{topic}.info",
                content_type="application/json",
                content_encoding="utf-8",
            )
    wait_for(lambda: depth(f"{name}.dlq") == 3, 20, "3 dead letters")
    wait_for(lambda: sum(agent.received().values()) == 3, 20, "the 3 notifications")
    assert agent.stop() == 0
    assert agent.received() == collections.Counter(sent)
    assert rabbit.depth(f"{topic}.info") == 0
    dead = dlq_messages(f"{name}.dlq")
    bodies = sorted(m.body if isinstance(m.body, bytes) else m.body.encode() for m in dead)
    assert bodies == sorted(not_notifications)  # the bytes as sent
    for m in dead:
        assert m.headers["consumerd-queue"] == f"{topic}.info"
        assert m.headers["consumerd-error"]


def test_a_failing_batch_is_dead_lettered_after_max_retries(notification_agent):
    """max_retries=2: a batch that always fails is handled 3 times, then each of its
    notifications is in <name>.dlq; the batches after it are handled normally."""
    make, rabbit = notification_agent
    agent, notifier, name, topic = make(
        {"priorities": ["info"], "batch_size": 4, "batch_timeout": 0.5}
    )
    for i in range(4):
        notifier.send("info", "compute.instance.update", {"i": i, "doom": True}, "compute.h1")
    agent.start(workers=1)
    wait_for(lambda: depth(f"{name}.dlq") == 4, 30, "the doomed batch dead-lettered")
    good = [
        notifier.send("info", "compute.instance.update", {"i": i}, "compute.h1")
        for i in range(10, 14)
    ]
    wait_for(lambda: sum(agent.received().values()) == 4, 20, "the good ones")
    assert agent.stop() == 0
    failed = collections.Counter(r["n"]["payload"]["i"] for r in agent.records(".failed"))
    assert failed == {0: 3, 1: 3, 2: 3, 3: 3}  # the first attempt and 2 retries, no more
    assert agent.received() == collections.Counter(good)
    assert rabbit.depth(f"{topic}.info") == rabbit.depth(f"{name}.retry") == 0
    dead = dlq_messages(f"{name}.dlq")
    assert len(dead) == 4
    assert {int(m.headers["consumerd-attempt"]) for m in dead} == {3}
    assert {m.headers["consumerd-queue"] for m in dead} == {f"{topic}.info"}


# -- 12. the embedded broker: fsynced publishes, claims of a SIGKILLed consumer ----------

PUBLISH_THEN_DIE = """
import os, signal, sys
import kombu
url, queue = sys.argv[1:3]
with kombu.Connection(url, transport="consumerd.consumer.transport.sqlite:Transport") as conn:
    producer = conn.Producer(serializer="json")
    producer.publish({"n": 0}, routing_key=queue, declare=[kombu.Queue(queue)])
    os.write(1, b"BEFORE\\n")
    producer.publish({"n": 42}, routing_key=queue)
    os.write(1, b"AFTER\\n")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def read_all(url: str, queue: str) -> list:
    bodies = []
    with kombu.Connection(url, transport="consumerd.consumer.transport.sqlite:Transport") as c:
        simple = c.SimpleQueue(queue)
        with contextlib.suppress(simple.Empty):
            while True:
                m = simple.get_nowait()
                bodies.append(m.payload)
                m.ack()
    return bodies


def test_embedded_publish_is_fsynced_before_it_returns(tmp_path):
    """The publisher is SIGKILLed right after publish() returned: the message is in the
    database; and strace shows the WAL fsynced between the call and its return."""
    url = f"sqlite:///{tmp_path}/broker.db"
    script = tmp_path / "publish.py"
    script.write_text(PUBLISH_THEN_DIE)
    trace = tmp_path / "trace.txt"
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=fsync,fdatasync,write",
            "-o",
            str(trace),
            sys.executable,
            str(script),
            url,
            "q",
        ],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.stdout == b"BEFORE\nAFTER\n", done.stderr
    assert done.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), done
    assert read_all(url, "q") == [{"n": 0}, {"n": 42}]
    lines = trace.read_text().splitlines()
    before = next(i for i, line in enumerate(lines) if '"BEFORE\\n"' in line)
    after = next(i for i, line in enumerate(lines) if '"AFTER\\n"' in line)
    synced = [line for line in lines[before:after] if "sync(" in line and "broker.db" in line]
    assert synced, "\n".join(lines[before:after])


def test_claims_of_a_sigkilled_embedded_consumer_are_released_within_seconds(tmp_path):
    from tests.consumer.test_sqlite_transport import ConsumerProcess, publish, rows

    url = f"sqlite:///{tmp_path}/broker.db"
    publish(url, "work", range(30))
    stuck = ConsumerProcess(tmp_path, "stuck", url, "work", prefetch=10, delay=3600)
    others = []
    try:
        wait_for(lambda: rows(url) == (20, 10), 20, "10 claimed by the stuck consumer")
        others.append(ConsumerProcess(tmp_path, "other", url, "work", prefetch=5))
        wait_for(lambda: rows(url) == (0, 10), 30, "the other 20 handled")
        stuck.proc.send_signal(signal.SIGKILL)
        stuck.proc.wait(10)
        killed = time.monotonic()
        wait_for(lambda: rows(url) == (0, 0), 30, "the dead consumer's 10 released and handled")
        assert time.monotonic() - killed < 5  # about a second (sweep_interval), generously
        assert collections.Counter(others[0].numbers("done")) == collections.Counter(range(30))
        assert stuck.numbers("done") == []
    finally:
        for p in (stuck, *others):
            p.stop()
