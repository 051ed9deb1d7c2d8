"""Every promise of DESIGN.md, checked the same way for every executor.

Each test runs for the thread, process and websocket executors, on asyncio
and on trio. Methods run where the executor runs them; shared state is read
back through calls (``entries``/``log``), never peeked at locally, except
for the thread executor where "remote" is this very process.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import numpy as np
import pytest

from remote_exec import (
    Executor,
    ExecutorContext,
    RemoteException,
    current_executor,
)
from remote_exec.exceptions import (
    DuplicateInstanceError,
    ExecutorStateError,
    NotAllowedError,
    UnknownInstanceError,
)

from .devices import Device, Point

pytestmark = pytest.mark.anyio


async def test_entering_sets_the_context(make_executor: Any) -> None:
    executor = make_executor()
    assert current_executor() is None
    async with executor as entered:
        assert entered is executor
        assert current_executor() is executor
    assert current_executor() is None


async def test_calls_sync_and_async_methods(executor: Executor, tag: str) -> None:
    assert current_executor() is executor  # the fixture's context reaches the test
    device = Device(tag, gain=3)
    async with executor.remote_instance(device, tag, tag, gain=3):
        assert await device.echo(41) == 41
        assert await device.async_add(1, 2) == 9
        assert tag in await executor.get_remote_objects()
    assert tag not in await executor.get_remote_objects()


async def test_outside_the_context_methods_run_locally(executor: Executor, tag: str) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        with ExecutorContext(None):
            assert await device.mark(tag, "local") == "local"
        # The executor's side did not see the local call.
        if executor.is_remote:
            assert await device.entries(tag) == []


async def test_calls_to_one_instance_keep_order_with_callbacks(
    executor: Executor, tag: str
) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        results: list[int] = []

        async def call(i: int) -> None:
            results.append(await device.numbered(i))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(call, i)
                await anyio.wait_all_tasks_blocked()  # the call is sent before the next
        assert await device.log() == list(range(50))
        assert device.results == list(range(50))  # callbacks ran in call order
        assert sorted(results) == list(range(50))


async def test_calls_to_different_instances_run_concurrently(executor: Executor, tag: str) -> None:
    first, second = Device(tag + "a"), Device(tag + "b")
    arrivals: list[int] = []

    async def meet(device: Device) -> None:
        arrivals.append(await device.rendezvous(tag, 2))

    async with (
        executor.remote_instance(first, tag + "a", tag + "a"),
        executor.remote_instance(second, tag + "b", tag + "b"),
    ):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(meet, first)
                tg.start_soon(meet, second)
    assert sorted(arrivals) == [0, 1]  # both waited at the barrier together


async def test_remote_builtin_exceptions_keep_their_type(executor: Executor, tag: str) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        for kind, builtin in (
            ("ValueError", ValueError),
            ("KeyError", KeyError),
            ("TimeoutError", TimeoutError),
        ):
            with pytest.raises(builtin, match="broken " + kind) as caught:
                await device.fail(kind, "broken " + kind)
            if executor.is_remote:
                assert isinstance(caught.value, RemoteException)
                assert caught.value.remote_type == kind
                assert "fail" in caught.value.remote_traceback
        with pytest.raises(ValueError, match="value"):
            await device.fail("ValueError", "value")
        assert await device.echo("still serving") == "still serving"


async def test_private_and_undecorated_methods_are_refused(executor: Executor, tag: str) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        for name in ("_secret", "undecorated", "__class__", "echo.__globals__"):
            with pytest.raises(NotAllowedError):
                await executor.execute(device, name)


async def test_unheld_object_error_says_how_to_register(executor: Executor, tag: str) -> None:
    with pytest.raises(UnknownInstanceError, match="remote_instance"):
        await Device(tag).echo(1)


async def test_instance_names_are_unique(executor: Executor, tag: str) -> None:
    device = Device(tag)
    assert await executor.ensure_remote_instance(device, tag, tag) is True
    try:
        assert await executor.ensure_remote_instance(device, tag, tag) is False
        with pytest.raises(DuplicateInstanceError):
            async with executor.remote_instance(Device(tag), tag, tag):
                pass
        assert await device.echo(1) == 1
    finally:
        await executor.delete_remote_instance(device)
    assert tag not in await executor.get_remote_objects()


async def test_cancel_returns_promptly_and_cancels_remote_async(
    executor: Executor, tag: str
) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        with anyio.fail_after(10):  # control comes back promptly, never a hang
            with anyio.move_on_after(0.3) as scope:
                await device.wait_forever(tag)
        assert scope.cancelled_caught
        # The remote method was cancelled where it ran: its finally ran there.
        with anyio.fail_after(10):
            while "finally" not in await device.entries(tag):
                await device.echo(None)  # each round trip lets the remote side progress
        assert await device.entries(tag) == ["started", "finally"]


async def test_a_cancelled_queued_call_never_starts(executor: Executor, tag: str) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        async with anyio.create_task_group() as tg:
            tg.start_soon(device.wait_forever, tag)  # occupies the instance
            with anyio.fail_after(10):
                while await read_log(executor, tag) != ["started"]:
                    pass
            queued = anyio.CancelScope()

            async def queued_call() -> None:
                with queued:
                    await device.mark(tag, "queued ran")

            tg.start_soon(queued_call)
            await anyio.wait_all_tasks_blocked()
            queued.cancel()  # cancel the queued call first...
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()  # ...then the running one
        with anyio.fail_after(10):
            while "finally" not in await device.entries(tag):
                pass
        assert await device.mark(tag, "after") == "after"
        assert await device.entries(tag) == ["started", "finally", "after"]


async def read_log(executor: Executor, key: str) -> list[Any]:
    """Read the shared log through a *second* instance (the first is busy)."""
    reader = Device(key + "-reader")
    if executor.registry.name_of(reader) is None:
        await executor.ensure_remote_instance(reader, key + "-reader", key + "-reader")
    try:
        return await reader.entries(key)
    finally:
        await executor.delete_remote_instance(reader)


async def test_generators_stream_values_with_callbacks(executor: Executor, tag: str) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        async with device.count(100) as items:
            assert [i async for i in items] == list(range(100))
        assert device.results == list(range(100))  # the callback ran once per item
        assert [i async for i in device.acount(10)] == list(range(10))


async def test_generator_exception_mid_stream(executor: Executor, tag: str) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        seen: list[int] = []

        async def consume() -> None:
            async with device.failing(3) as items:
                seen.extend([i async for i in items])

        with pytest.raises(ValueError, match="broke after 3"):
            await consume()
        assert seen == []  # the comprehension never completed...
        async with device.failing(3) as items:
            assert await items.__anext__() == 0  # ...but items before the error arrive
            assert await items.__anext__() == 1
            assert await items.__anext__() == 2
            with pytest.raises(ValueError, match="broke after 3"):
                await items.__anext__()


@pytest.mark.parametrize("method", ["tracked", "atracked"])
async def test_leaving_early_closes_the_remote_generator(
    executor: Executor, tag: str, method: str
) -> None:
    device = Device(tag)
    async with executor.remote_instance(device, tag, tag):
        async with getattr(device, method)(tag, 10_000) as items:
            async for i in items:
                if i == 2:
                    break
        entries = await device.entries(tag)
        assert entries[-1] == "closed"  # its finally ran where it runs
        assert await device.echo("alive") == "alive"


async def test_back_pressure_bounds_the_producer(executor: Executor, tag: str) -> None:
    device = Device(tag)
    window = getattr(executor, "window", 64)
    async with executor.remote_instance(device, tag, tag):
        async with device.tracked(tag, 100_000) as items:
            consumed = 0
            async for _ in items:
                consumed += 1
                if consumed == 3:
                    break
            # A call to the same instance queues behind the producer's steps.
            produced = [e for e in await device.entries(tag) if e != "closed"]
        assert consumed <= len(produced) <= consumed + 2 * window


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_data_fidelity(make_executor: Any, executor_kind: str, tag: str, codec: str) -> None:
    options = {"codec": codec} if executor_kind != "thread" else {}
    async with make_executor(**options) as executor:
        device = Device(tag)
        async with executor.remote_instance(device, tag, tag):
            value = {
                "tuple": (1, (2, 3), ()),
                "list": [1, 2.5, None, True, "é"],
                "nested": {"a": [{"b": (b"x",)}]},
                "ints": {1: "one", -(2**63): "min"},
                "nan": math.inf,
                "bytes": b"\x00\xff" * 10,
                "bytearray": bytearray(b"abc"),
                "point": Point(1.5, -2.0),
            }
            echoed = await device.echo(value)
            assert echoed == value
            assert type(echoed["tuple"]) is tuple
            assert type(echoed["bytearray"]) is bytearray
            array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2, 1:]
            back = await device.echo(array)
            assert back.dtype == array.dtype
            assert back.shape == array.shape
            assert np.array_equal(back, array)
            view = await device.echo(memoryview(b"view"))
            assert bytes(view) == b"view"


async def test_sixteen_mib_buffers_round_trip(executor: Executor, tag: str) -> None:
    device = Device(tag)
    payload = bytes(range(256)) * (16 * 1024 * 4)  # 16 MiB
    async with executor.remote_instance(device, tag, tag):
        back = await device.echo(payload)
        assert len(back) == len(payload)
        assert back == payload


async def test_instances_as_arguments_and_results(executor: Executor, tag: str) -> None:
    first, second = Device(tag + "a"), Device(tag + "b")
    async with (
        executor.remote_instance(first, tag + "a", tag + "a"),
        executor.remote_instance(second, tag + "b", tag + "b"),
    ):
        assert await first.is_twin(second) is True
        assert await first.itself() is first  # arrives as the caller's own object


async def test_config_and_properties(executor: Executor, tag: str) -> None:
    device = Device(tag, gain=5)
    device.exposure, device.label = 42, "set before creation"
    async with executor.remote_instance(device, tag, tag, gain=5):
        assert await device.config() == {
            "tag": tag,
            "gain": 5,
            "exposure": 42,
            "label": "set before creation",
        }
        assert await executor.get_remote_object_config(device) == {
            "exposure": 42,
            "label": "set before creation",
        }
        assert await executor.get_remote_object_property_data(device, ["gain", "tag"]) == {
            "gain": 5,
            "tag": tag,
        }
        if executor.is_remote:  # else the "twin" is the object itself
            device.exposure, device.gain = 0, 0
            await executor.apply_config_from_remote(device)
            await executor.apply_property_data_from_remote(device, ["gain"])
            assert (device.exposure, device.gain) == (42, 5)
        everything = await executor.get_remote_object_config(None)
        assert everything[tag] == {"exposure": 42, "label": "set before creation"}


async def test_clock_and_sleep(executor: Executor) -> None:
    sent, remote, received = await executor.get_echo_clock()
    assert sent <= received
    assert isinstance(remote, int)
    before = (await executor.get_echo_clock())[1]
    woke = await executor.sleep(0.01)
    assert woke - before >= 10_000_000
    woke_again = await executor.sleep(deadline=woke + 10_000_000)  # the remote clock, in ns
    assert woke_again >= woke + 10_000_000


async def test_events_channel(executor: Executor, tag: str) -> None:
    device = Device(tag)
    async with executor.get_channel_from_remote(tag, "") as events:
        async with executor.remote_instance(device, tag, tag):
            await device.echo(7)
        received: list[dict[str, Any]] = []
        with anyio.fail_after(10):
            async for event in events:
                received.append(event)
                if event["channel"] == "delete":
                    break
    channels = [e["channel"] for e in received]
    assert channels == ["create", "execute", "delete"]
    assert all(e["name"] == tag for e in received)
    assert received[1]["data"]["method"] == "echo"
    assert received[1]["data"]["result"] == 7


async def test_import_and_class_registration(executor: Executor) -> None:
    await executor.remote_import("tests.conformance.devices")
    with pytest.raises(ImportError):
        await executor.remote_import("tests.conformance.no_such_module")
    await executor.register_remote_class(Device)
    assert executor.registry.get_class(Device.__module__, Device.__qualname__) is Device


async def test_use_before_start_and_after_stop_raise(make_executor: Any, tag: str) -> None:
    executor = make_executor()
    device = Device(tag)
    with pytest.raises(ExecutorStateError, match="not started"):
        await executor.get_remote_objects()
    async with executor, executor.remote_instance(device, tag, tag):
        assert await device.echo(1) == 1
    with anyio.fail_after(5):
        with pytest.raises(ExecutorStateError, match="stopped"):
            await executor.get_remote_objects()
        with pytest.raises(ExecutorStateError), ExecutorContext(executor):
            await device.echo(1)
