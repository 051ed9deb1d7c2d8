"""Property observation: an instance's attributes, checked after each of its calls.

``executor.observe(obj, names)`` on every executor ends here (ThreadExecutor
directly, the remote ones through the server's ``observe`` operation).

Where the reads happen. Attributes may be properties that talk to hardware,
so they are read in the instance's own thread, never on the loop:

* a call that runs in that thread (a sync method, a sync or async generator
  step there, an async method of a ThreadExecutor instance) checks at its
  end, in the same job (``Instance.observation.check()``, from ``calls``);
* a call that ran on the loop (an async method or generator step on a
  server connection's runner, a non-blocking sync method) queues a check
  (``Instance.check_next``) that runs next in the thread, before any other
  entry of the instance's FIFO.

An instance nobody observes has no ``Observation`` (``instance.observation``
is None): its calls pay one attribute test, nothing else.

Each check reads every observed name, compares each value with the last one
read (``differs``: ``!=``, guarded) and queues what changed in ``pending``.
The observers live on the loop: ``Instance.finish``, which runs on the loop
when each entry ends (after its check), hands ``pending`` to them
(``drain``), in the order the checks made it. A new observer's initial
values are read by a job in the instance's FIFO (``Observation.join``) and
travel through ``pending`` too, so it sees exactly the changes after them.

Each observer has a bounded queue: one that falls behind drops what it has
queued and, when next read, yields one resynchronisation (the latest value
of every name it observes, marked ``resync``) instead of the changes it
missed. Its memory is at most ``max_queue + len(names)`` changes.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Self

import anyio
import anyio.lowlevel

from remote_exec.exceptions import (
    ExecutorStateError,
    UnknownInstanceError,
    exception_type_name,
)
from remote_exec.executor import PropertyChange, RemoteStream

from .instances import Entry, Instance, InternalJob
from .worker import Job

__all__ = ["DEFAULT_MAX_QUEUE", "Observation", "Observer", "differs", "read_attribute"]

logger = logging.getLogger("remote_exec.runtime")

DEFAULT_MAX_QUEUE = 1024
"""Changes an observer may have waiting before it falls behind (and is resynchronised)."""

Read = tuple[Any, str | None]
"""What reading an attribute gave: (value, None), or (None, "TypeName: message")."""


def read_attribute(obj: Any, name: str) -> Read:
    """``getattr(obj, name)``; a read that raises is reported, never raised."""
    try:
        return getattr(obj, name), None
    except Exception as exc:  # noqa: BLE001 - a failing property is the observers' news
        return None, f"{type(exc).__qualname__}: {exc}"


def differs(old: Read, new: Read) -> bool:
    """Whether ``new`` is a change from ``old``: ``!=`` on the values (the
    same object is no change; an ``__eq__`` that raises or gives no truth
    value, such as a numpy array's, counts as a change), or another error."""
    if old[1] is not None or new[1] is not None:
        return old[1] != new[1]
    before, after = old[0], new[0]
    if after is before:
        return False
    try:
        return bool(after != before)
    except Exception:  # noqa: BLE001 - cannot tell: report it
        return True


class Observation:
    """One instance's observed attributes and their observers.

    ``counts``, ``names`` and ``pending`` are shared by the instance's thread
    and the loop (under ``lock``); ``last`` belongs to the instance's thread;
    ``observers`` and ``members`` to the loop.
    """

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.obj = instance.obj
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}  # name -> how many observers watch it
        self.names: tuple[str, ...] = ()  # the keys of ``counts`` (read once per check)
        self.last: dict[str, Read] = {}
        # (None, changes) from a check, or (observer, initial values) from a join.
        self.pending: list[tuple[Observer | None, list[tuple[str, Any, str | None]]]] = []
        self.observers: list[Observer] = []  # live: they get every change
        self.members = 0  # observers opening or live
        self.closed = False  # the instance went away

    # -- in the instance's thread ----------------------------------------------
    def check(self) -> bool:
        """Read every observed name; queue what changed (never raises).

        Returns:
            Whether something changed.
        """
        names = self.names
        if not names:
            return False
        try:
            obj, last = self.obj, self.last
            changed = []
            for name in names:
                new = read_attribute(obj, name)
                old = last.get(name)
                if old is None or differs(old, new):
                    last[name] = new
                    changed.append((name, new[0], new[1]))
            if changed:
                with self.lock:
                    self.pending.append((None, changed))
                return True
        except Exception:  # a bug here must never fail the call it follows
            logger.exception("could not check the observed attributes of %r", self.instance.name)
        return False

    def join(self, observer: Observer) -> None:
        """Start watching ``observer``'s names and queue its initial values."""
        self.check()  # what changed since the last check goes to the others first
        with self.lock:
            if observer.left:  # gave up before its turn came
                return
            observer.joined = True
            counts = self.counts
            fresh = [name for name in observer.names if name not in counts]
            for name in observer.names:
                counts[name] = counts.get(name, 0) + 1
            self.names = tuple(counts)
        last = self.last
        for name in fresh:
            last[name] = read_attribute(self.obj, name)
        initial = [(name, *last[name]) for name in observer.names]
        with self.lock:
            self.pending.append((observer, initial))

    # -- on the loop -------------------------------------------------------------
    def drain(self) -> None:
        """Hand what the checks found to the observers, in order (never raises:
        it may run as a loop callback)."""
        if not self.pending:
            return
        with self.lock:
            batch, self.pending = self.pending, []
        try:
            for observer, changes in batch:
                if observer is None:
                    for live in self.observers:
                        live.offer(changes)
                elif not observer.left:
                    observer.start(changes)
                    if self.closed:
                        observer.finish()
                    else:
                        self.observers.append(observer)
        except Exception:
            logger.exception("could not hand changes to the observers of %r", self.instance.name)

    def leave(self, observer: Observer) -> None:
        """``observer`` is done: its names are no longer watched for it."""
        if observer in self.observers:
            self.observers.remove(observer)
        with self.lock:
            observer.left = True
            if observer.joined:
                observer.joined = False
                counts = self.counts
                for name in observer.names:
                    if counts[name] > 1:
                        counts[name] -= 1
                    else:
                        del counts[name]  # a later join reads it afresh
                self.names = tuple(counts)
        self.members -= 1
        if not self.members and self.instance.observation is self:
            self.instance.observation = None  # its calls check nothing any more

    def end(self) -> None:
        """The instance is going away: every observer's stream ends."""
        self.closed = True
        if self.instance.observation is self:
            self.instance.observation = None
        for observer in list(self.observers):
            observer.finish()

    def next_check(self) -> Entry:
        """An entry that checks in the instance's thread (after a call that ran on the loop)."""
        return _Check(self)


class _Check(Entry):
    """``Observation.check`` as an entry of the instance's FIFO."""

    __slots__ = ("job", "observation")
    pipelined = True

    def __init__(self, observation: Observation) -> None:
        self.observation = observation
        self.job: Job | None = None

    def start(self) -> bool:
        try:
            self.job = self.observation.instance.worker.submit(
                self.observation.check, on_done=self._on_done
            )
        except ExecutorStateError:
            return False
        return True

    def _on_done(self, job: Job) -> None:
        self.job = None
        self.observation.instance.finish(self)


class Observer(RemoteStream):
    """One subscriber: an async iterator of ``PropertyChange`` (on the loop).

    Entering (or the first ``__anext__``) queues the read of the initial
    values in the instance's FIFO and waits for it; leaving unsubscribes.
    """

    def __init__(
        self,
        instance: Instance,
        names: tuple[str, ...],
        max_queue: int = DEFAULT_MAX_QUEUE,
        *,
        vet: Callable[[Any], object] | None = None,
    ) -> None:
        self.instance = instance
        # Raises for a value that could not travel (ThreadExecutor(check_codec=True)):
        # such a value is delivered as an error, as a server would send it.
        self.vet = vet
        self.names = names
        self.order = {name: index for index, name in enumerate(names)}
        self.limit = max_queue + len(names)
        self.queue: deque[PropertyChange] = deque()
        self.latest: dict[str, Read] = {}  # every name's newest value, for a resync
        self.seq = 0
        self.behind = False  # fell behind: a resync is due
        self.ended = False
        self.opened = False
        self.joined = False  # under the observation's lock
        self.left = False  # under the observation's lock
        self.observation: Observation | None = None
        self.wakeup: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<observer of {self.instance.name!r} {list(self.names)}>"

    # -- fed by the observation ----------------------------------------------------
    def start(self, initial: list[tuple[str, Any, str | None]]) -> None:
        for name, value, error in initial:
            self.latest[name] = (value, error)
            self.seq += 1
            self.queue.append(PropertyChange(self.seq, name, value, False, error))
        self._wake()

    def offer(self, changes: list[tuple[str, Any, str | None]]) -> None:
        """What one check found: this observer's names, in the order it gave them."""
        order, queue, latest = self.order, self.queue, self.latest
        mine = [change for change in changes if change[0] in order]
        if not mine:
            return
        if len(mine) > 1:
            mine.sort(key=lambda change: order[change[0]])
        for name, value, error in mine:
            latest[name] = (value, error)
            if self.behind:
                continue  # the resync will carry it
            if len(queue) >= self.limit:
                queue.clear()
                self.behind = True
            else:
                self.seq += 1
                queue.append(PropertyChange(self.seq, name, value, False, error))
        self._wake()

    def finish(self) -> None:
        """No more changes (the instance is going away): what is queued is still read."""
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()

    def _resync(self) -> None:
        self.behind = False
        for name in self.names:
            value, error = self.latest[name]
            self.seq += 1
            self.queue.append(PropertyChange(self.seq, name, value, True, error))

    # -- the consumer ----------------------------------------------------------------
    async def open(self) -> None:
        """Subscribe: the initial values are read in the instance's FIFO.

        Raises:
            UnknownInstanceError: the instance was deleted.
        """
        if self.opened:
            return
        self.opened = True
        instance = self.instance
        if instance.deleted:
            raise UnknownInstanceError(f"the instance {instance.name!r} was deleted")
        current = instance.observation
        if isinstance(current, Observation):
            observation = current
        else:
            observation = Observation(instance)
            instance.observation = observation
        observation.members += 1
        self.observation = observation
        try:
            # Its end, on this loop, drains the initial values to us (``drain``).
            await InternalJob(instance, functools.partial(observation.join, self)).run()
        except BaseException:
            self._leave()
            raise

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    def take(self, count: int) -> list[PropertyChange]:
        """Up to ``count`` changes that are ready now (without waiting)."""
        if self.behind:
            self._resync()
        queue = self.queue
        return [queue.popleft() for _ in range(min(count, len(queue)))]

    async def __anext__(self) -> PropertyChange:
        if not self.opened:
            await self.open()
        while True:
            if self.behind:
                self._resync()
            if self.queue:
                change = self.queue.popleft()
                return change if self.vet is None else self._vetted(change)
            if self.ended:
                raise StopAsyncIteration
            if self.wakeup is not None:
                raise RuntimeError("anext(): another task is already waiting for these changes")
            self.wakeup = wakeup = anyio.Event()
            try:
                await wakeup.wait()
            finally:
                self.wakeup = None

    def _vetted(self, change: PropertyChange) -> PropertyChange:
        assert self.vet is not None
        try:
            self.vet(change.value)
        except Exception as exc:  # noqa: BLE001 - the subscriber's news, as on a server
            error = f"{exception_type_name(exc)}: {exc}"
            return PropertyChange(change.seq, change.name, None, change.resync, error)
        return change

    def _leave(self) -> None:
        observation, self.observation = self.observation, None
        if observation is not None:
            observation.leave(self)
        self.ended = True
        self._wake()

    async def aclose(self) -> None:
        """Unsubscribe (idempotent): the instance forgets this observer at once."""
        self._leave()
        self.queue.clear()
        await anyio.lowlevel.checkpoint()
