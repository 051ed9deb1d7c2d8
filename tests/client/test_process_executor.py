"""``ProcessExecutor`` against a real child process, on both backends."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
from pathlib import Path

import anyio
import numpy as np
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from remote_exec.client.process import ProcessExecutor
from remote_exec.exceptions import (
    ConnectionLostError,
    ExecutorStateError,
    NotAllowedError,
    RemoteException,
)
from tests.instruments import Device

pytestmark = pytest.mark.anyio

TIMEOUT = 15  # a failure bound: nothing waits on it when the code is right
ROOT = Path(__file__).resolve().parents[2]


def assert_reaped(pid: int) -> None:
    """The child is gone and reaped (a zombie would still accept signal 0)."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_calls_async_methods_and_generators() -> None:
    with anyio.fail_after(TIMEOUT):
        async with ProcessExecutor() as ex:
            assert ex.is_remote
            dev = Device()
            async with ex.remote_instance(dev, "dev", 3, label="cam"):
                assert await dev.add(4) == 4
                assert await dev.async_add(1) == 5
                # Declared non-blocking: the child runs it on its event loop.
                assert await dev.quick_record("q") == ("q", "MainThread")
                assert await dev.thread_name() != "MainThread"
                assert dev.value == 0  # the twin changed, not the local object
                assert await dev.pid() == ex.pid != os.getpid()
                async with dev.count(200) as items:
                    assert [i async for i in items] == list(range(200))
                assert [i async for i in dev.acount(5)] == list(range(5))
                with pytest.raises(ValueError, match="boom") as info:
                    await dev.fail("boom")
                assert isinstance(info.value, RemoteException)
                assert "in fail" in info.value.remote_traceback
                assert await ex.get_remote_objects() == ["dev"]
                # The local config wins over what the constructor set.
                assert await ex.get_remote_object_config(dev) == {"exposure": 10, "label": "dev"}
                await ex.apply_property_data_from_remote(dev, ["value", "port"])
                assert (dev.value, dev.port) == (5, 3)
                sent, remote, received = await ex.get_echo_clock()
                assert sent <= received
                assert isinstance(remote, int)
                assert await ex.sleep(0.001) > remote
            assert await ex.get_remote_objects() == []


async def test_bulk_bytes_and_numpy() -> None:
    payload = os.urandom(1024) * (16 * 1024)  # 16 MiB
    array = np.arange(100_000, dtype=np.float64).reshape(100, 1000)
    with anyio.fail_after(TIMEOUT):
        async with ProcessExecutor() as ex:
            dev = Device()
            async with ex.remote_instance(dev, "dev"):
                assert await dev.echo(payload) == payload
                assert await dev.nbytes(payload) == len(payload)
                doubled = await dev.scale(array, 2)
                assert isinstance(doubled, np.ndarray)
                np.testing.assert_array_equal(doubled, array * 2)
                assert await dev.echo((1, "two", [3.0])) == (1, "two", [3.0])


async def test_instance_argument_arrives_as_the_twin() -> None:
    with anyio.fail_after(TIMEOUT):
        async with ProcessExecutor() as ex:
            one, two = Device(), Device()
            async with ex.remote_instance(one, "one"), ex.remote_instance(two, "two"):
                await two.add(7)
                assert await one.describe(two) == ("Device", 7)
                assert await one.identity(two) is two


async def test_prints_do_not_corrupt_the_protocol(capfd: pytest.CaptureFixture[str]) -> None:
    with anyio.fail_after(TIMEOUT):
        async with ProcessExecutor() as ex:
            dev = Device()
            async with ex.remote_instance(dev, "dev"):
                for i in range(20):
                    assert await dev.shout(f"line {i}") == len(f"line {i}")
                assert await dev.echo(b"\x00binary\xff") == b"\x00binary\xff"
    out, err = capfd.readouterr()
    assert out.splitlines() == [f"line {i}" for i in range(20)]
    assert err.splitlines() == [f"err: line {i}" for i in range(20)]


async def test_cancelling_a_call_cancels_it_remotely() -> None:
    with anyio.fail_after(TIMEOUT):
        async with ProcessExecutor() as ex:
            dev = Device()
            async with ex.remote_instance(dev, "dev"):
                with anyio.move_on_after(0.2) as scope:
                    await dev.wait_forever("w")
                assert scope.cancelled_caught
                # The next call on the instance runs after the cancelled one's finally.
                data = await ex.get_remote_object_property_data(dev, ["cancelled"])
                assert data == {"cancelled": True}
                # Leaving a stream early closes the remote generator.
                async with dev.produce("p") as items:
                    async for item in items:
                        if item == 3:
                            break
                await ex.apply_property_data_from_remote(dev, ["closed_streams"])
                assert dev.closed_streams == ["p"]
                assert await dev.echo("still serving") == "still serving"


@pytest.mark.parametrize("how", ["sigkill", "exit"])
async def test_child_dying_mid_call_fails_every_caller_at_once(how: str) -> None:
    errors: list[BaseException] = []
    async with ProcessExecutor(init_context=False) as ex:
        pid = ex.pid
        assert pid is not None
        one, two, three = Device(), Device(), Device()
        await ex.create_remote_instance(one, "one")
        await ex.create_remote_instance(two, "two")
        await ex.create_remote_instance(three, "three")
        targets = {"block": one, "wait_forever": two, "exit_now": three}

        async def call(fn: str, *args: object) -> None:
            try:
                await ex.execute(targets[fn], fn, args)
            except ConnectionLostError as exc:
                errors.append(exc)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "block", "never")  # blocks a worker thread
                tg.start_soon(call, "block", "queued")  # queued behind it
                tg.start_soon(call, "wait_forever", "w")  # an async method
                await anyio.wait_all_tasks_blocked()
                if how == "sigkill":
                    os.kill(pid, signal.SIGKILL)
                else:
                    tg.start_soon(call, "exit_now", 3)
        assert len(errors) == (3 if how == "sigkill" else 4)
        with pytest.raises(ConnectionLostError):
            await ex.execute(one, "echo", [1])
    assert_reaped(pid)
    assert ex.returncode == (-signal.SIGKILL if how == "sigkill" else 3)


async def test_stop_reaps_the_child_and_later_use_is_refused() -> None:
    ex = ProcessExecutor()
    dev = Device()
    with pytest.raises(ExecutorStateError, match="not started"):
        await ex.execute(dev, "echo", [1])
    async with ex:
        await ex.create_remote_instance(dev, "dev")
        pid = ex.pid
        assert pid is not None
    assert ex.returncode == 0
    assert_reaped(pid)
    with pytest.raises(ExecutorStateError, match="stopped"):
        await ex.execute(dev, "echo", [1])
    with pytest.raises(ExecutorStateError):
        await ex.get_echo_clock()
    with pytest.raises(ExecutorStateError):
        await ex.start()


async def test_child_exits_on_stop_even_if_a_thread_blocks() -> None:
    ex = ProcessExecutor(init_context=False, stop_timeout=60)
    dev = Device()

    async def blocked_call() -> None:
        with pytest.raises(ExecutorStateError, match="stopped"):
            await ex.execute(dev, "block", ["forever"])

    with anyio.fail_after(TIMEOUT):  # far less than stop_timeout
        async with anyio.create_task_group() as tg, ex:
            await ex.create_remote_instance(dev, "dev")
            tg.start_soon(blocked_call)
            await anyio.wait_all_tasks_blocked()
    assert ex.returncode == 0  # it left by itself: not killed


async def test_cancelled_owner_still_reaps_the_child() -> None:
    pid = None
    with anyio.move_on_after(0.5):
        async with ProcessExecutor() as ex:
            pid = ex.pid
            dev = Device()
            async with ex.remote_instance(dev, "dev"):
                await dev.wait_forever("forever")
    assert pid is not None
    assert_reaped(pid)


async def test_allow_list_and_start_failures() -> None:
    with anyio.fail_after(TIMEOUT):
        async with ProcessExecutor(allow_modules=["somewhere.else.*"]) as ex:
            with pytest.raises(NotAllowedError):
                await ex.create_remote_instance(Device(), "dev")
            assert await ex.get_remote_objects() == []
    with pytest.raises(FileNotFoundError):
        async with ProcessExecutor(python="/nonexistent/python"):
            pass
    with pytest.raises(ValueError, match="backend"):
        ProcessExecutor(backend="curio")


async def test_class_from_the_main_script(tmp_path: Path, anyio_backend: str) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys

            import anyio

            from remote_exec import apply_executor, apply_generator_executor
            from remote_exec.client.process import ProcessExecutor


            class Local:
                _config_props_ = ("gain",)

                def __init__(self, base):
                    self.base = base
                    self.gain = 1

                @apply_executor
                def compute(self, x):
                    return self.base + x * self.gain

                @apply_generator_executor
                def ramp(self, n):
                    yield from range(n)


            async def main():
                async with ProcessExecutor() as ex:
                    local = Local(10)
                    local.gain = 3
                    async with ex.remote_instance(local, "local", 10):
                        print(await local.compute(2), [i async for i in local.ramp(3)])


            if __name__ == "__main__":
                anyio.run(main, backend=sys.argv[1])
            """
        )
    )
    with anyio.fail_after(TIMEOUT):
        result = await anyio.run_process(
            [sys.executable, str(script), anyio_backend], cwd=ROOT, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "16 [0, 1, 2]"


async def test_child_exits_when_the_parent_dies_even_if_its_loop_is_blocked(
    tmp_path: Path, anyio_backend: str
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys

            import anyio

            from remote_exec.client.process import ProcessExecutor
            from tests.instruments import Device


            async def main():
                async with ProcessExecutor() as ex:
                    dev = Device()
                    await ex.create_remote_instance(dev, "dev")
                    print(ex.pid, flush=True)
                    await dev.hog_loop(60)  # the child's loop cannot see the socket close


            anyio.run(main, backend=sys.argv[1])
            """
        )
    )
    with anyio.fail_after(TIMEOUT):
        async with await anyio.open_process(
            [sys.executable, str(script), anyio_backend],
            cwd=ROOT,
            stderr=None,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ) as parent:
            assert parent.stdout is not None
            output = BufferedByteReceiveStream(parent.stdout)
            child_pid = int(await output.receive_until(b"\n", 100))
            assert await output.receive_until(b"\n", 100) == b"hogging"
            parent.kill()
            assert await parent.wait() == -signal.SIGKILL
            # The child shares our end of stdout: end of file means it exited.
            rest = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
                while True:
                    rest += await output.receive()
    assert rest == b""
    assert child_pid != parent.pid


async def test_the_child_uses_the_parents_limits(anyio_backend: str) -> None:
    """A cap set on the executor holds in the child too: a too-large reply fails
    that call only (the child refuses to send it) and the connection lives."""
    from remote_exec.protocol import Limits

    from .._limits_probe import Big

    limits = Limits(max_message_size=64 * 1024)
    async with ProcessExecutor(limits=limits) as executor:
        big = Big()
        async with executor.remote_instance(big, "big"):
            with pytest.raises(Exception, match="size cap"):
                await big.make(128 * 1024)
            assert len(await big.make(1024)) == 1024
