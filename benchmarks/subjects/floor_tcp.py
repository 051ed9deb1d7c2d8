"""Floor: a bare asyncio TCP echo to a server process, 4-byte length prefix.

A frame is ``!IB`` (payload length, opcode) then the payload. ``E`` frames are
echoed back unchanged; ints travel as 8 signed big-endian bytes, bytes as
themselves. ``S`` asks for a stream of N ints: one ``I`` frame per item, then
an empty ``D`` frame. W2 opens one connection per concurrent caller.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload

HEADER = struct.Struct("!IB")
ECHO, STREAM, ITEM, DONE = b"ESID"
SMALL = 64 * 1024  # below this, header and payload go out in one write


def _frame_writer(writer: asyncio.StreamWriter, op: int, payload: bytes) -> None:
    header = HEADER.pack(len(payload), op)
    if len(payload) < SMALL:
        writer.write(header + payload)
    else:
        writer.write(header)
        writer.write(payload)


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    size, op = HEADER.unpack(await reader.readexactly(HEADER.size))
    return op, await reader.readexactly(size) if size else b""


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            op, payload = await _read_frame(reader)
            if op == ECHO:
                _frame_writer(writer, ECHO, payload)
            elif op == STREAM:
                for i in range(int.from_bytes(payload, "big")):
                    _frame_writer(writer, ITEM, i.to_bytes(8, "big", signed=True))
                    await writer.drain()  # back-pressure from a slow reader
                _frame_writer(writer, DONE, b"")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(options: Mapping[str, str]) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", 0)
    h.announce(server.sockets[0].getsockname()[1])
    await server.serve_forever()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def echo_int(self, x: int) -> int:
        _frame_writer(self.writer, ECHO, x.to_bytes(8, "big", signed=True))
        await self.writer.drain()
        _, payload = await _read_frame(self.reader)
        return int.from_bytes(payload, "big", signed=True)

    async def echo_bytes(self, data: bytes) -> bytes:
        _frame_writer(self.writer, ECHO, data)
        await self.writer.drain()
        _, payload = await _read_frame(self.reader)
        return payload

    async def stream(self, n: int) -> AsyncGenerator[int]:
        _frame_writer(self.writer, STREAM, n.to_bytes(8, "big"))
        await self.writer.drain()
        while True:
            op, payload = await _read_frame(self.reader)
            if op == DONE:
                return
            yield int.from_bytes(payload, "big", signed=True)

    async def aclose(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def run(workload: Workload, params: Params) -> float:
    with h.module_server(__name__.rpartition(".")[2], params.options) as server:
        clients = [await Client.connect(server.port)]
        try:
            match workload:
                case "W1":
                    return await h.w1_latency(clients[0].echo_int, params)
                case "W2":
                    clients += [
                        await Client.connect(server.port) for _ in range(params.w2_callers - 1)
                    ]
                    return await h.w2_concurrency([c.echo_int for c in clients], params)
                case "W3":
                    return await h.w3_bulk(clients[0].echo_bytes, params)
                case "W4":
                    return await h.w4_stream(lambda n: aclosing(clients[0].stream(n)), params)
        finally:
            for client in clients:
                await client.aclose()
