"""The daemon's patches of hypercorn hold (see ``harden_hypercorn``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

from remote_exec.server.app import harden_hypercorn


class _Stream:
    """A stream whose send races hypercorn's unlocked close path."""

    async def send_all(self, data: bytes) -> None:
        raise trio.BusyResourceError("another task is currently sending data on this SocketStream")


class _Protocol:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handle(self, event: Any) -> None:
        self.events.append(event)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_a_send_racing_a_close_closes_only_that_connection(anyio_backend: str) -> None:
    harden_hypercorn()
    harden_hypercorn()  # idempotent
    server: Any = TCPServer.__new__(TCPServer)
    server.stream = _Stream()
    server.send_lock = trio.Lock()
    server.protocol = _Protocol()
    await server.protocol_send(RawData(b"late data"))  # would raise without the patch
    assert [type(event) for event in server.protocol.events] == [Closed]
