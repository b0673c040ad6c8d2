# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial)
"""Acks sent in batches on RabbitMQ: one ``basic.ack(multiple=True)`` for a run of them.

An AMQP ``multiple`` ack settles *every* unacked delivery of the channel up to its tag, so
an ack may only wait to be folded into a later one while every lower delivery of its
channel is settled: acked (sent, or waiting here), or rejected, requeued or acked by its
handler (all sent at once). Per channel :class:`Acks` keeps the tags delivered and not
settled yet, in delivery order; an ack of the lowest one is held (``pending``), any other
is sent alone at once — a lower one is still being handled (on a pool's thread, in a
batch filling up, a retry copy waiting for its time) and must not be acked with it.

The held acks go out (:meth:`Acks.flush`) when the loop is about to wait for the broker,
every ``bound`` acks, before any reject or requeue of their channel, and before their
channel closes (a stop, a rebind, a recycling): the one way an ack is lost is the
connection going first, and the broker then redelivers those messages as it does every
unacked one. kombu's virtual transports (Redis, SQLite) ack per tag: there ``batched`` is
False and every ack goes out as before.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import typing

Message = typing.Any  # kombu.message.Message
Channel = typing.Any

BATCH = 64
"""At most this many acks held per channel (and at most half its prefetch: the broker
sends no more than prefetch unacked messages, so holding them all would stall it)."""


@dataclasses.dataclass(eq=False)
class _Channel:
    channel: Channel
    bound: int
    label: str
    unsettled: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    settled: set[int] = dataclasses.field(default_factory=set)
    """Tags settled out of delivery order, still in ``unsettled`` behind a lower one."""
    pending: int = 0
    """The highest tag whose ack is held (0: none): every lower one is settled."""
    count: int = 0


class Acks:
    """The acks of one connection's channels; used by the consume loop's thread only."""

    def __init__(self, batched: bool) -> None:
        self.batched = batched
        self._channels: dict[Channel, _Channel] = {}
        self.held = 0
        """Acks held now, over all channels."""

    def track(self, channel: Channel, prefetch: int, label: str) -> None:
        """A channel whose deliveries (of ``label``: a consumer, the retry queues) will be
        acked through here."""
        if self.batched:
            bound = max(1, min(BATCH, prefetch // 2))
            self._channels[channel] = _Channel(channel, bound, label)

    def delivered(self, message: Message) -> None:
        state = self._channels.get(message.channel)
        if state is not None:
            state.unsettled.append(message.delivery_tag)

    def ack(self, message: Message, at_once: bool = False) -> None:
        """Ack ``message`` (unless its handler settled it already), now or with the next
        flush of its channel. ``at_once``: a copy of it was just published (a retry, a
        dead letter): the ack goes now, so a crash leaves as few duplicates as before."""
        state = self._channels.get(message.channel)
        if message.acknowledged:
            if state is not None:
                self._settle(state, message.delivery_tag)
            return
        if state is None:
            message.ack()
            return
        tag = message.delivery_tag
        unsettled = state.unsettled
        if unsettled and unsettled[0] == tag:
            unsettled.popleft()
            settled = state.settled
            while unsettled and unsettled[0] in settled:
                settled.discard(unsettled.popleft())
            state.pending = tag
            self.held += 1
            # kombu's own flag (no API sets it without sending): a handler's late
            # ack() of it then fails as for any acked message, instead of going out twice.
            message._state = "ACK"
            state.count += 1
            if at_once or state.count >= state.bound:
                self._send(state)
        else:
            self._settle(state, tag)
            message.ack()

    def before_reject(self, message: Message) -> None:
        """``message`` is about to be rejected or requeued: the held acks of its channel
        go first, and its tag is settled."""
        state = self._channels.get(message.channel)
        if state is not None:
            self._send(state)
            self._settle(state, message.delivery_tag)

    def flush(self) -> None:
        """Send every held ack."""
        if self.held:
            for state in self._channels.values():
                if state.count:
                    self._send(state)

    def close(self, channel: Channel) -> None:
        """``channel`` is about to close: its held acks go now, and it is forgotten."""
        state = self._channels.pop(channel, None)
        if state is not None:
            self._send(state)

    def oldest(self) -> list[tuple[Channel, str, int]]:
        """``(channel, label, tag)`` of the oldest delivery not settled on each channel.
        Safe from another thread (a watchdog's): it only reads, and copies at once."""
        found = []
        for channel, state in list(self._channels.items()):
            with contextlib.suppress(IndexError):  # none, or emptied meanwhile
                found.append((channel, state.label, state.unsettled[0]))
        return found

    def forget(self) -> None:
        """The connection is gone: whatever was held is redelivered by the broker."""
        self._channels.clear()
        self.held = 0

    def _send(self, state: _Channel) -> None:
        if state.count:
            self.held -= state.count
            tag, state.pending, state.count = state.pending, 0, 0
            state.channel.basic_ack(tag, multiple=True)

    @staticmethod
    def _settle(state: _Channel, tag: int) -> None:
        unsettled = state.unsettled
        if unsettled and unsettled[0] == tag:
            unsettled.popleft()
            while unsettled and unsettled[0] in state.settled:
                state.settled.discard(unsettled.popleft())
        elif unsettled and tag > unsettled[0]:
            state.settled.add(tag)
