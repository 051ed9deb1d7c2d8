"""The executors under test: each test runs once per executor and backend.

The websocket executor talks to a real ``remote-exec serve`` daemon started
once per session and backend (the daemon runs the same backend as the
client); the process executor starts a real child per test.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from remote_exec import Executor, ProcessExecutor, ThreadExecutor, WebSocketExecutor

ROOT = Path(__file__).resolve().parents[2]
EXECUTORS = ["thread", "process", "websocket"]


class Daemon:
    """A ``remote-exec serve`` subprocess on an ephemeral loopback port."""

    def __init__(self, backend: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "remote_exec.server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-auth",
                "--allow-module",
                "tests.*",
                "--backend",
                backend,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = self._read_url(timeout=30)

    def _read_url(self, timeout: float) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=deadline - time.monotonic()):
                    break
                line = self.process.stdout.readline()
                if not line:
                    break
                match = re.search(r"(wss?://\S+)", line)
                if match:
                    return match.group(1)
        self.stop()
        raise RuntimeError("the daemon did not report its URL")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def daemons() -> Iterator[dict[str, Daemon]]:
    started: dict[str, Daemon] = {}
    yield started
    for daemon in started.values():
        daemon.stop()


@pytest.fixture(params=EXECUTORS)
def executor_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_executor(executor_kind: str, anyio_backend: str, daemons: dict[str, Daemon]):
    """A factory of not-yet-started executors of the kind under test."""

    def make(**options: object) -> Executor:
        if executor_kind == "thread":
            return ThreadExecutor(**options)  # type: ignore[arg-type]
        if executor_kind == "process":
            return ProcessExecutor(**options)  # type: ignore[arg-type]
        if anyio_backend not in daemons:
            daemons[anyio_backend] = Daemon(anyio_backend)
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
