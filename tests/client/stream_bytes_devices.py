"""A device for the stream byte-window tests: a generator of large items that
counts how far it got, readable between its steps."""

from __future__ import annotations

from collections.abc import Iterator

from remote_exec import apply_executor, apply_generator_executor


class Producer:
    def __init__(self) -> None:
        self.produced = 0

    @apply_generator_executor
    def blobs(self, n: int, size: int) -> Iterator[bytes]:
        for i in range(n):
            self.produced = i + 1
            yield bytes([i % 256]) * size

    @apply_generator_executor
    def ints(self, n: int) -> Iterator[int]:
        yield from range(n)

    @apply_executor
    def count(self) -> int:
        return self.produced
