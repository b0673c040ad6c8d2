"""AMQP header timestamps that Python cannot hold, decoded without stopping the queue.

py-amqp decodes a message's header table while it reads the frame: a timestamp outside
``datetime``'s range (year 10000, 2**62 seconds) raises inside ``drain_events``, before
any message object exists, so a consumer could only reconnect and be handed the same
message again — one message from another client stopped the queue. :func:`install` makes
such a value decode to :class:`OutOfRangeTimestamp` (the raw seconds, an ``int``); the
runtime finds it among the headers and dead-letters the message as undecodable
(:func:`consumerd.consumer.decoding.check_headers`). Republished, it goes out as a long.
"""

from __future__ import annotations

import struct
import typing

import amqp.serialization

from consumerd import deps

# py-amqp comes with kombu: its range is kombu's.
deps.require(__name__, {amqp.serialization: "_read_item"}, "kombu")


class OutOfRangeTimestamp(int):
    """Seconds since the epoch of an AMQP timestamp no ``datetime`` can hold."""


def install() -> None:
    """Decode out-of-range timestamps as :class:`OutOfRangeTimestamp` (idempotent)."""
    original = amqp.serialization._read_item
    if getattr(original, "consumerd", False):
        return

    def read_item(buf: typing.Any, offset: int) -> tuple[typing.Any, int]:
        try:
            return typing.cast(tuple[typing.Any, int], original(buf, offset))
        except (OverflowError, ValueError, OSError):
            if buf[offset : offset + 1] != b"T":
                raise
            # Nested tables reach this wrapper too: only the bad timestamp is replaced.
            (seconds,) = struct.unpack_from(">Q", buf, offset + 1)
            return OutOfRangeTimestamp(seconds), offset + 9

    read_item.consumerd = True  # type: ignore[attr-defined]
    amqp.serialization._read_item = read_item


def find_out_of_range(value: object, path: str = "") -> tuple[str, int] | None:
    """The first out-of-range timestamp in a header table (its key path and seconds)."""
    if isinstance(value, OutOfRangeTimestamp):
        return path, int(value)
    items: typing.Iterable[tuple[object, object]] = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    for key, item in items:
        found = find_out_of_range(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
