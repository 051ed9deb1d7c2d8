"""``ThreadExecutor``: every instance gets its own worker thread.

Every call to an instance (sync methods, async methods, generator steps) runs
in that instance's thread, one at a time, in call order; callbacks run on the
caller's side, in the same order. The instance is the caller's own object
(``is_remote = False``): nothing is copied, and exceptions arrive as
themselves.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio

from remote_exec.events import EventHub
from remote_exec.exceptions import (
    DuplicateInstanceError,
    ExecutorStateError,
    NotAllowedError,
    UnknownInstanceError,
)
from remote_exec.executor import (
    Executor,
    RemoteMethod,
    RemoteStream,
    config_of,
    resolve_call,
)
from remote_exec.registry import InstanceRegistry
from remote_exec.worker import InstanceWorker, Job

__all__ = ["ThreadExecutor", "ThreadStream"]

logger = logging.getLogger(__name__)


def _call(func: Callable[..., Any], obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return func(obj, *args, **kwargs)


_END = object()  # a batch's outcome once the generator is exhausted


def _next_batch(gen: Any, n: int) -> tuple[list[Any], object]:
    """Up to ``n`` items of a generator, and what came after them: None (more
    may follow), ``_END``, or the exception the generator raised."""
    items: list[Any] = []
    append = items.append
    try:
        for _ in range(n):
            append(next(gen))
    except StopIteration:
        return items, _END
    except Exception as exc:  # noqa: BLE001 - delivered after the items before it
        return items, exc
    return items, None


async def _anext_batch(agen: Any, n: int) -> tuple[list[Any], object]:
    """``_next_batch`` for an async generator (cancellation still propagates)."""
    items: list[Any] = []
    append = items.append
    try:
        for _ in range(n):
            append(await agen.__anext__())
    except StopAsyncIteration:
        return items, _END
    except Exception as exc:  # noqa: BLE001 - delivered after the items before it
        return items, exc
    return items, None


def _close_sync(gen: Any) -> None:
    gen.close()


async def _close_async(agen: Any) -> None:
    await agen.aclose()


def _read_attributes(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in names}


@dataclass(eq=False, slots=True)
class _Held:
    """An instance the executor holds: its worker and its open streams."""

    obj: Any
    worker: InstanceWorker
    streams: set[ThreadStream] = field(default_factory=set)


class ThreadExecutor(Executor):
    """Runs each held instance's decorated methods in a dedicated worker thread.

    Args:
        window: how many items a generator may produce ahead of its consumer
            (the same default as the remote executors; lower it when items are
            large, e.g. camera frames, to bound memory in bytes).
        registry: the registry to hold instances in (a new one by default).
        init_context: enter ``ExecutorContext(self)`` while used as
            ``async with``.
    """

    is_remote: ClassVar[bool] = False

    def __init__(
        self,
        *,
        window: int = 64,
        registry: InstanceRegistry | None = None,
        init_context: bool = True,
    ) -> None:
        super().__init__(registry=registry, init_context=init_context)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window
        self._held: dict[str, _Held] = {}
        self._retired: set[InstanceWorker] = set()  # deleted, maybe not joined yet
        self._events = EventHub()

    # -- lifecycle -------------------------------------------------------------
    async def _start(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def _stop(self) -> None:
        # Shielded: stopping under a cancelled scope (a cancelled ``async with``
        # body) must still join every thread.
        with anyio.CancelScope(shield=True):
            held, self._held = list(self._held.values()), {}
            async with anyio.create_task_group() as tg:
                for entry in held:
                    self.registry.remove_instance(entry.obj)
                    tg.start_soon(self._stop_held, entry, "the executor was stopped")
                for worker in list(self._retired):
                    tg.start_soon(self._stop_worker, worker)
            self._events.close()

    async def _stop_held(self, entry: _Held, why: str) -> None:
        # Open generators are closed in their own thread, after the running job.
        reason = f"stream of {entry.worker.name!r} cut off: {why}"
        gens = [stream._detach(reason) for stream in list(entry.streams)]
        entry.streams.clear()

        async def finalize() -> None:
            for gen in gens:
                if gen is None:
                    continue
                try:
                    if hasattr(gen, "aclose"):
                        await gen.aclose()
                    else:
                        gen.close()
                except Exception:  # the consumers are gone: nobody else to tell
                    logger.exception("closing a generator of %r failed", entry.worker.name)

        self._retired.add(entry.worker)
        await entry.worker.stop(finalize=finalize if gens else None)
        self._retired.discard(entry.worker)

    async def _stop_worker(self, worker: InstanceWorker) -> None:
        await worker.stop()
        self._retired.discard(worker)

    # -- instances -------------------------------------------------------------
    async def create_remote_instance(self, obj: Any, name: str, *args: Any, **kwargs: Any) -> None:
        """Hold ``obj`` as ``name`` and start its thread (``args`` are ignored:
        the instance is ``obj`` itself).

        Raises:
            DuplicateInstanceError: ``name`` (or ``obj``) is already held.
        """
        self.check_running()
        self.registry.add_instance(obj, name)
        worker = InstanceWorker(name)
        entry = _Held(obj, worker)
        self._held[name] = entry
        try:
            await worker.start()
        except BaseException:
            self._held.pop(name, None)
            if self.registry.name_of(obj) == name:
                self.registry.remove_instance(name)
            raise
        self._events.publish(name, "create", {"class": _class_name(obj), "config": config_of(obj)})

    async def ensure_remote_instance(self, obj: Any, name: str, *args: Any, **kwargs: Any) -> bool:
        """Like ``create_remote_instance``; False if ``obj`` is already held as ``name``.

        Raises:
            DuplicateInstanceError: ``name`` is held by another object, or ``obj``
                under another name.
        """
        self.check_running()
        if name in self._held:
            if self._held[name].obj is obj:
                return False
            raise DuplicateInstanceError(
                f"an instance named {name!r} already exists and is another object"
            )
        await self.create_remote_instance(obj, name, *args, **kwargs)
        return True

    async def delete_remote_instance(self, obj: Any) -> None:
        """Stop ``obj``'s thread (queued calls never start, open generators are
        closed in that thread) and forget it."""
        self.check_running()
        name = self.registry.require_name(obj)
        self.registry.remove_instance(name)
        entry = self._held.pop(name)
        self._events.publish(name, "delete", {"class": _class_name(obj), "config": config_of(obj)})
        await self._stop_held(entry, "the instance was deleted")

    async def get_remote_objects(self) -> list[str]:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        return self.registry.instance_names()

    def _entry(self, obj: Any) -> tuple[str, _Held]:
        name = self.registry.name_of(obj)
        if name is None:
            name = self.registry.require_name(obj)  # raises the helpful error
        entry = self._held.get(name)
        if entry is None:  # put in a shared registry by someone else
            raise UnknownInstanceError(
                f"{name!r} is in the registry but has no thread in this executor: "
                "create it with `await executor.ensure_remote_instance(obj, name)`"
            )
        return name, entry

    # -- calls -----------------------------------------------------------------
    async def execute(
        self,
        obj: Any,
        fn: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> Any:
        """Run the decorated method ``fn`` of ``obj`` in its thread; the result
        (or exception) comes back as is. ``callback`` (default: the one given to
        the decorator) gets the result in call order; if it raises, so does this.
        """
        if self._state != "running":
            self.check_running()
        name, entry = self._entry(obj)
        marker, bound = resolve_call(obj, fn, callback, generator=False)
        args = tuple(args)
        kwargs = {} if kwargs is None else kwargs
        on_done: Callable[[Job], None] | None = None
        if bound is not None or self._events.has_subscribers:
            events = self._events

            def on_done(job: Job) -> None:
                if job.state != "done":
                    return
                try:
                    result = job.result()
                except BaseException:  # noqa: BLE001 - the caller gets it from wait()
                    return  # the method raised: no event, no callback
                if events.has_subscribers:
                    events.publish(
                        name,
                        "execute",
                        {"method": marker.name, "args": args, "kwargs": kwargs, "result": result},
                    )
                if bound is not None:
                    bound(result)

        job = entry.worker.submit(_call, marker.func, obj, args, kwargs, on_done=on_done)
        return await job.wait()

    def execute_generator(
        self,
        obj: Any,
        gen: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> ThreadStream:
        """Stream the items of the decorated generator ``gen`` of ``obj``, which
        runs in the instance's thread at most ``window`` items ahead."""
        self.check_running()
        name, entry = self._entry(obj)
        marker, bound = resolve_call(obj, gen, callback, generator=True)
        args = tuple(args)
        kwargs = {} if kwargs is None else kwargs
        # Creating a generator runs none of its body, so it is safe to do here;
        # every step (and so every line of the body) runs in the worker.
        generator = marker.func(obj, *args, **kwargs)
        stream = ThreadStream(
            entry, generator, marker, bound, self.window, self._events, name, args, kwargs
        )
        entry.streams.add(stream)
        return stream

    # -- config and properties -------------------------------------------------
    async def get_remote_object_config(self, obj: Any | None) -> dict[str, Any]:
        """``obj``'s config (read in its thread, after the calls before it);
        with None, ``{name: config}`` for every instance."""
        self.check_running()
        if obj is None:
            return {
                name: await entry.worker.submit(config_of, entry.obj).wait()
                for name, entry in list(self._held.items())
            }
        _, entry = self._entry(obj)
        config: dict[str, Any] = await entry.worker.submit(config_of, obj).wait()
        return config

    async def get_remote_object_property_data(
        self, obj: Any, names: Iterable[str]
    ) -> dict[str, Any]:
        """The public attributes ``names`` of ``obj``, read in its thread.

        Raises:
            NotAllowedError: a name is private or not an identifier.
        """
        self.check_running()
        names = tuple(names)
        for attr in names:
            if not isinstance(attr, str) or not attr.isidentifier() or attr.startswith("_"):
                raise NotAllowedError(f"{attr!r} is not a public attribute name")
        _, entry = self._entry(obj)
        data: dict[str, Any] = await entry.worker.submit(_read_attributes, obj, names).wait()
        return data

    # -- clock, imports, channels ----------------------------------------------
    async def get_echo_clock(self) -> tuple[int, int, int]:
        self.check_running()
        sent = time.perf_counter_ns()
        await anyio.lowlevel.checkpoint()
        remote = time.perf_counter_ns()
        return sent, remote, time.perf_counter_ns()

    async def sleep(self, duration: float | None = None, deadline: float | None = None) -> int:
        """Sleep ``duration`` seconds, or until ``deadline`` (``time.perf_counter()``
        seconds); returns ``time.perf_counter_ns()`` on waking.

        Raises:
            ValueError: both ``duration`` and ``deadline`` were given.
        """
        self.check_running()
        if duration is not None and deadline is not None:
            raise ValueError("give either duration or deadline, not both")
        if deadline is not None:
            duration = deadline - time.perf_counter()
        await anyio.sleep(max(duration or 0.0, 0.0))
        return time.perf_counter_ns()

    async def remote_import(self, module: str) -> None:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        importlib.import_module(module)

    async def register_remote_class(self, cls: type) -> None:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        self.registry.register_class(cls)

    def get_channel_from_remote(self, name: str, channel: str) -> RemoteStream:
        """Events of instance ``name`` ("" for all) on ``channel`` ("create",
        "delete", "execute" or "" for all); they end when the executor stops."""
        self.check_running()
        return self._events.subscribe(name, channel)


class ThreadStream(RemoteStream):
    """The items of a generator running in an instance's worker thread.

    Items are fetched in batches by jobs queued on the instance's worker, so
    the generator never runs more than ``window`` items ahead of the consumer
    (items requested but not consumed yet); a new batch is requested once half
    the window is free, which keeps hand-offs between threads few. ``aclose``
    (leaving the ``async with``) cancels batches not yet started and closes the
    generator in the worker thread.
    """

    def __init__(
        self,
        entry: _Held,
        gen: Any,
        marker: RemoteMethod,
        callback: Callable[[Any], Any] | None,
        window: int,
        events: EventHub,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._entry = entry
        self._worker = entry.worker
        self._gen: Any = gen
        self._is_async = marker.is_async
        self._batch = _anext_batch if marker.is_async else _next_batch
        self._callback = callback
        self._events = events
        self._name = name
        self._method = marker.name
        self._args = args
        self._kwargs = kwargs
        self._window = window
        self._threshold = max(1, window // 2)
        self._outstanding = 0  # items requested and not handed to the consumer yet
        self._buffer: deque[Any] = deque()
        self._pending: deque[Job] = deque()
        self._outcome: object = None  # _END or the generator's exception, once known
        self._closed = False
        self._busy = False
        self._request()

    def _request(self) -> None:
        free = self._window - self._outstanding
        if free >= self._threshold:
            self._pending.append(self._worker.submit(self._batch, self._gen, free))
            self._outstanding += free

    async def __anext__(self) -> Any:
        if self._buffer:
            item = self._buffer.popleft()
        else:
            if self._closed:
                outcome, self._outcome = self._outcome, _END
                if isinstance(outcome, ExecutorStateError):
                    raise outcome  # cut off by delete or stop, once
                raise StopAsyncIteration
            if self._busy:
                raise RuntimeError("anext(): another task is already waiting for this stream")
            if self._outcome is None:
                self._busy = True
                try:
                    await self._receive()
                finally:
                    self._busy = False
            if not self._buffer:
                outcome, self._outcome = self._outcome, _END
                self._finish()
                if isinstance(outcome, BaseException):
                    raise outcome
                raise StopAsyncIteration
            item = self._buffer.popleft()
        self._outstanding -= 1
        if self._outcome is None:
            self._request()
        if self._events.has_subscribers:
            self._events.publish(
                self._name,
                "execute",
                {
                    "method": self._method,
                    "args": self._args,
                    "kwargs": self._kwargs,
                    "result": item,
                },
            )
        if self._callback is not None:
            self._callback(item)
        return item

    async def _receive(self) -> None:
        """Wait for the next batch and buffer its items."""
        job = self._pending[0]
        try:
            # cancel=False: if this task is cancelled, the batch stays first in
            # line (no item is lost); aclose cancels it if need be.
            items, outcome = await job.wait(cancel=False)
        except BaseException:
            if job.state in ("done", "cancelled"):  # the batch itself failed
                closed = self._closed
                self._finish()
                if closed:
                    raise StopAsyncIteration from None
            raise
        self._pending.popleft()
        self._buffer.extend(items)
        if outcome is not None:
            self._outcome = outcome

    def _finish(self) -> None:
        """No more items: forget the generator and the batches still queued."""
        self._closed = True
        self._gen = None
        for job in self._pending:
            job.cancel()
        self._pending.clear()
        self._buffer.clear()
        self._entry.streams.discard(self)

    def _detach(self, reason: str) -> Any:
        """Give up the generator (the executor closes it while stopping); the
        consumer's next ``__anext__`` raises ``ExecutorStateError(reason)``."""
        gen = self._gen
        if self._outcome is None:
            self._outcome = ExecutorStateError(reason)
        self._finish()
        return gen

    async def aclose(self) -> None:
        """Cancel batches not yet started and close the generator in its thread
        (awaited unless the closing task is cancelled). Idempotent."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        gen = self._gen
        finished = self._outcome is not None  # exhausted or raised: nothing to close
        self._finish()
        if finished or self._worker.state != "running":
            await anyio.lowlevel.checkpoint()
            return
        job = self._worker.submit(_close_async if self._is_async else _close_sync, gen)
        await job.wait(cancel=False)


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
