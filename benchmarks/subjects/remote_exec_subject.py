"""remote-exec's own executors (option ``executor``), through the public API only.

``thread``
    ``ThreadExecutor()``.
``process``
    ``ProcessExecutor()``.
``websocket``
    ``WebSocketExecutor(url, codec=...)`` to a ``python -m remote_exec.server``
    daemon started for the measurement with ``--port 0 --no-auth``, allowed
    to import ``benchmarks.workloads`` and running on the same backend as the
    client; its URL is read from the first line of its stdout that holds ``ws://``.

The client runs on ``options["backend"]`` (asyncio or trio); ``options["method"]``
names the ``Echo`` method W1-W3 call (default ``echo``; ``echo_nonblocking`` is
declared ``blocking=False``, so the server runs it on its event loop). W2 uses one
executor (one connection) and one instance per caller: calls to one instance
are serialised by contract, calls to different instances run concurrently.
Each executor is reported "not available" until remote-exec has it.

W4 (a stream of 10,000 small ints) constructs the executor with
``window=STREAM_WINDOW`` (256), as the docs tell users to do for fast streams
of small items; the default window (16 on every executor) keeps a generator
that drives hardware from running far ahead of its consumer, and W4 measures
stream throughput, not that default. W1-W3 use the default.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import remote_exec
from benchmarks import _harness as h, workloads
from benchmarks._harness import Params, Unavailable, Workload

DISTRIBUTIONS = ("remote-exec", "anyio", "trio", "websockets", "msgpack", "hypercorn")

_EXECUTOR_CLASSES = {
    "thread": "ThreadExecutor",
    "process": "ProcessExecutor",
    "websocket": "WebSocketExecutor",
}
DAEMON_MODULE = "remote_exec.server"
# W4's stream window. The default (16) keeps a generator driving hardware from running
# far ahead of its consumer; for a fast stream of small items the docs tell users to
# raise it, so W4 does, and measures streaming throughput rather than that default.
STREAM_WINDOW = 256
URL = r"(?P<url>wss?://[^\s'\"<>]+)"


def _executor_class(options: Mapping[str, str]) -> Any:
    name = _EXECUTOR_CLASSES[options["executor"]]
    cls = getattr(remote_exec, name, None)
    if cls is None:
        raise Unavailable(f"remote_exec.{name} does not exist yet")
    return cls


def check(options: Mapping[str, str]) -> None:
    if workloads.IMPORT_ERROR is not None:
        raise Unavailable(f"benchmarks.workloads.Echo needs {workloads.IMPORT_ERROR}")
    _executor_class(options)
    websocket = options["executor"] == "websocket"
    if websocket and importlib.util.find_spec(f"{DAEMON_MODULE}.__main__") is None:
        raise Unavailable(f"the daemon (python -m {DAEMON_MODULE}) does not exist yet")


def daemon_argv(backend: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        DAEMON_MODULE,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-auth",
        "--allow-module",
        "benchmarks.workloads",
        "--backend",
        backend,
    ]


@asynccontextmanager
async def _executor(options: Mapping[str, str], workload: Workload) -> AsyncIterator[Any]:
    cls = _executor_class(options)
    kwargs: dict[str, Any] = {"window": STREAM_WINDOW} if workload == "W4" else {}
    if options["executor"] != "websocket":
        async with cls(**kwargs) as executor:
            yield executor
        return
    with h.ServerProcess(daemon_argv(options["backend"]), ready=URL) as daemon:
        assert daemon.match is not None
        url = daemon.match.group("url")
        async with cls(url, codec=options["codec"], **kwargs) as executor:
            yield executor


async def run(workload: Workload, params: Params) -> float:
    check(params.options)
    async with _executor(params.options, workload) as executor, AsyncExitStack() as stack:
        objs = [workloads.Echo() for _ in range(params.w2_callers if workload == "W2" else 1)]
        for i, obj in enumerate(objs):
            await stack.enter_async_context(executor.remote_instance(obj, f"echo{i}"))
        method = params.options.get("method", "echo")
        echoes = [getattr(obj, method) for obj in objs]
        match workload:
            case "W1":
                return await h.w1_latency(echoes[0], params)
            case "W2":
                return await h.w2_concurrency(echoes, params)
            case "W3":
                return await h.w3_bulk(echoes[0], params)
            case "W4":
                return await h.w4_stream(objs[0].stream, params)
