"""The executor interface, the active-executor context, and remote method markers.

Every executor implements the abstract methods of ``Executor``; what can be
written once in terms of them (``remote_instance``, applying config and
properties, lifecycle checks, entering the context) lives here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import sys
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, ClassVar, Self

import anyio

from .exceptions import DeadlineExceeded, ExecutorStateError, NotAllowedError
from .invocations import InvocationInfo, InvocationStatus
from .registry import InstanceRegistry

# The public names (re-exported by ``remote_exec``); the other helpers here
# (``executor_for``, ``remote_method``, ``resolve_call``, ``module_name``, ...)
# serve the decorators and the executors.
__all__ = [
    "NO_CALLBACK",
    "Executor",
    "ExecutorContext",
    "Invocation",
    "PropertyChange",
    "RemoteStream",
    "current_executor",
]

NO_CALLBACK = "#@none"
"""Pass as ``callback`` to say explicitly that a method has no callback."""

_current: contextvars.ContextVar[Executor | None] = contextvars.ContextVar(
    "remote_exec_current_executor", default=None
)


def current_executor() -> Executor | None:
    """The executor of the innermost active ``ExecutorContext`` of this task, or None."""
    return _current.get()


PIN_ATTRIBUTES = ("remote_executor", "pymoa_executor")
"""Attributes through which an object pins its own executor: remote-exec's name,
then pymoa-remote's (so objects written for pymoa-remote keep working)."""

_in_place: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "remote_exec_in_place", default=False
)


def executor_for(obj: Any) -> Executor | None:
    """The executor a decorated method of ``obj`` runs through: the one ``obj``
    pins (``remote_executor``, else ``pymoa_executor``; None means unpinned),
    else the innermost ``ExecutorContext``'s, else None (run locally).

    Pins are not followed by code an executor runs (``running_in_place``): it
    already runs where the object lives, and re-entering the executor from
    there would queue a call behind the one making it.

    Raises:
        TypeError: the pinning attribute holds something other than an executor.
    """
    for attribute in PIN_ATTRIBUTES:
        pinned = getattr(obj, attribute, None)
        if pinned is not None:
            if not isinstance(pinned, Executor):
                raise TypeError(
                    f"{type(obj).__qualname__}.{attribute} must be an executor or None, "
                    f"not {type(pinned).__qualname__}"
                )
            if not _in_place.get():
                return pinned
            break
    return _current.get()


@contextmanager
def running_in_place() -> Iterator[None]:
    """Mark the code run inside as run by an executor, where its instances
    live (an instance's worker thread): objects' pinned executors are not
    followed there, so decorated methods called from it run in place unless
    an ``ExecutorContext`` entered there says otherwise."""
    token = _in_place.set(True)
    try:
        yield
    finally:
        _in_place.reset(token)


@dataclass(slots=True)
class ClientMainImport:
    """A client's main script being imported on the remote side (the daemon
    with ``--allow-import-from-main``, the process executor's child) to create
    a class it defines; see ``importing_client_main``.

    ``trapped`` says what its top-level code tried that must not run there
    (starting an executor, running an event loop), and where; ``thread`` is
    the thread that imports it.
    """

    path: str
    trapped: str | None = None
    thread: int = 0

    def message(self) -> str:
        """The error that explains the trap and names the fix."""
        return (
            f"the client's main script {self.path} was imported on the remote side (a "
            "process executor's child, or a daemon with --allow-import-from-main) to "
            f"create a class it defines, and its top-level code {self.trapped}, which "
            "would run the client's program again over there. Put that code under "
            '`if __name__ == "__main__":` so that it runs only when the file is run as a '
            "program, or move the class into a module of its own"
        )


_client_main: contextvars.ContextVar[ClientMainImport | None] = contextvars.ContextVar(
    "remote_exec_client_main", default=None
)


@contextmanager
def importing_client_main(path: str) -> Iterator[ClientMainImport]:
    """Mark the code run inside (and the event loops and tasks it would start,
    which inherit the context) as the import of a client's main script on the
    remote side: an executor started there raises ``ExecutorStateError``
    (``check_not_importing_client_main``). The marker records what was tried."""
    marker = ClientMainImport(path, thread=threading.get_ident())
    token = _client_main.set(marker)
    try:
        yield marker
    finally:
        _client_main.reset(token)


def check_not_importing_client_main(what: str) -> None:
    """Raise ``ExecutorStateError`` if a client's main script is being imported
    on the remote side (``importing_client_main``): ``what`` (e.g. "starts a
    ProcessExecutor") must not happen there.

    Raises:
        ExecutorStateError: naming the script, the line that did it and the fix.
    """
    marker = _client_main.get()
    if marker is None:
        return
    # The script's line is on this thread's stack, or (an executor started on
    # a loop in another thread, e.g. a blocking portal's) on the importing one's.
    where = script_location(marker.path, sys._getframe(1)) or script_location(
        marker.path, sys._current_frames().get(marker.thread)
    )
    marker.trapped = f"{what}{where}"
    raise ExecutorStateError(marker.message())


def script_location(path: str, frame: Any) -> str:
    """`` (line N)`` of the innermost frame of ``frame``'s stack that runs the
    file ``path``, or "" if none does."""
    while frame is not None:
        if frame.f_code.co_filename == path:
            return f" (line {frame.f_lineno})"
        frame = frame.f_back
    return ""


class ExecutorContext:
    """Make ``executor`` run the decorated methods called inside the block.

    Contexts nest (the innermost wins) and are task-local: they live in a
    ``ContextVar``, so two tasks can use two executors at once. An object that
    pins its own executor (see ``executor_for``) ignores them.
    """

    def __init__(self, executor: Executor | None) -> None:
        self.executor = executor
        self._tokens: list[contextvars.Token[Executor | None]] = []

    def __enter__(self) -> Executor | None:
        self._tokens.append(_current.set(self.executor))
        return self.executor

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._tokens.pop())


@dataclass(frozen=True, slots=True)
class RemoteMethod:
    """What ``apply_executor``/``apply_generator_executor`` record on a method.

    The server calls only methods that carry one of these; it calls ``func``
    (the undecorated function) directly.
    """

    name: str
    func: Callable[..., Any]
    is_generator: bool
    is_async: bool
    callback: Callable[..., Any] | str | None
    # False: a sync method that never blocks, which a server may run on its
    # event loop instead of in the instance's thread (``apply_executor``).
    blocking: bool = True
    timeout: float | None = None  # seconds per call (``apply_executor(timeout=...)``)


@functools.lru_cache(maxsize=4096)
def remote_method(cls: type, name: str) -> RemoteMethod:
    """The remote method ``name`` of ``cls``, if it may be called remotely.

    Cached: this runs on every call, on both sides.

    Raises:
        NotAllowedError: private names, undecorated or missing methods.
    """
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise NotAllowedError(
            f"{name!r} is not a callable method name (private or not an identifier)"
        )
    attr = inspect.getattr_static(cls, name, None)
    marker = getattr(attr, "__remote_exec__", None)
    if not isinstance(marker, RemoteMethod):
        raise NotAllowedError(
            f"{cls.__qualname__}.{name} is not decorated with apply_executor or "
            "apply_generator_executor, so it cannot be called remotely"
        )
    return marker


def resolve_call(
    obj: Any,
    fn: Callable[..., Any] | str,
    callback: Callable[..., Any] | str | None,
    *,
    generator: bool,
) -> tuple[RemoteMethod, Callable[[Any], Any] | None]:
    """What every executor needs to run ``fn`` of ``obj``: its marker and the
    bound callback (the one given, else the decorator's).

    Raises:
        NotAllowedError: ``fn`` is not a decorated public method.
        TypeError: a generator through ``execute``, or the other way round.
    """
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
    cls: type = type(obj)
    marker = remote_method(cls, name)
    if marker.is_generator != generator:
        raise TypeError(
            f"{marker.name} is a generator method: use execute_generator"
            if marker.is_generator
            else f"{marker.name} is not a generator method: use execute"
        )
    return marker, resolve_callback(obj, marker.callback if callback is None else callback)


def resolve_callback(
    obj: Any, callback: Callable[..., Any] | str | None
) -> Callable[[Any], Any] | None:
    """The bound callback of ``obj`` for a method's ``callback`` option."""
    if callback is None or callback == NO_CALLBACK:
        return None
    if isinstance(callback, str):
        bound: Callable[[Any], Any] = getattr(obj, callback)
        return bound
    name = getattr(callback, "__name__", None)
    if name is not None and getattr(type(obj), name, None) is callback:
        bound = getattr(obj, name)
        return bound
    return callback


class RemoteStream(ABC):
    """The result of calling a generator method: an async context manager that
    yields an async iterator, and that async iterator itself.

    Leaving the ``async with`` block (or ``aclose()``) closes the generator
    where it runs, so its ``finally`` runs there. ``async for`` alone cannot:
    a ``break`` does not close an async iterator. So an executor's stream that
    is collected while its generator may still run (iteration stopped early,
    never closed) closes it then and warns (``_closed_when_collected``).
    """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    @abstractmethod
    async def __anext__(self) -> Any: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Close the generator (idempotent)."""

    def _closed_when_collected(
        self, call: str, call_soon: Callable[..., object], close: Callable[..., object], *args: Any
    ) -> None:
        """For ``__del__`` of a stream dropped while its generator may still run.

        A finaliser cannot await and may run in any thread, so ``close(*args)``
        is scheduled on the executor's loop through ``call_soon``, its
        thread-safe entry point (it must not need this stream). If that loop is
        gone, nothing can close it any more (a remote side closes it when the
        connection drops). Either way a ``ResourceWarning`` names the ``call``
        and says how to close it in time.
        """
        if sys.is_finalizing():
            return
        # Raises if its loop is closed, or its trio run finished.
        with contextlib.suppress(Exception):
            call_soon(close, *args)
        warnings.warn(
            f"the stream of {call} was dropped before its end without being closed, so "
            "its generator is closed only now; use `async with` (`async with "
            "obj.method(...) as items:`) or `await items.aclose()` to close it as soon "
            "as you stop iterating",
            ResourceWarning,
            stacklevel=2,
            source=self,
        )


@dataclass(frozen=True, slots=True)
class PropertyChange:
    """One item of ``executor.observe(obj, names)``: an attribute's value.

    ``seq`` counts the subscription's items from 1 and only goes up; a gap
    before a resynchronisation is the changes it replaced. ``resync`` marks the
    items of a resynchronisation: the subscriber fell behind, so it gets the
    current value of every observed name, one item per name in the order
    asked, all marked, instead of what it missed. ``error`` is
    ``"TypeName: message"`` when reading the attribute raised (``value`` is
    then None) or its value could not travel; a read that works again is a
    change. So ``state[change.name] = change.value`` keeps a copy up to date.
    """

    seq: int
    name: str
    value: Any
    resync: bool = False
    error: str | None = None

    def to_wire(self) -> list[Any]:
        return [self.seq, self.name, self.value, self.resync, self.error]

    @classmethod
    def from_wire(cls, row: Any) -> PropertyChange:
        seq, name, value, resync, error = row
        return cls(int(seq), str(name), value, bool(resync), None if error is None else str(error))


class ChangeStream(RemoteStream):
    """An ``observe`` stream's wire rows as ``PropertyChange`` items.

    Entering waits for the first item (the initial values), so that the
    subscription is live, or its refusal raised, when the block starts.
    """

    def __init__(self, stream: RemoteStream) -> None:
        self._stream = stream
        self._first: PropertyChange | None = None
        self._over = False

    async def __aenter__(self) -> Self:
        try:
            await self._stream.__aenter__()
            self._first = PropertyChange.from_wire(await self._stream.__anext__())
        except StopAsyncIteration:
            self._over = True  # the instance went away at once
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._stream.aclose()
            raise
        return self

    async def __anext__(self) -> PropertyChange:
        first, self._first = self._first, None
        if first is not None:
            return first
        if self._over:
            raise StopAsyncIteration
        return PropertyChange.from_wire(await self._stream.__anext__())

    async def aclose(self) -> None:
        self._over = True
        self._first = None
        await self._stream.aclose()


class MappedStream(RemoteStream):
    """Another stream's items, each passed through ``convert``."""

    def __init__(self, stream: RemoteStream, convert: Callable[[Any], Any]) -> None:
        self._stream = stream
        self._convert = convert

    async def __anext__(self) -> Any:
        return self._convert(await self._stream.__anext__())

    async def aclose(self) -> None:
        await self._stream.aclose()


class Invocation:
    """A handle on one invocation, by id (``executor.submit(...)`` or
    ``executor.invocation(id)``): its outcome, its info, its log; cancel it."""

    __slots__ = ("_accepted", "executor", "id")

    def __init__(
        self,
        executor: Executor,
        invocation_id: str,
        accepted: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.executor = executor
        self.id = invocation_id
        # Awaits the remote side's acceptance of a submitted call (raises its refusal).
        self._accepted = accepted

    def __repr__(self) -> str:
        return f"<Invocation {self.id} of {type(self.executor).__name__}>"

    async def _started(self) -> None:
        accepted = self._accepted
        if accepted is not None:
            await accepted()
            self._accepted = None

    async def result(self) -> Any:
        """Its value once it has finished (or its error, raised here)."""
        await self._started()
        return await self.executor.invocation_result(self.id)

    async def info(self) -> InvocationInfo:
        await self._started()
        return await self.executor.get_invocation(self.id)

    async def cancel(self) -> InvocationInfo:
        """Ask it to stop (see ``Executor.cancel_invocation``)."""
        await self._started()
        return await self.executor.cancel_invocation(self.id)

    def follow_log(self) -> RemoteStream:
        """Its log records as they come (see ``Executor.follow_log``)."""
        return self.executor.follow_log(self.id)


def bound_method(fn: Callable[..., Any], what: str) -> tuple[Any, RemoteMethod]:
    """The object and marker of a bound decorated method (``obj.method``).

    Raises:
        TypeError: ``fn`` is not one (``what`` says who wanted it).
    """
    marker = getattr(fn, "__remote_exec__", None)
    obj = getattr(fn, "__self__", None)
    if not isinstance(marker, RemoteMethod) or obj is None:
        raise TypeError(
            f"{what} takes a bound method decorated with apply_executor "
            f"or apply_generator_executor (obj.method), not {fn!r}"
        )
    return obj, marker


def submittable(fn: Callable[..., Any]) -> tuple[Any, RemoteMethod]:
    """``bound_method`` for ``submit``: a decorated method that is not a generator."""
    obj, marker = bound_method(fn, "submit()")
    if marker.is_generator:
        raise TypeError(f"{marker.name} is a generator method: it cannot be submitted")
    return obj, marker


class Executor(ABC):
    """Runs decorated methods of held instances somewhere else.

    Use it as an async context manager: entering starts it and, unless
    ``init_context=False``, enters ``ExecutorContext(self)`` until exit.
    """

    is_remote: ClassVar[bool] = True

    def __init__(
        self, *, registry: InstanceRegistry | None = None, init_context: bool = True
    ) -> None:
        self.registry = registry if registry is not None else InstanceRegistry()
        self.init_context = init_context
        self._state = "new"
        self._context: ExecutorContext | None = None

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.start()
        if self.init_context:
            self._context = ExecutorContext(self)
            self._context.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context, self._context = self._context, None
        if context is not None:
            try:
                context.__exit__(exc_type, exc, tb)
            except ValueError:  # exited from another context than the one entered
                pass
        await self.stop()

    @property
    def started(self) -> bool:
        return self._state == "running"

    async def start(self) -> None:
        """Start the executor (``async with`` does this).

        Raises:
            ExecutorStateError: started twice, or started by a client's main
                script while the remote side imports it (an unguarded
                ``anyio.run(main)``: see ``importing_client_main``).
        """
        check_not_importing_client_main(f"starts a {type(self).__name__}")
        if self._state != "new":
            raise ExecutorStateError(f"{type(self).__name__} cannot be started twice")
        self._state = "starting"
        try:
            await self._start()
        except BaseException:
            self._state = "stopped"
            raise
        self._state = "running"

    async def stop(self) -> None:
        """Stop the executor; further use raises ``ExecutorStateError``. Idempotent."""
        if self._state in ("stopped", "stopping", "new"):
            self._state = "stopped"
            return
        self._state = "stopping"
        try:
            await self._stop()
        finally:
            self._state = "stopped"

    def check_running(self) -> None:
        """Raise a clear error unless the executor is started and not stopped."""
        if self._state == "running":
            return
        name = type(self).__name__
        if self._state in ("new", "starting"):
            raise ExecutorStateError(
                f"{name} is not started: use `async with {name}(...) as executor:`"
            )
        raise ExecutorStateError(f"{name} has been stopped and cannot be used any more")

    @abstractmethod
    async def _start(self) -> None: ...

    @abstractmethod
    async def _stop(self) -> None: ...

    # -- instances -------------------------------------------------------------
    @abstractmethod
    async def ensure_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> bool:
        """Create the remote twin of ``obj`` as ``name`` (from its class, ``args``,
        ``kwargs`` and ``_config_props_``); False if ``name`` already existed
        (its scope stays what it was).

        ``scope``: "server" (the default: it lives until deleted) or
        "connection" (deleted when the connection that made it closes or is
        lost, and when this executor stops; see ``SCOPES``). A class that is a
        context manager (sync or async) is entered where it lives right after
        it is built, and exited exactly once when it is deleted.

        Raises:
            ValueError: ``scope`` is not one of ``SCOPES``.
        """

    @abstractmethod
    async def delete_remote_instance(self, obj: Any) -> None:
        """Delete the remote twin of ``obj`` and forget it."""

    @asynccontextmanager
    async def remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Create ``obj``'s remote twin as ``name`` for the block, delete it after
        (``scope``: see ``ensure_remote_instance``).

        Raises:
            DuplicateInstanceError: ``name`` already exists.
            ValueError: ``scope`` is not one of ``SCOPES``.
        """
        self.check_running()
        check_scope(scope)
        await self.create_remote_instance(obj, name, *args, scope=scope, **kwargs)
        try:
            yield obj
        finally:
            if self.started:
                await self.delete_remote_instance(obj)

    @abstractmethod
    async def create_remote_instance(
        self, obj: Any, name: str, *args: Any, scope: str = "server", **kwargs: Any
    ) -> None:
        """Like ``ensure_remote_instance`` but ``name`` must not exist yet."""

    @abstractmethod
    async def get_remote_objects(self) -> list[str]:
        """The names of every instance the remote side holds."""

    # -- invocations -------------------------------------------------------------
    @abstractmethod
    async def list_invocations(
        self,
        *,
        instance: Any = None,
        method: str | None = None,
        status: str | InvocationStatus | None = None,
    ) -> list[InvocationInfo]:
        """Every invocation the remote side knows (of every client), oldest
        first; ``instance`` (a held object or its name), ``method`` and
        ``status`` filter them."""

    @abstractmethod
    async def get_invocation(self, invocation_id: str) -> InvocationInfo:
        """The invocation ``invocation_id``.

        Raises:
            LookupError: unknown, or expired.
        """

    @abstractmethod
    async def cancel_invocation(self, invocation_id: str) -> InvocationInfo:
        """Ask ``invocation_id`` to stop: pending, it never starts; running async,
        it is cancelled; running sync, it stops at its next ``check_cancelled()``.
        Its info as it is after the request.

        Raises:
            LookupError: unknown, or expired.
        """

    @abstractmethod
    async def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Invocation:
        """Start a detached call of the decorated method ``fn`` (bound:
        ``obj.method``) and return its handle as soon as the call is sent.

        It keeps running when the submitting task is cancelled or its
        connection is lost; anyone may read its status and outcome by id
        (``invocation(id)``) until it expires. A deadline around ``submit``
        bounds only the sending: the call's own bound is the method's ``timeout=``.

        Raises:
            TypeError: ``fn`` is not a bound decorated method, or a generator.
        """

    def invocation(self, invocation_id: str) -> Invocation:
        """A handle on the existing invocation ``invocation_id``."""
        if not isinstance(invocation_id, str):
            raise TypeError(f"an invocation id is a str, not {type(invocation_id).__name__}")
        return Invocation(self, invocation_id)

    @abstractmethod
    async def invocation_result(self, invocation_id: str) -> Any:
        """The outcome of the submitted invocation ``invocation_id``, once it
        has finished: its value, or its error raised here.

        Raises:
            LookupError: unknown, expired, or not submitted (its outcome went
                to its caller).
        """

    @abstractmethod
    def follow_log(self, invocation_id: str) -> RemoteStream:
        """The log records (``LogEntry``) of ``invocation_id`` as they come:
        those kept so far, then each new one, until it has finished.

        Raises (when iterated):
            LookupError: unknown, or expired.
        """

    def _instance_name(self, instance: Any) -> str | None:
        """An ``instance`` filter as a name: a held object, or already a name."""
        if instance is None or isinstance(instance, str):
            return instance
        return self.registry.require_name(instance)

    # -- calls -----------------------------------------------------------------
    @abstractmethod
    async def execute(
        self,
        obj: Any,
        fn: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> Any:
        """Run the decorated method ``fn`` of held ``obj``; ``callback`` gets the result."""

    @abstractmethod
    def execute_generator(
        self,
        obj: Any,
        gen: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> RemoteStream:
        """Run the decorated generator ``gen`` of held ``obj`` as a stream."""

    # -- config and properties -------------------------------------------------
    @abstractmethod
    async def get_remote_object_config(self, obj: Any | None) -> dict[str, Any]:
        """The ``_config_props_`` values of ``obj``'s twin (None: every instance, by name)."""

    async def apply_config_from_remote(self, obj: Any) -> None:
        """Copy the twin's config properties onto ``obj``."""
        for key, value in (await self.get_remote_object_config(obj)).items():
            setattr(obj, key, value)

    @abstractmethod
    async def get_remote_object_property_data(
        self, obj: Any, names: Iterable[str]
    ) -> dict[str, Any]:
        """The values of the public attributes ``names`` of ``obj``'s twin."""

    async def apply_property_data_from_remote(self, obj: Any, names: Iterable[str]) -> None:
        """Copy the twin's attributes ``names`` onto ``obj``."""
        for key, value in (await self.get_remote_object_property_data(obj, names)).items():
            setattr(obj, key, value)

    # -- clock, imports, channels ----------------------------------------------
    @abstractmethod
    async def get_echo_clock(self) -> tuple[int, int, int]:
        """(local ns before sending, remote ns, local ns after receiving)."""

    @abstractmethod
    async def sleep(self, duration: float | None = None, deadline: float | None = None) -> int:
        """Sleep on the remote side for ``duration`` seconds, or until ``deadline``,
        a remote ``time.perf_counter_ns()`` value (the clock and unit of the remote
        time ``get_echo_clock()`` returns); returns that clock when it woke.

        Raises:
            ValueError: neither or both given, or not a finite number
                (``check_sleep``).
        """

    @abstractmethod
    async def remote_import(self, module: str | ModuleType) -> None:
        """Import ``module`` (a module or its dotted name) on the remote side (it
        must be on the allow-list); ``module_name`` turns either into the name."""

    @abstractmethod
    async def register_remote_class(self, cls: type) -> None:
        """Make ``cls`` known to the remote side (its module must be allowed)."""

    @abstractmethod
    def get_channel_from_remote(self, name: str, channel: str) -> RemoteStream:
        """Events of instance ``name`` ("" for all) on ``channel`` ("create",
        "delete", "execute", or "" for all), as a stream."""

    @abstractmethod
    def observe(self, obj: Any, names: Iterable[str]) -> RemoteStream:
        """Watch the public attributes ``names`` of ``obj``'s twin:
        ``async with executor.observe(obj, ["x"]) as changes:`` yields
        ``PropertyChange`` items, first the current value of each name, then
        each change, read where the twin lives after each of its calls ends
        (sync and async methods, generator steps) and compared with ``!=``.

        The subscription is live once the block is entered; leaving it
        unsubscribes. A subscriber that falls behind (``max_queued_events``
        changes not taken, 1024 by default) gets one resynchronisation (every
        current value, marked ``resync``) instead of what it missed. The
        stream ends when the instance is deleted.

        Raises:
            NotAllowedError: a name is private or not an identifier.
            ValueError: no names.
        """


DEADLINE_GRACE = 2.0
"""Seconds a caller waits past a method's ``timeout`` for the remote side's own
answer (which says whether the call expired queued or running) before it
gives up on its own."""


CALLER_DEADLINE_MARGIN = 0.25
"""Seconds added to a caller's own deadline when it travels with a call: the
caller's scope (which moves on, or raises its own ``TimeoutError``) ends the
wait first, and the remote side's copy is the backstop that keeps a queued
call from starting and a running one from running on."""


def call_deadline(timeout: float | None) -> float | None:
    """Seconds a call may take from now: the method's ``timeout`` or the
    caller's own deadline (an anyio, trio or asyncio one, plus
    ``CALLER_DEADLINE_MARGIN``), whichever is sooner; None for neither. Sent
    with the call as time remaining, so the two sides' clocks need not agree."""
    deadline = anyio.current_effective_deadline()
    if deadline == math.inf:  # the common case: no clock to read
        return timeout
    remaining = deadline - anyio.current_time() + CALLER_DEADLINE_MARGIN
    return timeout if timeout is not None and timeout < remaining else remaining


async def wait_for_answer(answered: anyio.Event, method_timeout: float) -> None:
    """Wait for a call of a method with ``timeout=``: its remote side answers
    at the deadline (saying queued or running); if it cannot (a sync method
    that never checks), the caller stops waiting ``DEADLINE_GRACE`` later.

    Raises:
        DeadlineExceeded: no answer came.
    """
    with anyio.move_on_after(method_timeout + DEADLINE_GRACE):
        await answered.wait()
        return
    raise DeadlineExceeded(
        f"the call passed its deadline of {method_timeout} s while running "
        "(and its method did not stop: it should check_cancelled())"
    )


def check_sleep(duration: Any, deadline: Any) -> None:
    """The rule of ``Executor.sleep``'s arguments, the same on every executor.

    Raises:
        ValueError: neither or both given, or not a finite int or float.
    """
    if (duration is None) == (deadline is None):
        raise ValueError("sleep needs either a duration (s) or a deadline (ns), not both")
    value = duration if deadline is None else deadline
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"sleep needs a finite number, got {value!r}")


def module_name(module: str | ModuleType) -> str:
    """The dotted name of ``module``, given as a module object or as its name
    (pymoa-remote's ``remote_import`` takes either; only the name travels).

    Raises:
        TypeError: ``module`` is neither a module nor a string.
    """
    if isinstance(module, ModuleType):
        return module.__name__
    if isinstance(module, str):
        return module
    raise TypeError(f"remote_import takes a module or its name, not {type(module).__name__}")


def config_of(obj: Any) -> dict[str, Any]:
    """The values of ``obj``'s ``_config_props_`` (copied to its remote twin)."""
    return {name: getattr(obj, name) for name in getattr(type(obj), "_config_props_", ())}


SCOPES = ("server", "connection")
"""The scopes of an instance: "server" lives until deleted; "connection" is
deleted too when the connection that created it closes or is lost (for
ThreadExecutor and ProcessExecutor, whose connection is the executor itself,
and for RayExecutor: when the executor stops)."""


def check_scope(scope: Any) -> str:
    """``scope`` if it is one of ``SCOPES``.

    Raises:
        ValueError: it is not.
    """
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"scope must be 'server' or 'connection', not {scope!r}")
    return scope


def check_observed_names(names: Any) -> tuple[str, ...]:
    """The rule of ``Executor.observe``'s names, the same on every executor
    and on the server (as for ``get_remote_object_property_data``: public
    attribute names only): the names in order, without repeats.

    Raises:
        TypeError: ``names`` is one string, or not an iterable of strings.
        NotAllowedError: a name is private (starts with ``_``) or not an identifier.
        ValueError: no names.
    """
    if isinstance(names, (str, bytes)):
        raise TypeError("observe takes a list of attribute names, not one string")
    try:
        wanted = tuple(dict.fromkeys(names))
    except TypeError:
        raise TypeError(f"observe takes a list of attribute names, not {names!r}") from None
    for name in wanted:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise NotAllowedError(f"{name!r} is not a public attribute name")
    if not wanted:
        raise ValueError("observe needs at least one attribute name")
    return wanted


CHANNELS = ("create", "delete", "execute")


def check_channel(name: str, channel: str) -> None:
    if not isinstance(name, str) or not isinstance(channel, str):
        raise TypeError("channel name and kind must be strings")
    if channel and channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: use one of {CHANNELS} or '' for all")
