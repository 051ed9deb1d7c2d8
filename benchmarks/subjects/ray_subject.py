"""Ray: a plain Ray actor against ``RayExecutor`` (option ``via``), on one local Ray.

``plain``
    The echo class as a plain ``@ray.remote`` actor (``PlainEcho``: the same
    methods as ``benchmarks.workloads.Echo``, undecorated), called with
    ``await actor.echo.remote(x)``; W4 consumes a Ray streaming generator
    (``async for ref in actor.stream.remote(n)``, each item awaited).
``remote-exec``
    ``RayExecutor`` holding ``benchmarks.workloads.Echo``: each instance is
    an actor hosting remote-exec's server, called over its own TCP
    connection (W4 with ``window=256``, as for the other remote-exec rows).

Both start the same local Ray in the measurement process (``ray.init`` with
two CPUs, no dashboard; outside the timed section), and W2 uses one actor
(one instance) per caller, as the other rows do. Asyncio only: Ray's object
refs are asyncio awaitables.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from benchmarks import _harness as h, workloads
from benchmarks._harness import Params, Unavailable, Workload

DISTRIBUTIONS = ("remote-exec", "ray", "anyio", "msgpack")
STREAM_WINDOW = 256


class PlainEcho:
    """``workloads.Echo`` as Ray would run it: plain methods."""

    def echo(self, x: object) -> object:
        return x

    def stream(self, n: int) -> Iterator[int]:
        # Not ``yield from range(n)``: Ray drives the generator with ``send``,
        # which a range iterator does not have.
        for i in range(n):  # noqa: UP028
            yield i


def check(options: Any) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise Unavailable("ray is not installed (pip install 'remote-exec[ray]')") from None
    if options.get("via") == "remote-exec" and workloads.IMPORT_ERROR is not None:
        raise Unavailable(f"benchmarks.workloads.Echo needs {workloads.IMPORT_ERROR}")


def _start_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            # The measurement's own Ray, whatever the environment points at.
            address="local",
        )


async def _plain(workload: Workload, params: Params) -> float:
    import ray

    actor_class = ray.remote(PlainEcho)
    actors = [actor_class.remote() for _ in range(params.w2_callers if workload == "W2" else 1)]

    def echo_of(actor: Any) -> Any:
        async def echo(x: object) -> object:
            return await actor.echo.remote(x)

        return echo

    echoes = [echo_of(actor) for actor in actors]

    @asynccontextmanager
    async def stream(n: int) -> AsyncIterator[AsyncIterator[int]]:
        async def items() -> AsyncIterator[int]:
            async for ref in actors[0].stream.remote(n):
                yield await ref

        yield items()

    match workload:
        case "W1":
            return await h.w1_latency(echoes[0], params)
        case "W2":
            return await h.w2_concurrency(echoes, params)
        case "W3":
            return await h.w3_bulk(echoes[0], params)
        case "W4":
            return await h.w4_stream(stream, params)


async def _remote_exec(workload: Workload, params: Params) -> float:
    from remote_exec import RayExecutor

    kwargs: dict[str, Any] = {"window": STREAM_WINDOW} if workload == "W4" else {}
    tag = f"bench{os.getpid()}"
    async with RayExecutor(**kwargs) as executor, AsyncExitStack() as stack:
        objs = [workloads.Echo() for _ in range(params.w2_callers if workload == "W2" else 1)]
        for i, obj in enumerate(objs):
            await stack.enter_async_context(executor.remote_instance(obj, f"{tag}-{i}"))
        echoes = [obj.echo for obj in objs]
        match workload:
            case "W1":
                return await h.w1_latency(echoes[0], params)
            case "W2":
                return await h.w2_concurrency(echoes, params)
            case "W3":
                return await h.w3_bulk(echoes[0], params)
            case "W4":
                return await h.w4_stream(objs[0].stream, params)


async def run(workload: Workload, params: Params) -> float:
    check(params.options)
    _start_ray()
    if params.options.get("via") == "plain":
        return await _plain(workload, params)
    return await _remote_exec(workload, params)
