"""The embedded SQLite transport: real processes, real signals, messages counted in and out."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import kombu
import pytest

from consumerd.consumer.transport.store import DatabasePathError, database_path

TRANSPORT = "consumerd.consumer.transport.sqlite:Transport"
ROOT = Path(__file__).resolve().parents[2]

# A consumer process: logs "got N" before handling and "done N" before acking, so a message whose
# "done" line exists may still be unacked (allowed to come back), but none can be acked unlogged.
CONSUMER = """
import signal, socket, sys, time
import kombu

url, transport, queue, prefetch, out, delay = sys.argv[1:7]
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
log = open(out, "a", buffering=1)

def handle(body, message):
    log.write(f"got {body['n']}\\n")
    time.sleep(float(delay))
    log.write(f"done {body['n']}\\n")
    message.ack()

with kombu.Connection(url, transport=transport) as conn:
    consumer = conn.Consumer(
        kombu.Queue(queue), callbacks=[handle], accept=["json"], prefetch_count=int(prefetch)
    )
    with consumer:
        log.write("ready\\n")
        while not stopping:
            try:
                conn.drain_events(timeout=0.2)
            except socket.timeout:
                pass
log.write("exit\\n")
"""


def wait_for(condition, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ConsumerProcess:
    def __init__(self, tmp_path: Path, name: str, url: str, queue: str, *, prefetch, delay=0.0):
        script = tmp_path / "consumer.py"
        script.write_text(CONSUMER)
        self.out = tmp_path / f"{name}.log"
        self.out.touch()
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        args = [url, TRANSPORT, queue, str(prefetch), str(self.out), str(delay)]
        self.proc = subprocess.Popen([sys.executable, str(script), *args], env=env)
        wait_for(lambda: "ready" in self.lines(), 30, f"{name} to start consuming")

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def numbers(self, word: str) -> list[int]:
        return [int(line.split()[1]) for line in self.lines() if line.startswith(word + " ")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/broker.db"


@pytest.fixture
def consumers():
    started: list[ConsumerProcess] = []
    yield started
    for consumer in started:
        consumer.stop()


def publish(url: str, queue: str, numbers) -> None:
    with kombu.Connection(url, transport=TRANSPORT) as conn:
        conn.Consumer(kombu.Queue(queue), accept=["json"]).declare()
        producer = conn.Producer(serializer="json")
        for n in numbers:
            producer.publish({"n": n}, routing_key=queue)


def rows(url: str) -> tuple[int, int]:
    """(ready, claimed) message counts, read straight from the database."""
    with sqlite3.connect(database_path(url)) as db:
        ready, claimed = db.execute(
            "SELECT count(*) - count(owner), count(owner) FROM messages"
        ).fetchone()
    return ready, claimed


def done_everywhere(processes: list[ConsumerProcess]) -> Counter[int]:
    return Counter(n for p in processes for n in p.numbers("done"))


def test_two_consumer_processes_no_loss_no_duplicates(tmp_path, url, consumers):
    total = 2000
    for name in ("a", "b"):
        consumers.append(ConsumerProcess(tmp_path, name, url, "work", prefetch=50, delay=0.001))
    publish(url, "work", range(total))  # from this process: another one than the consumers

    wait_for(lambda: len(done_everywhere(consumers)) == total, 60, "all messages handled")
    wait_for(lambda: rows(url) == (0, 0), 10, "the last acks")
    assert [c.stop() for c in consumers] == [0, 0]

    done = done_everywhere(consumers)
    assert set(done) == set(range(total))
    assert max(done.values()) == 1, "a message was handled twice without any crash"
    assert all(c.numbers("done") for c in consumers), "one process got no work"
    for c in consumers:  # FIFO per queue: each process sees its share in publish order
        assert c.numbers("done") == sorted(c.numbers("done"))


def test_sigkill_mid_stream_redelivers_every_unacked_message(tmp_path, url, consumers):
    total, prefetch = 500, 20
    victim = ConsumerProcess(tmp_path, "victim", url, "work", prefetch=prefetch, delay=0.01)
    consumers.append(victim)
    publish(url, "work", range(total))
    wait_for(lambda: len(victim.numbers("done")) >= 30, 60, "the victim to be mid-stream")

    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    _, claimed_at_death = rows(url)
    assert claimed_at_death > 0, "the victim held no claims when killed"
    # claims of a dead pid come back long before the default 3600 s visibility timeout
    survivor = ConsumerProcess(tmp_path, "survivor", url, "work", prefetch=prefetch)
    consumers.append(survivor)
    wait_for(lambda: len(done_everywhere(consumers)) == total, 60, "every message handled")
    wait_for(lambda: rows(url) == (0, 0), 10, "the last acks")

    done = done_everywhere(consumers)
    assert set(done) == set(range(total)), "count in != count out"
    duplicates = {n for n, times in done.items() if times > 1}
    # only messages the victim was holding may be handled twice
    in_flight = set(victim.numbers("got"))
    assert duplicates <= in_flight
    assert len(duplicates) <= prefetch


def test_clean_exit_releases_prefetched_messages_at_once(tmp_path, url, consumers):
    total = 100
    slow = ConsumerProcess(tmp_path, "slow", url, "work", prefetch=30, delay=0.05)
    consumers.append(slow)
    publish(url, "work", range(total))
    wait_for(lambda: len(slow.numbers("done")) >= 3, 30, "the consumer to be working")
    assert rows(url)[1] > 1, "nothing prefetched"

    assert slow.stop() == 0
    handled = len(slow.numbers("done"))
    assert rows(url) == (total - handled, 0)  # no waiting: released by the closing channel


def test_reject_requeue_recover_and_cancel(url):
    with kombu.Connection(url, transport=TRANSPORT) as conn:
        channel = conn.channel()
        producer = conn.Producer(channel, serializer="json")
        kombu.Queue("q", channel=channel).declare()
        for n in range(4):
            producer.publish({"n": n}, routing_key="q")

        first = channel.basic_get("q")
        assert first.payload == {"n": 0}
        assert not first.delivery_info.get("redelivered")
        first.reject(requeue=True)
        again = channel.basic_get("q")
        assert again.payload == {"n": 0}, "a requeued message keeps its place at the head"
        assert again.delivery_info["redelivered"] is True

        again.reject(requeue=False)  # gone for good
        second = channel.basic_get("q")
        assert second.payload == {"n": 1}
        channel.basic_recover(requeue=True)
        assert channel._size("q") == 3

        got = []
        consumer = conn.Consumer(
            kombu.Queue("q"), callbacks=[lambda b, m: got.append(b["n"])], prefetch_count=10
        )
        with consumer:
            conn.drain_events(timeout=5)
            assert got == [1]
            assert rows(url) == (0, 3), "the whole prefetch window is claimed in one fetch"
        # Cancelling releases what was prefetched but not delivered; the delivered message
        # stays unacked (as in AMQP) until recover or close.
        assert rows(url) == (2, 1)
        conn.default_channel.basic_recover(requeue=True)
        assert rows(url) == (3, 0)
        channel.close()


def test_no_ack_consumer_deletes_on_delivery(url):
    publish(url, "q", range(3))
    got = []
    with kombu.Connection(url, transport=TRANSPORT) as conn:
        consumer = conn.Consumer(
            kombu.Queue("q"), callbacks=[lambda b, m: got.append(b["n"])], no_ack=True
        )
        with consumer:
            for _ in range(3):
                conn.drain_events(timeout=5)
    assert got == [0, 1, 2]
    assert rows(url) == (0, 0)


def test_visibility_timeout_releases_claims_of_a_live_owner(url):
    publish(url, "q", [7])
    options = {"visibility_timeout": 0.3, "sweep_interval": 0.05}
    with (
        kombu.Connection(url, transport=TRANSPORT) as holder,
        kombu.Connection(url, transport=TRANSPORT, transport_options=options) as other,
    ):
        held = holder.default_channel.basic_get("q")
        assert held.payload == {"n": 7}
        assert other.default_channel.basic_get("q") is None
        found = []
        wait_for(
            lambda: found.append(other.default_channel.basic_get("q")) or found[-1] is not None,
            10,
            "the expired claim to be released",
        )
        assert found[-1].payload == {"n": 7}
        assert found[-1].delivery_info["redelivered"] is True


def test_exchanges_route_across_processes(tmp_path, url):
    direct = kombu.Exchange("orders", type="direct")
    fanout = kombu.Exchange("events", type="fanout")
    topic = kombu.Exchange("logs", type="topic")
    queues = [
        kombu.Queue("paid", direct, routing_key="paid"),
        kombu.Queue("audit", fanout),
        kombu.Queue("mail", fanout),
        kombu.Queue("errors", topic, routing_key="*.error"),
    ]
    with kombu.Connection(url, transport=TRANSPORT) as conn:
        for queue in queues:
            queue(conn.default_channel).declare()

    # The publisher process declares nothing: routing comes from the shared database.
    script = f"""
import kombu
with kombu.Connection({url!r}, transport={TRANSPORT!r}) as conn:
    p = conn.Producer(serializer="json", auto_declare=False)
    p.publish({{"n": 1}}, exchange="orders", routing_key="paid")
    p.publish({{"n": 2}}, exchange="orders", routing_key="refunded")
    p.publish({{"n": 3}}, exchange="events", routing_key="")
    p.publish({{"n": 4}}, exchange="logs", routing_key="db.error")
    p.publish({{"n": 5}}, exchange="logs", routing_key="db.info")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)

    with kombu.Connection(url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        drained = {}
        for name in ("paid", "audit", "mail", "errors"):
            drained[name] = []
            while (message := channel.basic_get(name, no_ack=True)) is not None:
                drained[name].append(message.payload["n"])
    assert drained == {"paid": [1], "audit": [3], "mail": [3], "errors": [4]}


def test_idle_consumer_does_not_spin(tmp_path, url, consumers):
    idle = ConsumerProcess(tmp_path, "idle", url, "empty", prefetch=10)
    consumers.append(idle)

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{idle.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before, start = cpu_seconds(), time.monotonic()
    time.sleep(3)  # the measurement window itself, not a wait for a condition
    share = (cpu_seconds() - before) / (time.monotonic() - start)
    assert share < 0.10, f"idle consumer used {share:.1%} of a core"


def test_urls_create_folders_and_relative_paths(tmp_path, monkeypatch):
    nested = tmp_path / "a" / "b" / "broker.db"
    publish(f"sqlite:///{nested}", "q", [1])
    assert nested.exists()

    monkeypatch.chdir(tmp_path)
    publish("sqlite:///rel.db", "q", [1])
    assert (tmp_path / "rel.db").exists()
    assert database_path("sqlite:////x/y.db") == "/x/y.db"
    assert database_path("sqlite:///x/y.db") == str(tmp_path / "x" / "y.db")


def test_unusable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with (
        pytest.raises(DatabasePathError, match=r"cannot use .*file/broker\.db"),
        kombu.Connection(f"sqlite:///{blocker}/broker.db", transport=TRANSPORT) as conn,
    ):
        conn.connect()
    with pytest.raises(DatabasePathError, match=r"like sqlite:///relative/path\.db"):
        database_path("redis://localhost/0")


def test_many_processes_open_a_fresh_database_at_once(tmp_path, url):
    script = f"""
import kombu
with kombu.Connection({url!r}, transport={TRANSPORT!r}) as conn:
    conn.connect()
    conn.Producer(serializer="json").publish({{"n": 1}}, routing_key="q")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env) for _ in range(6)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 6
    assert rows(url) == (6, 0)


COUNT_AND_CLOSE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
ready, claimed = db.execute("SELECT count(*) - count(owner), count(owner) FROM messages").fetchone()
db.close()
print(ready, claimed)
"""


def rows_elsewhere(url: str) -> tuple[int, int]:
    """(ready, claimed) as another process sees them; its connection closes after."""
    out = subprocess.run(
        [sys.executable, "-c", COUNT_AND_CLOSE, database_path(url)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_a_second_connection_in_the_process_keeps_the_acks_of_the_first(url):
    # Found by a reload on SIGHUP: the loop's poke opened a second connection while the
    # consuming one held claims; opening it closed a descriptor of the database file,
    # which dropped every SQLite lock of the process. Another process's close then took
    # the database for unused, checkpointed and deleted the WAL, and the consumer went on
    # claiming and acking in the unlinked WAL: every ack was lost, every message came back.
    publish(url, "q", [1, 2, 3])
    with kombu.Connection(url, transport=TRANSPORT) as conn:
        queue = conn.SimpleQueue("q")
        first = queue.get(timeout=5)
        with kombu.Connection(url, transport=TRANSPORT) as poke:
            poke.connect()
        assert sum(rows_elsewhere(url)) == 3  # and that process closes its connection
        first.ack()
        for _ in range(2):
            queue.get(timeout=5).ack()
        assert rows_elsewhere(url) == (0, 0)
        queue.close()
    assert rows_elsewhere(url) == (0, 0)
