"""Peer: pymoa-remote 0.1.0 executors (option ``executor``), on trio as it requires.

``thread``
    ``ThreadExecutor``: a worker thread per instance, objects passed by reference.
``multiprocess``
    ``MultiprocessSocketExecutor``: starts ``python -m pymoa_remote.app.multiprocessing``
    and talks to it over TCP. (The executor picks its port by binding port 0,
    closing the socket and handing the number to the child: its own code,
    measured as is.)
``websocket``
    ``WebSocketExecutor`` to the ``pymoa_quart_app`` server (Quart-Trio on
    hypercorn), started as a user would with ``--port 0``; the port is read
    back from hypercorn's "Running on" line.

W2 uses one executor (one connection) and one instance per caller, like the
remote-exec subjects; pymoa-remote serialises calls over its connection.
pymoa-remote's websocket frames are capped at hypercorn's default 16 MiB, so
W3 (16 MiB plus a JSON header) fails there with close code 1009.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from pymoa_remote import (  # type: ignore[import-untyped]
    MultiprocessSocketExecutor,
    ThreadExecutor,
    WebSocketExecutor,
    apply_executor,
    apply_generator_executor,
)

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload

BACKEND = "trio"
DISTRIBUTIONS = ("pymoa-remote", "trio", "quart", "quart-trio", "trio-websocket", "hypercorn")


class PymoaEcho:
    @apply_executor  # type: ignore[untyped-decorator]
    def echo(self, x: object) -> object:
        return x

    @apply_generator_executor  # type: ignore[untyped-decorator]
    def stream(self, n: int) -> Iterator[int]:
        yield from range(n)


@asynccontextmanager
async def _executor(kind: str) -> AsyncIterator[Any]:
    if kind == "thread":
        async with ThreadExecutor() as executor:
            yield executor
    elif kind == "multiprocess":
        async with MultiprocessSocketExecutor(server="127.0.0.1") as executor:
            yield executor
    elif kind == "websocket":
        app = Path(sys.executable).with_name("pymoa_quart_app")
        argv = [str(app), "--host", "127.0.0.1", "--port", "0"]
        ready = r"Running on http://127\.0\.0\.1:(?P<port>\d+)"
        with h.ServerProcess(argv, ready=ready, stream="stderr") as server:
            async with trio.open_nursery() as nursery:
                async with WebSocketExecutor(
                    nursery=nursery, server="127.0.0.1", port=server.port
                ) as executor:
                    yield executor
                nursery.cancel_scope.cancel()
    else:
        raise ValueError(f"unknown pymoa-remote executor {kind!r}")


async def run(workload: Workload, params: Params) -> float:
    async with _executor(params.options["executor"]) as executor, AsyncExitStack() as stack:
        objs = [PymoaEcho() for _ in range(params.w2_callers if workload == "W2" else 1)]
        for i, obj in enumerate(objs):
            await stack.enter_async_context(executor.remote_instance(obj, f"echo{i}"))
        match workload:
            case "W1":
                return await h.w1_latency(objs[0].echo, params)
            case "W2":
                return await h.w2_concurrency([obj.echo for obj in objs], params)
            case "W3":
                return await h.w3_bulk(objs[0].echo, params)
            case "W4":
                return await h.w4_stream(objs[0].stream, params)
