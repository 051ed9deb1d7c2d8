"""What a decorated method may ask about the call it runs in: its id, and
whether it was asked to stop.

Where a method runs (its instance's thread for sync code, its task for async
code) the runtime makes the call's ``InvocationScope`` current. A sync method
cannot be interrupted from outside, so it stops cooperatively: it calls
``check_cancelled()`` between steps, or waits with ``cancellable_sleep()``,
and both raise ``InvocationCancelled`` once the call was asked to stop (its
caller was cancelled, or its connection lost). Async code is cancelled where
it awaits anyway; both functions work there too. Outside a call they do
nothing, or just sleep, so a method runs the same when called locally.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import threading
import time

from .exceptions import InvocationCancelled

__all__ = ["cancellable_sleep", "check_cancelled", "current_invocation_id"]


class InvocationScope:
    """One running call's id and stop request, shared by the runtime and the method."""

    __slots__ = ("_event", "cancelled", "id")

    def __init__(self, invocation_id: str) -> None:
        self.id = invocation_id
        self.cancelled = False
        self._event: threading.Event | None = None  # made only for a cancellable_sleep

    def cancel(self) -> None:
        """Ask the call to stop (from any thread)."""
        self.cancelled = True
        event = self._event
        if event is not None:
            event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as the call is asked to stop."""
        event = self._event
        if event is None:
            event = self._event = threading.Event()
        if self.cancelled:  # asked before the event existed
            return True
        return event.wait(max(seconds, 0.0))

    def error(self) -> InvocationCancelled:
        return InvocationCancelled(f"invocation {self.id} was cancelled")


current: contextvars.ContextVar[InvocationScope | None] = contextvars.ContextVar(
    "remote_exec_invocation", default=None
)

_PREFIX = f"{os.getpid():x}{os.urandom(4).hex()}-"
_counter = itertools.count(1)


def new_invocation_id() -> str:
    """An id unique across processes and machines (a random prefix, then a count)."""
    return f"{_PREFIX}{next(_counter)}"


def current_invocation_id() -> str | None:
    """The id of the call the current code runs in (None outside a call)."""
    scope = current.get()
    return None if scope is None else scope.id


def check_cancelled() -> None:
    """Raise ``InvocationCancelled`` if the current call was asked to stop.

    Call it between the steps of a long sync method: that is where it stops.
    """
    scope = current.get()
    if scope is not None and scope.cancelled:
        raise scope.error()


def cancellable_sleep(seconds: float) -> None:
    """``time.sleep(seconds)`` that raises ``InvocationCancelled`` as soon as
    the current call is asked to stop (a plain sleep outside a call).

    For sync code; async code awaits ``anyio.sleep``, which a cancellation reaches.
    """
    scope = current.get()
    if scope is None:
        time.sleep(seconds)
        return
    if scope.wait(seconds):
        raise scope.error()
