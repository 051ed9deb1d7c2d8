"""Connections that never authenticate cannot lock clients out, nor flood the log.

Before the token is checked anyone can open sockets. With the daemon's file
descriptors limited to 128 and 150 silent sockets open, the daemon used to
run out of descriptors: a client then waited until silent sockets timed out
(the handshake timeout), and asyncio logged a traceback for each failed
accept, thousands of lines a second. Now at most ``--max-pending-connections``
unauthenticated connections are kept, below the descriptor limit; the oldest
makes room for a newcomer; and what such peers make the daemon log is
rate-limited.
"""

from __future__ import annotations

import argparse
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.server import cli
from remote_exec.server.app import DEFAULT_MAX_PENDING_CONNECTIONS
from tests.hardening.helpers import TOKEN, Daemon, health, start_daemon
from tests.hardening.pressure import STALL, descriptors, memory, settles, watched

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)"),
]

FD_LIMIT = 128
SILENT = 150
# Failure bounds only. A silent socket holds its place for the handshake
# timeout (30 s below), so a client locked out waits far longer than this.
GET_IN = 5.0
LOG_LINES = 80


@contextmanager
def silent_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to 127.0.0.1:``port`` that never send a byte."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sockets.append(sock)
            try:
                sock.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass  # completes in the background (or waits in the listen queue)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def limit_descriptors(daemon: Daemon, limit: int) -> None:
    try:
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (limit, limit))
    except (PermissionError, OSError) as exc:  # pragma: no cover - a sandbox without prlimit
        pytest.skip(f"cannot lower the daemon's descriptor limit: {exc}")


def log_lines(daemon: Daemon) -> list[str]:
    return daemon.new_log().splitlines()


async def test_silent_sockets_do_not_lock_a_client_out(anyio_backend: str, tmp_path: Path) -> None:
    daemon = start_daemon(anyio_backend, tmp_path, "--handshake-timeout", "30")
    try:
        limit_descriptors(daemon, FD_LIMIT)
        async with watched(daemon) as watch:
            daemon.mark_log()
            with silent_sockets(daemon.port, SILENT):
                # The flood has reached the daemon: most of its descriptors are taken.
                await settles(lambda: descriptors(daemon.pid) >= FD_LIMIT * 3 // 4, within=10)
                start = time.monotonic()
                with anyio.fail_after(GET_IN):
                    async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
                        for _ in range(20):
                            assert isinstance(await executor.get_remote_objects(), list)
                got_in = time.monotonic() - start
                await health(daemon)
                # Never all of them: the daemon keeps room for itself.
                assert descriptors(daemon.pid) < FD_LIMIT, descriptors(daemon.pid)
            assert watch.worst < STALL
        lines = log_lines(daemon)
        assert len(lines) < LOG_LINES, "\n".join(lines[:40])
        assert not any("Traceback" in line or " ERROR " in line for line in lines), lines[:40]
        assert any("dropped connection from 127.0.0.1:" in line for line in lines), lines[:40]
        assert got_in < GET_IN
        assert memory(daemon.pid)["VmHWM"] < 512 * 1024 * 1024
    except BaseException as exc:
        exc.add_note(daemon.new_log()[-4000:])
        raise
    finally:
        daemon.process.close()


async def test_the_pending_cap_holds_and_authenticated_clients_stay(
    anyio_backend: str, tmp_path: Path
) -> None:
    daemon = start_daemon(
        anyio_backend, tmp_path, "--max-pending-connections", "8", "--handshake-timeout", "30"
    )
    try:
        async with watched(daemon) as watch:
            base = descriptors(daemon.pid)
            daemon.mark_log()
            with silent_sockets(daemon.port, 40):
                # Silent sockets are dropped to keep the cap: 8 of them are held
                # (the watching client's connection, authenticated, is not one of
                # them, and stays).
                await settles(lambda: "dropped connection" in daemon.new_log(), within=10)
                await settles(lambda: descriptors(daemon.pid) <= base + 8)
                with anyio.fail_after(GET_IN):
                    async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
                        assert isinstance(await executor.get_remote_objects(), list)
            assert watch.worst < STALL
            await settles(lambda: descriptors(daemon.pid) <= base)
    except BaseException as exc:
        exc.add_note(daemon.new_log()[-4000:])
        raise
    finally:
        daemon.process.close()


def test_the_pending_cap_is_a_flag() -> None:
    serve = argparse.ArgumentParser()
    cli.add_serve_arguments(serve)
    assert serve.parse_args([]).max_pending_connections == DEFAULT_MAX_PENDING_CONNECTIONS == 128
    assert serve.parse_args(["--max-pending-connections", "3"]).max_pending_connections == 3
    with pytest.raises(SystemExit):
        serve.parse_args(["--max-pending-connections", "0"])
    assert "--max-pending-connections N" in serve.format_help()
