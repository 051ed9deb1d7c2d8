"""Classes the dispatcher and process executor tests create remotely.

They live in an importable module (not in a test module) so that a child
process can import them by name. Module-level dictionaries let an in-process
test reach the objects a remote twin waits on; in a child process they stay
empty and the methods fall back to plain timeouts.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio

from remote_exec import apply_executor, apply_generator_executor

# Thread events a sync method waits on, by key (set by the test).
GATES: dict[str, threading.Event] = {}
# Set by ``block`` once it runs, by key.
STARTED: dict[str, threading.Event] = {}
# Barriers two instances meet at, by key.
BARRIERS: dict[str, threading.Barrier] = {}
# Loop events async methods set or wait on, by key (same loop as the test).
SIGNALS: dict[str, anyio.Event] = {}
# What generators' ``finally`` blocks and async ``finally`` blocks recorded.
CLOSED: list[str] = []
# How many items each named generator produced.
PRODUCED: dict[str, int] = {}

# Weak references to the values ``witness`` was given.
WITNESSED: list[weakref.ref[Any]] = []

_BLOCK_TIMEOUT = 30.0  # a failure bound, never a synchronisation


def gate(key: str) -> threading.Event:
    return GATES.setdefault(key, threading.Event())


def started(key: str) -> threading.Event:
    return STARTED.setdefault(key, threading.Event())


class Device:
    """Sync and async methods, generators, config and failures."""

    _config_props_ = ("exposure", "label")

    def __init__(self, port: int = 0, *, label: str = "dev") -> None:
        self.port = port
        self.label = label
        self.exposure = 10
        self.value = 0
        self.log: list[Any] = []
        self.cancelled = False
        self.closed_streams: list[str] = []
        self.ctor_thread = threading.current_thread().name

    # -- sync -------------------------------------------------------------------
    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_executor
    def witness(self, value: Any) -> Any:
        """``echo`` that keeps a weak reference to its argument."""
        WITNESSED.append(weakref.ref(value))
        return value

    @apply_executor
    def add(self, amount: int) -> int:
        self.value += amount
        return self.value

    @apply_executor
    def record(self, item: Any) -> Any:
        self.log.append(item)
        return item

    @apply_executor(blocking=False)
    def quick_record(self, item: Any) -> tuple[Any, str]:
        """``record``, declared non-blocking: says which thread ran it."""
        self.log.append(item)
        return item, threading.current_thread().name

    @apply_executor(blocking=False)
    def quick_fail(self, message: str) -> None:
        raise KeyError(message)

    @apply_executor
    def get_log(self) -> list[Any]:
        return list(self.log)

    @apply_executor
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @apply_executor
    def thread_name(self) -> str:
        return threading.current_thread().name

    @apply_executor
    def block(self, key: str) -> str:
        """Wait in the instance's thread until the test opens the gate ``key``."""
        started(key).set()
        gate(key).wait(_BLOCK_TIMEOUT)
        self.log.append(f"unblocked {key}")
        return key

    @apply_executor
    def meet(self, key: str) -> str:
        """Meet another instance at a barrier: only possible if both run at once."""
        BARRIERS[key].wait(_BLOCK_TIMEOUT)
        return threading.current_thread().name

    @apply_executor
    def describe(self, other: Device) -> tuple[str, int]:
        return type(other).__qualname__, other.value

    @apply_executor
    def identity(self, other: Device) -> Device:
        return other

    @apply_executor
    def shout(self, text: str) -> int:
        print(text)
        print(f"err: {text}", file=sys.stderr)
        return len(text)

    @apply_executor
    def exit_now(self, code: int) -> None:
        sys.stdout.flush()
        os._exit(code)

    @apply_executor
    def pid(self) -> int:
        return os.getpid()

    @apply_executor
    def scale(self, array: Any, factor: int) -> Any:
        return array * factor

    @apply_executor
    def opaque(self) -> object:
        return object()

    @apply_executor
    def nbytes(self, data: bytes) -> int:
        return len(data)

    def not_remote(self) -> int:
        return 1

    @apply_executor
    def _private(self) -> int:
        return 2

    # -- async ------------------------------------------------------------------
    @apply_executor
    async def async_record(self, item: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        self.log.append(item)
        return item

    @apply_executor
    async def async_add(self, amount: int) -> int:
        await anyio.lowlevel.checkpoint()
        self.value += amount
        return self.value

    @apply_executor
    async def hog_loop(self, seconds: float) -> None:
        """Blocks its process's event loop (what an async method must never do)."""
        print("hogging", flush=True)
        time.sleep(seconds)  # noqa: ASYNC251 - on purpose

    @apply_executor
    async def wait_forever(self, key: str) -> None:
        """Runs until cancelled; its ``finally`` records the cancellation."""
        try:
            signal = SIGNALS.get(f"{key}.started")
            if signal is not None:
                signal.set()
            await anyio.sleep_forever()
        finally:
            self.cancelled = True
            CLOSED.append(key)

    # -- generators -----------------------------------------------------------------
    @apply_generator_executor
    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    @apply_generator_executor
    def produce(self, key: str) -> Iterator[int]:
        """Endless; counts what it produced and records its closing."""
        PRODUCED[key] = 0
        try:
            i = 0
            while True:
                PRODUCED[key] = i + 1
                yield i
                i += 1
        finally:
            CLOSED.append(key)
            self.closed_streams.append(key)

    @apply_generator_executor
    async def aproduce(self, key: str) -> AsyncIterator[int]:
        PRODUCED[key] = 0
        try:
            i = 0
            while True:
                await anyio.lowlevel.checkpoint()
                PRODUCED[key] = i + 1
                yield i
                i += 1
        finally:
            CLOSED.append(key)
            self.closed_streams.append(key)

    @apply_generator_executor
    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await anyio.lowlevel.checkpoint()
            yield i

    @apply_generator_executor
    def fail_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise KeyError("generator broke")

    @apply_generator_executor
    def unencodable(self) -> Iterator[Any]:
        try:
            yield 1
            yield object()
            yield 3
        finally:
            CLOSED.append("unencodable")


class Plain:
    """A class with no remote methods at all."""

    def __init__(self) -> None:
        self.value = 1

    def method(self) -> int:
        return self.value
