"""Socket byte streams: anyio's, or on asyncio a leaner one of our own.

anyio's asyncio ``SocketStream`` pauses the transport after every read and
resumes it on the next ``receive`` (two ``epoll_ctl`` calls per message), and
every ``send`` and ``receive`` starts with a checkpoint (one more trip through
the event loop). For one call and its reply that was about a fifth of a
client's time. ``ProtocolStream`` keeps what arrives in a queue and pauses reading only
when a megabyte waits unread; it writes straight to the transport and waits
only when the transport asks for it (``pause_writing``). On trio, anyio's
stream already maps onto the socket calls directly and is used as it is.

A read loop using it still yields to the event loop: ``receive`` returns
without waiting only what arrived while its caller ran, and the loop
delivers data only between task steps.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream

from remote_exec.runtime.backend import is_trio

__all__ = ["ProtocolStream", "connect_tcp", "socket_stream"]

# Unread bytes above which the socket is no longer read, and below which it is again.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024


class _Reader(asyncio.Protocol):
    """The protocol half of ``ProtocolStream``: the loop's callbacks."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.unread = 0
        self.paused = False
        self.eof = False
        self.error: BaseException | None = None
        self.closed = False
        self.read_waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.unread += len(data)
        if self.unread > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return True  # keep our half open: the other side may still read what we send

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake_reader()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self.read_waiter = self.read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ProtocolStream(ByteStream):
    """An anyio ``ByteStream`` over an asyncio transport (see the module docstring)."""

    writes_at_once = True
    """``send`` hands its whole item to the transport before it can suspend, so
    a cancellation never cuts an item short: a writer of one item needs no shield."""

    def __init__(self, transport: asyncio.Transport, reader: _Reader) -> None:
        self._transport = transport
        self._reader = reader
        self._loop = asyncio.get_running_loop()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        reader = self._reader
        while not reader.chunks:
            if reader.closed and reader.error is not None:
                raise anyio.BrokenResourceError from reader.error
            if reader.eof or reader.closed:
                raise anyio.EndOfStream
            waiter = reader.read_waiter = self._loop.create_future()
            await waiter
        chunk = reader.chunks.popleft()
        if len(chunk) > max_bytes:
            reader.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        reader.unread -= len(chunk)
        if reader.paused and reader.unread < _LOW_WATER:
            reader.paused = False
            self._transport.resume_reading()
        return chunk

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        reader = self._reader
        if reader.closed or self._transport.is_closing():
            raise anyio.BrokenResourceError("the connection is closed")
        self._transport.write(item)
        while reader.writing_paused and not reader.closed:
            waiter = reader.drain_waiter = self._loop.create_future()
            await waiter
        if reader.closed and reader.error is not None:
            raise anyio.BrokenResourceError from reader.error

    async def send_eof(self) -> None:
        if self._transport.can_write_eof() and not self._transport.is_closing():
            self._transport.write_eof()

    async def aclose(self) -> None:
        transport = self._transport
        if not transport.is_closing():
            transport.close()  # what is buffered still goes out...
            try:
                await anyio.lowlevel.checkpoint()
            finally:
                transport.abort()  # ...for one loop turn, as with anyio's stream

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """anyio's ``SocketAttribute`` values, as its own socket streams give them."""
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return {}
        attributes: dict[Any, Callable[[], Any]] = {
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: sock.getsockname,
            SocketAttribute.remote_address: sock.getpeername,
        }
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attributes[SocketAttribute.local_port] = lambda: sock.getsockname()[1]
            attributes[SocketAttribute.remote_port] = lambda: sock.getpeername()[1]
        return attributes


async def _wrap(sock: socket.socket) -> ProtocolStream:
    loop = asyncio.get_running_loop()
    transport, reader = await loop.connect_accepted_socket(_Reader, sock)
    return ProtocolStream(transport, reader)


async def socket_stream(sock: socket.socket) -> ByteStream:
    """A byte stream over the connected ``sock`` (a ``socketpair`` end, say)."""
    if not is_trio():
        return await _wrap(sock)
    return await SocketStream.from_socket(sock)


async def connect_tcp(host: str, port: int) -> ByteStream:
    """A byte stream over a new TCP connection to ``host:port``.

    Raises:
        OSError: nothing answered.
    """
    if not is_trio():
        loop = asyncio.get_running_loop()
        transport, reader = await loop.create_connection(_Reader, host, port)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ProtocolStream(transport, reader)
    return await anyio.connect_tcp(host, port)
