"""kombu's message envelope on the virtual transports (Redis, SQLite): checked before
kombu sees it, and what replaces an entry that is not one.

kombu builds a message from the stored JSON envelope inside ``drain_events``; an entry it
cannot use there (not JSON, no ``delivery_tag``, a body that is not base64, headers that
are a list) raised out of the consume loop, or was silently lost. Our transports check
each entry with :func:`error_of` first and move a bad one, as the raw bytes it was, to the
dead-letter queue of the queue it came from (:func:`dead_letter`), with the reason in
``consumerd-error`` — never dropped, never delivered.
"""

from __future__ import annotations

import base64
import binascii
import typing
import uuid

from consumerd.consumer import policy

Payload = dict[str, typing.Any]

CONTENT_TYPE = "application/octet-stream"
"""Content type of the dead letter holding an entry that was not an envelope."""


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def error_of(payload: object) -> str | None:
    """Why kombu cannot make a message of ``payload`` (the parsed entry), or None."""
    if not isinstance(payload, dict):
        return f"the entry is a JSON {_type(payload)}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return f"properties is {_type(properties)}, not an object"
    if not isinstance(properties.get("delivery_tag"), str | int):
        return f"delivery_tag is {_type(properties.get('delivery_tag'))}"
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        return f"delivery_info is {_type(info)}, not an object"
    for field in ("exchange", "routing_key"):
        if not isinstance(info.get(field, ""), str):
            return f"delivery_info.{field} is {_type(info.get(field))}, not a string"
    priority = properties.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        return f"priority is {_type(priority)}, not an int"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"headers are {_type(headers)}, not an object"
    for field in ("content-type", "content-encoding"):
        if not isinstance(payload.get(field) or "", str):
            return f"{field} is {_type(payload.get(field))}, not a string"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return f"body is {_type(body)}, not a string"
    encoding = properties.get("body_encoding")
    if encoding and body:
        if encoding != "base64":
            return f"unknown body_encoding {policy.short_repr(encoding)}"
        try:
            base64.b64decode(body)  # what kombu does (not validating: it skips junk)
        except (binascii.Error, ValueError) as exc:
            return f"the body is not base64 ({exc})"
    return None


def dead_letter(raw: bytes, queue: str, dead_letters: str, reason: str) -> Payload:
    """The envelope that takes the bad entry ``raw`` of ``queue`` to ``dead_letters``:
    its body is ``raw``, byte for byte."""
    return {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-encoding": "binary",
        "content-type": CONTENT_TYPE,
        "headers": {
            policy.ERROR: f"undecodable: not a kombu message envelope: {reason}",
            policy.TARGET: queue,
            policy.ATTEMPT: 1,
        },
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_mode": 2,
            "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": dead_letters},
        },
    }
