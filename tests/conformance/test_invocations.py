"""Invocations on every executor and backend: status, listing, cancel by id."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from remote_exec import Executor, InvocationCancelled
from remote_exec.invocations import InvocationInfo, InvocationStatus

from .devices import Spinner
from .helpers import listed

pytestmark = pytest.mark.anyio

LONG = 1000  # steps: uninterrupted, a spin runs 20 s


async def running(executor: Executor, spinner: Spinner, method: str) -> InvocationInfo:
    return await listed(executor, spinner, method, "running")


async def outcome(fn: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return exc


async def test_status_times_and_filters(executor: Executor, tag: str) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        own_id = await spinner.invocation_id()
        with pytest.raises(ValueError, match="jammed"):
            await spinner.fail("jammed")
        assert await spinner.spin(1) == 1
        everything = await executor.list_invocations(instance=tag)
        assert [info.method for info in everything] == ["invocation_id", "fail", "spin"]
        first, failed, spun = everything
        assert first.id == own_id
        assert (first.status, failed.status, spun.status) == (
            InvocationStatus.COMPLETED,
            InvocationStatus.ERROR,
            InvocationStatus.COMPLETED,
        )
        assert failed.error == "ValueError: jammed"
        assert first.error is None
        for info in everything:
            assert info.instance == tag
            assert info.started_at is not None
            assert info.ended_at is not None
            assert info.requested_at <= info.started_at <= info.ended_at
        assert [i.id for i in await executor.list_invocations(instance=spinner)] == [
            i.id for i in everything
        ]
        assert [
            i.method for i in await executor.list_invocations(instance=tag, status="error")
        ] == ["fail"]
        by_enum = await executor.list_invocations(
            instance=tag, status=InvocationStatus.COMPLETED, method="spin"
        )
        assert [i.id for i in by_enum] == [spun.id]
        assert await executor.get_invocation(failed.id) == failed
        with pytest.raises(LookupError):
            await executor.get_invocation("no-such-invocation")
        with pytest.raises(ValueError, match="bogus"):
            await executor.list_invocations(status="bogus")


async def test_cancel_a_running_sync_call_by_id(executor: Executor, tag: str) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def call() -> None:
                results.append(await outcome(lambda: spinner.spin(LONG)))

            tg.start_soon(call)
            info = await running(executor, spinner, "spin")
            with anyio.fail_after(5):
                after = await executor.cancel_invocation(info.id)
        assert after.id == info.id
        assert isinstance(results[0], InvocationCancelled), results
        final = await executor.get_invocation(info.id)
        assert final.status is InvocationStatus.CANCELLED
        assert (await executor.get_remote_object_property_data(spinner, ["events"]))["events"] == [
            "started",
            "cancelled",
        ]


async def test_cancel_a_running_async_call_by_id(executor: Executor, tag: str) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def call() -> None:
                results.append(await outcome(lambda: spinner.nap(20)))

            tg.start_soon(call)
            info = await running(executor, spinner, "nap")
            with anyio.fail_after(5):
                await executor.cancel_invocation(info.id)
        assert isinstance(results[0], InvocationCancelled), results
        assert (await executor.get_invocation(info.id)).status is InvocationStatus.CANCELLED


async def test_cancel_a_pending_call_by_id_it_never_starts(executor: Executor, tag: str) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        async with anyio.create_task_group() as tg:
            results: dict[str, Any] = {}

            async def call(label: str, fn: Callable[[], Awaitable[Any]]) -> None:
                results[label] = await outcome(fn)

            tg.start_soon(call, "blocker", lambda: spinner.spin(LONG))
            blocker = await running(executor, spinner, "spin")
            tg.start_soon(call, "queued", lambda: spinner.grind(3))
            queued = await listed(executor, spinner, "grind", "pending")
            cancelled = await executor.cancel_invocation(queued.id)
            assert cancelled.status is InvocationStatus.CANCELLED
            assert cancelled.started_at is None
            await executor.cancel_invocation(blocker.id)
        assert isinstance(results["queued"], InvocationCancelled), results
        events = (await executor.get_remote_object_property_data(spinner, ["events"]))["events"]
        assert events == ["started", "cancelled"]  # the queued grind never started


async def test_cancelling_a_finished_invocation_changes_nothing(
    executor: Executor, tag: str
) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        await spinner.echo(1)
        (done,) = await executor.list_invocations(instance=tag)
        assert (await executor.cancel_invocation(done.id)) == done
        with pytest.raises(LookupError):
            await executor.cancel_invocation("no-such-invocation")
