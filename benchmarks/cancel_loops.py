"""The sync loops ``cancel_latency.py`` cancels by id, importable by the daemon and child processes.

The daemon must be allowed to import this module (``--allow-module
benchmarks.cancel_loops``). Each loop runs until it is cancelled; when it
sees the cancellation it writes ``time.monotonic()`` to ``stopped_at``
(``CLOCK_MONOTONIC`` on Linux: one clock for every process of the machine,
so the client can compare it with its own readings) and re-raises.
"""

from __future__ import annotations

import sys
import time

from remote_exec import InvocationCancelled, apply_executor, cancellable_sleep, check_cancelled

__all__ = ["SLEEP", "Looper"]

SLEEP = 1.0  # seconds per cancellable_sleep() in ``nap``


class Looper:
    """Cooperative sync loops, a call that returns by itself, and a quick call for after them."""

    def __init__(self) -> None:
        self.stopped_at: float | None = None
        self.steps = 0  # iterations of the last loop before it stopped

    @apply_executor
    def spin(self) -> None:
        """``while True: check_cancelled()`` with a tiny bit of work (holds the GIL)."""
        self.stopped_at = None
        steps = total = 0
        try:
            while True:
                check_cancelled()
                total += steps & 0xFF  # the "work"
                steps += 1
        except InvocationCancelled:
            self.stopped_at = time.monotonic()
            self.steps = steps
            raise

    @apply_executor
    def nap(self) -> None:
        """``while True: cancellable_sleep(SLEEP)`` (releases the GIL while it waits)."""
        self.stopped_at = None
        steps = 0
        try:
            while True:
                cancellable_sleep(SLEEP)
                steps += 1
        except InvocationCancelled:
            self.stopped_at = time.monotonic()
            self.steps = steps
            raise

    @apply_executor
    def rest(self, seconds: float) -> None:
        """A call that returns by itself, after ``time.sleep(seconds)`` (the reference)."""
        time.sleep(seconds)

    @apply_executor
    def echo(self, x: object) -> object:
        return x

    @apply_executor
    def set_switch_interval(self, seconds: float) -> float:
        """``sys.setswitchinterval(seconds)`` in the process that runs the loops; the old value."""
        old = sys.getswitchinterval()
        sys.setswitchinterval(seconds)
        return old
