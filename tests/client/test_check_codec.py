"""``ThreadExecutor(check_codec=True)``: what could not travel to a remote
executor fails on threads too, with the error a remote executor gives."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import pathlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from remote_exec import ProcessExecutor, RemoteException, ThreadExecutor
from remote_exec.exceptions import CodecError, FrameError

from ..conformance.devices import LOG, Access, DataDevice, Device, Shade

pytestmark = pytest.mark.anyio


@pytest.fixture
def tag() -> str:
    """A name no other test uses (instances and logs are keyed by it)."""
    return f"c{uuid.uuid4().hex[:12]}"


class Unheld(enum.Enum):
    """Defined in a module no executor side holds instances from."""

    X = 1


TRAVELS: list[Any] = [
    dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC),
    dt.date(2024, 5, 1),
    dt.time(1, 2, 3),
    dt.timedelta(seconds=-1),
    {1, "a", (2, 3)},
    frozenset({1.5}),
    decimal.Decimal("1.10"),
    pathlib.Path("data") / "x.csv",
    pathlib.PureWindowsPath(r"C:\x"),
    1 - 2j,
    uuid.UUID(int=7),
    Shade.DARK,
    Access.READ | Access.WRITE,
    np.float64(1.5),
    np.int32(-3),
    np.bool_(True),
]


async def test_it_is_off_by_default(tag: str) -> None:
    function = lambda: 0  # exactly what no remote executor can send
    async with ThreadExecutor() as executor:
        assert executor.check_codec is False
        device = DataDevice(tag)
        async with executor.remote_instance(device, tag):
            assert await device.echo(function) is function


async def test_an_argument_that_cannot_travel_fails_before_the_call(tag: str) -> None:
    async with ThreadExecutor(check_codec=True) as executor:
        device = Device(tag)
        async with executor.remote_instance(device, tag, tag):
            unsendable: list[Any] = [object(), lambda: 0, {"nested": [object()]}]
            with pytest.raises(CodecError, match=r"cannot encode a builtins\.object"):
                await device.mark(tag, unsendable[0])
            with pytest.raises(CodecError, match=r"cannot encode a builtins\.function"):
                await device.mark(tag, unsendable[1])
            with pytest.raises(CodecError):
                await device.mark(tag, value=unsendable[2])
            assert LOG[tag] == []  # the method never ran
            assert await device.mark(tag, "sent") == "sent"
            assert LOG[tag] == ["sent"]


async def test_a_result_that_cannot_travel_fails_the_call(tag: str) -> None:
    async with ThreadExecutor(check_codec=True) as executor:
        device = DataDevice(tag)
        async with executor.remote_instance(device, tag):
            with pytest.raises(CodecError, match=r"cannot encode a builtins\.object"):
                await device.unsendable()
            assert await device.echo(3) == 3  # the instance carries on


async def test_a_stream_item_that_cannot_travel_fails_the_stream(tag: str) -> None:
    # window=1: one item per batch, so the two good items go before the bad one
    # (a server fails the whole batch an item of which cannot be encoded)
    async with ThreadExecutor(check_codec=True, window=1) as executor:
        device = DataDevice(tag)
        async with executor.remote_instance(device, tag):
            received: list[Any] = []

            async def consume() -> None:
                async with device.unsendable_after(tag, 2) as items:
                    async for item in items:
                        received.append(item)  # noqa: PERF401 - one by one, up to the failure

            with pytest.raises(CodecError, match=r"cannot encode a builtins\.object"):
                await consume()
            assert received == [0, 1]
        assert LOG[tag] == ["closed"]  # the generator was closed, as on a server


async def test_constructor_arguments_are_checked(tag: str) -> None:
    async with ThreadExecutor(check_codec=True) as executor:
        device = Device(tag)
        with pytest.raises(CodecError):
            async with executor.remote_instance(device, tag, lambda: tag):
                pass
        assert tag not in await executor.get_remote_objects()


async def test_the_frame_caps_are_checked(tag: str) -> None:
    async with ThreadExecutor(check_codec=True) as executor:
        device = DataDevice(tag)
        async with executor.remote_instance(device, tag):
            with pytest.raises(FrameError, match="buffers"):
                await device.echo([b"x"] * 5000)  # one buffer each: over the cap of 4096


async def test_an_enum_the_receiver_does_not_know_is_refused_until_registered(tag: str) -> None:
    async with ThreadExecutor(check_codec=True) as executor:
        device = DataDevice(tag)
        async with executor.remote_instance(device, tag):
            with pytest.raises(CodecError, match="may not be decoded"):
                await device.echo(Unheld.X)
            await executor.register_remote_class(Unheld)
            assert await device.echo(Unheld.X) is Unheld.X


async def test_the_new_types_pass_and_the_method_gets_the_callers_objects(tag: str) -> None:
    async with ThreadExecutor(check_codec=True) as executor:
        assert executor.check_codec is True
        device = DataDevice(tag)
        async with executor.remote_instance(device, tag):
            for value in TRAVELS:
                assert await device.echo(value) is value  # checked, never copied
            async with device.replay(TRAVELS) as items:
                assert [item async for item in items] == TRAVELS


async def test_it_gives_the_errors_the_process_executor_gives(tag: str) -> None:
    """The same values fail on both, with the same error type and message."""
    cases: dict[str, Callable[[DataDevice], Awaitable[Any]]] = {
        "argument": lambda device: device.echo(object()),
        "result": lambda device: device.unsendable(),
        "enum": lambda device: device.echo(Unheld.X),
    }
    errors: dict[str, list[BaseException]] = {case: [] for case in cases}
    for make in (lambda: ThreadExecutor(check_codec=True), ProcessExecutor):
        async with make() as executor:
            device = DataDevice(tag)
            async with executor.remote_instance(device, tag, tag):
                for case, call in cases.items():
                    with pytest.raises(CodecError) as info:
                        await call(device)
                    errors[case].append(info.value)
    for case in cases:
        on_threads, on_process = errors[case]
        assert not isinstance(on_threads, RemoteException)
        assert str(on_threads) == str(on_process), case
