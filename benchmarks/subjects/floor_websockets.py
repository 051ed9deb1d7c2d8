"""Floor: a bare ``websockets`` echo, asyncio server process and asyncio client.

Binary messages are echoed back (ints as 8 signed big-endian bytes, bytes as
themselves); a text message ``"stream N"`` gets N binary messages, one per
item, then the text ``"end"``. Compression is off and the message size
unlimited on both sides, as anyone moving bulk data would configure it.
W2 opens one connection per concurrent caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve as ws_serve

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload

DISTRIBUTIONS = ("websockets",)


async def _handle(ws: ServerConnection) -> None:
    async for message in ws:
        if isinstance(message, bytes):
            await ws.send(message)
        else:
            for i in range(int(message.split()[1])):
                await ws.send(i.to_bytes(8, "big", signed=True))
            await ws.send("end")


async def serve(options: Mapping[str, str]) -> None:
    async with ws_serve(_handle, "127.0.0.1", 0, compression=None, max_size=None) as server:
        h.announce(next(iter(server.sockets)).getsockname()[1])
        await server.serve_forever()


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def echo_int(self, x: int) -> int:
        await self.ws.send(x.to_bytes(8, "big", signed=True))
        reply = await self.ws.recv()
        assert isinstance(reply, bytes)
        return int.from_bytes(reply, "big", signed=True)

    async def echo_bytes(self, data: bytes) -> bytes:
        await self.ws.send(data)
        reply = await self.ws.recv()
        assert isinstance(reply, bytes)
        return reply

    async def stream(self, n: int) -> AsyncGenerator[int]:
        await self.ws.send(f"stream {n}")
        while isinstance(message := await self.ws.recv(), bytes):
            yield int.from_bytes(message, "big", signed=True)


def open_client(url: str) -> connect:
    return connect(url, compression=None, max_size=None)


async def run_against(url: str, workload: Workload, params: Params) -> float:
    """The client side, shared with the hypercorn floor."""
    async with open_client(url) as ws:
        client = Client(ws)
        match workload:
            case "W1":
                return await h.w1_latency(client.echo_int, params)
            case "W2":
                others = [await open_client(url) for _ in range(params.w2_callers - 1)]
                try:
                    clients = [client, *(Client(o) for o in others)]
                    return await h.w2_concurrency([c.echo_int for c in clients], params)
                finally:
                    await asyncio.gather(*(o.close() for o in others))
            case "W3":
                return await h.w3_bulk(client.echo_bytes, params)
            case "W4":
                return await h.w4_stream(lambda n: aclosing(client.stream(n)), params)


async def run(workload: Workload, params: Params) -> float:
    with h.module_server(__name__.rpartition(".")[2], params.options) as server:
        return await run_against(f"ws://127.0.0.1:{server.port}/", workload, params)
