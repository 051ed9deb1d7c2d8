"""The request dispatcher: calls from connections to named instances.

One ``Dispatcher`` serves every connection of a server (the daemon's websockets,
or the process executor's single socket). Instances are server-wide: any
connection may call any instance by name.

Ordering. Each instance has one FIFO of *entries* (method calls, generator
steps, internal jobs and exclusive turns). Only the head entry is active; when
it finishes, the next one starts. Nothing relies on lock fairness or on the
order in which the scheduler wakes tasks (trio shuffles it): the queue *is* the
order. An entry starts in one of three ways:

* sync work (sync methods, sync generator steps, property reads) is submitted
  to the instance's ``InstanceWorker`` thread; its ``on_done`` hand-off, on the
  server loop, sends the reply and starts the next entry. No task is spawned
  for a sync call: this is the hot path.
* async work (async methods, async generator steps) is handed to the runner
  task that the calling connection keeps for that instance; it runs on the
  server loop inside a cancel scope.
* an exclusive turn (``delete_instance``) wakes the task that waits for it.

Streams. A generator call is a stream entry that produces at most the credit
the client granted per step, then goes back to the tail of the FIFO (other calls
to the instance interleave between steps) or parks until a ``Credit`` arrives.
Items go to the stream's buffer as they are produced; the connection's writer
task drains every buffer into one ``StreamItems`` frame per stream whenever it
gets to run, so items ready together travel together and a slow consumer
stops the producer (no credit, no step).

Cancellation. A ``Cancel`` drops a queued call (answered with a failure so its
id is freed), cancels a running async method, lets a running sync method
finish (its result is still sent), and closes a stream's generator where it
runs (its ``finally`` runs) before ending the stream with ``StreamEnd``. A
connection that goes away is wound down the same way, without replies.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hashlib
import importlib
import importlib.util
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import sniffio
import trio
from anyio.abc import TaskGroup

from remote_exec import registry as registry_module
from remote_exec.events import EventHub
from remote_exec.exceptions import (
    ConnectionLostError,
    DuplicateInstanceError,
    ExecutorStateError,
    NotAllowedError,
    ProtocolError,
    RemoteExecError,
    SubscriberOverflowError,
    UnknownInstanceError,
    exception_type_name,
)
from remote_exec.executor import RemoteMethod, check_channel, config_of, remote_method
from remote_exec.framing import pack_frames
from remote_exec.messages import Call, Cancel, Close, Credit, Message
from remote_exec.protocol import Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry
from remote_exec.transport import FrameTransport
from remote_exec.worker import InstanceWorker, Job

__all__ = ["CallCancelledError", "Dispatcher"]

logger = logging.getLogger("remote_exec.server")

_QUEUED = "queued"
_RUNNING = "running"
_PARKED = "parked"
_DONE = "done"


class CallCancelledError(RemoteExecError):
    """The client cancelled the call before it finished (the reply frees its id)."""


def _threadsafe_call_soon() -> Callable[..., object]:
    """The running loop's thread-safe, FIFO, non-blocking entry point."""
    if sniffio.current_async_library() == "trio":
        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


def _valid_module_name(module: str) -> bool:
    return bool(module) and all(part.isidentifier() for part in module.split("."))


# -- instances and their FIFO ------------------------------------------------------


class _Entry:
    """One item of an instance's FIFO."""

    __slots__ = ()

    # Sync work that may be handed to the worker thread while the entries
    # before it still run there: the worker's own FIFO keeps them in order.
    pipelined = False

    def start(self) -> bool:
        """Called when the entry becomes the head; False: it is not running
        (skipped, or already finished) and leaves the queue."""
        raise NotImplementedError


class _Instance:
    """A held object, its worker thread and its FIFO.

    The first ``active`` entries of ``queue`` have started: either one entry
    alone, or a run of pipelined sync entries already handed to the worker
    thread (which runs them one at a time, in order). They finish in order.
    """

    __slots__ = (
        "active",
        "deleted",
        "key",
        "name",
        "obj",
        "owner",
        "queue",
        "runners",
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
    ) -> None:
        self.name = name
        self.obj = obj
        self.key = key  # (module, qualname) as the client asked for it
        self.worker = worker
        # The names the creating connection holds (``max_instances``): the set,
        # not the connection, so that an instance never keeps a dead one alive.
        self.owner = owner
        self.queue: deque[_Entry] = deque()
        self.active = 0  # how many entries at the front have started
        self.deleted = False
        self.streams: set[_Stream] = set()  # streams whose generator may be alive
        self.runners: set[_Runner] = set()

    def enqueue(self, entry: _Entry) -> None:
        if self.deleted:
            raise UnknownInstanceError(f"the instance {self.name!r} was deleted")
        self.queue.append(entry)
        self._advance()

    def enqueue_next(self, entry: _Entry) -> None:
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

    def remove(self, entry: _Entry) -> bool:
        """Take a waiting (not started) entry out of the queue."""
        queue = self.queue
        for index in range(self.active, len(queue)):
            if queue[index] is entry:
                del queue[index]
                return True
        return False

    def finish(self, entry: _Entry) -> None:
        """A started entry is done: start what may start next."""
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


class _Internal(_Entry):
    """A sync function run in the instance's thread for a server task."""

    __slots__ = ("done", "error", "fn", "instance", "job", "value")
    pipelined = True

    def __init__(self, instance: _Instance, fn: Callable[[], Any]) -> None:
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


class _Turn(_Entry):
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
async def _exclusive(instance: _Instance) -> AsyncIterator[None]:
    """Wait for a turn on ``instance``; nothing else runs on it inside the block."""
    turn = _Turn()
    instance.enqueue(turn)
    try:
        await turn.event.wait()
        yield
    finally:
        if turn.started:
            instance.finish(turn)
        else:
            instance.remove(turn)


# -- calls --------------------------------------------------------------------------


class _Call:
    """A call in flight on a connection (tracked until its work is over)."""

    __slots__ = ("conn", "sid")

    def __init__(self, conn: _Connection, sid: int) -> None:
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


class _SyncCall(_Call, _Entry):
    """A sync method (or property read) run in the instance's thread."""

    __slots__ = ("args", "cancelled", "fn", "instance", "job", "kwargs", "method", "state")
    pipelined = True

    def __init__(
        self,
        conn: _Connection,
        sid: int,
        instance: _Instance,
        fn: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        method: str | None,
    ) -> None:
        _Call.__init__(self, conn, sid)
        self.instance = instance
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.method = method  # None: not a method call (no "execute" event)
        self.state = _QUEUED
        self.job: Job | None = None
        self.cancelled = False

    def __repr__(self) -> str:
        return f"<call {self.sid} {self.method or self.fn!r} {self.state}>"

    def start(self) -> bool:
        if not self.conn.alive:
            self.state = _DONE
            self.conn.forget(self)
            return False
        try:
            self.job = self.instance.worker.submit(self._run, on_done=self._on_done)
        except ExecutorStateError as exc:
            self.state = _DONE
            self.conn.fail(self.sid, exc)
            self.conn.forget(self)
            return False
        self.state = _RUNNING
        return True

    def _run(self) -> Any:  # in the worker thread
        if self.method is None:
            return self.fn()
        return self.fn(self.instance.obj, *self.args, **self.kwargs)

    def _on_done(self, job: Job) -> None:  # on the server loop, in completion order
        self.state = _DONE
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
        if self.state == _QUEUED and self.instance.remove(self):
            self.state = _DONE
            self.conn.fail(self.sid, CallCancelledError("the call was cancelled before it started"))
            self.conn.forget(self)
        elif self.state == _RUNNING and self.job is not None and self.job.state == "queued":
            self.cancelled = True
            self.job.cancel()  # its on_done answers it, now

    def abandon(self) -> bool:
        self.on_cancel()  # nothing is sent: the connection is going away
        return False  # a running sync call is not waited for: its result is dropped

    def release(self) -> None:
        self.on_cancel()


class _InlineCall(_SyncCall):
    """A sync method declared non-blocking (``apply_executor(blocking=False)``).

    It runs on the server's loop when its turn in the instance's FIFO comes
    (after the calls before it, threaded ones included, have finished), and
    is answered at once: no hop to the instance's thread and back.
    """

    __slots__ = ()
    pipelined = False

    def start(self) -> bool:
        conn = self.conn
        self.state = _DONE
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


class _AsyncCall(_Call, _Entry):
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
        conn: _Connection,
        sid: int,
        instance: _Instance,
        marker: RemoteMethod,
        args: list[Any],
        kwargs: dict[str, Any],
        runner: _Runner,
    ) -> None:
        _Call.__init__(self, conn, sid)
        self.instance = instance
        self.fn = marker.func
        self.method = marker.name
        self.args = args
        self.kwargs = kwargs
        self.runner = runner
        self.state = _QUEUED
        self.cancelled = False
        self.scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<async call {self.sid} {self.method} {self.state}>"

    def start(self) -> bool:
        if not self.conn.alive or not self.runner.alive:
            self.state = _DONE
            self.conn.forget(self)
            return False
        self.state = _RUNNING
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
            self.state = _DONE
            conn.forget(self)
            self.instance.finish(self)

    async def abort(self) -> None:
        """The runner is going away before it could run this call."""
        self.state = _DONE
        self.conn.forget(self)
        self.instance.finish(self)

    def on_cancel(self) -> None:
        if self.state == _QUEUED:
            if self.instance.remove(self):
                self.state = _DONE
                self.conn.fail(
                    self.sid, CallCancelledError("the call was cancelled before it started")
                )
                self.conn.forget(self)
            return
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def abandon(self) -> bool:
        if self.state == _QUEUED:
            if self.instance.remove(self):
                self.state = _DONE
                self.conn.forget(self)
            return False
        if self.state == _DONE:
            return False
        self.on_cancel()
        return True

    def release(self) -> None:
        if self.state == _QUEUED and self.instance.remove(self):
            self.state = _DONE


class _Stream(_Call, _Entry):
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
        conn: _Connection,
        sid: int,
        instance: _Instance,
        marker: RemoteMethod,
        args: list[Any],
        kwargs: dict[str, Any],
        runner: _Runner | None,
    ) -> None:
        _Call.__init__(self, conn, sid)
        self.instance = instance
        self.fn = marker.func
        self.method = marker.name
        self.is_async = marker.is_async
        self.args = args
        self.kwargs = kwargs
        self.runner = runner
        self.state = _PARKED
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
            self.state = _QUEUED
            try:
                self.instance.enqueue(self)
            except UnknownInstanceError:
                self.fail_deleted()
        else:
            self.state = _PARKED

    def on_credit(self) -> None:
        if self.state == _PARKED and not self.stop:
            self._continue()

    def on_cancel(self) -> None:
        self._close_soon()

    def _close_soon(self) -> None:
        """Close the generator as the next thing the instance does, then end the stream."""
        if self.state == _DONE:
            return
        self.stop = True
        if self.state == _RUNNING:
            if self.scope is not None:  # async step: its generator sees the cancellation
                self.scope.cancel()
            return  # a sync step checks ``stop`` after each item
        if self.state == _QUEUED and not self.instance.remove(self):
            return  # it is starting: it will see ``stop``
        if self.gen is None:  # never started: nothing to close
            self._end()
            return
        self.state = _QUEUED
        try:
            self.instance.enqueue_next(self)
        except UnknownInstanceError:
            self._end()

    def abandon(self) -> bool:
        if self.state == _DONE:
            return False
        self._close_soon()
        return self.state != _DONE

    def release(self) -> None:
        if self.state == _DONE:
            return
        if self.is_async:
            # No task is left to close it in: drop it (its finalizer runs on collection).
            if self.state == _QUEUED:
                self.instance.remove(self)
            if self.state != _RUNNING:
                self._end()
        else:  # closed in its thread later: that needs no connection
            self._close_soon()

    def _end(self) -> None:
        if self.state == _DONE:
            return
        self.state = _DONE
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
        if not items or self.state == _DONE or self.send_failed:
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
        if self.state == _DONE:
            return False
        if self.is_async:
            if self.runner is None or not self.runner.alive or (self.stop and self.gen is None):
                self._end()
                return False
            self.state = _RUNNING
            self.runner.push(self)
            return True
        credit = self.conn.rpc.credit(self.sid) if self.conn.alive else 0
        if not self.stop and credit <= 0:
            self.state = _PARKED
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
        self.state = _RUNNING
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
        self.state = _RUNNING
        with anyio.CancelScope(shield=True):
            if not self.gen_closed:
                await self._aclose()
        self._end()
        self.instance.finish(self)

    async def close_now(self) -> None:
        """Close the generator while holding the instance's turn (instance deletion)."""
        self.stop = True
        if self.state == _QUEUED:
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


class _Runner:
    """The task a connection keeps to run async entries of one instance."""

    __slots__ = ("alive", "conn", "event", "instance", "ready")

    def __init__(self, conn: _Connection, instance: _Instance) -> None:
        self.conn = conn
        self.instance = instance
        self.ready: deque[_AsyncCall | _Stream] = deque()
        self.event = anyio.Event()
        self.alive = True

    def push(self, entry: _AsyncCall | _Stream) -> None:
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


class _OpCall(_Call):
    """A server operation that runs as a task of the connection."""

    __slots__ = ("cancelled", "credit_event", "scope", "stream")

    def __init__(self, conn: _Connection, sid: int, stream: bool) -> None:
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


_NO_REPLY = object()


# -- connections --------------------------------------------------------------------


class _Connection:
    """One client connection: its protocol state, reader, writer and calls."""

    def __init__(self, dispatcher: Dispatcher, transport: FrameTransport, peer: str) -> None:
        self.dispatcher = dispatcher
        self.transport = transport
        self.peer = peer
        self.rpc = RpcConnection(Side.SERVER, dispatcher.registry, limits=dispatcher.limits)
        self.call_soon = _threadsafe_call_soon()
        self.calls: dict[int, _Call] = {}
        self.runners: dict[_Instance, _Runner] = {}
        self.held: set[str] = set()  # instances this connection created (max_instances)
        self.creating = 0  # ... and is creating right now
        self.tg: TaskGroup | None = None
        self.alive = True  # False once the connection is going away: nothing more is sent
        self.reason = "the connection closed"
        self.finished = anyio.Event()
        self.reader_scope = anyio.CancelScope()
        # The backend's own Event class: ``anyio.Event()`` looks the backend up
        # on every call (2 µs), and the writer makes one per burst of replies.
        self._new_event: Callable[[], anyio.Event] = type(anyio.Event())
        self._wakeup = self._new_event()
        self._flushes: dict[_Stream, None] = {}  # streams with buffered items, in order
        self._sending = False
        self._writer_failed = False
        self._idle_waiters: list[anyio.Event] = []
        self._waiting: set[_Call] | None = None  # while winding down
        self._drained = anyio.Event()

    def __repr__(self) -> str:
        return f"<connection {self.peer or id(self)}>"

    # -- sending (all no-ops once the connection is going away) --------------------
    def schedule_flush(self, stream: _Stream) -> None:
        self._flushes[stream] = None
        self._wakeup.set()

    def _usable(self, sid: int) -> bool:
        return self.alive and not self.rpc.closed and self.rpc.is_open(sid)

    def reply(self, sid: int, value: Any) -> None:
        if not self._usable(sid):
            return
        try:
            self.rpc.send_result(sid, value)
        except Exception as exc:  # noqa: BLE001 - not encodable, or too large: the caller gets why
            self.fail(sid, exc)
            return
        self._wakeup.set()

    def fail(self, sid: int, exc: BaseException) -> None:
        if not self._usable(sid):
            return
        try:
            self.rpc.send_failure(sid, exc)
        except Exception:  # noqa: BLE001 - unprintable, or over the size cap
            fallback = RemoteExecError(
                f"{exception_type_name(exc)} (its message could not be sent)"
            )
            try:
                self.rpc.send_failure(sid, fallback)
            except Exception:
                logger.exception("could not send a failure for call %d", sid)
                return
        self._wakeup.set()

    def end_stream(self, sid: int) -> None:
        if not self._usable(sid):
            return
        self.rpc.send_stream_end(sid)
        self._wakeup.set()

    def send_items(self, sid: int, items: list[Any]) -> None:
        if not self._usable(sid):
            return
        self.rpc.send_items(sid, items)
        self._wakeup.set()

    def forget(self, call: _Call) -> None:
        """``call``'s work is over."""
        if self.calls.get(call.sid) is call:
            del self.calls[call.sid]
        waiting = self._waiting
        if waiting is not None:
            waiting.discard(call)
            if not waiting:
                self._drained.set()

    # -- the writer -------------------------------------------------------------
    async def write_loop(self) -> None:
        rpc = self.rpc
        try:
            while True:
                if self._flushes:
                    await self._settle()
                    streams = list(self._flushes)
                    self._flushes.clear()
                    for stream in streams:
                        stream.flush()
                if not rpc.has_data_to_send:
                    waiters, self._idle_waiters = self._idle_waiters, []
                    for waiter in waiters:
                        waiter.set()
                    self._wakeup = self._new_event()
                    await self._wakeup.wait()
                    continue
                self._sending = True
                await self._send_queued()
                self._sending = False
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if not isinstance(exc, ConnectionLostError):
                logger.exception("sending to %r failed", self)
            self._writer_failed = True
            self.alive = False
            self.reason = f"sending failed: {exc}"
            self.reader_scope.cancel()
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.set()

    async def _send_queued(self) -> None:
        """Replies queued together travel together: one message, one write.

        A function of its own, so that the last message sent (maybe a large
        result) is not kept alive by the writer's locals while it waits.
        """
        rpc = self.rpc
        for message in pack_frames(rpc.data_to_send(), rpc.limits.max_message_size):
            await self.transport.send_frame(message)

    async def _settle(self) -> None:
        """Let producers that are making progress finish their burst first.

        A producer that added items during one scheduling round is still going
        (an async generator between checkpoints, a thread in a loop); one that
        did not is waiting for something. Items ready together then travel in
        one frame. Other frames waiting to go out end the wait, and so does
        the end of a step (a step never produces more than its credit).
        """
        sizes = [len(stream.buffer) for stream in self._flushes]
        for _ in range(self.rpc.limits.max_credit):
            await anyio.lowlevel.checkpoint()
            if self.rpc.has_data_to_send:
                return
            now = [len(stream.buffer) for stream in self._flushes]
            if now == sizes:
                return
            sizes = now

    async def wait_sent(self) -> None:
        """Until everything queued so far was written."""
        if self._writer_failed or not (self._sending or self.rpc.has_data_to_send or self._flushes):
            return
        waiter = anyio.Event()
        self._idle_waiters.append(waiter)
        self._wakeup.set()
        await waiter.wait()

    # -- the reader -------------------------------------------------------------
    async def read_loop(self) -> None:
        rpc, transport = self.rpc, self.transport
        with self.reader_scope:
            try:
                while True:
                    self._handle_frame(await transport.receive_frame())
                    if not self.alive:
                        return
                    if rpc.has_data_to_send:  # e.g. a TooManyCalls reply the protocol made
                        self._wakeup.set()
            except ConnectionLostError:
                self.reason = "the client went away"
            except ProtocolError as exc:  # FrameError too: drop this connection only
                logger.warning("protocol error from %r, closing it: %s", self, exc)
                self.reason = f"protocol error: {exc}"
                try:
                    rpc.send_close(f"protocol error: {exc}")
                except Exception:  # noqa: BLE001, S110 - the connection is being dropped anyway
                    pass
                self._wakeup.set()
            except Exception as exc:  # a transport failing in an unexpected way
                logger.exception("receiving from %r failed", self)
                self.reason = f"receiving failed: {exc!r}"
        self.alive = False

    def _handle_frame(self, frame: bytes | bytearray | memoryview) -> None:
        """Act on one frame; its own function, so that no local keeps a frame
        (maybe large) or its messages alive while the reader waits for the next."""
        rpc = self.rpc
        rpc.receive_frame(frame)
        for message in rpc.events_received():
            try:
                _HANDLERS[type(message)](self, message)
            except Exception:  # a bug must not take the connection down
                logger.exception("could not handle %r from %r", message, self)

    def on_call(self, message: Message) -> None:
        assert isinstance(message, Call)
        try:
            self.dispatcher._dispatch_call(self, message)
        except Exception as exc:
            logger.exception("could not dispatch call %d", message.stream_id)
            self.calls.pop(message.stream_id, None)
            self.fail(message.stream_id, exc)

    def on_credit(self, message: Message) -> None:
        call = self.calls.get(message.stream_id)
        if call is not None:
            call.on_credit()

    def on_cancel(self, message: Message) -> None:
        call = self.calls.get(message.stream_id)
        if call is not None:
            call.on_cancel()

    def on_close(self, message: Message) -> None:
        assert isinstance(message, Close)
        self.alive = False
        self.reason = f"the client closed it ({message.reason or 'no reason given'})"

    # -- going away ---------------------------------------------------------------
    def runner_for(self, instance: _Instance) -> _Runner:
        runner = self.runners.get(instance)
        if runner is None or not runner.alive:
            assert self.tg is not None
            runner = self.runners[instance] = _Runner(self, instance)
            instance.runners.add(runner)
            self.tg.start_soon(runner.run)
        return runner

    def shutdown(self, reason: str) -> None:
        """Server shutdown: fail every open call, say goodbye, stop reading."""
        if self.alive:
            error = ConnectionLostError(reason)
            for sid in self.rpc.open_ids():
                self.fail(sid, error)
            try:
                self.rpc.send_close(reason)
            except ProtocolError:
                pass
            self._wakeup.set()
        self.alive = False
        self.reason = reason
        self.reader_scope.cancel()

    async def wind_down(self) -> None:
        """Cancel what this connection started and close its generators (bounded)."""
        self.alive = False
        waiting: set[_Call] = set()
        for call in list(self.calls.values()):
            try:
                if call.abandon() and self.calls.get(call.sid) is call:
                    waiting.add(call)
            except Exception:
                logger.exception("could not abandon %r", call)
        grace = self.dispatcher.close_grace
        if waiting:
            self._waiting = waiting
            with anyio.move_on_after(grace):
                await self._drained.wait()
        with anyio.move_on_after(grace):  # e.g. the Close after a protocol error
            await self.wait_sent()

    def release(self) -> None:
        self.alive = False
        for runner in list(self.runners.values()):
            runner.alive = False
        for call in list(self.calls.values()):
            try:
                call.release()
            except Exception:
                logger.exception("could not release %r", call)
        self.calls.clear()


_HANDLERS: dict[type, Callable[[_Connection, Message], None]] = {
    Call: _Connection.on_call,
    Credit: _Connection.on_credit,
    Cancel: _Connection.on_cancel,
    Close: _Connection.on_close,
}


# -- the dispatcher -----------------------------------------------------------------


class Dispatcher:
    """Serves connections: creates instances and runs their methods.

    Args:
        allow_modules: ``fnmatch`` patterns of the modules whose classes may be
            created, imported or registered (e.g. ``"myinstruments.*"``); a
            module off the list is never imported.
        allow_import_from_main: create classes defined in a client's
            ``__main__``, by importing the client's main file (given as a path
            on this machine) under a private module name.
        limits: message size, nesting depth and calls-in-flight caps per connection.
        max_queued_events: how many events a subscriber may lag behind before
            it is dropped with ``SubscriberOverflowError`` (default:
            ``limits.max_queued_events``).
        close_grace: how long a closing connection waits for its cancelled work
            and generators to finish, in seconds.
    """

    # Server operations: name -> (handler name, runs as a task, is a stream).
    _OPS: ClassVar[dict[str, tuple[str, bool, bool]]] = {
        "echo_clock": ("_op_echo_clock", False, False),
        "list_instances": ("_op_list_instances", False, False),
        "get_properties": ("_op_get_properties", False, False),
        "get_config": ("_op_get_config", False, False),
        "create_instance": ("_op_create_instance", True, False),
        "delete_instance": ("_op_delete_instance", True, False),
        "sleep": ("_op_sleep", True, False),
        "import_module": ("_op_import_module", True, False),
        "register_class": ("_op_register_class", True, False),
        "subscribe": ("_op_subscribe", True, True),
    }

    def __init__(
        self,
        *,
        allow_modules: Sequence[str] = (),
        allow_import_from_main: bool = False,
        limits: Limits | None = None,
        max_queued_events: int | None = None,
        close_grace: float = 5.0,
    ) -> None:
        if isinstance(allow_modules, str):
            raise TypeError("allow_modules must be a sequence of patterns, not one string")
        self.allow_modules = tuple(allow_modules)
        self.allow_import_from_main = allow_import_from_main
        self.limits = limits or Limits()
        self.close_grace = close_grace
        self.registry = InstanceRegistry()
        self.events = EventHub(
            self.limits.max_queued_events if max_queued_events is None else max_queued_events
        )
        self._instances: dict[str, _Instance] = {}
        self._creating: dict[str, anyio.Event] = {}
        self._connections: set[_Connection] = set()
        self._methods: dict[tuple[type, str], RemoteMethod] = {}
        self._main_modules: dict[str, ModuleType] = {}
        self._import_lock: anyio.Lock | None = None
        self._closed = False

    # -- public -----------------------------------------------------------------
    async def serve(self, transport: FrameTransport, *, peer: str = "") -> None:
        """Serve one connection until it closes (or the server shuts down).

        Never raises because of what the client sent; closes ``transport`` on return.
        """
        if self._closed:
            await self._refuse(transport)
            return
        conn = _Connection(self, transport, peer)
        self._connections.add(conn)
        logger.info("connection opened: %s", peer or "(unnamed peer)")
        try:
            async with anyio.create_task_group() as tg:
                conn.tg = tg
                tg.start_soon(conn.write_loop)
                await conn.read_loop()
                await conn.wind_down()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("internal error while serving %r", conn)
        finally:
            conn.tg = None
            conn.release()
            self._connections.discard(conn)
            with anyio.move_on_after(self.close_grace, shield=True):
                await transport.aclose()
            conn.finished.set()
            logger.info("connection closed: %s: %s", peer or "(unnamed peer)", conn.reason)

    async def aclose(self) -> None:
        """Shut the server down: fail in-flight calls, close connections, stop workers."""
        if self._closed:
            return
        self._closed = True
        connections = list(self._connections)
        for conn in connections:
            conn.shutdown("the server is shutting down")
        with anyio.move_on_after(2 * self.close_grace, shield=True):
            for conn in connections:
                await conn.finished.wait()
        instances = list(self._instances.values())
        self._instances.clear()
        for instance in instances:
            instance.deleted = True
            try:
                self.registry.remove_instance(instance.name)
            except UnknownInstanceError:
                pass
            for runner in list(instance.runners):
                runner.stop()
            with anyio.move_on_after(self.close_grace, shield=True):
                try:
                    await instance.worker.stop()
                except Exception:
                    logger.exception("the worker of %r failed to stop", instance.name)
        self.events.close()
        logger.info("dispatcher closed")

    def statistics(self) -> dict[str, Any]:
        """Connections, instances and calls in flight (for ``/instances`` and logs)."""
        return {
            "connections": len(self._connections),
            "peers": sorted(conn.peer for conn in self._connections),
            "instances": len(self._instances),
            "instance_names": list(self._instances),
            "calls_in_flight": sum(conn.rpc.in_flight for conn in self._connections),
            "queued": sum(instance.waiting() for instance in self._instances.values()),
            "subscribers": self.events.has_subscribers,
        }

    # -- internals --------------------------------------------------------------------
    async def _refuse(self, transport: FrameTransport) -> None:
        rpc = RpcConnection(Side.SERVER, self.registry, limits=self.limits)
        rpc.send_close("the server is shutting down")
        with anyio.move_on_after(self.close_grace, shield=True):
            try:
                for frame in rpc.data_to_send():
                    await transport.send_frame(frame)
            except Exception:  # noqa: BLE001, S110 - the connection is being refused anyway
                pass
            await transport.aclose()

    def publish_execute(
        self, name: str, method: str, args: list[Any], kwargs: dict[str, Any], result: Any
    ) -> None:
        events = self.events
        if events.has_subscribers:
            events.publish(
                name,
                "execute",
                {"method": method, "args": args, "kwargs": kwargs, "result": result},
            )

    def _method(self, cls: type, name: str) -> RemoteMethod:
        key = (cls, name)
        marker = self._methods.get(key)
        if marker is None:
            marker = remote_method(cls, name)  # raises NotAllowedError
            self._methods[key] = marker
        return marker

    def _dispatch_call(self, conn: _Connection, message: Call) -> None:
        sid = message.stream_id
        if not conn.alive:
            return
        if not message.target:
            self._dispatch_op(conn, message)
            return
        instance = self._instances.get(message.target)
        if instance is None:
            conn.fail(sid, UnknownInstanceError(f"no instance named {message.target!r} is held"))
            return
        try:
            marker = self._method(type(instance.obj), message.method)
        except NotAllowedError as exc:
            conn.fail(sid, exc)
            return
        if message.stream != marker.is_generator:
            kind = "a generator" if marker.is_generator else "not a generator"
            conn.fail(sid, TypeError(f"{message.target}.{message.method} is {kind}"))
            return
        call: _SyncCall | _AsyncCall
        if marker.is_generator:
            runner = conn.runner_for(instance) if marker.is_async else None
            stream = _Stream(conn, sid, instance, marker, message.args, message.kwargs, runner)
            conn.calls[sid] = stream
            stream.begin()
            return
        if marker.is_async:
            call = _AsyncCall(
                conn, sid, instance, marker, message.args, message.kwargs, conn.runner_for(instance)
            )
        else:
            call_class = _SyncCall if marker.blocking else _InlineCall
            call = call_class(
                conn, sid, instance, marker.func, message.args, message.kwargs, marker.name
            )
        conn.calls[sid] = call
        instance.enqueue(call)

    def _dispatch_op(self, conn: _Connection, message: Call) -> None:
        sid = message.stream_id
        op = self._OPS.get(message.method)
        if op is None:
            conn.fail(sid, NotAllowedError(f"{message.method!r} is not a server operation"))
            return
        handler_name, as_task, is_stream = op
        if message.kwargs:
            conn.fail(sid, TypeError("server operations take positional arguments only"))
            return
        if message.stream != is_stream:
            conn.fail(
                sid, TypeError(f"{message.method} {'is' if is_stream else 'is not'} a stream")
            )
            return
        handler = getattr(self, handler_name)
        if not as_task:
            try:
                value = handler(conn, sid, *message.args)
            except Exception as exc:  # noqa: BLE001 - anything a handler raises is the caller's
                conn.fail(sid, exc)
                return
            if value is not _NO_REPLY:
                conn.reply(sid, value)
            return
        call = _OpCall(conn, sid, is_stream)
        conn.calls[sid] = call
        assert conn.tg is not None
        conn.tg.start_soon(self._run_op, call, handler, message.args)

    async def _run_op(self, call: _OpCall, handler: Callable[..., Any], args: list[Any]) -> None:
        conn = call.conn
        try:
            with anyio.CancelScope() as scope:
                call.scope = scope
                if call.cancelled:  # cancelled before this task began: never starts
                    scope.cancel()
                try:
                    value = await handler(conn, call, *args)
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # noqa: BLE001 - anything a handler raises is the caller's
                    conn.fail(call.sid, exc)
                    return
            if scope.cancelled_caught:
                if call.stream:
                    conn.end_stream(call.sid)
                else:
                    conn.fail(call.sid, CallCancelledError("the call was cancelled while it ran"))
            elif value is not _NO_REPLY:
                conn.reply(call.sid, value)
        finally:
            conn.forget(call)

    # -- allow-list and imports ---------------------------------------------------------
    def _check_module(self, module: Any) -> str:
        if not isinstance(module, str) or not _valid_module_name(module):
            raise NotAllowedError(f"{module!r} is not a module name")
        if not any(fnmatch.fnmatchcase(module, pattern) for pattern in self.allow_modules):
            raise NotAllowedError(
                f"module {module!r} is not on this server's allow-list "
                "(start it with --allow-module PATTERN)"
            )
        return module

    async def _import(self, module: str) -> ModuleType:
        """Import an allowed module (``_check_module`` first), off the loop."""
        loaded = sys.modules.get(module)
        if loaded is None:
            loaded = await anyio.to_thread.run_sync(importlib.import_module, module)
            self._learn_coders()
        return loaded

    def _learn_coders(self) -> None:
        # A module may register coders at import: the shared default table now
        # has them, but this registry copied it when it was made.
        defaults = registry_module._default_coders
        for name, coder in list(defaults.items()):
            try:
                self.registry.coder_named(name)
            except ProtocolError:
                self.registry.register_coder(name, coder.cls, coder.encode, coder.decode)

    async def _import_main(self, main_path: Any) -> ModuleType:
        if not self.allow_import_from_main:
            raise NotAllowedError(
                "this server does not create classes from a client's __main__ "
                "(start it with --allow-import-from-main, or move the class to a module)"
            )
        if not isinstance(main_path, str) or not main_path:
            raise NotAllowedError(
                "the class is defined in an interactive __main__ (no file): move it to a module"
            )
        module = self._main_modules.get(main_path)
        if module is not None:
            return module
        if self._import_lock is None:
            self._import_lock = anyio.Lock()
        async with self._import_lock:
            module = self._main_modules.get(main_path)
            if module is None:
                digest = hashlib.sha1(main_path.encode(), usedforsecurity=False).hexdigest()[:12]
                name = f"__remote_exec_main_{digest}__"
                module = await anyio.to_thread.run_sync(_load_main, main_path, name)
                self._main_modules[main_path] = module
                self._learn_coders()
        return module

    async def _resolve_class(self, module: Any, qualname: Any, main_path: Any) -> type:
        if not isinstance(qualname, str) or not qualname:
            raise NotAllowedError(f"{qualname!r} is not a class name")
        if module == "__main__":
            loaded = await self._import_main(main_path)
        else:
            loaded = await self._import(self._check_module(module))
        obj: Any = loaded
        for part in qualname.split("."):
            if not part.isidentifier() or part.startswith("__"):
                raise NotAllowedError(
                    f"{qualname!r} is not a class that can be created remotely "
                    "(classes defined inside functions cannot be)"
                )
            obj = getattr(obj, part, None)
            if obj is None:
                raise NotAllowedError(f"module {module!r} has no class {qualname!r}")
        if not isinstance(obj, type) or obj.__module__ != loaded.__name__:
            raise NotAllowedError(f"{module}.{qualname} is not a class defined in {module!r}")
        return obj

    # -- server operations (target "") ------------------------------------------------
    def _op_echo_clock(self, conn: _Connection, sid: int) -> int:
        return time.perf_counter_ns()

    def _op_list_instances(self, conn: _Connection, sid: int) -> list[str]:
        return list(self._instances)

    def _instance(self, name: Any) -> _Instance:
        instance = self._instances.get(name) if isinstance(name, str) else None
        if instance is None:
            raise UnknownInstanceError(f"no instance named {name!r} is held")
        return instance

    def _op_get_properties(self, conn: _Connection, sid: int, name: Any, names: Any) -> object:
        instance = self._instance(name)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("property names must be a list of strings")
        for attr in names:
            if not attr.isidentifier() or attr.startswith("_"):
                raise NotAllowedError(f"{attr!r} is not a public attribute name")
        obj = instance.obj

        def read() -> dict[str, Any]:
            return {attr: getattr(obj, attr) for attr in names}

        self._enqueue_internal_call(conn, sid, instance, read)
        return _NO_REPLY

    def _op_get_config(self, conn: _Connection, sid: int, name: Any) -> object:
        if name is None:
            call = _OpCall(conn, sid, False)
            conn.calls[sid] = call
            assert conn.tg is not None
            conn.tg.start_soon(self._run_op, call, self._all_configs, [])
            return _NO_REPLY
        instance = self._instance(name)
        obj = instance.obj
        self._enqueue_internal_call(conn, sid, instance, lambda: config_of(obj))
        return _NO_REPLY

    def _enqueue_internal_call(
        self, conn: _Connection, sid: int, instance: _Instance, fn: Callable[[], Any]
    ) -> None:
        # Read in the instance's thread and in its FIFO: attributes may be
        # properties that talk to hardware, and reads see earlier calls' effects.
        call = _SyncCall(conn, sid, instance, fn, [], {}, None)
        conn.calls[sid] = call
        instance.enqueue(call)

    async def _all_configs(self, conn: _Connection, call: _OpCall) -> dict[str, Any]:
        configs: dict[str, Any] = {}
        for name, instance in list(self._instances.items()):
            obj = instance.obj
            try:
                configs[name] = await _Internal(instance, functools.partial(config_of, obj)).run()
            except UnknownInstanceError:
                continue  # deleted meanwhile
        return configs

    async def _op_create_instance(
        self,
        conn: _Connection,
        call: _OpCall,
        module: Any,
        qualname: Any,
        name: Any,
        args: Any,
        kwargs: Any,
        config: Any,
        exist_ok: Any = False,
        main_path: Any = None,
    ) -> bool:
        if not isinstance(name, str) or not name:
            raise ValueError("an instance name must be a non-empty string")
        if (
            not isinstance(args, list)
            or not isinstance(kwargs, dict)
            or not isinstance(config, dict)
        ):
            raise TypeError("create_instance takes args as a list, kwargs and config as maps")
        key = (module, qualname)
        while True:
            pending = self._creating.get(name)
            if pending is None:
                break
            await pending.wait()
        existing = self._instances.get(name)
        if existing is not None:
            if exist_ok and existing.key == key:
                return False
            raise DuplicateInstanceError(f"an instance named {name!r} already exists")
        self._check_instance_caps(conn)
        done = self._creating[name] = anyio.Event()
        conn.creating += 1
        try:
            cls = await self._resolve_class(module, qualname, main_path)
            allowed = set(getattr(cls, "_config_props_", ()))
            for prop in config:
                if prop not in allowed or not isinstance(prop, str) or prop.startswith("__"):
                    raise NotAllowedError(f"{prop!r} is not in {qualname}._config_props_")
            worker = InstanceWorker(name, coroutines=False)  # async methods run on our loop
            await worker.start()
            try:
                job = worker.submit(_construct, cls, args, kwargs, config)
                obj, actual_config = await job.wait()
                self.registry.add_instance(obj, name)
            except BaseException:
                with anyio.move_on_after(self.close_grace, shield=True):
                    await worker.stop()
                raise
            self._instances[name] = _Instance(name, obj, key, worker, conn.held)
            conn.held.add(name)
        finally:
            conn.creating -= 1
            del self._creating[name]
            done.set()
        logger.info("instance %r created (%s.%s)", name, module, qualname)
        self.events.publish(
            name, "create", {"class": f"{module}.{qualname}", "config": actual_config}
        )
        return True

    def _check_instance_caps(self, conn: _Connection) -> None:
        limits = self.limits
        if len(conn.held) + conn.creating >= limits.max_instances:
            raise NotAllowedError(
                f"this connection already holds {limits.max_instances} instances, the cap "
                "(--max-instances): delete some first"
            )
        if len(self._instances) + len(self._creating) >= limits.max_server_instances:
            raise NotAllowedError(
                f"the server already holds {limits.max_server_instances} instances, the cap "
                "(--max-server-instances)"
            )

    async def _op_delete_instance(self, conn: _Connection, call: _OpCall, name: Any) -> None:
        instance = self._instance(name)
        # Gone at once for new calls; calls already queued run first.
        del self._instances[instance.name]
        if instance.owner is not None:
            instance.owner.discard(instance.name)
        self.registry.remove_instance(instance.name)
        with anyio.CancelScope(shield=True):
            async with _exclusive(instance):
                instance.deleted = True
                await self._tear_down(instance)
        logger.info("instance %r deleted", instance.name)
        self.events.publish(instance.name, "delete", {"class": ".".join(instance.key)})

    async def _tear_down(self, instance: _Instance) -> None:
        """Close the instance's generators and stop its thread (holding its turn)."""
        for stream in list(instance.streams):
            try:
                await stream.close_now()
            except Exception:
                logger.exception("could not close %r", stream)
        for entry in list(instance.queue)[1:]:
            instance.queue.remove(entry)  # nothing else can be queued: fail-safe
            if isinstance(entry, _Call):
                entry.conn.fail(entry.sid, UnknownInstanceError(f"{instance.name!r} was deleted"))
                entry.conn.forget(entry)
        for runner in list(instance.runners):
            runner.stop()
        with anyio.move_on_after(self.close_grace):
            await instance.worker.stop()

    async def _op_sleep(
        self, conn: _Connection, call: _OpCall, duration: Any = None, deadline: Any = None
    ) -> int:
        for value in (duration, deadline):
            if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
                raise ValueError("sleep needs a finite number of seconds")
        if deadline is not None:
            await anyio.sleep(max(deadline - time.perf_counter(), 0))
        else:
            await anyio.sleep(max(duration or 0, 0))
        return time.perf_counter_ns()

    async def _op_import_module(self, conn: _Connection, call: _OpCall, module: Any) -> None:
        await self._import(self._check_module(module))

    async def _op_register_class(
        self, conn: _Connection, call: _OpCall, module: Any, qualname: Any
    ) -> None:
        if module == "__main__":
            raise NotAllowedError(
                "register a class of the client's __main__ by creating an instance"
            )
        self.registry.register_class(await self._resolve_class(module, qualname, None))

    async def _op_subscribe(
        self, conn: _Connection, call: _OpCall, name: Any, channel: Any
    ) -> object:
        check_channel(name, channel)
        subscription = self.events.subscribe(name, channel)
        try:
            async for event in subscription:
                await call.wait_credit()
                conn.send_items(call.sid, [event])
        except SubscriberOverflowError as exc:
            conn.fail(call.sid, exc)
            return _NO_REPLY
        finally:
            await subscription.aclose()
        conn.end_stream(call.sid)
        return _NO_REPLY


def _construct(
    cls: type, args: list[Any], kwargs: dict[str, Any], config: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Build an instance in its own thread and apply its config."""
    obj = cls(*args, **kwargs)
    for prop, value in config.items():
        setattr(obj, prop, value)
    return obj, config_of(obj)


def _load_main(path: str, name: str) -> ModuleType:
    """Import a client's main script under a private name (its ``__main__`` guard stays shut)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the client's main file {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
