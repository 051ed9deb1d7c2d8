"""A held instance and its FIFO of entries.

The FIFO *is* the order of the instance's calls (see ``runtime.runtime``):
only the first entries have started, and they finish in order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from remote_exec.exceptions import ExecutorStateError, UnknownInstanceError

from .events import EventHub
from .invocations import InvocationTable
from .lifecycle import Hooks
from .worker import InstanceWorker, Job

__all__ = ["Entry", "Instance", "InternalJob", "Turn", "exclusive"]

logger = logging.getLogger("remote_exec.runtime")


class _OpenStream(Protocol):
    async def close_now(self, error: BaseException) -> None: ...


class _Runner(Protocol):
    def stop(self) -> None: ...


class _Observation(Protocol):  # ``runtime.observe.Observation``
    def check(self) -> bool: ...
    def drain(self) -> None: ...
    def next_check(self) -> Entry: ...
    def end(self) -> None: ...


class Entry:
    """One item of an instance's FIFO."""

    __slots__ = ()

    # Sync work that may be handed to the worker thread while the entries
    # before it still run there: the worker's own FIFO keeps them in order.
    pipelined = False

    def start(self) -> bool:
        """Called when the entry becomes the head; False: it is not running
        (skipped, or already finished) and leaves the queue."""
        raise NotImplementedError

    def drop(self, error: BaseException) -> None:
        """The instance went away before this entry started (it left the queue)."""


class Instance:
    """A held object, its worker thread and its FIFO.

    The first ``active`` entries of ``queue`` have started: either one entry
    alone, or a run of pipelined sync entries already handed to the worker
    thread (which runs them one at a time, in order). They finish in order.
    """

    __slots__ = (
        "active",
        "async_in_thread",
        "close_grace",
        "deleted",
        "events",
        "hooks",
        "idle",
        "invocations",
        "key",
        "name",
        "obj",
        "observation",
        "owner",
        "queue",
        "runners",
        "scope",
        "streams",
        "worker",
    )

    def __init__(
        self,
        name: str,
        obj: Any,
        key: tuple[str, str],
        worker: InstanceWorker,
        owner: set[str] | None = None,
        *,
        events: EventHub | None = None,
        invocations: InvocationTable | None = None,
        close_grace: float = 5.0,
    ) -> None:
        self.name = name
        self.obj = obj
        self.key = key  # (module, qualname) as the client asked for it
        self.worker = worker
        # Async methods and steps run in the instance's thread when it has a
        # loop (ThreadExecutor), else on the loop of the peer that called them.
        self.async_in_thread = worker.runs_coroutines
        self.events = events if events is not None else EventHub()
        self.invocations = invocations if invocations is not None else InvocationTable()
        self.close_grace = close_grace  # how long closing one generator may take
        # The names the creating connection holds (``max_instances``): the set,
        # not the connection, so that an instance never keeps a dead one alive.
        self.owner = owner
        self.queue: deque[Entry] = deque()
        self.active = 0  # how many entries at the front have started
        self.deleted = False
        self.streams: set[_OpenStream] = set()  # streams whose generator may be alive
        self.runners: set[_Runner] = set()
        # Its observed attributes (``runtime.observe``); None: nobody observes it.
        self.observation: _Observation | None = None
        self.hooks: Hooks | None = None  # its lifecycle hooks, if it is a context manager
        self.scope = "server"  # or "connection" (see ``InstanceRuntime.create``)
        self.idle: anyio.Event | None = None  # set when no entry runs any more (``wait_idle``)

    async def wait_idle(self) -> None:
        """Until no entry of its FIFO runs (once deleted: none starts any more)."""
        while self.active:
            idle = self.idle = anyio.Event()
            await idle.wait()

    @property
    def class_name(self) -> str:
        return ".".join(self.key)

    def publish_execute(
        self, method: str, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Tell the "execute" channel that ``method`` returned (or yielded) ``result``."""
        events = self.events
        if events.has_subscribers:
            events.publish(
                self.name,
                "execute",
                {"method": method, "args": list(args), "kwargs": kwargs, "result": result},
            )

    def enqueue(self, entry: Entry) -> None:
        if self.deleted:
            raise UnknownInstanceError(f"the instance {self.name!r} was deleted")
        self.queue.append(entry)
        self._advance()

    def enqueue_next(self, entry: Entry) -> None:
        """Queue ``entry`` right after the active ones (closing a generator jumps the queue)."""
        if self.deleted:
            raise UnknownInstanceError(f"the instance {self.name!r} was deleted")
        self.queue.insert(self.active, entry)
        self._advance()

    def waiting(self) -> int:
        """How many entries have not begun to run (some may wait in the worker)."""
        queue = self.queue
        handed = sum(
            1
            for index in range(self.active)
            if isinstance(job := getattr(queue[index], "job", None), Job) and job.state == "queued"
        )
        return len(queue) - self.active + handed

    def remove(self, entry: Entry) -> bool:
        """Take a waiting (not started) entry out of the queue."""
        queue = self.queue
        for index in range(self.active, len(queue)):
            if queue[index] is entry:
                del queue[index]
                return True
        return False

    def finish(self, entry: Entry) -> None:
        """A started entry is done: start what may start next."""
        if self.observation is not None:
            self.observation.drain()  # what its check found goes to the observers
        queue = self.queue
        if self.active and queue[0] is entry:
            queue.popleft()
        else:
            for index in range(1, self.active):
                if queue[index] is entry:  # a pipelined job cancelled before it ran
                    del queue[index]
                    break
            else:
                self.remove(entry)
                return
        self.active -= 1
        if not self.deleted:
            self._advance()
        if not self.active and self.idle is not None:
            self.idle.set()
            self.idle = None

    def check_next(self) -> None:
        """A call that ran on the loop (not in the thread) ends: if observed,
        check its attributes in the thread next, before any other entry."""
        observation = self.observation
        if observation is not None and not self.deleted:
            self.queue.insert(self.active, observation.next_check())

    def end_observation(self) -> None:
        """The instance is going away: its observers' streams end."""
        if self.observation is not None:
            self.observation.end()

    def _advance(self) -> None:
        queue = self.queue
        while len(queue) > self.active:
            entry = queue[self.active]
            if self.active and not (entry.pipelined and queue[0].pipelined):
                return
            self.active += 1
            try:
                started = entry.start()
            except Exception:  # a bug in an entry must not wedge the instance
                logger.exception("could not start %r on instance %r", entry, self.name)
                started = False
            if not started:
                self.active -= 1
                if len(queue) > self.active and queue[self.active] is entry:
                    del queue[self.active]


class InternalJob(Entry):
    """A sync function run in the instance's thread for a server task."""

    __slots__ = ("done", "error", "fn", "instance", "job", "value")
    pipelined = True

    def __init__(self, instance: Instance, fn: Callable[[], Any]) -> None:
        self.instance = instance
        self.fn = fn
        self.job: Job | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = anyio.Event()

    def start(self) -> bool:
        try:
            self.job = self.instance.worker.submit(self.fn, on_done=self._on_done)
        except ExecutorStateError as exc:
            self.error = exc
            self.done.set()
            return False
        return True

    def drop(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def _on_done(self, job: Job) -> None:
        self.job = None  # the job refers back to us: no cycle may outlive the work
        try:
            self.value = job.result()
        except BaseException as exc:  # noqa: BLE001 - the waiting task gets it
            self.error = exc
        self.done.set()
        self.instance.finish(self)

    async def run(self) -> Any:
        self.instance.enqueue(self)
        try:
            await self.done.wait()
        except BaseException:
            if not self.instance.remove(self) and self.job is not None:
                self.job.cancel()  # never starts if still queued in the worker
            raise
        if self.error is not None:
            raise self.error
        return self.value


class Turn(Entry):
    """An exclusive turn on an instance for a server task."""

    __slots__ = ("event", "started")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.started = False

    def start(self) -> bool:
        self.started = True
        self.event.set()
        return True


@asynccontextmanager
async def exclusive(instance: Instance) -> AsyncIterator[None]:
    """Wait for a turn on ``instance``; nothing else runs on it inside the block."""
    turn = Turn()
    instance.enqueue(turn)
    try:
        await turn.event.wait()
        yield
    finally:
        if turn.started:
            instance.finish(turn)
        else:
            instance.remove(turn)
