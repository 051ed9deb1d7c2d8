"""An instrument the process-executor limit test creates in the child."""

from __future__ import annotations

from remote_exec import apply_executor


class Big:
    @apply_executor
    def make(self, size: int) -> bytes:
        return bytes(size)
