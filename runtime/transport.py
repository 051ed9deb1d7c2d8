"""What moves frames: the ``FrameTransport`` interface and its byte-stream form.

Executors and the server speak to a ``FrameTransport`` only; the websocket
(client and ASGI) and the process executor's private socket are thin
implementations of it. ``StreamTransport`` carries frames back to back over any
anyio byte stream, reading each header first so that a frame over the size cap
is refused before its body is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import anyio
from anyio.abc import ByteStream

from remote_exec.exceptions import ConnectionLostError
from remote_exec.framing import (
    DEFAULT_MAX_BUFFERS,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    decode_header,
)

__all__ = ["FrameTransport", "StreamTransport"]

# Pieces smaller than this are joined before sending: one syscall beats several.
_COALESCE = 64 * 1024


class FrameTransport(Protocol):
    """Sends and receives whole frames."""

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Send one frame given as pieces written back to back."""
        ...

    async def receive_frame(self) -> bytes | bytearray | memoryview:
        """The next whole frame.

        Raises:
            ConnectionLostError: the peer went away.
            FrameError: the next frame is invalid or over the size cap.
        """
        ...

    async def aclose(self) -> None:
        """Close the transport (idempotent)."""
        ...


class StreamTransport:
    """Frames back to back over an anyio ``ByteStream`` (the process executor's channel)."""

    def __init__(
        self,
        stream: ByteStream,
        *,
        max_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffers: int = DEFAULT_MAX_BUFFERS,
    ) -> None:
        self.stream = stream
        self.max_size = max_size
        self.max_buffers = max_buffers
        self._pending = bytearray()
        # A shield costs more than a small write (4 µs): skipped where not needed.
        self._writes_at_once = getattr(stream, "writes_at_once", False)

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        if len(pieces) == 1 and self._writes_at_once:
            await self._send_pieces(pieces)  # one write that nothing can cut
            return
        # A frame cut short by a cancellation would corrupt every frame after
        # it: once started, a frame is finished (a dead peer still ends it).
        with anyio.CancelScope(shield=True):
            await self._send_pieces(pieces)

    async def _send_pieces(self, pieces: Sequence[bytes | memoryview]) -> None:
        # anyio's byte streams accept any buffer at run time; only the stubs say bytes.
        send = self.stream.send
        try:
            if len(pieces) == 1:
                await send(cast(bytes, pieces[0]))
                return
            small = bytearray()
            for piece in pieces:
                if len(piece) < _COALESCE:
                    small += piece
                    continue
                if small:
                    await send(cast(bytes, small))
                    small = bytearray()
                await send(cast(bytes, piece))
            if small:
                await send(cast(bytes, small))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionLostError(f"connection lost while sending: {exc}") from exc

    async def _fill(self, count: int) -> None:
        while len(self._pending) < count:
            try:
                chunk = await self.stream.receive(max(65536, count - len(self._pending)))
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ) as exc:
                raise ConnectionLostError("the connection was closed by the other side") from exc
            self._pending += chunk

    async def receive_frame(self) -> bytearray:
        await self._fill(HEADER_SIZE)
        header = decode_header(self._pending, max_size=self.max_size, max_buffers=self.max_buffers)
        size = header.frame_length
        if len(self._pending) >= size:
            frame = self._pending[:size]
            del self._pending[:size]
            return frame
        # A large frame: read straight into a buffer of its exact size.
        frame = bytearray(size)
        view = memoryview(frame)
        have = len(self._pending)
        view[:have] = self._pending
        self._pending = bytearray()
        while have < size:
            try:
                chunk = await self.stream.receive(min(size - have, 4 * 1024 * 1024))
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ) as exc:
                raise ConnectionLostError("the connection was closed mid-frame") from exc
            view[have : have + len(chunk)] = chunk  # never more than the frame still needs
            have += len(chunk)
        return frame

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
