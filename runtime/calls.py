"""The calls in flight on an instance, one class per way of running.

A call is made for a *peer* (a server connection, or ThreadExecutor itself)
and answers through it: the peer turns replies, failures and stream items into
protocol frames or hands them straight to the waiting caller. Sync calls run
in the instance's thread (or on the loop if declared non-blocking), async
calls and generator steps on the peer's runner task for the instance, or in
the instance's thread when its worker has a loop of its own (ThreadExecutor).

Every call kind has explicit states and a table of the moves between them
(``TRANSITIONS``); ``_move`` refuses any other move, so a bug shows up as an
error where it happens, not as a call that never answers.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from remote_exec.exceptions import (
    CallCancelledError,
    ExecutorStateError,
    InvocationCancelled,
    RemoteExecError,
    UnknownInstanceError,
)
from remote_exec.executor import RemoteMethod
from remote_exec.invocations import InvocationScope, current, make_invocation_id

from .instances import Entry, Instance
from .worker import Job

__all__ = [
    "AsyncCall",
    "CallState",
    "InlineCall",
    "InvalidTransition",
    "Peer",
    "Runner",
    "RuntimeCall",
    "StreamCall",
    "SyncCall",
    "runner_in",
]

logger = logging.getLogger("remote_exec.runtime")


class CallState(enum.Enum):
    QUEUED = "queued"  # in the instance's FIFO, not started
    RUNNING = "running"  # started: in the thread, on a runner, or a step of a stream
    PARKED = "parked"  # a stream between steps, waiting for credit
    DONE = "done"  # answered (or dropped): nothing more happens

    # Members are singletons: hashed by identity, in C (Enum's own hash is
    # Python code, and the move tables look states up twice per move).
    __hash__ = object.__hash__


QUEUED = CallState.QUEUED
RUNNING = CallState.RUNNING
PARKED = CallState.PARKED
DONE = CallState.DONE


class InvalidTransition(RemoteExecError):
    """A call was asked to move between two states its table does not link (a bug)."""


class Peer(Protocol):
    """Where a call's outcome goes: a server connection, or ThreadExecutor.

    Every method is called on the peer's loop; none of them raises because the
    peer went away (``alive`` False): what is sent then is dropped.
    """

    alive: bool
    calls: dict[int, RuntimeCall]
    # The caller's prefix of its invocation ids (``new_session``).
    session: str
    # The peer loop's thread-safe, FIFO entry point (worker threads use it).
    call_soon: Callable[..., object]

    def reply(self, sid: int, value: Any) -> None: ...
    def fail(self, sid: int, exc: BaseException) -> None: ...
    def send_items(self, sid: int, items: list[Any]) -> None: ...
    def end_stream(self, sid: int) -> None: ...
    def credit(self, sid: int) -> int:
        """How many more items stream ``sid`` may send now."""
        ...

    def schedule_flush(self, stream: StreamCall) -> None:
        """Call ``stream.flush()`` soon (the peer may wait to batch items)."""
        ...

    def forget(self, call: RuntimeCall) -> None:
        """``call``'s work is over."""
        ...

    def runner_for(self, instance: Instance) -> Runner:
        """The task that runs async entries of ``instance`` for this peer."""
        ...


# Each kind's moves (h11's state tables are the model): DONE is final, and a
# stream reaches RUNNING only from its place in the FIFO.
_CALL_MOVES = {
    QUEUED: frozenset({RUNNING, DONE}),
    RUNNING: frozenset({DONE}),
    PARKED: frozenset(),  # only streams park
    DONE: frozenset(),
}
_STREAM_MOVES = {
    PARKED: frozenset({QUEUED, PARKED, DONE}),
    QUEUED: frozenset({QUEUED, RUNNING, PARKED, DONE}),
    RUNNING: frozenset({RUNNING, QUEUED, PARKED, DONE}),
    DONE: frozenset(),
}


class RuntimeCall:
    """A call in flight for a peer (tracked until its work is over)."""

    __slots__ = ("invocation", "peer", "sid", "state")

    moves: dict[CallState, frozenset[CallState]] = _CALL_MOVES
    instance: Instance  # a slot of each kind

    def __init__(
        self, peer: Peer, sid: int, state: CallState, instance: str = "", method: str = ""
    ) -> None:
        self.peer = peer
        self.sid = sid
        self.state = state
        # Its id (the caller's session and the call's stream id), its record,
        # and the stop request the method's own code can check.
        self.invocation = InvocationScope(make_invocation_id(peer.session, sid), instance, method)

    def _move(self, new: CallState) -> None:
        if new not in self.moves[self.state]:
            raise InvalidTransition(f"{self!r} cannot move from {self.state.value} to {new.value}")
        self.state = new
        if new is DONE:
            self.invocation.finish()  # completed, unless an outcome was recorded before
            self.instance.invocations.finished(self)

    def outcome(self, error: BaseException | None) -> None:
        """Record how the call ended (before it moves to DONE)."""
        self.invocation.finish(error, cancelled=self.invocation.cancelled and error is not None)

    def cancel_by_id(self) -> None:
        """Someone asked, by id, for this invocation to stop."""
        self.invocation.cancel(by_id=True)
        self.on_cancel()

    def _expired_in_queue(self) -> bool:
        """True (and the call answered) if its deadline passed before it could start."""
        if not self.invocation.expired():
            return False
        error = self.invocation.deadline_error("queued")
        self.outcome(error)
        self._move(DONE)
        self.peer.fail(self.sid, error)
        self.peer.forget(self)
        return True

    def _deadline_scope(self) -> anyio.CancelScope:
        """A cancel scope ending at the invocation's deadline (on this loop's clock)."""
        deadline = self.invocation.deadline
        if deadline is None:
            return anyio.CancelScope()
        return anyio.CancelScope(deadline=anyio.current_time() + deadline - time.monotonic())

    def _cancelled_error(self, started: bool) -> BaseException:
        """What the caller of a cancelled call gets."""
        if self.invocation.by_id:
            return self.invocation.cancelled_error()
        return CallCancelledError(
            "the call was cancelled while it ran"
            if started
            else "the call was cancelled before it started"
        )

    def on_cancel(self) -> None:
        """The client sent ``Cancel``."""

    def on_credit(self) -> None:
        """The client granted more items."""

    def abandon(self) -> bool:
        """The connection is going away; True if it should wait for this call."""
        return False

    def release(self) -> None:
        """The connection is gone for good (its tasks are over)."""

    def drop(self, error: BaseException) -> None:
        """The instance went away while this call was queued."""
        self.outcome(error)
        self._move(DONE)
        self.peer.fail(self.sid, error)
        self.peer.forget(self)


class SyncCall(RuntimeCall, Entry):
    """A sync method (or property read) run in the instance's thread.

    Also an async method where the instance's worker has a loop of its own
    (``is_async``: the worker awaits the coroutine, and a cancel reaches it).
    """

    __slots__ = ("args", "cancelled", "fn", "instance", "is_async", "job", "kwargs", "method")
    pipelined = True

    def __init__(
        self,
        peer: Peer,
        sid: int,
        instance: Instance,
        fn: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        method: str | None,
        is_async: bool = False,
    ) -> None:
        RuntimeCall.__init__(self, peer, sid, QUEUED, instance.name, method or "")
        self.instance = instance
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.method = method  # None: not a method call (no "execute" event)
        self.is_async = is_async
        self.job: Job | None = None
        self.cancelled = False

    def __repr__(self) -> str:
        return f"<call {self.sid} {self.method or self.fn!r} {self.state}>"

    def start(self) -> bool:
        if not self.peer.alive:
            self.invocation.finish(cancelled=True)  # its caller is gone: it never runs
            self._move(DONE)
            self.peer.forget(self)
            return False
        if self.invocation.deadline is not None and self._expired_in_queue():
            return False
        try:
            self.job = self.instance.worker.submit(self._run, on_done=self._on_done)
        except ExecutorStateError as exc:
            self.outcome(exc)
            self._move(DONE)
            self.peer.fail(self.sid, exc)
            self.peer.forget(self)
            return False
        self._move(RUNNING)
        return True

    def _run(self) -> Any:  # in the worker thread
        if self.invocation.expired():  # it waited behind the jobs handed on before it
            raise self.invocation.deadline_error("queued")
        if self.is_async:  # the worker awaits it: the invocation is set inside
            return self._arun()
        token = current.set(self.invocation)
        self.invocation.start()
        try:
            if self.method is None:
                return self.fn()
            return self.fn(self.instance.obj, *self.args, **self.kwargs)
        finally:
            current.reset(token)
            observation = self.instance.observation
            if observation is not None and self.method is not None:
                observation.check()  # here, in its thread, before its result goes back

    async def _arun(self) -> Any:  # in the worker thread's own loop
        token = current.set(self.invocation)
        self.invocation.start()
        try:
            with self._deadline_scope():
                return await self.fn(self.instance.obj, *self.args, **self.kwargs)
            raise self.invocation.deadline_error("running")  # the scope ended it
        finally:
            current.reset(token)
            observation = self.instance.observation
            if observation is not None:
                observation.check()

    def _on_done(self, job: Job) -> None:  # on the server loop, in completion order
        # The job refers back to this call: without the cycle, the arguments
        # and the result (maybe large buffers) go as soon as the reply is sent,
        # not at the next garbage collection.
        self.job = None
        peer = self.peer
        try:
            try:
                value = job.result()
            except BaseException as exc:  # noqa: BLE001 - any outcome of user code is the caller's
                error = exc
                if self.cancelled and job.state == "cancelled":
                    error = self._cancelled_error(started=self.is_async)
                self.outcome(error)
                self._move(DONE)
                peer.fail(self.sid, error)
            else:
                self._move(DONE)
                self._answer(value)
            peer.forget(self)
        finally:
            self.instance.finish(self)

    def _answer(self, value: Any) -> None:
        """Reply with ``value`` and tell the "execute" channel."""
        self.peer.reply(self.sid, value)
        if self.method is not None:
            self.instance.publish_execute(self.method, self.args, self.kwargs, value)

    def on_cancel(self) -> None:
        # Queued (here or in the worker): it never starts. Running: a sync one
        # finishes and its result is sent; an async one is cancelled where it runs.
        if self.state == QUEUED and self.instance.remove(self):
            self.invocation.finish(cancelled=True)
            self._move(DONE)
            self.peer.fail(self.sid, self._cancelled_error(started=False))
            self.peer.forget(self)
        elif self.state == RUNNING and self.job is not None:
            self.invocation.cancel()  # a sync method stops at its next check_cancelled()
            if self.is_async or self.job.state == "queued":
                self.cancelled = True
                self.job.cancel()  # its on_done answers it

    def abandon(self) -> bool:
        self.on_cancel()  # nothing is sent: the connection is going away
        return False  # a running sync call is not waited for: its result is dropped

    def release(self) -> None:
        self.on_cancel()


class InlineCall(SyncCall):
    """A sync method declared non-blocking (``apply_executor(blocking=False)``).

    It runs on the server's loop when its turn in the instance's FIFO comes
    (after the calls before it, threaded ones included, have finished), and
    is answered at once: no hop to the instance's thread and back.
    """

    __slots__ = ()
    pipelined = False

    def start(self) -> bool:
        peer = self.peer
        if not peer.alive:
            self.invocation.finish(cancelled=True)
            self._move(DONE)
        elif self.invocation.deadline is not None and self._expired_in_queue():
            return False
        else:
            try:
                value = self._run()
            except BaseException as exc:  # any outcome of user code is the caller's
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.outcome(exc)
                self._move(DONE)
                peer.fail(self.sid, exc)
            else:
                self._move(DONE)
                self._answer(value)
            if self.instance.observation is not None:
                self.instance.check_next()  # it ran on the loop: read its attributes next
        peer.forget(self)
        return False  # already finished: the next entry may start


class AsyncCall(RuntimeCall, Entry):
    """An async method, run by the connection's runner for the instance."""

    __slots__ = (
        "args",
        "cancelled",
        "fn",
        "instance",
        "kwargs",
        "method",
        "runner",
        "scope",
    )

    def __init__(
        self,
        peer: Peer,
        sid: int,
        instance: Instance,
        marker: RemoteMethod,
        args: list[Any],
        kwargs: dict[str, Any],
        runner: Runner,
    ) -> None:
        RuntimeCall.__init__(self, peer, sid, QUEUED, instance.name, marker.name)
        self.instance = instance
        self.fn = marker.func
        self.method = marker.name
        self.args = args
        self.kwargs = kwargs
        self.runner = runner
        self.cancelled = False
        self.scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<async call {self.sid} {self.method} {self.state}>"

    def start(self) -> bool:
        if not self.peer.alive or not self.runner.alive:
            self.invocation.finish(cancelled=True)
            self._move(DONE)
            self.peer.forget(self)
            return False
        self._move(RUNNING)
        self.runner.push(self)
        return True

    async def run(self) -> None:
        peer = self.peer
        try:
            if self.cancelled or not peer.alive:  # cancelled before it started: never starts
                self.invocation.finish(cancelled=True)
                peer.fail(self.sid, self._cancelled_error(started=False))
                return
            if self.invocation.expired():
                error = self.invocation.deadline_error("queued")
                self.outcome(error)
                peer.fail(self.sid, error)
                return
            with self._deadline_scope() as scope:
                self.scope = scope
                token = current.set(self.invocation)
                self.invocation.start()
                try:
                    value = await self.fn(self.instance.obj, *self.args, **self.kwargs)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:  # noqa: BLE001 - any outcome of user code is the caller's
                    self.outcome(exc)
                    peer.fail(self.sid, exc)
                    return
                finally:
                    current.reset(token)
            self.scope = None
            if scope.cancelled_caught:
                error = (
                    self._cancelled_error(started=True)
                    if self.cancelled
                    else self.invocation.deadline_error("running")
                )
                self.invocation.finish(error, cancelled=True)
                peer.fail(self.sid, error)
                return
            peer.reply(self.sid, value)
            self.instance.publish_execute(self.method, self.args, self.kwargs, value)
        except BaseException:
            self.invocation.finish(cancelled=True)  # the peer's tasks are going away
            raise
        finally:
            self._move(DONE)
            peer.forget(self)
            if self.instance.observation is not None:
                self.instance.check_next()  # it ran on the loop: read its attributes next
            self.instance.finish(self)

    async def abort(self) -> None:
        """The runner is going away before it could run this call."""
        self.invocation.finish(cancelled=True)
        self._move(DONE)
        self.peer.forget(self)
        self.instance.finish(self)

    def on_cancel(self) -> None:
        if self.state == QUEUED:
            if self.instance.remove(self):
                self.invocation.finish(cancelled=True)
                self._move(DONE)
                self.peer.fail(self.sid, self._cancelled_error(started=False))
                self.peer.forget(self)
            return
        self.cancelled = True
        self.invocation.cancel()
        if self.scope is not None:
            self.scope.cancel()

    def abandon(self) -> bool:
        if self.state == QUEUED:
            if self.instance.remove(self):
                self.invocation.finish(cancelled=True)
                self._move(DONE)
                self.peer.forget(self)
            return False
        if self.state == DONE:
            return False
        self.on_cancel()
        return True

    def release(self) -> None:
        if self.state == QUEUED and self.instance.remove(self):
            self.invocation.finish(cancelled=True)
            self._move(DONE)


class StreamCall(RuntimeCall, Entry):
    """A generator call: steps of at most the granted credit, in the instance's FIFO."""

    moves = _STREAM_MOVES
    __slots__ = (
        "args",
        "buffer",
        "error",
        "exhausted",
        "fn",
        "gen",
        "gen_closed",
        "instance",
        "is_async",
        "job",
        "kwargs",
        "lock",
        "method",
        "on_runner",
        "runner",
        "scope",
        "send_failed",
        "stop",
        "wants_flush",
    )

    def __init__(
        self,
        peer: Peer,
        sid: int,
        instance: Instance,
        marker: RemoteMethod,
        args: list[Any],
        kwargs: dict[str, Any],
        runner: Runner | None,
    ) -> None:
        RuntimeCall.__init__(self, peer, sid, PARKED, instance.name, marker.name)
        self.instance = instance
        self.fn = marker.func
        self.method = marker.name
        self.is_async = marker.is_async
        # Async steps run on the peer's runner, unless the instance's thread has a loop.
        self.on_runner = marker.is_async and not instance.async_in_thread
        self.job: Job | None = None  # the step running in the instance's thread
        self.args = args
        self.kwargs = kwargs
        self.runner = runner
        self.gen: Any = None
        self.gen_closed = False  # finished, raised or closed: nothing left to close
        self.exhausted = False
        self.stop = False  # close the generator at the next item boundary
        self.error: BaseException | None = None
        self.send_failed = False
        self.scope: anyio.CancelScope | None = None
        # Items produced and not yet sent; the worker thread appends under ``lock``.
        self.lock = threading.Lock()
        self.buffer: list[Any] = []
        self.wants_flush = True  # the producer should ask the loop for a flush

    def __repr__(self) -> str:
        return f"<stream {self.sid} {self.method} {self.state}>"

    # -- lifecycle on the loop ----------------------------------------------------
    def begin(self) -> None:
        self.instance.streams.add(self)
        self._continue()

    def _continue(self) -> None:
        """Between steps: back to the tail of the FIFO if there is credit, else park."""
        if self.stop or (self.peer.alive and self._room() > 0):
            self._move(QUEUED)
            try:
                self.instance.enqueue(self)
            except UnknownInstanceError:
                self.drop(UnknownInstanceError(f"the instance {self.instance.name!r} was deleted"))
        else:
            self._move(PARKED)

    def on_credit(self) -> None:
        if self.state == PARKED and not self.stop:
            self._continue()

    def on_cancel(self) -> None:
        self._close_soon()

    def cancel_by_id(self) -> None:
        self.invocation.cancel(by_id=True)
        if self.state is not DONE and self.error is None:
            self.error = self.invocation.cancelled_error()  # what its consumer gets
        self._close_soon()

    def _close_soon(self) -> None:
        """Close the generator as the next thing the instance does, then end the stream."""
        if self.state == DONE:
            return
        self.stop = True
        if self.state == RUNNING:
            # An async step's generator sees the cancellation where it awaits;
            # a sync step checks ``stop`` after each item (and its generator's
            # code may check_cancelled() within one).
            self.invocation.cancel()
            if self.scope is not None:
                self.scope.cancel()
            elif self.is_async and self.job is not None:
                self.job.cancel()
            return
        if self.state == QUEUED and not self.instance.remove(self):
            return  # it is starting: it will see ``stop``
        if self.gen is None:  # never started: nothing to close
            self._end()
            return
        self._move(QUEUED)
        try:
            self.instance.enqueue_next(self)
        except UnknownInstanceError:
            self._end()

    def abandon(self) -> bool:
        if self.state == DONE:
            return False
        self._close_soon()
        return self.state != DONE

    def release(self) -> None:
        if self.state == DONE:
            return
        if self.on_runner:
            # No task is left to close it in: drop it (its finalizer runs on collection).
            if self.state == QUEUED:
                self.instance.remove(self)
            if self.state != RUNNING:
                self._end()
        else:  # closed in its thread later: that needs no connection
            self._close_soon()

    def _end(self) -> None:
        if self.state == DONE:
            return
        error, self.error = self.error, None  # no cycle through its traceback
        if error is not None:
            self.outcome(error)
        elif self.stop and not self.exhausted:
            self.invocation.finish(cancelled=True)  # closed before its end
        self._move(DONE)
        self.instance.streams.discard(self)
        if error is not None:
            self.peer.fail(self.sid, error)
        else:
            self.peer.end_stream(self.sid)
        self.peer.forget(self)

    def drop(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._end()

    def flush(self) -> None:
        """Send what is buffered as one frame (the writer calls this)."""
        with self.lock:
            items, self.buffer = self.buffer, []
            self.wants_flush = True
        if not items or self.state == DONE or self.send_failed:
            return
        try:
            self.peer.send_items(self.sid, items)
        except Exception as exc:  # noqa: BLE001 - an item cannot be encoded: fail the stream
            # Later items must not go out after the lost ones: the stream fails here.
            # The error is kept until the stream ends: its traceback's frames
            # must not keep the items (maybe large) alive until then.
            del items
            traceback.clear_frames(exc.__traceback__)
            self.send_failed = True
            self.error = self.error or exc
            self.stop = True
            if self.scope is not None:
                self.scope.cancel()

    def _request_flush(self) -> None:  # on the loop, from the worker thread
        try:
            self.peer.schedule_flush(self)
        except Exception:  # never raise into the loop's callback machinery
            logger.exception("could not schedule a flush of %r", self)

    # -- one step ---------------------------------------------------------------
    def start(self) -> bool:
        if self.state == DONE:
            return False
        if self.gen is None and not self.stop and self.invocation.expired():
            self.error = self.invocation.deadline_error("queued")
            self.stop = True
            self._end()
            return False
        if self.on_runner:
            if self.runner is None or not self.runner.alive or (self.stop and self.gen is None):
                self._end()
                return False
            self._move(RUNNING)
            self.runner.push(self)
            return True
        credit = self._room() if self.peer.alive else 0
        if not self.stop and credit <= 0:
            self._move(PARKED)
            return False
        if self.stop and self.gen is None:
            self._end()
            return False
        return self._submit(credit)

    def _room(self) -> int:
        """Items the next step may produce: what the peer allows, less those
        produced and not sent yet (a flush may still be on its way)."""
        return self.peer.credit(self.sid) - len(self.buffer)

    def _submit(self, count: int) -> bool:
        step = self._astep_in_thread if self.is_async else self._step_in_thread
        try:
            self.job = self.instance.worker.submit(step, count, on_done=self._step_done)
        except ExecutorStateError as exc:
            self.gen_closed = True
            self.error = self.error or exc
            self._end()
            return False
        self._move(RUNNING)
        return True

    def _emit(self, item: Any) -> None:  # in the worker thread
        """Buffer ``item`` and, first after a flush, ask the peer's loop to send."""
        with self.lock:
            self.buffer.append(item)
            notify, self.wants_flush = self.wants_flush, False
        if notify:
            try:
                self.peer.call_soon(self._request_flush)
            except Exception:  # noqa: BLE001 - the loop is gone: nobody reads the items
                self.stop = True

    def _step_in_thread(self, count: int) -> None:
        token = current.set(self.invocation)
        self.invocation.start()
        try:
            self._sync_step(count)
        finally:
            current.reset(token)
            observation = self.instance.observation
            if observation is not None:
                observation.check()

    def _sync_step(self, count: int) -> None:
        gen = self.gen
        if not self.stop:
            if gen is None:
                gen = self.gen = self.fn(self.instance.obj, *self.args, **self.kwargs)
            emit = self._emit
            instance = self.instance
            for _ in range(count):
                if self.stop:
                    break
                try:
                    item = next(gen)
                except StopIteration:
                    self.exhausted = self.gen_closed = True
                    return
                except BaseException:
                    self.gen_closed = True
                    raise
                emit(item)
                if instance.observation is not None:
                    self._observe_item()
        if self.stop and gen is not None and not self.gen_closed:
            self.gen_closed = True
            gen.close()  # its ``finally`` runs here, in the instance's thread

    async def _astep_in_thread(self, count: int) -> None:
        """``_step_in_thread`` for an async generator, in the worker's own loop."""
        token = current.set(self.invocation)
        self.invocation.start()
        try:
            await self._async_step(count)
        finally:
            current.reset(token)
            observation = self.instance.observation
            if observation is not None:
                observation.check()

    async def _async_step(self, count: int) -> None:
        gen = self.gen
        if not self.stop:
            if gen is None:
                gen = self.gen = self.fn(self.instance.obj, *self.args, **self.kwargs)
            emit = self._emit
            instance = self.instance
            for _ in range(count):
                if self.stop:
                    break
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    self.exhausted = self.gen_closed = True
                    return
                except BaseException:  # a cancellation too: the generator is over
                    self.gen_closed = True
                    raise
                emit(item)
                if instance.observation is not None:
                    self._observe_item()
        if self.stop and gen is not None and not self.gen_closed:
            self.gen_closed = True
            await gen.aclose()  # its ``finally`` runs here, in the instance's thread

    def _observe_item(self) -> None:  # in the worker thread, after an item
        """Check the observed attributes; what changed goes out now, not at the
        step's end (a step may last as long as its generator's slowest items)."""
        observation = self.instance.observation
        if observation is not None and observation.check():
            try:
                self.peer.call_soon(observation.drain)
            except Exception:  # noqa: BLE001, S110 - the loop is gone: nobody observes
                pass

    def _step_done(self, job: Job) -> None:  # on the loop
        instance = self.instance
        self.job = None
        try:
            if job.state == "cancelled" and self.stop:
                pass  # stopped by ``_close_soon``: closed below if it never ran
            else:
                try:
                    job.result()
                except InvocationCancelled:
                    self.gen_closed = True  # stopped as asked: not an error
                    if not self.stop:
                        self.error = self.error or self.invocation.cancelled_error()
                except BaseException as exc:  # noqa: BLE001 - any outcome of user code is the consumer's
                    self.gen_closed = True
                    if self.error is None:
                        self.error = exc
            self.flush()
            if (
                (self.error is not None or self.stop)
                and self.gen is not None
                and not self.gen_closed
            ):
                # Cancelled, or an item could not be sent: close it in its thread first.
                self.stop = True
                if self._submit(0):
                    return
            if self.error is not None or self.exhausted or self.stop:
                self._end()
                instance.finish(self)
                return
            instance.finish(self)
            self._continue()
        except Exception:
            logger.exception("stream %r failed", self)
            self.error = self.error or RemoteExecError("internal error in the stream")
            self._end()
            instance.finish(self)

    async def run(self) -> None:
        """One async step, in the peer's runner for the instance."""
        token = current.set(self.invocation)
        self.invocation.start()
        try:
            await self._runner_step()
        finally:
            current.reset(token)

    async def _observe_on_runner(self) -> None:
        """After an item of a step on the runner: check the observed attributes
        in the instance's thread (this step holds its turn) and send what changed."""
        observation = self.instance.observation
        if observation is None:
            return
        try:
            await self.instance.worker.submit(observation.check).wait()
        except ExecutorStateError:
            return  # the thread is stopping: the instance is going away
        observation.drain()

    def _step_over(self) -> None:
        """A step on the runner ended: observed attributes are read next, in the thread."""
        instance = self.instance
        if instance.observation is not None:
            instance.check_next()
        instance.finish(self)

    async def _runner_step(self) -> None:
        peer = self.peer
        try:
            count = self._room() if peer.alive else 0
            with anyio.CancelScope() as scope:
                self.scope = scope
                if self.stop:
                    scope.cancel()
                gen = self.gen
                if gen is None and not self.stop:
                    try:
                        gen = self.gen = self.fn(self.instance.obj, *self.args, **self.kwargs)
                    except Exception as exc:  # noqa: BLE001 - e.g. wrong arguments: the consumer's error
                        self.gen_closed = True
                        self.error = exc
                lock = self.lock
                for _ in range(count):
                    if self.stop or self.error is not None:
                        break
                    try:
                        item = await gen.__anext__()
                    except StopAsyncIteration:
                        self.exhausted = self.gen_closed = True
                        break
                    except anyio.get_cancelled_exc_class():
                        raise
                    except BaseException as exc:  # noqa: BLE001 - any outcome of user code is the consumer's
                        self.gen_closed = True
                        self.error = self.error or exc
                        break
                    with lock:
                        self.buffer.append(item)
                    peer.schedule_flush(self)
                    if self.instance.observation is not None:
                        await self._observe_on_runner()
            self.scope = None
            if scope.cancelled_caught:
                self.stop = True
            self.flush()
            if (self.error is not None or self.stop) and not self.gen_closed:
                await self._aclose()
            if self.error is not None or self.exhausted or self.stop:
                self._end()
                self._step_over()
                return
        except BaseException:
            # The connection's tasks are being cancelled: close the generator anyway.
            self.stop = True
            with anyio.CancelScope(shield=True):
                await self._aclose()
            self._end()
            self._step_over()
            raise
        self._step_over()
        self._continue()

    async def _aclose(self) -> None:
        gen, self.gen_closed = self.gen, True
        if gen is None:
            return
        with anyio.move_on_after(self.instance.close_grace):
            try:
                await gen.aclose()
            except Exception as exc:  # noqa: BLE001 - a finally that raises: the consumer's error
                self.error = self.error or exc

    async def abort(self) -> None:
        """The runner is going away before it could run this step."""
        self.stop = True
        self._move(RUNNING)
        with anyio.CancelScope(shield=True):
            if not self.gen_closed:
                await self._aclose()
        self._end()
        self.instance.finish(self)

    async def close_now(self, error: BaseException) -> None:
        """Close the generator while holding the instance's turn (instance deletion)."""
        self.stop = True
        if self.state == QUEUED:
            self.instance.remove(self)
        if self.gen is not None and not self.gen_closed:
            if self.on_runner:
                await self._aclose()
            else:  # in its thread (an async one in that thread's loop)
                self.gen_closed = True
                job = self.instance.worker.submit(
                    self.gen.aclose if self.is_async else self.gen.close
                )
                with anyio.move_on_after(self.instance.close_grace):
                    try:
                        await job.wait(cancel=False)
                    except Exception as exc:  # noqa: BLE001 - a finally that raises: the consumer's error
                        self.error = self.error or exc
        self.drop(error)


class Runner:
    """The task a peer keeps to run async entries of one instance on its loop."""

    __slots__ = ("alive", "event", "instance", "ready")

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.ready: deque[AsyncCall | StreamCall] = deque()
        self.event = anyio.Event()
        self.alive = True
        instance.runners.add(self)  # from now on, deleting the instance stops it

    def push(self, entry: AsyncCall | StreamCall) -> None:
        self.ready.append(entry)
        self.event.set()

    def stop(self) -> None:
        self.alive = False
        self.event.set()

    async def run(self) -> None:
        """Run entries until stopped; entries left over are aborted (their generators closed)."""
        try:
            while self.alive:
                if not self.ready:
                    self.event = anyio.Event()
                    await self.event.wait()
                    continue
                await self.ready.popleft().run()
        finally:
            self.alive = False
            self.instance.runners.discard(self)
            while self.ready:
                await self.ready.popleft().abort()


def runner_in(runners: dict[Instance, Runner], instance: Instance, tg: TaskGroup) -> Runner:
    """The live runner of ``instance`` in ``runners`` (a peer's), started in
    ``tg`` if it has none; it leaves ``runners`` when it ends."""
    runner = runners.get(instance)
    if runner is None or not runner.alive:
        runner = runners[instance] = Runner(instance)
        tg.start_soon(_run_runner, runners, runner)
    return runner


async def _run_runner(runners: dict[Instance, Runner], runner: Runner) -> None:
    try:
        await runner.run()
    finally:
        if runners.get(runner.instance) is runner:
            del runners[runner.instance]
