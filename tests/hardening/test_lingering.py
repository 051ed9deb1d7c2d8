"""Nothing of a connection outlives it: its socket and buffers go at once.

A message over the size cap is closed with 1009; the daemon's buffer for it,
and the socket once the peer hangs up, used to linger until the next ping
(``--ping-interval``), uncounted by ``--max-connections``: 8 such messages in a
row held 563 MiB and 7 sockets. Silent sockets that hang up used to sit in
CLOSE-WAIT until the handshake timeout. Each test reads the daemon's open
descriptors and memory from ``/proc`` (Linux), with generous bounds, and
watches a well-behaved client that stays connected throughout.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from remote_exec.client.websocket import WebSocketExecutor
from tests.hardening.helpers import (
    TOKEN,
    Daemon,
    RawClient,
    connections_are,
    health,
    start_daemon,
    until,
    ws_frame,
)
from tests.hardening.pressure import AT_ONCE, STALL, descriptors, memory, settles, watched

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)"),
]

MIB = 1024 * 1024
CAP = 64 * MIB


@pytest.fixture
def lingering_daemon(anyio_backend: str, tmp_path: Path) -> Daemon:
    daemon = start_daemon(
        anyio_backend,
        tmp_path,
        "--max-connections",
        "2",
        "--max-message-size",
        "64MiB",
        # Pings far apart: what is freed is freed by the close, not by a ping.
        "--ping-interval",
        "60",
        "--idle-timeout",
        "120",
    )
    daemon.mark_log()
    return daemon


async def oversized_message(daemon: Daemon) -> int:
    """Open a websocket, send a message just over the cap, and hang up once the
    server has closed; the server's close code."""
    async with RawClient.connect(daemon) as raw:
        await raw.send_raw(ws_frame(0x2, b"", length=CAP + MIB))
        chunk = bytes(MIB)
        with anyio.fail_after(30):
            for _ in range(CAP // MIB + 1):
                await raw.send_raw(chunk)
        return await raw.close_frame()


async def test_oversized_messages_free_their_memory_and_socket_at_once(
    lingering_daemon: Daemon,
) -> None:
    daemon = lingering_daemon
    try:
        async with watched(daemon) as watch:
            base_fds = descriptors(daemon.pid)
            base_rss = memory(daemon.pid)["VmRSS"]
            for attack in range(8):
                assert await oversized_message(daemon) == 1009
                # Back near the baseline at once, not after a ping (60 s away).
                await settles(lambda: descriptors(daemon.pid) <= base_fds)
                await settles(lambda: memory(daemon.pid)["VmRSS"] < base_rss + 32 * MIB)
                assert daemon.alive(), attack
            peak = memory(daemon.pid)["VmHWM"]
        # One message is buffered up to the cap at a time, never eight.
        assert peak < base_rss + 2 * CAP + 32 * MIB, (peak, base_rss)
        assert watch.worst < STALL
        # The cap is 2 connections, and none is left over: a client gets in right away.
        with anyio.fail_after(AT_ONCE):
            async with (
                WebSocketExecutor(daemon.url, token=TOKEN) as first,
                WebSocketExecutor(daemon.url, token=TOKEN) as second,
            ):
                assert await first.get_remote_objects() == []
                assert await second.get_remote_objects() == []
        await health(daemon)
        assert "Traceback" not in daemon.new_log()
    except BaseException as exc:
        exc.add_note(daemon.new_log()[-4000:])
        raise
    finally:
        daemon.process.close()


async def test_a_peer_that_never_hangs_up_after_1009_is_dropped(
    anyio_backend: str, tmp_path: Path
) -> None:
    daemon = start_daemon(
        anyio_backend, tmp_path, "--max-message-size", "1MiB", "--handshake-timeout", "1"
    )
    try:
        base_fds = descriptors(daemon.pid)
        async with RawClient.connect(daemon) as raw:
            # A frame that claims a terabyte, then a little more than the cap, then silence.
            await raw.send_raw(ws_frame(0x2, b"", length=1 << 40) + bytes(2 * MIB))
            assert await raw.close_frame() == 1009
            start = time.monotonic()
            await raw.dropped()  # the server hangs up: after the handshake timeout
            waited = time.monotonic() - start
        assert 0.5 < waited < AT_ONCE, waited  # (the idle timeout would be 60 s)
        await settles(lambda: descriptors(daemon.pid) <= base_fds)
        async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
            assert await executor.get_remote_objects() == []
    finally:
        daemon.process.close()


async def test_silent_sockets_that_hang_up_free_their_descriptors_at_once(
    anyio_backend: str, tmp_path: Path
) -> None:
    # Handshakes may take 60 s: hanging up must not wait for that.
    daemon = start_daemon(anyio_backend, tmp_path, "--handshake-timeout", "60")
    try:
        async with watched(daemon) as watch:
            base_fds = descriptors(daemon.pid)
            for _ in range(3):
                sockets = [await anyio.connect_tcp("127.0.0.1", daemon.port) for _ in range(40)]
                await settles(lambda: descriptors(daemon.pid) >= base_fds + 40)
                for sock in sockets:
                    await sock.aclose()
                await settles(lambda: descriptors(daemon.pid) <= base_fds)
        assert watch.worst < STALL
    finally:
        daemon.process.close()


async def test_a_handshake_refused_by_the_server_itself_is_closed_at_once(
    anyio_backend: str, tmp_path: Path
) -> None:
    daemon = start_daemon(anyio_backend, tmp_path, "--handshake-timeout", "60")
    try:
        base_fds = descriptors(daemon.pid)
        request = (
            "GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = b""
        with anyio.fail_after(AT_ONCE):  # (the idle timeout would be 60 s)
            async with await anyio.connect_tcp("127.0.0.1", daemon.port) as stream:
                await stream.send(request.encode())
                while True:
                    try:
                        answer += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        await settles(lambda: descriptors(daemon.pid) <= base_fds)
        await health(daemon)
    finally:
        daemon.process.close()


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "no-token"])
async def test_data_sent_before_the_upgrade_is_answered_gets_400_and_nothing_lingers(
    anyio_backend: str, tmp_path: Path, token: str | None
) -> None:
    """Upgrade request and a first frame in one packet: hypercorn answers 400
    itself. The app's answer racing it took a trio daemon down (anyone could,
    no token needed), and an app already told "connect" was never told more
    (with the token: a place under --max-connections held for good)."""
    daemon = start_daemon(anyio_backend, tmp_path)
    try:
        base_fds = descriptors(daemon.pid)
        for _ in range(3):
            request = (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n"
            )
            if token is not None:
                request += f"Authorization: Bearer {token}\r\n"
            answer = b""
            with anyio.fail_after(AT_ONCE):
                async with await anyio.connect_tcp("127.0.0.1", daemon.port) as stream:
                    await stream.send(request.encode() + b"\r\n" + ws_frame(0x2, b"early"))
                    while True:
                        try:
                            answer += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
            assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert daemon.alive(), daemon.process.log()
        await until(connections_are(daemon, 0))
        await settles(lambda: descriptors(daemon.pid) <= base_fds)
        await health(daemon)
        async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
            assert await executor.get_remote_objects() == []
        assert "Traceback" not in daemon.process.log()
    finally:
        daemon.process.close()
