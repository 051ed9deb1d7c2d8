"""The executors under test: each test runs once per executor and backend.

The websocket executor talks to a real ``remote-exec serve`` daemon started
once per session and backend (the daemon runs the same backend as the
client); the process executor starts a real child per test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from remote_exec import Executor, ProcessExecutor, ThreadExecutor, WebSocketExecutor

from ..ws_instruments import DaemonProcess

EXECUTORS = ["thread", "process", "websocket"]


@pytest.fixture(scope="session")
def daemons() -> Iterator[dict[str, DaemonProcess]]:
    started: dict[str, DaemonProcess] = {}
    yield started
    for daemon in started.values():
        daemon.close()


@pytest.fixture(params=EXECUTORS)
def executor_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_executor(executor_kind: str, anyio_backend: str, daemons: dict[str, DaemonProcess]):
    """A factory of not-yet-started executors of the kind under test."""

    def make(**options: object) -> Executor:
        if executor_kind == "thread":
            # check_codec: what could not travel to the remote executors fails here too
            options.setdefault("check_codec", True)
            return ThreadExecutor(**options)  # type: ignore[arg-type]
        if executor_kind == "process":
            return ProcessExecutor(**options)  # type: ignore[arg-type]
        if anyio_backend not in daemons:
            daemons[anyio_backend] = DaemonProcess(
                "--host",
                "127.0.0.1",
                "--no-auth",
                "--allow-module",
                "tests.*",
                "--backend",
                anyio_backend,
            )
        return WebSocketExecutor(daemons[anyio_backend].url, **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def executor(make_executor) -> AsyncIterator[Executor]:
    async with make_executor() as started:
        yield started


@pytest.fixture
def tag() -> str:
    """A name no other test uses (instances and shared state are keyed by it)."""
    return f"t{uuid.uuid4().hex[:12]}"
