"""Classes the hardening daemons create (``--allow-module tests.hardening.instruments``).

The daemon imports this module, so it imports only what the daemon has: the
standard library, anyio and remote_exec. Everything an instance observes goes
to ``JOURNAL``, a module-level list that any instance can read back (instances
of other connections included), tagged with the key the test chose.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel

from remote_exec import apply_executor, apply_generator_executor

# (key, what happened), appended from any thread (list.append is atomic).
JOURNAL: list[tuple[str, str]] = []
_GATES: dict[str, threading.Event] = {}
_GATES_LOCK = threading.Lock()


def _gate(key: str) -> threading.Event:
    with _GATES_LOCK:
        return _GATES.setdefault(key, threading.Event())


class Instrument:
    """A small lab instrument with every kind of method, and some that must stay out of reach."""

    _config_props_ = ("label",)

    def __init__(self, label: str = "instrument") -> None:
        self.label = label
        self.produced = 0

    # -- reachable -----------------------------------------------------------------
    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_executor
    def add(self, a: int, b: int) -> int:
        return a + b

    @apply_executor
    def journal(self, key: str) -> list[str]:
        """What happened under ``key``, in order, in this daemon."""
        return [event for k, event in list(JOURNAL) if k == key]

    @apply_executor
    def imported(self, module: str) -> bool:
        return module in sys.modules

    @apply_executor
    def rss(self) -> int:
        """This process's resident memory in bytes (Linux), else 0."""
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    @apply_executor
    async def hold(self, key: str, seconds: float) -> str:
        """An async call in flight: journals started, then cancelled or done."""
        JOURNAL.append((key, "hold started"))
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            JOURNAL.append((key, "hold cancelled"))
            raise
        JOURNAL.append((key, "hold done"))
        return "held"

    @apply_executor
    def block(self, key: str) -> str:
        """A sync call that keeps the instance's thread until ``release(key)``."""
        JOURNAL.append((key, "block started"))
        _gate(key).wait(60)
        JOURNAL.append((key, "block done"))
        return "released"

    @apply_executor
    def release(self, key: str) -> None:
        _gate(key).set()

    @apply_generator_executor
    async def ticks(self, key: str) -> AsyncIterator[int]:
        """0, 1, 2, ... for ever; journals when its ``finally`` runs."""
        JOURNAL.append((key, "ticks started"))
        try:
            i = 0
            while True:
                yield i
                i += 1
                await anyio.lowlevel.checkpoint()
        finally:
            JOURNAL.append((key, "ticks closed"))

    @apply_generator_executor
    def numbers(self, key: str) -> Iterator[int]:
        """The same as a sync generator (runs in the instance's thread)."""
        JOURNAL.append((key, "numbers started"))
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            JOURNAL.append((key, "numbers closed"))

    @apply_generator_executor
    def big_items(self, size: int) -> Iterator[bytes]:
        """As fast as it can: ``size`` bytes per item; ``produced`` counts them."""
        while True:
            self.produced += 1
            yield bytes(size)

    @apply_executor
    def exit_now(self, code: int) -> None:
        os._exit(code)

    @apply_executor
    def segfault(self) -> None:
        """Crash the process with a real segmentation fault (and no core file)."""
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        ctypes.string_at(0)

    # -- out of reach ------------------------------------------------------------------
    def undecorated(self) -> str:
        JOURNAL.append(("forbidden", "undecorated"))
        return "should never run remotely"

    def _private(self) -> str:
        JOURNAL.append(("forbidden", "_private"))
        return "should never run remotely"
