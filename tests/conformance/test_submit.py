"""Detached invocations on every executor and backend: ``submit``, handles by
id, outcomes kept for whoever asks, and ids made by the caller."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from remote_exec import Executor, Invocation, InvocationCancelled, InvocationStatus

from .devices import Chatty
from .helpers import listed

pytestmark = pytest.mark.anyio


async def test_ids_are_made_by_the_caller(executor: Executor, tag: str) -> None:
    chatty = Chatty(tag)
    async with executor.remote_instance(chatty, tag, tag):
        plain = await chatty.talk(0, "x")
        invocation = await executor.submit(chatty.talk, 0, "y")
        # The handle's id was known before any answer: the method sees the same.
        assert await invocation.result() == invocation.id
        # Both carry the caller's session (its connection's, or the executor's).
        assert plain is not None
        session = plain.rsplit("-", 1)[0]
        assert len(session) >= 8
        assert invocation.id.startswith(f"{session}-")
        assert getattr(executor, "session", session) == session
        ids = [info.id for info in await executor.list_invocations(instance=tag)]
        assert ids == [plain, invocation.id]


async def test_a_submitted_call_keeps_its_outcome(executor: Executor, tag: str) -> None:
    chatty = Chatty(tag)
    async with executor.remote_instance(chatty, tag, tag):
        done = await executor.submit(chatty.talk, 2, "hello")
        failed = await executor.submit(chatty.fail, "jammed")
        assert await done.result() == done.id
        assert await done.result() == done.id  # as often as asked
        with pytest.raises(ValueError, match="jammed"):
            await failed.result()
        with pytest.raises(ValueError, match="jammed"):  # a new handle on the same id
            await executor.invocation(failed.id).result()
        info = await failed.info()
        assert (info.status, info.error) == (InvocationStatus.ERROR, "ValueError: jammed")
        assert (await done.info()).status is InvocationStatus.COMPLETED


async def test_submit_refuses_what_it_cannot_run(executor: Executor, tag: str) -> None:
    chatty = Chatty(tag)
    async with executor.remote_instance(chatty, tag, tag):
        with pytest.raises(TypeError, match="generator"):
            await executor.submit(chatty.items, 3)
        with pytest.raises(TypeError, match="bound method"):
            await executor.submit(print, 1)
        plain = await chatty.talk(0, "x")
        assert plain is not None
        with pytest.raises(LookupError, match="not submitted"):
            await executor.invocation(plain).result()
        with pytest.raises(LookupError, match="unknown"):
            await executor.invocation("no-such-id").result()
        with pytest.raises(TypeError):
            executor.invocation(42)  # type: ignore[arg-type]


async def test_cancelling_the_submitter_does_not_stop_it(
    executor: Executor, tag: str, tmp_path: Path
) -> None:
    chatty = Chatty(tag)
    gate = tmp_path / "gate"
    async with executor.remote_instance(chatty, tag, tag):
        handles: list[Invocation] = []
        submitted = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:

                async def submit_then_wait() -> None:
                    invocation = await executor.submit(chatty.hold, str(gate), "kept")
                    handles.append(invocation)
                    submitted.set()
                    await invocation.result()  # cancelled below, while it waits

                tg.start_soon(submit_then_wait)
                with anyio.fail_after(10):
                    await submitted.wait()
                await listed(executor, tag, "hold", "running")
                tg.cancel_scope.cancel()
            (invocation,) = handles
            assert (await invocation.info()).status is InvocationStatus.RUNNING
        finally:
            gate.touch()  # whatever happened above, the held call ends
        with anyio.fail_after(10):
            assert await invocation.result() == "kept"


async def test_cancel_a_submitted_call_by_its_handle(
    executor: Executor, tag: str, tmp_path: Path
) -> None:
    chatty = Chatty(tag)
    async with executor.remote_instance(chatty, tag, tag):
        invocation = await executor.submit(chatty.hold, str(tmp_path / "never"))
        await listed(executor, tag, "hold", "running")
        await invocation.cancel()
        with anyio.fail_after(10), pytest.raises(InvocationCancelled):
            await invocation.result()
        assert (await invocation.info()).status is InvocationStatus.CANCELLED
        # The instance is free at once for the next call.
        with anyio.fail_after(10):
            assert await chatty.talk(0, "next") is not None


async def test_a_submitted_async_call(executor: Executor, tag: str, tmp_path: Path) -> None:
    chatty = Chatty(tag)
    gate = tmp_path / "gate"
    async with executor.remote_instance(chatty, tag, tag):
        released = await executor.submit(chatty.ahold, str(gate))
        await listed(executor, tag, "ahold", "running")
        gate.touch()
        with anyio.fail_after(10):
            assert await released.result() == "released"
        stopped = await executor.submit(chatty.ahold, str(tmp_path / "never"))
        await listed(executor, tag, "ahold", "running")
        await stopped.cancel()
        with anyio.fail_after(10), pytest.raises(InvocationCancelled):
            await stopped.result()
