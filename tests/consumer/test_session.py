"""The broker session (consumerd/consumer/session.py) against the real brokers, without a
loop: it connects, binds, delivers to its callback, keeps its sweep's deadline, closes."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time

import kombu.exceptions
import pytest

import consumerd
from consumerd.consumer import acks, retries
from consumerd.consumer import broker as brokers
from consumerd.consumer.session import EX_TEMPFAIL, RESTORE_RANGE, Session
from tests.consumer.conftest import REDIS_URL
from tests.helpers import wait_for

VISIBILITY = 8.0  # Redis: a sweep every VISIBILITY / 4 seconds


def _refuse(*args):
    raise AssertionError(f"no retry copy expected here: {args}")


def _session(url, is_amqp, received, opened, stop):
    probe = brokers.connect(url)
    ack = acks.Acks(batched=is_amqp)
    return Session(
        url,
        amqp=is_amqp,
        heartbeat=0,
        recoverable=(*probe.connection_errors, kombu.exceptions.OperationalError, OSError),
        acker=ack,
        retries=retries.Retries(republish=_refuse, dead_letter=_refuse, ack=_refuse),
        receive=lambda binding, message: received.append((binding, message)),
        opened=opened.append,
        sleep=stop.wait,
        stop=stop,
    ), ack


def _app(name):
    app = consumerd.App(name)
    app.consumer(name)(lambda body, message: None)
    return app


def test_a_session_consumes_acks_and_closes(broker, name):
    is_amqp = broker.kind == "amqp"
    received, opened, stop = [], [], threading.Event()
    session, ack = _session(
        broker.consumer_url(visibility_timeout=VISIBILITY), is_amqp, received, opened, stop
    )
    try:
        before = time.monotonic()
        session.connect(_app(name), lambda spec: 10, limit=30)
        binding = session.bindings[name]
        assert session.conn is not None and binding.channel is not None
        assert opened == [binding]
        if is_amqp:
            assert session.deadline() == math.inf  # RabbitMQ requeues a dead worker's itself
        else:
            period = min(RESTORE_RANGE[1], max(RESTORE_RANGE[0], VISIBILITY / 4))
            assert before + period <= session.deadline() <= time.monotonic() + period
        for i in range(3):
            broker.publish_raw(name, json.dumps({"i": i}).encode(), "application/json")

        def drained():
            with contextlib.suppress(socket.timeout):
                session.conn.drain_events(timeout=0.05)
            return len(received) >= 3

        wait_for(drained, what="3 deliveries")
        assert len(received) == 3
        assert all(b is binding for b, _ in received)
        assert sorted(m.decode()["i"] for _, m in received) == [0, 1, 2]
        for _, message in received:
            ack.delivered(message)
            ack.ack(message)
        ack.flush()
        due = session.deadline()
        session.restore_due(min(due - 0.001, time.monotonic()))  # not due: nothing moves
        assert session.deadline() == due
        if not is_amqp:
            session.restore_due(due)
            assert session.deadline() > due
        session.close()
        assert session.conn is None
        wait_for(lambda: broker.unacked() == 0, what="no message left unacked")
        assert broker.depth(name) == 0
    finally:
        session.close()  # a second close is a no-op
        broker.cleanup([name])


def _unreachable_url(broker):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return broker.consumer_url(port=port)


def test_a_broker_out_of_reach_past_the_limit_exits_tempfail(broker, name):
    received, opened, stop = [], [], threading.Event()
    session, _ = _session(_unreachable_url(broker), broker.kind == "amqp", received, opened, stop)
    with pytest.raises(SystemExit) as exited:
        session.connect(_app(name), lambda spec: 10, limit=0.5)
    assert exited.value.code == EX_TEMPFAIL
    assert session.conn is None and opened == []


def test_a_stop_while_the_broker_is_out_of_reach_returns_unconnected(broker, name):
    received, opened, stop = [], [], threading.Event()
    session, _ = _session(_unreachable_url(broker), broker.kind == "amqp", received, opened, stop)
    stop.set()
    session.connect(_app(name), lambda spec: 10, limit=30)  # no SystemExit
    assert session.conn is None and opened == []


def test_a_reconnect_without_a_wake_channel_keeps_no_old_sweep(name):
    """A Redis at maxmemory refuses the wake queue at a reconnect: the session consumes
    without one, and the sweep deadline of the connection before must not fire on it
    (it swept through the wake channel: None.qos, a crash on every reconnect)."""
    received, opened, stop = [], [], threading.Event()
    session, _ = _session(
        f"{REDIS_URL}?visibility_timeout={VISIBILITY}", False, received, opened, stop
    )
    try:
        session.connect(_app(name), lambda spec: 10, limit=30)
        assert session.deadline() < math.inf
        session.abandon()  # the connection was lost

        def full() -> None:
            raise kombu.exceptions.OperationalError(
                "OOM command not allowed when used memory > 'maxmemory'."
            )

        session._bind_wake = full  # type: ignore[method-assign]
        session.connect(_app(name), lambda spec: 10, limit=30)
        assert session.conn is not None and session.deadline() == math.inf
        session.restore_due(time.monotonic() + 3600)  # nothing due, nothing raised
    finally:
        session.close()
        brokers.connect(REDIS_URL).default_channel.client.delete(name)
