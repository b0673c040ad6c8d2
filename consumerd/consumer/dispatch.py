"""Handlers running concurrently inside one worker, in order where order is promised.

The consume loop's thread owns the broker connection (kombu channels are not
thread-safe), so a handler on another thread never acks: a :class:`Pool` takes jobs from
the loop, runs at most ``concurrency`` of them at once — plain functions on threads,
``async def`` handlers as tasks of one event loop per worker — and hands each outcome
back through :meth:`Pool.completed`, which the loop calls and then settles every job
itself (ack, retry or dead letter).

Order: jobs with the same key never run at the same time and start in the order they
arrived, so they also finish in that order; jobs with other keys run beside them. A key
of None means no order at all. Waiting behind a busy key costs nothing to the others:
each key has its own line, and only the head of a line is ever ready.

A job that has not started belongs to no thread: :meth:`Pool.drop_waiting` forgets them
at a stop or a rebind, and the loop hands their messages back with their channel.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import inspect
import threading
import time
import typing
from collections.abc import Callable, Hashable

#: Threads a pool may ever start: the live limit is :attr:`Pool.concurrency` (SIGHUP may
#: raise it), the executor only needs a ceiling.
MAX_THREADS = 1024


@dataclasses.dataclass(eq=False)
class Job:
    """One message on its way through a pool; ``error`` is set if the handler raised."""

    message: typing.Any
    body: typing.Any
    delivery: typing.Any
    key: Hashable | None
    context: contextlib.AbstractContextManager[object]
    """Entered around the handler, in the thread or task that runs it (log context)."""
    identity: str = ""
    """What the worker's in-flight record notes while it runs (see deaths.py)."""
    slot: int | None = None
    """Its slot in that record, while it runs (None: not noted)."""
    seconds: float = 0.0
    result: object = None
    error: BaseException | None = None


def is_async(handler: Callable[..., typing.Any]) -> bool:
    """True for an ``async def`` handler (it needs the event loop, even one at a time)."""
    return inspect.iscoroutinefunction(handler)


class _EventLoop:
    """The one asyncio loop of a worker process, on a thread of its own, started when an
    ``async def`` handler first runs."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="consumerd-asyncio", daemon=True
                ).start()
                cls._loop = loop
            return cls._loop


class Pool:
    """Runs one consumer's handler, ``concurrency`` jobs at a time. Every method is for
    the loop's thread except :meth:`_finish`, which the handlers' threads call; the loop
    polls :meth:`completed` (it drains the broker with a short timeout while a job runs)."""

    def __init__(
        self,
        handler: Callable[..., typing.Any],
        concurrency: int,
        started: Callable[[Job], None],
    ) -> None:
        self.handler = handler
        self.concurrency = concurrency
        self._started = started
        self._ready: collections.deque[Job] = collections.deque()
        self._lines: dict[Hashable, collections.deque[Job]] = {}
        """Per key with a job ready or running: the jobs waiting behind it."""
        self._done: collections.deque[Job] = collections.deque()  # appended by handlers
        self.running = 0
        self.paused = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        """Jobs accepted and not yet completed (waiting, ready or running)."""
        return self.running + len(self._ready) + sum(len(q) for q in self._lines.values())

    def submit(self, job: Job) -> None:
        if job.key is not None:
            line = self._lines.get(job.key)
            if line is not None:
                line.append(job)  # behind the same key's job in hand
                return
            self._lines[job.key] = collections.deque()
        self._ready.append(job)
        self._start()

    def completed(self) -> list[Job]:
        """Jobs whose handler returned or raised since the last call, in that order; the
        jobs they held back start now."""
        finished = []
        while self._done:
            job = self._done.popleft()
            finished.append(job)
            self.running -= 1
            if job.key is not None:
                line = self._lines[job.key]
                if line:
                    self._ready.append(line.popleft())
                else:
                    del self._lines[job.key]
        if finished:
            self._start()
        return finished

    def resume(self) -> None:
        self.paused = False
        self._start()

    def drop_waiting(self) -> int:
        """Forget the jobs not started yet (their messages go back with their channel);
        the running ones finish. Returns how many were dropped."""
        dropped = len(self) - self.running
        # A key has a line while one job of it is ready or running (never both): the
        # lines of the ready jobs go, those of the running ones stay, emptied.
        ready = {job.key for job in self._ready}
        self._lines = {k: collections.deque() for k in self._lines if k not in ready}
        self._ready.clear()
        return dropped

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> None:
        while self._ready and self.running < self.concurrency and not self.paused:
            job = self._ready.popleft()
            self.running += 1
            self._started(job)
            if is_async(self.handler):
                asyncio.run_coroutine_threadsafe(self._run_async(job), _EventLoop.get())
            else:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        MAX_THREADS, thread_name_prefix="consumerd-handler"
                    )
                self._executor.submit(self._run, job)

    def _run(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            with job.context:
                job.result = self.handler(job.body, job.delivery)
        except BaseException as exc:
            job.error = exc
        self._finish(job, start)

    async def _run_async(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            with job.context:
                job.result = await self.handler(job.body, job.delivery)
        except BaseException as exc:
            job.error = exc
        self._finish(job, start)

    def _finish(self, job: Job, start: float) -> None:
        job.seconds = time.perf_counter() - start
        self._done.append(job)  # deque.append is atomic: no lock on the hot path
