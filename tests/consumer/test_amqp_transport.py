"""consumerd's AMQP transport (py-amqp's, reading the socket in chunks) on the real
RabbitMQ: every delivery arrives whole and in order whatever its size and however the
bytes are cut on the way, including a wait that times out in the middle of a frame."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from kombu import Connection, Consumer, Producer, Queue

from consumerd.consumer.broker import connect
from consumerd.consumer.transport import amqp as chunked
from tests.consumer.conftest import AMQP_URL, check_broker, free_port

# Around the read-ahead and RabbitMQ's frame_max (131072): a body longer than a frame
# comes in several body frames.
SIZES = [0, 1, 7, 100, 4095, 65535, 65536, 65537, 131064, 131073, 300_000]


@pytest.fixture
def queue(name: str) -> Iterator[str]:
    check_broker(AMQP_URL)
    yield name
    with Connection(AMQP_URL) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(name)


def _bodies(sizes: list[int]) -> list[bytes]:
    rng = random.Random(7)
    return [rng.randbytes(n) for n in sizes]


def _publish(name: str, bodies: list[bytes]) -> None:
    with Connection(AMQP_URL) as conn:  # kombu's own transport: only the reader is tested
        Queue(name, routing_key=name)(conn.default_channel).declare()
        producer = Producer(conn.default_channel)
        for body in bodies:
            producer.publish(
                body,
                exchange="",
                routing_key=name,
                content_type="application/octet-stream",
                content_encoding="binary",
            )


def _consume(
    url: str, name: str, count: int, wait: float, deadline: float
) -> tuple[list[bytes], int]:
    """Read ``count`` deliveries through consumerd's transport, waiting ``wait`` at a time
    (the consume loop's way); returns their bodies and how many waits timed out with part
    of a frame read."""
    got: list[bytes] = []
    with connect(url, confirm_each=False) as conn:
        conn.connect()
        transport = conn.connection.transport
        assert isinstance(transport, chunked._ChunkedTCPTransport)
        consumer = Consumer(
            conn.channel(),
            queues=[Queue(name, routing_key=name)],
            no_ack=True,
            on_message=lambda message: got.append(message.body or b""),  # kombu: b"" is ""
        )
        consumer.consume()
        cut = 0
        ends = time.monotonic() + deadline
        while len(got) < count:
            assert time.monotonic() < ends, f"{len(got)} of {count} deliveries in {deadline}s"
            try:
                conn.drain_events(timeout=wait)
            except TimeoutError:
                cut += bool(transport._read_buffer)
    return got, cut


def test_deliveries_of_every_size_arrive_whole_and_in_order(queue: str) -> None:
    bodies = _bodies(SIZES * 3 + [40] * 500)  # small ones: many frames per read
    _publish(queue, bodies)
    got, _ = _consume(AMQP_URL, queue, len(bodies), wait=0.05, deadline=30)
    assert got == bodies


class _Trickle:
    """A TCP proxy to RabbitMQ that passes the broker's bytes on in pieces of 1 to 13
    bytes with a pause after each: frames are split at every possible place, and a short
    wait for the broker often ends between two pieces of one frame."""

    def __init__(self) -> None:
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", 5672))
                self._sockets += [client, upstream]
                threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
                threading.Thread(
                    target=self._pipe, args=(upstream, client, 13), daemon=True
                ).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, piece: int) -> None:
        rng = random.Random(piece)
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not piece:
                    sink.sendall(data)
                    continue
                while data:
                    cut = rng.randint(1, piece)
                    sink.sendall(data[:cut])
                    data = data[cut:]
                    time.sleep(0.0002)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_wait_that_times_out_mid_frame_loses_no_byte(queue: str) -> None:
    bodies = _bodies([0, 1, 50, 1000, 5000] * 4 + [30] * 60)
    _publish(queue, bodies)
    trickle = _Trickle()
    try:
        url = AMQP_URL.replace(":5672", f":{trickle.port}")
        got, cut = _consume(url, queue, len(bodies), wait=0.001, deadline=60)
    finally:
        trickle.close()
    assert got == bodies
    assert cut > 0  # the point of the test: some waits ended with part of a frame read
