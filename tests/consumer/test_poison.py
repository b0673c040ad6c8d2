"""No message can stop a queue (#8): on the real Redis, the real RabbitMQ and the embedded
SQLite broker, each kind of poison message sits between good ones — 5 good, 1 poison, 5
good — and ends in ``<queue>.dlq`` with a precise ``consumerd-error``, while all 10 good
ones are handled, at most a few workers die, and nothing is lost (counted in and out)."""

from __future__ import annotations

import base64
import json
import re
import struct
import textwrap
import time
import uuid

import amqp
import pytest
from kombu.utils.json import dumps

from consumerd.consumer import policy
from consumerd.consumer.broker import connect
from consumerd.consumer.transport.store import Store, database_path
from tests.consumer.conftest import (
    AMQP_URL,
    REDIS_URL,
    Broker,
    Consumerd,
    check_broker,
    publish_many,
    wait_for,
)

# Each handled message appends "pid queue id attempt redelivered 0 0" to $T_OUT (the
# conftest's record format); "do" in the body picks a way to misbehave.
APP_SOURCE = """
import json, os, signal
import consumerd

CONFIG = json.load(open(os.environ["T_CONFIG"]))
app = consumerd.App("poison", max_retries=1, retry_delay=0.1)
OUT = os.environ["T_OUT"]

@app.consumer(CONFIG["name"], prefetch=CONFIG.get("prefetch", 4),
              max_deaths=CONFIG.get("max_deaths", 3))
def handle(body, message):
    do = body.get("do") if isinstance(body, dict) else None
    if do == "exit":
        raise SystemExit(3)
    if do == "interrupt":
        raise KeyboardInterrupt
    if do == "base":
        raise BaseException("from the handler")
    if do == "os_exit":
        os._exit(0)
    if do == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    line = (f"{os.getpid()} {message.queue} {body['i']} {message.attempt} "
            f"{int(message.redelivered)} 0 0\\n")
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)
"""

_DEATH = re.compile(r"worker \d+ \(pid \d+\) .* after")


class AnyBroker(Broker):
    """:class:`Broker` for the embedded SQLite broker too, and raw entries for all."""

    def __init__(self, kind: str, url: str, prefix: str = "", name: str = "") -> None:
        super().__init__(kind, url, prefix, name)
        self.path = database_path(url) if kind == "sqlite" else None

    def get(self, queue: str):
        """Take one message off ``queue`` as it is stored, undecoded (a dead letter keeps
        the ``compression`` header kombu could not apply), or None."""
        with connect(self.url) as conn:
            channel = conn.default_channel
            raw = channel.basic_get(queue, no_ack=True)
            return None if raw is None else channel.message_to_python(raw)

    def push_entry(self, queue: str, entry: bytes) -> None:
        """Put ``entry`` on ``queue`` exactly as stored: a Redis list item, an SQLite row."""
        if self.kind == "redis":
            self.client().lpush(self.prefix + queue, entry)
            return
        assert self.path is not None
        try:
            text: str | bytes = entry.decode("utf-8")
        except UnicodeDecodeError:
            text = entry  # sqlite3 stores it as a BLOB
        store = Store(self.path, {})
        store.open()
        try:
            store._write("INSERT INTO messages (queue, payload) VALUES (?, ?)", (queue, text))
        finally:
            store.close()

    def publish_bare(self, queue: str, body: bytes, headers: dict | None = None) -> None:
        """A message with no content type and no content encoding at all."""
        if self.kind == "amqp":
            with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest") as conn:
                channel = conn.channel()
                channel.queue_declare(queue, durable=True, auto_delete=False)
                channel.basic_publish(
                    amqp.Message(body, application_headers=headers or {}),
                    exchange="",
                    routing_key=queue,
                )
            return
        self.push_entry(
            queue,
            dumps(
                {
                    "body": base64.b64encode(body).decode(),
                    "headers": headers or {},
                    "properties": {
                        "body_encoding": "base64",
                        "delivery_tag": str(uuid.uuid4()),
                        "delivery_info": {"exchange": "", "routing_key": queue},
                        "priority": 0,
                        "delivery_mode": 2,
                    },
                }
            ).encode(),
        )


@pytest.fixture(params=["redis", "amqp", "sqlite"])
def any_broker(request, name, tmp_path):
    if request.param == "sqlite":
        return AnyBroker("sqlite", f"sqlite:///{tmp_path}/broker.db")
    url = REDIS_URL if request.param == "redis" else AMQP_URL
    check_broker(url)
    return AnyBroker(request.param, url, f"{name}:" if request.param == "redis" else "", name)


@pytest.fixture
def runner(tmp_path, name, any_broker):
    url = any_broker.url
    if any_broker.kind == "redis":  # a dead worker's messages come back after 3 s
        url = any_broker.consumer_url(visibility_timeout=3)
    c = Consumerd(tmp_path, name, url)
    (tmp_path / "tapp.py").write_text(textwrap.dedent(APP_SOURCE))
    c.configure([], name=name)
    yield c
    c.kill()
    any_broker.cleanup([name])


def _deaths(runner: Consumerd) -> int:
    with open(runner.log, errors="replace") as f:
        return len(_DEATH.findall(f.read()))


def _good(broker: AnyBroker, name: str, start: int) -> None:
    publish_many(broker.url, name, 5, start=start)


def _run(
    runner: Consumerd,
    broker: AnyBroker,
    name: str,
    *,
    workers: int = 1,
    max_deaths: int = 6,
    timeout: float = 60,
) -> object:
    """Run until the 10 good messages are handled and the poison is dead-lettered; check
    the counts; return the dead letter."""
    dlq = f"{name}.dlq"
    runner.start(workers=workers)
    wait_for(lambda: set(runner.ids()) >= set(range(10)), timeout, "the 10 good messages")
    wait_for(lambda: broker.depth(dlq) >= 1, timeout, "the poison in the dead-letter queue")
    deaths = _deaths(runner)
    assert runner.stop() == 0
    assert set(runner.ids()) == set(range(10))
    assert broker.depth(dlq) == 1
    assert broker.depth(name) == 0
    assert broker.depth(f"{name}.retry") == 0
    assert broker.unacked() == 0
    assert deaths <= max_deaths, f"{deaths} worker deaths"
    letter = broker.get(dlq)
    assert letter is not None
    assert letter.headers[policy.TARGET] == name
    return letter


# -- decode errors: headers, bodies, encodings, on every broker ------------------------

DECODE_CASES = {
    "compression-unknown": (
        b'{"i": 99}',
        "application/json",
        {"compression": "x"},
        "undecodable: the body does not decompress as 'x'",
    ),
    "compression-not-gzip": (
        b'{"i": 99}',
        "application/json",
        {"compression": "application/x-gzip"},
        "undecodable: the body does not decompress as 'application/x-gzip'",
    ),
    "attempt-infinity": (
        b'{"i": 99}',
        "application/json",
        {policy.ATTEMPT: float("inf")},
        "undecodable: header consumerd-attempt is inf: not an attempt number",
    ),
    "attempt-1e999": (
        b'{"i": 99}',
        "application/json",
        {policy.ATTEMPT: "1e999"},
        "undecodable: header consumerd-attempt is '1e999': not an attempt number",
    ),
    "attempt-huge": (
        b'{"i": 99}',
        "application/json",
        {policy.ATTEMPT: 2**62},
        "undecodable: header consumerd-attempt is 4611686018427387904: not an attempt",
    ),
    "not-utf8-json": (b'\xff\xfe{"i": 99}', "application/json", None, "undecodable: "),
}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_poison_goes_to_the_dead_letter_queue(runner, any_broker, name, case):
    body, content_type, headers, error = DECODE_CASES[case]
    if case == "attempt-infinity" and any_broker.kind == "amqp":
        # RabbitMQ itself closes the connection (541 INTERNAL_ERROR) on a non-finite
        # float in a header table: such a message cannot reach a queue there.
        pytest.skip("RabbitMQ refuses non-finite floats in headers")
    _good(any_broker, name, 0)
    any_broker.publish_raw(name, body, content_type, headers=headers)
    _good(any_broker, name, 5)
    letter = _run(runner, any_broker, name, max_deaths=0)
    assert letter.body == body
    assert letter.headers[policy.ERROR].startswith(error), letter.headers[policy.ERROR]
    assert letter.headers[policy.ATTEMPT] == 1
    assert runner.logged("Traceback") == 0


def test_no_content_type_is_json_or_dead_lettered(runner, any_broker, name):
    """No content type: a JSON body is handled (not handed over as bytes), another is a
    dead letter."""
    for i in range(5):
        any_broker.publish_bare(name, json.dumps({"i": i}).encode())
    any_broker.publish_bare(name, b"\x80 not json")
    _good(any_broker, name, 5)
    letter = _run(runner, any_broker, name, max_deaths=0)
    assert letter.body == b"\x80 not json"
    assert letter.headers[policy.ERROR].startswith(
        "undecodable: no content type, and the body is not JSON in UTF-8"
    )


def test_retry_copy_with_nan_due_time_stalls_nothing(runner, any_broker, name):
    """A retry copy due at NaN used to sit at the top of the timer heap, holding every
    later retry; now it is a dead letter and the retries around it are released."""

    def retry_copy(i: int, due: float | str) -> None:
        headers = {policy.TARGET: name, policy.RETRY_AT: due, policy.ATTEMPT: 2}
        any_broker.publish_raw(
            f"{name}.retry", json.dumps({"i": i}).encode(), "application/json", headers=headers
        )

    for i in range(5):
        retry_copy(i, time.time() + 0.5)
    # RabbitMQ closes the connection (541 INTERNAL_ERROR) on a NaN float in a header
    # table; a string is the closest a publisher can get there.
    nan = "nan" if any_broker.kind == "amqp" else float("nan")
    retry_copy(99, nan)
    for i in range(5, 10):
        retry_copy(i, time.time() + 0.5)
    letter = _run(runner, any_broker, name, max_deaths=0)
    assert json.loads(letter.body) == {"i": 99}
    assert letter.headers[policy.ERROR] == (
        f"undecodable: header consumerd-retry-at is {nan!r}: not a "
        + ("number" if any_broker.kind == "amqp" else "finite number")
    )
    assert {r.attempt for r in runner.records()} == {2}


# -- handlers that raise BaseException or kill their worker ----------------------------


@pytest.mark.parametrize(
    ("do", "error"),
    [
        ("exit", "SystemExit: 3"),
        ("interrupt", "KeyboardInterrupt: "),
        ("base", "BaseException: from the handler"),
    ],
)
def test_handler_base_exception_is_a_handler_failure(runner, any_broker, name, do, error):
    _good(any_broker, name, 0)
    publish_many(any_broker.url, name, 1, start=99, do=do)
    _good(any_broker, name, 5)
    letter = _run(runner, any_broker, name, max_deaths=0)
    assert json.loads(letter.body) == {"i": 99, "do": do}
    assert letter.headers[policy.ERROR] == error
    assert letter.headers[policy.ATTEMPT] == 2  # retried once (max_retries=1), then dead


@pytest.mark.parametrize("do", ["os_exit", "sigkill"])
def test_handler_killing_its_worker_is_dead_lettered_after_max_deaths(runner, any_broker, name, do):
    runner.configure([], name=name, max_deaths=3, prefetch=1)
    _good(any_broker, name, 0)
    publish_many(any_broker.url, name, 1, start=99, do=do)
    _good(any_broker, name, 5)
    letter = _run(runner, any_broker, name, workers=2, max_deaths=5, timeout=120)
    assert json.loads(letter.body) == {"i": 99, "do": do}
    assert letter.headers[policy.ERROR] == "worker died while handling this message, 3 times"
    assert _deaths(runner) >= 3


# -- stored entries that are not kombu envelopes (Redis lists, SQLite rows) ------------


def _envelope(**changes) -> bytes:
    payload = {
        "body": base64.b64encode(b'{"i": 99}').decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": "q"},
            "priority": 0,
            "delivery_mode": 2,
        },
    }
    for key, value in changes.items():
        if key in payload["properties"] and key not in payload:
            payload["properties"][key] = value
        else:
            payload[key] = value
    return dumps(payload).encode()


ENVELOPE_CASES = {
    "not-json": (b"\xff\x00 not json at all \x80", "the entry is not a JSON object"),
    "json-not-object": (b"[1, 2, 3]", "the entry is"),
    "no-delivery-tag": (_envelope(delivery_tag=None), "delivery_tag is"),
    "body-not-base64": (_envelope(body="not base64!"), "the body is not base64"),
    "headers-a-list": (_envelope(headers=["a", "b"]), "headers are list"),
    "headers-a-string": (_envelope(headers="a=b"), "headers are str"),
}


@pytest.mark.parametrize("case", sorted(ENVELOPE_CASES))
def test_entry_that_is_not_an_envelope_is_moved_raw_to_the_dead_letter_queue(
    runner, any_broker, name, case
):
    if any_broker.kind == "amqp":
        pytest.skip("AMQP messages are frames, not stored envelopes")  # by design, not a gap
    entry, reason = ENVELOPE_CASES[case]
    if case == "no-delivery-tag" and any_broker.kind == "sqlite":
        pytest.skip("an SQLite row's delivery tag is its row id: none is needed")
    _good(any_broker, name, 0)
    any_broker.push_entry(name, entry)
    _good(any_broker, name, 5)
    letter = _run(runner, any_broker, name, max_deaths=0)
    assert letter.body == entry  # byte for byte
    error = letter.headers[policy.ERROR]
    assert error.startswith("undecodable: not a kombu message envelope: "), error
    assert reason in error, error
    assert runner.logged("Traceback") == 0


# -- frames py-amqp cannot decode --------------------------------------------------------


class _Timestamp(int):
    """Seconds written as an AMQP timestamp ('T'), whatever datetime can hold."""


def test_amqp_timestamp_out_of_datetime_range_is_dead_lettered(
    runner, any_broker, name, monkeypatch
):
    """py-amqp decodes header tables while reading the frame: a timestamp past year 9999
    raised inside drain_events, so the worker reconnected and got the same message again,
    for ever. Now it is a decode error like any other."""
    if any_broker.kind != "amqp":
        pytest.skip("AMQP frames only")
    import amqp.serialization

    original = amqp.serialization._write_item

    def write_item(value, write, bits):  # what another client may send
        if isinstance(value, _Timestamp):
            write(struct.pack(">cQ", b"T", int(value)))
            return
        original(value, write, bits)

    monkeypatch.setattr(amqp.serialization, "_write_item", write_item)
    _good(any_broker, name, 0)
    far = _Timestamp(2**62)
    any_broker.publish_raw(name, b'{"i": 99}', "application/json", headers={"at": far})
    _good(any_broker, name, 5)
    letter = _run(runner, any_broker, name, max_deaths=0)
    assert letter.body == b'{"i": 99}'
    assert letter.headers[policy.ERROR] == (
        f"undecodable: header at is an AMQP timestamp out of range ({2**62} s)"
    )
    assert letter.headers["at"] == 2**62  # kept, as a long
    assert runner.logged("lost the broker") == 0
