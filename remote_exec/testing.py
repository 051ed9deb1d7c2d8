"""Helpers for testing code that speaks remote-exec, in memory (like ``trio.testing``).

``memory_transport_pair()`` gives two connected ``FrameTransport`` ends: what
one sends, the other receives, frame by frame. Closing either end makes the
other's ``receive_frame`` raise ``ConnectionLostError``, as a dropped socket would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .exceptions import ConnectionLostError

__all__ = ["MemoryFrameTransport", "memory_transport_pair"]


class MemoryFrameTransport:
    """One end of an in-memory ``FrameTransport`` pair."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self.frames_sent = 0

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        try:
            await self._send.send(b"".join(pieces))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionLostError("the other end of the memory transport is closed") from exc
        self.frames_sent += 1

    async def send_raw(self, frame: bytes) -> None:
        """Send bytes as one frame, valid or not (for tests of hostile peers)."""
        await self.send_frame([frame])

    async def receive_frame(self) -> bytes:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionLostError("the other end of the memory transport went away") from exc

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()


def memory_transport_pair(
    max_buffered: float = math.inf,
) -> tuple[MemoryFrameTransport, MemoryFrameTransport]:
    """Two connected in-memory transports.

    Args:
        max_buffered: how many frames each direction holds before ``send_frame``
            waits for the other end to receive (unbounded by default).
    """
    a_send, b_receive = anyio.create_memory_object_stream[bytes](max_buffered)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](max_buffered)
    return MemoryFrameTransport(a_send, a_receive), MemoryFrameTransport(b_send, b_receive)
