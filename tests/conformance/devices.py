"""Instrument classes for the conformance suite.

They are imported by the test process and, for the remote executors, by the
child process or the daemon. State shared between instances (gates, logs)
lives in module globals *of the side that runs the methods*, keyed by the
instance's ``tag`` so that tests never see each other's state.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio

from remote_exec import apply_executor, apply_generator_executor, register_coder

LOG: defaultdict[str, list[Any]] = defaultdict(list)
BARRIERS: dict[str, threading.Barrier] = {}
_BARRIERS_LOCK = threading.Lock()


class Point:
    """A custom type taught to every registry through the module-level table."""

    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


register_coder("conformance.Point", Point, lambda p: [p.x, p.y], lambda v: Point(*v))


class Device:
    _config_props_ = ("exposure", "label")

    def __init__(self, tag: str = "", gain: int = 1) -> None:
        self.tag = tag
        self.gain = gain
        self.exposure = 10
        self.label = "default"
        self.results: list[Any] = []

    def record(self, value: Any) -> None:  # a callback: runs on the calling side
        self.results.append(value)

    def _secret(self) -> str:
        return "never callable remotely"

    def undecorated(self) -> str:
        return "never callable remotely"

    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_executor
    def thread_name(self) -> str:
        return threading.current_thread().name

    @apply_executor(callback=record)
    def numbered(self, i: int) -> int:
        LOG[self.tag].append(i)
        return i

    @apply_executor
    def log(self) -> list[Any]:
        return list(LOG[self.tag])

    @apply_executor
    def config(self) -> dict[str, Any]:
        return {"tag": self.tag, "gain": self.gain, "exposure": self.exposure, "label": self.label}

    @apply_executor
    def fail(self, kind: str, message: str) -> None:
        errors: dict[str, type[Exception]] = {
            "ValueError": ValueError,
            "KeyError": KeyError,
            "TimeoutError": TimeoutError,
            "RuntimeError": RuntimeError,
        }
        raise errors[kind](message)

    @apply_executor
    def rendezvous(self, key: str, parties: int) -> int:
        """Blocks until ``parties`` calls meet: only concurrent calls pass."""
        with _BARRIERS_LOCK:
            barrier = BARRIERS.setdefault(key, threading.Barrier(parties, timeout=10))
        return barrier.wait()

    @apply_executor
    async def wait_forever(self, key: str) -> None:
        LOG[key].append("started")
        try:
            await anyio.sleep_forever()
        finally:
            LOG[key].append("finally")

    @apply_executor
    async def async_add(self, a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return (a + b) * self.gain

    @apply_executor
    def mark(self, key: str, value: str) -> str:
        LOG[key].append(value)
        return value

    @apply_executor
    def entries(self, key: str) -> list[Any]:
        return list(LOG[key])

    @apply_executor
    def is_twin(self, other: Any) -> bool:
        return isinstance(other, Device) and other is not self and other.tag != self.tag

    @apply_executor
    def itself(self) -> Device:
        return self

    @apply_generator_executor(callback=record)
    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    @apply_generator_executor
    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await anyio.lowlevel.checkpoint()
            yield i

    @apply_generator_executor
    def tracked(self, key: str, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                LOG[key].append(i)
                yield i
        finally:
            LOG[key].append("closed")

    @apply_generator_executor
    async def atracked(self, key: str, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                LOG[key].append(i)
                yield i
        finally:
            LOG[key].append("closed")

    @apply_generator_executor
    def failing(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError(f"broke after {n}")


class Acquisition:
    """An acquisition instrument for the parity tests (test_parity.py): slow and
    fast generators, sync and async, whose progress is read back as attributes."""

    _config_props_ = ("exposure", "label")

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.exposure = 10
        self.label = "default"
        self.produced = 0  # items the last fast stream produced
        self.closed = False  # whether the last fast stream's finally ran

    @apply_executor
    def scale(self, value: int, factor: int = 1) -> int:
        return value * factor

    @apply_generator_executor
    def frames(self, n: int, interval: float) -> Iterator[tuple[int, float]]:
        """A slow instrument: one frame every ``interval`` seconds, stamped with
        ``time.monotonic()`` (system-wide on Linux) just before it is yielded."""
        for i in range(n):
            if i:
                time.sleep(interval)
            yield i, time.monotonic()

    @apply_generator_executor
    async def aframes(self, n: int, interval: float) -> AsyncIterator[tuple[int, float]]:
        for i in range(n):
            if i:
                await anyio.sleep(interval)
            yield i, time.monotonic()

    @apply_generator_executor
    def fast(self, n: int) -> Iterator[int]:
        """Produces as fast as it is allowed to, counting what it produced."""
        self.produced, self.closed = 0, False
        try:
            for i in range(n):
                self.produced += 1
                yield i
        finally:
            self.closed = True

    @apply_generator_executor
    async def afast(self, n: int) -> AsyncIterator[int]:
        self.produced, self.closed = 0, False
        try:
            for i in range(n):
                self.produced += 1
                yield i
        finally:
            self.closed = True

    @apply_generator_executor
    def items(self, n: int, prefix: str = "") -> Iterator[str]:
        for i in range(n):
            yield f"{prefix}{i}"

    @apply_generator_executor
    async def aitems(self, n: int, prefix: str = "") -> AsyncIterator[str]:
        for i in range(n):
            await anyio.lowlevel.checkpoint()
            yield f"{prefix}{i}"


class Streamer:
    """Generators whose ``finally`` is observable as attributes, for
    test_unclosed_streams.py: a dropped stream must get its generator closed."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.opened = 0  # generators started
        self.closed = 0  # ... whose ``finally`` ran

    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_generator_executor
    def numbers(self, n: int) -> Iterator[int]:
        self.opened += 1
        try:
            yield from range(n)
        finally:
            self.closed += 1

    @apply_generator_executor
    async def anumbers(self, n: int) -> AsyncIterator[int]:
        self.opened += 1
        try:
            for i in range(n):
                await anyio.lowlevel.checkpoint()
                yield i
        finally:
            self.closed += 1


class Shade(enum.Enum):
    """An enum of the devices' module: every side holding a device may decode it."""

    LIGHT = "light"
    DARK = "dark"


class Access(enum.Flag):
    READ = 1
    WRITE = 2


def describe(value: Any) -> str:
    """The type ``value`` has where this runs (with a numpy scalar's dtype)."""
    kind = type(value)
    dtype = getattr(value, "dtype", None)
    suffix = "" if dtype is None else f"[{dtype.str}]"
    return f"{kind.__module__}.{kind.__qualname__}{suffix}"


class DataDevice:
    """Data round trips for test_data.py: what arrives, as what type, and back."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_executor
    def describe(self, value: Any) -> str:
        return describe(value)

    @apply_generator_executor
    def replay(self, values: list[Any]) -> Iterator[Any]:
        yield from values

    @apply_executor
    def unsendable(self) -> Any:
        """A result no remote executor can send back (check_codec tests)."""
        return object()

    @apply_generator_executor
    def unsendable_after(self, key: str, n: int) -> Iterator[Any]:
        """``n`` items, then one that cannot travel; records that it was closed."""
        try:
            yield from range(n)
            yield object()
        finally:
            LOG[key].append("closed")


class Spinner:
    """Long sync work that stops when asked (cooperative cancellation)."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.events: list[str] = []

    @apply_executor
    def spin(self, steps: int) -> int:
        """``steps`` waits of 20 ms (an instrument settling), stoppable in each."""
        from remote_exec import InvocationCancelled, cancellable_sleep

        self.events.append("started")
        try:
            for _ in range(steps):
                cancellable_sleep(0.02)
        except InvocationCancelled:
            self.events.append("cancelled")
            raise
        self.events.append("finished")
        return steps

    @apply_executor
    def grind(self, steps: int) -> int:
        """``steps`` busy steps of 5 ms, checking between them."""
        from remote_exec import InvocationCancelled, check_cancelled

        self.events.append("started")
        try:
            for _ in range(steps):
                check_cancelled()
                time.sleep(0.005)  # a step of work that cannot be interrupted
        except InvocationCancelled:
            self.events.append("cancelled")
            raise
        self.events.append("finished")
        return steps

    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_executor
    def invocation_id(self) -> str | None:
        from remote_exec import current_invocation_id

        return current_invocation_id()

    @apply_executor
    async def async_invocation_id(self) -> str | None:
        from remote_exec import check_cancelled, current_invocation_id

        await anyio.lowlevel.checkpoint()
        check_cancelled()  # not asked to stop: nothing happens
        return current_invocation_id()

    @apply_executor(timeout=0.5)
    def bounded_spin(self, steps: int) -> int:
        """``spin`` that may take half a second at most."""
        return Spinner.spin.__remote_exec__.func(self, steps)  # type: ignore[attr-defined, no-any-return]

    @apply_executor(timeout=0.3)
    def quick(self) -> str:
        self.events.append("quick ran")
        return "quick"

    @apply_executor(timeout=0.5)
    async def bounded_nap(self, seconds: float) -> str:
        await anyio.sleep(seconds)
        return "rested"

    @apply_executor
    async def nap(self, seconds: float) -> str:
        self.events.append("nap started")
        try:
            await anyio.sleep(seconds)
        finally:
            self.events.append("nap ended")
        return "rested"

    @apply_executor
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @apply_generator_executor
    def ids(self, n: int) -> Iterator[str | None]:
        from remote_exec import current_invocation_id

        for _ in range(n):
            yield current_invocation_id()


class Chatty:
    """Methods that log (what their invocations capture) and wait for a file."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    @apply_executor
    def talk(self, n: int, word: str) -> str | None:
        """``n`` INFO records (and one DEBUG and one WARNING); its invocation id."""
        import logging

        from remote_exec import current_invocation_id

        log = logging.getLogger(f"tests.chatty.{self.tag}")
        log.debug("not kept: below INFO")
        for i in range(n):
            log.info("%s %d", word, i)
        log.warning("%s done", word)
        return current_invocation_id()

    @apply_executor
    async def atalk(self, n: int, word: str) -> str | None:
        """``talk`` from async code, yielding to the loop between records."""
        import logging

        from remote_exec import current_invocation_id

        log = logging.getLogger(f"tests.chatty.{self.tag}")
        for i in range(n):
            log.info("%s %d", word, i)
            await anyio.lowlevel.checkpoint()
        return current_invocation_id()

    @apply_executor
    def hold(self, path: str, result: Any = "released") -> Any:
        """Log "waiting", then wait (cooperatively) until ``path`` exists."""
        import logging
        import os

        from remote_exec import cancellable_sleep

        log = logging.getLogger(f"tests.chatty.{self.tag}")
        log.info("waiting for %s", os.path.basename(path))
        while not os.path.exists(path):
            cancellable_sleep(0.01)
        log.info("released")
        return result

    @apply_executor
    async def ahold(self, path: str) -> str:
        """``hold`` for async code: cancelled where it awaits."""
        while not await anyio.Path(path).exists():  # noqa: ASYNC110 - a file the test makes
            await anyio.sleep(0.01)
        return "released"

    @apply_executor
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @apply_generator_executor
    def items(self, n: int) -> Iterator[int]:
        yield from range(n)
