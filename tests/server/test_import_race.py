"""Concurrent creations of a class whose module is still being imported.

A real daemon serves a temporary allowed module, ``probe_slow``, whose import
is slow: it tells the test that it started, then waits (at most 30 s) until
the test lets it go on, and only then defines ``Slow``. While it waits the
module is already in the daemon's ``sys.modules``, half-built. Clients ask
for instances of ``Slow`` one after the other during that import; each must
wait for it to finish (never see the half-built module: ``module 'probe_slow'
has no class 'Slow'``), and the module must be imported once.
"""

from __future__ import annotations

import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from remote_exec import apply_executor
from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.server.testing import DaemonProcess

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX daemon"),
    pytest.mark.timeout(60),
]

TOKEN = "import-race-token-0123456789"
CLIENTS = 4

# The module the daemon imports. It appends a line to IMPORTS each time its
# code runs, connects to the test's gate and waits for a byte from it: the
# slow part of its import, which the test ends once every client's request
# has reached the daemon (a gate, not a sleep: nothing depends on timing).
MODULE = """\
import os
import socket

from remote_exec import apply_executor

with open({imports!r}, "a") as file:
    file.write(f"{{os.getpid()}}\\n")

with socket.create_connection(("127.0.0.1", {port}), timeout=30) as gate:
    gate.sendall(b"importing")
    gate.recv(1)  # the test says go on (or 30 s pass, or it went away)


class Slow:
    def __init__(self, tag):
        self.tag = tag

    @apply_executor
    def hello(self):
        return (self.tag, os.getpid())
"""


class Slow:
    """The client's twin of ``probe_slow.Slow`` (never imported here)."""

    def __init__(self, tag: int) -> None:
        self.tag = tag

    @apply_executor
    def hello(self) -> tuple[int, int]:
        raise AssertionError("runs remotely only")


Slow.__module__ = "probe_slow"


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("REMOTE_EXEC_TOKEN", raising=False)
    monkeypatch.setenv("REMOTE_EXEC_TOKEN_FILE", str(tmp_path / "state" / "token"))
    return dict(os.environ)


@pytest.mark.anyio
async def test_staggered_creations_wait_for_one_slow_import(
    anyio_backend: str, clean_env: dict[str, str], tmp_path: Path
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    imports = tmp_path / "imports.txt"
    started = anyio.Event()
    release = anyio.Event()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        (modules / "probe_slow.py").write_text(MODULE.format(imports=str(imports), port=port))

        async def gate(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                assert await stream.receive(9) == b"importing"
                started.set()
                await release.wait()
                await stream.send(b"g")

        with DaemonProcess(
            "--backend",
            anyio_backend,
            "--allow-module",
            "probe_slow",
            "--path",
            str(modules),
            env=clean_env,
            token=TOKEN,
            cwd=tmp_path,
        ) as daemon:
            results: dict[int, tuple[int, int]] = {}
            errors: list[BaseException] = []
            with anyio.fail_after(45):
                async with AsyncExitStack() as stack:
                    executors = [
                        await stack.enter_async_context(
                            WebSocketExecutor(daemon.url, token=TOKEN, init_context=False)
                        )
                        for _ in range(CLIENTS)
                    ]
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(listener.serve, gate)

                        async def create(index: int) -> None:
                            executor = executors[index]
                            obj = Slow(index)
                            try:
                                await executor.ensure_remote_instance(obj, f"slow-{index}", index)
                                results[index] = await executor.execute(obj, "hello")
                            except Exception as exc:  # noqa: BLE001 - reported below
                                errors.append(exc)

                        # The first creation starts the import ...
                        tg.start_soon(create, 0)
                        await started.wait()
                        # ... the others arrive one after the other while it
                        # runs: each request has reached the daemon (a round
                        # trip on the same connection came back after it)
                        # before the next one is sent.
                        async with anyio.create_task_group() as creations:
                            for index in range(1, CLIENTS):
                                creations.start_soon(create, index)
                                await anyio.wait_all_tasks_blocked()
                                await executors[index].get_echo_clock()
                            assert not errors, errors  # nobody was answered yet
                            assert not results
                            release.set()  # the import may go on
                        tg.cancel_scope.cancel()
            assert not errors, errors
            assert results == {index: (index, daemon.pid) for index in range(CLIENTS)}
            assert imports.read_text().split() == [str(daemon.pid)]  # imported once
            assert "Traceback" not in daemon.log()
