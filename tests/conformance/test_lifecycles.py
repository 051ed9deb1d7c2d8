"""Scopes and lifecycle hooks on every executor and backend.

A class that is a context manager is entered where it lives right after it
is built and exited exactly once when it goes: deleted, at the end of a
``remote_instance`` block, when its scope ends, when its side shuts down.
The hooks append to a file (the remote side is another process).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from remote_exec import BlockingExecutor, Executor, ProcessExecutor, ThreadExecutor
from remote_exec.exceptions import ConnectionLostError, ExecutorStateError, RemoteExecError

from .helpers import listed, until
from .lifecycle_devices import AsyncPort, Port, lines

pytestmark = pytest.mark.anyio


def stays_on_server(executor: Executor) -> bool:
    """A server-scoped instance outlives the executor (a daemon, a detached Ray actor)."""
    return type(executor).__name__ in ("WebSocketExecutor", "RayExecutor")


async def test_enter_and_exit_once_on_delete(executor: Executor, tag: str, tmp_path: Path) -> None:
    log = str(tmp_path / "hooks.log")
    port = Port(log, tag)
    await executor.create_remote_instance(port, tag, log, tag)
    assert lines(log) == [f"enter {tag}"]
    assert await port.read() == f"{tag} read"
    hook_thread, method_thread = await port.threads()
    assert hook_thread == method_thread  # entered in the instance's own thread
    # The config is read after the enter hook: what opening the port set.
    assert await executor.get_remote_object_config(port) == {"baud": 115200}
    await executor.delete_remote_instance(port)
    assert lines(log) == [f"enter {tag}", f"exit {tag}"]
    assert tag not in await executor.get_remote_objects()


async def test_exit_at_the_end_of_a_remote_instance_block(
    executor: Executor, tag: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "hooks.log")
    port = Port(log, tag)
    async with executor.remote_instance(port, tag, log, tag):
        assert await port.read() == f"{tag} read"
        assert lines(log) == [f"enter {tag}"]
    assert lines(log) == [f"enter {tag}", f"exit {tag}"]


async def test_a_failing_enter_creates_nothing(
    executor: Executor, tag: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "hooks.log")
    broken = Port(log, tag, "enter")
    with pytest.raises(OSError, match="the port is busy") as caught:
        await executor.create_remote_instance(broken, tag, log, tag, "enter")
    if executor.is_remote:  # dual-typed: the remote error, and an OSError
        assert isinstance(caught.value, RemoteExecError)
    assert tag not in await executor.get_remote_objects()
    assert lines(log) == []  # never entered, so never exited
    with pytest.raises(OSError, match="the port is busy"):
        async with executor.remote_instance(broken, tag, log, tag, "enter"):
            pytest.fail("the block ran")  # pragma: no cover
    # The name is free: the same class, working, takes it.
    port = Port(log, tag)
    async with executor.remote_instance(port, tag, log, tag):
        assert await port.read() == f"{tag} read"
    assert lines(log) == [f"enter {tag}", f"exit {tag}"]


async def test_a_failing_exit_is_reported_in_the_delete_event(
    executor: Executor, tag: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "hooks.log")
    port = Port(log, tag, "exit")
    async with executor.get_channel_from_remote(tag, "delete") as events:
        await executor.create_remote_instance(port, tag, log, tag, "exit")
        await executor.delete_remote_instance(port)  # does not raise
        with anyio.fail_after(10):
            event = await events.__anext__()
    assert event["channel"] == "delete"
    assert event["name"] == tag
    assert event["data"]["error"] == f"RuntimeError: {tag}: the port is stuck"
    assert lines(log) == [f"enter {tag}", f"exit {tag}"]
    # The executor (and the remote side) keep working; the name is free again.
    again = Port(log, tag)
    async with executor.remote_instance(again, tag, log, tag):
        assert await again.read() == f"{tag} read"
    assert lines(log)[-1] == f"exit {tag}"


async def test_async_hooks_run_where_async_methods_run(
    executor: Executor, tag: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "hooks.log")
    port = AsyncPort(log, tag)
    async with executor.remote_instance(port, tag, log, tag):
        assert await port.read() == (True, True)
        assert lines(log) == [f"aenter {tag}"]
    assert lines(log) == [f"aenter {tag}", f"aexit {tag} True"]


@pytest.mark.parametrize("scope", ["server", "connection"])
async def test_exit_once_at_executor_stop(
    make_executor: Any, tag: str, tmp_path: Path, scope: str
) -> None:
    log = str(tmp_path / "hooks.log")
    executor = make_executor()
    async with executor:
        port = Port(log, tag)
        await executor.create_remote_instance(port, tag, log, tag, scope=scope)
        assert await port.read() == f"{tag} read"
    if scope == "server" and stays_on_server(executor):
        # It lives until deleted: another executor finds it and deletes it.
        assert lines(log) == [f"enter {tag}"]
        async with make_executor() as other:
            twin = Port(log, tag)
            assert not await other.ensure_remote_instance(twin, tag, log, tag)
            assert await twin.read() == f"{tag} read"
            await other.delete_remote_instance(twin)
    else:
        # The end of the connection (the executor itself for thread and process).
        await until(lambda: len(lines(log)) >= 2)
    assert lines(log) == [f"enter {tag}", f"exit {tag}"]
    async with make_executor() as other:
        assert tag not in await other.get_remote_objects()


async def test_connection_scope_ends_at_stop_failing_queued_calls(
    make_executor: Any, tag: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "hooks.log")
    executor = make_executor()
    port = Port(log, tag)
    outcomes: dict[str, BaseException | str] = {}

    async def call(key: str, fn: Callable[[], Any]) -> None:
        try:
            outcomes[key] = await fn()
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            outcomes[key] = exc

    with anyio.fail_after(60):
        # The executor stops (its block ends) with a call running and one queued.
        async with anyio.create_task_group() as tg, executor:
            await executor.create_remote_instance(port, tag, log, tag, scope="connection")
            tg.start_soon(call, "running", lambda: port.hold(30))
            await until(lambda: f"hold {tag}" in lines(log))
            tg.start_soon(call, "queued", port.read)
            await listed(executor, tag, "read", "pending")
    queued = outcomes["queued"]
    assert isinstance(queued, (ExecutorStateError, ConnectionLostError)), repr(queued)
    assert "stopped" in str(queued) or "closed" in str(queued), queued
    assert isinstance(outcomes["running"], Exception)
    await until(lambda: f"exit {tag}" in lines(log))
    # The running call was stopped (it never logged its end); the queued one never ran.
    assert lines(log) == [f"enter {tag}", f"hold {tag}", f"exit {tag}"]


async def test_invalid_scope_is_a_value_error(executor: Executor, tag: str, tmp_path: Path) -> None:
    log = str(tmp_path / "hooks.log")
    port = Port(log, tag)
    bad: tuple[Any, ...] = ("process", "", None, 1)
    for scope in bad:
        with pytest.raises(ValueError, match="scope must be 'server' or 'connection'"):
            await executor.create_remote_instance(port, tag, log, tag, scope=scope)
        with pytest.raises(ValueError, match="scope must be 'server' or 'connection'"):
            await executor.ensure_remote_instance(port, tag, log, tag, scope=scope)
        with pytest.raises(ValueError, match="scope must be 'server' or 'connection'"):
            async with executor.remote_instance(port, tag, log, tag, scope=scope):
                pytest.fail("the block ran")  # pragma: no cover
    assert tag not in await executor.get_remote_objects()
    assert lines(log) == []


async def test_thread_executor_enters_the_callers_own_object(tmp_path: Path, tag: str) -> None:
    """ThreadExecutor holds the caller's object itself: it is that object that
    is entered (in its thread) and exited."""
    log = str(tmp_path / "hooks.log")
    port = Port(log, tag)
    async with ThreadExecutor() as executor, executor.remote_instance(port, tag):
        assert port.is_open
    assert not port.is_open
    assert lines(log) == [f"enter {tag}", f"exit {tag}"]


def test_blocking_executor_passes_the_scope_through(tmp_path: Path, tag: str) -> None:
    log = str(tmp_path / "hooks.log")
    with BlockingExecutor(ProcessExecutor()) as blocking:
        port = Port(log, tag)
        with pytest.raises(ValueError, match="scope must be"):
            blocking.create_remote_instance(port, tag, log, tag, scope="bogus")
        with pytest.raises(ValueError, match="scope must be"):
            blocking.ensure_remote_instance(port, tag, log, tag, scope="bogus")
        with pytest.raises(ValueError, match="scope must be"):  # noqa: SIM117
            with blocking.remote_instance(port, tag, log, tag, scope="bogus"):
                pytest.fail("the block ran")  # pragma: no cover
        assert blocking.ensure_remote_instance(port, tag, log, tag, scope="connection")
        assert blocking.call(port.read) == f"{tag} read"
        assert lines(log) == [f"enter {tag}"]
    assert lines(log) == [f"enter {tag}", f"exit {tag}"]  # the child exited it at stop
