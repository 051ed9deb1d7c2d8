"""WebSocketExecutor(reconnect=True) against a real daemon: killed and restarted
on the same port, or its TCP connection reset; no call ever runs twice."""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute

from remote_exec import ConnectionLostError, WebSocketExecutor
from tests.conformance.helpers import listed
from tests.ws_instruments import DaemonProcess

from .reconnect_devices import Counter

pytestmark = pytest.mark.anyio

TOKEN = "reconnect-test-token-0123456789"


def start_daemon(backend: str, port: int = 0) -> DaemonProcess:
    return DaemonProcess(
        "--port", str(port), "--allow-module", "tests.*", "--backend", backend, token=TOKEN
    )


@pytest.fixture
def daemon(anyio_backend: str) -> Iterator[DaemonProcess]:
    with start_daemon(anyio_backend) as process:
        yield process


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def reset(executor: WebSocketExecutor) -> None:
    """Drop the executor's TCP connection with a reset (a network drop)."""
    websocket = executor._websocket
    assert websocket is not None
    raw: socket.socket = websocket._stream.extra(SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await websocket._abort("reset by the test")


async def test_riding_through_a_daemon_restart(
    anyio_backend: str, daemon: DaemonProcess, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    counter = Counter(str(record))
    counter.gain = 7  # config: travels with the creation, and with the re-creation
    record.unlink()  # the local object's own construction is not the remote one's
    async with WebSocketExecutor(daemon.url, token=TOKEN, reconnect=True) as executor:
        await executor.create_remote_instance(counter, "counter", str(record))
        assert await counter.bump(1) == 7
        failed: list[BaseException] = []

        async def in_flight() -> None:
            try:
                await counter.hold(str(tmp_path / "never"))
            except ConnectionLostError as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await listed(executor, "counter", "hold", "running")
            daemon.send_signal(signal.SIGKILL)
            with anyio.fail_after(10):
                while executor.connected:  # noqa: ASYNC110 - the reader notices the loss
                    await anyio.sleep(0.01)
        assert len(failed) == 1  # failed at once, and never sent again
        with start_daemon(anyio_backend, daemon.port) as restarted:
            with anyio.fail_after(30):
                assert await counter.bump(2) == 7  # waits for the reconnect
            assert executor.connected
            assert executor.reconnects == 1
            assert await executor.get_remote_objects() == ["counter"]
            restarted_log = restarted.log()
        assert lines(record) == ["init", "bump 1", "hold", "init", "bump 2"]
        assert "counter" in restarted_log


async def test_a_network_drop_reattaches_without_recreating(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    counter = Counter(str(record))
    record.unlink()
    async with WebSocketExecutor(daemon.url, token=TOKEN, reconnect=True) as executor:
        await executor.create_remote_instance(counter, "counter", str(record))
        for n in range(3):
            await reset(executor)
            with anyio.fail_after(30):
                assert await counter.bump(n) == 1
        assert executor.reconnects == 3
    assert lines(record) == ["init", "bump 0", "bump 1", "bump 2"]


async def test_a_submitted_call_is_read_after_a_reconnect(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    record, gate = tmp_path / "record", tmp_path / "gate"
    counter = Counter(str(record))
    async with WebSocketExecutor(daemon.url, token=TOKEN, reconnect=True) as executor:
        await executor.create_remote_instance(counter, "counter", str(record))
        invocation = await executor.submit(counter.hold, str(gate))
        await listed(executor, "counter", "hold", "running")
        await reset(executor)
        gate.touch()
        with anyio.fail_after(30):
            assert await invocation.result() == "released"
        assert executor.reconnects == 1


async def test_without_reconnect_a_loss_is_final(daemon: DaemonProcess, tmp_path: Path) -> None:
    counter = Counter(str(tmp_path / "record"))
    async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
        await executor.create_remote_instance(counter, "counter", str(tmp_path / "record"))
        await reset(executor)
        with anyio.fail_after(10):
            while True:  # the reader notices the loss: then every call fails
                try:
                    await counter.bump(0)
                except ConnectionLostError:
                    break
        assert not executor.connected
        assert executor.reconnects == 0


async def test_calls_made_while_reconnecting_keep_their_order(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    counter = Counter(str(record))
    async with WebSocketExecutor(daemon.url, token=TOKEN, reconnect=True) as executor:
        await executor.create_remote_instance(counter, "counter", str(record))
        for round_ in range(3):
            await reset(executor)
            made: list[int] = []

            async def call(n: int, made: list[int] = made) -> None:
                made.append(n)  # the order the calls are made in (trio starts tasks in any)
                await counter.bump(n)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for n in range(8):
                        tg.start_soon(call, 100 * round_ + n)
            ran = [int(line.split()[1]) for line in lines(record) if line.startswith("bump")]
            assert ran[-8:] == made
        assert executor.reconnects == 3


async def test_a_call_cut_off_by_a_daemon_shutdown_is_a_connection_loss(
    anyio_backend: str, tmp_path: Path
) -> None:
    with DaemonProcess(
        "--allow-module", "tests.*", "--backend", anyio_backend, "--grace", "0.2", token=TOKEN
    ) as daemon:
        counter = Counter(str(tmp_path / "record"))
        async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
            await executor.create_remote_instance(counter, "counter", str(tmp_path / "record"))
            async with anyio.create_task_group() as tg:
                failed: list[BaseException] = []

                async def hold() -> None:
                    try:
                        await counter.hold(str(tmp_path / "never"))
                    except ConnectionLostError as exc:
                        failed.append(exc)

                tg.start_soon(hold)
                await listed(executor, "counter", "hold", "running")
                daemon.send_signal(signal.SIGTERM)
            assert len(failed) == 1
            assert "shutting down" in str(failed[0])
