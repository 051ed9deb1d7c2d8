"""Cooperative cancellation reaches sync code, on every executor and backend.

A running sync method cannot be interrupted from outside: it stops at its
next ``check_cancelled()`` or inside ``cancellable_sleep()`` once its caller
is cancelled, and the next call to its instance then starts at once instead
of waiting behind it.
"""

from __future__ import annotations

import time

import anyio
import pytest

from remote_exec import (
    Executor,
    InvocationCancelled,
    RemoteExecError,
    cancellable_sleep,
    check_cancelled,
    current_invocation_id,
)

from .devices import Spinner

pytestmark = pytest.mark.anyio

# Uninterrupted, a call would run this long: a test that waits for it fails on
# its own bound first.
LONG = 1000  # steps: 20 s of spin, 5 s of grind


@pytest.mark.parametrize("method", ["spin", "grind"])
async def test_a_cancelled_sync_call_stops_and_the_next_starts_at_once(
    executor: Executor, tag: str, method: str
) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        with anyio.move_on_after(1.0) as scope:  # the caller's own deadline
            await getattr(spinner, method)(LONG)
        assert scope.cancelled_caught
        started = time.monotonic()
        with anyio.fail_after(4):  # far less than the uninterrupted call would take
            assert await spinner.echo("next") == "next"
        waited = time.monotonic() - started
        events = (await executor.get_remote_object_property_data(spinner, ["events"]))["events"]
    assert events == ["started", "cancelled"], events
    assert waited < 4


async def test_each_call_has_its_own_invocation_id(executor: Executor, tag: str) -> None:
    spinner = Spinner(tag)
    async with executor.remote_instance(spinner, tag, tag):
        ids = [await spinner.invocation_id(), await spinner.invocation_id()]
        ids.append(await spinner.async_invocation_id())
        async with spinner.ids(3) as stream:
            in_stream = [item async for item in stream]
    assert all(isinstance(i, str) and i for i in ids), ids
    assert len(set(ids)) == 3
    assert len(set(in_stream)) == 1  # one stream, one invocation
    assert isinstance(in_stream[0], str)
    assert in_stream[0] not in ids


def test_outside_a_call_they_do_nothing_or_just_sleep() -> None:
    assert current_invocation_id() is None
    check_cancelled()
    started = time.monotonic()
    cancellable_sleep(0.05)
    assert time.monotonic() - started >= 0.05


def test_invocation_cancelled_is_an_error_a_method_may_catch() -> None:
    # An Exception (a RemoteExecError), not a BaseException like a task's cancellation.
    assert issubclass(InvocationCancelled, RemoteExecError)
    try:
        raise InvocationCancelled("stop")
    except Exception as exc:  # noqa: BLE001 - what a method's cleanup code writes
        caught: BaseException = exc
    assert isinstance(caught, InvocationCancelled)
