"""Fast unit tests of the consumer logic: no broker process (fakeredis where one is needed)."""

from __future__ import annotations

import json
import os
import time
import zlib

import fakeredis
import pytest

import consumerd
from consumerd import config
from consumerd.consumer import broker, deaths, loading, policy, routing
from consumerd.consumer.app import ConsumerSpec, Delivery
from consumerd.consumer.deaths import DeathCounter
from consumerd.consumer.loop import Loop
from consumerd.consumer.ownership import Leases, Membership
from consumerd.consumer.session import Binding

# -- routing ------------------------------------------------------------------------------


def test_partition_hash_is_crc32_and_stable_across_processes():
    assert routing.partition_of("resource-42", 8) == zlib.crc32(b"resource-42") % 8
    # pinned values: a change here re-routes every key of every deployed app
    assert zlib.crc32(b"resource-42") == 1398470339
    assert routing.partition_of("resource-42", 8) == 3
    assert [routing.partition_of(f"k{i}", 8) for i in range(8)] == [7, 1, 3, 5, 6, 0, 2, 4]
    assert routing.partition_of(b"resource-42", 8) == routing.partition_of("resource-42", 8)
    assert routing.partition_of(42, 8) == routing.partition_of("42", 8)


def test_partition_map_covers_every_partition_exactly_once():
    for partitions in (1, 7, 8, 16):
        for members in (1, 2, 3):
            for workers in (1, 2, 3, 5):
                total = members * workers
                seen = []
                for member in range(members):
                    for worker in range(workers):
                        me = routing.global_worker(worker, workers, member)
                        seen += routing.owned_partitions(partitions, me, total)
                assert sorted(seen) == list(range(partitions))


def test_owner_is_p_mod_total():
    assert routing.owned_partitions(8, 1, 3) == [1, 4, 7]
    assert all(routing.owner_of(p, 3) == p % 3 for p in range(8))


@pytest.mark.parametrize("text", ["1", "a/b", "2/2", "0/0", "-1/2", "1/", "/2"])
def test_bad_member(text):
    with pytest.raises(ValueError):
        config.parse_member(text)


def test_member():
    assert config.parse_member("1/3") == (1, 3)
    assert config.parse_member([1, 3]) == (1, 3)


# -- policy -------------------------------------------------------------------------------


def test_retry_delays_grow_then_dead_letter():
    rp = policy.RetryPolicy(max_retries=3, delay=0.5, max_delay=1.5)
    assert [rp.delay_after(a) for a in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, None]
    assert policy.RetryPolicy(max_retries=0).delay_after(1) is None


def test_attempt_header_parsing():
    assert policy.attempt_of(None) == 1
    assert policy.attempt_of({policy.ATTEMPT: 3}) == 3
    assert policy.attempt_of({policy.ATTEMPT: "junk"}) == 1
    assert policy.attempt_of({policy.ATTEMPT: 0}) == 1


def test_dead_letter_headers_keep_the_user_headers():
    headers = policy.dead_letter_headers(
        {"trace": "x", policy.RETRY_AT: 1.0, policy.ATTEMPT: 4}, "E: boom", "q.p1"
    )
    assert time.time() - headers.pop(policy.DEAD_AT) < 5
    assert headers == {
        "trace": "x",
        policy.ATTEMPT: 4,
        policy.ERROR: "E: boom",
        policy.TARGET: "q.p1",
    }
    assert len(policy.describe_error(ValueError("x" * 5000))) == 2000


# -- app ----------------------------------------------------------------------------------


def test_app_declarations_and_routing():
    app = consumerd.App("a", prefetch=7)

    @app.consumer("orders", prefetch=50)
    def orders(body, message):
        pass

    @app.consumer("samples", partitions=4)
    def samples(body, message):
        pass

    assert app.consumers["orders"].queue_names == ["orders"]
    assert app.consumers["samples"].queue_names == [f"samples.p{p}" for p in range(4)]
    assert app.prefetch_of(app.consumers["orders"], 3) == 50
    assert app.prefetch_of(app.consumers["samples"], 3) == 3
    assert app.prefetch_of(app.consumers["samples"]) == 7
    key_queue = f"samples.p{routing.partition_of('r1', 4)}"
    assert app.route("samples", "r1") == (key_queue, True)
    assert app.route("orders", "r1") == ("orders", False)
    assert app.route("unknown") == ("unknown", False)
    assert {app.route("samples")[0] for _ in range(8)} == {f"samples.p{p}" for p in range(4)}


@pytest.mark.parametrize("kwargs", [{"partitions": 0}, {"prefetch": -1}, {"partitions": True}])
def test_bad_declarations(kwargs):
    app = consumerd.App("a")
    with pytest.raises(ValueError):
        app.consumer("x", **kwargs)


def test_duplicate_consumer():
    app = consumerd.App("a")
    app.consumer("x")(lambda b, m: None)
    with pytest.raises(ValueError, match="declared twice"):
        app.consumer("x")(lambda b, m: None)


def test_publish_on_fakeredis_uses_the_same_routing(monkeypatch):
    from kombu.transport import redis as kombu_redis

    server = fakeredis.FakeServer()
    original = kombu_redis.Channel._connparams

    def fake_params(self, asynchronous=False):
        params = original(self, asynchronous)
        params.update(connection_class=fakeredis.FakeRedisConnection, server=server)
        return params

    monkeypatch.setattr(kombu_redis.Channel, "_connparams", fake_params)
    monkeypatch.setattr(broker, "_REDIS_TRANSPORT", "redis")
    monkeypatch.setitem(broker._TRANSPORTS, "redis", "redis")
    app = consumerd.App("a", broker="redis://127.0.0.1:1/0")
    app.consumer("samples", partitions=8)(lambda b, m: None)
    monkeypatch.delenv(broker.ENV_VAR, raising=False)
    for n in range(20):
        app.publish("samples", {"n": n}, key=f"res-{n % 3}", headers={"h": "1"})
    app.close()
    client = fakeredis.FakeRedis(server=server)
    expected = {}
    for n in range(20):
        queue = f"samples.p{routing.partition_of(f'res-{n % 3}', 8)}"
        expected[queue] = expected.get(queue, 0) + 1
    assert {q: client.llen(q) for q in expected} == expected
    payload = json.loads(client.rpop(next(iter(expected))))
    assert payload["content-type"] == "application/json"
    # the key rides along: a worker running several handlers keeps its messages in order
    assert payload["headers"] == {"h": "1", "consumerd-key": "res-0"}


# -- broker URLs --------------------------------------------------------------------------


def test_broker_resolution_order(monkeypatch):
    monkeypatch.delenv(broker.ENV_VAR, raising=False)
    assert broker.resolve_url(None, None) == broker.default_url()
    assert broker.default_url() == "sqlite:///" + os.path.abspath(".consumerd/broker.db")
    assert broker.resolve_url(None, "redis://app") == "redis://app"
    monkeypatch.setenv(broker.ENV_VAR, "redis://env")
    assert broker.resolve_url(None, "redis://app") == "redis://env"
    assert broker.resolve_url("amqp://cli", "redis://app") == "amqp://cli"


def test_redact_and_validate():
    assert broker.redact("amqp://u:secret@h:5672//") == "amqp://u:***@h:5672//"
    assert broker.validate("rediss://h:6380/1") == "rediss"
    assert broker.validate("sqlite:////tmp/x.db") == "sqlite"
    assert broker.validate("sqlite:///x.db") == "sqlite"
    for bad in ("nope", "://x", "zmq://h", "redis://h:notaport/0", "sqlite://x.db", "sqlite:///"):
        with pytest.raises(broker.BrokerURLError):
            broker.validate(bad)


def test_query_becomes_transport_options():
    conn = broker.connect("redis://127.0.0.1:6379/0?visibility_timeout=30&x=y")
    assert conn.transport_options == {
        "visibility_timeout": 30,
        "x": "y",
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "unacked_mutex_expire": 15,
    }
    amqp = broker.connect("amqp://guest:guest@127.0.0.1:5672//")
    assert amqp.transport_options == {"confirm_publish": True}


# -- loading ------------------------------------------------------------------------------


def test_load_app_reload_gives_fresh_declarations(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = tmp_path / "reloadme_app.py"
    mod.write_text("import consumerd\napp = consumerd.App('r')\napp.consumer('a')(print)\n")
    first = loading.load_app("reloadme_app")
    assert list(first.consumers) == ["a"]
    mod.write_text("import consumerd\napp = consumerd.App('r')\napp.consumer('b')(print)\n")
    os.utime(mod, (time.time() + 5, time.time() + 5))
    assert list(loading.load_app("reloadme_app").consumers) == ["a"]  # cached module
    assert list(loading.load_app("reloadme_app", reload=True).consumers) == ["b"]


# -- ownership ----------------------------------------------------------------------------


def test_leases_are_exclusive_and_released(tmp_path):
    a, b = Leases(str(tmp_path)), Leases(str(tmp_path))
    assert a.try_acquire("q.p0")
    assert a.try_acquire("q.p0")  # idempotent for the holder
    assert not b.try_acquire("q.p0")
    a.release("q.p0")
    assert b.try_acquire("q.p0")
    b.release_all()
    assert a.try_acquire("q.p0")


def test_a_lease_names_its_holder_only_while_held(tmp_path):
    """The web page's partition map reads the pid in a lease file: after a release it
    must not name the process that let go (it is still alive)."""
    here, there = Leases(str(tmp_path)), os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: take, say so, wait, release, say so, wait to be killed
        os.close(there[0])
        child = Leases(str(tmp_path))
        child.try_acquire("q.p0")
        os.write(there[1], b"1")
        os.read(go_r, 1)
        child.release("q.p0")
        os.write(there[1], b"2")
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(there[0], 1) == b"1"
        assert here.holder("q.p0") == pid
        os.write(go_w, b"x")
        assert os.read(there[0], 1) == b"2"
        assert here.holder("q.p0") is None
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)


def test_the_in_flight_record_tells_what_is_in_hand_since_when(tmp_path):
    record = DeathCounter(str(tmp_path), "app.0")
    scope_root = str(tmp_path)
    assert deaths.in_hand(scope_root, "app.0", os.getpid()) == []
    before = time.time()
    record.handling("id:first")
    record.handling("id:" + "x" * 400, slot=3)  # cut to what a slot holds
    after = time.time()
    found = deaths.in_hand(scope_root, "app.0", os.getpid())
    assert [identity for identity, _ in found] == ["id:first", "id:" + "x" * 242]
    assert all(before <= since <= after for _, since in found)
    record.settled()
    assert [identity for identity, _ in deaths.in_hand(scope_root, "app.0", os.getpid())] == [
        "id:" + "x" * 242
    ]
    record.close()
    assert deaths.in_hand(scope_root, "app.0", os.getpid()) == []


def test_membership_grows_at_once_and_shrinks_after_grace(tmp_path):
    m = Membership(str(tmp_path), "g", 0, hint=2, grace=1.0)
    m.join()
    assert m.workers(now=0.0) == 2  # the hint until a look says otherwise... for a grace
    assert m.workers(now=0.5) == 2
    assert m.workers(now=1.6) == 1
    with open(os.path.join(m.dir, "3"), "w") as f:
        f.write(str(os.getpid()))  # a live process in slot 3
    assert m.workers(now=1.7) == 4
    with open(os.path.join(m.dir, "3"), "w") as f:
        f.write("999999999")  # dead
    assert m.workers(now=1.8) == 4
    assert m.workers(now=2.9) == 1
    m.leave()
    assert not os.path.exists(os.path.join(m.dir, "0"))


# -- the handling decisions of the loop (no broker) ---------------------------------------


class FakeMessage:
    def __init__(self, body, content_type="application/json", headers=None, queue="q"):
        self.body = body
        self.content_type = content_type
        self.content_encoding = "utf-8"
        self.headers = headers or {}
        self.delivery_info = {"routing_key": queue}
        self.properties = {"message_id": "m-1"}
        self.acked = False
        self.channel = None
        self.errors = []

    @property
    def acknowledged(self):
        return self.acked

    def decode(self):
        if self.content_type != "application/json":
            from kombu.exceptions import ContentDisallowed

            raise ContentDisallowed(f"Refusing to deserialize {self.content_type}")
        return json.loads(self.body)

    def ack(self):
        self.acked = True


class FakeProducer:
    def __init__(self):
        self.sent = []

    def publish(self, body, **kwargs):
        self.sent.append((body, kwargs))


@pytest.fixture
def loop(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    app = consumerd.App("u", max_retries=2, retry_delay=1.0)
    calls = []

    @app.consumer("q")
    def handle(body, message):
        calls.append((body, message.attempt, message.redelivered))
        if body.get("fail"):
            raise ValueError("nope")

    loop = Loop(app, 0, config.Config({"app": "x", "broker": "redis://127.0.0.1:1/0"}, {}))
    loop._settler.publisher = FakeProducer()
    loop.calls = calls
    loop.binding = Binding(app.consumers["q"], 10)
    return loop


def test_success_acks(loop):
    message = FakeMessage(b'{"a": 1}', headers={"redelivered": True})
    loop._on_message(loop.binding, message)
    assert message.acked
    assert loop.calls == [({"a": 1}, 1, True)]
    assert loop._settler.publisher.sent == []


@pytest.mark.parametrize(
    ("body", "ctype"),
    [(b"{x", "application/json"), (b"\x80\x04K\x01.", "application/x-python-serialize")],
)
def test_undecodable_goes_straight_to_dead_letters(loop, body, ctype):
    message = FakeMessage(body, content_type=ctype)
    loop._on_message(loop.binding, message)
    assert message.acked
    assert loop.calls == []
    ((sent, kwargs),) = loop._settler.publisher.sent
    assert sent == body
    assert kwargs["routing_key"] == "q.dlq"
    assert kwargs["headers"][policy.ERROR].startswith("undecodable: ")


def test_delivery_exposes_headers_and_attempt():
    headers = {policy.ATTEMPT: 2, "x-trace": "abc"}
    d = Delivery(FakeMessage(b"{}", headers=headers), "q.p1")
    assert (d.queue, d.attempt, d.redelivered) == ("q.p1", 2, False)
    assert d.headers == headers and d.delivery_info == {"routing_key": "q"}
    # Redelivered as the broker says it (AMQP), or as the Redis/SQLite transports mark it.
    by_broker = FakeMessage(b"{}")
    by_broker.delivery_info["redelivered"] = True
    by_transport = FakeMessage(b"{}", headers={"redelivered": True})
    assert Delivery(by_broker, "q").redelivered and Delivery(by_transport, "q").redelivered
    assert Delivery(FakeMessage(b"{}"), "q").attempt == 1  # no header: the first attempt
    spec = ConsumerSpec("q", print, None, 4, policy.RetryPolicy())
    assert [spec.queue_name(p) for p in (None, 0, 3)] == ["q", "q.p0", "q.p3"]
    assert spec.queue_names == ["q.p0", "q.p1", "q.p2", "q.p3"]
