# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial)
"""Publishing with every message confirmed, a window of them per round trip.

``App.publish`` and ``App.publish_many`` return only once the broker has each message;
what they do not do is wait for it one message at a time. Messages go out in windows
(:data:`WINDOW`), and each window is confirmed as a whole:

* RabbitMQ: the channel is in confirm mode (``confirm.select``); a window's messages are
  written without waiting, then the broker's ``basic.ack`` / ``basic.nack`` (often one
  ``multiple`` ack for many) are read until every message of the window is settled. The
  connection is opened without py-amqp's ``confirm_publish``, which waits for each
  message in turn; the channel is put in confirm mode here instead.
* Redis and the embedded broker: the transport holds a window's puts and writes them at
  once, in one MULTI/EXEC (one round trip) or one SQLite transaction (one fsync): all of
  the window is stored, or none of it.
* Other kombu transports: each put is written as it is made.

A single publish is a window of one, through the same long-lived connection, channel and
producer, with each queue declared once per connection.

A connection lost mid-window is reconnected (:data:`RETRIES` times, backing off) and the
window's unconfirmed messages are sent again (at-least-once: one that was stored but
whose confirm was lost arrives twice). Anything else (a nack, a full Redis, a body that
is not JSON, retries exhausted) stops at that window with :class:`PublishError`, which
says which messages the broker confirmed; nothing is dropped without a word.
"""

from __future__ import annotations

import dataclasses
import os
import time
import typing

from consumerd.consumer import broker

if typing.TYPE_CHECKING:
    from collections.abc import Callable, Iterable

WINDOW = 1000
"""Messages sent before their confirms are awaited (RabbitMQ) or written together."""
RETRIES = 3
"""Reconnections per window after a lost connection (0.1 s, then 0.6 s, 1.1 s apart)."""
CONFIRM_TIMEOUT = 30.0
"""Seconds to wait for a window's confirms before giving up on the connection."""


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One message, routed: its queue and whether that is a partition queue."""

    queue: str
    partitioned: bool
    body: typing.Any
    headers: dict[str, typing.Any] | None
    message_id: str


class PublishError(Exception):
    """Some of the messages given to one publish call are not confirmed by the broker.

    Positions count the messages in the order given, from 0. ``confirmed`` messages are
    stored; ``unconfirmed`` lists the positions that were sent but not confirmed (refused
    by the broker, or their fate unknown): send them again. Messages from position
    ``sent`` on were never sent. ``__cause__`` is the error that stopped the call.
    """

    def __init__(
        self, name: str, confirmed: int, unconfirmed: list[int], sent: int, reason: str
    ) -> None:
        self.name = name
        self.confirmed = confirmed
        self.unconfirmed = unconfirmed
        self.sent = sent
        self.reason = reason
        shown = ranges(unconfirmed)
        super().__init__(
            f"publish to {name!r}: {confirmed} message(s) confirmed, "
            f"{len(unconfirmed)} not confirmed (position(s) {shown or 'none'}), none sent "
            f"from position {sent} on: {reason}"
        )


def ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 7]`` → ``"0-2, 7"``."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class _Session:
    """One connection, one channel and one producer, in confirm mode on RabbitMQ.

    ``outcomes`` has one entry per message sent since the last :meth:`settle`: True once
    the broker confirmed it, False if it refused it, None while unknown.
    """

    def __init__(self, url: str) -> None:
        from kombu.messaging import Producer  # noqa: PLC0415 - see app.py's docstring

        self.connection = broker.connect(url, confirm_each=False)
        self.connection.connect()
        self.channel = self.connection.channel()
        self.amqp = broker.is_amqp(self.connection)
        self.buffered = hasattr(self.channel, "hold_puts")
        self.producer = Producer(self.channel, serializer="json", auto_declare=False)
        self.declared: set[str] = set()
        self.outcomes: list[bool | None] = []
        self._unsettled = 0
        self._first_tag = 1  # RabbitMQ numbers a confirm-mode channel's publishes 1, 2, …
        self._lowest_unsettled = 0  # index into outcomes where a multiple ack starts
        if self.amqp:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
        elif self.buffered:
            self.channel.hold_puts()

    def send(self, message: Outgoing) -> None:
        if message.queue not in self.declared:
            from consumerd.consumer.app import declare_queue  # noqa: PLC0415 - a cycle

            declare_queue(message.queue, message.partitioned)(self.channel).declare()
            self.declared.add(message.queue)
        self.producer.publish(
            message.body,
            exchange="",
            routing_key=message.queue,
            headers=message.headers,
            message_id=message.message_id,
        )
        known = not (self.amqp or self.buffered)  # other transports write each put at once
        self.outcomes.append(True if known else None)
        self._unsettled += not known

    def settle(self) -> list[bool | None]:
        """Wait until every message sent since the last call is confirmed or refused;
        their outcomes (True: confirmed, False: refused)."""
        if self.buffered and self._unsettled:
            self.channel.flush_puts()
            self.outcomes = [True] * len(self.outcomes)
            self._unsettled = 0
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while self._unsettled:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no confirm from the broker within {CONFIRM_TIMEOUT:g} s")
            try:
                self.connection.drain_events(timeout=left)
            except TimeoutError:  # the deadline is checked above
                continue
        outcomes, self.outcomes = self.outcomes, []
        self._first_tag += len(outcomes)
        self._lowest_unsettled = 0
        return outcomes

    def _confirm(self, tag: int, multiple: bool, outcome: bool) -> None:
        index = tag - self._first_tag
        first = self._lowest_unsettled if multiple else index
        for i in range(max(first, 0), min(index + 1, len(self.outcomes))):
            if self.outcomes[i] is None:
                self.outcomes[i] = outcome
                self._unsettled -= 1
        if multiple:
            self._lowest_unsettled = max(self._lowest_unsettled, index + 1)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._confirm(tag, multiple, True)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._confirm(tag, multiple, False)

    def close(self) -> None:
        self.connection.release()


class Window:
    """Up to ``WINDOW`` messages and which of them are confirmed; positions from ``start``."""

    def __init__(self, name: str, start: int, messages: list[Outgoing]) -> None:
        self.name = name
        self.start = start
        self.messages = messages
        self.confirmed = [False] * len(messages)
        self.sent = 0  # one past the last index ever sent

    def note(self, sent: list[int], outcomes: list[bool | None]) -> None:
        for i, ok in zip(sent, outcomes, strict=False):
            self.confirmed[i] = self.confirmed[i] or ok is True
        self.sent = max([self.sent, *(i + 1 for i in sent)])

    def error(self, reason: BaseException | str) -> PublishError:
        text = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
        return PublishError(
            self.name,
            self.start + sum(self.confirmed),
            [self.start + i for i in range(self.sent) if not self.confirmed[i]],
            self.start + self.sent,
            text,
        )


def send(
    name: str, messages: Iterable[Outgoing], window: int, confirm: Callable[[Window], None]
) -> int:
    """Send ``messages``, ``window`` at a time, each window given to ``confirm`` (which
    sends it and raises :class:`PublishError` unless all of it is confirmed) before the
    next is read; returns how many were sent.

    ``messages`` is read here, not inside ``confirm``: the App holds its lock only while
    a window is confirmed, so a slow iterable, or one that itself publishes, does not
    hold up (or deadlock) other publishes.
    """
    done = 0
    batch: list[Outgoing] = []
    iterator = iter(messages)
    while True:
        try:
            message = next(iterator, None)
        except Exception as exc:  # the caller's iterable: keep what it gave first
            last = Window(name, done, batch)
            if batch:
                confirm(last)
            raise last.error(exc) from exc
        if message is not None:
            batch.append(message)
        if batch and (message is None or len(batch) >= window):
            confirm(Window(name, done, batch))
            done += len(batch)
            batch = []
        if message is None:
            return done


class Publisher:
    """The App's publisher: a :class:`_Session` kept across calls, made afresh after a
    fork (connections do not survive one) or a failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pid = os.getpid()
        # No I/O: only which exceptions mean a lost connection on this transport.
        self._lost: tuple[type[BaseException], ...] = tuple(broker.connect(url).connection_errors)
        self._session: _Session | None = None

    def confirm(self, window: Window) -> None:
        """Send and confirm ``window``, reconnecting after a lost connection; raises
        :class:`PublishError` unless all of it is confirmed."""
        for attempt in range(RETRIES + 1):
            try:
                stop = self._attempt(window)
            except self._lost as exc:
                if attempt == RETRIES:
                    raise window.error(exc) from exc
                time.sleep(0.1 + 0.5 * attempt)
                continue
            except Exception as exc:
                raise window.error(exc) from exc
            if not all(window.confirmed):
                refused = window.confirmed.count(False)
                raise window.error(f"the broker refused (nack) {refused} message(s)")
            if stop is not None:
                raise window.error(stop) from stop
            return

    def _attempt(self, window: Window) -> Exception | None:
        """Send the window's unconfirmed messages once and wait for their confirms; the
        error of a message that could not be sent (the ones after it are not sent)."""
        session = self._session_for_this_process()
        sent: list[int] = []
        stop = None
        try:
            for i, ok in enumerate(window.confirmed):
                if ok:
                    continue
                try:
                    session.send(window.messages[i])
                except self._lost:
                    raise
                except Exception as exc:  # e.g. a body that is not JSON: send no further
                    stop = exc
                    del window.messages[i:]
                    del window.confirmed[i:]
                    break
                sent.append(i)
            outcomes = session.settle()
        except BaseException:
            window.note(sent, session.outcomes)
            self.close()  # lost, or the channel closed by the broker: start afresh
            raise
        window.note(sent, outcomes)
        if stop is not None:
            self.close()  # a failed declare leaves the channel closed by the broker
        return stop

    def _session_for_this_process(self) -> _Session:
        if self._session is None or self.pid != os.getpid():
            self._session = _Session(self.url)
            self.pid = os.getpid()
        return self._session

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            if self.pid == os.getpid():
                session.close()
