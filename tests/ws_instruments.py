"""Classes the websocket tests create inside a real daemon, and a daemon launcher.

The daemon imports this module (``--allow-module tests.*``), so it must import
only what the daemon has: the standard library, anyio and remote_exec.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from anyio.lowlevel import RunVar

from remote_exec import apply_executor, apply_generator_executor
from remote_exec.server import testing

ROOT = Path(__file__).resolve().parent.parent

# Events shared by the instances inside one server, per event loop (tests run
# in-process servers under both backends in one process).
_marks: RunVar[dict[str, anyio.Event]] = RunVar("ws_instruments_marks")


def _mark(key: str) -> anyio.Event:
    try:
        marks = _marks.get()
    except LookupError:
        marks = {}
        _marks.set(marks)
    event = marks.get(key)
    if event is None:
        event = marks[key] = anyio.Event()
    return event


class Probe:
    """A small instrument: sync, async, generator and callback methods."""

    _config_props_ = ("gain",)

    def __init__(self, gain: int = 1) -> None:
        self.gain = gain
        self.seen: list[Any] = []

    def remember(self, value: Any) -> None:
        self.seen.append(value)

    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_executor(callback=remember)
    def scale(self, value: int) -> int:
        return value * self.gain

    @apply_executor
    async def pid(self) -> int:
        await anyio.lowlevel.checkpoint()
        return os.getpid()

    @apply_executor
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @apply_executor
    async def hold(self, key: str, seconds: float) -> str:
        """Mark ``key`` as started, then sleep ``seconds`` (a call in flight)."""
        _mark(key).set()
        await anyio.sleep(seconds)
        return "held"

    @apply_executor
    async def wait_started(self, key: str) -> bool:
        """Return once another instance's ``hold(key, ...)`` has started."""
        await _mark(key).wait()
        return True

    @apply_generator_executor
    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    @apply_generator_executor
    async def ticks(self) -> AsyncIterator[int]:
        """Yields 0, then waits for ever (a stream in flight)."""
        yield 0
        await anyio.sleep_forever()


class DaemonProcess(testing.DaemonProcess):
    """``remote_exec.server.testing.DaemonProcess`` run from the repository, so that
    the daemon can import the test modules (``tests.*``)."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        token: str | None = None,
        start: bool = True,
    ) -> None:
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        super().__init__(*args, env=env, token=token, cwd=ROOT, start=start)


def run_cli(
    args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m remote_exec.server ARGS`` to completion (for refusals)."""
    return subprocess.run(
        [sys.executable, "-m", "remote_exec.server", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def http_get(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    method: str = "GET",
) -> tuple[int, dict[str, str], bytes]:
    """A bare HTTP/1.1 request (GET unless told): (status, headers, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    response = bytearray()
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(request)
        while True:
            try:
                response += await stream.receive()
            except anyio.EndOfStream:
                break
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body
