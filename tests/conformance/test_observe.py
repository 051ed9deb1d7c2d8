"""Property observation on every executor and backend: ``executor.observe``
gives the initial values, then every change after each call (sync, async,
non-blocking, generator items), in order, with one resynchronisation for a
subscriber that fell behind."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import anyio
import pytest

from remote_exec import (
    BlockingExecutor,
    Executor,
    NotAllowedError,
    PropertyChange,
    RemoteException,
    ThreadExecutor,
    UnknownInstanceError,
)
from remote_exec.client.remote import RemoteExecutor, _Stream
from remote_exec.executor import ChangeStream
from remote_exec.runtime.observe import DEFAULT_MAX_QUEUE, differs, read_attribute

from .observed import Stage

pytestmark = pytest.mark.anyio

WAIT = 30  # seconds any test may take at most (Ray's actors start slowly)


async def take(changes: AsyncIterator[PropertyChange], n: int) -> list[PropertyChange]:
    return [await changes.__anext__() for _ in range(n)]


def values(changes: list[PropertyChange]) -> list[tuple[str, object]]:
    return [(change.name, change.value) for change in changes]


def increasing(changes: list[PropertyChange]) -> bool:
    seqs = [change.seq for change in changes]
    return all(a < b for a, b in itertools.pairwise(seqs))


async def test_initial_values_then_changes_in_order(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with (
            executor.remote_instance(stage, tag, tag),
            executor.observe(stage, ["position", "label"]) as changes,
        ):
            # The subscription is live once entered: the calls below are all seen.
            await stage.move(1)  # sync, in the instance's thread
            await stage.amove(2)  # async (on a server: on its loop)
            await stage.nudge(3)  # non-blocking sync (on a server: on its loop)
            async with stage.sweep([4, 5]) as items:  # a change after each item
                assert [item async for item in items] == [4, 5]
            async with stage.asweep([6, 7]) as aitems:
                assert [item async for item in aitems] == [6, 7]
            await stage.go(8, "moving")
            seen = await take(changes, 11)
    assert values(seen) == [
        ("position", 0),  # the initial values first, in the order asked
        ("label", "idle"),
        *[("position", p) for p in range(1, 9)],
        ("label", "moving"),  # a call that changes two: in the order of the names
    ]
    assert [change.seq for change in seen] == list(range(1, 12))
    assert not any(change.resync or change.error for change in seen)


async def test_unchanged_values_produce_nothing(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with (
            executor.remote_instance(stage, tag, tag),
            executor.observe(stage, ["position", "label"]) as changes,
        ):
            await stage.move(0)  # the value it had
            await stage.set_label("idle")  # the value it had
            await stage.move(1)
            await stage.move(1)
            await stage.set_label("busy")
            await stage.set_label("busy")
            await stage.move(0)
            seen = await take(changes, 5)
            assert values(seen) == [
                ("position", 0),
                ("label", "idle"),
                ("position", 1),
                ("label", "busy"),
                ("position", 0),
            ]
            assert increasing(seen)
            # Nothing else is queued: the next item is the next change.
            await stage.set_label("done")
            assert values(await take(changes, 1)) == [("label", "done")]


async def test_a_failing_read_is_reported_not_fatal(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with (
            executor.remote_instance(stage, tag, tag),
            executor.observe(stage, ["temperature", "position"]) as changes,
        ):
            await stage.switch_sensor(True)  # the call itself succeeds
            await stage.move(3)
            await stage.switch_sensor(False)
            seen = await take(changes, 5)
    assert [(c.name, c.value, c.error) for c in seen] == [
        ("temperature", 20.5, None),
        ("position", 0, None),
        ("temperature", None, "RuntimeError: sensor off"),
        ("position", 3, None),
        ("temperature", 20.5, None),
    ]
    assert increasing(seen)


async def test_a_value_that_cannot_travel_is_reported(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with (
            executor.remote_instance(stage, tag, tag),
            executor.observe(stage, ["gadget", "position"]) as changes,
        ):
            await stage.attach_gadget()
            await stage.move(1)
            seen = await take(changes, 4)
    assert values(seen[:2]) == [("gadget", None), ("position", 0)]
    assert (seen[2].name, seen[2].value) == ("gadget", None)
    assert seen[2].error is not None
    assert seen[2].error.startswith("remote_exec.CodecError: ")
    assert values(seen[3:]) == [("position", 1)]  # the stream goes on


async def test_a_slow_subscriber_is_resynchronised_once(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    burst = 10 * DEFAULT_MAX_QUEUE  # 10,240 changes while nobody reads
    with anyio.fail_after(2 * WAIT):
        async with (
            executor.remote_instance(stage, tag, tag),
            executor.observe(stage, ["position", "label"]) as changes,
        ):
            async with stage.count(burst) as items:
                async for _ in items:
                    pass
            await stage.move(-1)  # also missed: the resync carries it
            seen: list[PropertyChange] = []
            while not (seen and seen[-1].resync and seen[-1].name == "label"):
                seen.append(await changes.__anext__())
            # It goes on normally after the resync.
            await stage.move(-2)
            after = await take(changes, 1)
    resynced = [change for change in seen if change.resync]
    assert values(resynced) == [("position", -1), ("label", "idle")]  # the current values
    assert seen[-2:] == resynced  # one resync, at the end of what was queued
    # What came before it is the start of the stream, in order (the initial
    # values, then the first changes), and bounded: what the stream carried in
    # flight (the remote executors) and nothing queued (it was dropped).
    before = seen[:-2]
    start = [("position", 0), ("label", "idle"), *[("position", p) for p in range(1, burst)]]
    assert values(before) == start[: len(before)]
    assert len(before) <= 2 * 1024
    assert increasing(seen + after)
    assert seen[-2].seq > len(before) + 1  # the gap: the changes the resync replaced
    assert values(after) == [("position", -2)]
    assert not after[0].resync


async def test_two_subscribers_are_independent(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with (
            executor.remote_instance(stage, tag, tag),
            executor.observe(stage, ["position"]) as first,
        ):
            async with executor.observe(stage, ["label", "position"]) as second:
                # The first reads every change while the second reads none.
                async with stage.count(500) as items:
                    async for _ in items:
                        pass
                seen = await take(first, 500)
                assert values(seen) == [("position", p) for p in range(500)]
                await stage.go(7, "busy")
                assert values(await take(first, 1)) == [("position", 7)]
                # The second has all of them waiting, its own initial values first.
                mine = await take(second, 2 + 499 + 2)
                assert values(mine[:2]) == [("label", "idle"), ("position", 0)]
                assert values(mine[2:501]) == [("position", p) for p in range(1, 500)]
                assert values(mine[501:]) == [("label", "busy"), ("position", 7)]
                assert increasing(mine)
            # The second left: the first goes on as before.
            await stage.move(8)
            await stage.set_label("unseen by the first")
            await stage.move(9)
            assert values(await take(first, 2)) == [("position", 8), ("position", 9)]


async def test_names_must_be_public_attributes(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with executor.remote_instance(stage, tag, tag):
            for names in (["_position"], ["position", "__class__"], ["not-a-name"], [3]):
                with pytest.raises(NotAllowedError):
                    executor.observe(stage, names)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                executor.observe(stage, "position")
            with pytest.raises(ValueError, match="at least one"):
                executor.observe(stage, [])
            # Repeats are ignored; the executor is still fine.
            async with executor.observe(stage, ["label", "label"]) as changes:
                await stage.set_label("ok")
                assert values(await take(changes, 2)) == [("label", "idle"), ("label", "ok")]


async def test_the_server_checks_names_too(executor: Executor, tag: str) -> None:
    """A client that skips the check (not this one's) is refused by the server."""
    if not isinstance(executor, RemoteExecutor):
        pytest.skip("no server operation of its own (ThreadExecutor; RayExecutor's links are)")
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with executor.remote_instance(stage, tag, tag):
            for names in (["_position"], "position", [], [["position"]]):
                raw = _Stream(executor, "", "observe", [tag, names], {}, None, executor.window)
                with pytest.raises((NotAllowedError, TypeError, ValueError)) as refused:
                    async with ChangeStream(raw):
                        pass
                assert isinstance(refused.value, RemoteException)
            with pytest.raises(UnknownInstanceError):
                async with ChangeStream(
                    _Stream(executor, "", "observe", ["nobody", ["x"]], {}, None, 16)
                ):
                    pass
            await stage.move(1)  # the connection is fine


async def test_leaving_the_block_unsubscribes(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        async with executor.remote_instance(stage, tag, tag):
            quiet = await stage.reads()
            await stage.move(1)
            assert await stage.reads() == quiet  # nobody observes: nothing is read
            async with executor.observe(stage, ["position"]) as changes:
                await stage.move(2)
                assert values(await take(changes, 2)) == [("position", 1), ("position", 2)]
                watched = await stage.reads()
                await stage.move(3)
                assert await stage.reads() > watched  # read after each call
            # Left: the remote side forgot it, and reads it no more.
            left = await stage.reads()
            await stage.move(4)
            await stage.amove(5)
            async with stage.sweep([6, 7]) as items:
                assert [item async for item in items] == [6, 7]
            assert await stage.reads() == left
            # Observing again starts afresh.
            async with executor.observe(stage, ["position"]) as again:
                assert values(await take(again, 1)) == [("position", 7)]


async def test_deleting_the_instance_ends_the_stream(executor: Executor, tag: str) -> None:
    stage = Stage(tag)
    with anyio.fail_after(WAIT):
        await executor.create_remote_instance(stage, tag, tag)
        async with executor.observe(stage, ["position"]) as changes:
            await stage.move(1)
            await executor.delete_remote_instance(stage)
            assert values([change async for change in changes]) == [
                ("position", 0),
                ("position", 1),
            ]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_blocking_twin_observes(backend: str) -> None:
    stage = Stage("blocking")
    with (
        BlockingExecutor(ThreadExecutor(), backend=backend) as bx,
        bx.remote_instance(stage, "stage"),
    ):
        with bx.observe(stage, ["position"]) as changes:
            bx.run(stage.move, 4)
            assert values([next(changes), next(changes)]) == [("position", 0), ("position", 4)]
        with pytest.raises(NotAllowedError):
            bx.observe(stage, ["_position"])
        bx.run(stage.move, 5)  # unsubscribed: nothing reads it any more
        assert bx.run(stage.reads) == 2  # the initial value, and after move(4)


def test_values_are_compared_with_care() -> None:
    class Odd:
        def __eq__(self, other: object) -> bool:
            raise ValueError("no truth value")  # like a numpy array's ``!=``

        __hash__ = object.__hash__

    odd = Odd()
    assert not differs((1, None), (1, None))
    assert differs((1, None), (2, None))
    assert not differs((odd, None), (odd, None))  # the same object
    assert differs((odd, None), (Odd(), None))  # cannot tell: a change
    nan = float("nan")
    assert not differs((nan, None), (nan, None))
    assert differs((1, None), (None, "RuntimeError: off"))
    assert not differs((None, "RuntimeError: off"), (None, "RuntimeError: off"))
    assert differs((None, "RuntimeError: off"), (1, None))

    class Broken:
        @property
        def value(self) -> int:
            raise KeyError("gone")

    assert read_attribute(Broken(), "value") == (None, "KeyError: 'gone'")
