"""Batches: messages handed to one handler call, then acked or retried together.

The consume loop owns the timing: a batch is flushed when it is full, or when its
deadline (``timeout`` after its *first* message) comes; the loop's drain timeout wakes it
for that, so nothing blocks waiting for a batch to fill.
"""

from __future__ import annotations

import dataclasses
import math
import typing

if typing.TYPE_CHECKING:
    from consumerd.consumer.app import Delivery


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    size: int
    """Flush as soon as this many messages are in the batch."""
    timeout: float
    """Flush this many seconds after the batch's first message, however small it is."""

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"batch_size must be an int >= 1, not {self.size!r}")
        if not self.timeout > 0 or math.isinf(self.timeout):
            raise ValueError(f"batch_timeout must be a finite number > 0, not {self.timeout!r}")


class Batch:
    """The open batch of one consumer."""

    __slots__ = ("deadline", "deliveries", "items", "policy")

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.items: list[typing.Any] = []
        self.deliveries: list[Delivery] = []
        self.deadline = math.inf
        """Monotonic time at which the batch is due; infinite while it is empty."""

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: typing.Any, delivery: Delivery, now: float) -> bool:
        """Append one message; True when the batch is full and must be flushed."""
        if not self.items:
            self.deadline = now + self.policy.timeout
        self.items.append(item)
        self.deliveries.append(delivery)
        return len(self.items) >= self.policy.size

    def take(self) -> tuple[list[typing.Any], list[Delivery]]:
        """Empty the batch and return what it held."""
        items, deliveries = self.items, self.deliveries
        self.items, self.deliveries, self.deadline = [], [], math.inf
        return items, deliveries
