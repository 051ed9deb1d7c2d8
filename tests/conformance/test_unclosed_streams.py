"""Generator calls iterated without ``async with`` (issue 13, item 6).

``async for`` + ``break`` never closes an async iterator, so a stream dropped
early would leave its generator open where the instance lives, its
``finally`` never run. Every executor's stream closes it when collected and
warns (a ``ResourceWarning`` naming the call); closed, exhausted and stopped
streams never warn. Each test runs for every executor and both backends
(except the one that needs a dead loop, see there).

The ``closed`` count is read back through the executor (for the thread
executor that is this very object); waits are bounded polls, never sleeps.
"""

from __future__ import annotations

import gc
import re
import sys
import warnings
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from remote_exec import Executor, RemoteStream, ThreadExecutor

from .devices import Streamer

# Far more items than any window: the generator is parked, never finished.
ENDLESS = 1_000_000


async def closed_count(executor: Executor, device: Streamer) -> int:
    data = await executor.get_remote_object_property_data(device, ["closed"])
    count: int = data["closed"]
    return count


async def wait_until_closed(executor: Executor, device: Streamer, count: int) -> None:
    """The close is sent without awaiting it, and the remote side tells no one
    when it is done: poll until ``count`` generators of ``device`` ran their
    ``finally`` (bounded, so never a hang)."""
    with anyio.fail_after(10):
        while await closed_count(executor, device) < count:  # noqa: ASYNC110 - remote state
            await anyio.sleep(0.01)


async def first_three(stream: AsyncIterator[int]) -> list[int]:
    """``async for`` then ``break``, without ``async with``: nothing closes it."""
    seen: list[int] = []
    async for item in stream:
        seen.append(item)
        if len(seen) == 3:
            break
    return seen


def collect(holder: list[Any]) -> None:
    """Drop the last reference and run the collector (in whichever thread calls)."""
    holder.clear()
    gc.collect()


def dropped_warning(tag: str, method: str) -> str:
    """What the warning must say: the class, instance and method, and the fix."""
    return re.escape(f"Streamer {tag!r}.{method}()") + r".*use `async with`"


def stream_warnings(record: list[warnings.WarningMessage], tag: str) -> list[str]:
    """The ResourceWarnings about this test's streams (gc may find older litter)."""
    return [
        str(w.message)
        for w in record
        if issubclass(w.category, ResourceWarning) and tag in str(w.message)
    ]


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What finalisers raised: Python only reports it (and the suite ignores
    those reports), so the tests look at it themselves."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["numbers", "anumbers"])
async def test_a_dropped_stream_closes_its_generator_and_warns(
    executor: Executor, tag: str, method: str, unraisable: list[Any]
) -> None:
    device = Streamer(tag)
    async with executor.remote_instance(device, tag, tag):
        holder = [getattr(device, method)(ENDLESS)]
        assert await first_three(holder[0]) == [0, 1, 2]
        assert await closed_count(executor, device) == 0  # still open: parked remotely
        with pytest.warns(ResourceWarning, match=dropped_warning(tag, method)):
            collect(holder)
        await wait_until_closed(executor, device, 1)
        # The instance is fine: it answers calls and streams again.
        assert await device.echo("alive") == "alive"
        async with device.numbers(5) as items:
            assert [i async for i in items] == list(range(5))
        assert await closed_count(executor, device) == 2
    assert unraisable == []


@pytest.mark.anyio
async def test_a_stream_collected_in_another_thread_is_closed_too(
    executor: Executor, tag: str, unraisable: list[Any]
) -> None:
    """A finaliser runs in whichever thread drops the last reference or runs
    the collector: the close must reach the executor's loop from there."""
    device = Streamer(tag)
    async with executor.remote_instance(device, tag, tag):
        holder = [device.numbers(ENDLESS)]
        assert await first_three(holder[0]) == [0, 1, 2]
        with pytest.warns(ResourceWarning, match=dropped_warning(tag, "numbers")):
            await anyio.to_thread.run_sync(collect, holder)
        await wait_until_closed(executor, device, 1)
        assert await device.echo("alive") == "alive"
    assert unraisable == []


@pytest.mark.anyio
async def test_closed_and_exhausted_streams_never_warn(
    executor: Executor, tag: str, unraisable: list[Any]
) -> None:
    device = Streamer(tag)
    async with executor.remote_instance(device, tag, tag):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            holder: list[Any] = []
            async with device.numbers(ENDLESS) as left:  # left early, closed on exit
                assert await first_three(left) == [0, 1, 2]
            holder.append(left)
            exhausted = device.anumbers(5)  # no ``async with``, but run to its end
            assert [i async for i in exhausted] == list(range(5))
            holder.append(exhausted)
            closed = device.anumbers(ENDLESS)
            assert await first_three(closed) == [0, 1, 2]
            await closed.aclose()  # closed by hand
            holder.append(closed)
            del left, exhausted, closed
            collect(holder)
        assert stream_warnings(record, tag) == []
        assert await closed_count(executor, device) == 3  # every finally ran, in time
    assert unraisable == []


@pytest.mark.anyio
async def test_a_stream_dropped_after_its_executor_stopped_is_quiet(
    make_executor: Any, tag: str, unraisable: list[Any]
) -> None:
    """Stopping (or deleting the instance) closed the generator already: the
    finaliser has nothing to do and must neither warn nor touch the executor."""
    device = Streamer(tag)
    async with make_executor() as executor, executor.remote_instance(device, tag, tag):
        holder = [device.numbers(ENDLESS)]
        assert await first_three(holder[0]) == [0, 1, 2]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        collect(holder)
    assert stream_warnings(record, tag) == []
    assert unraisable == []


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
def test_a_stream_that_outlives_its_loop_warns_and_never_raises(
    anyio_backend: str, tag: str, unraisable: list[Any]
) -> None:
    """The loop that would close the generator is gone (a program that never
    stopped its executor): the finaliser cannot schedule anything, must not
    raise, and still says what was left open. The thread executor only: an
    unstopped remote executor would leave a child process or a socket behind;
    their streams share the same guard (``RemoteStream._closed_when_collected``).
    """

    async def leave_open() -> RemoteStream:
        executor = ThreadExecutor(init_context=False)
        await executor.start()  # never stopped (its worker is a daemon thread)
        device = Streamer(tag)
        await executor.create_remote_instance(device, tag)
        stream = executor.execute_generator(device, "numbers", [ENDLESS])
        assert await first_three(stream) == [0, 1, 2]
        return stream

    holder = [anyio.run(leave_open, backend=anyio_backend)]
    with pytest.warns(ResourceWarning, match=dropped_warning(tag, "numbers")):
        collect(holder)
    assert unraisable == []
