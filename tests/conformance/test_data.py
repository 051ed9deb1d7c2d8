"""The standard types arrive as themselves on every executor: as arguments
(checked where the method runs), as results and as stream items, with both
codecs where an executor has one."""

from __future__ import annotations

import datetime as dt
import decimal
import pathlib
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from .devices import Access, DataDevice, Shade, describe

pytestmark = pytest.mark.anyio

VALUES: dict[str, Any] = {
    "aware datetime": dt.datetime(2024, 5, 1, 12, 30, 0, 250, dt.timezone(dt.timedelta(hours=-5))),
    "naive datetime": dt.datetime(2024, 5, 1, 12, 30),
    "date": dt.date(1999, 12, 31),
    "time": dt.time(23, 59, 59, 999999),
    "aware time": dt.time(8, 0, tzinfo=dt.UTC),
    "timedelta": dt.timedelta(days=-3, microseconds=5),
    "set": {1, "two", (3, 4), frozenset({5}), Shade.DARK},
    "frozenset": frozenset({b"bytes", 2.5}),
    "empty set": set(),
    "decimal": decimal.Decimal("-1.2300E+7"),
    "decimal nan": decimal.Decimal("NaN"),
    "path": pathlib.Path("data") / "run 1" / "frame.npy",
    "absolute path": pathlib.Path("/var/lib/remote-exec"),
    "posix path": pathlib.PurePosixPath("/mnt/camera"),
    "windows path": pathlib.PureWindowsPath(r"C:\Users\lab\data.csv"),
    "complex": complex(1.5, -2.25),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "enum": Shade.LIGHT,
    "flag": Access.READ,
    "flags": Access.READ | Access.WRITE,
    "float64": np.float64(0.1),
    "float32": np.float32(-2.5),
    "float16": np.float16(3.0),
    "int32": np.int32(-7),
    "uint64": np.uint64(2**64 - 1),
    "int8": np.int8(-128),
    "bool_": np.bool_(True),
    "complex128": np.complex128(1 - 1j),
    "datetime64": np.datetime64("2024-05-01T12:00:00.123", "ms"),
    "timedelta64": np.timedelta64(90, "s"),
}


def same(sent: Any, got: Any) -> bool:
    """Equal and of exactly the same type (a numpy scalar of the same dtype)."""
    if type(got) is not type(sent):
        return False
    if isinstance(sent, np.generic) and got.dtype != sent.dtype:
        return False
    if isinstance(sent, decimal.Decimal):
        return str(got) == str(sent)  # NaN, exponent and trailing zeros kept
    if isinstance(sent, dt.datetime | dt.time) and got.utcoffset() != sent.utcoffset():
        return False
    if isinstance(sent, set | frozenset):  # each item keeps its type too
        return {x: type(x) for x in got} == {x: type(x) for x in sent}
    return bool(got == sent)


def codec_options(executor_kind: str) -> list[dict[str, str]]:
    """Each codec of the executor (ThreadExecutor has none: it checks with msgpack)."""
    return [{}] if executor_kind == "thread" else [{"codec": "msgpack"}, {"codec": "json"}]


async def test_each_type_arrives_as_itself_and_comes_back(
    make_executor: Any, executor_kind: str, tag: str
) -> None:
    wrong = []
    for options in codec_options(executor_kind):
        async with make_executor(**options) as executor:
            device = DataDevice(tag)
            async with executor.remote_instance(device, tag, tag):
                for label, value in VALUES.items():
                    arrived = await device.describe(value)  # the type where it runs
                    if arrived != describe(value):
                        wrong.append((options, label, "arrived as", arrived))
                    back = await device.echo(value)
                    if not same(value, back):
                        wrong.append((options, label, "came back as", back))
                assert type(await device.echo(np.float64(2.5))) is np.float64
    assert wrong == []


async def test_they_stream_back_as_themselves(
    make_executor: Any, executor_kind: str, tag: str
) -> None:
    values = list(VALUES.values())
    for options in codec_options(executor_kind):
        async with make_executor(**options) as executor:
            device = DataDevice(tag)
            async with (
                executor.remote_instance(device, tag, tag),
                device.replay(values) as items,
            ):
                got = [item async for item in items]
        assert len(got) == len(values)
        for label, sent, arrived in zip(VALUES, values, got, strict=True):
            assert same(sent, arrived), (options, label, arrived)


async def test_they_travel_nested(make_executor: Any, executor_kind: str, tag: str) -> None:
    nested = {"values": tuple(VALUES.values()), "by name": dict(VALUES), "list": [VALUES["set"]]}
    for options in codec_options(executor_kind):
        async with make_executor(**options) as executor:
            device = DataDevice(tag)
            async with executor.remote_instance(device, tag, tag):
                back = await device.echo(nested)
        assert isinstance(back["values"], tuple)
        for label, arrived in zip(VALUES, back["values"], strict=True):
            assert same(VALUES[label], arrived), (options, label, arrived)
        for label, sent in VALUES.items():
            assert same(sent, back["by name"][label]), (options, label)
        assert same(VALUES["set"], back["list"][0])


SCRIPT = """
import enum
import sys

import anyio
import numpy as np

from remote_exec import ProcessExecutor, ThreadExecutor, apply_executor


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Camera:
    @apply_executor
    def flip(self, mode):
        return Mode.SLOW if mode is Mode.FAST else mode


async def main():
    for make in (lambda: ThreadExecutor(check_codec=True), ProcessExecutor):
        async with make() as executor:
            camera = Camera()
            async with executor.remote_instance(camera, "camera"):
                back = await camera.flip(Mode.FAST)
                print(type(executor).__name__, back is Mode.SLOW)


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


async def test_an_enum_of_a_script_travels_to_its_process_executor(
    tmp_path: Path, anyio_backend: str
) -> None:
    """The child imports the script under another name: its enums still travel
    both ways as the script's own (``"__main__"`` on the wire)."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, str(script), anyio_backend], cwd=tmp_path, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["ThreadExecutor", "True", "ProcessExecutor", "True"]
