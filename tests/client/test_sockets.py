"""``remote_exec.runtime.sockets``: the byte streams the process and websocket executors read and write."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
import sniffio
from anyio.abc import ByteStream, SocketAttribute

from remote_exec.exceptions import ConnectionLostError
from remote_exec.framing import CODEC_MSGPACK, encode_frame
from remote_exec.runtime.sockets import ProtocolStream, connect_tcp, socket_stream
from remote_exec.runtime.transport import StreamTransport

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def stream_pair() -> AsyncIterator[tuple[ByteStream, ByteStream]]:
    left, right = socket.socketpair()
    a = await socket_stream(left)
    b = await socket_stream(right)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def receive_exactly(stream: ByteStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += await stream.receive(size - len(data))
    return bytes(data)


async def test_asyncio_gets_the_protocol_stream_and_trio_anyios() -> None:
    async with stream_pair() as (a, _):
        expected = sniffio.current_async_library() == "asyncio"
        assert isinstance(a, ProtocolStream) is expected


async def test_data_goes_both_ways_in_order() -> None:
    async with stream_pair() as (a, b):
        for i in range(50):
            await a.send(struct.pack("<I", i))
        assert await receive_exactly(b, 200) == b"".join(struct.pack("<I", i) for i in range(50))
        await b.send(b"back")
        assert await receive_exactly(a, 4) == b"back"


async def test_receive_never_returns_more_than_asked() -> None:
    async with stream_pair() as (a, b):
        await a.send(b"0123456789")
        assert await receive_exactly(b, 3) == b"012"
        assert await receive_exactly(b, 7) == b"3456789"


async def test_a_reader_that_falls_behind_holds_back_the_writer_and_loses_nothing() -> None:
    """More than the reader's high-water mark in flight: reading pauses and resumes."""
    payload = os.urandom(8 * 1024 * 1024)
    async with stream_pair() as (a, b):
        received = bytearray()

        async def read_all() -> None:
            while len(received) < len(payload):
                received.extend(await b.receive(len(payload)))
                await anyio.lowlevel.checkpoint()  # a slow consumer

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            for start in range(0, len(payload), 1024 * 1024):
                await a.send(payload[start : start + 1024 * 1024])
        assert bytes(received) == payload


@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_the_peer_closing_ends_the_stream(how: str) -> None:
    async with stream_pair() as (a, b):
        await a.send(b"last words")
        await (a.aclose() if how == "close" else a.send_eof())
        assert await receive_exactly(b, 10) == b"last words"
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        if how == "half-close":
            await b.send(b"still open this way")  # the other half still works
            assert await receive_exactly(a, 19) == b"still open this way"


async def send_until_it_fails(stream: ByteStream) -> None:
    for _ in range(100):  # the peer's reset may take a write or two to show
        await stream.send(b"x" * 65536)
        await anyio.wait_all_tasks_blocked()


async def test_sending_to_a_closed_stream_fails_clearly() -> None:
    async with stream_pair() as (a, b):
        await a.aclose()
        with pytest.raises((anyio.BrokenResourceError, anyio.ClosedResourceError)):
            await send_until_it_fails(b)


async def test_connect_tcp_reaches_a_listener_on_loopback() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:

            async def serve_once() -> None:
                async def echo(client: anyio.abc.SocketStream) -> None:
                    async with client:
                        await client.send(await client.receive())
                    tg.cancel_scope.cancel()

                await listener.serve(echo)

            tg.start_soon(serve_once)
            stream = await connect_tcp("127.0.0.1", port)
            # The socket attributes anyio's own streams give, on both backends.
            assert stream.extra(SocketAttribute.remote_port) == port
            assert stream.extra(SocketAttribute.remote_address) == ("127.0.0.1", port)
            assert stream.extra(SocketAttribute.family) == socket.AF_INET
            local_port = stream.extra(SocketAttribute.local_port)
            assert stream.extra(SocketAttribute.raw_socket).getsockname()[1] == local_port
            await stream.send(b"ping")
            assert await receive_exactly(stream, 4) == b"ping"
            await stream.aclose()


async def test_connect_tcp_to_nothing_raises_oserror() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(OSError, match=r"(?i)connect call failed|connection attempts failed"):
            await connect_tcp("127.0.0.1", port)


async def test_a_frame_whose_sender_is_cancelled_still_arrives_whole() -> None:
    """Cancelled while the peer is not reading: the frame it began still goes out whole.

    On asyncio the frame is handed to the transport in one write before the
    sender can suspend (no shield needed); elsewhere a shield finishes it.
    """
    left, right = socket.socketpair()
    sender = StreamTransport(await socket_stream(left))
    receiver = StreamTransport(await socket_stream(right))
    frame = encode_frame(CODEC_MSGPACK, os.urandom(256 * 1024))
    assert len(frame) == 1  # one piece: the path without a shield on asyncio
    started = 0

    async def send_until_cancelled(*, task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
        nonlocal started
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                await anyio.lowlevel.checkpoint_if_cancelled()  # no new frame once cancelled
                started += 1
                await sender.send_frame(frame)

    try:
        async with anyio.create_task_group() as tg:
            scope = await tg.start(send_until_cancelled)
            await anyio.wait_all_tasks_blocked()  # the socket buffers are full
            scope.cancel()
            with anyio.fail_after(10):  # a cut frame would leave the reader waiting
                for _ in range(started):
                    received = await receiver.receive_frame()
                    assert bytes(received) == frame[0]
        await sender.aclose()
        with pytest.raises(ConnectionLostError, match="closed by the other side"):
            await receiver.receive_frame()  # and nothing after the whole frames
    finally:
        await sender.aclose()
        await receiver.aclose()
