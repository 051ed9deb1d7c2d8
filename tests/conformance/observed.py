"""A stage whose attributes the observation tests watch (``test_observe``).

Imported by the test process and, for the remote executors, by the child
process, the daemon or the Ray actor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from remote_exec import apply_executor, apply_generator_executor


class Stage:
    """``position`` is a property that counts its reads (``reads()``), so a
    test can tell when nobody reads it any more; ``temperature`` raises while
    the sensor is off."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self._position = 0
        self.label = "idle"
        self.sensor_off = False
        self.position_reads = 0
        self.gadget: object = None

    @property
    def position(self) -> int:
        self.position_reads += 1
        return self._position

    @property
    def temperature(self) -> float:
        if self.sensor_off:
            raise RuntimeError("sensor off")
        return 20.5

    @apply_executor
    def move(self, position: int) -> int:
        self._position = position
        return position

    @apply_executor(blocking=False)
    def nudge(self, position: int) -> None:  # runs on a server's loop
        self._position = position

    @apply_executor
    async def amove(self, position: int) -> None:
        self._position = position

    @apply_executor
    def set_label(self, label: str) -> None:
        self.label = label

    @apply_executor
    def go(self, position: int, label: str) -> None:
        self._position, self.label = position, label

    @apply_executor
    def switch_sensor(self, off: bool) -> None:
        self.sensor_off = off

    @apply_executor
    def attach_gadget(self) -> None:
        self.gadget = object()  # no codec can send it

    @apply_executor
    def reads(self) -> int:
        return self.position_reads

    @apply_generator_executor
    def sweep(self, positions: list[int]) -> Iterator[int]:
        for position in positions:
            self._position = position
            yield position

    @apply_generator_executor
    async def asweep(self, positions: list[int]) -> AsyncIterator[int]:
        for position in positions:
            self._position = position
            yield position

    @apply_generator_executor
    def count(self, n: int) -> Iterator[None]:
        """``n`` items, the position moving to 0, 1, ... n - 1 with each."""
        for position in range(n):
            self._position = position
            yield None
