"""A pretend lab instrument, as a daemon would host it.

Nothing in this class knows about executors: the decorators send its methods
to whatever executor is active (``ExecutorContext``), or run them locally.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel

from remote_exec import apply_executor, apply_generator_executor

__all__ = ["Instrument"]


class Instrument:
    """An oscilloscope-like device with a gain and a few channels."""

    _config_props_ = ("name", "gain")  # copied to the remote twin when it is made

    def __init__(self, name: str = "scope", gain: float = 1.0) -> None:
        self.name = name
        self.gain = gain
        self.readings: list[float] = []

    def on_reading(self, value: float) -> None:
        """Callback: runs on the calling side, with each result of ``read``."""
        self.readings.append(value)

    @apply_executor(callback=on_reading)
    def read(self, channel: int) -> float:
        """A blocking read of one channel (sync: runs in the instance's thread)."""
        if not 0 <= channel < 4:
            raise ValueError(f"no channel {channel} on {self.name} (it has 0 to 3)")
        return round(self.gain * math.sin(channel + 1), 6)

    @apply_executor
    async def acquire(self, samples: int) -> bytes:
        """An async acquisition: returns raw bytes (sent out of band, no base64)."""
        await anyio.sleep(0.01)  # waiting for the hardware
        return bytes(i % 256 for i in range(samples))

    @apply_executor
    def where(self) -> str:
        """Which process runs this method."""
        return f"process {os.getpid()}"

    @apply_executor
    def set_gain(self, gain: float) -> float:
        if gain <= 0:
            raise ValueError(f"gain must be positive, not {gain}")
        self.gain = gain
        return gain

    @apply_generator_executor
    async def sweep(self, steps: int) -> AsyncIterator[tuple[int, float]]:
        """Stream a sweep of (step, value) points, one at a time (with back-pressure)."""
        for step in range(steps):
            await anyio.lowlevel.checkpoint()
            yield step, round(self.gain * step / max(steps - 1, 1), 3)
