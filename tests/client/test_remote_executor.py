"""``RemoteExecutor``, the shared client side, over an in-memory transport to a real dispatcher."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import TaskGroup

from remote_exec.client.remote import RemoteExecutor
from remote_exec.exceptions import ConnectionLostError
from remote_exec.runtime.transport import FrameTransport
from remote_exec.server.dispatch import Dispatcher
from remote_exec.server.testing import MemoryFrameTransport, memory_transport_pair
from tests.instruments import Device

pytestmark = pytest.mark.anyio


class ImmediateTransport(MemoryFrameTransport):
    """Sends without yielding to the event loop, as a socket write that fits does."""

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        try:
            self._send.send_nowait(b"".join(pieces))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionLostError("the other end went away") from exc
        self.frames_sent += 1


class InMemoryExecutor(RemoteExecutor):
    def __init__(self, serve: TaskGroup, dispatcher: Dispatcher) -> None:
        super().__init__()
        self._serve = serve
        self._dispatcher = dispatcher
        self.transport: ImmediateTransport | None = None

    async def _connect(self) -> FrameTransport:
        ours, theirs = memory_transport_pair()
        self.transport = ImmediateTransport(ours._send, ours._receive)
        self._serve.start_soon(self._dispatcher.serve, theirs)
        return self.transport


@asynccontextmanager
async def in_memory() -> AsyncIterator[InMemoryExecutor]:
    dispatcher = Dispatcher(allow_modules=["tests.*"])
    async with anyio.create_task_group() as tg:
        async with InMemoryExecutor(tg, dispatcher) as executor:
            yield executor
        await dispatcher.aclose()


async def test_calls_in_flight_together_share_messages() -> None:
    callers, calls = 16, 20
    async with in_memory() as executor:
        devices = [Device() for _ in range(callers)]
        for i, device in enumerate(devices):
            await executor.ensure_remote_instance(device, f"dev{i}")
        assert executor.transport is not None
        before = executor.transport.frames_sent

        async def caller(device: Device) -> None:
            for i in range(calls):
                assert await device.echo(i) == i

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for device in devices:
                    tg.start_soon(caller, device)
        messages = executor.transport.frames_sent - before
        # Callers woken by one batch of replies send their next calls together.
        assert messages <= callers * calls // 4, messages


async def test_a_lone_call_is_sent_at_once() -> None:
    async with in_memory() as executor:
        device = Device()
        await executor.ensure_remote_instance(device, "dev")
        assert executor.transport is not None
        before = executor.transport.frames_sent
        for i in range(10):
            assert await device.echo(i) == i
        assert executor.transport.frames_sent - before == 10
