"""``InstanceRuntime``: the one engine behind every executor.

It holds the instances of one side (ThreadExecutor's, or a server's: the
process child and the daemon) and owns how calls to them are queued, run,
cancelled and closed. ThreadExecutor drives it in-process, with the caller's
own objects; the server's dispatcher drives it from protocol messages. Both
hand it a *peer* (see ``calls.Peer``) that carries each call's outcome back.

Ordering. Each instance has one FIFO of entries (method calls, generator
steps, internal jobs and exclusive turns); the queue *is* the order, nothing
relies on lock fairness or on the order in which a scheduler wakes tasks.
An entry starts in one of three ways:

* sync work (sync methods, sync generator steps, property reads) goes to the
  instance's ``InstanceWorker`` thread; its hand-back, on the peer's loop,
  answers the call and starts the next entry. No task is spawned for it.
* async work (async methods, async generator steps) runs on the peer's runner
  task for the instance, inside a cancel scope, or, where the instance's
  thread has a loop of its own (ThreadExecutor), in that thread.
* an exclusive turn (deleting the instance) wakes the task waiting for it.

Streams. A generator call is an entry that produces at most the credit its
consumer granted per step, then goes back to the tail of the FIFO (other
calls interleave between steps) or parks until more credit comes. Each item
is handed to the peer as soon as it is produced (items produced together
travel together); no credit, no step, so a slow consumer stops the producer.

Cancellation. A queued call never starts; a running async call is cancelled
where it runs; a running sync call finishes; a stream's generator is closed
where it runs (its ``finally`` runs there) before the stream ends.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from remote_exec.exceptions import (
    DuplicateInstanceError,
    ExecutorStateError,
    UnknownInstanceError,
)
from remote_exec.executor import RemoteMethod, check_sleep, config_of
from remote_exec.registry import InstanceRegistry

from .calls import AsyncCall, InlineCall, Peer, RuntimeCall, StreamCall, SyncCall
from .events import EventHub
from .instances import Instance, InternalJob, exclusive
from .invocations import InvocationTable
from .logcapture import capturing_logs, release_logs
from .worker import InstanceWorker

__all__ = ["InstanceRuntime", "sleep_until"]

logger = logging.getLogger("remote_exec.runtime")


class InstanceRuntime:
    """The instances of one side, their FIFOs, threads, calls and events.

    Args:
        registry: where instances are registered by name.
        events: the hub of create, delete and execute events.
        threads_have_loops: every instance's thread runs a loop of its own and
            runs the instance's async methods too (ThreadExecutor: every call
            in the instance's thread); else async methods run on the peer's
            loop and the threads wait on a plain queue (the server).
        close_grace: how long closing one generator or stopping one thread may
            take before it is given up on, in seconds.
        invocations: the table of its invocations (a new one by default).
    """

    def __init__(
        self,
        registry: InstanceRegistry,
        events: EventHub,
        *,
        threads_have_loops: bool,
        close_grace: float = 5.0,
        invocations: InvocationTable | None = None,
    ) -> None:
        self.registry = registry
        self.events = events
        self.invocations = invocations if invocations is not None else InvocationTable()
        self.threads_have_loops = threads_have_loops
        self.close_grace = close_grace
        self.instances: dict[str, Instance] = {}
        self._creating: dict[str, anyio.Event] = {}
        self._capturing = False  # capturing what methods log (from the first instance)

    def __len__(self) -> int:
        """Instances held or being created (for caps)."""
        return len(self.instances) + len(self._creating)

    def get(self, name: Any) -> Instance:
        """The instance named ``name``.

        Raises:
            UnknownInstanceError: no such instance is held.
        """
        instance = self.instances.get(name) if isinstance(name, str) else None
        if instance is None:
            raise UnknownInstanceError(f"no instance named {name!r} is held")
        return instance

    def queued(self) -> int:
        """Entries waiting to start, over every instance."""
        return sum(instance.waiting() for instance in self.instances.values())

    # -- creating and deleting ------------------------------------------------
    async def create(
        self,
        name: str,
        key: tuple[str, str],
        construct: Callable[[], Any],
        *,
        exist_ok: bool = False,
        owner: set[str] | None = None,
        check: Callable[[], None] | None = None,
    ) -> bool:
        """Start a thread for a new instance ``name`` and build it there.

        ``construct()`` runs in the new thread and returns the object; ``key``
        is its (module, qualname). ``check()`` runs once no creation of the
        same name is under way, just before this one starts (caps). ``owner``
        is a set of names that gets ``name`` (the creating connection's).

        Returns:
            False if ``exist_ok`` and an instance of the same class already
            has that name (nothing is created).

        Raises:
            DuplicateInstanceError: ``name`` is taken.
        """
        while (pending := self._creating.get(name)) is not None:
            await pending.wait()
        existing = self.instances.get(name)
        if existing is not None:
            if exist_ok and existing.key == key:
                return False
            raise DuplicateInstanceError(f"an instance named {name!r} already exists")
        if check is not None:
            check()
        done = self._creating[name] = anyio.Event()
        try:
            worker = InstanceWorker(name, coroutines=self.threads_have_loops)
            await worker.start()
            try:
                obj, config = await worker.submit(_build, construct).wait()
                self.registry.add_instance(obj, name)
            except BaseException:
                with anyio.move_on_after(self.close_grace, shield=True):
                    await worker.stop()
                raise
            self.instances[name] = Instance(
                name,
                obj,
                key,
                worker,
                owner,
                events=self.events,
                invocations=self.invocations,
                close_grace=self.close_grace,
            )
            if owner is not None:
                owner.add(name)
            if not self._capturing:
                self._capturing = True
                capturing_logs()
        finally:
            del self._creating[name]
            done.set()
        logger.info("instance %r created (%s.%s)", name, *key)
        self.events.publish(name, "create", {"class": ".".join(key), "config": config})
        return True

    async def delete(self, name: Any) -> None:
        """Delete an instance once the calls queued before now have run.

        It is gone at once for new calls; its open generators are closed in
        their thread, calls queued after this fail, and its thread stops.

        Raises:
            UnknownInstanceError: no such instance is held.
        """
        instance = self.get(name)
        del self.instances[instance.name]
        if instance.owner is not None:
            instance.owner.discard(instance.name)
        self.registry.remove_instance(instance.name)
        config: dict[str, Any] = {}
        with anyio.CancelScope(shield=True):
            async with exclusive(instance):
                with anyio.move_on_after(self.close_grace):
                    try:
                        config = await instance.worker.submit(config_of, instance.obj).wait()
                    except Exception:
                        logger.exception("could not read the config of %r", instance.name)
                instance.deleted = True
                await self._tear_down(
                    instance,
                    lambda: UnknownInstanceError(f"the instance {instance.name!r} was deleted"),
                )
        logger.info("instance %r deleted", instance.name)
        self.events.publish(
            instance.name, "delete", {"class": instance.class_name, "config": config}
        )

    async def close(self, reason: str = "the server is shutting down") -> None:
        """Stop every instance (side shutting down): streams closed, threads joined.

        Calls still queued and open streams fail with ``ExecutorStateError(reason)``.
        """
        instances = list(self.instances.values())
        self.instances.clear()
        if self._capturing:
            self._capturing = False
            release_logs()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for instance in instances:
                    instance.deleted = True
                    for entry in list(instance.queue)[: instance.active]:
                        if isinstance(entry, RuntimeCall):  # running: ask it to stop
                            entry.invocation.cancel()
                    if self.registry.name_of(instance.obj) == instance.name:
                        self.registry.remove_instance(instance.name)
                    tg.start_soon(self._tear_down, instance, lambda: ExecutorStateError(reason))

    async def _tear_down(self, instance: Instance, error: Callable[[], BaseException]) -> None:
        """Close the instance's generators, fail what is queued, stop its thread."""
        for stream in list(instance.streams):
            try:
                await stream.close_now(error())
            except Exception:
                logger.exception("could not close %r", stream)
        for entry in list(instance.queue)[instance.active :]:
            instance.queue.remove(entry)
            entry.drop(error())
        for runner in list(instance.runners):
            runner.stop()
        with anyio.move_on_after(self.close_grace):
            try:
                await instance.worker.stop()
            except Exception:
                logger.exception("the thread of %r failed to stop", instance.name)

    # -- calls ------------------------------------------------------------------
    def call(
        self,
        peer: Peer,
        sid: int,
        instance: Instance,
        marker: RemoteMethod,
        args: list[Any],
        kwargs: dict[str, Any],
        deadline: float | None = None,
        invocation_id: str | None = None,
        *,
        detached: bool = False,
    ) -> RuntimeCall:
        """Queue a call of a decorated method (a stream for a generator).

        ``deadline``: seconds it may take from now (None: no bound).
        ``invocation_id``: its id, if not ``peer``'s own for ``sid`` (a
        detached call, run for the connection that sent it). ``detached``: its
        outcome is kept on its record (``peer`` keeps it there).

        Raises:
            ValueError: the invocation id is taken (nothing was queued).
        """
        call: RuntimeCall
        if marker.is_generator:
            runner = None
            if marker.is_async and not instance.async_in_thread:
                runner = peer.runner_for(instance)
            call = StreamCall(peer, sid, instance, marker, args, kwargs, runner)
        elif instance.async_in_thread:  # every call in the instance's thread
            call = SyncCall(
                peer, sid, instance, marker.func, args, kwargs, marker.name, marker.is_async
            )
        elif marker.is_async:
            call = AsyncCall(peer, sid, instance, marker, args, kwargs, peer.runner_for(instance))
        elif marker.blocking:
            call = SyncCall(peer, sid, instance, marker.func, args, kwargs, marker.name)
        else:
            call = InlineCall(peer, sid, instance, marker.func, args, kwargs, marker.name)
        scope = call.invocation
        if invocation_id is not None:
            scope.id = invocation_id
        if detached:
            scope.detached = True
        if deadline is not None:
            scope.deadline = time.monotonic() + deadline
        if not self.invocations.add(call):
            raise ValueError(f"the invocation id {scope.id!r} is taken")
        peer.calls[sid] = call
        if isinstance(call, StreamCall):
            call.begin()
        else:
            instance.enqueue(call)
        return call

    def read(self, peer: Peer, sid: int, instance: Instance, fn: Callable[[], Any]) -> None:
        """Answer ``sid`` with ``fn()`` run in the instance's thread, in its FIFO.

        Attributes may be properties that talk to hardware, and a read must
        see the effects of the calls made before it.
        """
        call = SyncCall(peer, sid, instance, fn, [], {}, None)
        peer.calls[sid] = call
        instance.enqueue(call)

    async def run_in_turn(self, instance: Instance, fn: Callable[[], Any]) -> Any:
        """``fn()`` in the instance's thread, in its FIFO, for a task of this side."""
        return await InternalJob(instance, fn).run()

    async def all_configs(self) -> dict[str, Any]:
        """``{name: config}`` of every instance, each read in its thread."""
        configs: dict[str, Any] = {}
        for name, instance in list(self.instances.items()):
            obj = instance.obj
            try:
                configs[name] = await self.run_in_turn(instance, functools.partial(config_of, obj))
            except UnknownInstanceError:
                continue  # deleted meanwhile
        return configs


def _build(construct: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    obj = construct()
    return obj, config_of(obj)


async def sleep_until(duration: Any = None, deadline: Any = None) -> int:
    """The executors' ``sleep``: ``duration`` seconds, or until ``deadline``.

    ``deadline`` is a ``time.perf_counter_ns()`` value of this side: the clock
    and unit of the remote time ``get_echo_clock()`` reports and this returns.

    Raises:
        ValueError: neither or both given, or not a finite number.
    """
    check_sleep(duration, deadline)
    if deadline is None:
        await anyio.sleep(max(duration, 0))
        return time.perf_counter_ns()
    await anyio.sleep(max(deadline - time.perf_counter_ns(), 0) / 1e9)
    now = time.perf_counter_ns()
    if now < deadline:  # the loop's clock is not this one: it may wake a hair early
        await anyio.sleep((deadline - now) / 1e9 + 0.001)
        now = time.perf_counter_ns()
    return now
