"""``InstanceWorker``: a dedicated thread (with its own event loop, or none) that runs jobs in order.

The thread runs the same anyio backend as the loop that started it (asyncio or
trio), or no loop at all for a worker of sync jobs only (``coroutines=False``:
the daemon's instances), which then sleeps on a plain queue. Jobs go in and
results come back through each loop's own thread-safe, FIFO entry point
(``loop.call_soon_threadsafe`` for asyncio, ``TrioToken.run_sync_soon`` for
trio), so neither side ever blocks the other::

    caller loop                                     worker thread (own loop)
    -----------                                     ------------------------
    submit(fn, *args) --append to deque; wake------> _run_ready: pop, call fn
                        (only if the worker is       (a coroutine is handed to
                         idle and not woken yet)      the runner task, awaited)
    job.wait() <---- inbox: _complete ------------- one hand-off per finished job
      on_done(job) runs here, in completion order   (the caller loop's inbox, shared
                                                     by all its workers, wakes it
                                                     once per batch of hand-offs)

Invariants:

* The queued -> running and queued -> cancelled transitions happen under one
  ``threading.Lock``, so a job cancelled while queued can never start.
* The running -> done/cancelled transition happens in the caller's loop only
  (in ``_complete``), so ``Job.cancel`` and ``_complete`` never race.
* Only one job runs at a time: sync jobs run either in ``_run_ready`` (while the
  runner task is parked) or in the runner task, never both; a coroutine is
  always awaited by the runner task, which drains the queue before it parks.
* Completions are handed back in the order the worker finished the jobs, and
  ``on_done`` runs from that hand-off: callbacks keep call order even under
  trio, whose scheduler shuffles the order in which woken tasks resume.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from types import CoroutineType
from typing import Any, Final

import anyio
import anyio.lowlevel
import trio
from anyio.lowlevel import RunVar

from remote_exec.exceptions import ExecutorStateError
from remote_exec.executor import running_in_place
from remote_exec.runtime.backend import current_backend, threadsafe_call_soon

__all__ = ["InstanceWorker", "Job"]

logger = logging.getLogger("remote_exec.runtime.worker")

QUEUED: Final = "queued"
RUNNING: Final = "running"
DONE: Final = "done"
CANCELLED: Final = "cancelled"
_FINAL = (DONE, CANCELLED)


class _Inbox:
    """Hand-backs from every worker thread to one loop, one wake-up per batch.

    A loop's thread-safe entry point writes to its wake-up pipe on every call;
    with many instances busy, completions come faster than the loop turns.
    They queue here instead, and only the first of a batch schedules the
    drain. Each thread's hand-backs keep their order.
    """

    __slots__ = ("_call_soon", "_items", "_lock", "_scheduled")

    def __init__(self, call_soon: Callable[..., object]) -> None:
        self._call_soon = call_soon
        self._lock = threading.Lock()
        self._items: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._scheduled = False

    def put(self, fn: Callable[..., object], *args: Any) -> None:
        """From any thread. Raises what the loop's entry point raises once it is gone."""
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._call_soon(self._drain)
        except BaseException:
            with self._lock:
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # one failing hand-back must not drop the others
                logger.exception("a worker's hand-back %r failed", fn)


_INBOX: RunVar[_Inbox] = RunVar("remote_exec_worker_inbox")


def _inbox(call_soon: Callable[..., object]) -> _Inbox:
    """The running loop's inbox (one per loop, shared by its workers)."""
    try:
        return _INBOX.get()
    except LookupError:
        inbox = _Inbox(call_soon)
        _INBOX.set(inbox)
        return inbox


class _Loop:
    """The running event loop of one thread: its thread-safe FIFO entry point,
    and a one-slot "park" that suspends a task until ``wake`` is called."""

    __slots__ = ("_asyncio_loop", "backend", "call_soon", "is_trio")

    def __init__(self) -> None:
        self.backend = current_backend()
        self.is_trio = self.backend == "trio"
        self.call_soon: Callable[..., object] = threadsafe_call_soon()
        self._asyncio_loop = None if self.is_trio else asyncio.get_running_loop()

    def new_waiter(self) -> asyncio.Future[None] | trio.lowlevel.Task:
        """A waiter for the current task; pass it to ``suspend`` and ``wake``."""
        if self.is_trio:
            return trio.lowlevel.current_task()
        assert self._asyncio_loop is not None
        return self._asyncio_loop.create_future()

    async def suspend(
        self, waiter: asyncio.Future[None] | trio.lowlevel.Task, on_cancel: Callable[[], None]
    ) -> None:
        """Suspend until ``wake(waiter)``; if cancelled first, call ``on_cancel`` and raise."""
        if isinstance(waiter, asyncio.Future):
            try:
                await waiter
            except asyncio.CancelledError:
                on_cancel()
                raise
            return

        def abort(_: Any) -> trio.lowlevel.Abort:
            on_cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    @staticmethod
    def wake(waiter: asyncio.Future[None] | trio.lowlevel.Task) -> None:
        """Resume a suspended waiter; call it from the waiter's own loop, once."""
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(None)
        else:
            trio.lowlevel.reschedule(waiter)


class Job:
    """One submitted call: its state, its outcome, and a way to wait for it.

    ``state`` is ``"queued"``, ``"running"``, ``"done"`` or ``"cancelled"``.
    """

    __slots__ = (
        "_cancel_requested",
        "_exc",
        "_scope",
        "_value",
        "_waiter",
        "_worker",
        "args",
        "fn",
        "on_done",
        "state",
    )

    def __init__(
        self,
        worker: InstanceWorker,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        on_done: Callable[[Job], None] | None,
    ) -> None:
        self._worker = worker
        self.fn = fn
        self.args = args
        self.on_done = on_done
        self.state: str = QUEUED
        self._value: Any = None
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | trio.lowlevel.Task | None = None
        self._scope: anyio.CancelScope | None = None  # set in the worker while awaited
        self._cancel_requested = False

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<Job {name} {self.state} on {self._worker.name!r}>"

    async def wait(self, *, cancel: bool = True) -> Any:
        """The job's result, or raise its exception.

        Args:
            cancel: if the awaiting task is cancelled, cancel the job too (the
                default). Either way the cancellation is re-raised at once,
                without waiting for the worker.

        Raises:
            ExecutorStateError: the job was cancelled, or its worker stopped
                before it started.
        """
        if self.state in _FINAL:
            await anyio.lowlevel.checkpoint()
            return self.result()
        if self._waiter is not None:
            raise RuntimeError(f"another task is already waiting for {self!r}")
        loop = self._worker._caller
        assert loop is not None
        waiter = self._waiter = loop.new_waiter()
        await loop.suspend(waiter, self._abort_wait if cancel else self._forget_waiter)
        return self.result()

    def _forget_waiter(self) -> None:
        self._waiter = None

    def _abort_wait(self) -> None:
        self._waiter = None
        self.cancel()

    def cancel(self) -> None:
        """Cancel the job; call it from the loop that submitted it.

        A queued job never starts; a running coroutine is cancelled in the
        worker's loop (its ``finally`` runs there); a running sync function is
        allowed to finish and its result is dropped. No-op once finished.
        """
        worker = self._worker
        with worker._lock:
            state = self.state
            if state == QUEUED:
                self.state = CANCELLED
            elif state == RUNNING:
                self._cancel_requested = True
        if state == QUEUED:
            self._finish(None, ExecutorStateError(f"{self!r} was cancelled before it started"))
        elif state == RUNNING:
            worker._call_worker(self._cancel_in_worker)

    def _cancel_in_worker(self) -> None:
        scope = self._scope
        if scope is not None:
            scope.cancel()

    def result(self) -> Any:
        """After the job finished: its value, or raise its exception.

        Raises:
            ExecutorStateError: the job has not finished yet, or was cancelled.
        """
        if self.state not in _FINAL:
            raise ExecutorStateError(f"{self!r} has not finished yet")
        if self._exc is not None:
            raise self._exc
        return self._value

    def _complete(self, value: Any, exc: BaseException | None, cancelled: bool) -> None:
        """The worker's hand-back; runs in the caller's loop."""
        if cancelled or self._cancel_requested:
            self.state = CANCELLED
            self._finish(None, ExecutorStateError(f"{self!r} was cancelled while it ran"))
        else:
            self.state = DONE
            self._finish(value, exc)

    def _finish(self, value: Any, exc: BaseException | None) -> None:
        self._value = value
        self._exc = exc
        on_done = self.on_done
        if on_done is not None:
            self.on_done = None
            try:
                on_done(self)
            except BaseException as error:  # noqa: BLE001 - the waiter gets it instead
                self._value = None
                self._exc = error
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            _Loop.wake(waiter)


def _describe_fn(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class InstanceWorker:
    """A dedicated thread running its own event loop (the anyio backend of the
    loop that started it: asyncio or trio) that runs jobs one at a time, in
    submission order.

    ``start``, ``submit``, ``stop`` and ``Job.cancel`` are called from the loop
    that started the worker. A job's ``fn`` may be sync (called in the worker
    thread) or a coroutine function (awaited in the worker's loop). A job's
    ``on_done(job)`` runs once, in the submitting loop, when the job finishes
    (done or cancelled), in completion order; for a job cancelled while queued
    (by ``Job.cancel`` or ``stop``) it runs right away, from that call. If it
    raises, that exception becomes the job's outcome. Contextvars of the caller
    (such as the active executor) are not visible in the worker, and the
    thread runs ``running_in_place``: a decorated method called from a job
    runs locally, in the worker, even when its object pins an executor.
    """

    def __init__(self, name: str, *, coroutines: bool = True) -> None:
        """``coroutines=False``: the jobs are sync functions only (the daemon's
        instances, whose async methods run on the daemon's loop). The thread
        then has no event loop and waits on a plain queue: waking it costs a
        futex, not a write to a loop's wake-up pipe and a turn of that loop.
        """
        self.name = name
        self._coroutines = coroutines
        self._lock = threading.Lock()
        self._queue: deque[Job] = deque()
        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._thread: threading.Thread | None = None
        self._caller: _Loop | None = None
        self._inbox: _Inbox | None = None
        self._worker: _Loop | None = None
        self._call_worker: Callable[..., object] = _not_started
        self._ready: anyio.Event | None = None
        self._exited: anyio.Event | None = None
        self._failure: BaseException | None = None
        # Worker-thread state (touched only in the worker thread, except
        # ``_parked``, see ``submit``).
        self._parked: asyncio.Future[None] | trio.lowlevel.Task | None = None
        self._current: Job | None = None
        self._handover: tuple[Job, Any] | None = None  # a coroutine for the runner
        self._wake_pending = False  # a _run_ready call is scheduled and not started
        self._shutdown = False
        self._finalize: Callable[[], Any] | None = None

    def __repr__(self) -> str:
        return f"<InstanceWorker {self.name!r} {self._state}>"

    @property
    def state(self) -> str:
        """``"new"``, ``"starting"``, ``"running"``, ``"stopping"`` or ``"stopped"``."""
        return self._state

    @property
    def runs_coroutines(self) -> bool:
        """Whether the thread has a loop of its own that awaits coroutine jobs."""
        return self._coroutines

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread (None before ``start``)."""
        return self._thread

    # -- caller side -------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread and its loop; returns once the loop is ready.

        Raises:
            ExecutorStateError: the worker was already started.
        """
        if self._state != "new":
            raise ExecutorStateError(f"{self!r} cannot be started twice")
        self._state = "starting"
        self._caller = _Loop()
        self._inbox = _inbox(self._caller.call_soon)
        self._ready = anyio.Event()
        self._exited = anyio.Event()
        thread = threading.Thread(
            target=self._thread_main, name=f"remote-exec worker {self.name}", daemon=True
        )
        self._thread = thread
        thread.start()
        # Shielded: the thread is starting either way, and must not be orphaned.
        with anyio.CancelScope(shield=True):
            await self._ready.wait()
        if self._failure is not None:
            self._state = "stopped"
            await self._join()
            raise ExecutorStateError(f"{self!r} failed to start") from self._failure
        if self._state == "starting":
            self._state = "running"
        else:  # stop() was called while we waited: it left the shutdown to us
            self._call_worker(self._shutdown_in_worker)

    def submit(
        self, fn: Callable[..., Any], *args: Any, on_done: Callable[[Job], None] | None = None
    ) -> Job:
        """Queue ``fn(*args)``; never blocks.

        Raises:
            ExecutorStateError: the worker is not running (not started, or stopped).
        """
        if self._state != "running":
            raise ExecutorStateError(self._state_message())
        job = Job(self, fn, args, on_done)
        self._queue.append(job)
        # Wake the worker only if its runner is parked (it sets ``_parked`` *before*
        # its last look at the queue, so either it sees this job or we see it
        # parked) and no wake-up is on its way already: a burst of calls costs
        # one cross-thread wake-up.
        if self._parked is not None and not self._wake_pending:
            self._wake_pending = True
            self._call_worker(self._run_ready)
        return job

    async def stop(self, *, finalize: Callable[[], Any] | None = None) -> None:
        """Stop the worker and join its thread without blocking the loop; idempotent.

        Queued jobs never start (their waiters get ``ExecutorStateError``), a
        running coroutine is cancelled, a running sync function finishes.

        Args:
            finalize: run in the worker (sync called, coroutine awaited) after the
                last job and before its loop exits, e.g. to close generators.
        """
        if self._exited is None:  # never started
            self._state = "stopped"
            return
        if self._state == "starting":  # start() shuts it down once it is ready
            self._state = "stopping"
            self._finalize = finalize
        elif self._state == "running":
            self._state = "stopping"
            self._drop_queued()
            self._finalize = finalize
            try:
                self._call_worker(self._shutdown_in_worker)
            except (RuntimeError, trio.RunFinishedError):
                pass  # its loop already ended (it died): just join it
        await self._join()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise ExecutorStateError(f"{self!r} failed while stopping") from failure

    def _drop_queued(self) -> None:
        with self._lock:
            dropped = [job for job in self._queue if job.state == QUEUED]
            for job in dropped:
                job.state = CANCELLED
        for job in dropped:
            job._finish(None, ExecutorStateError(f"{self!r} stopped before {job!r} started"))

    async def _join(self) -> None:
        assert self._exited is not None
        assert self._thread is not None
        await self._exited.wait()
        # The thread has handed back its last message; it is returning now.
        self._thread.join()
        self._state = "stopped"

    def _state_message(self) -> str:
        if self._state in ("new", "starting"):
            return f"{self!r} is not started"
        return f"{self!r} has been stopped"

    def _on_ready(self, failure: BaseException | None) -> None:
        if failure is not None and self._failure is None:
            self._failure = failure
        assert self._ready is not None
        self._ready.set()

    def _on_exit(self, failure: BaseException | None) -> None:
        self._on_ready(failure)
        if self._state == "running":  # the loop died on its own: fail, never hang
            self._state = "stopping"
            self._drop_queued()
            job, self._current = self._current, None  # the thread is gone: safe to read
            if job is not None and job.state == RUNNING:
                job._complete(None, ExecutorStateError(f"{self!r} died while running it"), False)
        assert self._exited is not None
        self._exited.set()

    # -- worker side -------------------------------------------------------------
    def _thread_main(self) -> None:
        failure: BaseException | None = None
        try:
            # Everything this thread runs is instance code, where the instance
            # lives: its decorated calls run in place (pins are not followed).
            with running_in_place():
                if self._coroutines:
                    backend = self._caller.backend if self._caller else "asyncio"
                    anyio.run(self._main, backend=backend)
                else:
                    self._main_without_loop()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller's loop
            failure = exc
        finally:
            self._send_to_caller(self._on_exit, failure)

    def _send_to_caller(self, fn: Callable[..., object], *args: Any) -> None:
        inbox = self._inbox
        assert inbox is not None
        try:
            inbox.put(fn, *args)
        except (RuntimeError, trio.RunFinishedError):
            pass  # the caller's loop is gone: nobody is left to tell

    async def _main(self) -> None:
        loop = self._worker = _Loop()
        call_soon = loop.call_soon
        if not loop.is_trio:
            # Callbacks scheduled from the caller's thread would otherwise run in a
            # copy of *its* context (with its active executor): give them ours.
            call_soon = functools.partial(call_soon, context=contextvars.copy_context())
        self._call_worker = call_soon
        self._send_to_caller(self._on_ready, None)
        queue = self._queue
        while True:
            handover = self._handover
            if handover is not None:
                self._handover = None
                await self._finish_coroutine(*handover)
                continue
            if self._shutdown:
                break
            if not queue:
                waiter = self._parked = loop.new_waiter()
                if not queue and not self._shutdown:
                    await loop.suspend(waiter, self._unparked)
                self._parked = None
                continue
            job = self._take(queue.popleft())
            if job is None:
                continue
            try:
                value = job.fn(*job.args)
            except BaseException as error:  # noqa: BLE001 - the job's outcome
                self._current = None
                self._send_to_caller(job._complete, None, error, False)
                continue
            if type(value) is CoroutineType:
                await self._finish_coroutine(job, value)
            else:
                self._current = None
                self._send_to_caller(job._complete, value, None, False)
            del job, value  # hold no result while parked
        finalize, self._finalize = self._finalize, None
        if finalize is not None:
            result = finalize()
            if type(result) is CoroutineType:
                await result

    def _main_without_loop(self) -> None:
        """``_main`` for sync jobs only: wake-ups arrive through a plain queue."""
        wakeups: SimpleQueue[Callable[[], object]] = SimpleQueue()
        self._call_worker = wakeups.put
        # Always "parked": every submit that finds no wake-up on its way sends one.
        self._parked = _NO_LOOP
        self._send_to_caller(self._on_ready, None)
        while not self._shutdown:
            wakeups.get()()
        finalize, self._finalize = self._finalize, None
        if finalize is not None:
            finalize()

    def _take(self, job: Job) -> Job | None:
        """Mark a dequeued job running, unless it was cancelled while queued."""
        with self._lock:
            if job.state != QUEUED:
                return None  # it never starts
            job.state = RUNNING
        self._current = job
        return job

    async def _finish_coroutine(self, job: Job, coro: Any) -> None:
        value: Any = None
        exc: BaseException | None = None
        try:
            with anyio.CancelScope() as scope:
                job._scope = scope
                # A cancel request may have come before the scope existed.
                if job._cancel_requested or self._shutdown:
                    scope.cancel()
                value = await coro
            job._scope = None
        except BaseException as error:  # noqa: BLE001 - the job's outcome
            exc = error
        self._current = None
        self._send_to_caller(job._complete, value, exc, scope.cancelled_caught)

    def _run_ready(self) -> None:
        """``submit``'s wake-up, run in the worker's loop.

        While the runner task is parked, run queued jobs right here, as long as
        they turn out to be sync: this saves a task switch per call. The first
        coroutine is handed over to the runner task, which awaits it (in a
        cancel scope) and then goes on with the queue in order.
        """
        # Cleared before draining: a submit that still saw it set appended its
        # job before this point, so the loop below runs it.
        self._wake_pending = False
        if self._parked is None:
            return  # the runner is awake and drains the queue itself
        queue = self._queue
        while queue and not self._shutdown:
            job = self._take(queue.popleft())
            if job is None:
                continue
            try:
                value = job.fn(*job.args)
            except BaseException as error:  # noqa: BLE001 - the job's outcome
                self._current = None
                self._send_to_caller(job._complete, None, error, False)
                continue
            if type(value) is CoroutineType:
                if not self._coroutines:
                    value.close()
                    self._current = None
                    refusal = TypeError(f"{job!r} returned a coroutine: this worker has no loop")
                    self._send_to_caller(job._complete, None, refusal, False)
                    continue
                self._handover = (job, value)
                self._unpark()
                return
            self._current = None
            self._send_to_caller(job._complete, value, None, False)

    def _unpark(self) -> None:
        waiter = self._parked
        if waiter is not None and waiter is not _NO_LOOP:
            self._parked = None
            _Loop.wake(waiter)

    def _unparked(self) -> None:
        self._parked = None

    def _shutdown_in_worker(self) -> None:
        self._shutdown = True
        job = self._current
        if job is not None:
            job._cancel_in_worker()
        self._unpark()


# ``_parked`` of a worker without a loop (see ``_main_without_loop``).
_NO_LOOP: Any = object()


def _not_started(*args: Any) -> None:
    raise ExecutorStateError("the worker's loop is not running")
