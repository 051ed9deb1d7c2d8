"""The calls a connection has in flight, one class per way of running.

Sync calls go to the instance's thread (or run on the loop if declared
non-blocking), async calls and generator steps to the connection's runner
task for the instance, server operations to a task of their own.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from remote_exec.exceptions import ExecutorStateError, RemoteExecError, UnknownInstanceError
from remote_exec.executor import RemoteMethod
from remote_exec.worker import Job

from .instances import Entry, Instance

if TYPE_CHECKING:
    from .connection import Connection


__all__ = [
    "AsyncCall",
    "CallCancelledError",
    "InlineCall",
    "OpCall",
    "Runner",
    "ServerCall",
    "StreamCall",
    "SyncCall",
]

logger = logging.getLogger("remote_exec.server")


QUEUED = "queued"
RUNNING = "running"
PARKED = "parked"
DONE = "done"


class CallCancelledError(RemoteExecError):
    """The client cancelled the call before it finished (the reply frees its id)."""


class ServerCall:
    """A call in flight on a connection (tracked until its work is over)."""

    __slots__ = ("conn", "sid")

    def __init__(self, conn: Connection, sid: int) -> None:
        self.conn = conn
        self.sid = sid

    def on_cancel(self) -> None:
        """The client sent ``Cancel``."""

    def on_credit(self) -> None:
        """The client granted more items."""

    def abandon(self) -> bool:
        """The connection is going away; True if it should wait for this call."""
        return False

    def release(self) -> None:
        """The connection is gone for good (its tasks are over)."""


class SyncCall(ServerCall, Entry):
    """A sync method (or property read) run in the instance's thread."""

    __slots__ = ("args", "cancelled", "fn", "instance", "job", "kwargs", "method", "state")
    pipelined = True

    def __init__(
        self,
        conn: Connection,
        sid: int,
        instance: Instance,
        fn: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        method: str | None,
    ) -> None:
        ServerCall.__init__(self, conn, sid)
        self.instance = instance
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.method = method  # None: not a method call (no "execute" event)
        self.state = QUEUED
        self.job: Job | None = None
        self.cancelled = False

    def __repr__(self) -> str:
        return f"<call {self.sid} {self.method or self.fn!r} {self.state}>"

    def start(self) -> bool:
        if not self.conn.alive:
            self.state = DONE
            self.conn.forget(self)
            return False
        try:
            self.job = self.instance.worker.submit(self._run, on_done=self._on_done)
        except ExecutorStateError as exc:
            self.state = DONE
            self.conn.fail(self.sid, exc)
            self.conn.forget(self)
            return False
        self.state = RUNNING
        return True

    def _run(self) -> Any:  # in the worker thread
        if self.method is None:
            return self.fn()
        return self.fn(self.instance.obj, *self.args, **self.kwargs)

    def _on_done(self, job: Job) -> None:  # on the server loop, in completion order
        self.state = DONE
        # The job refers back to this call: without the cycle, the arguments
        # and the result (maybe large buffers) go as soon as the reply is sent,
        # not at the next garbage collection.
        self.job = None
        conn = self.conn
        try:
            try:
                value = job.result()
            except BaseException as exc:  # noqa: BLE001 - any outcome of user code is the caller's
                error = exc
                if self.cancelled and job.state == "cancelled":
                    error = CallCancelledError("the call was cancelled before it started")
                conn.fail(self.sid, error)
            else:
                self._answer(value)
            conn.forget(self)
        finally:
            self.instance.finish(self)

    def _answer(self, value: Any) -> None:
        """Reply with ``value`` and tell the "execute" channel."""
        self.conn.reply(self.sid, value)
        if self.method is not None:
            self.conn.dispatcher.publish_execute(
                self.instance.name, self.method, self.args, self.kwargs, value
            )

    def on_cancel(self) -> None:
        # Queued (here or in the worker): it never starts. Running: it finishes
        # and its result is sent.
        if self.state == QUEUED and self.instance.remove(self):
            self.state = DONE
            self.conn.fail(self.sid, CallCancelledError("the call was cancelled before it started"))
            self.conn.forget(self)
        elif self.state == RUNNING and self.job is not None and self.job.state == "queued":
            self.cancelled = True
            self.job.cancel()  # its on_done answers it, now

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
        conn = self.conn
        self.state = DONE
        if conn.alive:
            try:
                value = self._run()
            except BaseException as exc:  # any outcome of user code is the caller's
                if isinstance(exc, KeyboardInterrupt):
                    raise
                conn.fail(self.sid, exc)
            else:
                self._answer(value)
        conn.forget(self)
        return False  # already finished: the next entry may start


class AsyncCall(ServerCall, Entry):
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
        "state",
    )

    def __init__(
        self,
        conn: Connection,
        sid: int,
        instance: Instance,
        marker: RemoteMethod,
        args: list[Any],
        kwargs: dict[str, Any],
        runner: Runner,
    ) -> None:
        ServerCall.__init__(self, conn, sid)
        self.instance = instance
        self.fn = marker.func
        self.method = marker.name
        self.args = args
        self.kwargs = kwargs
        self.runner = runner
        self.state = QUEUED
        self.cancelled = False
        self.scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<async call {self.sid} {self.method} {self.state}>"

    def start(self) -> bool:
        if not self.conn.alive or not self.runner.alive:
            self.state = DONE
            self.conn.forget(self)
            return False
        self.state = RUNNING
        self.runner.push(self)
        return True

    async def run(self) -> None:
        conn = self.conn
        try:
            if self.cancelled or not conn.alive:  # cancelled before it started: never starts
                conn.fail(self.sid, CallCancelledError("the call was cancelled before it started"))
                return
            with anyio.CancelScope() as scope:
                self.scope = scope
                try:
                    value = await self.fn(self.instance.obj, *self.args, **self.kwargs)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:  # noqa: BLE001 - any outcome of user code is the caller's
                    conn.fail(self.sid, exc)
                    return
            self.scope = None
            if scope.cancelled_caught:
                conn.fail(self.sid, CallCancelledError("the call was cancelled while it ran"))
                return
            conn.reply(self.sid, value)
            conn.dispatcher.publish_execute(
                self.instance.name, self.method, self.args, self.kwargs, value
            )
        finally:
            self.state = DONE
            conn.forget(self)
            self.instance.finish(self)

    async def abort(self) -> None:
        """The runner is going away before it could run this call."""
        self.state = DONE
        self.conn.forget(self)
        self.instance.finish(self)

    def on_cancel(self) -> None:
        if self.state == QUEUED:
            if self.instance.remove(self):
                self.state = DONE
                self.conn.fail(
                    self.sid, CallCancelledError("the call was cancelled before it started")
                )
                self.conn.forget(self)
            return
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def abandon(self) -> bool:
        if self.state == QUEUED:
            if self.instance.remove(self):
                self.state = DONE
                self.conn.forget(self)
            return False
        if self.state == DONE:
            return False
        self.on_cancel()
        return True

    def release(self) -> None:
        if self.state == QUEUED and self.instance.remove(self):
            self.state = DONE


class StreamCall(ServerCall, Entry):
    """A generator call: steps of at most the granted credit, in the instance's FIFO."""

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
        "kwargs",
        "lock",
        "method",
        "runner",
        "scope",
        "send_failed",
        "state",
        "stop",
        "wants_flush",
    )

    def __init__(
        self,
        conn: Connection,
        sid: int,
        instance: Instance,
        marker: RemoteMethod,
        args: list[Any],
        kwargs: dict[str, Any],
        runner: Runner | None,
    ) -> None:
        ServerCall.__init__(self, conn, sid)
        self.instance = instance
        self.fn = marker.func
        self.method = marker.name
        self.is_async = marker.is_async
        self.args = args
        self.kwargs = kwargs
        self.runner = runner
        self.state = PARKED
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
        if self.stop or (self.conn.alive and self.conn.rpc.credit(self.sid) > 0):
            self.state = QUEUED
            try:
                self.instance.enqueue(self)
            except UnknownInstanceError:
                self.fail_deleted()
        else:
            self.state = PARKED

    def on_credit(self) -> None:
        if self.state == PARKED and not self.stop:
            self._continue()

    def on_cancel(self) -> None:
        self._close_soon()

    def _close_soon(self) -> None:
        """Close the generator as the next thing the instance does, then end the stream."""
        if self.state == DONE:
            return
        self.stop = True
        if self.state == RUNNING:
            if self.scope is not None:  # async step: its generator sees the cancellation
                self.scope.cancel()
            return  # a sync step checks ``stop`` after each item
        if self.state == QUEUED and not self.instance.remove(self):
            return  # it is starting: it will see ``stop``
        if self.gen is None:  # never started: nothing to close
            self._end()
            return
        self.state = QUEUED
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
        if self.is_async:
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
        self.state = DONE
        self.instance.streams.discard(self)
        if self.error is not None:
            self.conn.fail(self.sid, self.error)
        else:
            self.conn.end_stream(self.sid)
        self.conn.forget(self)

    def fail_deleted(self) -> None:
        if self.error is None:
            self.error = UnknownInstanceError(f"the instance {self.instance.name!r} was deleted")
        self._end()

    def flush(self) -> None:
        """Send what is buffered as one frame (the writer calls this)."""
        with self.lock:
            items, self.buffer = self.buffer, []
            self.wants_flush = True
        if not items or self.state == DONE or self.send_failed:
            return
        try:
            self.conn.send_items(self.sid, items)
        except Exception as exc:  # noqa: BLE001 - an item cannot be encoded: fail the stream
            # Later items must not go out after the lost ones: the stream fails here.
            self.send_failed = True
            self.error = self.error or exc
            self.stop = True
            if self.scope is not None:
                self.scope.cancel()

    def _request_flush(self) -> None:  # on the loop, from the worker thread
        try:
            self.conn.schedule_flush(self)
        except Exception:  # never raise into the loop's callback machinery
            logger.exception("could not schedule a flush of %r", self)

    # -- one step ---------------------------------------------------------------
    def start(self) -> bool:
        if self.state == DONE:
            return False
        if self.is_async:
            if self.runner is None or not self.runner.alive or (self.stop and self.gen is None):
                self._end()
                return False
            self.state = RUNNING
            self.runner.push(self)
            return True
        credit = self.conn.rpc.credit(self.sid) if self.conn.alive else 0
        if not self.stop and credit <= 0:
            self.state = PARKED
            return False
        if self.stop and self.gen is None:
            self._end()
            return False
        return self._submit(credit)

    def _submit(self, count: int) -> bool:
        try:
            self.instance.worker.submit(self._step_in_thread, count, on_done=self._step_done)
        except ExecutorStateError as exc:
            self.gen_closed = True
            self.error = self.error or exc
            self._end()
            return False
        self.state = RUNNING
        return True

    def _step_in_thread(self, count: int) -> None:
        gen = self.gen
        if not self.stop:
            if gen is None:
                gen = self.gen = self.fn(self.instance.obj, *self.args, **self.kwargs)
            call_soon = self.conn.call_soon
            lock = self.lock
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
                with lock:
                    self.buffer.append(item)
                    notify, self.wants_flush = self.wants_flush, False
                if notify:
                    try:
                        call_soon(self._request_flush)
                    except Exception:  # noqa: BLE001 - the loop is gone: nobody reads the items
                        self.stop = True
        if self.stop and gen is not None and not self.gen_closed:
            self.gen_closed = True
            gen.close()  # its ``finally`` runs here, in the instance's thread

    def _step_done(self, job: Job) -> None:  # on the loop
        instance = self.instance
        try:
            try:
                job.result()
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
        """One async step, in the connection's runner for the instance."""
        conn = self.conn
        try:
            count = conn.rpc.credit(self.sid) if conn.alive else 0
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
                    conn.schedule_flush(self)
            self.scope = None
            if scope.cancelled_caught:
                self.stop = True
            self.flush()
            if (self.error is not None or self.stop) and not self.gen_closed:
                await self._aclose()
            if self.error is not None or self.exhausted or self.stop:
                self._end()
                self.instance.finish(self)
                return
        except BaseException:
            # The connection's tasks are being cancelled: close the generator anyway.
            self.stop = True
            with anyio.CancelScope(shield=True):
                await self._aclose()
            self._end()
            self.instance.finish(self)
            raise
        self.instance.finish(self)
        self._continue()

    async def _aclose(self) -> None:
        gen, self.gen_closed = self.gen, True
        if gen is None:
            return
        with anyio.move_on_after(self.conn.dispatcher.close_grace):
            try:
                await gen.aclose()
            except Exception as exc:  # noqa: BLE001 - a finally that raises: the consumer's error
                self.error = self.error or exc

    async def abort(self) -> None:
        """The runner is going away before it could run this step."""
        self.stop = True
        self.state = RUNNING
        with anyio.CancelScope(shield=True):
            if not self.gen_closed:
                await self._aclose()
        self._end()
        self.instance.finish(self)

    async def close_now(self) -> None:
        """Close the generator while holding the instance's turn (instance deletion)."""
        self.stop = True
        if self.state == QUEUED:
            self.instance.remove(self)
        if self.gen is not None and not self.gen_closed:
            if self.is_async:
                await self._aclose()
            else:
                self.gen_closed = True
                job = self.instance.worker.submit(self.gen.close)
                with anyio.move_on_after(self.conn.dispatcher.close_grace):
                    try:
                        await job.wait(cancel=False)
                    except Exception as exc:  # noqa: BLE001 - a finally that raises: the consumer's error
                        self.error = self.error or exc
        self.fail_deleted()


class Runner:
    """The task a connection keeps to run async entries of one instance."""

    __slots__ = ("alive", "conn", "event", "instance", "ready")

    def __init__(self, conn: Connection, instance: Instance) -> None:
        self.conn = conn
        self.instance = instance
        self.ready: deque[AsyncCall | StreamCall] = deque()
        self.event = anyio.Event()
        self.alive = True

    def push(self, entry: AsyncCall | StreamCall) -> None:
        self.ready.append(entry)
        self.event.set()

    def stop(self) -> None:
        self.alive = False
        self.event.set()

    async def run(self) -> None:
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
            if self.conn.runners.get(self.instance) is self:
                del self.conn.runners[self.instance]
            while self.ready:
                await self.ready.popleft().abort()


class OpCall(ServerCall):
    """A server operation that runs as a task of the connection."""

    __slots__ = ("cancelled", "credit_event", "scope", "stream")

    def __init__(self, conn: Connection, sid: int, stream: bool) -> None:
        super().__init__(conn, sid)
        self.stream = stream
        self.scope: anyio.CancelScope | None = None
        self.credit_event = anyio.Event()
        # Its task may not have started yet when a Cancel (or the end of the
        # connection) arrives: remembered here, it cancels the task's scope at once.
        self.cancelled = False

    def on_cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def on_credit(self) -> None:
        self.credit_event.set()

    async def wait_credit(self) -> None:
        while self.conn.rpc.credit(self.sid) <= 0:
            self.credit_event = anyio.Event()
            await self.credit_event.wait()

    def abandon(self) -> bool:
        self.on_cancel()
        return True
