"""A client riding through a daemon restart: ``WebSocketExecutor(reconnect=True)``.

    python -m examples.reconnect

Starts its own daemon on a loopback port, creates an instrument there, then
kills the daemon (SIGKILL, as a crash or a power cut would) and starts a new
one on the same port. The call in flight at the crash fails at once with
``ConnectionLostError`` and is never sent again; the next call waits for the
reconnect, and the instrument is re-created with its configuration. Nothing
ran twice: the instrument writes every call to a file.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import anyio

from remote_exec import ConnectionLostError, WebSocketExecutor, apply_executor, cancellable_sleep
from remote_exec.server.testing import DaemonProcess

TOKEN = "example-reconnect-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent


class Stage:
    _config_props_ = ("speed",)  # re-created with it after a daemon restart

    def __init__(self, journal: str) -> None:
        self.journal = journal
        self.speed = 1.0

    def _write(self, line: str) -> None:
        with open(self.journal, "a") as file:
            file.write(line + "\n")

    @apply_executor
    def move(self, position: float) -> str:
        self._write(f"move {position} at speed {self.speed}")
        return f"at {position}"

    @apply_executor
    def home(self) -> str:
        self._write("home started")
        while True:  # a long move, cut short only by a cancel
            cancellable_sleep(0.01)


def daemon(port: int = 0) -> DaemonProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return DaemonProcess(
        "--port", str(port), "--allow-import-from-main", token=TOKEN, env=env, cwd=ROOT
    )


async def main() -> None:
    journal = Path(tempfile.mkdtemp()) / "journal"
    daemons = [daemon()]
    try:
        async with WebSocketExecutor(daemons[0].url, token=TOKEN, reconnect=True) as executor:
            stage = Stage(str(journal))
            stage.speed = 2.5
            async with executor.remote_instance(stage, "stage", str(journal)):
                print(await stage.move(1.0))
                async with anyio.create_task_group() as tg:

                    async def homing() -> None:
                        try:
                            await stage.home()
                        except ConnectionLostError:
                            print("the call in flight failed at once: ConnectionLostError")

                    tg.start_soon(homing)
                    with anyio.fail_after(10):
                        while "home" not in journal.read_text():  # noqa: ASYNC110 - by the daemon
                            await anyio.sleep(0.01)
                    daemons[0].send_signal(signal.SIGKILL)  # the daemon crashes
                daemons.append(daemon(daemons[0].port))  # back on the same port
                print(await stage.move(2.0))  # waits for the reconnect, then runs once
                print(f"connected: {executor.connected}, reconnects: {executor.reconnects}")
    finally:
        for process in daemons:
            process.close()
    print(journal.read_text(), end="")


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:2])
