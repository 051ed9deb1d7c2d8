"""``apply_executor`` and ``apply_generator_executor``.

A decorated method runs through the executor the object pins (its
``remote_executor`` attribute, or pymoa-remote's ``pymoa_executor``), else
through the executor of the innermost active ``ExecutorContext``; with
neither, it runs locally (sync called, async awaited, generators iterated)
and its callback still runs with each result.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from remote_exec.executor import RemoteMethod, RemoteStream, executor_for, resolve_callback

__all__ = ["LocalStream", "apply_executor", "apply_generator_executor"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
S = TypeVar("S")

Callback = Callable[..., Any] | str | None


class _ExecutorDecorator(Protocol):
    @overload
    def __call__(
        self, func: Callable[Concatenate[S, P], Awaitable[R]]
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(
        self, func: Callable[Concatenate[S, P], R]
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]: ...


class TypedStream(Protocol[T]):
    """What a decorated generator method returns (a ``RemoteStream``), typed by item."""

    async def __aenter__(self) -> TypedStream[T]: ...
    async def __aexit__(self, *exc_info: object) -> None: ...
    def __aiter__(self) -> TypedStream[T]: ...
    async def __anext__(self) -> T: ...
    async def aclose(self) -> None: ...


class _GeneratorDecorator(Protocol):
    @overload
    def __call__(
        self, func: Callable[Concatenate[S, P], AsyncIterator[T]]
    ) -> Callable[Concatenate[S, P], TypedStream[T]]: ...
    @overload
    def __call__(
        self, func: Callable[Concatenate[S, P], Any]
    ) -> Callable[Concatenate[S, P], RemoteStream]: ...


def _is_generator(func: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)


@overload
def apply_executor(
    func: Callable[Concatenate[S, P], Awaitable[R]],
    *,
    callback: Callback = None,
    blocking: bool = True,
    timeout: float | None = None,
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]: ...
@overload
def apply_executor(
    func: Callable[Concatenate[S, P], R],
    *,
    callback: Callback = None,
    blocking: bool = True,
    timeout: float | None = None,
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]: ...
@overload
def apply_executor(
    func: None = None,
    *,
    callback: Callback = None,
    blocking: bool = True,
    timeout: float | None = None,
) -> _ExecutorDecorator: ...


def apply_executor(
    func: Callable[..., Any] | None = None,
    *,
    callback: Callback = None,
    blocking: bool = True,
    timeout: float | None = None,
) -> Any:
    """Run a sync or async method through the active executor; always awaited.

    The executor is the one the object pins in its ``remote_executor``
    attribute (or ``pymoa_executor``, pymoa-remote's name), else the innermost
    ``ExecutorContext``'s; with neither (None counts as unpinned), the method
    runs locally.

    Args:
        func: the method (or omit it to pass options: ``@apply_executor(callback=...)``).
        callback: a method of the same class (or its name, or ``NO_CALLBACK``)
            called with the return value on the calling side, in call order.
        blocking: ``False`` promises that a sync method returns at once (no
            I/O, no sleep, no lock): a remote server (process or daemon) then
            runs it on its event loop, in the instance's turn, instead of
            handing it to the instance's thread and back (two thread
            wake-ups per call). A method that does block then stalls the whole
            server while it runs. ``ThreadExecutor`` always uses the thread.

    Raises:
        TypeError: ``func`` is a generator (use ``apply_generator_executor``),
            or ``blocking=False`` is given for an async method (which runs on
            the event loop anyway).
        timeout: seconds each call through an executor may take, from when it
            is made: the remote side never starts it once that passed while it
            was queued, cancels it at the deadline while it runs (a sync method
            at its next ``check_cancelled()``), and the caller gets
            ``DeadlineExceeded``. A deadline around the awaiting code travels
            too; the earliest wins.

    Raises:
        ValueError: ``timeout`` is not a positive number of seconds.
    """
    _check_timeout(timeout)
    if func is None:
        return functools.partial(
            apply_executor, callback=callback, blocking=blocking, timeout=timeout
        )
    if _is_generator(func):
        raise TypeError(
            f"{func.__qualname__} is a generator: decorate it with apply_generator_executor"
        )
    is_async = inspect.iscoroutinefunction(func)
    if is_async and not blocking:
        raise TypeError(
            f"{func.__qualname__} is async: it runs on the event loop already, "
            "blocking=False is for sync methods"
        )
    name = func.__name__

    @functools.wraps(func)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        executor = executor_for(self)
        if executor is not None:
            return await executor.execute(self, name, args, kwargs, callback)
        result = func(self, *args, **kwargs)
        if is_async:
            result = await result
        bound = resolve_callback(self, callback)
        if bound is not None:
            bound(result)
        return result

    wrapper.__remote_exec__ = RemoteMethod(  # type: ignore[attr-defined]
        name, func, False, is_async, callback, blocking, timeout
    )
    return wrapper


@overload
def apply_generator_executor(
    func: Callable[Concatenate[S, P], AsyncIterator[T]],
    *,
    callback: Callback = None,
    timeout: float | None = None,
) -> Callable[Concatenate[S, P], TypedStream[T]]: ...
@overload
def apply_generator_executor(
    func: Callable[Concatenate[S, P], Any],
    *,
    callback: Callback = None,
    timeout: float | None = None,
) -> Callable[Concatenate[S, P], RemoteStream]: ...
@overload
def apply_generator_executor(
    func: None = None, *, callback: Callback = None, timeout: float | None = None
) -> _GeneratorDecorator: ...


def apply_generator_executor(
    func: Callable[..., Any] | None = None,
    *,
    callback: Callback = None,
    timeout: float | None = None,
) -> Any:
    """Run a sync or async generator method through the active executor.

    The executor is chosen as for ``apply_executor``: the object's pinned
    ``remote_executor`` (or ``pymoa_executor``), else the innermost
    ``ExecutorContext``'s, else none (the generator runs locally).

    The call returns a ``RemoteStream``: ``async with obj.gen() as items:`` then
    ``async for item in items``, or iterate it directly. Leaving the block early
    closes the generator where it runs. ``callback`` runs once per item.

    ``timeout``: seconds the whole stream may take on the remote side (it
    never starts once that passed while queued; its code's
    ``check_cancelled()`` raises after it).

    Raises:
        TypeError: ``func`` is not a generator (use ``apply_executor``).
        ValueError: ``timeout`` is not a positive number of seconds.
    """
    _check_timeout(timeout)
    if func is None:
        return functools.partial(apply_generator_executor, callback=callback, timeout=timeout)
    if not _is_generator(func):
        raise TypeError(f"{func.__qualname__} is not a generator: decorate it with apply_executor")
    is_async = inspect.isasyncgenfunction(func)
    name = func.__name__

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> RemoteStream:
        executor = executor_for(self)
        if executor is not None:
            return executor.execute_generator(self, name, args, kwargs, callback)
        return LocalStream(func(self, *args, **kwargs), resolve_callback(self, callback))

    wrapper.__remote_exec__ = RemoteMethod(  # type: ignore[attr-defined]
        name, func, True, is_async, callback, True, timeout
    )
    return wrapper


class LocalStream(RemoteStream):
    """A generator run in the caller's own task (no executor active)."""

    def __init__(self, gen: Any, callback: Callable[[Any], Any] | None) -> None:
        self._gen = gen
        self._callback = callback
        self._is_async = inspect.isasyncgen(gen)
        self._closed = False

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self._gen.__anext__() if self._is_async else next(self._gen)
        except StopIteration:
            self._closed = True
            raise StopAsyncIteration from None
        except StopAsyncIteration:
            self._closed = True
            raise
        if self._callback is not None:
            self._callback(item)
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._is_async:
            await self._gen.aclose()
        else:
            self._gen.close()


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (
        type(timeout) not in (int, float) or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
