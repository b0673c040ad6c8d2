"""What happens to a message after its handler: ack, retry later, or dead-letter.

A retry is a *copy* published to ``<name>.retry`` with the next attempt number and the
time it becomes due; the original is acked only once the copy is safely published, so a
worker dying in between causes a duplicate, never a loss. The worker holding retry
copies republishes each to its queue when due (see :mod:`consumerd.consumer.retries`), so a
delayed retry never blocks a handler slot. After the last attempt, or at once for a
message we cannot decode, the message goes to ``<name>.dlq`` with the error in headers.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing

ATTEMPT = "consumerd-attempt"
"""1 for the first delivery, incremented on every retry (absent means 1)."""
RETRY_AT = "consumerd-retry-at"
"""Unix time before which a retry copy must not be handled."""
TARGET = "consumerd-queue"
"""The queue a retry copy returns to, or the queue a dead letter came from."""
ERROR = "consumerd-error"
"""``ExceptionType: message`` of the last failure, on dead letters."""
DEAD_AT = "consumerd-dead-at"
"""Unix time a message was dead-lettered (``consumerd dlq`` shows its age)."""

MAX_ATTEMPT = 1_000_000
"""The largest ``consumerd-attempt`` accepted; a larger one is a decode error."""
MAX_RETRY_AHEAD = 366 * 86400.0
"""How far in the future ``consumerd-retry-at`` may be (seconds); further is a decode error."""
MAX_DEATHS = 3
"""Default of ``max_deaths``: deliveries that ended with the worker's death before a
message is dead-lettered without calling its handler again."""
KEY = "consumerd-key"
"""The partition key a message was published with: a worker running several handlers
at once keeps the order of the messages of one key."""

_MAX_ERROR_CHARS = 2000
_MAX_VALUE_CHARS = 80

Headers = dict[str, typing.Any]


class Requeue:
    """The type of :data:`REQUEUE`."""

    def __repr__(self) -> str:
        return "consumerd.consumer.policy.REQUEUE"


REQUEUE = Requeue()
"""What a handler adapter returns to have its message (or batch) put back on its queue at
once, unacked and not counted as a failed attempt (oslo.messaging's
``NotificationResult.REQUEUE``). Only notification handlers are adapted to it."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: attempt ``n`` (1-based) that fails waits
    ``min(max_delay, delay * 2**(n-1))`` seconds, for at most ``max_retries`` retries."""

    max_retries: int = 3
    delay: float = 1.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.delay < 0 or self.max_delay < 0:
            raise ValueError("max_retries, retry_delay and max_retry_delay must be >= 0")

    def delay_after(self, attempt: int) -> float | None:
        """Seconds before the next attempt after ``attempt`` failed; None: dead-letter."""
        if attempt > self.max_retries:
            return None
        return float(min(self.max_delay, self.delay * 2 ** (attempt - 1)))


class BadHeader(ValueError):
    """One of our own headers holds a value we cannot use; the text says which and why."""


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a length fit for a log line or a header."""
    try:
        text = repr(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def read_attempt(headers: Headers) -> int:
    """The attempt number a delivery carries (1 if none); :class:`BadHeader` if the value
    is not an int from 1 to :data:`MAX_ATTEMPT` (a bool, a non-finite or fractional
    float, a string of something else)."""
    value = headers.get(ATTEMPT)
    if value is None:
        return 1
    number: object = value
    if isinstance(value, str | bytes):
        text = value.strip()
        number = int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= MAX_ATTEMPT:
        return number
    raise BadHeader(
        f"header {ATTEMPT} is {short_repr(value)}: "
        f"not an attempt number (an int from 1 to {MAX_ATTEMPT})"
    )


def read_retry_at(headers: Headers, now: float | None = None) -> float:
    """When a retry copy is due (Unix time; 0.0 if absent); :class:`BadHeader` if the
    value is not a finite number or is more than :data:`MAX_RETRY_AHEAD` ahead."""
    value = headers.get(RETRY_AT)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadHeader(f"header {RETRY_AT} is {short_repr(value)}: not a number")
    due = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.inf
    if not math.isfinite(due):
        raise BadHeader(f"header {RETRY_AT} is {short_repr(value)}: not a finite number")
    if due > (time.time() if now is None else now) + MAX_RETRY_AHEAD:
        raise BadHeader(
            f"header {RETRY_AT} is {short_repr(value)}: "
            f"more than {MAX_RETRY_AHEAD / 86400:.0f} days ahead"
        )
    return due


def attempt_of(headers: Headers | None) -> int:
    """The attempt number, 1 for anything unusable: never raises (see :func:`read_attempt`)."""
    if not headers:
        return 1
    try:
        return read_attempt(headers)
    except Exception:
        return 1


def describe_error(exc: BaseException) -> str:
    """``Type: message``, cut to a header's length; never raises (an exception's
    ``__str__`` may)."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:
        text = f"{type(exc).__name__}: <unprintable>"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def retry_headers(headers: Headers | None, attempt: int, due: float, queue: str) -> Headers:
    return {**(headers or {}), ATTEMPT: attempt, RETRY_AT: due, TARGET: queue}


def dead_letter_headers(headers: Headers | None, error: str, queue: str) -> Headers:
    """The headers of a dead letter: the original ones (minus the retry time), and why.
    An unusable ``consumerd-attempt`` is replaced by 1 (the error names the value)."""
    out = {k: v for k, v in (headers or {}).items() if k != RETRY_AT}
    out.update(
        {ERROR: error, TARGET: queue, ATTEMPT: attempt_of(headers), DEAD_AT: round(time.time(), 3)}
    )
    return out
