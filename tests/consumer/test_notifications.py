"""Notification agents: envelopes and filters (fast), then a real oslo.messaging notifier
publishing to the real RabbitMQ and a ``consumerd`` agent consuming it, counted in and out.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import consumerd
from consumerd.consumer import batching, notifications, policy
from consumerd.consumer.broker import connect
from tests.consumer.conftest import AMQP_URL, ROOT, check_broker, wait_for
from tests.helpers import children_of

OSLO_URL = "rabbit://guest:guest@127.0.0.1:5672/"


# -- envelopes ----------------------------------------------------------------------


def oslo_message(**overrides):
    message = {
        "message_id": "m-1",
        "publisher_id": "compute.host1",
        "event_type": "compute.instance.create.end",
        "priority": "INFO",
        "payload": {"instance_id": "i-1", "n": [1, 2]},
        "timestamp": "2026-11-23 13:19:13.123456",
        "_unique_id": "u",
        "_context_user": "u1",
        "_context_request_id": "req-1",
    }
    message.update(overrides)
    return message


def test_v2_envelope_is_unwrapped():
    body = {"oslo.version": "2.0", "oslo.message": json.dumps(oslo_message())}
    n = notifications.decode(body)
    assert n == notifications.Notification(
        event_type="compute.instance.create.end",
        payload={"instance_id": "i-1", "n": [1, 2]},
        publisher_id="compute.host1",
        priority="info",
        timestamp="2026-11-23 13:19:13.123456",
        message_id="m-1",
        context={"user": "u1", "request_id": "req-1"},
    )
    assert n.time is not None and n.time.isoformat() == "2026-11-23T13:19:13.123456+00:00"


def test_v1_plain_dict_is_accepted():
    n = notifications.decode(oslo_message(priority="ERROR", timestamp=None))
    assert (n.event_type, n.priority, n.timestamp, n.time) == (
        "compute.instance.create.end",
        "error",
        None,
        None,
    )


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        "text",
        {"oslo.version": "1.0", "oslo.message": "{}"},
        {"oslo.version": "2.0", "oslo.message": {"event_type": "x"}},
        {"oslo.version": "2.0", "oslo.message": "[1]"},
        {"oslo.version": "2.0", "oslo.message": "{not json"},
        {"oslo.version": "2.0", "oslo.message": json.dumps({"payload": {}})},
        {"payload": {}, "event_type": ""},
    ],
)
def test_what_is_not_a_notification_is_refused(body):
    with pytest.raises(ValueError):
        notifications.decode(body)


def test_unreadable_timestamp_is_kept_as_text():
    n = notifications.decode(oslo_message(timestamp="yesterday"))
    assert n.timestamp == "yesterday" and n.time is None


# -- filters ------------------------------------------------------------------------


def test_event_type_patterns():
    match = notifications.event_type_matcher(["compute.instance.*", "volume.*.end", "image.upload"])
    assert match("compute.instance.create.start")
    assert match("compute.instance.delete.end")
    assert match("volume.attach.end")
    assert match("image.upload")
    assert not match("volume.attach.start")
    assert not match("compute.instance")
    assert not match("image.upload.end")
    assert not match("Compute.instance.create")  # case-sensitive
    assert not match("xcompute.instance.create")
    assert notifications.event_type_matcher([])("anything.at.all")
    assert notifications.event_type_matcher(["port.[cu]*"])("port.update.end")
    assert not notifications.event_type_matcher(["port.?"])("port.ab")


def test_listener_drops_what_the_filter_does_not_match():
    listener = notifications.Listener(("nova",), event_types=("compute.*",))
    kept = listener.prepare({"oslo.version": "2.0", "oslo.message": json.dumps(oslo_message())})
    assert kept is not None and kept.event_type == "compute.instance.create.end"
    assert listener.prepare(oslo_message(event_type="image.upload")) is None


def test_listener_declares_like_oslo_messaging():
    """Queue ``<topic>.<priority>`` bound to every topic exchange with that routing key;
    not durable, not auto-delete, no arguments: oslo.messaging's rabbit defaults."""
    listener = notifications.Listener(("nova", "glance"), "notifications", ("info", "error"))
    assert listener.queue_names == ["notifications.info", "notifications.error"]
    queue = listener.queue("notifications.error")
    assert (queue.name, queue.durable, queue.auto_delete, queue.queue_arguments) == (
        "notifications.error",
        False,
        False,
        None,
    )
    assert {
        (
            b.exchange.name,
            b.exchange.type,
            b.exchange.durable,
            b.exchange.auto_delete,
            b.routing_key,
        )
        for b in queue.bindings
    } == {
        ("nova", "topic", False, False, "notifications.error"),
        ("glance", "topic", False, False, "notifications.error"),
    }
    quorum = notifications.Listener(
        ("nova",), durable=True, queue_arguments={"x-queue-type": "quorum"}
    )
    queue = quorum.queue("notifications.info")
    assert queue.durable and queue.queue_arguments == {"x-queue-type": "quorum"}
    assert all(b.exchange.durable for b in queue.bindings)


def test_a_pool_is_one_queue_bound_with_every_routing_key():
    """oslo.messaging's rabbit driver: ``listen_for_notifications`` declares, for each
    target and priority, a topic consumer with ``queue_name=pool``: one queue named after
    the pool, bound to each exchange once per ``<topic>.<priority>``."""
    listener = notifications.Listener(
        ("nova", "glance"), "notifications", ("info", "error"), pool="ceilometer"
    )
    assert listener.queue_names == ["ceilometer"]
    queue = listener.queue("ceilometer")
    assert (queue.name, queue.durable, queue.auto_delete) == ("ceilometer", False, False)
    assert sorted((b.exchange.name, b.routing_key) for b in queue.bindings) == [
        ("glance", "notifications.error"),
        ("glance", "notifications.info"),
        ("nova", "notifications.error"),
        ("nova", "notifications.info"),
    ]
    app = consumerd.App("agent")
    app.notifications("default", exchanges=["nova"])(lambda n: None)
    app.notifications("pool-a", exchanges=["nova"], pool="a")(lambda n: None)
    app.notifications("pool-b", exchanges=["nova"], pool="b")(lambda n: None)
    with pytest.raises(ValueError, match="both consume a"):
        app.notifications("pool-a2", exchanges=["glance"], pool="a")(lambda n: None)


def test_publisher_id_filter_is_oslos_regex_match():
    """``NotificationFilter(publisher_id=...)``: ``re.match``, anchored at the start only."""
    listener = notifications.Listener(
        ("nova",), publisher_id=r"compute\.", event_types=("compute.*",)
    )

    def kept(publisher_id, event_type="compute.instance.update"):
        body = oslo_message(publisher_id=publisher_id, event_type=event_type)
        return listener.prepare(body) is not None

    assert kept("compute.host1") and kept("compute.")
    assert not kept("xcompute.host1")  # match, not search
    assert not kept("network.host1") and not kept("")
    assert not kept("compute.host1", "image.upload")  # both filters apply
    exact = notifications.Listener(("nova",), publisher_id=r"^compute\.host1$")
    assert exact.prepare(oslo_message(publisher_id="compute.host1")) is not None
    assert exact.prepare(oslo_message(publisher_id="compute.host10")) is None
    with pytest.raises(ValueError, match="not a regex"):
        notifications.Listener(("nova",), publisher_id="compute.(")


def test_requeue_result_is_oslos():
    import oslo_messaging

    assert notifications.NotificationResult.REQUEUE == oslo_messaging.NotificationResult.REQUEUE
    assert notifications.NotificationResult.HANDLED == oslo_messaging.NotificationResult.HANDLED
    results = iter(
        [oslo_messaging.NotificationResult.REQUEUE, notifications.NotificationResult.HANDLED, None]
    )
    call = notifications.adapt(lambda n: next(results))
    assert call("n", "d") is policy.REQUEUE
    assert call("n", "d") == "handled" and call("n", "d") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exchanges": ()},
        {"exchanges": ("no va",)},
        {"exchanges": ("nova",), "priorities": ("warning",)},  # oslo sends "warn"
        {"exchanges": ("nova",), "priorities": ()},
        {"exchanges": ("nova",), "priorities": ("info", "info")},
        {"exchanges": ("nova",), "topic": ""},
        {"exchanges": ("nova",), "pool": ""},
        {"exchanges": ("nova",), "pool": "a b"},
    ],
)
def test_listener_refuses_bad_declarations(kwargs):
    with pytest.raises(ValueError):
        notifications.Listener(**kwargs)


# -- declarations on App ------------------------------------------------------------


def test_app_notifications_declares_a_consumer():
    app = consumerd.App("agent", prefetch=2)
    seen = []

    @app.notifications(
        "agent",
        exchanges=["nova"],
        priorities=["info", "error"],
        event_types=["compute.*"],
        batch_size=10,
        batch_timeout=0.5,
    )
    def handle(batch):
        seen.append(batch)

    spec = app.consumers["agent"]
    assert spec.queue_names == ["notifications.info", "notifications.error"]
    assert spec.batch == batching.BatchPolicy(10, 0.5)
    assert app.prefetch_of(spec) == 10  # App's 2 is below the batch size
    assert app.prefetch_of(spec, 5) == 10  # and so would --prefetch 5 be
    assert app.prefetch_of(spec, 500) == 500
    assert spec.handler.__name__ == "handle"
    spec.handler(["n1", "n2"], ["d1", "d2"])
    assert seen == [["n1", "n2"]]


def test_app_notifications_refuses_what_cannot_work():
    app = consumerd.App("agent")
    with pytest.raises(ValueError, match="could never fill"):
        app.notifications("a", exchanges=["nova"], batch_size=50, prefetch=10)
    for bad in (
        {"batch_size": 0},
        {"batch_size": 5, "batch_timeout": 0},
        {"batch_size": 5, "batch_timeout": math.inf},
    ):
        with pytest.raises(ValueError):
            app.notifications("a", exchanges=["nova"], **bad)
    app.notifications("a", exchanges=["nova"])(lambda n: None)
    with pytest.raises(ValueError, match=r"both consume notifications\.info"):
        app.notifications("b", exchanges=["glance"], priorities=["error", "info"])(lambda n: None)
    with pytest.raises(ValueError, match="both consume"):
        app.consumer("notifications.info")(lambda body, message: None)


def test_a_change_of_exchanges_rebinds_on_reload():
    def spec(exchanges):
        app = consumerd.App("agent")
        app.notifications("a", exchanges=exchanges)(lambda n: None)
        return app.consumers["a"]

    assert spec(["nova"]).binding_key() == spec(["nova"]).binding_key()
    assert spec(["nova"]).binding_key() != spec(["nova", "glance"]).binding_key()


def test_batch_fills_and_times_out():
    batch = batching.Batch(batching.BatchPolicy(3, 2.0))
    assert batch.deadline == math.inf
    assert not batch.add("a", "da", now=10.0)
    assert batch.deadline == 12.0  # from the first message
    assert not batch.add("b", "db", now=11.5)
    assert batch.deadline == 12.0
    assert batch.add("c", "dc", now=11.9)
    assert batch.take() == (["a", "b", "c"], ["da", "db", "dc"])
    assert len(batch) == 0 and batch.deadline == math.inf


# -- a real oslo.messaging notifier, a real agent, the real RabbitMQ ------------------

# The agent under test; its declaration comes from $T_CONFIG. Each successful handler call
# appends one JSON line per notification to $T_OUT: {"call", "size", "n": fields}. A batch
# holding a payload {"poison": true} fails the first time it is seen (a marker file).
AGENT_SOURCE = """
import json, os, uuid
import consumerd
from consumerd.consumer.notifications import NotificationResult

CONFIG = json.load(open(os.environ["T_CONFIG"]))
app = consumerd.App("agent", max_retries=3, retry_delay=0.2)


def record(path, notes):
    call = uuid.uuid4().hex
    lines = "".join(json.dumps({"call": call, "size": len(notes), "pid": os.getpid(), "n": {
        "event_type": n.event_type, "payload": n.payload, "publisher_id": n.publisher_id,
        "priority": n.priority, "message_id": n.message_id, "timestamp": n.timestamp,
        "context": n.context}}) + "\\n" for n in notes)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, lines.encode())
    os.close(fd)


@app.notifications(CONFIG["name"], **CONFIG["declare"])
def handle(notes):
    notes = notes if isinstance(notes, list) else [notes]
    if any(n.payload.get("requeue_once") for n in notes):
        try:
            os.close(os.open(os.environ["T_OUT"] + ".requeued", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            record(os.environ["T_OUT"] + ".requeue", notes)
            return NotificationResult.REQUEUE
    if any(n.payload.get("poison") for n in notes):
        try:
            os.close(os.open(os.environ["T_OUT"] + ".poisoned", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            record(os.environ["T_OUT"] + ".failed", notes)
            raise RuntimeError("poisoned batch")
    record(os.environ["T_OUT"], notes)
"""


class Notifier:
    """oslo.messaging's own notifier on the ``messagingv2`` driver, one per exchange."""

    def __init__(self, exchange: str, topic: str, durable: bool = False) -> None:
        import oslo_messaging
        from oslo_config import cfg

        # The control exchange is read when the transport is made.
        oslo_messaging.set_transport_defaults(exchange)
        self.conf = cfg.ConfigOpts()
        self.transport = oslo_messaging.get_notification_transport(self.conf, url=OSLO_URL)
        self.conf.set_override("amqp_durable_queues", durable, group="oslo_messaging_rabbit")
        self.topic = topic
        self.exchange = exchange

    def send(self, priority: str, event_type: str, payload, publisher_id: str) -> tuple:
        import oslo_messaging
        from oslo_context.context import RequestContext

        notifier = oslo_messaging.Notifier(
            self.transport, publisher_id=publisher_id, driver="messagingv2", topics=[self.topic]
        )
        context = RequestContext(user_id="u1", project_id="p1", request_id="req-1")
        getattr(notifier, priority)(context, event_type, payload)
        return (
            event_type,
            json.dumps(payload, sort_keys=True),
            publisher_id,
            "warn" if priority == "warning" else priority,
        )

    def close(self) -> None:
        self.transport.cleanup()


class Agent:
    """``consumerd --app tagent`` as a subprocess with its output files."""

    def __init__(self, tmp_path, name: str, declare: dict) -> None:
        self.tmp = tmp_path
        self.out = str(tmp_path / "out.jsonl")
        self.log = str(tmp_path / "agent.log")
        self.config = str(tmp_path / "config.json")
        (tmp_path / "tagent.py").write_text(textwrap.dedent(AGENT_SOURCE))
        self.configure(name, declare)
        self.proc: subprocess.Popen | None = None

    def configure(self, name: str, declare: dict) -> None:
        with open(self.config, "w") as f:
            json.dump({"name": name, "declare": declare}, f)

    def start(self, workers: int = 1) -> None:
        env = dict(
            os.environ, PYTHONPATH=f"{ROOT}:{self.tmp}", T_OUT=self.out, T_CONFIG=self.config
        )
        env.pop("CONSUMERD_BROKER", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "consumerd.cli",
                    "--app",
                    "tagent",
                    "--broker",
                    AMQP_URL,
                    "--workers",
                    str(workers),
                    "--log-level",
                    "DEBUG",
                ],
                cwd=self.tmp,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def logged(self, text: str) -> int:
        with open(self.log, errors="replace") as f:
            return f.read().count(text)

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in children_of(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(5)

    def records(self, suffix: str = "") -> list[dict]:
        path = self.out + suffix
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def received(self) -> collections.Counter:
        """How many times each (event_type, payload, publisher_id, priority) was handled."""
        return collections.Counter(
            (
                r["n"]["event_type"],
                json.dumps(r["n"]["payload"], sort_keys=True),
                r["n"]["publisher_id"],
                r["n"]["priority"],
            )
            for r in self.records()
        )


class Rabbit:
    """Queue depths and clean-up of the exchanges and queues a test made."""

    def __init__(self) -> None:
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    def depth(self, queue: str) -> int:
        with connect(AMQP_URL) as conn:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)

    def cleanup(self) -> None:
        with connect(AMQP_URL) as conn:
            channel = conn.default_channel
            for queue in self.queues:
                with contextlib.suppress(Exception):
                    channel.queue_delete(queue)
            for exchange in self.exchanges:
                with contextlib.suppress(Exception):
                    channel.exchange_delete(exchange)


@pytest.fixture
def rabbit():
    check_broker(AMQP_URL)  # fails, never skips, when RabbitMQ is down
    r = Rabbit()
    yield r
    r.cleanup()


@pytest.fixture
def names(rabbit):
    """A consumer name, a topic and two exchanges of this test's own; cleaned up after."""
    tag = uuid.uuid4().hex[:8]
    name, topic, exchanges = f"agent{tag}", f"notif{tag}", [f"nova{tag}", f"glance{tag}"]
    rabbit.exchanges.update(exchanges)
    rabbit.queues.update(
        {f"{name}.retry", f"{name}.dlq"} | {f"{topic}.{p}" for p in notifications.PRIORITIES}
    )
    return name, topic, exchanges


@pytest.fixture
def agent(tmp_path):
    made: list[Agent] = []

    def make(name, declare) -> Agent:
        made.append(Agent(tmp_path, name, declare))
        return made[-1]

    yield make
    for a in made:
        a.kill()


@pytest.fixture
def notifiers():
    made: list[Notifier] = []

    def make(exchange, topic, durable=False) -> Notifier:
        made.append(Notifier(exchange, topic, durable))
        return made[-1]

    yield make
    for n in made:
        n.close()


DROPPED = "dropped so far)"  # the debug line of a filtered-out notification
EVENTS = [
    ("compute.instance.create.start", True),
    ("compute.instance.delete.end", True),
    ("volume.attach.end", True),
    ("volume.attach.start", False),
    ("image.upload", False),
]


def publish_mix(senders, rounds: int) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Every event type at info, error and warn priority from every notifier; returns
    (sent and wanted, sent and filtered out, sent at a priority not listened to)."""
    wanted, filtered, other = [], [], []
    i = 0
    for r in range(rounds):
        for sender in senders:
            for priority in ("info", "error", "warn"):
                for event_type, keep in EVENTS:
                    i += 1
                    payload = {"i": i, "round": r, "nested": {"exchange": sender.exchange}}
                    sent = sender.send(priority, event_type, payload, f"compute.host{i % 3}")
                    if priority == "warn":
                        other.append(sent)
                    else:
                        (wanted if keep else filtered).append(sent)
    return wanted, filtered, other


@pytest.mark.parametrize("durable", [False, True], ids=["oslo-defaults", "durable-queues"])
def test_agent_receives_each_notification_exactly_as_sent(rabbit, names, agent, notifiers, durable):
    """The notifiers publish first (they declare the exchanges and queues, as in a
    deployment where the services run before the agent); the agent's declarations must
    be equivalent or RabbitMQ would close its channel with PRECONDITION_FAILED."""
    name, topic, exchanges = names
    senders = [notifiers(exchange, topic, durable) for exchange in exchanges]
    wanted, filtered, other = publish_mix(senders, rounds=2)
    assert rabbit.depth(f"{topic}.info") + rabbit.depth(f"{topic}.error") == len(wanted) + len(
        filtered
    )

    a = agent(
        name,
        {
            "exchanges": exchanges,
            "topic": topic,
            "priorities": ["info", "error"],
            "event_types": ["compute.instance.*", "volume.*.end"],
            "durable": durable,
        },
    )
    a.start(workers=2)
    wait_for(lambda: sum(a.received().values()) >= len(wanted), 30, "every notification")
    # then more while it runs, straight to the running agent
    more, more_filtered, more_other = publish_mix(senders, rounds=1)
    wanted, filtered, other = wanted + more, filtered + more_filtered, other + more_other
    wait_for(lambda: sum(a.received().values()) >= len(wanted), 30, "the later ones")
    wait_for(lambda: a.logged(DROPPED) >= len(filtered), 15, "the filtered ones logged")
    assert a.stop() == 0

    assert a.received() == collections.Counter(wanted)  # each once, exactly as sent
    records = a.records()
    assert all(
        r["n"]["context"]["request_id"] == "req-1" and r["n"]["context"]["user"] == "u1"
        for r in records
    )
    assert all(r["n"]["timestamp"] and r["n"]["message_id"] for r in records)
    assert len({r["n"]["message_id"] for r in records}) == len(wanted)
    # the filtered ones were acked (not left behind), the warn ones never came here
    assert rabbit.depth(f"{topic}.info") == rabbit.depth(f"{topic}.error") == 0
    assert rabbit.depth(f"{topic}.warn") == len(other)
    assert rabbit.depth(f"{name}.dlq") == 0
    assert a.logged(DROPPED) == len(filtered)


def test_batches_are_acked_and_retried_as_a_whole(rabbit, names, agent, notifiers):
    """Batches of 5; the last, short batch is handed over by the timeout; the batch holding
    a poisoned notification fails once and comes back whole: count in == count out."""
    name, topic, exchanges = names
    sender = notifiers(exchanges[0], topic)
    sent = []
    for i in range(23):
        payload = {"i": i, "poison": i == 7}
        sent.append(
            sender.send(
                "info" if i % 2 else "error", "compute.instance.update", payload, "compute.host1"
            )
        )
        sender.send("info", "image.upload", {"i": i}, "glance.host1")  # filtered out
    a = agent(
        name,
        {
            "exchanges": exchanges,
            "topic": topic,
            "priorities": ["info", "error"],
            "event_types": ["compute.*"],
            "batch_size": 5,
            "batch_timeout": 1.0,
        },
    )
    a.start(workers=1)
    wait_for(lambda: sum(a.received().values()) >= len(sent), 30, "every notification")
    assert a.stop() == 0

    assert a.received() == collections.Counter(sent)  # in == out, each once
    failed = a.records(".failed")
    assert len(failed) == 5  # one whole batch of 5 failed ...
    failed_ids = {r["n"]["payload"]["i"] for r in failed}
    assert 7 in failed_ids
    handled = collections.Counter(r["n"]["payload"]["i"] for r in a.records())
    assert all(handled[i] == 1 for i in failed_ids)  # ... and every one came back once
    calls = collections.defaultdict(list)
    for r in a.records():
        calls[r["call"]].append(r)
    assert all(len(c) == c[0]["size"] <= 5 for c in calls.values())
    sizes = sorted(len(c) for c in calls.values())
    # 23 in the queue before the agent starts: four full batches, one of which fails; the
    # 3 left over and the 5 retried (due 0.2 s later) come in batches of at most 5.
    assert sum(sizes) == 23 and sizes.count(5) >= 3
    assert a.logged("a batch of 5 failed") == 1
    assert rabbit.depth(f"{topic}.info") == rabbit.depth(f"{topic}.error") == 0
    assert rabbit.depth(f"{name}.retry") == rabbit.depth(f"{name}.dlq") == 0


def test_batch_timeout_flushes_a_short_batch(rabbit, names, agent, notifiers):
    """A batch that never fills is handed over ``batch_timeout`` after its first message:
    the loop does not block waiting for more."""
    name, topic, exchanges = names
    a = agent(
        name, {"exchanges": exchanges, "topic": topic, "batch_size": 100, "batch_timeout": 0.8}
    )
    a.start(workers=1)
    wait_for(lambda: a.logged("consuming") >= 1, 20, "the agent consuming")
    sender = notifiers(exchanges[1], topic)
    started = time.time()
    sent = [sender.send("info", "image.upload", {"i": i}, "glance.host1") for i in range(3)]
    wait_for(lambda: sum(a.received().values()) == 3, 15, "the short batch")
    took = time.time() - started
    assert a.stop() == 0
    assert a.received() == collections.Counter(sent)
    assert len({r["call"] for r in a.records()}) == 1  # one call, with all 3
    assert 0.7 <= took < 5.0  # by the timeout, not before it, not much after


def test_sigterm_hands_a_partial_batch_back(rabbit, names, agent, notifiers):
    """SIGTERM with a batch still filling: the agent exits at once (it does not wait out
    batch_timeout, nor handle a partial batch); the notifications go back to the queue
    and the next agent handles each of them once."""
    name, topic, exchanges = names
    sender = notifiers(exchanges[0], topic)
    sent = [
        sender.send("info", "compute.instance.exists", {"i": i}, "compute.host1") for i in range(7)
    ]
    declare = {"exchanges": exchanges, "topic": topic, "batch_size": 50, "batch_timeout": 60}
    a = agent(name, declare)
    a.start(workers=1)
    wait_for(lambda: rabbit.depth(f"{topic}.info") == 0, 20, "the 7 taken into a batch")
    started = time.monotonic()
    assert a.stop() == 0
    assert time.monotonic() - started < 10
    assert a.records() == []
    wait_for(lambda: rabbit.depth(f"{topic}.info") == 7, 10, "all 7 back in the queue")

    a.configure(name, {**declare, "batch_timeout": 0.3})
    a.start(workers=1)
    wait_for(lambda: sum(a.received().values()) >= 7, 20, "the 7 handled after a restart")
    assert a.stop() == 0
    assert a.received() == collections.Counter(sent)
    assert rabbit.depth(f"{topic}.info") == 0


# -- pools and filters, side by side with a real oslo.messaging listener ------------------


class OsloListener:
    """``oslo_messaging.get_notification_listener(..., pool=...)`` in this process, with an
    endpoint filtered like the consumerd agent and requeueing ``requeue_once`` once."""

    def __init__(self, exchanges, topic: str, pool: str, publisher_id: str) -> None:
        import threading

        import oslo_messaging
        from oslo_config import cfg

        self.handled: list[tuple] = []
        self.requeued: list[tuple] = []
        self.lock = threading.Lock()
        outer = self

        class Endpoint:
            filter_rule = oslo_messaging.NotificationFilter(publisher_id=publisher_id)

            def info(self, ctxt, publisher_id, event_type, payload, metadata):
                seen = (
                    event_type,
                    json.dumps(payload, sort_keys=True),
                    publisher_id,
                    outer.priority_of(payload),
                )
                with outer.lock:
                    if payload.get("requeue_once") and not outer.requeued:
                        outer.requeued.append(seen)
                        return oslo_messaging.NotificationResult.REQUEUE
                    outer.handled.append(seen)
                return oslo_messaging.NotificationResult.HANDLED

            error = info

        self.conf = cfg.ConfigOpts()
        self.transport = oslo_messaging.get_notification_transport(self.conf, url=OSLO_URL)
        targets = [oslo_messaging.Target(exchange=e, topic=topic) for e in exchanges]
        self.listener = oslo_messaging.get_notification_listener(
            self.transport,
            targets,
            [Endpoint()],
            executor="threading",
            pool=pool,
            allow_requeue=True,
        )
        self.listener.start()

    @staticmethod
    def priority_of(payload) -> str:
        return payload["priority"]

    def stop(self) -> None:
        self.listener.stop()
        self.listener.wait()
        self.transport.cleanup()


@pytest.mark.parametrize("batch_size", [None, 4], ids=["single", "batches"])
def test_pools_get_every_notification_like_oslo_listener_pools(
    rabbit, names, agent, notifiers, batch_size
):
    """One oslo.messaging listener pool and one consumerd pool on the same exchanges, with
    the same publisher_id filter: each gets every matching notification exactly once, and
    the pool-less queues ``<topic>.<priority>`` keep their own copy of all of them. One
    notification is requeued once by each side (NotificationResult.REQUEUE) and comes
    back; with batches consumerd requeues the whole batch."""
    name, topic, exchanges = names
    tag = name.removeprefix("agent")
    oslo_pool, our_pool = f"oslopool{tag}", f"ourpool{tag}"
    rabbit.queues.update({oslo_pool, our_pool})
    publisher_id = r"compute\."
    senders = [notifiers(exchange, topic) for exchange in exchanges]
    # The notifier declares the exchanges and the pool-less queues; the pools' queues
    # exist once their listeners started, as with oslo.messaging.
    senders[0].send("audit", "setup", {}, "setup")
    senders[1].send("audit", "setup", {}, "setup")
    listener = OsloListener(exchanges, topic, oslo_pool, publisher_id)
    try:
        declare = {
            "exchanges": exchanges,
            "topic": topic,
            "priorities": ["info", "error"],
            "pool": our_pool,
            "publisher_id": publisher_id,
        }
        if batch_size:
            declare.update(batch_size=batch_size, batch_timeout=0.3)
        a = agent(name, declare)
        a.start(workers=2)
        wait_for(lambda: a.logged("consuming") >= 2, 20, "both workers consuming")
        wait_for(lambda: rabbit.depth(our_pool) == 0, 5, "our pool's queue declared")

        wanted, filtered, other = [], [], []
        i = 0
        for sender in senders:
            for priority in ("info", "error", "warn"):
                for publisher in (
                    "compute.host1",
                    "compute.host2",
                    "network.host1",
                    "xcompute.host1",
                ):
                    for event_type in ("compute.instance.update", "port.create.end"):
                        i += 1
                        payload = {"i": i, "priority": priority, "requeue_once": i == 3}
                        sent = sender.send(priority, event_type, payload, publisher)
                        if priority == "warn":
                            other.append(sent)
                        elif publisher.startswith("compute."):
                            wanted.append(sent)
                        else:
                            filtered.append(sent)
        assert any(json.loads(w[1])["requeue_once"] for w in wanted)

        wait_for(lambda: sum(a.received().values()) >= len(wanted), 30, "ours, all of them")
        wait_for(lambda: len(listener.handled) >= len(wanted), 30, "oslo's, all of them")
        wait_for(lambda: a.logged(DROPPED) >= len(filtered), 15, "ours dropped the others")
        wait_for(lambda: rabbit.depth(oslo_pool) == 0, 10, "oslo's pool acked")
        assert a.stop() == 0
    finally:
        listener.stop()

    assert a.received() == collections.Counter(wanted)  # each once, as sent
    assert collections.Counter(listener.handled) == collections.Counter(wanted)
    assert len(listener.requeued) == 1 and json.loads(listener.requeued[0][1])["requeue_once"]
    requeued = a.records(".requeue")
    assert any(r["n"]["payload"]["requeue_once"] for r in requeued)
    assert len({r["call"] for r in requeued}) == 1  # one single or batch call, requeued
    assert len(requeued) == requeued[0]["size"] == (1 if batch_size is None else len(requeued))
    assert a.logged(DROPPED) == len(filtered)
    assert rabbit.depth(our_pool) == rabbit.depth(oslo_pool) == 0
    assert rabbit.depth(f"{name}.dlq") == rabbit.depth(f"{name}.retry") == 0
    # the pool-less queues were a third, independent consumer group: every one is there
    infos = sum(1 for s in wanted + filtered if s[3] == "info")
    assert rabbit.depth(f"{topic}.info") == infos
    assert rabbit.depth(f"{topic}.error") == len(wanted) + len(filtered) - infos
    assert rabbit.depth(f"{topic}.warn") == len(other)
    assert rabbit.depth(f"{topic}.audit") == 2
