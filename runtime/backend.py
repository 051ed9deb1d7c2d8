"""Which async library runs the current task: the one module that asks.

anyio runs on asyncio or trio, and a few places must know which: a worker
thread starts the same backend, the process child is told its backend, the
daemon picks hypercorn's worker, the lean asyncio socket path applies to
asyncio only, and results come back to the loop through its own thread-safe
entry point. They all ask here, so the choice is made (and checked) once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import sniffio
import trio

__all__ = ["BACKENDS", "current_backend", "is_trio", "threadsafe_call_soon"]

BACKENDS: Final = ("asyncio", "trio")
"""The async libraries anyio (and so remote-exec) runs on."""


def current_backend() -> str:
    """``"asyncio"`` or ``"trio"``: the async library running the current task.

    Raises:
        RuntimeError: no async library runs this code, or one anyio does not support.
    """
    try:
        backend = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise RuntimeError("this must be called from inside an asyncio or trio task") from None
    if backend not in BACKENDS:
        raise RuntimeError(f"unsupported async library {backend!r}: use asyncio or trio")
    return backend


def is_trio() -> bool:
    """Whether trio (rather than asyncio) runs the current task."""
    return current_backend() == "trio"


def threadsafe_call_soon() -> Callable[..., object]:
    """The running loop's thread-safe, FIFO, non-blocking entry point:
    ``call_soon(fn, *args)`` from any thread runs ``fn(*args)`` on this loop.

    trio: ``TrioToken.run_sync_soon``; asyncio: ``loop.call_soon_threadsafe``.
    """
    if is_trio():
        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe
