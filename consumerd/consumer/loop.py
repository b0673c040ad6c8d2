# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial; its calls are checked at the boundary types instead)
"""The consume loop of one worker process.

One kombu connection per worker, driven by one thread (the Service's ``run()`` thread);
handlers run inline, one message at a time, and prefetch hides the broker's latency.
Other threads (``terminate()``, ``reload()``) only set a flag and *poke* the loop: they
publish an empty message to a private wake queue the loop consumes, so a loop blocked in
``drain_events`` wakes at once on every transport, with no periodic tick and no
cross-thread use of the connection — but one: on RabbitMQ, while an inline handler runs,
the loop lets go of the connection (``_wire``) and a pulse thread sends the acks held for
the messages before it and the heartbeats the broker expects (see :meth:`Loop._pulse`).
Acks are batched there (:mod:`~consumerd.consumer.acks`).

Batched consumers (:mod:`~consumerd.consumer.batching`) collect messages instead; a batch
that does not fill is flushed at its deadline, which bounds ``drain_events``'s timeout
like every other chore. A partial batch is never handled at a stop: it is unacked, so it
goes back with its channel like any prefetched message.

The connection and its channels are the broker session (:mod:`~consumerd.consumer.session`);
settling a delivery is :mod:`~consumerd.consumer.settling`'s. The loop drives them, with
the retry copies, the partitions and the batches, each waking it at its own deadline.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import random
import socket
import threading
import time
import typing

import kombu.exceptions
from kombu.messaging import Producer

from consumerd.config import Config, Settings
from consumerd.consumer import (
    acks,
    amqp_headers,
    batching,
    broker,
    deaths,
    decoding,
    dispatch,
    partitions,
    policy,
    retries,
    session,
    settling,
)
from consumerd.consumer.app import App, ConsumerSpec, Delivery
from consumerd.consumer.ownership import Leases, Membership, lease_root
from consumerd.consumer.session import Binding
from consumerd.ops import logs, metrics

LOG = logging.getLogger("consumerd.consumer")
amqp_headers.install()  # a header py-amqp cannot decode must not stop the queue

HANDLER_POLL = 0.005
"""While handlers run on other threads the loop looks for their outcomes this often (it
cannot be woken from another thread for free: it waits in the broker client's read)."""
STABLE_AFTER = 10.0
"""A connection lost sooner than this after it was made counts as a flap: the next
reconnect waits (FLAP_BACKOFF), growing while flaps continue, instead of reconnecting at
once: a full broker (Redis at maxmemory, a full disk) fails right after each connect."""
FLAP_BACKOFF = (0.5, 30.0)
"""First and longest wait before reconnecting after a flap (doubling, equal jitter)."""
STOP_CHECK = 1.0
"""Longest idle wait of the loop before it looks for a stop or reload again: the wake
message that cuts the wait short can be refused (a broker that filled up, a wake queue
a full broker would not create)."""
PULSE = 1.0
"""How often the pulse thread (AMQP) looks at a loop busy in an inline handler, and at
the age of the oldest unacked delivery."""
WARN_AT = 0.8
"""Warn when a delivery has been unacked for this fraction of ``consumer_timeout``."""
_CONSUMER_TIMEOUT_MARKER = "delivery acknowledgement on channel"
PEEK = 0.0005
"""With acks held, how long the loop looks for a message already on its way before it
calls itself idle and sends them (a read returns one message at a time: without this
look every message was "the last", and every ack went alone)."""

Message = typing.Any  # kombu.message.Message: kombu ships no type information


class Loop:
    """Consume ``app``'s queues as worker ``worker_id`` until :meth:`stop`."""

    def __init__(
        self,
        app: App,
        worker_id: int,
        config: Config,
    ) -> None:
        self.worker_id = worker_id
        self._config = config
        settings = config.settings
        self._app = app
        self._url = broker.resolve_url(settings.broker, app.broker)
        app.configure(broker_url=self._url)
        self._probe = broker.connect(self._url)  # not connected: only for its error classes
        self._recoverable: tuple[type[BaseException], ...] = (
            *self._probe.connection_errors,
            kombu.exceptions.OperationalError,
            OSError,
            *_full_errors(),
        )
        self._flaps = 0
        self._amqp = broker.is_amqp(self._probe)
        self._acks = acks.Acks(batched=self._amqp)
        self._heartbeat, self._consumer_timeout = broker.consuming_options(self._url)
        # Held by the loop's thread whenever it may use the connection: it lets go only
        # while an inline handler runs, when the pulse thread may use it instead.
        self._wire = _taken_lock()
        root = lease_root(self._url)
        self._membership = Membership(
            root, f"{app.name}.{settings.member[0]}", worker_id, settings.workers
        )
        self._partitions = partitions.Partitions(Leases(root), self._membership.workers, worker_id)
        self._deaths = deaths.DeathCounter(root, deaths.scope_of(app.name, settings.member[0]))
        self._inbox: collections.deque[tuple[Binding | None, Message]] = collections.deque()
        self._pools: dict[str, dispatch.Pool] = {}  # consumers running handlers in parallel
        self._inline: set[str] = set()  # consumers known to run inline (until a reload)
        self._free_slots = list(range(deaths.SLOTS - 1, 0, -1))  # in-flight record slots
        self._settler = settling.Settler(
            acker=self._acks,
            publisher=None,  # the connection's, from each connect
            recoverable=self._recoverable,
            on_handled=self._count_for_recycling,
        )
        self._retries = retries.Retries(
            republish=self._settler.republish,
            dead_letter=self._settler.dead_letter_to,
            ack=functools.partial(self._acks.ack, at_once=True),
        )
        self._interrupt = threading.Event()
        self._stop_requested = threading.Event()
        self._session = session.Session(
            self._url,
            amqp=self._amqp,
            heartbeat=self._heartbeat,
            recoverable=self._recoverable,
            acker=self._acks,
            retries=self._retries,
            receive=self._receive,
            opened=self._opened,
            sleep=self._sleep,
            stop=self._stop_requested,
        )
        # Chores (math.inf = never): the earliest deadline of an open batch; the next
        # heartbeat check (AMQP).
        self._next_flush = self._next_beat = math.inf
        self._stopping = False
        # Jitter, so that workers started together do not all recycle together. The
        # limits themselves are read at each check: a SIGHUP may have changed them.
        self._recycle_jitter = random.uniform(1, 1.1)
        self._rss_jitter = random.uniform(1, 1.05)
        self._handled = 0
        self._inline_since = 0.0  # when the inline handler running now began (0: none)
        self.recycle = False
        """True once the worker stopped to be replaced (a recycling limit was reached)."""
        self._pending_app: App | None = None
        self._done = threading.Event()
        self.on_consuming: typing.Callable[[], None] = _nothing
        """Called in the loop's thread after every successful connect, once the queues
        are bound: the worker is ready then, not when it was built."""

    @property
    def settings(self) -> Settings:
        """The settings in force, read where used: a SIGHUP may replace them."""
        return self._config.settings

    # -- the API for other threads ----------------------------------------------------

    def stop(self, timeout: float | None) -> None:
        """Stop fetching now, let the handler in flight finish and ack, then return.

        If the handler is still running after ``timeout`` seconds its message is not
        acked (it is redelivered later); the prefetched ones are handed back anyway.
        """
        self._stopping = True
        self._stop_requested.set()
        self._poke()
        if not self._done.wait(timeout):
            LOG.warning(
                "a handler is still running after %.1fs: leaving its message unacked",
                timeout or 0.0,
            )
            self._deaths.settled()  # the runtime stops it: not a death of the message
            self._session.hand_back()

    def reload(self, app: App) -> None:
        """Have the loop re-bind to ``app``'s queues (and the live settings in force) at
        the next message boundary; in-flight work is untouched."""
        self._pending_app = app
        self._poke()

    def _poke(self) -> None:
        self._interrupt.set()
        if self._session.conn is None:
            return
        try:
            with broker.connect(self._url, connect_timeout=2) as conn:
                Producer(conn).publish(
                    b"",
                    exchange="",
                    routing_key=self._session.wake_queue,
                    delivery_mode=1,
                    content_type="application/octet-stream",
                    content_encoding="binary",
                )
        except Exception as exc:  # the loop still notices at its next event
            LOG.debug("could not wake the consume loop: %s", exc)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        self._membership.join()
        self._deaths.collect()  # a predecessor may have died handling a message
        if self._amqp:
            threading.Thread(target=self._pulse, name="consumerd-pulse", daemon=True).start()
        try:
            while not self._stopping:
                if self._session.conn is None:
                    self._connect()
                    continue
                try:
                    self._serve()
                except self._recoverable as exc:
                    self._abandon_connection()
                    self._after_loss(exc)
                except self._probe.channel_errors as exc:
                    if _CONSUMER_TIMEOUT_MARKER not in str(exc):
                        raise
                    LOG.error(
                        "RabbitMQ closed a channel: a message stayed unacked past its "
                        "consumer_timeout (%s); reconnecting: every unacked message of this "
                        "worker is redelivered",
                        exc,
                    )
                    self._abandon_connection()
        finally:
            self._shutdown()
            self._done.set()

    def _serve(self) -> None:
        conn = self._session.conn
        assert conn is not None
        drain = conn.drain_events
        while not self._stopping:
            if self._pools:
                self._settle_completed()
            if self._pending_app is not None and self._quiesced():
                self._apply_reload()
            now = time.monotonic()
            if now >= self._partitions.deadline:
                self._rebalance()
            self._session.restore_due(now)
            if now >= self._next_flush:
                self._flush_due_batches(now)
            self._retries.release_due()
            inbox = self._inbox
            if not inbox and self._acks.held:
                with contextlib.suppress(socket.timeout):
                    drain(timeout=PEEK)
            if not inbox:
                self._acks.flush()  # idle: nothing handled waits for its ack
                metrics.flush()  # and publish the tail of the last burst
                with contextlib.suppress(socket.timeout):
                    drain(timeout=self._timeout())
                if time.monotonic() >= self._next_beat:
                    # Only right after a read: py-amqp counts a heartbeat missed when no
                    # byte arrived since its last check, and none is read in a handler.
                    self._next_beat = time.monotonic() + self._heartbeat / 4
                    conn.heartbeat_check()
            while inbox and not self._stopping:
                binding, message = inbox.popleft()
                if binding is None:
                    self._retries.receive(message)
                elif message.channel is binding.channel:  # else: handed back by a rebind
                    self._on_message(binding, message)

    def _after_loss(self, exc: BaseException) -> None:
        """Reconnect at once after a stable connection; after a flap (lost soon after it
        was made) wait first, longer at each flap in a row."""
        connected_at = self._session.connected_at
        if time.monotonic() - connected_at >= STABLE_AFTER:
            self._flaps = 0
        self._flaps += 1
        if self._flaps == 1:
            LOG.warning("lost the broker (%s: %s); reconnecting", type(exc).__name__, exc)
            return
        first, longest = FLAP_BACKOFF
        ceiling = min(longest, first * 2 ** (self._flaps - 2))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        LOG.warning(
            "lost the broker again %.1fs after connecting (%s: %s; flap #%d); "
            "reconnecting in %.1fs",
            time.monotonic() - connected_at,
            type(exc).__name__,
            exc,
            self._flaps - 1,
            delay,
        )
        self._interrupt.clear()
        self._sleep(delay)

    def _timeout(self) -> float:
        """Until the next chore, or the next look for a stop (:data:`STOP_CHECK`)."""
        deadline = min(
            self._partitions.deadline,
            self._session.deadline(),
            self._next_flush,
            self._next_beat,
            self._retries.deadline(),
        )
        now = time.monotonic()
        deadline = min(deadline, now + STOP_CHECK)
        if any(pool.outstanding for pool in self._pools.values()):
            deadline = min(deadline, now + HANDLER_POLL)
        return max(0.001, deadline - now)

    def _rebalance_soon(self) -> None:
        self._partitions.look_soon(any(b.spec.partitions for b in self._session.bindings.values()))

    # -- connecting -------------------------------------------------------------------

    def _connect(self) -> None:
        """Connect through the session (which exits the worker past the broker-down
        limit), then take up the chores a new connection starts."""
        self._interrupt.clear()
        self._session.connect(self._app, self._prefetch_of, self.settings.broker_down_limit)
        if self._session.conn is None:
            return  # stopped while waiting for the broker
        self._settler.publisher = self._session.producer
        if self._heartbeat:
            self._next_beat = time.monotonic() + self._heartbeat / 4
        metrics.set_connected(True)
        metrics.set_consuming(True)
        self._rebalance_soon()
        self.on_consuming()

    def _sleep(self, seconds: float) -> None:
        self._interrupt.wait(seconds)  # a stop or reload cuts the back-off short

    def _abandon_connection(self) -> None:
        """Drop a broken connection and what came on it; running handlers finish, and
        their messages come back from the broker anyway."""
        metrics.set_connected(False)
        metrics.set_consuming(False)
        self._settler.publisher = None
        self._inbox.clear()
        for pool in self._pools.values():
            pool.drop_waiting()
        self._session.abandon()

    def _prefetch_of(self, spec: ConsumerSpec) -> int:
        settings = self.settings
        return self._app.prefetch_of(spec, settings.prefetch, settings.concurrency)

    def _opened(self, binding: Binding) -> None:
        """A consumer's channel was opened: jobs its pool still held came from the closed
        one, which handed their messages back."""
        pool = self._pools.get(binding.spec.name)
        if pool is not None:
            pool.drop_waiting()
            pool.resume()

    # -- handling messages (the hot path) ---------------------------------------------

    def _receive(self, binding: Binding | None, message: Message) -> None:
        """kombu's callback only queues: py-amqp runs callbacks while it waits for a
        publisher confirm, and a handler publishing a retry from in there would wait for
        a confirm the outer wait may already have eaten. Handling happens in the loop."""
        self._acks.delivered(message)
        self._inbox.append((binding, message))

    def _on_message(self, binding: Binding, message: Message) -> None:
        """Settle one delivery: handled and acked, retried, or dead-lettered — whatever
        its headers, body or encoding, and whatever the handler raises."""
        spec = binding.spec
        meter = metrics.for_consumer(spec.name)
        meter.received()
        queue = message.delivery_info.get("routing_key")
        if type(queue) is not str or queue not in binding.names:
            queue = binding.first or spec.name
        identity = deaths.identity_of(message)
        if binding.batch is None and _redelivered(message):
            died = self._deaths.deaths_of(identity)
            if died >= spec.max_deaths:
                LOG.error(
                    "%s: the worker died while handling message %s %d times: dead-lettering it",
                    queue,
                    identity,
                    died,
                )
                self._settler.dead_letter(
                    spec, message, queue, f"worker died while handling this message, {died} times"
                )
                self._deaths.forget(identity)
                return
        self._deaths.handling(identity)  # decoding may kill it too (a body too big)
        try:
            self._handle(binding, spec, meter, message, queue, identity=identity)
        finally:
            self._deaths.settled()

    def _handle(
        self,
        binding: Binding,
        spec: ConsumerSpec,
        meter: typing.Any,
        message: Message,
        queue: str,
        *,
        identity: str,
    ) -> None:
        try:
            decoding.check_headers(message)
            body = decoding.body_of(message)
            if spec.prepare is not None:
                body = spec.prepare(body)
        except Exception as exc:
            reason = (
                str(exc) if isinstance(exc, decoding.Undecodable) else (policy.describe_error(exc))
            )
            self._settler.dead_letter(spec, message, queue, f"undecodable: {reason}")
            return
        if body is None and spec.prepare is not None:
            self._settler.skipped(spec, message)
            return
        delivery = Delivery(message, queue)
        if binding.batch is not None:
            self._add_to_batch(binding, body, delivery)
            return
        log_context = logs.message(queue, message.properties.get("message_id"))
        pool = self._pool_of(spec)
        if pool is not None:
            key = _key_of(message, queue) if spec.partitions else None
            pool.submit(dispatch.Job(message, body, delivery, key, log_context, identity))
            return
        try:
            with meter.handling(), log_context:
                result = self._run_inline(spec.handler, body, delivery)
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt and the like from a handler are its failures:
            # the runtime never stops a worker by raising into the handler's thread.
            self._settler.failed(spec, delivery, exc)
            return
        self._settler.handled(spec, (delivery,), result)

    def _run_inline(self, handler: typing.Callable[..., object], *args: object) -> object:
        """Run a handler on this thread, letting go of the connection meanwhile: the pulse
        thread keeps it alive if the handler takes long."""
        self._inline_since = time.monotonic()
        self._wire.release()
        try:
            return handler(*args)
        finally:
            self._wire.acquire()
            self._inline_since = 0.0

    # -- handlers on other threads ------------------------------------------------------

    def _pool_of(self, spec: ConsumerSpec) -> dispatch.Pool | None:
        """The pool running ``spec``'s handlers, or None to run them inline (concurrency
        1, a plain function: today's path and cost)."""
        if spec.name in self._inline:
            return None
        pool = self._pools.get(spec.name)
        concurrency = self._app.concurrency_of(spec, self.settings.concurrency)
        if pool is None:
            if concurrency == 1 and not dispatch.is_async(spec.handler):
                self._inline.add(spec.name)
                return None
            hooks = _PoolHooks(metrics.for_consumer(spec.name), self._deaths, self._free_slots)
            pool = dispatch.Pool(spec.handler, concurrency, hooks, self._take_slot)
            self._pools[spec.name] = pool
        pool.concurrency = concurrency  # SIGHUP may have changed it
        return pool

    def _take_slot(self) -> int | None:
        """A slot of the in-flight record for a new runner (None: all taken)."""
        return self._free_slots.pop() if self._free_slots else None

    def _settle_completed(self) -> None:
        """Settle, from this thread (kombu channels are not thread-safe), what the pools
        ran: each message as if its handler had run inline."""
        for name, pool in self._pools.items():
            meter = metrics.for_consumer(name)
            for job in pool.completed():
                with _METER_LOCK:
                    meter.finished(job.seconds)
                binding = self._session.bindings.get(name)
                if binding is None:
                    continue  # a reload dropped the consumer and closed its channel
                if job.message.channel is not binding.channel and not getattr(
                    job.message.channel, "settles_after_close", False
                ):
                    continue  # its channel was closed: the broker has the message back
                if job.error is not None:
                    self._settler.failed(binding.spec, job.delivery, job.error)
                else:
                    self._settler.handled(binding.spec, (job.delivery,), job.result)

    def _quiesced(self, name: str | None = None) -> bool:
        """Pause the pools (all, or ``name``'s) and say whether their handlers are done:
        a rebind closes channels, and a message whose channel is gone cannot be acked."""
        pools = list(self._pools.values()) if name is None else [self._pools[name]]
        for pool in pools:
            if not pool.paused:
                pool.pause()
        return not any(pool.outstanding for pool in pools)

    def _finish_handlers(self) -> None:
        """At a stop: unstarted jobs go back with their channels; running handlers may
        finish (within the graceful timeout, which :meth:`stop` enforces) and are settled."""
        for pool in self._pools.values():
            pool.drop_waiting()
        while self._session.conn is not None and any(p.outstanding for p in self._pools.values()):
            time.sleep(HANDLER_POLL)  # the stop is already requested: nothing to wait on
            self._settle_completed()
            self._acks.flush()
            self._keep_alive()

    # -- the pulse (AMQP): long handlers ------------------------------------------------

    def _pulse(self) -> None:
        """While an inline handler runs the loop's thread neither reads nor writes: this
        thread, holding the connection meanwhile (``_wire``), sends the acks held for the
        messages handled before it and the heartbeats the broker expects, so a long
        handler costs neither duplicates nor the connection. It also warns of deliveries
        nearing RabbitMQ's consumer_timeout, pool handlers' and inline ones alike."""
        seen: dict[typing.Any, tuple[int, float]] = {}
        warned: set[tuple[int, int]] = set()
        while not self._done.wait(PULSE):
            since = self._inline_since
            if since and time.monotonic() - since >= PULSE and self._wire.acquire(False):
                try:
                    if self._inline_since == since:  # still in that handler
                        self._acks.flush()
                        self._keep_alive()
                except Exception as exc:  # the loop meets the same error at its next read
                    LOG.debug("pulse: %s", exc)
                finally:
                    self._wire.release()
            if self._consumer_timeout:
                self._watch_unacked(seen, warned)

    def _keep_alive(self) -> None:
        """Send a heartbeat if one is due; the loop is not reading, so unlike
        ``heartbeat_check`` this does not judge the broker by what arrived meanwhile."""
        conn = self._session.conn
        amqp_conn = conn.connection if conn is not None and self._heartbeat else None
        if amqp_conn is not None and (
            time.monotonic() - amqp_conn.last_heartbeat_sent >= self._heartbeat / 4
        ):
            amqp_conn.send_heartbeat()
            amqp_conn.last_heartbeat_sent = time.monotonic()

    def _watch_unacked(
        self, seen: dict[typing.Any, tuple[int, float]], warned: set[tuple[int, int]]
    ) -> None:
        """Warn once per delivery unacked for WARN_AT of the consumer_timeout. Its age is
        counted from when it was first seen the oldest of its channel (within PULSE of
        its delivery, or later: the warning may come late, never early)."""
        now = time.monotonic()
        heads = self._acks.oldest()
        current = {channel for channel, _, _ in heads}
        for channel in [c for c in seen if c not in current]:
            del seen[channel]
        for channel, label, tag in heads:
            first_tag, first_seen = seen.get(channel, (tag, now))
            if first_tag != tag:
                first_seen = now
            seen[channel] = (tag, first_seen)
            age = now - first_seen
            key = (id(channel), tag)
            if age >= WARN_AT * self._consumer_timeout and key not in warned:
                warned.add(key)
                LOG.warning(
                    "%s: a message has been unacked for %.0fs; at RabbitMQ's "
                    "consumer_timeout (%.0fs) the broker closes the channel and redelivers "
                    "every unacked message of it (see README: long handlers)",
                    label,
                    age,
                    self._consumer_timeout,
                )

    def _count_for_recycling(self) -> None:
        """Past a recycling limit, take no more messages: the loop hands back what it
        prefetched and returns, the worker exits 0, the master respawns its slot."""
        self._handled += 1
        settings = self.settings
        recycle_after = int((settings.max_messages_per_worker or 0) * self._recycle_jitter)
        max_rss = (settings.max_memory_per_worker or 0) * self._rss_jitter
        if recycle_after and self._handled >= recycle_after:
            reason = f"handled {self._handled} messages"
        elif max_rss and self._handled % 64 == 0 and (rss := _rss_mb()) > max_rss:
            reason = f"resident memory {rss:.0f} MB is over {max_rss:.0f} MB"
        else:
            return
        LOG.info("recycling worker %d: %s", self.worker_id, reason)
        self.recycle = True
        self._stopping = True

    # -- batches ----------------------------------------------------------------------

    def _add_to_batch(self, binding: Binding, body: typing.Any, delivery: Delivery) -> None:
        batch = binding.batch
        assert batch is not None
        if batch.add(body, delivery, time.monotonic()):
            self._flush_batch(binding, batch)
        else:
            self._next_flush = min(self._next_flush, batch.deadline)

    def _flush_due_batches(self, now: float) -> None:
        self._next_flush = math.inf
        for binding in list(self._session.bindings.values()):
            batch = binding.batch
            if batch is None or not batch:
                continue
            if batch.deadline <= now:
                self._flush_batch(binding, batch)
            else:
                self._next_flush = min(self._next_flush, batch.deadline)

    def _flush_batch(self, binding: Binding, batch: batching.Batch) -> None:
        """One handler call for the whole batch; the settler then settles all of it
        alike: a batch never half succeeds."""
        spec = binding.spec
        meter = metrics.for_consumer(spec.name)
        items, deliveries = batch.take()
        try:
            with meter.handling(), logs.message(deliveries[0].queue, None):
                # spec.batch: the handler takes lists
                result = self._run_inline(spec.handler, items, deliveries)
        except BaseException as exc:
            self._settler.batch_failed(spec, deliveries, exc)
            return
        self._settler.handled(spec, deliveries, result)

    # -- partitions -------------------------------------------------------------------

    def _rebalance(self) -> None:
        """Move to the partition map of the current worker count.

        Lost partitions are closed (prefetched messages handed back) *before* their
        leases are released; gained ones are consumed only once their lease is ours.
        """
        bindings = self._session.bindings
        shares = {
            name: (b.spec.partitions, b.owned) for name, b in bindings.items() if b.spec.partitions
        }
        for move in self._partitions.rebalance(shares, self.settings.member):
            if move.consumer in self._pools and not self._quiesced(move.consumer):
                # Its channel closes below: let the running handlers finish and ack first.
                self._partitions.look_again_in(HANDLER_POLL)
                continue
            binding = bindings[move.consumer]
            binding.close()
            self._partitions.release(move.consumer, move.lost)
            binding.owned = set(move.owned)
            self._session.open(binding)
            LOG.info(
                "%s: worker %d of %d consumes partitions %s",
                move.consumer,
                self.worker_id,
                move.workers,
                sorted(binding.owned),
            )

    # -- reload -----------------------------------------------------------------------

    def _apply_reload(self) -> None:
        app, self._pending_app = self._pending_app, None
        assert app is not None
        app.configure(broker_url=self._url)
        old, self._app = self._app, app
        self._inline.clear()  # a new handler or concurrency may need a pool now
        bindings = self._session.bindings
        for name, binding in list(bindings.items()):
            spec = app.consumers.get(name)
            pool = self._pools.get(name)
            if (
                spec is not None
                and spec.binding_key() == binding.spec.binding_key()
                and self._prefetch_of(spec) == binding.prefetch
                and (
                    pool is None
                    or dispatch.is_async(pool.handler) == dispatch.is_async(spec.handler)
                )
            ):
                binding.spec = spec  # same queues: only the handler may have changed
                if pool is not None:
                    pool.handler = spec.handler
                    pool.resume()
                continue
            if pool is not None:  # quiesced: nothing runs; what waits goes back below
                del self._pools[name]
                pool.close()
            self._partitions.leave(name, self._session.unbind(name).owned)
        if list(app.consumers) != list(old.consumers):
            self._session.rebind_retry(app.consumers)
        for name, spec in app.consumers.items():
            if name not in bindings:
                # New queues (a new consumer, a higher partition count) exist only once
                # declared: RabbitMQ refuses to consume an undeclared one (NOT_FOUND).
                self._session.declare(spec)
                self._session.bind(spec, self._prefetch_of(spec), None)
        self._rebalance_soon()
        LOG.info(
            "reloaded: consuming %s",
            ", ".join(f"{b.spec.name}(prefetch={b.prefetch})" for b in bindings.values()),
        )

    # -- stopping ---------------------------------------------------------------------

    def _shutdown(self) -> None:
        metrics.set_consuming(False)
        self._finish_handlers()
        for pool in self._pools.values():
            pool.close()
        if self._session.conn is not None:
            try:
                self._acks.flush()
            except Exception as exc:  # lost: the broker redelivers those messages
                LOG.warning("could not send the last acks: %s", exc)
            self._session.close()
        self._partitions.release_all()  # after the channels: their messages are back
        self._membership.leave()
        self._deaths.close()
        metrics.set_connected(False)
        metrics.flush()


def _nothing() -> None:
    pass


def _taken_lock() -> threading.Lock:
    """A lock already held (by whoever drives the loop: a plain lock has no owner)."""
    lock = threading.Lock()
    lock.acquire()
    return lock


def _redelivered(message: Message) -> bool:
    """Whether the broker delivered this message before (a worker may have died on it)."""
    headers = message.headers
    return bool(message.delivery_info.get("redelivered")) or (
        isinstance(headers, dict)
        and bool(headers.get("redelivered") or headers.get("x-delivery-count"))
    )


_METER_LOCK = threading.Lock()
"""A meter is written by the loop's thread; a pool's runners start handlers on theirs."""


class _PoolHooks:
    """What a pool's runners do as a handler starts and ends: the in-flight gauge, and the
    in-flight record (deaths.py) in the runner's own slot."""

    def __init__(
        self, meter: metrics.ConsumerMetrics, record: deaths.DeathCounter, free: list[int]
    ) -> None:
        self._meter = meter
        self._record = record
        self._free = free

    def started(self, job: dispatch.Job, slot: int | None) -> None:
        with _METER_LOCK:
            self._meter.started()
        if slot is not None:
            self._record.handling(job.identity, slot)

    def ended(self, job: dispatch.Job, slot: int | None) -> None:
        if slot is not None:  # its handler ended: a death from now on is not its doing
            self._record.settled(slot)

    def retired(self, slot: int | None) -> None:
        if slot is not None:
            self._free.append(slot)  # list.append is atomic; the loop pops


def _key_of(message: Message, queue: str) -> tuple[str, str]:
    """The order key of a partitioned consumer's message: the key it was published with;
    a message without one (another producer's) keeps the order of its partition."""
    key = (message.headers or {}).get(policy.KEY)
    return ("key", key) if isinstance(key, str) else ("queue", queue)


def _rss_mb() -> float:
    """This process's resident memory now (not its peak), in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1_048_576


def _full_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import OutOfMemoryError  # noqa: PLC0415 - optional

        return (OutOfMemoryError,)
    except ImportError:  # pragma: no cover - redis-py is a dependency
        return ()
