"""What happens to a message after its handler: ack, retry later, or dead-letter.

A retry is a *copy* published to ``<name>.retry`` with the next attempt number and the
time it becomes due; the original is acked only once the copy is safely published, so a
worker dying in between causes a duplicate, never a loss. The worker holding retry
copies republishes each to its queue when due (see :mod:`consumerd.consumer.loop`), so a
delayed retry never blocks a handler slot. After the last attempt, or at once for a
message we cannot decode, the message goes to ``<name>.dlq`` with the error in headers.
"""

from __future__ import annotations

import dataclasses
import typing

ATTEMPT = "consumerd-attempt"
"""1 for the first delivery, incremented on every retry (absent means 1)."""
RETRY_AT = "consumerd-retry-at"
"""Unix time before which a retry copy must not be handled."""
TARGET = "consumerd-queue"
"""The queue a retry copy returns to, or the queue a dead letter came from."""
ERROR = "consumerd-error"
"""``ExceptionType: message`` of the last failure, on dead letters."""
KEY = "consumerd-key"
"""The partition key a message was published with: a worker running several handlers
at once keeps the order of the messages of one key."""

_MAX_ERROR_CHARS = 2000

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


def attempt_of(headers: Headers | None) -> int:
    if not headers:
        return 1
    try:
        return max(1, int(headers.get(ATTEMPT, 1)))
    except (TypeError, ValueError):
        return 1


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def retry_headers(headers: Headers | None, attempt: int, due: float, queue: str) -> Headers:
    return {**(headers or {}), ATTEMPT: attempt, RETRY_AT: due, TARGET: queue}


def dead_letter_headers(headers: Headers | None, error: str, queue: str) -> Headers:
    out = {k: v for k, v in (headers or {}).items() if k != RETRY_AT}
    out.update({ERROR: error, TARGET: queue, ATTEMPT: attempt_of(headers)})
    return out
