# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial)
"""From a delivery to what a handler gets, or the precise reason it cannot be had.

Every way a delivery can fail to decode ends here as :class:`Undecodable`, whose text goes
into the dead letter's ``consumerd-error`` header (after ``undecodable: ``):

* kombu could not undo the ``compression`` header (an unknown method, a body that does
  not decompress): kombu parks the error in ``message.errors`` and the runtime's
  ``on_decode_error`` hands the message over instead of kombu re-raising it;
* no content type (or kombu's raw ``application/data`` / ``application/text``): the body
  must be JSON in UTF-8, like a ``application/json`` one, never raw bytes;
* a content type other than JSON (pickle above all: never loaded) or a body that does not
  parse;
* one of our own headers holding a value we cannot use (:mod:`~consumerd.consumer.policy`),
  or an AMQP timestamp no ``datetime`` can hold (:mod:`~consumerd.consumer.amqp_headers`).
"""

from __future__ import annotations

import typing

from kombu.serialization import loads as kombu_loads
from kombu.utils.json import loads

from consumerd.consumer import amqp_headers, policy

RAW_CONTENT_TYPES = frozenset({"application/data", "application/text"})
"""kombu's "trusted" types, which it would hand over undecoded: decoded as JSON here."""
ACCEPT = frozenset({"application/json"})
"""The only content type decoded, whatever the message's own ``accept`` says."""


class Undecodable(ValueError):
    """The delivery cannot become a handler's body; ``str()`` says why."""


def body_of(message: typing.Any) -> typing.Any:
    """The decoded JSON body of a kombu message (``accept=["json"]``)."""
    errors = message.errors
    if errors:
        exc = errors[0][1]
        compression = message.headers.get("compression")
        if compression:
            raise Undecodable(
                f"the body does not decompress as {policy.short_repr(compression)}"
                f" ({policy.describe_error(exc)})"
            )
        raise Undecodable(policy.describe_error(exc))
    content_type = message.content_type
    if content_type is not None and not isinstance(content_type, str):
        raise Undecodable(f"content type {policy.short_repr(content_type)} is not a string")
    body = message.body
    if not body:
        raise Undecodable("empty body: not JSON")
    if not content_type or content_type in RAW_CONTENT_TYPES:
        try:
            text = body.decode("utf-8") if isinstance(body, bytes | bytearray) else body
            return loads(text)
        except Exception as exc:
            what = content_type or "no content type"
            raise Undecodable(
                f"{what}, and the body is not JSON in UTF-8 ({policy.describe_error(exc)})"
            ) from None
    try:
        return kombu_loads(body, content_type, message.content_encoding, accept=ACCEPT)
    except Exception as exc:
        raise Undecodable(policy.describe_error(exc)) from None


def check_headers(message: typing.Any) -> int:
    """The attempt number of a delivery; :class:`Undecodable` if its headers are unusable."""
    headers = message.headers
    if not isinstance(headers, dict):
        raise Undecodable(f"headers are a {type(headers).__name__}, not a table")
    bad = amqp_headers.find_out_of_range(headers)
    if bad is not None:
        raise Undecodable(f"header {bad[0]} is an AMQP timestamp out of range ({bad[1]} s)")
    try:
        return policy.read_attempt(headers)
    except policy.BadHeader as exc:
        raise Undecodable(str(exc)) from None
