# mypy: disallow-untyped-calls=False, disallow-subclassing-any=False
# (py-amqp and kombu ship no type information)
"""kombu's py-amqp transport, reading the socket in chunks (plain TCP, ``amqp://``).

py-amqp reads a frame with three ``recv`` calls (header, payload, end byte), and sets and
restores the socket's timeout around every frame it waits for: a delivery (three frames)
cost about fifteen system calls, each of them letting go of the GIL, which a worker's
handler threads or event loop then take. Here a read takes what the socket has (up to
:data:`READ_AHEAD`), frames are cut from that, and a frame already read in full is
returned without touching the socket at all.

Nothing else reads the socket: kombu and py-amqp only read through ``_read``, and
consumerd never waits on the socket's descriptor (which would not see what is read ahead
here). TLS (``amqps://``) keeps py-amqp's own transport: its reads go through the TLS
object's buffer already.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import typing
from collections.abc import Iterator

import amqp
import amqp.transport
from kombu.transport import pyamqp

from consumerd import deps

# A py-amqp release without one of these fails here, in one line, not mid-consuming.
deps.require(
    __name__,
    {
        amqp.transport.TCPTransport: """_read _quick_recv _read_buffer having_timeout
            raise_on_initial_eintr read_frame sock""",
        pyamqp.Connection: "Transport",
    },
    "amqp",
    "kombu",
)

READ_AHEAD = 65536
"""Bytes asked of the socket at once (it returns what it has, without waiting for more)."""
_HEADER = struct.Struct(">BHI")  # frame type, channel, payload size


class _ChunkedTCPTransport(amqp.transport.TCPTransport):
    """Frames cut from chunks read ahead. The bytes read and not used yet are
    ``_chunk[_pos:]``; ``_read_buffer`` keeps its py-amqp meaning (bytes given back
    after a timeout cut a frame short: read first) and is empty otherwise."""

    _read_buffer: bytes
    _chunk = b""
    _pos = 0

    def _read(
        self, n: int, initial: bool = False, _errnos: tuple[int, ...] = (errno.EAGAIN, errno.EINTR)
    ) -> bytes:
        chunk, pos = self._chunk, self._pos
        if not self._read_buffer and len(chunk) - pos >= n:
            self._pos = pos + n
            return chunk[pos : pos + n]
        data = bytearray(self._read_buffer)
        data += chunk[pos:]
        self._read_buffer, self._chunk, self._pos = b"", b"", 0
        try:
            while len(data) < n:
                try:
                    got = self._quick_recv(max(READ_AHEAD, n - len(data)))
                except OSError as exc:
                    if exc.errno in _errnos:
                        if initial and self.raise_on_initial_eintr:
                            raise TimeoutError() from exc
                        continue
                    raise
                if not got:
                    raise OSError("Server unexpectedly closed connection")
                data += got
        except BaseException:
            self._read_buffer = bytes(data)  # as py-amqp keeps it: read_frame prepends
            raise
        self._chunk, self._pos = bytes(data), n
        return self._chunk[:n]

    @contextlib.contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[socket.socket]:
        if timeout is None or self._frame_ready():
            yield self.sock
            return
        with super().having_timeout(timeout) as sock:
            yield sock

    def _frame_ready(self) -> bool:
        """A whole frame is read ahead: reading it needs no socket, nor its timeout."""
        if self._read_buffer:
            return False
        chunk, pos = self._chunk, self._pos
        if len(chunk) - pos < _HEADER.size:
            return False
        size: int = _HEADER.unpack_from(chunk, pos)[2]
        return len(chunk) - pos >= _HEADER.size + size + 1


class Connection(pyamqp.Connection):
    def Transport(
        self,
        host: str,
        connect_timeout: float | None,
        ssl: typing.Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        **kwargs: typing.Any,
    ) -> amqp.transport._AbstractTransport:
        if ssl:
            return super().Transport(
                host, connect_timeout, ssl, read_timeout, write_timeout, **kwargs
            )
        return _ChunkedTCPTransport(
            host,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            **kwargs,
        )


class Transport(pyamqp.Transport):
    Connection = Connection
