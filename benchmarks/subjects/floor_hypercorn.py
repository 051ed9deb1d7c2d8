"""Floor: a bare ASGI websocket echo served by hypercorn, with a ``websockets`` client.

The same messages as the ``websockets`` floor, but the server side is a raw
ASGI app (no framework) under hypercorn's asyncio worker: the transport both
pymoa-remote's and remote-exec's daemons are served with. The message size
limit is raised above the 16 MiB payload; the client is the ``websockets``
floor's.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload
from benchmarks.subjects.floor_websockets import run_against

DISTRIBUTIONS = ("hypercorn", "websockets")

Message = dict[str, Any]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while (event := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "websocket":
        raise ValueError(f"unexpected scope {scope['type']}")
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while (event := await receive())["type"] == "websocket.receive":
        if event.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": event["bytes"]})
        else:
            for i in range(int(event["text"].split()[1])):
                await send({"type": "websocket.send", "bytes": i.to_bytes(8, "big", signed=True)})
            await send({"type": "websocket.send", "text": "end"})


async def serve(options: Mapping[str, str]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connectable before hypercorn accepts: no race
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.websocket_max_message_size = 64 * 2**20
    config.accesslog = None
    h.announce(port)
    await hypercorn_serve(app, config)  # type: ignore[arg-type]


async def run(workload: Workload, params: Params) -> float:
    with h.module_server(__name__.rpartition(".")[2], params.options) as server:
        return await run_against(f"ws://127.0.0.1:{server.port}/", workload, params)
