"""Handlers running concurrently inside one worker, in order where order is promised.

The consume loop's thread owns the broker connection (kombu channels are not
thread-safe), so a handler on another thread never acks. A :class:`Pool` has
``concurrency`` runners — threads for plain functions, tasks of the worker's one asyncio
event loop for ``async def`` handlers — that take jobs as soon as they are free, run the
handler and leave the outcome for :meth:`Pool.completed`, which the loop polls and then
settles every job itself (ack, retry or dead letter). A runner never waits for the loop
between two jobs: the loop hands over every job that may start, and the runners' number
is the limit.

Order: jobs with the same key never run at the same time and start in the order they
arrived, so they also finish in that order; jobs with other keys run beside them. A key
of None means no order at all. The loop keeps a line per key with a job in hand, and
hands over the next job of a key only once the previous one completed.

A job handed over but not started is the pool's to take back (:meth:`Pool.pause`,
:meth:`Pool.drop_waiting`): at a stop or a rebind the loop forgets them, and their
messages go back to the broker with their channel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import queue
import threading
import time
import typing
from collections.abc import Callable, Hashable

#: Runners a pool may have: the in-flight record of a worker has a slot for each (see
#: :mod:`consumerd.consumer.deaths`), slot 0 being the loop's own.
MAX_RUNNERS = 1024


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
    seconds: float = 0.0
    result: object = None
    error: BaseException | None = None


class Hooks(typing.Protocol):
    """What a pool tells its worker, from the runners' threads."""

    def started(self, job: Job, slot: int | None) -> None:
        """A runner (in-flight record slot ``slot``, None: none was free) begins ``job``."""

    def ended(self, job: Job, slot: int | None) -> None:
        """That runner's handler returned or raised."""

    def retired(self, slot: int | None) -> None:
        """A runner ended (fewer runners wanted): its slot is free again."""


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


class _Handoff:
    """Jobs (and ending runners' stop signals) from the loop's thread to the asyncio
    runners, in order, with one wakeup of the event loop for each run of jobs handed over
    before it took the previous ones: ``call_soon_threadsafe`` per job wrote to the event
    loop's wakeup pipe per job and woke its thread per job."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()
        """The runners take from it, on the event loop's thread."""
        self._incoming: collections.deque[Job | None] = collections.deque()
        self._scheduled = False

    def put(self, job: Job | None) -> None:
        """From the loop's thread."""
        self._incoming.append(job)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self.take)

    def take(self) -> None:
        """On the event loop's thread: into the runners' queue with what was handed over.
        The flag is cleared before the deque is emptied, so a job appended after the last
        look at it finds the flag cleared and schedules another take."""
        self._scheduled = False
        incoming, put = self._incoming, self.queue.put_nowait
        while incoming:
            put(incoming.popleft())


class Pool:
    """Runs one consumer's handler, ``concurrency`` jobs at a time. Its methods are for
    the loop's thread; the runners only take jobs, call the hooks and leave outcomes."""

    def __init__(
        self,
        handler: Callable[..., typing.Any],
        concurrency: int,
        hooks: Hooks,
        slots: Callable[[], int | None],
    ) -> None:
        self.handler = handler
        self._hooks = hooks
        self._slots = slots  # a free in-flight record slot for a new runner
        self._async = is_async(handler)
        self._todo: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._async_todo: _Handoff | None = None
        self._held: collections.deque[Job] = collections.deque()  # while paused
        self._lines: dict[Hashable, collections.deque[Job]] = {}
        """Per key with a job handed over (queued or running): the jobs waiting behind it."""
        self._done: collections.deque[Job] = collections.deque()  # appended by runners
        self.outstanding = 0
        """Jobs handed over and not completed yet (queued for a runner, or running)."""
        self.paused = False
        self._runners = 0
        self.concurrency = concurrency

    @property
    def concurrency(self) -> int:
        return self._runners

    @concurrency.setter
    def concurrency(self, wanted: int) -> None:
        """Start or end runners (SIGHUP may change it); an ending runner finishes the job
        it has first."""
        wanted = min(wanted, MAX_RUNNERS)
        while self._runners < wanted:
            self._runners += 1
            self._start_runner(self._slots())
        while self._runners > wanted:
            self._runners -= 1
            self._hand_over(None)

    def submit(self, job: Job) -> None:
        if job.key is not None:
            line = self._lines.get(job.key)
            if line is not None:
                line.append(job)  # behind the same key's job in hand
                return
            self._lines[job.key] = collections.deque()
        self._give(job)

    def completed(self) -> list[Job]:
        """Jobs whose handler returned or raised since the last call, in that order; the
        jobs of their keys waiting behind them are handed over now."""
        finished = []
        while self._done:
            job = self._done.popleft()
            finished.append(job)
            self.outstanding -= 1
            if job.key is not None:
                line = self._lines.get(job.key)
                if line:
                    self._give(line.popleft())
                elif line is not None:
                    del self._lines[job.key]
        return finished

    def pause(self) -> None:
        """Take back what no runner started yet; hand over nothing until :meth:`resume`
        (a rebind is waiting for the running handlers)."""
        self.paused = True
        self._held.extend(self._take_back())

    def resume(self) -> None:
        self.paused = False
        while self._held:
            self._give(self._held.popleft())

    def drop_waiting(self) -> int:
        """Forget the jobs not started (their messages go back with their channel); the
        running ones finish. Returns how many were dropped."""
        dropped = [*self._held, *self._take_back()]
        self._held.clear()
        # A key's line exists while one job of it is handed over: the lines of the jobs
        # taken back go, those of the running ones stay, emptied.
        gone = {job.key for job in dropped}
        self._lines = {k: collections.deque() for k in self._lines if k not in gone}
        return len(dropped) + sum(len(q) for q in self._lines.values())

    def close(self) -> None:
        """End the runners once their current job is done (the worker is stopping)."""
        self.concurrency = 0

    # -- runners ----------------------------------------------------------------------

    def _give(self, job: Job) -> None:
        if self.paused:
            self._held.append(job)
            return
        self.outstanding += 1
        self._hand_over(job)

    def _hand_over(self, job: Job | None) -> None:
        if self._async_todo is not None:
            self._async_todo.put(job)
        else:
            self._todo.put(job)

    def _take_back(self) -> list[Job]:
        """The jobs handed over that no runner has taken (runners may take more meanwhile:
        those run); the stop signals of ending runners stay queued."""
        if self._async_todo is not None:
            handoff = self._async_todo

            async def drain() -> list[Job | None]:
                handoff.take()  # what is still on its way is taken back too
                todo = handoff.queue
                return _drain(todo.get_nowait, asyncio.QueueEmpty, todo.put_nowait)

            items = asyncio.run_coroutine_threadsafe(drain(), handoff.loop).result()
        else:
            items = _drain(self._todo.get_nowait, queue.Empty, self._todo.put)
        taken = [job for job in items if job is not None]
        self.outstanding -= len(taken)
        return taken

    def _start_runner(self, slot: int | None) -> None:
        if self._async:
            if self._async_todo is None:
                self._async_todo = _Handoff(_EventLoop.get())
            todo = self._async_todo
            asyncio.run_coroutine_threadsafe(self._run_async(todo.queue, slot), todo.loop)
        else:
            threading.Thread(
                target=self._run, args=(slot,), name=f"consumerd-handler-{slot}", daemon=True
            ).start()

    def _run(self, slot: int | None) -> None:
        while (job := self._todo.get()) is not None:
            self._hooks.started(job, slot)
            start = time.perf_counter()
            try:
                with job.context:
                    job.result = self.handler(job.body, job.delivery)
            except BaseException as exc:  # any way a handler ends is its message's outcome
                job.error = exc
            self._finish(job, slot, start)
        self._hooks.retired(slot)

    async def _run_async(self, todo: asyncio.Queue[Job | None], slot: int | None) -> None:
        while (job := await todo.get()) is not None:
            self._hooks.started(job, slot)
            start = time.perf_counter()
            try:
                with job.context:
                    job.result = await self.handler(job.body, job.delivery)
            except BaseException as exc:  # cancelled included
                job.error = exc
            self._finish(job, slot, start)
        self._hooks.retired(slot)

    def _finish(self, job: Job, slot: int | None, start: float) -> None:
        job.seconds = time.perf_counter() - start
        self._hooks.ended(job, slot)
        self._done.append(job)  # deque.append is atomic: no lock on the hot path


def _drain(
    get: Callable[[], Job | None], empty: type[Exception], put: Callable[[Job | None], None]
) -> list[Job | None]:
    """Everything queued now, the stop signals (None) put back."""
    items: list[Job | None] = []
    with contextlib.suppress(empty):
        while True:
            items.append(get())
    for item in items:
        if item is None:
            put(item)
    return [item for item in items if item is not None]
