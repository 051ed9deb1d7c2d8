"""``ThreadExecutor`` and the ``InstanceWorker`` under it, on asyncio and trio."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sniffio

from remote_exec.client import ThreadExecutor
from remote_exec.client.decorators import apply_executor, apply_generator_executor
from remote_exec.exceptions import (
    DuplicateInstanceError,
    ExecutorStateError,
    NotAllowedError,
    UnknownInstanceError,
)
from remote_exec.executor import NO_CALLBACK, ExecutorContext
from remote_exec.runtime.worker import InstanceWorker, Job, _Inbox

pytestmark = pytest.mark.anyio

WAIT = 5.0  # seconds a thread-side wait may take before the test fails


async def wait_thread_event(event: threading.Event) -> None:
    """Wait for a threading.Event without blocking the loop; fail after WAIT."""
    assert await anyio.to_thread.run_sync(event.wait, WAIT), "timed out waiting for the worker"


class Device:
    _config_props_ = ("exposure",)

    def __init__(self) -> None:
        self.exposure = 10
        self.label = "cam"
        self._secret = "hidden"
        self.calls: list[int] = []
        self.callbacks: list[tuple[int, int]] = []  # (value, thread ident)
        self.produced = 0
        self.closed_in: int | None = None
        self.finally_in: int | None = None
        self.finally_ran = threading.Event()
        self.completed = False
        self.active = 0
        self.max_active = 0

    def on_result(self, value: int) -> None:
        self.callbacks.append((value, threading.get_ident()))

    @apply_executor
    def ident(self) -> int:
        return threading.get_ident()

    @apply_executor
    async def aident(self) -> tuple[int, str]:
        await anyio.lowlevel.checkpoint()
        return threading.get_ident(), sniffio.current_async_library()

    @apply_executor
    async def nested(self) -> tuple[int, str]:
        return await self.aident()  # from inside the worker: runs locally, right here

    @apply_executor(callback=on_result)
    def record(self, i: int) -> int:
        self.calls.append(i)
        return i

    @apply_executor
    def noop(self) -> None:
        return None

    @apply_executor
    def set_exposure(self, value: int) -> None:
        self.exposure = value

    @apply_executor
    def fail(self, exc: Exception) -> None:
        raise exc

    @apply_executor
    async def afail(self) -> None:
        await anyio.lowlevel.checkpoint()
        raise KeyError("missing")

    @apply_executor
    async def busy(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        self.active -= 1

    @apply_executor
    def meet(self, barrier: threading.Barrier) -> int:
        return barrier.wait()

    @apply_executor(callback=on_result)
    def block(self, started: threading.Event, release: threading.Event) -> int:
        started.set()
        assert release.wait(WAIT)
        self.completed = True
        return 7

    @apply_executor
    async def ablock(self, started: threading.Event) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
            self.completed = True
        finally:
            self.finally_in = threading.get_ident()
            self.finally_ran.set()

    @apply_generator_executor
    def count(self, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                self.produced += 1
                yield i
        finally:
            self.closed_in = threading.get_ident()

    @apply_generator_executor(callback=on_result)
    async def acount(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                await anyio.lowlevel.checkpoint()
                self.produced += 1
                yield i
        finally:
            self.closed_in = threading.get_ident()

    @apply_generator_executor
    def idents(self, n: int) -> Iterator[int]:
        for _ in range(n):
            yield threading.get_ident()

    @apply_generator_executor
    def broken(self) -> Iterator[int]:
        yield 0
        yield 1
        raise ValueError("broken stream")

    @apply_generator_executor
    async def abroken(self) -> AsyncIterator[int]:
        yield 0
        await anyio.lowlevel.checkpoint()
        raise OSError("broken async stream")


@asynccontextmanager
async def holding(*devices: Device, **options: Any) -> AsyncIterator[ThreadExecutor]:
    """A started ThreadExecutor holding ``devices`` as dev0, dev1..."""
    async with ThreadExecutor(**options) as executor:
        for i, device in enumerate(devices):
            assert await executor.ensure_remote_instance(device, f"dev{i}")
        yield executor


def is_worker(ident: int) -> bool:
    return ident != threading.main_thread().ident and ident != threading.get_ident()


# -- threads -------------------------------------------------------------------
async def test_each_instance_has_its_own_thread_for_every_call() -> None:
    one, two = Device(), Device()
    async with holding(one, two):
        first = {await one.ident() for _ in range(5)}
        second = {await two.ident() for _ in range(5)}
        assert len(first) == 1
        assert len(second) == 1
        assert first != second
        assert is_worker(first.pop())
        assert is_worker(second.pop())


async def test_async_methods_run_in_the_worker_thread_and_loop(anyio_backend: str) -> None:
    device = Device()
    async with holding(device):
        ident, library = await device.aident()
        assert ident == await device.ident()
        assert is_worker(ident)
        assert library == anyio_backend


async def test_a_method_calling_another_runs_it_locally_in_the_worker() -> None:
    device = Device()
    async with holding(device):
        with anyio.fail_after(WAIT):  # a call back into the executor would deadlock
            ident, _ = await device.nested()
        assert ident == await device.ident()


# -- order and parallelism ----------------------------------------------------------
async def test_concurrent_calls_and_callbacks_keep_call_order() -> None:
    device = Device()
    issued: list[int] = []
    results: dict[int, int] = {}

    async def call(i: int) -> None:
        issued.append(i)  # no checkpoint between this and the submission
        results[i] = await device.record(i)

    async with holding(device), anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(call, i)

    assert len(issued) == 50
    assert results == {i: i for i in range(50)}
    assert device.calls == issued
    assert [value for value, _ in device.callbacks] == issued
    assert {ident for _, ident in device.callbacks} == {threading.get_ident()}


async def test_calls_to_one_instance_run_one_at_a_time() -> None:
    device = Device()
    async with holding(device), anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(device.busy)
    assert device.max_active == 1


async def test_two_instances_run_in_parallel() -> None:
    one, two = Device(), Device()
    barrier = threading.Barrier(2, timeout=WAIT)  # breaks unless both wait at once
    positions: list[int] = []

    async def meet(device: Device) -> None:
        positions.append(await device.meet(barrier))

    async with holding(one, two), anyio.create_task_group() as tg:
        tg.start_soon(meet, one)
        tg.start_soon(meet, two)
    assert sorted(positions) == [0, 1]


# -- errors --------------------------------------------------------------------
async def test_exceptions_propagate_with_their_type() -> None:
    device = Device()
    async with holding(device):
        error = ValueError("boom")
        with pytest.raises(ValueError, match="boom") as info:
            await device.fail(error)
        assert info.value is error  # the very object: nothing crossed a wire
        with pytest.raises(KeyError, match="missing"):
            await device.afail()
        assert await device.record(3) == 3  # the worker survives


async def test_a_failing_callback_raises_in_the_caller() -> None:
    device = Device()

    def bad_callback(value: int) -> None:
        raise RuntimeError(f"callback got {value}")

    async with holding(device) as executor:
        with pytest.raises(RuntimeError, match="callback got 4"):
            await executor.execute(device, "record", (4,), callback=bad_callback)
        assert device.calls == [4]
        await executor.execute(device, Device.record, (5,), callback=NO_CALLBACK)
        assert device.callbacks == []
        await executor.execute(device, "record", (6,), callback="on_result")
        assert [value for value, _ in device.callbacks] == [6]


async def test_only_decorated_public_methods_can_be_executed() -> None:
    device = Device()
    async with holding(device) as executor:
        with pytest.raises(NotAllowedError):
            await executor.execute(device, "on_result", (1,))
        with pytest.raises(NotAllowedError):
            await executor.execute(device, "_secret")
        with pytest.raises(TypeError, match="execute_generator"):
            await executor.execute(device, "count", (1,))
        with pytest.raises(TypeError, match="use execute"):
            executor.execute_generator(device, "record", (1,))


# -- generators ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["count", "acount"])
async def test_generator_values(method: str) -> None:
    device = Device()
    async with holding(device):
        async with getattr(device, method)(20) as items:
            assert [item async for item in items] == list(range(20))
        assert [item async for item in getattr(device, method)(3)] == [0, 1, 2]


async def test_generator_callback_runs_once_per_item_in_order_in_the_caller() -> None:
    device = Device()
    async with holding(device), device.acount(12) as items:
        consumed = [item async for item in items]
    assert [value for value, _ in device.callbacks] == consumed == list(range(12))
    assert {ident for _, ident in device.callbacks} == {threading.get_ident()}


async def test_every_generator_step_runs_in_the_worker_thread() -> None:
    device = Device()
    async with holding(device, window=2):
        async with device.idents(10) as items:
            seen = {item async for item in items}
        assert seen == {await device.ident()}


@pytest.mark.parametrize(("method", "error"), [("broken", ValueError), ("abroken", OSError)])
async def test_generator_exception_propagates_mid_stream(
    method: str, error: type[Exception]
) -> None:
    device = Device()
    async with holding(device):
        async with getattr(device, method)() as items:
            assert await items.__anext__() == 0
            if method == "broken":
                assert await items.__anext__() == 1
            with pytest.raises(error, match="broken"):
                await items.__anext__()
            with pytest.raises(StopAsyncIteration):
                await items.__anext__()
        assert await device.record(1) == 1  # the worker survives


@pytest.mark.parametrize("method", ["count", "acount"])
async def test_early_break_closes_the_generator_in_its_thread(method: str) -> None:
    device = Device()
    async with holding(device):
        worker = await device.ident()
        async with getattr(device, method)(1000) as items:
            async for item in items:
                if item == 2:
                    break
        assert device.closed_in == worker
        assert device.produced < 1000


async def test_back_pressure_bounds_how_far_the_producer_runs_ahead() -> None:
    device = Device()
    window, consumed = 4, 3
    async with holding(device, window=window), device.count(1000) as items:
        for _ in range(consumed):
            await items.__anext__()
        await device.noop()  # FIFO barrier: every step queued so far has run
        assert consumed <= device.produced <= consumed + window
        await items.__anext__()
        await device.noop()
        assert device.produced <= consumed + 1 + window


async def test_cancelled_anext_loses_no_item() -> None:
    device = Device()
    started, release = threading.Event(), threading.Event()
    async with holding(device, window=1), anyio.create_task_group() as tg:
        tg.start_soon(device.block, started, release)
        await wait_thread_event(started)
        stream = device.count(3)  # its steps queue behind the blocked call
        with anyio.CancelScope() as scope:
            scope.cancel()
            await stream.__anext__()
        release.set()
        async with stream:
            assert [item async for item in stream] == [0, 1, 2]


# -- cancellation ------------------------------------------------------------------
async def test_a_cancelled_queued_call_never_starts() -> None:
    device = Device()
    started, release = threading.Event(), threading.Event()
    returned = anyio.Event()

    async def queued_call(scope: anyio.CancelScope) -> None:
        with scope:
            await device.record(1)
        returned.set()

    async with holding(device), anyio.create_task_group() as tg:
        tg.start_soon(device.block, started, release)
        await wait_thread_event(started)
        scope = anyio.CancelScope()
        tg.start_soon(queued_call, scope)
        await anyio.wait_all_tasks_blocked()  # queued_call waits on its queued job
        scope.cancel()
        with anyio.fail_after(WAIT):
            await returned.wait()  # promptly: the worker is still blocked
        assert not release.is_set()
        release.set()
    assert device.calls == []  # record never ran
    assert scope.cancelled_caught


async def test_a_cancelled_running_async_call_is_cancelled_in_the_worker() -> None:
    device = Device()
    started = threading.Event()
    async with holding(device):
        worker = await device.ident()
        with anyio.CancelScope() as scope:

            async def cancel_when_started() -> None:
                await wait_thread_event(started)
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_started)
                await device.ablock(started)
        assert scope.cancelled_caught
        await wait_thread_event(device.finally_ran)
        assert device.finally_in == worker
        assert not device.completed
        assert await device.record(2) == 2  # the worker is free again


async def test_a_timeout_around_a_blocked_call_returns_control() -> None:
    device = Device()
    started, release = threading.Event(), threading.Event()
    async with holding(device):
        with anyio.move_on_after(0.05) as scope:
            await device.block(started, release)
        assert scope.cancelled_caught
        assert not device.completed  # control came back while the call was blocked
        release.set()
        await device.noop()  # FIFO barrier: the call has finished (or never started)
        assert device.callbacks == []  # cancelled calls get no callback


async def test_a_cancelled_running_sync_call_finishes_and_is_dropped() -> None:
    device = Device()
    started, release = threading.Event(), threading.Event()
    async with holding(device):
        with anyio.CancelScope() as scope:

            async def cancel_when_started() -> None:
                await wait_thread_event(started)
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_started)
                await device.block(started, release)
        assert scope.cancelled_caught
        assert not device.completed  # control came back while it still ran
        release.set()
        await device.noop()  # FIFO barrier: the blocked call has finished now
        assert device.completed
        assert device.callbacks == []  # its result was dropped: no callback


# -- lifecycle ---------------------------------------------------------------------
def worker_threads(idents: set[int]) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.ident in idents]


async def test_stop_joins_every_worker_thread() -> None:
    devices = [Device() for _ in range(3)]
    async with holding(*devices):
        idents = {await device.ident() for device in devices}
        threads = worker_threads(idents)
        assert len(threads) == 3
    assert not any(thread.is_alive() for thread in threads)
    assert worker_threads(idents) == []


async def test_stop_in_a_cancelled_scope_still_joins_and_closes_generators() -> None:
    device = Device()
    with anyio.CancelScope() as scope:
        async with holding(device):
            ident = await device.ident()
            threads = worker_threads({ident})
            stream = device.count(100)
            assert await stream.__anext__() == 0
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert not threads[0].is_alive()
    assert device.closed_in == ident  # closed in its own thread while stopping
    with pytest.raises(ExecutorStateError, match="executor was stopped"):
        await stream.__anext__()


async def test_stop_drops_queued_calls_and_lets_a_running_sync_call_finish() -> None:
    device = Device()
    started, release = threading.Event(), threading.Event()
    outcomes: dict[str, object] = {}

    async def run(key: str, fn: Any, *args: Any) -> None:
        try:
            outcomes[key] = await fn(*args)
        except ExecutorStateError as exc:
            outcomes[key] = exc

    async with ThreadExecutor() as executor, anyio.create_task_group() as tg:
        await executor.ensure_remote_instance(device, "dev")
        tg.start_soon(run, "running", device.block, started, release)
        await wait_thread_event(started)
        tg.start_soon(run, "queued", device.record, 1)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(executor.stop)
        await anyio.wait_all_tasks_blocked()  # stop waits for the running call
        assert isinstance(outcomes["queued"], ExecutorStateError)
        release.set()
    assert outcomes["running"] == 7
    assert device.calls == []


async def test_use_after_stop_raises_at_once() -> None:
    device = Device()
    async with holding(device) as executor:
        pass
    with ExecutorContext(executor), anyio.fail_after(WAIT):
        with pytest.raises(ExecutorStateError, match="stopped"):
            await device.record(1)
        with pytest.raises(ExecutorStateError, match="stopped"):
            device.count(3)
        with pytest.raises(ExecutorStateError):
            await executor.get_remote_objects()
        with pytest.raises(ExecutorStateError):
            await executor.ensure_remote_instance(Device(), "late")
        with pytest.raises(ExecutorStateError):
            executor.get_channel_from_remote("", "")
    await executor.stop()  # idempotent


async def test_use_before_start_raises() -> None:
    executor = ThreadExecutor()
    device = Device()
    with pytest.raises(ExecutorStateError, match="not started"):
        await executor.ensure_remote_instance(device, "dev")
    with pytest.raises(ExecutorStateError, match="not started"):
        await executor.execute(device, "record", (1,))
    with pytest.raises(ExecutorStateError, match="not started"):
        executor.execute_generator(device, "count", (1,))


async def test_instances_create_ensure_delete() -> None:
    device, other = Device(), Device()
    async with ThreadExecutor() as executor:
        async with executor.remote_instance(device, "dev") as held:
            assert held is device
            assert await executor.get_remote_objects() == ["dev"]
            thread = worker_threads({await device.ident()})[0]
            with pytest.raises(DuplicateInstanceError):
                await executor.create_remote_instance(other, "dev")
            with pytest.raises(DuplicateInstanceError):
                await executor.ensure_remote_instance(other, "dev")
            assert not await executor.ensure_remote_instance(device, "dev")
        assert not thread.is_alive()
        assert await executor.get_remote_objects() == []
        with pytest.raises(UnknownInstanceError, match="register it first"):
            await device.record(1)
        assert await executor.ensure_remote_instance(device, "dev")
        assert await device.record(2) == 2


async def test_delete_closes_open_generators_in_their_thread() -> None:
    device = Device()
    async with ThreadExecutor() as executor:
        await executor.ensure_remote_instance(device, "dev")
        ident = await device.ident()
        stream = device.acount(100)
        assert await stream.__anext__() == 0
        await executor.delete_remote_instance(device)
        assert device.closed_in == ident
        with pytest.raises(UnknownInstanceError, match="instance 'dev' was deleted"):  # noqa: PT012
            async for item in stream:  # what was produced before still arrives
                assert 0 < item < 100
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await stream.aclose()


# -- events, config, properties, misc ---------------------------------------------------
async def test_events_channel_receives_create_execute_delete() -> None:
    device = Device()
    async with ThreadExecutor() as executor:
        async with (
            executor.get_channel_from_remote("", "") as events,
            executor.get_channel_from_remote("dev", "execute") as executes,
        ):
            await executor.ensure_remote_instance(device, "dev")
            assert await device.record(5) == 5
            await executor.delete_remote_instance(device)
            got = [await events.__anext__() for _ in range(3)]
            assert [(event["name"], event["channel"]) for event in got] == [
                ("dev", "create"),
                ("dev", "execute"),
                ("dev", "delete"),
            ]
            assert got[0]["data"] == {
                "class": f"{__name__}.Device",
                "config": {"exposure": 10},
            }
            assert got[1]["data"] == {
                "method": "record",
                "args": [5],
                "kwargs": {},
                "result": 5,
            }
            only = await executes.__anext__()
            assert only["data"]["result"] == 5
        stream = executor.get_channel_from_remote("", "")
    with pytest.raises(StopAsyncIteration):  # stopping ends subscriptions
        await stream.__anext__()


async def test_config_and_property_data() -> None:
    one, two = Device(), Device()
    async with holding(one, two) as executor:
        await one.set_exposure(25)
        assert await executor.get_remote_object_config(one) == {"exposure": 25}
        assert await executor.get_remote_object_config(None) == {
            "dev0": {"exposure": 25},
            "dev1": {"exposure": 10},
        }
        assert await executor.get_remote_object_property_data(one, ["exposure", "label"]) == {
            "exposure": 25,
            "label": "cam",
        }
        with pytest.raises(NotAllowedError):
            await executor.get_remote_object_property_data(one, ["_secret"])
        two.exposure = 0
        await executor.apply_config_from_remote(two)
        assert two.exposure == 0


async def test_clock_sleep_import_and_classes() -> None:
    async with ThreadExecutor() as executor:
        sent, remote, received = await executor.get_echo_clock()
        assert sent <= remote <= received
        before = time.perf_counter_ns()
        assert await executor.sleep(0) >= before
        assert await executor.sleep(deadline=time.perf_counter()) >= before
        with pytest.raises(ValueError, match="not both"):
            await executor.sleep(1, deadline=1)
        await executor.remote_import("json")
        with pytest.raises(ModuleNotFoundError):
            await executor.remote_import("no_such_module_remote_exec")
        await executor.register_remote_class(Device)
        assert executor.registry.get_class(__name__, "Device") is Device


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        ThreadExecutor(window=0)


# -- InstanceWorker itself ---------------------------------------------------------------
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
async def test_worker_runs_mixed_jobs_in_order_with_on_done_in_order(busy: bool) -> None:
    worker = InstanceWorker("w")
    done: list[Any] = []
    ran: list[int] = []
    started, release = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        assert release.wait(WAIT)

    async def coro(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        ran.append(i)
        return i

    def on_done(job: Job) -> None:
        done.append(job.result())

    await worker.start()
    try:
        if busy:  # every job below queues up behind this one
            worker.submit(block)
            await wait_thread_event(started)
        jobs = [
            worker.submit(coro if i % 3 == 0 else ran.append, i, on_done=on_done) for i in range(30)
        ]
        assert jobs[-1].state == "queued" or not busy
        with pytest.raises(ExecutorStateError, match="not finished"):
            jobs[-1].result()
        release.set()
        with anyio.fail_after(WAIT):
            results = [await job.wait() for job in jobs]
        assert ran == list(range(30))
        assert results == [i if i % 3 == 0 else None for i in range(30)]
        assert done == results
        assert all(job.state == "done" for job in jobs)
    finally:
        await worker.stop()
    assert worker.state == "stopped"
    with pytest.raises(ExecutorStateError, match="stopped"):
        worker.submit(ran.append, 1)


async def test_workers_share_their_loops_inbox_and_keep_each_ones_order() -> None:
    workers = [InstanceWorker(f"w{i}") for i in range(4)]
    done: dict[str, list[int]] = {worker.name: [] for worker in workers}
    for worker in workers:
        await worker.start()
    try:
        assert len({id(worker._inbox) for worker in workers}) == 1

        def recorder(name: str) -> Callable[[Job], None]:
            return lambda job: done[name].append(job.result())

        jobs = [
            worker.submit(int, str(i), on_done=recorder(worker.name))
            for i in range(200)
            for worker in workers
        ]
        with anyio.fail_after(WAIT):
            for job in jobs:
                await job.wait()
        assert done == {worker.name: list(range(200)) for worker in workers}
    finally:
        for worker in workers:
            await worker.stop()


async def test_a_worker_without_a_loop_runs_sync_jobs_in_order_and_refuses_coroutines() -> None:
    worker = InstanceWorker("plain", coroutines=False)
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []
    finalized: list[str] = []

    def block() -> str:
        started.set()
        assert release.wait(WAIT)
        return threading.current_thread().name

    async def coro() -> int:
        return 1

    await worker.start()
    try:
        blocker = worker.submit(block)
        await wait_thread_event(started)
        jobs = [worker.submit(ran.append, i) for i in range(20)]
        refused = worker.submit(coro)
        dropped = worker.submit(ran.append, -1)
        dropped.cancel()  # queued: it never runs
        release.set()
        with anyio.fail_after(WAIT):
            assert await blocker.wait() == "remote-exec worker plain"
            for job in jobs:
                await job.wait()
            with pytest.raises(TypeError, match="no loop"):
                await refused.wait()
        assert dropped.state == "cancelled"
        assert ran == list(range(20))
    finally:
        await worker.stop(finalize=lambda: finalized.append(threading.current_thread().name))
    assert finalized == ["remote-exec worker plain"]
    assert worker.state == "stopped"


def test_an_inbox_wakes_its_loop_once_per_batch() -> None:
    wakes: list[Callable[[], object]] = []
    inbox = _Inbox(wakes.append)
    seen: list[int] = []

    def broken(i: int) -> None:
        raise RuntimeError(f"hand-back {i} failed")

    def put_from_a_thread(*items: tuple[Callable[[int], object], int]) -> None:
        def put_all() -> None:
            for fn, i in items:
                inbox.put(fn, i)

        thread = threading.Thread(target=put_all)
        thread.start()
        thread.join(WAIT)

    put_from_a_thread((seen.append, 1), (broken, 2), (seen.append, 3))
    assert len(wakes) == 1  # one wake-up for the three
    wakes.pop()()  # the loop runs the drain: a failing hand-back does not drop the others
    assert seen == [1, 3]
    put_from_a_thread((seen.append, 4))
    assert len(wakes) == 1  # a new batch, a new wake-up
    wakes.pop()()
    assert seen == [1, 3, 4]

    def closed_loop(fn: Callable[[], object]) -> None:
        raise RuntimeError("Event loop is closed")

    dead = _Inbox(closed_loop)
    for _ in range(2):  # each put tries again: a failed wake-up is not left pending
        with pytest.raises(RuntimeError, match="closed"):
            dead.put(seen.append, 5)


async def test_worker_on_done_exception_becomes_the_outcome() -> None:
    worker = InstanceWorker("w")

    def on_done(job: Job) -> None:
        raise LookupError(job.result())

    await worker.start()
    try:
        with pytest.raises(LookupError, match="3"):
            await worker.submit(int, "3", on_done=on_done).wait()
    finally:
        await worker.stop()


async def test_worker_cancel_and_stop() -> None:
    worker = InstanceWorker("w")
    started, release = threading.Event(), threading.Event()
    with pytest.raises(ExecutorStateError, match="not started"):
        worker.submit(int)
    await worker.start()
    with pytest.raises(ExecutorStateError, match="twice"):
        await worker.start()

    def block() -> bool:
        started.set()
        return release.wait(WAIT)

    blocker = worker.submit(block)
    queued = worker.submit(int, "1")
    cancelled = worker.submit(int, "2")
    cancelled.cancel()
    assert cancelled.state == "cancelled"
    with pytest.raises(ExecutorStateError, match="cancelled"):
        cancelled.result()
    await wait_thread_event(started)
    assert blocker.state == "running"
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.stop)
        await anyio.wait_all_tasks_blocked()
        assert queued.state == "cancelled"
        with pytest.raises(ExecutorStateError, match="stopped before"):
            await queued.wait()
        release.set()
    assert await blocker.wait() is True
    assert worker.thread is not None
    assert not worker.thread.is_alive()
    await worker.stop()  # idempotent
