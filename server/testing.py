"""Helpers for testing code that speaks remote-exec (like ``trio.testing``).

``memory_transport_pair()`` gives two connected ``FrameTransport`` ends: what
one sends, the other receives, frame by frame. Closing either end makes the
other's ``receive_frame`` raise ``ConnectionLostError``, as a dropped socket would.

``DaemonProcess`` runs a real ``remote-exec serve`` (``python -m
remote_exec.server``) on a free loopback port for a test or a benchmark::

    with DaemonProcess("--no-auth", "--allow-module", "mylab.*") as daemon:
        async with WebSocketExecutor(daemon.url) as executor:
            ...
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from remote_exec.exceptions import ConnectionLostError

__all__ = ["DaemonProcess", "MemoryFrameTransport", "memory_transport_pair"]


class MemoryFrameTransport:
    """One end of an in-memory ``FrameTransport`` pair."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self.frames_sent = 0

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        try:
            await self._send.send(b"".join(pieces))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionLostError("the other end of the memory transport is closed") from exc
        self.frames_sent += 1

    async def send_raw(self, frame: bytes) -> None:
        """Send bytes as one frame, valid or not (for tests of hostile peers)."""
        await self.send_frame([frame])

    async def receive_frame(self) -> bytes:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionLostError("the other end of the memory transport went away") from exc

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()


def memory_transport_pair(
    max_buffered: float = math.inf,
) -> tuple[MemoryFrameTransport, MemoryFrameTransport]:
    """Two connected in-memory transports.

    Args:
        max_buffered: how many frames each direction holds before ``send_frame``
            waits for the other end to receive (unbounded by default).
    """
    a_send, b_receive = anyio.create_memory_object_stream[bytes](max_buffered)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](max_buffered)
    return MemoryFrameTransport(a_send, a_receive), MemoryFrameTransport(b_send, b_receive)


class DaemonProcess:
    """``python -m remote_exec.server --host 127.0.0.1 --port 0 ARGS`` as a child process.

    ``start`` waits for the one line the daemon prints once it serves (its
    URL); its log (stderr) goes to a temporary file, shown by ``log()``.

    Args:
        args: more command-line options (``--no-auth``, ``--allow-module``, ...).
        env: the daemon's environment (default: this process's).
        token: the bearer token, passed as ``REMOTE_EXEC_TOKEN``.
        cwd: its working directory (default: this one).
        python: the interpreter (default: this one).
        start: start it now (otherwise call ``start()``).
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        token: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        python: str | None = None,
        start: bool = True,
    ) -> None:
        executable = python or sys.executable
        self.args = [executable, "-m", "remote_exec.server", "--host", "127.0.0.1", "--port", "0"]
        self.args += args
        self.env = dict(os.environ if env is None else env)
        if token is not None:
            self.env["REMOTE_EXEC_TOKEN"] = token
        self.cwd = cwd
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.proc: subprocess.Popen[bytes] | None = None
        self.line = ""  # the line it printed once serving
        self.url = ""
        self.killed = False  # it had to be killed (SIGTERM was not enough)
        if start:
            try:
                self.start()
            except BaseException:
                self._stderr.close()  # nobody gets the object to close it
                raise

    def start(self, timeout: float = 30.0) -> str:
        """Start the daemon and return its URL.

        Raises:
            RuntimeError: it exited, or said nothing within ``timeout`` seconds
                (the message holds its log).
        """
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.line = _first_line(self.proc, timeout)
        match = re.search(r"serving on (wss?://\S+)", self.line)
        if match is None:
            self.kill()
            raise RuntimeError(f"the daemon did not start: {self.line!r}\n{self.log()}")
        self.url = match.group(1)
        return self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything the daemon logged so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a graceful shutdown), then SIGKILL after ``timeout`` seconds;
        the exit code (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, now."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed = True
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop it and release its pipe and log file."""
        self.stop()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line of ``proc``, or "" if it exits or ``timeout`` passes."""
    out = proc.stdout
    assert out is not None
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(out.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].decode(errors="replace").strip() if result else ""
