"""Floor: an in-process call, no executor at all.

What the thread executors add overhead to: ``await obj.echo(x)`` on an async
method (the same call shape as an executor-decorated method), W2 as concurrent
asyncio tasks, W3 returning the very same bytes object (nothing is copied, as
with every thread executor), W4 an async generator in the same process.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload


class Echo:
    async def echo(self, x: object) -> object:
        return x

    async def stream(self, n: int) -> AsyncGenerator[int]:
        for i in range(n):
            yield i


async def run(workload: Workload, params: Params) -> float:
    obj = Echo()
    match workload:
        case "W1":
            return await h.w1_latency(obj.echo, params)
        case "W2":
            return await h.w2_concurrency([Echo().echo for _ in range(params.w2_callers)], params)
        case "W3":
            return await h.w3_bulk(obj.echo, params)
        case "W4":
            return await h.w4_stream(lambda n: aclosing(obj.stream(n)), params)
