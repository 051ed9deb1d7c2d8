"""The executor behaviour every remote transport shares.

``RemoteExecutor`` drives one ``RpcConnection`` over one ``FrameTransport``:
a single reader task hands replies to their waiters, so one connection carries
many calls and streams at once. Subclasses only say how to connect.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import sys
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from types import ModuleType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from remote_exec.exceptions import (
    ConnectionLostError,
    ExecutorStateError,
    RemoteException,
    RemoteExecError,
    UnknownInstanceError,
    remote_exception,
)
from remote_exec.executor import (
    ChangeStream,
    Executor,
    Invocation,
    MappedStream,
    RemoteStream,
    call_deadline,
    check_channel,
    check_observed_names,
    check_scope,
    check_sleep,
    config_of,
    module_name,
    resolve_call,
    submittable,
    wait_for_answer,
)
from remote_exec.framing import pack_frames
from remote_exec.invocations import (
    InvocationInfo,
    InvocationStatus,
    LogEntry,
    make_invocation_id,
    new_session,
)
from remote_exec.messages import Close, Failure, Message, Result, StreamEnd, StreamItems
from remote_exec.protocol import (
    DEFAULT_WINDOW,
    MIN_STREAM_BYTES,
    Limits,
    RpcConnection,
    Side,
)
from remote_exec.registry import InstanceRegistry, qualified_name
from remote_exec.runtime.backend import threadsafe_call_soon
from remote_exec.runtime.transport import FrameTransport

__all__ = ["RemoteExecutor"]

logger = logging.getLogger("remote_exec.client")

# How long a cancelled caller may spend telling the server (never a hang).
_CANCEL_SEND_TIMEOUT = 2.0
RECONNECT_DELAY = 0.05
"""Seconds before the first reconnect attempt (then doubled each time, jittered)."""
RECONNECT_MAX_DELAY = 5.0
"""The longest pause between two reconnect attempts."""
# True in the task that reconnects: its own requests go out before the others'.
_reconnecting: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "remote_exec_reconnecting", default=False
)


class _Pending:
    """A call waiting for its reply."""

    __slots__ = ("callback", "done", "error", "value")

    def __init__(self, callback: Callable[[Any], Any] | None, done: anyio.Event) -> None:
        self.callback = callback
        self.done = done
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, message: Message) -> None:
        if isinstance(message, Result):
            self.value = message.value
            if self.callback is not None:
                # Runs in the reader, in arrival order: callbacks keep call order.
                try:
                    self.callback(message.value)
                except Exception as exc:  # noqa: BLE001 - the caller gets it instead
                    self.error = exc
        elif isinstance(message, Failure):
            self.error = remote_exception(message.type_name, message.message, message.traceback)
        self.done.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()


class _Hello(_Pending):
    """The answer to ``hello``: nothing to do, unless it is a refusal."""

    __slots__ = ("executor",)

    def __init__(self, executor: RemoteExecutor) -> None:
        super().__init__(None, executor._new_event())
        self.executor = executor

    def resolve(self, message: Message) -> None:
        if isinstance(message, Failure):
            self.executor._connection_lost(
                ConnectionLostError(f"the server refused this connection: {message.message}")
            )

    def fail(self, exc: BaseException) -> None:
        pass


class _StreamInbox:
    """What the reader hands one stream: its items, its end, its error.

    Kept apart from ``_Stream`` so that the executor (through ``_waiters``)
    never holds the consumer's object: dropped unclosed, that object is then
    collected, and its finaliser closes the generator (``close_abandoned``).
    """

    __slots__ = (
        "batches",
        "call_soon",
        "ended",
        "error",
        "executor",
        "items",
        "stream_id",
        "wakeup",
    )

    def __init__(self, executor: RemoteExecutor) -> None:
        self.executor = executor
        self.items: deque[Any] = deque()
        # ``(items, bytes per item)`` of each frame of ``items`` not begun yet,
        # oldest first: what the server counts against ``Limits.max_stream_bytes``.
        self.batches: deque[tuple[int, float]] = deque()
        self.wakeup = anyio.Event()
        self.stream_id: int | None = None
        self.ended = False
        self.error: BaseException | None = None
        # The loop's thread-safe entry point, for the finaliser (set on opening).
        self.call_soon: Callable[..., object] | None = None

    # called by the reader
    def push(self, message: Message) -> None:
        if isinstance(message, StreamItems):
            items = message.items
            if items:
                self.items.extend(items)
                self.batches.append((len(items), message.nbytes / len(items)))
        elif isinstance(message, StreamEnd):
            self.ended = True
        elif isinstance(message, Failure):
            self.ended = True
            self.error = remote_exception(message.type_name, message.message, message.traceback)
        self.wakeup.set()

    def fail(self, exc: BaseException) -> None:
        self.ended = True
        self.error = exc
        self.wakeup.set()

    def close_abandoned(self) -> None:
        """On the loop: its consumer dropped the stream unclosed, so send the
        server a ``Cancel`` (it closes the generator) and forget the stream."""
        executor, stream_id = self.executor, self.stream_id
        try:
            if self.ended or stream_id is None or executor._waiters.get(stream_id) is not self:
                return
            del executor._waiters[stream_id]  # what still arrives for it is dropped
            self.ended = True
            if executor._lost is not None or not executor.started:
                return
            tg = executor._task_group
            if tg is not None:
                executor._connection.send_cancel(stream_id)
                tg.start_soon(executor._flush_quietly)
        except Exception:  # a loop callback must never raise (trio would crash)
            logger.exception("could not close an abandoned stream")


class _Stream(RemoteStream):
    """A remote generator: items arrive within the credit the consumer grants.

    Collected while open (``async for`` left early, never closed), it has its
    generator closed and warns (``RemoteStream._closed_when_collected``).
    """

    def __init__(
        self,
        executor: RemoteExecutor,
        target: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        callback: Callable[[Any], Any] | None,
        window: int,
        timeout: float | None = None,
    ) -> None:
        self._inbox = _StreamInbox(executor)
        self._timeout = timeout  # the method's own, from apply_generator_executor
        self._closed = False
        self._executor = executor
        self._call = (target, method, args, kwargs)
        self._callback = callback
        self._window = window
        self._max_bytes = executor.limits.max_stream_bytes
        # Items consumed since the last credit grant, and their share of their
        # frames' bytes (as the server counts them), as of the last ``_count``.
        self._consumed = 0
        self._consumed_bytes = 0.0
        # The frame being consumed: its items left as of the last ``_count``,
        # and its bytes per item.
        self._batch_left = 0
        self._share = 0.0
        # Items that may be taken after the last ``_count`` before the next
        # one (none makes a grant due or begins a frame), and how many remain:
        # taking an item costs a decrement, not the accounting.
        self._planned = 0
        self._countdown = 0

    def __del__(self) -> None:
        inbox = self._inbox
        if self._closed or inbox.ended or inbox.call_soon is None:
            return  # closed, exhausted, failed, or never opened: nothing runs remotely
        self._closed_when_collected(self._describe(), inbox.call_soon, inbox.close_abandoned)

    def _describe(self) -> str:
        target, method = self._call[0], self._call[1]
        if not target:
            return f"the executor's {method!r} channel"
        try:
            cls = type(self._executor.registry.get_instance(target)).__qualname__
        except UnknownInstanceError:  # deleted meanwhile
            cls = "instance"
        return f"{cls} {target!r}.{method}()"

    async def _open(self) -> None:
        target, method, args, kwargs = self._call
        inbox = self._inbox
        call_soon = threadsafe_call_soon()
        inbox.stream_id = await self._executor._send_call(
            target,
            method,
            args,
            kwargs,
            stream=self._window,
            waiter=inbox,
            meta=_deadline_meta(call_deadline(self._timeout)),
        )
        inbox.call_soon = call_soon

    async def __aenter__(self) -> Self:
        if self._inbox.stream_id is None and not self._closed:
            await self._open()
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        inbox = self._inbox
        if inbox.stream_id is None:
            await self._open()
        while not inbox.items:
            if inbox.ended:
                self._closed = True
                if inbox.error is not None:
                    raise inbox.error
                raise StopAsyncIteration
            self._settle()
            if self._consumed_bytes >= MIN_STREAM_BYTES:
                # Starved with large items consumed: a server whose byte bound
                # is below ours may be waiting for them (see MIN_STREAM_BYTES).
                await self._grant()
                continue
            inbox.wakeup = anyio.Event()
            await inbox.wakeup.wait()
        item = inbox.items.popleft()
        if self._countdown:
            self._countdown -= 1  # neither a grant nor a new frame is due
        elif self._count(inbox) and not inbox.ended:
            await self._grant()
        if self._callback is not None:
            self._callback(item)
        return item

    def _settle(self) -> None:
        """Count the items taken since the last ``_count`` (all of its frame)."""
        done = self._planned - self._countdown
        if done:
            self._consumed += done
            self._consumed_bytes += done * self._share
            self._batch_left -= done
        self._planned = self._countdown = 0

    def _count(self, inbox: _StreamInbox) -> bool:
        """Count the item just taken and those before it; plan how many may be
        taken before the next count. True: a grant is due (half the window
        consumed, in items or in bytes)."""
        # the items taken since the last count (all of its frame), then this one
        done = self._planned
        left = self._batch_left - done
        nbytes = self._consumed_bytes + done * self._share
        if not left:  # this item begins a frame
            left, self._share = inbox.batches.popleft()
        share = self._share
        consumed = self._consumed + done + 1
        nbytes += share
        self._batch_left = left - 1
        half = self._max_bytes / 2
        due = consumed * 2 >= self._window or nbytes >= half
        self._consumed, self._consumed_bytes = consumed, nbytes
        if due:  # granted now: the next grant counts from none
            consumed, nbytes = 0, 0.0
        # The next count: at the item that makes a grant due, or at the first
        # item of the next frame, whichever comes first.
        plan = min(left - 1, (self._window + 1) // 2 - consumed - 1)
        if plan > 0 and nbytes + plan * share >= half:
            plan = min(plan, math.ceil((half - nbytes) / share) - 1)
        self._planned = self._countdown = max(plan, 0)
        return due

    async def _grant(self) -> None:
        """Grant the server the items consumed since the last grant."""
        granted, self._consumed, self._consumed_bytes = self._consumed, 0, 0.0
        await self._executor._grant(self._inbox.stream_id, granted)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        inbox = self._inbox
        if inbox.stream_id is None or inbox.ended:
            return
        # Ask the server to close the generator, then wait until it has: its
        # ``finally`` has run when we return (unless we are being cancelled).
        await self._executor._cancel(inbox.stream_id)
        while not inbox.ended:
            inbox.wakeup = anyio.Event()
            await inbox.wakeup.wait()


class RemoteExecutor(Executor):
    """Shared client side of the process and websocket executors.

    Args:
        codec: "msgpack" (default) or "json".
        limits: message size, depth and other caps (the same as the server's).
        window: how many stream items the server may run ahead of the consumer.
        registry: the instance registry (a fresh one by default).
        init_context: enter ``ExecutorContext(self)`` inside ``async with``.
    """

    is_remote = True

    def __init__(
        self,
        *,
        codec: str = "msgpack",
        limits: Limits | None = None,
        window: int = DEFAULT_WINDOW,
        registry: InstanceRegistry | None = None,
        init_context: bool = True,
    ) -> None:
        super().__init__(registry=registry, init_context=init_context)
        self.limits = limits or Limits()
        if not 1 <= window <= self.limits.max_credit:
            raise ValueError(f"window must be between 1 and {self.limits.max_credit}")
        self.window = window
        self._connection = RpcConnection(
            Side.CLIENT, self.registry, codec=codec, limits=self.limits
        )
        self._waiters: dict[int, _Pending | _StreamInbox] = {}
        self._transport: FrameTransport | None = None
        self._flushing = False
        self._exit_stack: AsyncExitStack | None = None
        self._task_group: TaskGroup | None = None
        self._lost: BaseException | None = None
        self._new_event: Callable[[], anyio.Event] = anyio.Event
        # The prefix of this connection's invocation ids: the id of the call
        # sent as stream ``n`` is ``f"{session}-{n}"`` (told to the server first).
        self.session = new_session()
        self._codec = codec
        # Reconnect (``WebSocketExecutor(reconnect=True)``): the connection is
        # opened again after a loss, and the instances this executor created
        # (their create requests, by name) are attached again.
        self.reconnect = False
        self.reconnects = 0
        self._reconnecting: anyio.Event | None = None  # set once connected again
        self._parked: deque[anyio.Event] = deque()  # calls waiting for it, in order
        self._held: dict[str, list[Any]] = {}

    # -- to implement ----------------------------------------------------------
    @abstractmethod
    async def _connect(self) -> FrameTransport:
        """Open the transport (and whatever it needs: a child process...)."""

    async def _disconnect(self) -> None:
        """Release what ``_connect`` made, after the transport is closed."""

    def _connected(self, transport: FrameTransport) -> None:
        """``transport`` is the connection now (at start and at each reconnect)."""

    def _known_lost(self) -> ConnectionLostError | None:
        """Why the transport is known to be gone, before the reader says so."""
        return None

    @property
    def connected(self) -> bool:
        """Started, and the connection is up (not lost, not reconnecting)."""
        return self.started and self._lost is None and self._reconnecting is None

    # -- lifecycle -------------------------------------------------------------
    async def _start(self) -> None:
        # The backend's own Event class: ``anyio.Event()`` looks the backend up
        # on every call (2 µs), once per remote call.
        self._new_event = type(anyio.Event())
        self._transport = transport = await self._connect()
        stack = AsyncExitStack()
        try:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self._task_group.start_soon(
                self._read_loop, transport, name=f"{type(self).__name__} reader"
            )
            await self._hello()
            self._connected(transport)
        except BaseException:
            if self._task_group is not None:
                self._task_group.cancel_scope.cancel()
            await stack.aclose()
            await self._transport.aclose()
            raise
        self._exit_stack = stack

    async def _hello(self) -> None:
        """Tell the server this connection's session (the prefix of its
        invocation ids). Not awaited: the calls that follow need no answer
        first, and a refusal (never expected) fails the connection."""
        stream_id = self._connection.send_call("", "hello", [self.session])
        self._waiters[stream_id] = _Hello(self)
        await self._flush()

    async def _stop(self) -> None:
        connection, transport = self._connection, self._transport
        reconnecting, self._reconnecting = self._reconnecting, None
        if reconnecting is not None:
            self._lost = ExecutorStateError(f"{type(self).__name__} was stopped")
            reconnecting.set()
        parked, self._parked = self._parked, deque()
        for turn in parked:  # calls waiting for the connection fail now
            turn.set()
        try:
            if transport is not None and self._lost is None:
                connection.send_close("client stopped")
                with anyio.move_on_after(_CANCEL_SEND_TIMEOUT, shield=True):
                    await self._flush()
        except RemoteExecError:
            pass
        finally:
            self._fail_all(ExecutorStateError(f"{type(self).__name__} was stopped"))
            with anyio.CancelScope(shield=True):
                if transport is not None:
                    await transport.aclose()
                await self._disconnect()
            # Last: cancelling the reader's task group also cancels this task
            # until the group exits, so nothing may await after it but the exit.
            stack, self._exit_stack = self._exit_stack, None
            if stack is not None and self._task_group is not None:
                self._task_group.cancel_scope.cancel()
                await stack.aclose()

    # -- the reader --------------------------------------------------------------
    async def _read_loop(self, transport: FrameTransport) -> None:
        connection = self._connection
        try:
            while True:
                self._handle_frame(await transport.receive_frame())
                if connection.has_data_to_send and self._task_group is not None:
                    # e.g. the cancel of a stream whose items could not be decoded
                    self._task_group.start_soon(self._flush_quietly)
        except anyio.get_cancelled_exc_class():
            raise
        except ConnectionLostError as exc:
            self._connection_lost(exc, transport)
        except RemoteExecError as exc:  # the server broke the protocol
            self._connection_lost(
                ConnectionLostError(f"protocol error from the server: {exc}"), transport
            )
        except Exception as exc:  # noqa: BLE001 - the reader must never take the caller down
            self._connection_lost(ConnectionLostError(f"connection failed: {exc!r}"), transport)

    def _handle_frame(self, frame: bytes | bytearray | memoryview) -> None:
        """Hand each message of ``frame`` to its waiter; its own function, so
        that no local keeps a (maybe large) frame alive while the reader waits."""
        waiters = self._waiters
        connection = self._connection
        connection.receive_frame(frame)
        for message in connection.events_received():
            if isinstance(message, Close):
                raise ConnectionLostError(
                    f"the server closed the connection: {message.reason or 'no reason given'}"
                )
            waiter = waiters.get(message.stream_id)
            if waiter is None:
                continue  # its caller gave up (cancelled): drop the reply
            if not isinstance(message, StreamItems):
                del waiters[message.stream_id]
            if isinstance(waiter, _Pending):
                waiter.resolve(message)
            else:
                waiter.push(message)

    def _connection_lost(
        self, exc: ConnectionLostError, transport: FrameTransport | None = None
    ) -> None:
        """Every call and stream in flight fails with ``exc`` (none is sent
        again); then the executor is done, or reconnects (``reconnect``).
        ``transport``: the one that failed (an older one's loss is old news)."""
        if transport is not None and transport is not self._transport:
            return
        self._fail_all(exc)
        if not self.reconnect or self._state != "running" or self._task_group is None:
            self._lost = exc
        elif self._reconnecting is None:
            self._reconnecting = self._new_event()
            self._task_group.start_soon(self._reconnect, exc, name=f"{self!r} reconnect")

    async def _reconnect(self, cause: ConnectionLostError) -> None:
        """Open the connection again (bounded, jittered exponential backoff),
        then attach the instances this executor created again, re-creating
        those the server no longer has (a restarted daemon)."""
        logger.warning("%r: %s; reconnecting", self, cause)
        token = _reconnecting.set(True)  # this task's requests need not wait for it
        try:
            old = self._transport
            if old is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CANCEL_SEND_TIMEOUT):
                    await old.aclose()
            delay = RECONNECT_DELAY
            attempt = 0
            while True:
                attempt += 1
                try:
                    await self._reopen()
                    break
                except (OSError, RemoteExecError, TimeoutError) as exc:
                    pause = delay * random.uniform(0.5, 1.0)
                    logger.info(
                        "%r: reconnect attempt %d failed (%s); next in %.2f s",
                        self,
                        attempt,
                        exc,
                        pause,
                    )
                    await anyio.sleep(pause)
                    delay = min(delay * 2, RECONNECT_MAX_DELAY)
        finally:
            _reconnecting.reset(token)
        self.reconnects += 1
        waiting, self._reconnecting = self._reconnecting, None
        if waiting is not None:
            waiting.set()
        self._wake_next()
        logger.warning("%r: reconnected (%d reconnects so far)", self, self.reconnects)

    async def _reopen(self) -> None:
        """One attempt: a new transport, protocol state and session; then re-attach."""
        transport = await self._connect()
        self._connection = RpcConnection(
            Side.CLIENT, self.registry, codec=self._codec, limits=self.limits
        )
        self.session = new_session()
        self._transport = transport
        assert self._task_group is not None
        self._task_group.start_soon(self._read_loop, transport, name=f"{self!r} reader")
        try:
            await self._hello()
            for name, request in list(self._held.items()):
                again = [*request]
                again[6] = True  # exist_ok: attach to it if the server still has it
                try:  # its config as it is now on this side
                    again[5] = config_of(self.registry.get_instance(name))
                except UnknownInstanceError:
                    pass
                if await self._request("", "create_instance", again):
                    logger.warning("%r: re-created %r (the server no longer had it)", self, name)
                else:
                    logger.info("%r: re-attached %r", self, name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await transport.aclose()
            raise
        self._connected(transport)

    def _fail_all(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.fail(exc)

    # -- sending -----------------------------------------------------------------
    def _check_usable(self) -> None:
        self.check_running()
        lost = self._lost
        if lost is not None:
            if isinstance(lost, ConnectionLostError):
                raise ConnectionLostError(str(lost)) from lost
            raise lost

    async def _wait_turn(self) -> None:
        """Until the connection is up again, for a call made while it reconnects.

        Such calls go out in the order they were made: each one, woken in
        turn, wakes the next once its own frame is queued (trio wakes the
        waiters of one event in any order).
        """
        parked = self._parked
        turn = self._new_event()
        parked.append(turn)
        if self._reconnecting is None and parked[0] is turn:
            parked.popleft()  # connected, and nobody waits before it: go
            return
        try:
            await turn.wait()
        except BaseException:
            try:
                parked.remove(turn)  # still waiting: leave the line
            except ValueError:
                self._wake_next()  # it was its turn: hand it on
            raise
        try:
            self._check_usable()
        finally:
            self._wake_next()  # runs once this task has queued its call

    def _wake_next(self) -> None:
        if self._reconnecting is None and self._parked:
            self._parked.popleft().set()

    async def _flush(self) -> None:
        """Write every queued frame.

        One task writes at a time and drains the queue for everyone: a caller
        that finds a writer at work leaves its frame to it (no lock, so no
        extra trip through the event loop for a lone call). A reply can only
        come after the frame went out, and a failed write fails every waiter.
        """
        if self._flushing:
            return
        assert self._transport is not None
        self._flushing = True
        try:
            if len(self._waiters) > 1:
                # Other calls are in flight: their callers, woken by the same
                # batch of replies, may be about to send too. One turn of the
                # loop lets their frames join this message (one write, one
                # websocket frame, one read on the server, instead of one each).
                await anyio.lowlevel.cancel_shielded_checkpoint()
            while frames := self._connection.data_to_send():
                for message in pack_frames(frames, self.limits.max_message_size):
                    await self._transport.send_frame(message)
        finally:
            self._flushing = False

    async def _flush_quietly(self) -> None:
        transport = self._transport
        try:
            await self._flush()
        except ConnectionLostError as exc:
            self._connection_lost(exc, transport)

    async def _send_call(
        self,
        target: str,
        method: str,
        args: Iterable[Any],
        kwargs: dict[str, Any],
        *,
        stream: int = 0,
        waiter: _Pending | _StreamInbox,
        meta: dict[str, Any] | None = None,
    ) -> int:
        self._check_usable()
        if self.reconnect:
            lost = self._known_lost()
            if lost is not None:  # not sent yet: it waits for the reconnect
                self._connection_lost(lost, self._transport)
            if (self._reconnecting is not None or self._parked) and not _reconnecting.get():
                await self._wait_turn()
        transport = self._transport
        stream_id = self._connection.send_call(
            target, method, list(args), kwargs, stream=bool(stream), credit=stream, meta=meta
        )
        self._waiters[stream_id] = waiter
        try:
            await self._flush()
        except ConnectionLostError as exc:
            self._connection_lost(exc, transport)
        return stream_id

    async def _grant(self, stream_id: int | None, count: int) -> None:
        if stream_id is None or self._lost is not None or self._reconnecting is not None:
            return
        self._connection.send_credit(stream_id, count)
        await self._flush()

    async def _cancel(self, stream_id: int) -> None:
        """Tell the server to cancel ``stream_id``, even from a cancelled task."""
        if self._lost is not None or not self.started or self._reconnecting is not None:
            return
        transport = self._transport
        self._connection.send_cancel(stream_id)
        with anyio.move_on_after(_CANCEL_SEND_TIMEOUT, shield=True):
            try:
                await self._flush()
            except ConnectionLostError as exc:
                self._connection_lost(exc, transport)

    async def _request(
        self,
        target: str,
        method: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[[Any], Any] | None = None,
        *,
        method_timeout: float | None = None,
    ) -> Any:
        """One call, awaited; cancelling the caller cancels it remotely.

        A deadline (``method_timeout``, or the caller's own) travels with it.
        """
        waiter = _Pending(callback, self._new_event())
        meta = _deadline_meta(call_deadline(method_timeout))
        stream_id = await self._send_call(
            target, method, args, kwargs or {}, waiter=waiter, meta=meta
        )
        try:
            if method_timeout is None:
                await waiter.done.wait()
            else:
                await wait_for_answer(waiter.done, method_timeout)
        except BaseException:
            if not waiter.done.is_set():
                self._waiters.pop(stream_id, None)
                await self._cancel(stream_id)
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    # -- the Executor interface ----------------------------------------------------

    async def execute(
        self,
        obj: Any,
        fn: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> Any:
        self._check_usable()
        marker, bound = resolve_call(obj, fn, callback, generator=False)
        target = self.registry.require_name(obj)
        return await self._request(
            target, marker.name, args, kwargs, bound, method_timeout=marker.timeout
        )

    def execute_generator(
        self,
        obj: Any,
        gen: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> RemoteStream:
        self._check_usable()
        marker, bound = resolve_call(obj, gen, callback, generator=True)
        target = self.registry.require_name(obj)
        return _Stream(
            self, target, marker.name, list(args), kwargs or {}, bound, self.window, marker.timeout
        )

    async def _create(
        self, obj: Any, name: str, args: Any, kwargs: Any, exist_ok: bool, scope: str = "server"
    ) -> bool:
        self._check_usable()
        check_scope(scope)
        module, qualname = qualified_name(type(obj))
        main_path = None
        if module == "__main__":
            main_path = getattr(sys.modules["__main__"], "__file__", None)
            if main_path is not None and main_path.startswith("<"):
                main_path = None  # "<stdin>", "<string>": no file to import either
        request = [module, qualname, name, list(args), kwargs, config_of(obj), exist_ok, main_path]
        if scope != "server":  # the default: a request without it is understood everywhere
            request.append(scope)
        created: bool = await self._request("", "create_instance", request)
        if self.registry.name_of(obj) != name:
            self.registry.add_instance(obj, name)
        if self.reconnect:
            self._held[name] = request  # attached again after a reconnect
        return created

    async def create_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> None:
        await self._create(obj, name, args, kwargs, exist_ok=False, scope=scope)

    async def ensure_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> bool:
        return await self._create(obj, name, args, kwargs, exist_ok=True, scope=scope)

    async def delete_remote_instance(self, obj: Any) -> None:
        self._check_usable()
        name = self.registry.require_name(obj)
        try:
            await self._request("", "delete_instance", [name])
        finally:
            self.registry.remove_instance(name)
            self._held.pop(name, None)

    async def get_remote_objects(self) -> list[str]:
        self._check_usable()
        names: list[str] = await self._request("", "list_instances")
        return names

    async def get_remote_object_config(self, obj: Any | None) -> dict[str, Any]:
        self._check_usable()
        name = None if obj is None else self.registry.require_name(obj)
        config: dict[str, Any] = await self._request("", "get_config", [name])
        return config

    async def get_remote_object_property_data(
        self, obj: Any, names: Iterable[str]
    ) -> dict[str, Any]:
        self._check_usable()
        data: dict[str, Any] = await self._request(
            "", "get_properties", [self.registry.require_name(obj), list(names)]
        )
        return data

    async def list_invocations(
        self,
        *,
        instance: Any = None,
        method: str | None = None,
        status: str | InvocationStatus | None = None,
    ) -> list[InvocationInfo]:
        self._check_usable()
        wanted = None if status is None else InvocationStatus(status).value
        found: list[Any] = await self._request(
            "", "list_invocations", [self._instance_name(instance), method, wanted]
        )
        return [InvocationInfo.from_wire(info) for info in found]

    async def get_invocation(self, invocation_id: str) -> InvocationInfo:
        self._check_usable()
        return InvocationInfo.from_wire(await self._request("", "get_invocation", [invocation_id]))

    async def cancel_invocation(self, invocation_id: str) -> InvocationInfo:
        self._check_usable()
        return InvocationInfo.from_wire(
            await self._request("", "cancel_invocation", [invocation_id])
        )

    async def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Invocation:
        self._check_usable()
        obj, marker = submittable(fn)
        target = self.registry.require_name(obj)
        accepted = _Pending(None, self._new_event())
        # Only the method's own bound travels: the submitting task's is for sending.
        meta: dict[str, Any] = {"detached": True}
        if marker.timeout is not None:
            meta["deadline"] = marker.timeout
        stream_id = await self._send_call(
            target, marker.name, args, kwargs, waiter=accepted, meta=meta
        )

        async def was_accepted() -> None:
            await accepted.done.wait()
            error = accepted.error
            if error is not None:
                if self.reconnect and isinstance(error, ConnectionLostError):
                    return  # maybe it arrived: after the reconnect, ask by id
                raise error

        return Invocation(self, make_invocation_id(self.session, stream_id), was_accepted)

    async def invocation_result(self, invocation_id: str) -> Any:
        while True:
            self._check_usable()
            try:
                return await self._request("", "invocation_result", [invocation_id])
            except ConnectionLostError as exc:
                if not self.reconnect or isinstance(exc, RemoteException):
                    raise  # no reconnect, or the invocation's own failure
                # A read, not a call: asked again once the connection is back.

    def follow_log(self, invocation_id: str) -> RemoteStream:
        self._check_usable()
        stream = _Stream(self, "", "follow_log", [invocation_id], {}, None, self.window)
        return MappedStream(stream, LogEntry.from_wire)

    async def get_echo_clock(self) -> tuple[int, int, int]:
        self._check_usable()
        sent = time.perf_counter_ns()
        remote: int = await self._request("", "echo_clock")
        return sent, remote, time.perf_counter_ns()

    async def sleep(self, duration: float | None = None, deadline: float | None = None) -> int:
        self._check_usable()
        check_sleep(duration, deadline)
        woke: int = await self._request("", "sleep", [duration, deadline])
        return woke

    async def remote_import(self, module: str | ModuleType) -> None:
        self._check_usable()
        await self._request("", "import_module", [module_name(module)])

    async def register_remote_class(self, cls: type) -> None:
        self._check_usable()
        self.registry.register_class(cls)
        await self._request("", "register_class", list(qualified_name(cls)))

    def get_channel_from_remote(self, name: str, channel: str) -> RemoteStream:
        self._check_usable()
        check_channel(name, channel)
        return _Stream(self, "", "subscribe", [name, channel], {}, None, self.window)

    def observe(self, obj: Any, names: Iterable[str]) -> RemoteStream:
        """Changes of the public attributes ``names`` of ``obj``'s twin (the
        server's ``observe`` operation; see ``Executor.observe``).

        Raises:
            NotAllowedError: a name is private or not an identifier.
        """
        self._check_usable()
        wanted = check_observed_names(names)
        target = self.registry.require_name(obj)
        stream = _Stream(self, "", "observe", [target, list(wanted)], {}, None, self.window)
        return ChangeStream(stream)


def _deadline_meta(deadline: float | None) -> dict[str, Any] | None:
    """A call's meta: the seconds it may take, if bounded (``call_deadline``)."""
    return None if deadline is None else {"deadline": max(deadline, 0.0)}
