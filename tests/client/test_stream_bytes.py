"""The stream window counts bytes as well as items (``Limits.max_stream_bytes``).

With 4 MiB items and the default window of 16 items, a generator could run
64 MiB ahead of a consumer that holds; the byte bound keeps it to about
``max_stream_bytes`` (plus one item). Over a real child process (its limits
are the parent's) and a real daemon (its default bound: ``serve`` has no flag
for it yet).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from remote_exec import Executor, ProcessExecutor, WebSocketExecutor
from remote_exec.client.remote import _Stream
from remote_exec.messages import StreamItems
from remote_exec.protocol import MIN_STREAM_BYTES, Limits, RpcConnection
from tests.client.stream_bytes_devices import Producer
from tests.ws_instruments import DaemonProcess

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
SIZE = 3 * MIB  # one item: a frame a little over 3 MiB
PROCESS_BOUND = 8 * MIB


@pytest.fixture(params=["process", "websocket"])
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def make(kind: str, anyio_backend: str) -> Iterator[Callable[..., Executor]]:
    """Executors of ``kind``; a websocket one talks to a daemon of its own."""
    daemons: list[DaemonProcess] = []

    def make(**options: Any) -> Executor:
        if kind == "process":
            return ProcessExecutor(**options)
        if not daemons:
            daemons.append(
                DaemonProcess(
                    "--host",
                    "127.0.0.1",
                    "--no-auth",
                    "--allow-module",
                    "tests.*",
                    "--backend",
                    anyio_backend,
                )
            )
        return WebSocketExecutor(daemons[0].url, **options)

    yield make
    for daemon in daemons:
        daemon.close()


def server_bound(kind: str) -> int:
    return PROCESS_BOUND if kind == "process" else Limits().max_stream_bytes


def count_credits(executor: Executor) -> list[int]:
    """The counts of the Credit messages ``executor`` sends from now on."""
    connection: RpcConnection = executor._connection  # type: ignore[attr-defined]
    granted: list[int] = []
    send_credit = connection.send_credit

    def counting(stream_id: int, count: int) -> None:
        granted.append(count)
        send_credit(stream_id, count)

    connection.send_credit = counting  # type: ignore[method-assign]
    return granted


async def test_a_generator_of_large_items_runs_ahead_by_bytes_not_items(
    kind: str, make: Callable[..., Executor]
) -> None:
    bound = server_bound(kind)
    ahead_max = bound // SIZE + 1  # up to the bound, and one item may cross it
    assert ahead_max < 16  # the item window alone would let it run 16 ahead
    options = {"limits": Limits(max_stream_bytes=bound)} if kind == "process" else {}
    producer = Producer()
    with anyio.fail_after(60):
        async with make(**options) as executor, executor.remote_instance(producer, "producer"):
            consumed = 0
            async with producer.blobs(12, SIZE) as items:
                async for item in items:
                    assert len(item) == SIZE
                    assert item[0] == consumed
                    consumed += 1
                    if consumed in (1, 2, 6):
                        # Hold: the generator runs as far ahead as it may, then parks
                        # (and the call to the same instance runs between its steps).
                        await anyio.sleep(0.5)
                        produced = await producer.count()
                        assert consumed < produced <= consumed + ahead_max
            assert consumed == 12


async def test_a_client_with_a_larger_byte_bound_than_the_daemon_never_waits_forever(
    anyio_backend: str,
) -> None:
    """The daemon stops at its 16 MiB; this client would grant only after 128
    MiB (or 8 items) consumed, but grants what it consumed once it is starved."""
    producer = Producer()
    with DaemonProcess(
        "--host", "127.0.0.1", "--no-auth", "--allow-module", "tests.*", "--backend", anyio_backend
    ) as daemon:
        limits = Limits(max_stream_bytes=256 * MIB)
        with anyio.fail_after(60):
            async with (
                WebSocketExecutor(daemon.url, limits=limits) as executor,
                executor.remote_instance(producer, "producer"),
            ):
                granted = count_credits(executor)
                received = [len(item) async for item in producer.blobs(12, SIZE)]
    assert received == [SIZE] * 12
    assert granted  # grants of fewer than 8 items: the starved consumer's


async def test_many_small_items_flow_with_the_usual_credits(
    kind: str, make: Callable[..., Executor]
) -> None:
    """W4's shape: the byte bound never bites, a Credit goes back every
    ``window / 2`` items, as before."""
    n = 10_000
    producer = Producer()
    with anyio.fail_after(60):
        async with make() as executor, executor.remote_instance(producer, "producer"):
            granted = count_credits(executor)
            total = 0
            async with producer.ints(n) as items:
                async for item in items:
                    total += item
    assert total == n * (n - 1) // 2
    assert set(granted) == {8}
    assert n // 8 - 2 <= len(granted) <= n // 8


class _Recorder:
    """What ``_Stream`` needs of its executor to consume and grant: no I/O."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.granted: list[int] = []

    async def _grant(self, stream_id: int | None, count: int) -> None:
        self.granted.append(count)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("window", [1, 2, 16, 256])
async def test_the_consumer_grants_as_counting_each_item_would(seed: int, window: int) -> None:
    """``_Stream`` counts items in runs (a decrement per item, the accounting
    at grants and frame boundaries): it grants exactly what counting each item's
    share of its frame would, starved or not."""
    rng = random.Random(seed)
    limits = Limits(max_stream_bytes=rng.choice([64 * 1024, 1 * MIB, 16 * MIB]))
    recorder = _Recorder(limits)
    stream = _Stream(recorder, "t", "gen", [], {}, None, window)  # type: ignore[arg-type]
    stream._inbox.stream_id = 1
    expected: list[int] = []
    consumed, nbytes = 0, 0
    for _ in range(30):  # bursts of frames, each drained: the consumer starves between
        frames = [
            (rng.randint(1, 40), rng.choice([3, 700, 9_000, 100_000, 3 * MIB]))
            for _ in range(rng.randint(1, 4))
        ]
        for count, share in frames:
            stream._inbox.push(StreamItems(1, list(range(count)), count * share))
        for count, share in frames:
            for _ in range(count):
                await stream.__anext__()
                consumed, nbytes = consumed + 1, nbytes + share
                if consumed * 2 >= window or nbytes * 2 >= limits.max_stream_bytes:
                    expected.append(consumed)
                    consumed, nbytes = 0, 0
        # Starved: the next __anext__ waits; grants what it consumed if large.
        with anyio.move_on_after(0.001):
            await stream.__anext__()
        if nbytes >= MIN_STREAM_BYTES:
            expected.append(consumed)
            consumed, nbytes = 0, 0
        assert recorder.granted == expected
