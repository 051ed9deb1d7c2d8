"""The instrument the load check (``benchmarks/load_check.py``) drives inside the daemon.

The daemon imports this module (``--allow-module 'benchmarks.*'``), so it
imports only what the daemon has: the standard library, anyio and remote_exec.

Every remote method takes the call's sequence number ``n`` first and appends it
to the instance's ``log`` as soon as it starts running (a generator when its
first step runs). One ``LoadDevice`` belongs to one load-check client, so at
the end ``state()`` tells exactly which calls ran, how often, and in which
order, whatever the client saw.

With ``record`` (a file path; the load check's ``--restart``), the instance
also appends a line to that file when it is constructed (``init <pid>
<time>``), for every ``n`` it starts (``<n> <time>``) and for every overlap
(``overlap <n>``). The file is opened line-buffered in append mode: each
line is written to the kernel as the call starts, so a daemon killed with
SIGKILL loses none of them, and an instance re-created after a restart (with
the same arguments) appends to the same file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio.lowlevel

from remote_exec import apply_executor, apply_generator_executor

__all__ = ["LoadDevice"]


class LoadDevice:
    """Echoes, 1 MiB buffers, generators and sequence calls, all logged by ``n``."""

    def __init__(self, client: int = 0, record: str | None = None) -> None:
        self.client = client
        # Kept open for the instance's life (closed when it is collected).
        self._record = None
        if record is not None:
            self._record = open(record, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._write(f"init {os.getpid()} {time.time()!r}")
        self.log: list[int] = []  # sequence numbers, in the order the calls started
        self.times: list[float] = []  # when each started (time.time(): same machine)
        self.seen: list[int] = []  # on the calling side: what the seq callback saw
        self._busy = 0  # how many plain calls are running right now
        self.overlaps = 0  # a plain call started while another one ran

    # -- callbacks (run on the calling side, in call order) ---------------------
    def on_seq(self, result: tuple[int, int]) -> None:
        self.seen.append(result[1])

    # -- bookkeeping ---------------------------------------------------------------
    def _write(self, line: str) -> None:
        if self._record is not None:
            self._record.write(line + "\n")  # line-buffered: one write(2) per line

    def _started(self, n: int) -> None:
        now = time.time()
        self.log.append(n)
        self.times.append(now)
        self._write(f"{n} {now!r}")

    def _enter(self, n: int) -> None:
        if self._busy:
            self.overlaps += 1
            self._write(f"overlap {n}")
        self._busy += 1
        self._started(n)

    def _leave(self) -> None:
        self._busy -= 1

    # -- plain calls -----------------------------------------------------------------
    @apply_executor
    def echo(self, n: int, value: Any) -> Any:
        self._enter(n)
        self._leave()
        return value

    @apply_executor
    async def aecho(self, n: int, value: Any) -> Any:
        self._enter(n)
        try:
            await anyio.lowlevel.checkpoint()  # another call could slip in here if order broke
            return value
        finally:
            self._leave()

    @apply_executor
    def echo_bytes(self, n: int, data: bytes) -> tuple[str, bytes]:
        """The SHA-256 of what arrived (checks the upload) and the data itself."""
        self._enter(n)
        try:
            return hashlib.sha256(data).hexdigest(), data
        finally:
            self._leave()

    @apply_executor(callback=on_seq)
    def seq(self, n: int) -> tuple[int, int]:
        """Append ``n``; return (log length, last entry)."""
        self._enter(n)
        self._leave()
        return len(self.log), self.log[-1]

    @apply_executor(callback=on_seq)
    async def aseq(self, n: int) -> tuple[int, int]:
        self._enter(n)
        try:
            await anyio.lowlevel.checkpoint()
            return len(self.log), self.log[-1]
        finally:
            self._leave()

    # -- generators (their steps may interleave with other calls: not "busy") ---------
    @apply_generator_executor
    def stream(self, n: int, k: int) -> Iterator[tuple[int, int]]:
        self._started(n)
        for i in range(k):
            yield n, i

    @apply_generator_executor
    async def astream(self, n: int, k: int) -> AsyncIterator[tuple[int, int]]:
        self._started(n)
        for i in range(k):
            await anyio.lowlevel.checkpoint()
            yield n, i

    # -- read back ----------------------------------------------------------------------
    @apply_executor
    def state(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "log": list(self.log),
            "times": list(self.times),
            "overlaps": self.overlaps,
        }
