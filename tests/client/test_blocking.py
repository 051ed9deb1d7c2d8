"""``BlockingExecutor``: the executors' API for sync code, over every executor.

The main tests run for the thread, process and websocket executors, each on
both loop backends (``backend=``). They are plain sync functions: a
BlockingExecutor refuses to block a thread that runs an event loop. Remote
state is read back through calls (``entries``), never peeked at locally.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from remote_exec import (
    BlockingExecutor,
    Executor,
    ExecutorStateError,
    ProcessExecutor,
    ThreadExecutor,
    WebSocketExecutor,
    apply_executor,
    apply_generator_executor,
    current_executor,
)
from remote_exec.exceptions import DuplicateInstanceError

from ..conformance.devices import LOG, Acquisition, Device
from ..ws_instruments import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["thread", "process", "websocket"]
BACKENDS = ["asyncio", "trio"]

pytestmark = pytest.mark.timeout(60)  # a hang guard: every call below blocks


@pytest.fixture(scope="module")
def daemons() -> Iterator[dict[str, DaemonProcess]]:
    """One daemon per backend, started when first needed."""
    started: dict[str, DaemonProcess] = {}
    yield started
    for daemon in started.values():
        daemon.close()


def make_executor(kind: str, backend: str, daemons: dict[str, DaemonProcess]) -> Executor:
    if kind == "thread":
        return ThreadExecutor()
    if kind == "process":
        return ProcessExecutor()
    if backend not in daemons:
        daemons[backend] = DaemonProcess(
            "--host", "127.0.0.1", "--no-auth", "--allow-module", "tests.*", "--backend", backend
        )
    return WebSocketExecutor(daemons[backend].url)


@pytest.fixture(
    scope="module",
    params=[(kind, backend) for kind in KINDS for backend in BACKENDS],
    ids=lambda param: "-".join(param),
)
def bx(request: pytest.FixtureRequest, daemons: dict[str, DaemonProcess]) -> Iterator[Any]:
    """A started BlockingExecutor, shared by this module's tests of one kind and
    backend (each test uses instances of its own)."""
    kind, backend = request.param
    with BlockingExecutor(make_executor(kind, backend, daemons), backend=backend) as started:
        yield started


@pytest.fixture
def tag() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def is_thread(bx: BlockingExecutor) -> bool:
    return isinstance(bx.executor, ThreadExecutor)


# -- run ------------------------------------------------------------------------


def test_run_goes_through_the_executor(bx: BlockingExecutor, tag: str) -> None:
    device = Device(tag, gain=3)
    with bx.remote_instance(device, tag, tag, gain=3):
        assert bx.run(device.echo, (1, "a")) == (1, "a")
        assert bx.run(device.async_add, 1, b=2) == 9  # an async method, keywords too
        assert bx.run(device.numbered, 5) == 5
        assert device.results == [5]  # the callback ran here, on the calling side
        # The trap: a portal call of a decorated method runs locally unless the
        # executor context is entered in the task that runs it.
        key = tag + "mark"
        assert bx.run(device.mark, key, "there") == "there"
        assert bx.run(device.entries, key) == ["there"]
        if is_thread(bx):
            assert bx.run(device.thread_name).startswith("remote-exec worker")
        else:
            assert key not in LOG  # not run in this process
        with pytest.raises(ValueError, match="nope"):
            bx.run(device.fail, "ValueError", "nope")


def test_run_and_execute_twins(bx: BlockingExecutor, tag: str) -> None:
    device = Device(tag)
    assert bx.ensure_remote_instance(device, tag, tag) is True
    assert bx.ensure_remote_instance(device, tag, tag) is False
    try:
        assert bx.execute(device, "echo", [7]) == 7
        assert bx.execute(device, device.async_add, (2, 3)) == 5
        with bx.execute_generator(device, "count", (3,)) as items:
            assert list(items) == [0, 1, 2]
        assert tag in bx.get_remote_objects()
    finally:
        bx.delete_remote_instance(device)
    assert tag not in bx.get_remote_objects()


@pytest.fixture(params=BACKENDS)
def thread_bx(request: pytest.FixtureRequest) -> Iterator[BlockingExecutor]:
    """A BlockingExecutor of its own over a ThreadExecutor, for the checks that
    do not depend on the executor."""
    with BlockingExecutor(ThreadExecutor(), backend=request.param) as started:
        yield started


def test_run_refuses_what_is_not_a_bound_decorated_method(
    thread_bx: BlockingExecutor, tag: str
) -> None:
    bx, device = thread_bx, Device(tag)
    with pytest.raises(TypeError, match=r"generator method: use bx\.gen"):
        bx.run(device.count, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"not a generator method: use bx\.run"):
        bx.gen(device.echo, 3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="bound method decorated"):
        bx.run(device.undecorated)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bound method decorated"):
        bx.run(Device.echo, device, 1)


# -- gen ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tracked", "atracked"])
def test_gen_leaving_early_closes_the_remote_generator(
    bx: BlockingExecutor, tag: str, method: str
) -> None:
    device = Device(tag)
    with bx.remote_instance(device, tag, tag):
        with bx.gen(getattr(device, method), tag, 1000) as items:
            for i in items:
                if i == 2:
                    break
        entries = bx.run(device.entries, tag)
        assert entries[-1] == "closed"  # its finally ran there, before we went on
        assert len(entries) < 100  # and it ran only a window ahead
        assert next(items, "over") == "over"


def test_gen_close_and_property_read(bx: BlockingExecutor, tag: str) -> None:
    acquisition = Acquisition(tag)
    with bx.remote_instance(acquisition, tag, tag):
        items = bx.gen(acquisition.afast, 10_000)
        assert [next(items), next(items)] == [0, 1]
        assert bx.get_remote_object_property_data(acquisition, ["closed"]) == {"closed": False}
        items.close()
        items.close()  # idempotent
        data = bx.get_remote_object_property_data(acquisition, ["closed", "produced"])
        assert data["closed"] is True
        assert 2 <= data["produced"] < 100
        bx.apply_property_data_from_remote(acquisition, ["produced"])
        assert acquisition.produced == data["produced"]


def test_gen_to_the_end_with_callback(bx: BlockingExecutor, tag: str) -> None:
    device = Device(tag)
    with bx.remote_instance(device, tag, tag):
        assert list(bx.gen(device.count, 5)) == [0, 1, 2, 3, 4]
        assert device.results == [0, 1, 2, 3, 4]  # once per item, here
        with bx.gen(device.acount, 3) as items:
            assert list(items) == [0, 1, 2]
        items = bx.gen(device.failing, 2)
        assert [next(items), next(items)] == [0, 1]
        with pytest.raises(ValueError, match="broke after 2"):
            next(items)


# -- the other twins ------------------------------------------------------------


def test_remote_instance_is_a_sync_context_manager(bx: BlockingExecutor, tag: str) -> None:
    device = Device(tag, gain=2)
    device.exposure, device.label = 25, "blocking"
    with bx.remote_instance(device, tag, tag, gain=2) as held:
        assert held is device
        assert tag in bx.get_remote_objects()
        with pytest.raises(DuplicateInstanceError), bx.remote_instance(Device(tag), tag, tag):
            pass
        assert bx.get_remote_object_config(device) == {"exposure": 25, "label": "blocking"}
        assert bx.get_remote_object_config(None)[tag] == {"exposure": 25, "label": "blocking"}
        device.exposure = 0  # here only, unless the twin is this very object (threads)
        bx.apply_config_from_remote(device)
        assert device.exposure == (0 if is_thread(bx) else 25)
    assert tag not in bx.get_remote_objects()


def test_channel_clock_sleep_imports(bx: BlockingExecutor, tag: str) -> None:
    device = Device(tag)
    with bx.get_channel_from_remote(tag, "") as events:
        with bx.remote_instance(device, tag, tag):
            bx.run(device.echo, 7)
        received = []
        for event in events:
            received.append(event)
            if event["channel"] == "delete":
                break
    assert [e["channel"] for e in received] == ["create", "execute", "delete"]
    assert received[1]["data"]["result"] == 7

    sent, _remote, back = bx.get_echo_clock()
    assert sent <= back
    woke = bx.sleep(duration=0.001)
    assert isinstance(woke, int)
    with pytest.raises(ValueError, match="either a duration"):
        bx.sleep()
    bx.remote_import("tests.conformance.devices")
    with pytest.raises(ImportError):
        bx.remote_import("tests.conformance.no_such_module")
    bx.register_remote_class(Device)


def test_call_runs_async_code_in_the_executor_context(bx: BlockingExecutor, tag: str) -> None:
    device = Device(tag)

    async def twice(value: int) -> tuple[Executor | None, int]:
        # A decorated method awaited here goes through the executor.
        return current_executor(), await device.echo(value) * 2

    with bx.remote_instance(device, tag, tag):
        assert bx.call(twice, 21) == (bx.executor, 42)


# -- several threads --------------------------------------------------------------


def test_two_threads_at_once(bx: BlockingExecutor, tag: str) -> None:
    first, second = Device(tag + "a"), Device(tag + "b")
    errors: list[BaseException] = []

    def in_thread(fn: Any, *args: Any) -> threading.Thread:
        def target() -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    def marks(device: Device, key: str, who: str) -> None:
        for i in range(20):
            bx.run(device.mark, key, f"{who}{i}")

    with (
        bx.remote_instance(first, tag + "a", tag + "a"),
        bx.remote_instance(second, tag + "b", tag + "b"),
    ):
        # Two instances, two threads: both calls wait at one barrier, so they
        # pass only if the BlockingExecutor runs them at the same time.
        threads = [in_thread(bx.run, device.rendezvous, tag, 2) for device in (first, second)]
        threads += [
            in_thread(marks, first, tag + "one", "x"),
            in_thread(marks, first, tag + "one", "y"),
        ]
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        # One instance, two threads: each thread's calls kept their order.
        entries = bx.run(first.entries, tag + "one")
        assert len(entries) == 40
        for who in "xy":
            assert [e for e in entries if e.startswith(who)] == [f"{who}{i}" for i in range(20)]


# -- refusing to block an event loop -----------------------------------------------


@pytest.mark.parametrize("loop", BACKENDS)
def test_inside_a_running_loop_it_says_to_await(bx: BlockingExecutor, tag: str, loop: str) -> None:
    device = Device(tag)
    with bx.remote_instance(device, tag, tag):

        async def inside() -> None:
            for attempt in (
                lambda: bx.run(device.echo, 1),
                lambda: bx.gen(device.count, 1),
                lambda: bx.get_remote_objects(),
                lambda: bx.remote_instance(Device(), tag + "x").__enter__(),
            ):
                with pytest.raises(RuntimeError, match=f"runs a {loop} event loop.*await"):
                    attempt()
            # A worker thread of that loop may block.
            assert await anyio.to_thread.run_sync(bx.run, device.echo, 2) == 2

        anyio.run(inside, backend=loop)
        assert tag + "x" not in bx.get_remote_objects()


def test_its_own_loop_thread_is_refused_too(thread_bx: BlockingExecutor, tag: str) -> None:
    """Code on the BlockingExecutor's loop (a callback) must not block it: that
    would deadlock."""
    bx, device = thread_bx, Device(tag)

    async def reenter() -> None:
        bx.get_remote_objects()

    with (
        bx.remote_instance(device, tag, tag),
        pytest.raises(RuntimeError, match=r"event loop.*await"),
    ):
        bx.call(reenter)


# -- lifecycle ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_lifecycle_and_misuse(backend: str) -> None:
    with pytest.raises(TypeError, match="wraps an executor"):
        BlockingExecutor(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend"):
        BlockingExecutor(ThreadExecutor(), backend="curio")
    bx = BlockingExecutor(ThreadExecutor(), backend=backend)
    with pytest.raises(ExecutorStateError, match="not started"):
        bx.get_remote_objects()
    assert bx.start() is bx  # start/stop: a notebook's cells cannot share one `with`
    assert bx.started
    assert bx.executor.started
    with pytest.raises(ExecutorStateError, match="twice"):
        bx.start()
    assert bx.get_remote_objects() == []
    bx.stop()
    bx.stop()
    assert not bx.started
    assert not bx.executor.started
    with pytest.raises(ExecutorStateError, match="stopped"):
        bx.get_remote_objects()


class Local:
    """A class of this test module: only the thread executor runs it."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_generator_executor
    def numbers(self) -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            self.closed.set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_stream_is_closed(backend: str) -> None:
    with BlockingExecutor(ThreadExecutor(), backend=backend) as bx:
        local = Local()
        with bx.remote_instance(local, "local"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in bx.gen(local.numbers):  # no `with`: dropping it closes it
                if i == 1:
                    break
            assert local.closed.wait(10)
    # Closed by the facade, not by the executor's stream finding itself
    # collected unclosed (which warns).
    assert [w.message for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_notebook_kernel_may_block_its_cells(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Jupyter kernel runs cells inside its asyncio loop, in the main thread."""
    kernel_shell = types.SimpleNamespace(kernel=object())
    fake_ipython = types.ModuleType("IPython")
    fake_ipython.get_ipython = lambda: kernel_shell  # type: ignore[attr-defined]

    async def cell(bx: BlockingExecutor, local: Local) -> Any:
        return bx.run(local.echo, "cell")

    with BlockingExecutor(ThreadExecutor(), backend=backend) as bx:
        local = Local()
        with bx.remote_instance(local, "local"):
            with pytest.raises(RuntimeError, match="asyncio event loop"):
                anyio.run(cell, bx, local)
            monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
            assert anyio.run(cell, bx, local) == "cell"
            kernel_shell.kernel = None  # plain IPython: no kernel, no exception
            with pytest.raises(RuntimeError, match="asyncio event loop"):
                anyio.run(cell, bx, local)


# -- Ctrl-C ----------------------------------------------------------------------

SCRIPT = """
import os
import sys

import anyio

from remote_exec import BlockingExecutor, ThreadExecutor, apply_executor


def say(line: str) -> None:
    os.write(1, (line + "\\n").encode())  # one write: two threads print


class Device:
    @apply_executor
    async def wait(self) -> None:
        say("started")
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            say("remote cancelled")
            raise
        finally:
            say("remote finally")

    @apply_executor
    def after(self) -> str:
        return "next call ran"


with BlockingExecutor(ThreadExecutor(), backend=sys.argv[1]) as bx:
    device = Device()
    with bx.remote_instance(device, "device"):
        try:
            bx.run(device.wait)
        except KeyboardInterrupt:
            say("caller interrupted")
            say(bx.run(device.after))
            raise
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_cancels_the_remote_call(backend: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert lines.get(timeout=30) == "started"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)  # the method would sleep for 60 s
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert proc.stdout is not None
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    out = []
    while not lines.empty():
        out.append(lines.get_nowait())
    # The remote method saw the cancellation, and the instance's next call ran
    # after it unwound; the caller got KeyboardInterrupt.
    assert sorted(out) == sorted(
        ["remote cancelled", "remote finally", "caller interrupted", "next call ran"]
    ), out
    assert out.index("remote cancelled") < out.index("remote finally") < out.index("next call ran")
    assert "KeyboardInterrupt" in stderr
    assert proc.returncode == -signal.SIGINT, stderr
    assert elapsed < 10


def test_the_context_stays_in_the_loop(bx: BlockingExecutor, tag: str) -> None:
    """The executor context lives in the loop's tasks, not in the calling thread:
    there, a decorated method awaited outside the facade runs locally, as usual."""
    device = Device(tag)
    assert current_executor() is None
    with bx.remote_instance(device, tag, tag):
        bx.run(device.echo, 1)
        assert current_executor() is None
        assert anyio.run(device.mark, tag + "local", "here") == "here"
        assert bx.run(device.entries, tag + "local") == (["here"] if is_thread(bx) else [])
