"""The dispatcher, driven over an in-memory transport by a client ``RpcConnection``."""

from __future__ import annotations

import functools
import gc
import sys
import threading
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgpack
import numpy as np
import pytest

from remote_exec.exceptions import (
    ConnectionLostError,
    DuplicateInstanceError,
    NotAllowedError,
    RemoteException,
    SubscriberOverflowError,
    TooManyCallsError,
    UnknownInstanceError,
    remote_exception,
)
from remote_exec.framing import CODEC_MSGPACK, encode_frame
from remote_exec.messages import Close, Failure, Message, Result, StreamEnd, StreamItems
from remote_exec.protocol import Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry
from remote_exec.server.dispatch import Dispatcher
from remote_exec.server.testing import MemoryFrameTransport, memory_transport_pair
from tests import instruments
from tests.instruments import CLOSED, PRODUCED, SIGNALS, gate, started

pytestmark = pytest.mark.anyio

INSTRUMENTS = "tests.instruments"
TIMEOUT = 10  # a failure bound: nothing waits on it when the code is right


class Client:
    """A raw protocol client: sends calls, sorts what comes back by stream id."""

    def __init__(self, transport: MemoryFrameTransport) -> None:
        self.transport = transport
        self.registry = InstanceRegistry()
        self.rpc = RpcConnection(Side.CLIENT, self.registry)
        self.messages: dict[int, deque[Message]] = defaultdict(deque)
        self.frames: dict[int, int] = defaultdict(int)
        self.closed: Close | None = None
        self.lost = anyio.Event()
        self._arrived = anyio.Event()

    async def read_loop(self) -> None:
        try:
            while True:
                frame = await self.transport.receive_frame()
                self.rpc.receive_frame(frame)
                for message in self.rpc.events_received():
                    if isinstance(message, Close):
                        self.closed = message
                    else:
                        self.messages[message.stream_id].append(message)
                        self.frames[message.stream_id] += 1
                self._arrived.set()
        except ConnectionLostError:
            self.lost.set()
            self._arrived.set()

    async def flush(self) -> None:
        for frame in self.rpc.data_to_send():
            await self.transport.send_frame(frame)

    async def call(
        self,
        target: str,
        method: str,
        *args: Any,
        stream: bool = False,
        credit: int = 0,
        **kwargs: Any,
    ) -> int:
        sid = self.rpc.send_call(target, method, args, kwargs, stream=stream, credit=credit)
        await self.flush()
        return sid

    async def next(self, sid: int) -> Message:
        with anyio.fail_after(TIMEOUT):
            while not self.messages[sid]:
                if self.lost.is_set():
                    raise ConnectionLostError("the server went away")
                self._arrived = anyio.Event()
                await self._arrived.wait()
        return self.messages[sid].popleft()

    async def result(self, sid: int) -> Any:
        message = await self.next(sid)
        if isinstance(message, Failure):
            raise remote_exception(message.type_name, message.message, message.traceback)
        assert isinstance(message, Result), message
        return message.value

    async def invoke(self, target: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.result(await self.call(target, method, *args, **kwargs))

    async def items(self, sid: int, count: int, *, exact: bool = True) -> list[Any]:
        """``count`` items of a stream (however many frames they took), or more
        unless ``exact``."""
        items: list[Any] = []
        while len(items) < count:
            message = await self.next(sid)
            assert isinstance(message, StreamItems), message
            items.extend(message.items)
        assert len(items) == count or not exact
        return items

    async def drain(self, sid: int) -> tuple[list[Any], Message]:
        """Every item until the stream's terminal message."""
        items: list[Any] = []
        while True:
            message = await self.next(sid)
            if not isinstance(message, StreamItems):
                return items, message
            items.extend(message.items)

    async def cancel(self, sid: int) -> None:
        self.rpc.send_cancel(sid)
        await self.flush()

    async def grant(self, sid: int, count: int) -> None:
        self.rpc.send_credit(sid, count)
        await self.flush()

    async def create(self, name: str, cls: str = "Device", *args: Any, **kwargs: Any) -> bool:
        created: bool = await self.invoke(
            "", "create_instance", INSTRUMENTS, cls, name, list(args), kwargs, {}, False, None
        )
        return created


@asynccontextmanager
async def connect(dispatcher: Dispatcher) -> AsyncIterator[Client]:
    """A client connected to ``dispatcher`` (served in a task until the block ends)."""
    client_end, server_end = memory_transport_pair()
    client = Client(client_end)
    async with anyio.create_task_group() as tg:
        tg.start_soon(dispatcher.serve, server_end)
        tg.start_soon(client.read_loop)
        try:
            yield client
        finally:
            await client_end.aclose()


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Dispatcher]:
    options.setdefault("allow_modules", [INSTRUMENTS])
    dispatcher = Dispatcher(**options)
    try:
        yield dispatcher
    finally:
        with anyio.fail_after(TIMEOUT):
            await dispatcher.aclose()


@pytest.fixture(autouse=True)
def _clean_instruments() -> None:
    instruments.GATES.clear()
    instruments.STARTED.clear()
    instruments.BARRIERS.clear()
    instruments.SIGNALS.clear()
    CLOSED.clear()
    PRODUCED.clear()


def queued(dispatcher: Dispatcher, count: int) -> bool:
    return bool(dispatcher.statistics()["queued"] == count)


async def running(key: str) -> None:
    """Until ``Device.block(key)`` runs in its thread."""
    assert await anyio.to_thread.run_sync(started(key).wait, TIMEOUT)


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until ``predicate()`` holds (no sleeping, bounded)."""
    with anyio.fail_after(TIMEOUT):
        while not predicate():
            await anyio.lowlevel.checkpoint()


# -- instances -------------------------------------------------------------------------
async def test_create_call_delete() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        assert (
            await client.invoke(
                "",
                "create_instance",
                INSTRUMENTS,
                "Device",
                "dev",
                [3],
                {"label": "x"},
                {"exposure": 42},
                False,
                None,
            )
            is True
        )
        assert await client.invoke("", "list_instances") == ["dev"]
        assert await client.invoke("dev", "add", 5) == 5
        assert await client.invoke("dev", "async_add", 2) == 7
        assert await client.invoke("", "get_config", "dev") == {"exposure": 42, "label": "x"}
        assert await client.invoke("", "get_config", None) == {
            "dev": {"exposure": 42, "label": "x"}
        }
        assert await client.invoke("", "get_properties", "dev", ["port", "value"]) == {
            "port": 3,
            "value": 7,
        }
        # The constructor and sync methods run in the instance's own thread.
        thread = await client.invoke("dev", "thread_name")
        props = await client.invoke("", "get_properties", "dev", ["ctor_thread"])
        assert props["ctor_thread"] == thread != threading.current_thread().name
        assert dispatcher.statistics()["instances"] == 1
        assert dispatcher.statistics()["connections"] == 1

        await client.invoke("", "delete_instance", "dev")
        assert await client.invoke("", "list_instances") == []
        with pytest.raises(UnknownInstanceError):
            await client.invoke("dev", "add", 1)
        with pytest.raises(UnknownInstanceError):
            await client.invoke("", "delete_instance", "dev")


async def test_create_twice_and_exist_ok() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        assert await client.create("dev") is True
        with pytest.raises(DuplicateInstanceError):
            await client.create("dev")
        args = [INSTRUMENTS, "Device", "dev", [], {}, {}, True, None]
        assert await client.invoke("", "create_instance", *args) is False
        # exist_ok does not paper over another class under the same name.
        args[1] = "Plain"
        with pytest.raises(DuplicateInstanceError):
            await client.invoke("", "create_instance", *args)


async def test_a_finished_call_frees_its_arguments_at_once() -> None:
    """Nothing (a local, a reference cycle) keeps a large argument alive until
    the next garbage collection: a daemon echoing 16 MiB arrays would hold
    several of them at once."""
    instruments.WITNESSED.clear()
    gc.disable()
    try:
        async with serving() as dispatcher, connect(dispatcher) as client:
            await client.create("dev")
            array = np.arange(1024, dtype=np.float64)
            assert (await client.invoke("dev", "witness", array) == array).all()
            assert await client.invoke("dev", "echo", 1) == 1  # the first reply was sent
            [seen] = instruments.WITNESSED
            assert seen() is None  # the server's copy is gone, without a collection
    finally:
        gc.enable()


async def test_instances_are_shared_by_connections() -> None:
    async with serving() as dispatcher, connect(dispatcher) as one, connect(dispatcher) as two:
        await one.create("dev")
        assert await one.invoke("dev", "add", 1) == 1
        assert await two.invoke("dev", "add", 1) == 2
        assert dispatcher.statistics()["connections"] == 2


async def test_server_operations() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        before = await client.invoke("", "echo_clock")
        woke = await client.invoke("", "sleep", 0.001, None)
        assert isinstance(woke, int)
        assert woke > before
        assert await client.invoke("", "import_module", INSTRUMENTS) is None
        assert await client.invoke("", "register_class", INSTRUMENTS, "Device") is None
        assert dispatcher.registry.get_class(INSTRUMENTS, "Device") is instruments.Device
        with pytest.raises(NotAllowedError):
            await client.invoke("", "no_such_operation")
        with pytest.raises(TypeError):
            await client.invoke("", "echo_clock", 1, 2)
        with pytest.raises(ValueError, match="finite"):
            await client.invoke("", "sleep", float("inf"), None)


# -- the allow-list and method checks ----------------------------------------------------
async def test_allow_list_refuses_a_module_without_importing_it() -> None:
    module = "tabnanny"  # in the stdlib, and imported by nothing here
    assert module not in sys.modules
    async with serving(allow_modules=["tests.*"]) as dispatcher, connect(dispatcher) as client:
        attempts: list[tuple[str, list[Any]]] = [
            ("create_instance", [module, "Thing", "x", [], {}, {}, False, None]),
            ("import_module", [module]),
            ("register_class", [module, "Thing"]),
        ]
        for op, args in attempts:
            with pytest.raises(NotAllowedError, match="allow-list"):
                await client.invoke("", op, *args)
        with pytest.raises(NotAllowedError):
            await client.invoke("", "import_module", "..relative")
        assert await client.create("dev") is True  # "tests.*" allows tests.instruments
    assert module not in sys.modules


async def test_nothing_is_allowed_by_default() -> None:
    async with serving(allow_modules=()) as dispatcher, connect(dispatcher) as client:
        with pytest.raises(NotAllowedError):
            await client.create("dev")


@pytest.mark.parametrize(
    "qualname", ["Device.__init__", "__builtins__", "GATES", "anyio.Event", "<locals>.Thing"]
)
async def test_only_classes_of_the_module_are_created(qualname: str) -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        with pytest.raises(NotAllowedError):
            await client.create("x", qualname)


async def test_config_only_sets_config_props() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        with pytest.raises(NotAllowedError):
            await client.invoke(
                "",
                "create_instance",
                INSTRUMENTS,
                "Device",
                "d",
                [],
                {},
                {"__class__": 1},
                False,
                None,
            )
        assert await client.invoke("", "list_instances") == []


@pytest.mark.parametrize(
    "method", ["_private", "__class__", "__init__", "not_remote", "echo.__globals__", "missing", ""]
)
async def test_only_decorated_public_methods_are_called(method: str) -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        with pytest.raises(NotAllowedError):
            await client.invoke("dev", method)
        with pytest.raises(NotAllowedError):
            await client.invoke("", "get_properties", "dev", ["_private"])
        assert await client.invoke("dev", "echo", 1) == 1  # and it serves on


async def test_stream_flag_must_match_the_method() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        with pytest.raises(TypeError):
            await client.invoke("dev", "count", 3)
        message = await client.next(await client.call("dev", "echo", 1, stream=True, credit=1))
        assert isinstance(message, Failure)
        assert message.type_name == "TypeError"


async def test_main_module_classes(tmp_path: Path) -> None:
    script = tmp_path / "client_script.py"
    script.write_text(
        "from remote_exec import apply_executor\n"
        "class Local:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "    @apply_executor\n"
        "    def get(self):\n"
        "        return self.x\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('the guard must stay shut')\n"
    )
    args = ["__main__", "Local", "loc", [7], {}, {}, False, str(script)]
    async with serving(allow_modules=["*"]) as dispatcher, connect(dispatcher) as client:
        with pytest.raises(NotAllowedError, match="__main__"):
            await client.invoke("", "create_instance", *args)
    async with serving(allow_import_from_main=True) as dispatcher, connect(dispatcher) as client:
        assert await client.invoke("", "create_instance", *args) is True
        assert await client.invoke("loc", "get") == 7
        args[2] = "interactive"
        args[-1] = None
        with pytest.raises(NotAllowedError, match="interactive"):
            await client.invoke("", "create_instance", *args)


# -- errors -----------------------------------------------------------------------------
async def test_remote_exceptions_carry_type_message_and_traceback() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        message = await client.next(await client.call("dev", "fail", "boom"))
        assert isinstance(message, Failure)
        assert (message.type_name, message.message) == ("ValueError", "boom")
        assert "in fail" in message.traceback
        assert "ValueError: boom" in message.traceback
        with pytest.raises(ValueError, match="boom") as info:
            await client.invoke("dev", "fail", "boom")
        assert isinstance(info.value, RemoteException)
        # Wrong arguments are the caller's error too, and the instance serves on.
        with pytest.raises(TypeError):
            await client.invoke("dev", "add")
        assert await client.invoke("dev", "add", 1) == 1


async def test_unencodable_result_is_a_failure() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        with pytest.raises(RemoteException, match="object"):
            await client.invoke("dev", "opaque")
        assert await client.invoke("dev", "echo", 1) == 1


# -- ordering and concurrency -----------------------------------------------------------
async def test_calls_to_one_instance_run_in_arrival_order() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        blocker = await client.call("dev", "block", "go")
        # Sync and async methods, all queued behind the blocked call.
        sids = [
            await client.call("dev", "record" if i % 3 else "async_record", i) for i in range(50)
        ]
        await until(functools.partial(queued, dispatcher, 50))
        gate("go").set()
        assert await client.result(blocker) == "go"
        assert [await client.result(sid) for sid in sids] == list(range(50))
        log = await client.invoke("dev", "get_log")
        assert log == ["unblocked go", *range(50)]


async def test_a_non_blocking_method_runs_on_the_loop_in_its_turn() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        worker_thread = await client.invoke("dev", "thread_name")
        assert await client.invoke("dev", "quick_record", "first") == (
            "first",
            threading.current_thread().name,  # the server's loop: this test's thread
        )
        blocker = await client.call("dev", "block", "go")
        await running("go")
        # Queued behind the blocked threaded call, mixed with threaded ones.
        sids = [
            await client.call("dev", "quick_record" if i % 2 else "record", i) for i in range(10)
        ]
        await until(functools.partial(queued, dispatcher, 10))
        gate("go").set()
        assert await client.result(blocker) == "go"
        results = [await client.result(sid) for sid in sids]
        assert [r[0] if i % 2 else r for i, r in enumerate(results)] == list(range(10))
        assert {r[1] for r in results[1::2]} == {threading.current_thread().name}
        assert worker_thread != threading.current_thread().name
        log = await client.invoke("dev", "get_log")
        assert log == ["first", "unblocked go", *range(10)]
        # A failure is the caller's, as from the thread; the instance serves on.
        with pytest.raises(KeyError, match="gone") as info:
            await client.invoke("dev", "quick_fail", "gone")
        assert isinstance(info.value, RemoteException)
        assert await client.invoke("dev", "quick_record", "after") == (
            "after",
            threading.current_thread().name,
        )


async def test_a_non_blocking_call_cancelled_while_queued_never_runs() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        blocker = await client.call("dev", "block", "go")
        await running("go")
        sid = await client.call("dev", "quick_record", "never")
        await until(functools.partial(queued, dispatcher, 1))
        await client.cancel(sid)
        message = await client.next(sid)
        assert isinstance(message, Failure)
        assert "cancelled" in message.message
        gate("go").set()
        assert await client.result(blocker) == "go"
        assert await client.invoke("dev", "get_log") == ["unblocked go"]


async def test_order_holds_across_connections() -> None:
    async with serving() as dispatcher, connect(dispatcher) as one, connect(dispatcher) as two:
        await one.create("dev")
        blocker = await one.call("dev", "block", "go")
        await running("go")
        sids = []
        for i in range(20):
            client = one if i % 2 else two
            sids.append((client, await client.call("dev", "record", i)))
            # Arrival order is what counts across connections: let it arrive.
            await until(functools.partial(queued, dispatcher, i + 1))
        gate("go").set()
        await one.result(blocker)
        assert [await client.result(sid) for client, sid in sids] == list(range(20))
        assert await one.invoke("dev", "get_log") == ["unblocked go", *range(20)]


async def test_two_instances_run_concurrently_in_their_own_threads() -> None:
    instruments.BARRIERS["b"] = threading.Barrier(2)
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("one")
        await client.create("two")
        first = await client.call("one", "meet", "b")
        second = await client.call("two", "meet", "b")
        # Each would time out at the barrier if the other one were not running.
        names = {await client.result(first), await client.result(second)}
        assert len(names) == 2


# -- cancellation -------------------------------------------------------------------------
async def test_cancel_a_queued_call_it_never_starts() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        blocker = await client.call("dev", "block", "go")
        queued = await client.call("dev", "record", "never")  # handed to the worker
        behind = await client.call("dev", "record", "behind")
        queued_async = await client.call("dev", "async_record", "never either")
        await running("go")
        await client.cancel(queued)
        await client.cancel(queued_async)
        for sid in (queued, queued_async):
            message = await client.next(sid)
            assert isinstance(message, Failure)
            assert "cancelled" in message.message
        gate("go").set()
        assert await client.result(blocker) == "go"
        assert await client.result(behind) == "behind"
        assert await client.invoke("dev", "get_log") == ["unblocked go", "behind"]


async def test_cancel_a_running_async_call_runs_its_finally() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        started = SIGNALS["w.started"] = anyio.Event()
        sid = await client.call("dev", "wait_forever", "w")
        with anyio.fail_after(TIMEOUT):
            await started.wait()
        await client.cancel(sid)
        message = await client.next(sid)
        assert isinstance(message, Failure)
        assert "cancelled" in message.message
        assert CLOSED == ["w"]
        assert await client.invoke("", "get_properties", "dev", ["cancelled"]) == {
            "cancelled": True
        }


async def test_cancel_a_running_sync_call_still_answers() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        sid = await client.call("dev", "block", "go")
        after = await client.call("dev", "record", "after")
        await running("go")
        await client.cancel(sid)
        gate("go").set()
        # The sync method finished; its result frees the id, and the queue goes on.
        assert await client.result(sid) == "go"
        assert await client.result(after) == "after"


# -- streams ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["count", "acount"])
async def test_stream_items_then_end(method: str) -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        # Credit for one more step than there are items: that step finds the end.
        sid = await client.call("dev", method, 100, stream=True, credit=101)
        items, end = await client.drain(sid)
        assert items == list(range(100))
        assert isinstance(end, StreamEnd)
        # Ready items travel together: far fewer frames than items.
        assert client.frames[sid] < 50


@pytest.mark.parametrize("method", ["produce", "aproduce"])
async def test_stream_credit_suspends_the_producer(method: str) -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        sid = await client.call("dev", method, "p", stream=True, credit=5)
        assert await client.items(sid, 5) == list(range(5))
        # A call to the same instance runs between steps: the producer is parked.
        assert await client.invoke("dev", "echo", "between") == "between"
        assert PRODUCED["p"] == 5
        await client.grant(sid, 3)
        assert await client.items(sid, 3) == [5, 6, 7]
        assert await client.invoke("dev", "echo", "again") == "again"
        assert PRODUCED["p"] == 8
        assert not client.messages[sid]
        await client.cancel(sid)
        items, end = await client.drain(sid)
        assert items == []
        assert isinstance(end, StreamEnd)
        assert CLOSED == ["p"]


@pytest.mark.parametrize("method", ["produce", "aproduce"])
async def test_stream_cancel_runs_the_generators_finally(method: str) -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        sid = await client.call("dev", method, "c", stream=True, credit=1000)
        await client.items(sid, 10, exact=False)
        await client.cancel(sid)
        _, end = await client.drain(sid)
        assert isinstance(end, StreamEnd)
        assert CLOSED == ["c"]
        props = await client.invoke("", "get_properties", "dev", ["closed_streams"])
        assert props == {"closed_streams": ["c"]}


async def test_other_calls_interleave_with_a_stream() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        sid = await client.call("dev", "produce", "i", stream=True, credit=1)
        assert await client.items(sid, 1) == [0]
        for i in range(3):
            assert await client.invoke("dev", "add", 1) == i + 1
            await client.grant(sid, 1)
            assert await client.items(sid, 1) == [i + 1]
        await client.cancel(sid)


async def test_stream_errors() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        items, end = await client.drain(
            await client.call("dev", "fail_after", 3, stream=True, credit=10)
        )
        assert items == [0, 1, 2]
        assert isinstance(end, Failure)
        assert end.type_name == "KeyError"
        _, end = await client.drain(await client.call("dev", "unencodable", stream=True, credit=10))
        assert isinstance(end, Failure)
        assert "CodecError" in end.type_name
        assert CLOSED == ["unencodable"]
        _, end = await client.drain(await client.call("dev", "count", stream=True, credit=10))
        assert isinstance(end, Failure)
        assert end.type_name == "TypeError"


async def test_cancel_a_stream_that_never_started() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        sid = await client.call("dev", "produce", "n", stream=True, credit=0)
        await client.cancel(sid)
        _, end = await client.drain(sid)
        assert isinstance(end, StreamEnd)
        assert "n" not in PRODUCED
        assert CLOSED == []


async def test_delete_closes_open_streams() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        sync_sid = await client.call("dev", "produce", "s", stream=True, credit=2)
        async_sid = await client.call("dev", "aproduce", "a", stream=True, credit=2)
        await client.items(sync_sid, 2)
        await client.items(async_sid, 2)
        await client.invoke("", "delete_instance", "dev")
        for sid in (sync_sid, async_sid):
            _, end = await client.drain(sid)
            assert isinstance(end, Failure)
            assert end.type_name == "remote_exec.UnknownInstanceError"
        assert sorted(CLOSED) == ["a", "s"]


# -- connections going away -----------------------------------------------------------------
async def test_connection_loss_cancels_calls_and_closes_generators() -> None:
    async with serving() as dispatcher, connect(dispatcher) as keeper:
        await keeper.create("dev")
        await keeper.create("other")
        client_end, server_end = memory_transport_pair()
        client = Client(client_end)
        async_started = SIGNALS["lost.started"] = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.read_loop)
            served = anyio.Event()

            async def serve() -> None:
                await dispatcher.serve(server_end)
                served.set()

            tg.start_soon(serve)
            await client.call("other", "wait_forever", "lost")
            sync_stream = await client.call("dev", "produce", "sync", stream=True, credit=2)
            async_stream = await client.call("dev", "aproduce", "async", stream=True, credit=2)
            await client.items(sync_stream, 2)
            await client.items(async_stream, 2)
            blocker = await client.call("dev", "block", "go")
            await client.call("dev", "record", "queued, never runs")
            await running("go")
            with anyio.fail_after(TIMEOUT):
                await async_started.wait()
            await client_end.aclose()  # the client vanishes
            await anyio.wait_all_tasks_blocked()  # the server noticed
            gate("go").set()
            with anyio.fail_after(TIMEOUT):
                await served.wait()
        assert blocker
        assert sorted(CLOSED) == ["async", "lost", "sync"]
        # The other connection and the instances live on, in order.
        assert await keeper.invoke("dev", "get_log") == ["unblocked go"]
        assert await keeper.invoke("other", "add", 1) == 1
        assert dispatcher.statistics()["connections"] == 1
        assert dispatcher.statistics()["calls_in_flight"] == 0


async def test_close_message_ends_the_connection() -> None:
    async with serving() as dispatcher:
        client_end, server_end = memory_transport_pair()
        client = Client(client_end)
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.read_loop)
                tg.start_soon(dispatcher.serve, server_end)
                await client.create("dev")
                client.rpc.send_close("bye")
                await client.flush()
                await client.lost.wait()  # the server closed its end
        assert dispatcher.statistics()["connections"] == 0


# -- events ---------------------------------------------------------------------------------
async def test_events_channel() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        sub = await client.call("", "subscribe", "", "", stream=True, credit=10)
        execute_only = await client.call("", "subscribe", "dev", "execute", stream=True, credit=10)
        await anyio.wait_all_tasks_blocked()
        await client.invoke(
            "",
            "create_instance",
            INSTRUMENTS,
            "Device",
            "dev",
            [],
            {},
            {"exposure": 3},
            False,
            None,
        )
        await client.invoke(
            "dev",
            "add",
            2,
        )
        await client.invoke("", "delete_instance", "dev")
        events = await client.items(sub, 3)
        assert [(e["name"], e["channel"]) for e in events] == [
            ("dev", "create"),
            ("dev", "execute"),
            ("dev", "delete"),
        ]
        assert events[0]["data"] == {
            "class": "tests.instruments.Device",
            "config": {"exposure": 3, "label": "dev"},
        }
        assert events[1]["data"] == {"method": "add", "args": [2], "kwargs": {}, "result": 2}
        assert [e["channel"] for e in await client.items(execute_only, 1)] == ["execute"]
        await client.cancel(sub)
        _, end = await client.drain(sub)
        assert isinstance(end, StreamEnd)
        _, end = await client.drain(
            await client.call("", "subscribe", "", "no", stream=True, credit=1)
        )
        assert isinstance(end, Failure)
        assert end.type_name == "ValueError"


async def test_lagging_subscriber_is_dropped_with_an_error() -> None:
    async with serving(max_queued_events=2) as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        sub = await client.call("", "subscribe", "dev", "execute", stream=True, credit=0)
        await anyio.wait_all_tasks_blocked()
        for i in range(5):
            await client.invoke("dev", "add", i)
        await client.grant(sub, 10)
        items, end = await client.drain(sub)
        assert 1 <= len(items) <= 3
        assert isinstance(end, Failure)
        with pytest.raises(SubscriberOverflowError):
            raise remote_exception(end.type_name, end.message, end.traceback)


# -- limits and hostile peers -----------------------------------------------------------------
async def test_too_many_calls_then_normal_service() -> None:
    async with serving(limits=Limits(max_calls=2)) as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        first = await client.call("dev", "block", "go")
        second = await client.call("dev", "record", 2)
        with pytest.raises(TooManyCallsError):
            await client.invoke("dev", "record", 3)
        gate("go").set()
        assert await client.result(first) == "go"
        assert await client.result(second) == 2
        assert await client.invoke("dev", "record", 4) == 4
        assert await client.invoke("dev", "get_log") == ["unblocked go", 2, 4]


@pytest.mark.parametrize(
    "frame", [b"garbage", b"RX" + bytes(30), bytes(64)], ids=["short", "bad-magic", "zeros"]
)
async def test_malformed_frame_closes_only_that_connection(frame: bytes) -> None:
    async with serving() as dispatcher, connect(dispatcher) as good:
        await good.create("dev")
        async with connect(dispatcher) as bad:
            pending = await bad.call("dev", "block", "go")
            await bad.transport.send_raw(frame)
            with anyio.fail_after(TIMEOUT):
                await bad.lost.wait()
            assert bad.closed is not None
            assert "protocol error" in bad.closed.reason
            assert not bad.messages[pending]
        gate("go").set()
        assert await good.invoke("dev", "add", 1) == 1
        assert dispatcher.statistics()["connections"] == 1


async def test_invalid_message_envelope_closes_the_connection() -> None:
    async with serving() as dispatcher, connect(dispatcher) as good, connect(dispatcher) as bad:
        body = msgpack.packb([1, 1, "dev"])  # a Call with missing fields
        await bad.transport.send_frame(encode_frame(CODEC_MSGPACK, body, []))
        with anyio.fail_after(TIMEOUT):
            await bad.lost.wait()
        assert bad.closed is not None
        assert await good.invoke("", "list_instances") == []


async def test_undecodable_arguments_fail_only_that_call() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("dev")
        # A reference to an instance the server does not hold.
        client.registry.add_instance(object(), "ghost")
        ghost = client.registry.get_instance("ghost")
        with pytest.raises(UnknownInstanceError):
            await client.invoke("dev", "echo", ghost)
        assert await client.invoke("dev", "echo", 1) == 1


async def test_instances_travel_by_reference() -> None:
    async with serving() as dispatcher, connect(dispatcher) as client:
        await client.create("a")
        await client.create("b")
        local_b = instruments.Device()
        client.registry.add_instance(local_b, "b")
        await client.invoke("b", "add", 5)
        assert await client.invoke("a", "describe", local_b) == ("Device", 5)
        assert await client.invoke("a", "identity", local_b) is local_b


# -- shutdown -----------------------------------------------------------------------------------
async def test_aclose_fails_in_flight_calls_and_ends_connections() -> None:
    dispatcher = Dispatcher(allow_modules=[INSTRUMENTS])
    client_end, server_end = memory_transport_pair()
    client = Client(client_end)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.read_loop)
            tg.start_soon(dispatcher.serve, server_end)
            await client.create("dev")
            started = SIGNALS["s.started"] = anyio.Event()
            sid = await client.call("dev", "wait_forever", "s")
            await started.wait()
            await dispatcher.aclose()
            message = await client.next(sid)
            assert isinstance(message, Failure)
            assert message.type_name == "remote_exec.ConnectionLostError"
            assert "shutting down" in message.message
            await client.lost.wait()
            assert client.closed is not None
    assert CLOSED == ["s"]
    assert dispatcher.statistics()["instances"] == 0
    # A connection after shutdown is refused with a Close.
    client_end, server_end = memory_transport_pair()
    await dispatcher.serve(server_end)
    rpc = RpcConnection(Side.CLIENT)
    rpc.receive_frame(await client_end.receive_frame())
    assert isinstance(rpc.events_received()[0], Close)


def test_the_registry_decodes_enums_only_from_allowed_modules() -> None:
    dispatcher = Dispatcher(allow_modules=["tests.*"])
    allowed = dispatcher.registry.module_allowed
    assert allowed is not None
    assert allowed("tests")
    assert allowed("tests.instruments")
    assert not allowed("testsuite")
    assert not allowed("os")
