"""Classes for the Ray tests; imported by the test process and by the actors.

State the tests read back lives in files (a path given by the test), so that
it survives the actor's process, and one actor can see what another wrote.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio

from remote_exec import apply_executor


def _wait_for(path: Path, seconds: float) -> bool:
    """Whether ``path`` appeared within ``seconds`` (the device polls a
    file, as an instrument polls its hardware)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Journal:
    """Appends each call (and its construction) to a file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.note(f"init {os.getpid()}")  # the test's own objects note theirs too

    def note(self, entry: str) -> None:
        with self.path.open("a") as file:
            file.write(entry + "\n")

    @apply_executor
    def append(self, entry: str) -> int:
        self.note(entry)
        return os.getpid()

    @apply_executor
    def append_then_block(self, entry: str, gate: str) -> str:
        """Appends, then waits (up to a minute) for ``gate`` to exist."""
        self.note(entry)
        _wait_for(Path(gate), 60)
        return entry

    @apply_executor
    def pid(self) -> int:
        return os.getpid()

    @apply_executor
    def resources(self) -> dict[str, Any]:
        """The Ray resources this instance's actor holds."""
        import ray

        return dict(ray.get_runtime_context().get_assigned_resources())

    @apply_executor
    def meet(self, mine: str, theirs: str) -> bool:
        """Marks ``mine``, then waits for ``theirs``: only concurrent calls meet."""
        Path(mine).touch()
        return _wait_for(Path(theirs), 20)

    @apply_executor
    async def hold(self, gate: str) -> str:
        """Async: waits for ``gate`` (cancelled where it awaits)."""
        self.note("hold started")
        try:
            while not await anyio.Path(gate).exists():  # noqa: ASYNC110 - another process's file
                await anyio.sleep(0.01)
        finally:
            self.note("hold ended")
        return "released"

    @apply_executor
    def entries(self) -> list[str]:
        return self.path.read_text().splitlines()


class Camera(Journal):
    """Placed by its class default on the node with the ``camera0`` resource."""

    _ray_options_ = {"resources": {"camera0": 1}}
