"""Context-manager instruments for the lifecycle tests.

Their hooks append a line to a file (``path``): the remote side is another
process (a child, the daemon, a Ray actor), and a file is what both sides
see. Imported by the daemon too (``--allow-module tests.*``): the standard
library, anyio and remote_exec only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Self

import anyio
import anyio.lowlevel

from remote_exec import apply_executor


def lines(path: str | Path) -> list[str]:
    """What the hooks wrote to ``path`` so far, one entry a line."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def _append(path: str, line: str) -> None:
    with open(path, "a") as file:
        file.write(line + "\n")


class Port:
    """A serial-port-like device: opened on enter, closed on exit.

    ``fail``: "enter" or "exit" makes that hook raise.
    """

    _config_props_ = ("baud",)

    def __init__(self, path: str, tag: str, fail: str = "") -> None:
        self.path = path
        self.tag = tag
        self.fail = fail
        self.baud = 9600
        self.is_open = False
        self.hook_thread = 0

    def __enter__(self) -> Self:
        if self.fail == "enter":
            raise OSError(f"{self.tag}: the port is busy")
        self.is_open = True
        self.baud = 115200  # what opening it set: the config read after enter sees it
        self.hook_thread = threading.get_ident()
        _append(self.path, f"enter {self.tag}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.is_open = False
        _append(self.path, f"exit {self.tag}")
        if self.fail == "exit":
            raise RuntimeError(f"{self.tag}: the port is stuck")

    @apply_executor
    def read(self) -> str:
        if not self.is_open:
            raise OSError(f"{self.tag} is not open")
        return f"{self.tag} read"

    @apply_executor
    def threads(self) -> tuple[int, int]:
        """(the thread its enter hook ran in, the thread this method runs in)."""
        return self.hook_thread, threading.get_ident()

    @apply_executor
    async def hold(self, seconds: float) -> str:
        """A call in flight: logs that it started, sleeps, logs that it ended."""
        _append(self.path, f"hold {self.tag}")
        await anyio.sleep(seconds)
        _append(self.path, f"held {self.tag}")
        return "held"


class AsyncPort:
    """An async context manager: entered and exited where its async methods run."""

    def __init__(self, path: str, tag: str) -> None:
        self.path = path
        self.tag = tag
        self.is_open = False
        self.hook_threads: list[int] = []

    async def __aenter__(self) -> Self:
        await anyio.lowlevel.checkpoint()
        self.is_open = True
        self.hook_threads.append(threading.get_ident())
        _append(self.path, f"aenter {self.tag}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await anyio.lowlevel.checkpoint()
        self.is_open = False
        _append(self.path, f"aexit {self.tag} {threading.get_ident() in self.hook_threads}")

    @apply_executor
    async def read(self) -> tuple[bool, bool]:
        """(whether it is open, whether this runs in the thread its enter hook ran in)."""
        await anyio.lowlevel.checkpoint()
        return self.is_open, threading.get_ident() in self.hook_threads
