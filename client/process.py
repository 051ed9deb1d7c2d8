"""``ProcessExecutor``: instances live in a child Python process.

The child (``python -m remote_exec.server.child``) serves one connection over
a private ``socketpair``; its stdin is ``/dev/null`` and its stdout and stderr
are the parent's, so whatever remote methods print shows up as usual and never
mixes with the protocol. Instances are created there from their class,
constructor arguments and ``_config_props_``.

Lifetime: stopping the executor says goodbye (``Close``), waits up to
``stop_timeout`` for the child to exit, then kills it, and always reaps it, also
when the stopping task is being cancelled. A child that dies mid-call fails
every waiting call at once with ``ConnectionLostError``. If the parent dies, the
child sees the end of its socket and of a pipe only the parent holds open, and
exits (see ``remote_exec.server.child``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

import anyio
from anyio.abc import Process

from remote_exec.protocol import DEFAULT_WINDOW, Limits
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.backend import current_backend, is_trio
from remote_exec.runtime.sockets import socket_stream
from remote_exec.runtime.transport import FrameTransport, StreamTransport

from .remote import RemoteExecutor

__all__ = ["ProcessExecutor"]

_CHILD_MODULE = "remote_exec.server.child"


class ProcessExecutor(RemoteExecutor):
    """Runs instances in a child Python process.

    Args:
        python: the interpreter to start (default: this one, ``sys.executable``).
        allow_modules: ``fnmatch`` patterns of the modules the child may import
            classes from (default: any, the child is yours).
        allow_import_from_main: let the child create classes defined in this
            program's ``__main__`` by importing its main file under a private
            name (its ``if __name__ == "__main__":`` block does not run). Keep
            the program under that guard: an unguarded ``anyio.run(main)``
            would start it again in the child, so the child refuses it and
            creating the instance fails with an ``ImportError`` that says so.
        env: the child's environment (default: this process's). ``PYTHONPATH``
            gets this process's ``sys.path`` prepended so that the child imports
            the same modules.
        cwd: the child's working directory (default: this one).
        backend: "asyncio" or "trio" for the child's loop (default: the
            backend of the task that starts the executor).
        codec, limits, window, registry, init_context: see ``RemoteExecutor``.
        stop_timeout: seconds to wait for the child to exit after ``Close``
            before killing it.
    """

    def __init__(
        self,
        *,
        python: str | None = None,
        allow_modules: Sequence[str] = ("*",),
        allow_import_from_main: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        backend: str | None = None,
        codec: str = "msgpack",
        limits: Limits | None = None,
        window: int = DEFAULT_WINDOW,
        registry: InstanceRegistry | None = None,
        init_context: bool = True,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            codec=codec, limits=limits, window=window, registry=registry, init_context=init_context
        )
        if isinstance(allow_modules, str):
            raise TypeError("allow_modules must be a sequence of patterns, not one string")
        if backend is not None and backend not in ("asyncio", "trio"):
            raise ValueError(f"backend must be 'asyncio' or 'trio', not {backend!r}")
        self.python = python or sys.executable
        self.allow_modules = tuple(allow_modules)
        self.allow_import_from_main = allow_import_from_main
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.backend = backend
        self.stop_timeout = stop_timeout
        self._process: Process | None = None
        self._death_pipe: int | None = None  # the write end; the child watches the read end

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it starts)."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it was reaped, else None."""
        return self._process.returncode if self._process is not None else None

    def _command(self, fd: int, pipe: int, backend: str) -> list[str]:
        command = [self.python, "-m", _CHILD_MODULE, "--fd", str(fd), "--backend", backend]
        command += ["--parent-pipe", str(pipe)]
        command += ["--limits", json.dumps(dataclasses.asdict(self.limits))]
        # asyncio forks from its loop's thread, which lives as long as this
        # executor; trio forks from a cached worker thread that exits when idle,
        # and PR_SET_PDEATHSIG would then kill a healthy child.
        if not is_trio() and sys.platform.startswith("linux"):
            command.append("--pdeathsig")
        for pattern in self.allow_modules:
            command += ["--allow-module", pattern]
        if self.allow_import_from_main:
            command.append("--allow-import-from-main")
        return command

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        ours = os.path.realpath(self.python) == os.path.realpath(sys.executable)
        paths: list[str] = []
        for entry in sys.path:
            if not isinstance(entry, str):
                continue
            path = os.path.abspath(entry or os.getcwd())
            # Another interpreter keeps its own standard library and packages.
            if not ours and _belongs_to_this_interpreter(path):
                continue
            if path not in paths:
                paths.append(path)
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    async def _start(self) -> None:
        try:
            await super()._start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._disconnect()
            raise

    async def _connect(self) -> FrameTransport:
        backend = self.backend or current_backend()
        ours, theirs = socket.socketpair()
        try:
            with anyio.CancelScope(shield=True):  # a half-started child must not escape
                # Both ends non-inheritable (PEP 446): only the child gets the read end.
                pipe_read, self._death_pipe = os.pipe()
                try:
                    self._process = await anyio.open_process(
                        self._command(theirs.fileno(), pipe_read, backend),
                        stdin=subprocess.DEVNULL,
                        stdout=None,
                        stderr=None,
                        pass_fds=(theirs.fileno(), pipe_read),
                        env=self._environment(),
                        cwd=self.cwd,
                    )
                finally:
                    theirs.close()
                    os.close(pipe_read)
            stream = await socket_stream(ours)
        except BaseException:
            ours.close()
            theirs.close()
            with anyio.CancelScope(shield=True):
                await self._disconnect()
            raise
        return StreamTransport(
            stream, max_size=self.limits.max_message_size, max_buffers=self.limits.max_buffers
        )

    async def _disconnect(self) -> None:
        """Wait for the child to exit (``Close`` was sent), kill it if it does not, reap it."""
        process = self._process
        if process is None:
            self._close_death_pipe()
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                with anyio.move_on_after(self.stop_timeout):
                    await process.wait()
            if process.returncode is None:
                try:
                    process.kill()
                except ProcessLookupError:
                    pass
                await process.wait()
            await process.aclose()
        self._close_death_pipe()

    def _close_death_pipe(self) -> None:
        pipe, self._death_pipe = self._death_pipe, None
        if pipe is not None:
            os.close(pipe)


def _belongs_to_this_interpreter(path: str) -> bool:
    roots = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return any(path == root or path.startswith(root + os.sep) for root in roots)
