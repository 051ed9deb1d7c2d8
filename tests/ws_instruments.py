"""Classes the websocket tests create inside a real daemon, and a daemon launcher.

The daemon imports this module (``--allow-module tests.*``), so it must import
only what the daemon has: the standard library, anyio and remote_exec.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Self

import anyio
import anyio.lowlevel
from anyio.lowlevel import RunVar

from remote_exec import apply_executor, apply_generator_executor

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


class DaemonProcess:
    """``python -m remote_exec.server`` as a child process, on a free port.

    Waits for the one line the daemon prints once it serves, and keeps its
    stderr in a temporary file (shown by ``log()``).
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        token: str | None = None,
        start: bool = True,
    ) -> None:
        self.args = [sys.executable, "-m", "remote_exec.server", "--port", "0", *args]
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        if token is not None:
            self.env["REMOTE_EXEC_TOKEN"] = token
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.proc: subprocess.Popen[bytes] | None = None
        self.line = ""
        self.url = ""
        if start:
            self.start()

    def start(self, timeout: float = 30.0) -> str:
        """Start the daemon and return its URL (raises if it exits first)."""
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        line = _readline(self.proc, timeout)
        self.line = line
        match = re.search(r"serving on (wss?://\S+)", line)
        if match is None:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the daemon did not start: {line!r}\n{self.log()}")
        self.url = match.group(1)
        return self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if needed; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line of ``proc``, or "" if it exits or ``timeout`` passes."""
    assert proc.stdout is not None
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0].decode(errors="replace").strip() if result else ""


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """A bare HTTP/1.1 GET: (status, headers, body)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
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
