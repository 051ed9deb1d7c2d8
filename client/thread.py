"""``ThreadExecutor``: every instance gets its own worker thread.

A thin adapter over the instance runtime the servers use too
(``remote_exec.runtime``): the executor is the runtime's only peer, and
hands each outcome straight to the waiting caller, without a codec. Every
call to an instance (sync methods, async methods, generator steps) runs in
that instance's thread, which runs a loop of its own, one at a time, in call
order; callbacks run on the caller's side, in the same order. The instance
is the caller's own object (``is_remote = False``): nothing is copied, and
exceptions arrive as themselves.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, ClassVar

import anyio
import anyio.lowlevel

from remote_exec.codecs import CodecCheck
from remote_exec.exceptions import (
    DuplicateInstanceError,
    ExecutorStateError,
    NotAllowedError,
    UnknownInstanceError,
)
from remote_exec.executor import (
    Executor,
    Invocation,
    RemoteStream,
    call_deadline,
    check_observed_names,
    check_scope,
    config_of,
    module_name,
    resolve_call,
    submittable,
    wait_for_answer,
)
from remote_exec.invocations import (
    InvocationInfo,
    InvocationStatus,
    make_invocation_id,
    new_session,
)
from remote_exec.protocol import DEFAULT_WINDOW
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.backend import threadsafe_call_soon
from remote_exec.runtime.calls import Runner, RuntimeCall, StreamCall
from remote_exec.runtime.detached import DetachedPeer
from remote_exec.runtime.events import EventHub
from remote_exec.runtime.instances import Instance
from remote_exec.runtime.invocations import LogFollower, detached_outcome
from remote_exec.runtime.observe import Observer
from remote_exec.runtime.runtime import InstanceRuntime, sleep_until

__all__ = ["ThreadExecutor", "ThreadStream"]

logger = logging.getLogger("remote_exec.client")


def _read_attributes(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in names}


def _same(obj: Any) -> Any:
    return obj


class _Answer:
    """Where one method call's outcome goes: the waiting caller."""

    __slots__ = ("callback", "error", "event", "value")

    def __init__(self, event: anyio.Event, callback: Callable[[Any], Any] | None) -> None:
        self.event = event
        self.callback = callback
        self.value: Any = None
        self.error: BaseException | None = None

    def answer(self, value: Any) -> None:
        # On the loop, in completion order: callbacks keep call order.
        if self.callback is not None:
            try:
                self.callback(value)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it instead
                self.fail(exc)
                return
        self.value = value
        self.event.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.event.set()


class _LocalPeer:
    """The runtime's peer inside ThreadExecutor: outcomes go to the waiting tasks."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.alive = False
        self.calls: dict[int, RuntimeCall] = {}
        self.call_soon: Callable[..., object] = _not_started
        self._ids = itertools.count(1)
        self.session = new_session()  # the prefix of its invocation ids
        self.check: CodecCheck | None = None  # ThreadExecutor(check_codec=True)
        self._waiting: dict[int, _Answer | _StreamInbox] = {}
        # The backend's own Event class: ``anyio.Event()`` looks the backend up each time.
        self.new_event: Callable[[], anyio.Event] = anyio.Event

    def start(self) -> None:
        self.call_soon = threadsafe_call_soon()
        self.new_event = type(anyio.Event())
        self.alive = True

    def stop(self, reason: str) -> None:
        """Fail every waiting caller and stream; what comes later is dropped."""
        self.alive = False
        waiting, self._waiting = self._waiting, {}
        for target in waiting.values():
            target.fail(ExecutorStateError(reason))

    def cut_streams(self, reason: str) -> None:
        """Open streams end now, their items not consumed yet dropped."""
        for sid, target in list(self._waiting.items()):
            if isinstance(target, _StreamInbox):
                del self._waiting[sid]
                target.cut_off(ExecutorStateError(f"stream cut off: {reason}"))

    def next_id(self) -> int:
        return next(self._ids)

    def expect(self, sid: int, target: _Answer | _StreamInbox) -> None:
        self._waiting[sid] = target

    def abandon(self, sid: int) -> None:
        """The caller stopped waiting: its outcome is dropped (and its callback not run)."""
        self._waiting.pop(sid, None)

    # -- the Peer interface ----------------------------------------------------
    def reply(self, sid: int, value: Any) -> None:
        target = self._waiting.pop(sid, None)
        if isinstance(target, _Answer):
            if self.check is not None:
                try:
                    self.check.result(value)
                except Exception as exc:  # noqa: BLE001 - as a server: the caller gets why
                    target.fail(exc)
                    return
            target.answer(value)

    def fail(self, sid: int, exc: BaseException) -> None:
        target = self._waiting.pop(sid, None)
        if target is not None:
            target.fail(exc)

    def send_items(self, sid: int, items: list[Any]) -> None:
        if self.check is not None:
            self.check.items(items)  # raises: the runtime fails the stream, as on a server
        target = self._waiting.get(sid)
        if isinstance(target, _StreamInbox):
            target.receive(items)

    def end_stream(self, sid: int) -> None:
        target = self._waiting.pop(sid, None)
        if isinstance(target, _StreamInbox):
            target.end(None)

    def credit(self, sid: int) -> int:
        target = self._waiting.get(sid)
        return target.credit if isinstance(target, _StreamInbox) else 0

    def schedule_flush(self, stream: StreamCall) -> None:
        stream.flush()  # no frames to batch: hand the items over at once

    def forget(self, call: RuntimeCall) -> None:
        if self.calls.get(call.sid) is call:
            del self.calls[call.sid]

    def runner_for(self, instance: Instance) -> Runner:
        raise RuntimeError("ThreadExecutor runs async methods in the instance's thread")


class ThreadExecutor(Executor):
    """Runs each held instance's decorated methods in a dedicated worker thread.

    Args:
        window: how many items a generator may produce ahead of its consumer
            (``DEFAULT_WINDOW``, shared with the remote executors; raise it for
            many small items, lower it for large ones such as camera frames).
        registry: the registry to hold instances in (a new one by default).
        init_context: enter ``ExecutorContext(self)`` while used as
            ``async with``.
        check_codec: prove that every argument, result and stream item could
            travel to a remote executor (encoded and decoded with msgpack and
            ``registry``; what could not raises the ``CodecError`` a server
            would give), so that code passing here passes everywhere. The
            methods still get and return the caller's own objects.
    """

    is_remote: ClassVar[bool] = False

    def __init__(
        self,
        *,
        window: int = DEFAULT_WINDOW,
        registry: InstanceRegistry | None = None,
        init_context: bool = True,
        check_codec: bool = False,
    ) -> None:
        super().__init__(registry=registry, init_context=init_context)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window
        self._events = EventHub()
        self._runtime = InstanceRuntime(self.registry, self._events, threads_have_loops=True)
        self._peer = _LocalPeer(window)
        self._detached = DetachedPeer(_not_started)  # submitted calls
        self.check_codec = check_codec
        if check_codec:
            self._peer.check = CodecCheck(self.registry)

    @property
    def session(self) -> str:
        """The prefix of this executor's invocation ids."""
        return self._peer.session

    # -- lifecycle -------------------------------------------------------------
    async def _start(self) -> None:
        self._peer.start()
        self._detached.call_soon = self._peer.call_soon
        await anyio.lowlevel.checkpoint()

    async def _stop(self) -> None:
        # Shielded: stopping under a cancelled scope (a cancelled ``async with``
        # body) must still close every generator and join every thread.
        with anyio.CancelScope(shield=True):
            # Queued calls and open streams fail, a running sync call finishes
            # and is answered; then whoever still waits is told.
            reason = "the executor was stopped"
            self._peer.cut_streams(reason)
            self._detached.stop()
            await self._runtime.close(reason)
            self._peer.stop(reason)
            self._events.close()

    # -- instances -------------------------------------------------------------
    async def create_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> None:
        """Hold ``obj`` as ``name`` and start its thread (``args`` are ignored:
        the instance is ``obj`` itself).

        A context manager is entered in its thread right away (``obj`` is the
        caller's own object: it is this executor that enters it, so do not
        enter it yourself too) and exited there when it is deleted or the
        executor stops. Both scopes end at the executor's stop at the latest:
        its connection is the executor itself.

        Raises:
            DuplicateInstanceError: ``name`` (or ``obj``) is already held.
            ValueError: ``scope`` is neither "server" nor "connection".
        """
        self.check_running()
        check_scope(scope)
        held = self.registry.name_of(obj)
        if held is not None:  # found before it is entered a second time
            raise DuplicateInstanceError(f"{type(obj).__qualname__} is already held as {held!r}")
        cls = type(obj)
        key = (cls.__module__, cls.__qualname__)
        if self._peer.check is not None:  # what a remote executor's create request carries
            self._peer.check.call(
                [*key, name, list(args), kwargs, config_of(obj), False, None, scope], {}
            )
        await self._runtime.create(name, key, functools.partial(_same, obj), scope=scope)

    async def ensure_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> bool:
        """Like ``create_remote_instance``; False if ``obj`` is already held as ``name``.

        Raises:
            DuplicateInstanceError: ``name`` is held by another object, or ``obj``
                under another name.
        """
        self.check_running()
        check_scope(scope)
        instance = self._runtime.instances.get(name)
        if instance is not None:
            if instance.obj is obj:
                return False
            raise DuplicateInstanceError(
                f"an instance named {name!r} already exists and is another object"
            )
        await self.create_remote_instance(obj, name, *args, scope=scope, **kwargs)
        return True

    async def delete_remote_instance(self, obj: Any) -> None:
        """Delete ``obj`` once the calls made before have run: calls queued
        after fail, open generators are closed in its thread, the thread stops."""
        self.check_running()
        await self._runtime.delete(self.registry.require_name(obj))

    async def get_remote_objects(self) -> list[str]:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        return self.registry.instance_names()

    def _instance(self, obj: Any) -> Instance:
        name = self.registry.name_of(obj)
        if name is None:
            name = self.registry.require_name(obj)  # raises the helpful error
        instance = self._runtime.instances.get(name)
        if instance is None:  # put in a shared registry by someone else
            raise UnknownInstanceError(
                f"{name!r} is in the registry but has no thread in this executor: "
                "create it with `await executor.ensure_remote_instance(obj, name)`"
            )
        return instance

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
        instance = self._instance(obj)
        marker, bound = resolve_call(obj, fn, callback, generator=False)
        peer = self._peer
        arguments, keywords = list(args), kwargs or {}
        if peer.check is not None:
            peer.check.call(arguments, keywords)
        sid = peer.next_id()
        answer = _Answer(peer.new_event(), bound)
        peer.expect(sid, answer)
        deadline = call_deadline(marker.timeout)
        call = self._runtime.call(peer, sid, instance, marker, arguments, keywords, deadline)
        try:
            if marker.timeout is None:
                await answer.event.wait()
            else:
                await wait_for_answer(answer.event, marker.timeout)
        except BaseException:
            peer.abandon(sid)
            call.on_cancel()  # queued: never starts; running: asked to stop
            raise
        if answer.error is not None:
            raise answer.error
        return answer.value

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
        instance = self._instance(obj)
        marker, bound = resolve_call(obj, gen, callback, generator=True)
        peer = self._peer
        arguments, keywords = list(args), kwargs or {}
        if peer.check is not None:
            peer.check.call(arguments, keywords)
        sid = peer.next_id()
        stream = ThreadStream(peer, sid, bound)
        peer.expect(sid, stream.inbox)
        stream.call = self._runtime.call(
            peer, sid, instance, marker, arguments, keywords, call_deadline(marker.timeout)
        )
        return stream

    # -- invocations -------------------------------------------------------------
    async def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Invocation:
        self.check_running()
        obj, marker = submittable(fn)
        instance = self._instance(obj)
        peer, detached = self._peer, self._detached
        arguments = list(args)
        if peer.check is not None:
            peer.check.call(arguments, kwargs)
        call = self._runtime.call(
            detached,
            detached.next_id(),
            instance,
            marker,
            arguments,
            kwargs,
            marker.timeout,  # its own bound only: the submitting task's is not its
            invocation_id=make_invocation_id(peer.session, peer.next_id()),
            detached=True,
        )
        await anyio.lowlevel.checkpoint()
        return Invocation(self, call.invocation.id)

    async def invocation_result(self, invocation_id: str) -> Any:
        self.check_running()
        scope = await detached_outcome(
            self._runtime.invocations, invocation_id, self._peer.call_soon
        )
        if scope.failure is not None:
            raise scope.failure
        return scope.value

    def follow_log(self, invocation_id: str) -> RemoteStream:
        self.check_running()
        return LogFollower(self._runtime.invocations, invocation_id, self._peer.call_soon)

    async def list_invocations(
        self,
        *,
        instance: Any = None,
        method: str | None = None,
        status: str | InvocationStatus | None = None,
    ) -> list[InvocationInfo]:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        return self._runtime.invocations.list(
            instance=self._instance_name(instance), method=method, status=status
        )

    async def get_invocation(self, invocation_id: str) -> InvocationInfo:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        return self._runtime.invocations.get(invocation_id)

    async def cancel_invocation(self, invocation_id: str) -> InvocationInfo:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        return self._runtime.invocations.cancel(invocation_id)

    # -- config and properties -------------------------------------------------
    async def get_remote_object_config(self, obj: Any | None) -> dict[str, Any]:
        """``obj``'s config (read in its thread, after the calls before it);
        with None, ``{name: config}`` for every instance."""
        self.check_running()
        if obj is None:
            return await self._runtime.all_configs()
        config: dict[str, Any] = await self._runtime.run_in_turn(
            self._instance(obj), functools.partial(config_of, obj)
        )
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
        data: dict[str, Any] = await self._runtime.run_in_turn(
            self._instance(obj), functools.partial(_read_attributes, obj, names)
        )
        return data

    # -- clock, imports, channels ----------------------------------------------
    async def get_echo_clock(self) -> tuple[int, int, int]:
        self.check_running()
        sent = time.perf_counter_ns()
        await anyio.lowlevel.checkpoint()
        remote = time.perf_counter_ns()
        return sent, remote, time.perf_counter_ns()

    async def sleep(self, duration: float | None = None, deadline: float | None = None) -> int:
        """Sleep ``duration`` seconds, or until ``deadline`` (a ``time.perf_counter_ns()``
        value, the clock of ``get_echo_clock``); returns that clock on waking.

        Raises:
            ValueError: neither or both given, or not a finite number.
        """
        self.check_running()
        return await sleep_until(duration, deadline)

    async def remote_import(self, module: str | ModuleType) -> None:
        self.check_running()
        name = module_name(module)
        await anyio.lowlevel.checkpoint()
        importlib.import_module(name)

    async def register_remote_class(self, cls: type) -> None:
        self.check_running()
        await anyio.lowlevel.checkpoint()
        self.registry.register_class(cls)

    def get_channel_from_remote(self, name: str, channel: str) -> RemoteStream:
        """Events of instance ``name`` ("" for all) on ``channel`` ("create",
        "delete", "execute" or "" for all); they end when the executor stops."""
        self.check_running()
        return self._events.subscribe(name, channel)

    def observe(self, obj: Any, names: Iterable[str]) -> RemoteStream:
        """Changes of the public attributes ``names`` of ``obj``, read in its
        thread after each of its calls (see ``Executor.observe``); an observer
        more than 1024 changes behind is resynchronised.

        Raises:
            NotAllowedError: a name is private or not an identifier.
        """
        self.check_running()
        wanted = check_observed_names(names)
        check = self._peer.check
        vet = None if check is None else check.result
        return Observer(self._instance(obj), wanted, self._events.max_queue, vet=vet)


class _StreamInbox:
    """What the runtime hands one stream (on the loop): items, end, error.

    Kept apart from ``ThreadStream`` so that the peer never holds the
    consumer's object: dropped unclosed, that object is then collected, and
    its finaliser closes the generator (``ThreadStream.__del__``).
    """

    __slots__ = ("buffer", "credit", "ended", "error", "wakeup")

    def __init__(self, window: int) -> None:
        self.credit = window  # items the generator may still produce
        self.buffer: deque[Any] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.wakeup: anyio.Event | None = None

    def receive(self, items: list[Any]) -> None:
        self.credit -= len(items)
        self.buffer.extend(items)
        if self.wakeup is not None:
            self.wakeup.set()

    def end(self, error: BaseException | None) -> None:
        self.ended = True
        self.error = error
        if self.wakeup is not None:
            self.wakeup.set()

    def fail(self, exc: BaseException) -> None:
        self.end(exc)

    def cut_off(self, exc: BaseException) -> None:
        """The executor stopped: items not consumed yet are dropped."""
        self.buffer.clear()
        self.end(exc)


class ThreadStream(RemoteStream):
    """The items of a generator running in an instance's worker thread.

    Each item is handed over as soon as the generator yields it; the
    generator runs at most ``window`` items ahead of this consumer (credit is
    granted back in halves of the window). ``aclose`` (leaving the
    ``async with``) closes the generator in its thread and waits for that;
    collected while open (``async for`` left early, never closed), it has the
    generator closed and warns (``RemoteStream._closed_when_collected``).
    """

    def __init__(self, peer: _LocalPeer, sid: int, callback: Callable[[Any], Any] | None) -> None:
        self.inbox = _StreamInbox(peer.window)  # what the peer feeds (``peer.expect``)
        self._closing = False
        self._peer = peer
        self._sid = sid
        self._callback = callback
        self.call: RuntimeCall | None = None
        self._consumed = 0  # consumed since credit was last granted

    def __del__(self) -> None:
        call = self.call
        if self._closing or self.inbox.ended or call is None:
            return  # closed, exhausted, failed or cut off: nothing runs any more
        instance = call.instance
        name = f"{type(instance.obj).__qualname__} {instance.name!r}"
        self._closed_when_collected(
            f"{name}.{getattr(call, 'method', '?')}()",
            self._peer.call_soon,
            _close_abandoned,
            self._peer,
            self._sid,
            call,
        )

    # -- the consumer ------------------------------------------------------------
    async def __anext__(self) -> Any:
        inbox = self.inbox
        while not inbox.buffer:
            if inbox.ended:
                error, inbox.error = inbox.error, None
                if error is not None:
                    raise error  # once: then the stream is just over
                raise StopAsyncIteration
            if inbox.wakeup is not None:
                raise RuntimeError("anext(): another task is already waiting for this stream")
            inbox.wakeup = wakeup = self._peer.new_event()
            try:
                await wakeup.wait()  # cancelled: no item is lost, the stream goes on
            finally:
                inbox.wakeup = None
        item = inbox.buffer.popleft()
        self._consumed += 1
        if not inbox.ended and self._consumed * 2 >= self._peer.window:
            inbox.credit += self._consumed
            self._consumed = 0
            if self.call is not None:
                self.call.on_credit()
        if self._callback is not None:
            self._callback(item)
        return item

    async def aclose(self) -> None:
        """Close the generator in its thread (awaited unless the closing task
        is cancelled); idempotent."""
        self._closing = True
        inbox = self.inbox
        if inbox.ended:
            await anyio.lowlevel.checkpoint()
            inbox.buffer.clear()
            return
        call = self.call
        if call is not None:
            call.on_cancel()
        while not inbox.ended:
            inbox.wakeup = wakeup = self._peer.new_event()
            try:
                await wakeup.wait()
            finally:
                inbox.wakeup = None
        inbox.buffer.clear()
        inbox.error = None


def _close_abandoned(peer: _LocalPeer, sid: int, call: RuntimeCall) -> None:
    """On the loop: a stream's consumer dropped it unclosed; close its generator
    in its thread (what it still produces is dropped)."""
    try:
        if peer.alive:
            peer.abandon(sid)
            call.on_cancel()
    except Exception:  # a loop callback must never raise (trio would crash)
        logger.exception("could not close an abandoned stream")


def _not_started(*args: Any) -> None:
    raise ExecutorStateError("the executor is not started")
