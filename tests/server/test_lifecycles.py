"""Scopes and lifecycle hooks against the real daemon (and the process child).

A client run as a separate Python process creates a connection-scoped and a
server-scoped instance, then is killed with SIGKILL: the daemon sees its
connection lost, exits the connection-scoped instance (its hook writes to a
file) and publishes its "delete" event; the server-scoped one stays. SIGTERM
then gives the call in flight its grace, exits every instance exactly once,
and the daemon exits 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from remote_exec import ProcessExecutor
from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.exceptions import ConnectionLostError
from tests.conformance.helpers import until
from tests.conformance.lifecycle_devices import Port, lines
from tests.ws_instruments import ROOT, DaemonProcess

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

CLIENT = textwrap.dedent(
    """
    import sys

    import anyio

    from remote_exec import WebSocketExecutor
    from tests.conformance.lifecycle_devices import Port


    async def main(url: str, log: str) -> None:
        async with WebSocketExecutor(url) as executor:
            for name, scope in (("conn", "connection"), ("srv", "server")):
                port = Port(log, name)
                await executor.create_remote_instance(port, name, log, name, scope=scope)
            print("ready", flush=True)
            await anyio.sleep_forever()


    if __name__ == "__main__":
        anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[3])
    """
)


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "REMOTE_EXEC_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


async def _start_client(
    script: Path, *args: str, ready: str = "ready", cwd: Path = ROOT
) -> subprocess.Popen[str]:
    """Run ``script`` as a separate Python process; returns once it printed ``ready``."""
    client = subprocess.Popen(  # noqa: ASYNC220 - read from a thread below
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    line = ""
    with anyio.move_on_after(30):
        line = await anyio.to_thread.run_sync(client.stdout.readline, abandon_on_cancel=True)
    if line.strip() != ready:
        client.kill()
        _, err = client.communicate(timeout=10)
        pytest.fail(f"the client did not get ready: {line!r}\n{err}")
    return client


async def test_a_killed_clients_connection_scope_ends_and_sigterm_exits_the_rest(
    anyio_backend: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "hooks.log")
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with DaemonProcess(
        "--no-auth", "--allow-module", "tests.*", "--backend", anyio_backend, "--grace", "10"
    ) as daemon:
        client = await _start_client(script, daemon.url, log, anyio_backend)
        try:
            assert sorted(lines(log)) == ["enter conn", "enter srv"]
            async with WebSocketExecutor(daemon.url) as watcher:
                assert sorted(await watcher.get_remote_objects()) == ["conn", "srv"]
                async with watcher.get_channel_from_remote("", "delete") as events:
                    client.kill()  # SIGKILL: no goodbye, the daemon sees the socket die
                    client.wait(10)
                    with anyio.fail_after(15):
                        event = await events.__anext__()
                assert event["name"] == "conn"
                assert "connection closed" in event["data"]["reason"]
                assert "error" not in event["data"]
                await until(lambda: "exit conn" in lines(log))
                assert "exit srv" not in lines(log)
                assert await watcher.get_remote_objects() == ["srv"]

                # SIGTERM with a call in flight: it gets its grace, then every
                # instance is exited once, then the daemon exits 0.
                srv = Port(log, "srv")
                assert not await watcher.ensure_remote_instance(srv, "srv", log, "srv")
                outcome: list[Any] = []

                async def hold() -> None:
                    outcome.append(await srv.hold(1.0))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(hold)
                    await until(lambda: "hold srv" in lines(log))
                    daemon.send_signal(signal.SIGTERM)
                assert outcome == ["held"]
                code = await anyio.to_thread.run_sync(daemon.wait, 30.0)
                assert code == 0, daemon.log()
                assert lines(log) == [
                    *lines(log)[:2],  # the two enters, in whichever order they came
                    "exit conn",
                    "hold srv",
                    "held srv",
                    "exit srv",
                ]
                with pytest.raises(ConnectionLostError):
                    await srv.read()
        finally:
            if client.poll() is None:
                client.kill()
            client.communicate(timeout=10)


async def test_a_server_scoped_instance_outlives_its_clients_executor(
    anyio_backend: str, tmp_path: Path
) -> None:
    """Server scope (the default) lives until deleted: a client stopping politely
    leaves it; a connection-scoped one goes with the client's connection."""
    log = str(tmp_path / "hooks.log")
    with DaemonProcess(
        "--no-auth", "--allow-module", "tests.*", "--backend", anyio_backend
    ) as daemon:
        async with WebSocketExecutor(daemon.url) as first:
            await first.create_remote_instance(Port(log, "srv"), "srv", log, "srv")
            await first.create_remote_instance(
                Port(log, "conn"), "conn", log, "conn", scope="connection"
            )
        await until(lambda: "exit conn" in lines(log))
        async with WebSocketExecutor(daemon.url) as second:
            assert await second.get_remote_objects() == ["srv"]
            srv = Port(log, "srv")
            assert not await second.ensure_remote_instance(srv, "srv", log, "srv")
            assert await srv.read() == "srv read"
            await second.delete_remote_instance(srv)
        assert daemon.stop() == 0
    assert sorted(lines(log)) == ["enter conn", "enter srv", "exit conn", "exit srv"]


async def test_the_process_child_exits_its_instances_on_sigterm(
    anyio_backend: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "hooks.log")
    executor = ProcessExecutor()
    async with executor:
        for name in ("a", "b"):
            await executor.create_remote_instance(Port(log, name), name, log, name)
        assert executor.pid is not None
        os.kill(executor.pid, signal.SIGTERM)
        await until(lambda: len(lines(log)) == 4)
        with anyio.fail_after(15):
            while True:  # until the executor sees the child's goodbye
                try:
                    await executor.get_echo_clock()
                except ConnectionLostError:
                    break
                await anyio.sleep(0.02)
    assert executor.returncode == 0
    assert sorted(lines(log)) == ["enter a", "enter b", "exit a", "exit b"]


async def test_the_readme_connection_scope_example(anyio_backend: str, tmp_path: Path) -> None:
    """The README's killed-client example, run as written against a daemon."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    (source,) = [block for block in blocks if 'scope="connection")' in block]
    script = tmp_path / "shutter_client.py"
    script.write_text(source)
    with DaemonProcess(
        "--no-auth", "--allow-import-from-main", "--backend", anyio_backend
    ) as daemon:
        client = await _start_client(script, daemon.url, ready="exposed 0.5 s", cwd=tmp_path)
        client.kill()
        client.communicate(timeout=10)
        await until(lambda: "instance 'shutter' deleted: its connection closed" in daemon.log())
        async with WebSocketExecutor(daemon.url) as executor:
            assert await executor.get_remote_objects() == []
        assert daemon.stop() == 0
        assert daemon.proc is not None
        assert daemon.proc.stdout is not None
        printed = daemon.proc.stdout.read().decode()
    assert printed.splitlines() == ["shutter opened", "shutter closed"]
