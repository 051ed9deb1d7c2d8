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
from remote_exec.executor import RemoteMethod, check_scope, check_sleep, config_of
from remote_exec.registry import InstanceRegistry

from .calls import AsyncCall, InlineCall, Peer, RuntimeCall, StreamCall, SyncCall
from .events import EventHub
from .instances import Instance, InternalJob, exclusive
from .invocations import InvocationTable
from .lifecycle import Hooks, Lifecycle, describe_error, lifecycle_of
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
        scope: str = "server",
    ) -> bool:
        """Start a thread for a new instance ``name``, build it there and enter it.

        ``construct()`` runs in the new thread and returns the object; ``key``
        is its (module, qualname). ``check()`` runs once no creation of the
        same name is under way, just before this one starts (caps). ``owner``
        is a set of names that gets ``name`` (the creating connection's).
        ``scope``: "server" (lives until deleted) or "connection" (deleted by
        ``end_scope(owner)`` too).

        An object whose class is a context manager is entered right after it
        is built, where it lives (see ``runtime.lifecycle``); if that raises,
        nothing is registered and the error is raised here (its ``__exit__``
        does not run).

        Returns:
            False if ``exist_ok`` and an instance of the same class already
            has that name (nothing is created).

        Raises:
            DuplicateInstanceError: ``name`` is taken.
            ValueError: ``scope`` is not one of ``remote_exec.executor.SCOPES``.
        """
        check_scope(scope)
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
            hooks: Hooks | None = None
            try:
                obj, config = await worker.submit(_build, construct).wait()
                self.registry.add_instance(obj, name)
                kind = lifecycle_of(obj)
                if kind is not None:
                    hooks = Hooks(obj, kind)
                    try:
                        config = await self._enter(worker, hooks)
                    except BaseException:
                        self.registry.remove_instance(name)
                        raise
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._abandon(name, worker, hooks)
                raise
            instance = self.instances[name] = Instance(
                name,
                obj,
                key,
                worker,
                owner,
                events=self.events,
                invocations=self.invocations,
                close_grace=self.close_grace,
            )
            instance.hooks = hooks
            instance.scope = scope
            if owner is not None:
                owner.add(name)
            if not self._capturing:
                self._capturing = True
                capturing_logs()
        finally:
            del self._creating[name]
            done.set()
        logger.info("instance %r created (%s.%s, %s scope)", name, *key, scope)
        self.events.publish(name, "create", {"class": ".".join(key), "config": config})
        return True

    async def _enter(self, worker: InstanceWorker, hooks: Hooks) -> dict[str, Any]:
        """Enter a new object where it lives; its config as it is then."""
        if hooks.kind is Lifecycle.SYNC:
            config: dict[str, Any] = await worker.submit(_enter_sync, hooks).wait()
        elif worker.runs_coroutines:  # its async methods run in its thread's loop
            config = await worker.submit(_enter_async, hooks).wait()
        else:  # its async methods run on this loop
            await hooks.aenter()
            config = await worker.submit(config_of, hooks.obj).wait()
        return config

    async def _abandon(self, name: str, worker: InstanceWorker, hooks: Hooks | None) -> None:
        """A creation failed (or was given up on): exit what was entered, stop the thread."""
        if hooks is not None and hooks.kind is Lifecycle.ASYNC and not worker.runs_coroutines:
            if hooks.entered:  # entered on this loop, then something else failed
                with anyio.move_on_after(self.close_grace):
                    try:
                        await hooks.aexit()
                    except Exception:
                        logger.exception("the exit hook of %r failed", name)
            hooks = None
        with anyio.move_on_after(self.close_grace):
            try:
                # In the thread, after a sync __enter__ that may still run there.
                await worker.stop(finalize=None if hooks is None else hooks_closer(name, hooks))
            except Exception:
                logger.exception("the thread of %r failed to stop", name)

    async def delete(self, name: Any) -> None:
        """Delete an instance once the calls queued before now have run.

        It is gone at once for new calls; its open generators are closed in
        their thread, calls queued after this fail, it is exited (a context
        manager: see ``create``) and its thread stops. An exit hook that
        raises is logged and reported in the "delete" event (``error``).

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
                closing = await self._tear_down(
                    instance,
                    lambda: UnknownInstanceError(f"the instance {instance.name!r} was deleted"),
                )
        logger.info("instance %r deleted", instance.name)
        self._publish_delete(instance, config, closing.failure)

    async def end_scope(self, owner: set[str], reason: str) -> None:
        """Delete the connection-scoped instances created by ``owner`` (the
        names a connection holds): the connection closed or was lost.

        Each goes at once: calls queued to it fail with an
        ``UnknownInstanceError`` that says why, a running one is asked to stop
        (and given ``close_grace``), then it is exited and its "delete" event
        published (``reason`` says why).
        """
        instances = [
            instance
            for instance in self.instances.values()
            if instance.owner is owner and instance.scope == "connection"
        ]
        if not instances:
            return
        for instance in instances:
            del self.instances[instance.name]
            owner.discard(instance.name)
            if self.registry.name_of(instance.obj) == instance.name:
                self.registry.remove_instance(instance.name)
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for instance in instances:
                    tg.start_soon(self._end, instance, reason)

    async def _end(self, instance: Instance, reason: str) -> None:
        name = instance.name
        self._stop_calls(instance)
        closing = await self._tear_down(
            instance,
            lambda: UnknownInstanceError(f"the instance {name!r} was deleted: {reason}"),
            settle=True,
            read_config=True,
        )
        logger.info("instance %r deleted: %s", name, reason)
        self._publish_delete(instance, closing.config, closing.failure, reason)

    def _publish_delete(
        self,
        instance: Instance,
        config: dict[str, Any],
        failure: BaseException | None,
        reason: str | None = None,
    ) -> None:
        data: dict[str, Any] = {"class": instance.class_name, "config": config}
        if reason is not None:
            data["reason"] = reason
        if failure is not None:
            data["error"] = describe_error(failure)
        self.events.publish(instance.name, "delete", data)

    def _stop_calls(self, instance: Instance) -> None:
        """No new calls; the running ones are asked to stop (a sync one at its
        next ``check_cancelled()``, an async one cancelled where it runs)."""
        instance.deleted = True
        for entry in list(instance.queue)[: instance.active]:
            if isinstance(entry, RuntimeCall):  # running: ask it to stop
                entry.invocation.cancel()
                if isinstance(entry, AsyncCall):  # on this loop (in a thread: stopping it does)
                    entry.on_cancel()

    async def close(self, reason: str = "the server is shutting down") -> None:
        """Stop every instance (side shutting down): streams closed, threads joined.

        Calls still queued and open streams fail with ``ExecutorStateError(reason)``;
        running ones are asked to stop and get ``close_grace`` to do so; then
        every instance is exited (see ``create``), each exactly once.
        """
        instances = list(self.instances.values())
        self.instances.clear()
        if self._capturing:
            self._capturing = False
            release_logs()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for instance in instances:
                    self._stop_calls(instance)
                    if self.registry.name_of(instance.obj) == instance.name:
                        self.registry.remove_instance(instance.name)
                    tg.start_soon(self._close_one, instance, reason)

    async def _close_one(self, instance: Instance, reason: str) -> None:
        await self._tear_down(instance, lambda: ExecutorStateError(reason), settle=True)
        logger.info("instance %r closed: %s", instance.name, reason)

    async def _tear_down(
        self,
        instance: Instance,
        error: Callable[[], BaseException],
        *,
        settle: bool = False,
        read_config: bool = False,
    ) -> _Closing:
        """Close the instance's generators, fail what is queued, stop its thread, exit it.

        The exit hook runs once nothing else runs on the instance: a sync one
        (or an async one in a thread with a loop) last in its thread, after
        the call still running there; an async one on this loop, once the
        thread has stopped (``settle``: calls were asked to stop and may still
        be finishing on this loop: wait for them first). ``read_config``:
        read its config right before the exit hook.

        Returns:
            Its config (if read) and what its exit hook raised (logged here).
        """
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
        instance.end_observation()  # observers' streams end (``runtime.observe``)
        hooks = instance.hooks
        closing = _Closing(instance, hooks, read_config)
        on_loop = (
            hooks is not None
            and hooks.kind is Lifecycle.ASYNC
            and not instance.worker.runs_coroutines
        )
        finalize: Callable[[], Any] | None = None
        if not on_loop and (hooks is not None or read_config):
            finalize = closing.run_async if instance.worker.runs_coroutines else closing.run
        if on_loop and settle:
            with anyio.move_on_after(self.close_grace):
                await instance.wait_idle()
        with anyio.move_on_after(self.close_grace) as stopping:
            try:
                # Queued jobs never start, a running async one is cancelled, a
                # running sync one finishes; then ``finalize`` runs, in its thread.
                await instance.worker.stop(finalize=finalize)
            except Exception:
                logger.exception("the thread of %r failed to stop", instance.name)
        if stopping.cancelled_caught and finalize is not None and not closing.done:
            closing.failure = TimeoutError(
                f"the instance's thread did not stop within {self.close_grace:g} s"
            )
        if on_loop:
            with anyio.move_on_after(self.close_grace) as exiting:
                await closing.run_async()
            if exiting.cancelled_caught:
                closing.failure = TimeoutError(f"it did not finish within {self.close_grace:g} s")
        if closing.failure is not None and hooks is not None:
            logger.error(
                "the exit hook of instance %r failed: %s",
                instance.name,
                describe_error(closing.failure),
                exc_info=closing.failure,
            )
        return closing

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


class _Closing:
    """The last thing done with an instance, where it lives: read its config
    (``read_config``), then exit it; what the exit hook raised is kept."""

    __slots__ = ("config", "done", "failure", "hooks", "obj", "read_config")

    def __init__(self, instance: Instance, hooks: Hooks | None, read_config: bool) -> None:
        self.obj = instance.obj
        self.hooks = hooks
        self.read_config = read_config
        self.config: dict[str, Any] = {}
        self.failure: BaseException | None = None
        self.done = False

    def _config(self) -> None:
        if self.read_config:
            try:
                self.config = config_of(self.obj)
            except Exception:
                logger.exception("could not read the config of %r", self.obj)

    def run(self) -> None:  # in the instance's thread, its last job
        self._config()
        try:
            if self.hooks is not None:
                self.hooks.exit()
        except Exception as exc:  # noqa: BLE001 - reported, never raised
            self.failure = exc
        self.done = True

    async def run_async(self) -> None:  # where its async methods run
        self._config()
        try:
            if self.hooks is not None:
                if self.hooks.kind is Lifecycle.ASYNC:
                    await self.hooks.aexit()
                else:
                    self.hooks.exit()
        except Exception as exc:  # noqa: BLE001 - reported, never raised
            self.failure = exc
        self.done = True


def _enter_sync(hooks: Hooks) -> dict[str, Any]:  # in the instance's thread
    hooks.enter()
    return config_of(hooks.obj)


async def _enter_async(hooks: Hooks) -> dict[str, Any]:  # in the instance's thread's loop
    await hooks.aenter()
    return config_of(hooks.obj)


def hooks_closer(name: str, hooks: Hooks) -> Callable[[], Any]:
    """A worker's ``finalize`` that exits ``hooks``' object if it was entered
    (a creation given up on while its enter hook ran); errors are logged."""
    if hooks.kind is Lifecycle.SYNC:

        def close() -> None:
            try:
                hooks.exit()
            except Exception:
                logger.exception("the exit hook of %r failed", name)

        return close

    async def aclose() -> None:
        try:
            await hooks.aexit()
        except Exception:
            logger.exception("the exit hook of %r failed", name)

    return aclose


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
