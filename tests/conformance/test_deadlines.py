"""Deadlines the remote side enforces, on every executor and backend.

A method's ``timeout=`` (or the caller's own deadline) travels with the call:
the remote side never starts a call whose deadline passed while it was
queued, cancels a running async one at it, and makes ``check_cancelled()``
raise in a sync one; the caller gets ``DeadlineExceeded``, a TimeoutError
that says queued or running.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from remote_exec import DeadlineExceeded, Executor, InvocationStatus

from .devices import Spinner
from .helpers import listed

pytestmark = pytest.mark.anyio

LONG = 1000  # steps: uninterrupted, a spin runs 20 s


async def test_a_running_sync_call_stops_at_its_deadline(executor: Executor, tag: str) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(DeadlineExceeded) as caught:
            await spinner.bounded_spin(LONG)
        assert time.monotonic() - started < 5  # far less than the 20 s it would run
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.where == "running"
        with anyio.fail_after(4):
            assert await spinner.echo("next") == "next"
        events = (await executor.get_remote_object_property_data(spinner, ["events"]))["events"]
        assert events == ["started", "cancelled"]
        (info,) = await executor.list_invocations(instance=tag, method="bounded_spin")
        assert info.status is InvocationStatus.CANCELLED
        assert info.started_at is not None


async def test_a_call_whose_deadline_passes_while_queued_never_starts(
    executor: Executor, tag: str
) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        results: dict[str, object] = {}

        async def run(label: str, coro: object) -> None:
            try:
                results[label] = await coro  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                results[label] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "blocker", spinner.spin(40))  # 0.8 s, no deadline
            await listed(executor, tag, "spin", "running")
            tg.start_soon(run, "quick", spinner.quick())  # 0.3 s: it passes in the queue
        assert results["blocker"] == 40
        error = results["quick"]
        assert isinstance(error, DeadlineExceeded), error
        assert error.where == "queued"
        events = (await executor.get_remote_object_property_data(spinner, ["events"]))["events"]
        assert "quick ran" not in events  # the side effect never happened
        (info,) = await executor.list_invocations(instance=tag, method="quick")
        assert info.status is InvocationStatus.CANCELLED
        assert info.started_at is None


async def test_a_running_async_call_is_cancelled_at_its_deadline(
    executor: Executor, tag: str
) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        with anyio.fail_after(10), pytest.raises(DeadlineExceeded) as caught:
            await spinner.bounded_nap(20)
        assert caught.value.where == "running"
        (info,) = await executor.list_invocations(instance=tag, method="bounded_nap")
        assert info.status is InvocationStatus.CANCELLED


def test_timeout_must_be_a_positive_number() -> None:
    from remote_exec import apply_executor

    bad: Any
    for bad in (0, -1, float("inf"), "1"):
        with pytest.raises(ValueError, match="timeout"):
            apply_executor(timeout=bad)
