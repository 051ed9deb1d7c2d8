"""``BlockingExecutor``: every executor, for plain synchronous code.

Scripts, Qt apps and notebook cells without ``await`` cannot drive an async
executor themselves. ``BlockingExecutor`` runs one on an event loop of its
own, in a background thread (anyio's blocking portal), and gives each of its
methods a sync twin of the same name, plus ``run`` and ``gen`` (Motion's
``run``/``gen`` beside ``arun``/``agen``)::

    with BlockingExecutor(ThreadExecutor()) as bx:
        with bx.remote_instance(camera, "cam"):
            frame = bx.run(camera.snap, 1)
            with bx.gen(camera.stream, 10) as frames:
                for frame in frames:
                    ...

Why not ``portal.call(camera.snap, 1)`` by hand: the executor context is
task-local, each portal call runs in a fresh task of the portal where no
``ExecutorContext`` is active, so the decorated method silently runs locally,
in the portal's thread. Here every call goes through the wrapped executor
(``executor.execute``), in a task that has entered ``ExecutorContext``.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Self, TypeVar, cast, overload

import anyio
import trio
from anyio.from_thread import start_blocking_portal

from remote_exec.exceptions import ExecutorStateError
from remote_exec.executor import (
    Executor,
    ExecutorContext,
    Invocation,
    PropertyChange,
    RemoteMethod,
    RemoteStream,
)
from remote_exec.invocations import InvocationInfo, InvocationStatus, LogEntry
from remote_exec.runtime.backend import BACKENDS, threadsafe_call_soon

if TYPE_CHECKING:
    from types import ModuleType, TracebackType

    from anyio.from_thread import BlockingPortal

    from .decorators import TypedStream

__all__ = ["CANCEL_GRACE", "BlockingExecutor", "BlockingStream"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

CANCEL_GRACE = 5.0
"""Seconds a Ctrl-C in a blocking call waits for the cancelled call to unwind
(so that the remote side has been told) before ``KeyboardInterrupt`` goes on;
a second Ctrl-C stops the wait."""

_END: Any = object()  # what a stream's step returns once it is exhausted


def _loop_in_this_thread() -> str | None:
    """The async library whose event loop runs in this thread, if any.

    Asked of the thread, not of the task (sniffio, ``runtime.backend``): a
    callback runs on its loop outside any task, and blocking there (on our
    own loop, from a decorated method's callback) would deadlock.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    return "trio" if trio.lowlevel.in_trio_run() else None


def _in_notebook_kernel() -> bool:
    """Whether this is the main thread of a Jupyter (IPython) kernel.

    Its cells run inside the kernel's own asyncio loop, yet a blocking cell is
    what a notebook expects (it holds up only the kernel, as ``time.sleep``
    does), and the executor's loop is another thread, so nothing waits on
    the kernel's loop.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return getattr(shell, "kernel", None) is not None


def _check_sync(what: str) -> None:
    """Refuse to block a thread that runs an event loop.

    Raises:
        RuntimeError: this thread runs an asyncio or trio loop (outside a
            notebook kernel's main thread).
    """
    library = _loop_in_this_thread()
    if library is None or _in_notebook_kernel():
        return
    raise RuntimeError(
        f"BlockingExecutor.{what}() was called from a thread that runs a {library} event "
        "loop: blocking here would stall that loop (or deadlock, if it is the "
        "BlockingExecutor's own, as in a callback). In async code, await the executor's "
        "methods instead: `async with executor:` then `await obj.method(...)`; or call "
        "the BlockingExecutor from a worker thread (anyio.to_thread.run_sync)."
    )


class _Call:
    """One blocking call's link between its calling thread and its task.

    Ctrl-C may land while the task is being spawned, before the portal's
    future exists, so cancelling goes through this instead: a flag the task
    reads when it starts, and its cancel scope once it has one.
    """

    def __init__(self) -> None:
        self.done = threading.Event()  # the task has ended (or never will run fn)
        self._lock = threading.Lock()
        self._cancelled = False
        self._scope: anyio.CancelScope | None = None
        self._call_soon: Callable[..., object] | None = None

    def attach(self, scope: anyio.CancelScope) -> None:
        """In the task, first: cancel at once if the caller gave up already."""
        with self._lock:
            self._scope, self._call_soon = scope, threadsafe_call_soon()
            if self._cancelled:
                scope.cancel()

    def cancel(self) -> None:
        """From the calling thread; does not wait."""
        with self._lock:
            self._cancelled = True
            scope, call_soon = self._scope, self._call_soon
        if scope is not None and call_soon is not None:
            try:
                call_soon(scope.cancel)
            except RuntimeError:  # the loop has stopped: nothing runs any more
                pass


def _method_of(fn: Callable[..., Any], *, generator: bool) -> tuple[Any, str]:
    """The object and method name of a bound decorated method.

    Raises:
        TypeError: ``fn`` is not a bound decorated method, or is a generator
            given to ``run`` (or the other way round).
    """
    marker = getattr(fn, "__remote_exec__", None)
    obj = getattr(fn, "__self__", None)
    twin = "gen" if generator else "run"
    if not isinstance(marker, RemoteMethod) or obj is None:
        raise TypeError(
            f"BlockingExecutor.{twin}() takes a bound method decorated with "
            f"{'apply_generator_executor' if generator else 'apply_executor'} "
            f"(bx.{twin}(obj.method, *args)), not {fn!r}"
        )
    if marker.is_generator != generator:
        raise TypeError(
            f"{marker.name} is a generator method: use bx.gen(obj.{marker.name}, ...)"
            if marker.is_generator
            else f"{marker.name} is not a generator method: use bx.run(obj.{marker.name}, ...)"
        )
    return obj, marker.name


async def _step(stream: RemoteStream) -> Any:
    # The end comes back as a value; the calling thread raises StopIteration.
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


class BlockingExecutor:
    """Run ``executor`` on an event loop in a background thread, for sync code.

    A sync context manager (or ``start()``/``stop()``, for notebook cells):
    entering starts the loop thread (``backend``: "asyncio" or "trio") and
    enters ``executor`` there; leaving stops both. Usable from several threads
    at once: each call blocks only its own thread, so the calls one thread
    makes keep their order. Decorated methods' callbacks run in the loop's
    thread.

    Calling it from a thread that runs an event loop raises ``RuntimeError``
    (await the executor's methods there instead), except in a notebook
    kernel's main thread, whose cells may block.

    Raises:
        TypeError: ``executor`` is not an executor.
        ValueError: ``backend`` is neither "asyncio" nor "trio".
    """

    def __init__(self, executor: Executor, *, backend: str = "asyncio") -> None:
        if not isinstance(executor, Executor):
            raise TypeError(f"BlockingExecutor wraps an executor, not {type(executor).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        self._executor = executor
        self.backend = backend
        self._state = "new"
        self._state_lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._stack: ExitStack | None = None

    @property
    def executor(self) -> Executor:
        """The wrapped executor (its methods must be awaited on this object's loop)."""
        return self._executor

    @property
    def started(self) -> bool:
        return self._portal is not None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> Self:
        """Start the loop thread and the executor in it (``with`` does this).

        Raises:
            ExecutorStateError: started before.
        """
        _check_sync("start")
        with self._state_lock:
            if self._state != "new":
                raise ExecutorStateError("BlockingExecutor cannot be started twice")
            self._state = "starting"
        try:
            with ExitStack() as stack:
                portal = stack.enter_context(start_blocking_portal(self.backend))
                stack.enter_context(portal.wrap_async_context_manager(self._executor))
                self._stack = stack.pop_all()
        except BaseException:
            self._state = "stopped"
            raise
        self._portal = portal
        self._state = "running"
        return self

    def stop(self) -> None:
        """Stop the executor and the loop thread; idempotent."""
        self._stop(None, None, None)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop(exc_type, exc, tb)

    def _stop(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            _check_sync("stop")
        with self._state_lock:
            stack, self._stack = self._stack, None
            self._portal = None  # new calls fail at once, not on a stopping loop
            self._state = "stopped"
        if stack is not None:
            # With an exception (Ctrl-C included) the portal also cancels what
            # is still running on the loop.
            stack.__exit__(exc_type, exc, tb)

    def _running_portal(self, what: str) -> BlockingPortal:
        _check_sync(what)
        portal = self._portal
        if portal is not None:
            return portal
        if self._state in ("new", "starting"):
            raise ExecutorStateError(
                "BlockingExecutor is not started: use `with BlockingExecutor(executor) as bx:` "
                "(or bx.start())"
            )
        raise ExecutorStateError("BlockingExecutor has been stopped and cannot be used any more")

    # -- the one way in ------------------------------------------------------------
    def _call(
        self, what: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` in a new task of the loop, inside
        ``ExecutorContext(executor)``, and block until it is done."""
        portal = self._running_portal(what)
        call = _Call()
        try:
            future = portal.start_task_soon(
                self._in_context, call, functools.partial(fn, *args, **kwargs)
            )
            return future.result()
        except KeyboardInterrupt:
            # Ctrl-C: cancel the call's task, and the executor tells the
            # remote side; wait (briefly) for the task to unwind, so the remote
            # side knows before the program goes on.
            call.cancel()
            call.done.wait(CANCEL_GRACE)
            raise

    async def _in_context(self, call: _Call, fn: Callable[[], Awaitable[R]]) -> R:
        try:
            with anyio.CancelScope() as scope:
                call.attach(scope)
                with ExecutorContext(self._executor):
                    return await fn()
            # Cancelled by Ctrl-C: the caller has raised KeyboardInterrupt and
            # reads no result.
            return cast("R", None)
        finally:
            call.done.set()

    @asynccontextmanager
    async def _scoped(
        self, open_cm: Callable[[], AbstractAsyncContextManager[R]]
    ) -> AsyncIterator[R]:
        # One task of the loop enters and exits it (wrap_async_context_manager).
        with ExecutorContext(self._executor):
            async with open_cm() as value:
                yield value

    def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` on the executor's loop, inside its
        ``ExecutorContext``, and return the result: for async code of your own
        that calls decorated methods, or an executor method with no twin here."""
        return self._call("call", fn, *args, **kwargs)

    # -- run and gen -------------------------------------------------------------
    def run(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the decorated method ``fn`` (bound: ``obj.method``) through the
        executor and return its result; Ctrl-C cancels the call where it runs.

        Raises:
            TypeError: ``fn`` is not a bound method decorated with ``apply_executor``.
        """
        obj, name = _method_of(fn, generator=False)
        result: R = self._call("run", self._executor.execute, obj, name, args, kwargs)
        return result

    @overload
    def gen(
        self, fn: Callable[P, TypedStream[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> BlockingStream[T]: ...
    @overload
    def gen(
        self, fn: Callable[P, RemoteStream], /, *args: P.args, **kwargs: P.kwargs
    ) -> BlockingStream[Any]: ...
    def gen(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> BlockingStream[Any]:
        """Stream the decorated generator method ``fn`` (bound: ``obj.gen``)
        through the executor: an iterator and a context manager whose exit (or
        ``close()``) closes the remote generator, so its ``finally`` runs there.

        Raises:
            TypeError: ``fn`` is not a bound method decorated with
                ``apply_generator_executor``.
        """
        obj, name = _method_of(fn, generator=True)
        return self._stream(
            "gen", lambda: self._executor.execute_generator(obj, name, args, kwargs)
        )

    def _stream(self, what: str, open_stream: Callable[[], RemoteStream]) -> BlockingStream[Any]:
        async def opened() -> RemoteStream:
            return open_stream()  # on the loop: streams make the loop's events

        return BlockingStream(self, self._call(what, opened))

    # -- the executor's methods, sync -------------------------------------------
    @contextmanager
    def remote_instance(
        self, obj: T, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> Iterator[T]:
        """Create ``obj``'s remote twin as ``name`` for the block, delete it after
        (``scope``: see ``Executor.ensure_remote_instance``).

        Raises:
            DuplicateInstanceError: ``name`` already exists.
            ValueError: ``scope`` is neither "server" nor "connection".
        """
        portal = self._running_portal("remote_instance")
        scoped = self._scoped(
            lambda: self._executor.remote_instance(obj, name, *args, scope=scope, **kwargs)
        )
        with portal.wrap_async_context_manager(scoped):
            yield obj

    def ensure_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> bool:
        """Create ``obj``'s remote twin as ``name``; False if it already existed
        (``scope``: see ``Executor.ensure_remote_instance``)."""
        created: bool = self._call(
            "ensure_remote_instance",
            self._executor.ensure_remote_instance,
            obj,
            name,
            *args,
            scope=scope,
            **kwargs,
        )
        return created

    def create_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> None:
        """Like ``ensure_remote_instance``, but ``name`` must not exist yet."""
        self._call(
            "create_remote_instance",
            self._executor.create_remote_instance,
            obj,
            name,
            *args,
            scope=scope,
            **kwargs,
        )

    def delete_remote_instance(self, obj: Any) -> None:
        """Delete the remote twin of ``obj`` and forget it."""
        self._call("delete_remote_instance", self._executor.delete_remote_instance, obj)

    def get_remote_objects(self) -> list[str]:
        """The names of every instance the remote side holds."""
        return self._call("get_remote_objects", self._executor.get_remote_objects)

    def list_invocations(
        self,
        *,
        instance: Any = None,
        method: str | None = None,
        status: str | InvocationStatus | None = None,
    ) -> list[InvocationInfo]:
        """Every invocation the remote side knows, oldest first, filtered."""
        return self._call(
            "list_invocations",
            functools.partial(
                self._executor.list_invocations, instance=instance, method=method, status=status
            ),
        )

    def get_invocation(self, invocation_id: str) -> InvocationInfo:
        """The invocation ``invocation_id`` (``LookupError`` if unknown or expired)."""
        return self._call("get_invocation", self._executor.get_invocation, invocation_id)

    def cancel_invocation(self, invocation_id: str) -> InvocationInfo:
        """Ask ``invocation_id`` to stop; its info after the request."""
        return self._call("cancel_invocation", self._executor.cancel_invocation, invocation_id)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> BlockingInvocation:
        """Start a detached call of the decorated method ``fn`` (bound:
        ``obj.method``); its handle, as soon as the call is sent."""
        invocation = self._call("submit", self._executor.submit, fn, *args, **kwargs)
        return BlockingInvocation(self, invocation)

    def invocation(self, invocation_id: str) -> BlockingInvocation:
        """A handle on the existing invocation ``invocation_id``."""
        return BlockingInvocation(self, self._executor.invocation(invocation_id))

    def invocation_result(self, invocation_id: str) -> Any:
        """The outcome of the submitted invocation ``invocation_id``, once finished."""
        return self._call("invocation_result", self._executor.invocation_result, invocation_id)

    def follow_log(self, invocation_id: str) -> BlockingStream[LogEntry]:
        """The log records of ``invocation_id`` as they come, until it has finished."""
        return self._stream("follow_log", lambda: self._executor.follow_log(invocation_id))

    def execute(
        self,
        obj: Any,
        fn: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> Any:
        """Run the decorated method ``fn`` (or its name) of held ``obj``."""
        return self._call("execute", self._executor.execute, obj, fn, args, kwargs, callback)

    def execute_generator(
        self,
        obj: Any,
        gen: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> BlockingStream[Any]:
        """Stream the decorated generator ``gen`` (or its name) of held ``obj``."""
        return self._stream(
            "execute_generator",
            lambda: self._executor.execute_generator(obj, gen, args, kwargs, callback),
        )

    def get_remote_object_config(self, obj: Any | None) -> dict[str, Any]:
        """The config properties of ``obj``'s twin (None: every instance, by name)."""
        return self._call("get_remote_object_config", self._executor.get_remote_object_config, obj)

    def apply_config_from_remote(self, obj: Any) -> None:
        """Copy the twin's config properties onto ``obj``."""
        self._call("apply_config_from_remote", self._executor.apply_config_from_remote, obj)

    def get_remote_object_property_data(self, obj: Any, names: Iterable[str]) -> dict[str, Any]:
        """The values of the public attributes ``names`` of ``obj``'s twin."""
        return self._call(
            "get_remote_object_property_data",
            self._executor.get_remote_object_property_data,
            obj,
            tuple(names),
        )

    def apply_property_data_from_remote(self, obj: Any, names: Iterable[str]) -> None:
        """Copy the twin's attributes ``names`` onto ``obj``."""
        self._call(
            "apply_property_data_from_remote",
            self._executor.apply_property_data_from_remote,
            obj,
            tuple(names),
        )

    def get_echo_clock(self) -> tuple[int, int, int]:
        """(local ns before sending, remote ns, local ns after receiving)."""
        return self._call("get_echo_clock", self._executor.get_echo_clock)

    def sleep(self, duration: float | None = None, deadline: float | None = None) -> int:
        """Sleep on the remote side (see ``Executor.sleep``); returns its clock on waking."""
        return self._call("sleep", self._executor.sleep, duration, deadline)

    def remote_import(self, module: str | ModuleType) -> None:
        """Import ``module`` (or its dotted name) on the remote side."""
        self._call("remote_import", self._executor.remote_import, module)

    def register_remote_class(self, cls: type) -> None:
        """Make ``cls`` known to the remote side."""
        self._call("register_remote_class", self._executor.register_remote_class, cls)

    def get_channel_from_remote(self, name: str, channel: str) -> BlockingStream[Any]:
        """Events of instance ``name`` ("" for all) on ``channel`` ("create",
        "delete", "execute" or "" for all): ``with bx.get_channel_from_remote(
        "", "") as events: for event in events: ...``."""
        return self._stream(
            "get_channel_from_remote",
            lambda: self._executor.get_channel_from_remote(name, channel),
        )

    def observe(self, obj: Any, names: Iterable[str]) -> BlockingStream[PropertyChange]:
        """Changes of the public attributes ``names`` of ``obj``'s twin (see
        ``Executor.observe``): ``with bx.observe(obj, ["x"]) as changes: for
        change in changes: ...``; the subscription is live once the ``with``
        block is entered, and leaving it unsubscribes.

        Raises:
            NotAllowedError: a name is private or not an identifier.
        """
        return self._stream("observe", lambda: self._executor.observe(obj, names))


class BlockingInvocation:
    """``Invocation`` for sync code: the same methods, blocking."""

    def __init__(self, owner: BlockingExecutor, invocation: Invocation) -> None:
        self._owner = owner
        self.invocation = invocation
        self.id = invocation.id

    def __repr__(self) -> str:
        return f"<BlockingInvocation {self.id}>"

    def result(self) -> Any:
        """Its value once it has finished (or its error, raised here)."""
        return self._owner._call("result", self.invocation.result)

    def info(self) -> InvocationInfo:
        return self._owner._call("info", self.invocation.info)

    def cancel(self) -> InvocationInfo:
        """Ask it to stop; its info after the request."""
        return self._owner._call("cancel", self.invocation.cancel)

    def follow_log(self) -> BlockingStream[LogEntry]:
        """Its log records as they come, until it has finished."""
        return self._owner._stream("follow_log", self.invocation.follow_log)


class BlockingStream(Generic[T]):
    """A remote stream for sync code: an iterator and a context manager.

    Each item comes through the executor's loop one at a time, within the
    stream's back-pressure. Leaving the ``with`` block, ``close()``, or
    dropping the stream unfinished closes the generator where it runs (its
    ``finally`` runs there). Iterate one stream from one thread at a time.
    """

    def __init__(self, owner: BlockingExecutor, stream: RemoteStream) -> None:
        self._owner = owner
        self._stream = stream
        self._closed = False

    def __enter__(self) -> Self:
        self._owner._call("gen", self._stream.__aenter__)  # a remote stream opens here
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        item = self._owner._call("gen", _step, self._stream)
        if item is _END:
            self._closed = True
            raise StopIteration
        return cast("T", item)

    def close(self) -> None:
        """Close the generator where it runs and wait for that; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owner.started:  # else stopping the executor closed it
            self._owner._call("close", self._stream.aclose)

    def __del__(self) -> None:
        # Dropped unfinished (a ``for`` left by ``break``, without ``with``):
        # close it as Python closes a dropped generator, but without waiting,
        # since this may run in any thread, the loop's own included.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        portal = self._owner._portal
        if portal is None:
            return
        try:
            portal.start_task_soon(self._stream.aclose)
        except RuntimeError:  # in the loop's thread, or the loop is stopping
            pass
