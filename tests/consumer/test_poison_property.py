"""Property tests (hypothesis) of issue #8's invariant on the decode path, no broker needed:
whatever the headers, their types, the content type and encoding, the body, the envelope
and whatever the handler does, a delivery ends in exactly one of handled-and-acked,
retried (a copy to ``<q>.retry``, then acked) or dead-lettered (a copy to ``<q>.dlq``
with a ``consumerd-error``, then acked); nothing escapes the loop; nothing is unpickled.
Stored envelopes (Redis, SQLite) are checked by the transports first: a bad one becomes a
dead letter whose body is the entry byte for byte.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
import pickle
import uuid

import amqp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.transport import pyamqp, virtual
from kombu.utils.json import dumps, loads

import consumerd
from consumerd import config
from consumerd.consumer import policy
from consumerd.consumer.loop import Loop
from consumerd.consumer.session import Binding
from consumerd.consumer.transport import envelope

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class Channel:
    """What a kombu message needs of its channel: acks and the virtual body codecs."""

    codecs = virtual.Channel.codecs
    no_ack_consumers = None

    def __init__(self) -> None:
        self.acks: list[object] = []

    decode_body = virtual.Channel.decode_body

    def basic_ack(self, tag, multiple=False):
        self.acks.append(tag)

    def basic_reject(self, tag, requeue=False):
        self.acks.append(tag)


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[object, dict]] = []

    def publish(self, body, **kwargs):
        # what the real producer does with headers: JSON on Redis/SQLite (AMQP tables
        # are checked by the integration tests)
        json.dumps(kwargs.get("headers"), default=repr)
        self.sent.append((body, kwargs))


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no")


BEHAVIOURS = {
    "return": lambda: None,
    "raise": lambda: (_ for _ in ()).throw(ValueError("nope")),
    "exit": lambda: (_ for _ in ()).throw(SystemExit(3)),
    "interrupt": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
    "base": lambda: (_ for _ in ()).throw(BaseException("b")),
    "unprintable": lambda: (_ for _ in ()).throw(Unprintable()),
}


@pytest.fixture
def loop(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    app = consumerd.App("prop", max_retries=2, retry_delay=0.1)
    state = {"calls": [], "do": "return", "ack_itself": False}

    @app.consumer("q")
    def handle(body, message):
        assert not isinstance(body, bytes | bytearray)  # JSON, never raw bytes
        state["calls"].append(body)
        if state["ack_itself"]:
            message.raw.ack()
        BEHAVIOURS[state["do"]]()

    loop = Loop(app, 0, config.Config({"app": "x", "broker": "redis://127.0.0.1:1/0"}, {}))
    loop._settler.publisher = Producer()
    loop.state = state
    loop.binding = Binding(app.consumers["q"], 10)
    return loop


# -- generated junk ---------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)
amqp_scalars = st.one_of(
    json_scalars,
    st.binary(max_size=20),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6
    ),
    st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(9999, 1, 1)),
)
own_header_values = st.one_of(
    json_scalars,
    st.sampled_from(
        [
            float("inf"),
            float("-inf"),
            float("nan"),
            1e999,
            2**64,
            "1e999",
            "Infinity",
            "NaN",
            "3",
            " 2 ",
            "²",
            0,
            -1,
            True,
        ]
    ),
)
headers = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(
            st.sampled_from(
                [
                    policy.ATTEMPT,
                    policy.RETRY_AT,
                    policy.TARGET,
                    "compression",
                    "redelivered",
                    "x-delivery-count",
                ]
            ),
            st.text(max_size=10),
        ),
        st.one_of(
            own_header_values,
            json_values,
            st.sampled_from(
                ["x", "application/x-gzip", "gzip", "zlib", "application/x-bz2", "q", "q.retry"]
            ),
        ),
        max_size=5,
    ),
)
content_types = st.one_of(
    st.none(),
    st.just(""),
    st.sampled_from(
        [
            "application/json",
            "application/x-python-serialize",
            "application/data",
            "application/text",
            "text/plain",
            "application/x-yaml",
            "application/x-msgpack",
        ]
    ),
    st.text(max_size=10),
)
content_encodings = st.one_of(
    st.none(),
    st.sampled_from(["utf-8", "binary", "latin-1", "x-unknown", "utf-16", ""]),
    st.text(max_size=5),
)
bodies = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.just(pickle.dumps({"i": 1})),
    st.just(b'{"i": 1}'),
)


def _check_outcome(loop, message, channel, calls_before):
    sent = loop._settler.publisher.sent
    called = len(loop.state["calls"]) > calls_before
    assert len(channel.acks) <= 1 or loop.state["ack_itself"]
    assert message.acknowledged, "every delivery is settled"
    if not sent:
        assert called and loop.state["do"] == "return", "acked without a copy: handled"
        return
    assert len(sent) == 1, sent
    _, kwargs = sent[0]
    assert kwargs["routing_key"] in ("q.retry", "q.dlq")
    if kwargs["routing_key"] == "q.dlq":
        error = kwargs["headers"][policy.ERROR]
        assert isinstance(error, str) and error
        assert called or error.startswith(("undecodable: ", "worker died"))
    else:
        assert called and loop.state["do"] != "return"
        assert math.isfinite(kwargs["headers"][policy.RETRY_AT])


@SETTINGS
@given(
    body=bodies,
    headers=headers,
    content_type=content_types,
    content_encoding=content_encodings,
    do=st.sampled_from(sorted(BEHAVIOURS)),
    ack_itself=st.booleans(),
    redelivered=st.booleans(),
)
def test_any_amqp_delivery_is_settled_exactly_once(
    loop, *, body, headers, content_type, content_encoding, do, ack_itself, redelivered
):
    loop.state.update(do=do, ack_itself=ack_itself)
    loop._settler.publisher.sent.clear()
    channel = Channel()
    properties = {"application_headers": headers}
    if content_type is not None:
        properties["content_type"] = content_type
    if content_encoding is not None:
        properties["content_encoding"] = content_encoding
    raw = amqp.Message(body, **properties)
    raw.delivery_info = {"routing_key": "q", "delivery_tag": 7, "redelivered": redelivered}
    message = pyamqp.Message(raw, channel=channel)
    before = len(loop.state["calls"])
    loop._on_message(loop.binding, message)
    _check_outcome(loop, message, channel, before)


def _payload(body, headers, content_type, content_encoding, body_encoding):
    payload = {
        "body": base64.b64encode(body).decode()
        if body_encoding == "base64"
        else body.decode("latin-1"),
        "headers": headers,
        "properties": {
            "body_encoding": body_encoding,
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": "q"},
            "priority": 0,
            "delivery_mode": 2,
        },
    }
    if content_type is not None:
        payload["content-type"] = content_type
    if content_encoding is not None:
        payload["content-encoding"] = content_encoding
    return payload


@SETTINGS
@given(
    body=bodies,
    headers=headers,
    content_type=content_types,
    content_encoding=content_encodings,
    do=st.sampled_from(sorted(BEHAVIOURS)),
    body_encoding=st.sampled_from(["base64", None]),
)
def test_any_stored_envelope_is_settled_exactly_once(
    loop, *, body, headers, content_type, content_encoding, do, body_encoding
):
    loop.state.update(do=do, ack_itself=False)
    loop._settler.publisher.sent.clear()
    channel = Channel()
    payload = loads(dumps(_payload(body, headers, content_type, content_encoding, body_encoding)))
    assert envelope.error_of(payload) is None
    message = virtual.Message(payload, channel=channel)
    before = len(loop.state["calls"])
    loop._on_message(loop.binding, message)
    _check_outcome(loop, message, channel, before)


envelope_junk = st.one_of(
    st.binary(max_size=80),
    json_values.map(lambda v: dumps(v).encode()),
    st.builds(
        lambda p, drop, change: dumps(_mutate(p, drop, change)).encode(),
        st.builds(
            _payload,
            bodies,
            headers,
            content_types,
            content_encodings,
            st.sampled_from(["base64", None]),
        ),
        st.sampled_from(
            [
                None,
                "body",
                "headers",
                "properties",
                "delivery_tag",
                "delivery_info",
                "body_encoding",
            ]
        ),
        st.tuples(
            st.sampled_from(
                [
                    "body",
                    "headers",
                    "properties",
                    "delivery_tag",
                    "delivery_info",
                    "body_encoding",
                    "content-type",
                    "priority",
                    "routing_key",
                ]
            ),
            json_values,
        ),
    ),
)


def _mutate(payload, drop, change):
    properties = payload["properties"]
    places = [payload, properties, properties["delivery_info"]]
    for where in places:
        where.pop(drop, None)
    key, value = change
    for where in places:
        if key in where:
            where[key] = value
    return payload


@SETTINGS
@given(entry=envelope_junk)
def test_any_stored_entry_is_a_message_or_a_raw_dead_letter(entry):
    """What the transports do with a stored entry: kombu can make a message of it (and
    the loop then settles it, above), or it becomes a dead letter holding it exactly."""
    try:
        payload = loads(entry.decode("utf-8", "replace"))
        reason = envelope.error_of(payload)
    except Exception as exc:
        reason = f"not JSON: {exc}"
    if reason is None:
        message = virtual.Message(payload, channel=Channel())  # does not raise
        assert isinstance(message.headers, dict)
        return
    letter = loads(dumps(envelope.dead_letter(entry, "q", "q.dlq", reason)))
    assert envelope.error_of(letter) is None
    message = virtual.Message(letter, channel=Channel())
    assert message.body == entry
    assert message.headers[policy.ERROR].startswith("undecodable: not a kombu message envelope")


@SETTINGS
@given(headers=headers, body=bodies)
def test_any_retry_copy_is_held_released_or_dead_lettered(loop, headers, body):
    loop._settler.publisher.sent.clear()
    channel = Channel()
    loop._retries.watch(channel, loop._app.consumers)  # the loop's publisher, a fake producer
    raw = amqp.Message(body, application_headers=headers, content_type="application/json")
    raw.delivery_info = {"routing_key": "q.retry", "delivery_tag": 1}
    message = pyamqp.Message(raw, channel=channel)
    loop._retries.receive(message)
    if loop._retries.deadline() != math.inf:
        assert math.isfinite(loop._retries.deadline()) and not message.acknowledged
        assert loop._settler.publisher.sent == []
        return
    assert message.acknowledged
    ((_, kwargs),) = loop._settler.publisher.sent
    if kwargs["routing_key"] == "q.dlq":
        assert kwargs["headers"][policy.ERROR].startswith("undecodable: ")
    else:
        assert kwargs["routing_key"] == headers[policy.TARGET]


def test_unpickling_never_happens(loop, monkeypatch):
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    channel = Channel()
    raw = amqp.Message(
        pickle.dumps({"i": 1}),
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    raw.delivery_info = {"routing_key": "q", "delivery_tag": 1}
    message = pyamqp.Message(raw, channel=channel)
    loop._on_message(loop.binding, message)
    ((_, kwargs),) = loop._settler.publisher.sent
    assert kwargs["routing_key"] == "q.dlq"
    assert "ContentDisallowed" in kwargs["headers"][policy.ERROR]


def test_decimals_and_dates_survive(loop):
    """AMQP-only header types reach the dead letter (the producer re-encodes them)."""
    channel = Channel()
    raw = amqp.Message(
        b"junk",
        content_type="application/json",
        application_headers={"d": decimal.Decimal("1.5"), "t": datetime.datetime(2020, 1, 1)},
    )
    raw.delivery_info = {"routing_key": "q", "delivery_tag": 1}
    message = pyamqp.Message(raw, channel=channel)
    loop._on_message(loop.binding, message)
    ((_, kwargs),) = loop._settler.publisher.sent
    assert kwargs["headers"]["d"] == decimal.Decimal("1.5")
