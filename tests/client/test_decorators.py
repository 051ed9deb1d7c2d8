"""``apply_executor``, ``apply_generator_executor`` and ``ExecutorContext``."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import assert_type

import anyio
import anyio.lowlevel
import pytest

from remote_exec.client.decorators import apply_executor, apply_generator_executor
from remote_exec.client.thread import ThreadExecutor
from remote_exec.exceptions import UnknownInstanceError
from remote_exec.executor import NO_CALLBACK, ExecutorContext, current_executor

pytestmark = pytest.mark.anyio


class Thing:
    def __init__(self) -> None:
        self.seen: list[object] = []
        self.closed_in: int | None = None

    def record(self, value: object) -> None:
        self.seen.append(value)

    @apply_executor
    def add(self, x: int) -> int:
        return x + 1

    @apply_executor
    async def add_async(self, x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x + 2

    @apply_executor(callback=record)
    def times_ten(self, x: int) -> int:
        return x * 10

    @apply_executor(callback="record")
    async def times_hundred(self, x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x * 100

    @apply_executor(callback=NO_CALLBACK)
    def silent(self, x: int) -> int:
        return x

    @apply_executor
    def thread_name(self) -> str:
        return threading.current_thread().name

    @apply_generator_executor(callback=record)
    def count(self, n: int) -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            self.closed_in = threading.get_ident()

    @apply_generator_executor(callback="record")
    async def acount(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                await anyio.lowlevel.checkpoint()
                yield i
        finally:
            self.closed_in = threading.get_ident()


# -- local execution (no executor) ---------------------------------------------
async def test_sync_and_async_methods_run_locally_without_executor() -> None:
    thing = Thing()
    assert current_executor() is None
    assert await thing.add(1) == 2
    assert await thing.add_async(1) == 3
    assert await thing.thread_name() == threading.current_thread().name


async def test_callbacks_run_locally_as_method_as_name_and_not_with_no_callback() -> None:
    thing = Thing()
    assert await thing.times_ten(2) == 20
    assert await thing.times_hundred(3) == 300
    assert await thing.silent(4) == 4
    assert thing.seen == [20, 300]


@pytest.mark.parametrize("method", ["count", "acount"])
async def test_generators_run_locally_with_callback_per_item(method: str) -> None:
    thing = Thing()
    async with getattr(thing, method)(3) as items:
        assert [item async for item in items] == [0, 1, 2]
    assert thing.seen == [0, 1, 2]
    assert thing.closed_in == threading.get_ident()


@pytest.mark.parametrize("method", ["count", "acount"])
async def test_local_generator_iterated_directly_and_closed_early(method: str) -> None:
    thing = Thing()
    stream = getattr(thing, method)(10)
    assert await stream.__anext__() == 0
    assert thing.closed_in is None
    await stream.aclose()
    assert thing.closed_in == threading.get_ident()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


# -- ExecutorContext ------------------------------------------------------------
async def test_contexts_nest_innermost_wins_and_is_restored() -> None:
    thing = Thing()
    async with (
        ThreadExecutor(init_context=False) as outer,
        ThreadExecutor(init_context=False) as inner,
    ):
        await inner.ensure_remote_instance(thing, "inner-thing")
        assert current_executor() is None
        with ExecutorContext(outer):
            assert current_executor() is outer
            with ExecutorContext(inner):
                assert current_executor() is inner
                # Runs through the innermost executor, the only one holding it.
                assert await thing.thread_name() == "remote-exec worker inner-thing"
                with ExecutorContext(None):
                    assert current_executor() is None
                    assert await thing.thread_name() == threading.current_thread().name
                assert current_executor() is inner
            assert current_executor() is outer
            with pytest.raises(UnknownInstanceError):
                await thing.add(1)
        assert current_executor() is None
        assert await thing.add(1) == 2


async def test_entering_the_executor_enters_its_context_until_exit() -> None:
    async with ThreadExecutor() as executor:
        assert current_executor() is executor
    assert current_executor() is None


async def test_contexts_are_task_local() -> None:
    thing = Thing()
    both_inside = anyio.Event()
    inside = 0
    seen: dict[str, tuple[object, str]] = {}

    async with (
        ThreadExecutor(init_context=False) as first,
        ThreadExecutor(init_context=False) as second,
    ):
        await first.ensure_remote_instance(thing, "first")
        await second.ensure_remote_instance(thing, "second")

        async def use(label: str, executor: ThreadExecutor) -> None:
            nonlocal inside
            with ExecutorContext(executor):
                inside += 1
                if inside == 2:
                    both_inside.set()
                await both_inside.wait()  # both tasks are inside their own context now
                seen[label] = (current_executor(), await thing.thread_name())

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, "first", first)
            tg.start_soon(use, "second", second)

    assert seen == {
        "first": (first, "remote-exec worker first"),
        "second": (second, "remote-exec worker second"),
    }
    assert current_executor() is None


# -- decoration-time checks ---------------------------------------------------------
def test_apply_executor_refuses_generators() -> None:
    with pytest.raises(TypeError, match="apply_generator_executor"):

        @apply_executor
        def gen(self: object) -> Iterator[int]:
            yield 1

    with pytest.raises(TypeError, match="apply_generator_executor"):

        @apply_executor(callback=NO_CALLBACK)
        async def agen(self: object) -> AsyncIterator[int]:
            yield 1


def test_blocking_false_is_for_sync_methods_only() -> None:
    with pytest.raises(TypeError, match="blocking=False is for sync methods"):

        @apply_executor(blocking=False)
        async def coro(self: object) -> int:
            return 1

    @apply_executor(blocking=False)
    def quick(self: object) -> int:
        return 1

    assert quick.__remote_exec__.blocking is False  # type: ignore[attr-defined]
    assert apply_executor(quick.__wrapped__).__remote_exec__.blocking is True  # type: ignore[attr-defined]


async def test_thread_executor_runs_non_blocking_methods_in_the_thread_too() -> None:
    """ThreadExecutor's promise holds: every call runs in the instance's thread."""

    class Meter:
        @apply_executor(blocking=False)
        def where(self) -> str:
            return threading.current_thread().name

    async with ThreadExecutor() as ex:
        meter = Meter()
        await ex.ensure_remote_instance(meter, "meter")
        assert await meter.where() == "remote-exec worker meter"


def test_apply_generator_executor_refuses_plain_functions() -> None:
    with pytest.raises(TypeError, match="apply_executor"):

        @apply_generator_executor
        def plain(self: object) -> int:
            return 1

    with pytest.raises(TypeError, match="apply_executor"):

        @apply_generator_executor(callback=NO_CALLBACK)
        async def coro(self: object) -> int:
            return 1


# -- an executor that does not hold the object ----------------------------------------
async def test_unknown_instance_error_says_how_to_register() -> None:
    thing = Thing()
    async with ThreadExecutor():
        with pytest.raises(UnknownInstanceError) as info:
            await thing.add(1)
        message = str(info.value)
        assert "Thing" in message
        assert "remote_instance(" in message
        assert "ensure_remote_instance(" in message
        with pytest.raises(UnknownInstanceError, match="register it first"):
            thing.count(3)


# -- typing ---------------------------------------------------------------------
async def typed_calls(thing: Thing) -> int:
    """mypy checks these types (tests/ is type-checked); the test runs them."""
    x: int = await thing.add(1)
    assert_type(await thing.add(1), int)
    assert_type(await thing.add_async(1), int)
    total = x
    async with thing.acount(2) as items:
        async for item in items:
            assert_type(item, int)
            total += item
    return total


async def test_typed_calls_run() -> None:
    assert await typed_calls(Thing()) == 3


# -- an object that pins its own executor -----------------------------------------------
class Pinned(Thing):
    """A Thing that may pin an executor, by remote-exec's or pymoa-remote's name."""

    remote_executor: ThreadExecutor | None = None
    pymoa_executor: ThreadExecutor | None = None

    @apply_executor
    async def nested(self) -> tuple[str, str]:
        """A decorated call made from inside one: it runs in place."""
        return threading.current_thread().name, await self.thread_name()


async def test_a_pinned_executor_wins_over_the_context() -> None:
    pinned = Pinned()
    async with (
        ThreadExecutor(init_context=False) as own,
        ThreadExecutor(init_context=False) as other,
    ):
        await own.ensure_remote_instance(pinned, "own")
        await other.ensure_remote_instance(pinned, "other")
        pinned.remote_executor = own
        assert current_executor() is None
        assert await pinned.thread_name() == "remote-exec worker own"
        with ExecutorContext(other):
            assert await pinned.thread_name() == "remote-exec worker own"
            async with pinned.count(3) as items:
                assert [item async for item in items] == [0, 1, 2]
            assert pinned.closed_in != threading.get_ident()  # closed in own's thread
        # Unpinned again (None): the context decides, as for any object.
        pinned.remote_executor = None
        with ExecutorContext(other):
            assert await pinned.thread_name() == "remote-exec worker other"
        assert await pinned.thread_name() == threading.current_thread().name


async def test_pymoa_remotes_attribute_pins_too() -> None:
    pinned = Pinned()
    async with (
        ThreadExecutor(init_context=False) as pymoa,
        ThreadExecutor(init_context=False) as ours,
    ):
        await pymoa.ensure_remote_instance(pinned, "pymoa")
        await ours.ensure_remote_instance(pinned, "ours")
        pinned.pymoa_executor = pymoa
        assert await pinned.thread_name() == "remote-exec worker pymoa"
        assert await pinned.times_ten(2) == 20
        assert pinned.seen == [20]  # the callback still runs, on the calling side
        pinned.remote_executor = ours  # remote-exec's own name comes first
        assert await pinned.thread_name() == "remote-exec worker ours"


async def test_a_pinned_object_held_nowhere_says_how_to_register() -> None:
    pinned = Pinned()
    async with ThreadExecutor(init_context=False) as executor:
        pinned.remote_executor = executor
        with pytest.raises(UnknownInstanceError, match="register it first"):
            await pinned.add(1)


async def test_calls_made_inside_a_pinned_method_run_in_place() -> None:
    """Code the executor runs does not re-enter it through the pin (it would
    queue a call behind the one making it)."""
    pinned = Pinned()
    async with ThreadExecutor(init_context=False) as executor:
        await executor.ensure_remote_instance(pinned, "pinned")
        pinned.remote_executor = executor
        with anyio.fail_after(5):
            outer, inner = await pinned.nested()
        assert outer == inner == "remote-exec worker pinned"


async def test_a_pin_that_is_not_an_executor_is_refused() -> None:
    pinned = Pinned()
    pinned.remote_executor = "ws://127.0.0.1:8765"  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"Pinned.remote_executor must be an executor or None"):
        await pinned.add(1)
    with pytest.raises(TypeError, match="not str"):
        pinned.count(1)
