"""The object the remote-exec subjects call, importable by the daemon and child processes.

``Echo`` is decorated with remote-exec's own decorators, so it needs
``remote_exec`` to import; while remote-exec's public API is still being
written, ``IMPORT_ERROR`` says why it is missing and the remote-exec subjects
report "not available" instead of failing. The daemon must be allowed to
import this module (``--allow-module benchmarks.workloads``).
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["IMPORT_ERROR", "Echo"]

try:
    from remote_exec import apply_executor, apply_generator_executor
except ImportError as exc:
    IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None

    class Echo:
        """Sync methods, like the peers' (Pyro5, RPyC and pymoa-remote run sync code)."""

        @apply_executor
        def echo(self, x: object) -> object:
            return x

        @apply_executor(blocking=False)
        def echo_nonblocking(self, x: object) -> object:
            """``echo`` declared non-blocking: a server runs it on its event loop."""
            return x

        @apply_generator_executor
        def stream(self, n: int) -> Iterator[int]:
            yield from range(n)
