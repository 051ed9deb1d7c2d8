"""Where the executors used to disagree (issue 10): one behaviour on every executor.

Each test runs for the thread, process and websocket executors, on asyncio
and on trio, like the rest of the conformance suite. They pin the decisions
the shared instance runtime follows:

- streams deliver each item as soon as it is produced (never in batches);
- ``window=W`` bounds how far a generator runs ahead of its consumer, and the
  default window is ``remote_exec.protocol.DEFAULT_WINDOW``, small, and the
  same for every executor;
- the events channel publishes the same events on every executor: create,
  one execute per method call (a generator's items go to its consumer only),
  delete;
- ``sleep(duration=None, deadline=None)`` takes the deadline in the remote
  side's ``perf_counter_ns`` (the clock ``get_echo_clock`` reports), needs
  exactly one finite number, and returns that clock on waking;
- ``remote_import`` takes a module object as well as a module name.

Timings use ``time.monotonic()`` on both sides: it is CLOCK_MONOTONIC, one
clock for every process of the machine on Linux, so a remote generator's
production time and the consumer's receipt time can be compared directly.
Devices may sleep (they simulate slow instruments); the tests never sleep to
wait for something, and every wait has a generous hang guard.
"""

from __future__ import annotations

import itertools
import math
import pprint
import time
import types
from typing import Any, cast

import anyio
import pytest

from remote_exec import Executor
from remote_exec.protocol import DEFAULT_WINDOW

from . import devices
from .devices import Acquisition

pytestmark = pytest.mark.anyio

SECOND_NS = 1_000_000_000


async def remote_now(executor: Executor) -> int:
    """The remote side's ``perf_counter_ns`` now (the middle of the echo clock)."""
    return (await executor.get_echo_clock())[1]


# -- streams: each item as soon as it is produced -------------------------------


@pytest.mark.parametrize("method", ["frames", "aframes"])
async def test_streams_deliver_each_item_as_soon_as_it_is_produced(
    executor: Executor, tag: str, method: str
) -> None:
    """A slow instrument (one frame every 0.15 s): every frame reaches the
    consumer before the frame after next is even produced. Batching (items
    held back until a window fills or the generator ends) delivers item 0
    together with item 4, at the end."""
    device = Acquisition(tag)
    interval = 0.15
    produced: list[float] = []
    received: list[float] = []
    async with executor.remote_instance(device, tag, tag):
        with anyio.fail_after(20):
            async with getattr(device, method)(5, interval) as frames:
                async for index, stamp in frames:
                    received.append(time.monotonic())
                    assert index == len(produced)
                    produced.append(stamp)
    assert len(received) == 5
    start = produced[0]
    timeline = [
        (round(p - start, 3), round(r - start, 3)) for p, r in zip(produced, received, strict=True)
    ]
    # Sanity: the stamps are the producer's, one interval apart.
    assert all(b - a >= interval * 0.9 for a, b in itertools.pairwise(produced)), timeline
    assert received[0] < produced[4], (
        f"item 0 arrived with the last: (produced, received) {timeline}"
    )
    late = [i for i in range(3) if not received[i] < produced[i + 2]]
    assert late == [], f"items {late} arrived after item i+2 was produced: {timeline}"


# -- run-ahead: the window ----------------------------------------------------------


@pytest.mark.parametrize("method", ["fast", "afast"])
@pytest.mark.parametrize("window", [4, None], ids=["window4", "default"])
async def test_a_producer_runs_at_most_window_items_ahead(
    make_executor: Any, tag: str, method: str, window: int | None
) -> None:
    """A consumer that stops after 3 items: the generator (as fast as it may
    be) produced at most ``window`` items more, and was closed."""
    options = {} if window is None else {"window": window}
    bound = DEFAULT_WINDOW if window is None else window
    async with make_executor(**options) as executor:
        device = Acquisition(tag)
        async with executor.remote_instance(device, tag, tag):
            with anyio.fail_after(20):
                async with getattr(device, method)(100_000) as items:
                    got = [await items.__anext__() for _ in range(3)]
                state = await executor.get_remote_object_property_data(
                    device, ["produced", "closed"]
                )
    assert got == [0, 1, 2]
    assert state["closed"] is True  # leaving the block closed it where it runs
    assert 3 <= state["produced"] <= 3 + bound, state
    assert cast(Any, executor).window == bound


async def test_the_default_window_is_shared_and_small(make_executor: Any) -> None:
    """Every executor defaults to the one ``DEFAULT_WINDOW``, and it is small:
    acquisition hardware must not run dozens of frames ahead of a consumer
    that may stop early."""
    executor = make_executor()  # not started: the option alone
    assert cast(Any, executor).window == DEFAULT_WINDOW
    assert 1 <= DEFAULT_WINDOW <= 16


# -- events: the same sequence on every executor ------------------------------------


@pytest.mark.parametrize("method", ["items", "aitems"])
async def test_the_event_sequence_is_the_same_on_every_executor(
    executor: Executor, tag: str, method: str
) -> None:
    device = Acquisition(tag)
    device.exposure, device.label = 25, "parity"
    config = {"exposure": 25, "label": "parity"}
    cls = f"{Acquisition.__module__}.{Acquisition.__qualname__}"
    received: list[tuple[str, str, dict[str, Any]]] = []
    with anyio.fail_after(20):
        async with executor.get_channel_from_remote("", "") as events:
            async with executor.remote_instance(device, tag, tag):
                assert await device.scale(7, factor=3) == 21
                async with getattr(device, method)(2, prefix="p") as items:
                    assert [item async for item in items] == ["p0", "p1"]
            # Collect until the delete event; a missing event shows in the
            # comparison below rather than as a hang.
            with anyio.move_on_after(10):
                async for event in events:
                    if event["name"] != tag:  # another client of a shared daemon
                        continue
                    received.append((event["channel"], event["name"], event["data"]))
                    if event["channel"] == "delete":
                        break
    expected = [
        ("create", tag, {"class": cls, "config": config}),
        ("execute", tag, {"method": "scale", "args": [7], "kwargs": {"factor": 3}, "result": 21}),
        ("delete", tag, {"class": cls, "config": config}),
    ]
    # args is a list on every executor (a tuple compares unequal to it).
    assert received == expected, "received:\n" + pprint.pformat(received, width=100)


# -- sleep: one clock, one unit, one set of rules --------------------------------------


async def test_sleep_needs_exactly_one_finite_number(executor: Executor) -> None:
    now = await remote_now(executor)
    sleep: Any = executor.sleep  # the bad arguments below are the point
    refused: list[dict[str, Any]] = [
        {},
        {"duration": 0.01, "deadline": now + 10_000_000},
        {"duration": math.inf},
        {"duration": -math.inf},
        {"duration": math.nan},
        {"deadline": math.inf},
        {"deadline": math.nan},
        {"duration": "0.01"},
        {"deadline": "soon"},
        {"duration": [1]},
    ]
    wrong: list[str] = []  # every argument set that was not refused with ValueError
    for kwargs in refused:
        # A refusal is one round trip; a generous bound per call keeps a call
        # that sleeps forever (infinity taken literally) from hiding the rest.
        with anyio.move_on_after(5) as scope:
            try:
                await sleep(**kwargs)
            except ValueError:  # a RemoteException of a remote ValueError is one too
                continue
            except Exception as exc:  # noqa: BLE001 - reported below
                wrong.append(f"{kwargs}: raised {type(exc).__name__}: {exc}")
                continue
            wrong.append(f"{kwargs}: accepted")
        if scope.cancelled_caught:
            wrong.append(f"{kwargs}: still sleeping after 5 s")
    with anyio.fail_after(10):
        assert isinstance(await executor.sleep(duration=0), int)  # still usable
    assert wrong == [], "not refused with ValueError:\n" + "\n".join(wrong)


async def test_sleep_for_a_duration_returns_the_remote_time_on_waking(executor: Executor) -> None:
    before = await remote_now(executor)
    with anyio.fail_after(10):
        woke = await executor.sleep(duration=0.05)
    assert isinstance(woke, int)
    assert woke >= before + 50_000_000
    assert woke <= await remote_now(executor)  # the same clock as get_echo_clock


async def test_sleep_until_a_deadline_on_the_echo_clock(executor: Executor) -> None:
    """The deadline is in the remote ``perf_counter_ns``, the clock and unit
    of ``get_echo_clock()[1]`` (pymoa-remote's own test does this)."""
    t = await remote_now(executor)
    with anyio.fail_after(10):  # a deadline read as seconds sleeps for years
        woke = await executor.sleep(deadline=t + 200_000_000)
    assert isinstance(woke, int)
    assert woke >= t + 200_000_000
    assert woke <= await remote_now(executor)


async def test_a_past_deadline_or_negative_duration_returns_at_once(executor: Executor) -> None:
    t = await remote_now(executor)
    with anyio.fail_after(15):  # read as seconds, t - 5 s would be centuries away
        woke = await executor.sleep(deadline=t - 5 * SECOND_NS)
        again = await executor.sleep(duration=-5)
    assert t <= woke <= again
    # Neither slept the 5 s a sign error (or abs()) would make it sleep.
    assert again - t < 4 * SECOND_NS


# -- remote_import: a module object or its name -----------------------------------------


async def test_remote_import_accepts_a_module_object(executor: Executor) -> None:
    with anyio.fail_after(10):
        await executor.remote_import(devices)
        await executor.remote_import(devices.__name__)  # the name still works
        # The object stands for its name: one that does not exist remotely
        # fails the way the name does.
        missing = types.ModuleType("tests.conformance.no_such_module")
        with pytest.raises(ImportError):
            await executor.remote_import(missing)
