"""What the tests of the daemon under pressure share: its descriptors and
memory read from ``/proc`` (Linux), and a client that keeps calling throughout."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from remote_exec.client.websocket import WebSocketExecutor
from tests.hardening.helpers import TOKEN, Daemon
from tests.hardening.instruments import Instrument

# Failure bounds only: nothing waits for them when the code is right.
AT_ONCE = 5.0
STALL = 2.0  # the longest a well-behaved client's call may take meanwhile


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def descriptors(pid: int) -> int:
    """How many file descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settles(probe: Callable[[], bool], within: float = AT_ONCE) -> float:
    """Poll ``probe()`` (the state of another process) until it holds; the seconds it took."""
    start = time.monotonic()
    with anyio.fail_after(within):
        while not probe():  # noqa: ASYNC110 - the condition lives in the daemon
            await anyio.sleep(0.01)
    return time.monotonic() - start


@dataclass
class Watch:
    """A well-behaved client's echo latency, while something else goes on."""

    worst: float = 0.0
    calls: int = 0


@asynccontextmanager
async def watched(daemon: Daemon) -> AsyncIterator[Watch]:
    """A client connected throughout, calling all the time; a call slower than
    ``STALL`` fails the block."""
    watch = Watch()
    async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
        instrument = Instrument()
        async with executor.remote_instance(instrument, f"watch-{uuid.uuid4().hex[:8]}"):

            async def call_all_the_time() -> None:
                while True:
                    start = time.monotonic()
                    with anyio.fail_after(STALL):
                        assert await instrument.echo(watch.calls) == watch.calls
                    watch.worst = max(watch.worst, time.monotonic() - start)
                    watch.calls += 1
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call_all_the_time)
                yield watch
                tg.cancel_scope.cancel()
    assert watch.calls > 0
