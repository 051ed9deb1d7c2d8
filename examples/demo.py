"""Start a real ``remote-exec serve`` daemon and drive an instrument inside it.

Run from the repository root::

    python -m examples.demo                    # asyncio, client and daemon
    python -m examples.demo --backend trio     # trio, client and daemon

It starts the daemon as a child process on 127.0.0.1 with a port the kernel
picks (``--port 0``), a fresh token given through ``REMOTE_EXEC_TOKEN`` and
``--allow-module 'examples.*'``, reads the URL from the one line the daemon
prints, runs a client against it (calls, a callback, a stream, an error that
crosses the wire, events), then stops the daemon with SIGTERM and checks that
it exited with code 0.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from examples.instrument import Instrument
from remote_exec import RemoteException
from remote_exec.client.websocket import WebSocketExecutor

ROOT = Path(__file__).resolve().parent.parent


def start_daemon(token: str, backend: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m remote_exec.server`` and return it with its URL."""
    env = dict(os.environ, REMOTE_EXEC_TOKEN=token)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "remote_exec.server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--allow-module",
        "examples.*",
        "--backend",
        backend,
        "--log-level",
        "WARNING",
    ]
    daemon = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    line = daemon.stdout.readline().strip()  # "" if the daemon exits instead
    match = re.search(r"serving on (wss?://\S+)", line)
    if match is None:
        daemon.kill()
        daemon.wait()
        raise SystemExit(f"the daemon did not start (exit code {daemon.returncode})")
    print(f"daemon   | {line}")
    return daemon, match.group(1)


def show(call: str, outcome: Any) -> None:
    print(f"client   | {call:<28} -> {outcome}")


async def watch_events(
    executor: WebSocketExecutor,
    seen: list[dict[str, Any]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Collect every event of every instance until cancelled."""
    async with executor.get_channel_from_remote("", "") as events:
        task_status.started()
        async for event in events:
            seen.append(event)  # noqa: PERF401 - kept as they come: the task is cancelled


async def run_client(url: str, token: str) -> None:
    async with WebSocketExecutor(url, token=token) as executor:
        print(f"client   | connected to {url} from process {os.getpid()}")
        events: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            await tg.start(watch_events, executor, events)
            await executor.get_echo_clock()  # one round trip: the subscription is in place

            scope = Instrument("scope", gain=2.0)
            # Created in the daemon from its class, constructor arguments and config.
            async with executor.remote_instance(scope, "scope", "scope", gain=2.0):
                show("scope.where()", await scope.where())
                value = await scope.read(0)
                show("scope.read(0)", f"{value}   (callback got {scope.readings})")
                show("scope.acquire(1000)", f"{len(await scope.acquire(1000))} bytes")
                async with scope.sweep(4) as points:
                    show("scope.sweep(4)", [point async for point in points])
                try:
                    await scope.set_gain(-1)
                except ValueError as exc:  # a builtin error stays itself across the wire
                    remote = isinstance(exc, RemoteException)
                    show("scope.set_gain(-1)", f"ValueError: {exc} (remote: {remote})")
                show("scope.set_gain(3.0)", await scope.set_gain(3.0))
                show("remote config", await executor.get_remote_object_config(scope))
                show("remote objects", await executor.get_remote_objects())
            await executor.get_echo_clock()  # let the last events arrive
            tg.cancel_scope.cancel()
        summary = [f"{e['channel']} {e['name']}" + _method(e) for e in events]
        print(f"client   | events seen: {', '.join(summary)}")


def _method(event: dict[str, Any]) -> str:
    method = event.get("data", {}).get("method")
    return f".{method}" if method else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)

    token = secrets.token_urlsafe(32)
    daemon, url = start_daemon(token, args.backend)
    try:
        anyio.run(run_client, url, token, backend=args.backend)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
    print(f"daemon   | stopped with SIGTERM, exit code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
