"""A device for the reconnect tests: it writes what it does to a file, so that
a test sees every construction and every call across daemon restarts."""

from __future__ import annotations

import os

from remote_exec import apply_executor, cancellable_sleep


def _append(path: str, line: str) -> None:
    with open(path, "a") as file:
        file.write(line + "\n")


class Counter:
    _config_props_ = ("gain",)

    def __init__(self, path: str) -> None:
        self.path = path
        self.gain = 1
        _append(path, "init")

    @apply_executor
    def bump(self, n: int) -> int:
        _append(self.path, f"bump {n}")
        return self.gain

    @apply_executor
    def hold(self, gate: str) -> str:
        _append(self.path, "hold")
        while not os.path.exists(gate):
            cancellable_sleep(0.01)
        return "released"
