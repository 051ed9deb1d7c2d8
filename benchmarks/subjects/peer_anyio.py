"""Peer: ``anyio.to_thread.run_sync`` and ``anyio.to_process.run_sync`` (option ``to``).

Plain function calls handed to anyio's worker threads or worker processes
(the latter pickle the arguments and the result over pipes). Neither has
generators, so W4 is n/a. Runs on asyncio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from anyio import to_process, to_thread

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload

DISTRIBUTIONS = ("anyio",)
WORKLOADS = frozenset({"W1", "W2", "W3"})


def echo(x: object) -> object:
    return x


def _remote_echo(to: str) -> Callable[[Any], Awaitable[Any]]:
    run_sync = {"thread": to_thread.run_sync, "process": to_process.run_sync}[to]

    async def remote_echo(x: object) -> object:
        return await run_sync(echo, x)

    return remote_echo


async def run(workload: Workload, params: Params) -> float:
    remote_echo = _remote_echo(params.options["to"])
    match workload:
        case "W1":
            return await h.w1_latency(remote_echo, params)
        case "W2":
            return await h.w2_concurrency([remote_echo] * params.w2_callers, params)
        case "W3":
            return await h.w3_bulk(remote_echo, params)
        case "W4":
            raise NotImplementedError("anyio has no remote generators")
