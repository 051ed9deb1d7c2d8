"""Detached invocations outlive their client's connection (a real daemon)."""

from __future__ import annotations

import json
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute

from remote_exec import ConnectionLostError, InvocationStatus, WebSocketExecutor
from tests.conformance.devices import Chatty
from tests.conformance.helpers import listed
from tests.ws_instruments import DaemonProcess, http_get

pytestmark = pytest.mark.anyio

TOKEN = "detached-test-token-0123456789"


@pytest.fixture
def daemon(anyio_backend: str) -> Iterator[DaemonProcess]:
    with DaemonProcess(
        "--allow-module", "tests.*", "--backend", anyio_backend, token=TOKEN
    ) as process:
        yield process


@pytest.fixture
def tag() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def reset(executor: WebSocketExecutor) -> None:
    """Drop the executor's TCP connection with a reset, as a killed client would."""
    websocket = executor._websocket
    assert websocket is not None
    raw: socket.socket = websocket._stream.extra(SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await websocket._abort("reset by the test")


@pytest.mark.parametrize("method", ["hold", "ahold"])
async def test_a_detached_call_survives_its_connection(
    daemon: DaemonProcess, tmp_path: Path, tag: str, method: str
) -> None:
    chatty = Chatty(tag)
    gate = tmp_path / "gate"
    async with WebSocketExecutor(daemon.url, token=TOKEN) as first:
        await first.create_remote_instance(chatty, tag, tag)
        invocation = await first.submit(getattr(chatty, method), str(gate))
        await listed(first, tag, method, "running")
        await reset(first)
        with anyio.fail_after(10), pytest.raises(ConnectionLostError):
            await invocation.result()  # the handle's connection is gone
    async with WebSocketExecutor(daemon.url, token=TOKEN) as second:
        # The daemon has noticed the lost connection: the call still runs.
        with anyio.fail_after(10):
            while (await daemon_statistics(daemon))["connections"] > 1:  # noqa: ASYNC110 - in the daemon
                await anyio.sleep(0.01)
        assert (await second.get_invocation(invocation.id)).status is InvocationStatus.RUNNING
        gate.touch()
        with anyio.fail_after(10):
            assert await second.invocation(invocation.id).result() == "released"


async def test_a_plain_call_stops_with_its_connection(
    daemon: DaemonProcess, tmp_path: Path, tag: str
) -> None:
    chatty = Chatty(tag)
    async with WebSocketExecutor(daemon.url, token=TOKEN) as first:
        await first.create_remote_instance(chatty, tag, tag)
        lost: list[BaseException] = []

        async def hold() -> None:
            try:
                await chatty.hold(str(tmp_path / "never"))
            except ConnectionLostError as exc:
                lost.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            info = await listed(first, tag, "hold", "running")
            await reset(first)
        assert len(lost) == 1
    async with WebSocketExecutor(daemon.url, token=TOKEN) as second:
        with anyio.fail_after(10):
            while (await second.get_invocation(info.id)).status is InvocationStatus.RUNNING:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert (await second.get_invocation(info.id)).status is InvocationStatus.CANCELLED


async def daemon_statistics(daemon: DaemonProcess) -> dict[str, Any]:
    status, _, body = await http_get(
        daemon.port, "/instances", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    statistics: dict[str, Any] = json.loads(body)["statistics"]
    return statistics
