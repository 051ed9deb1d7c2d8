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
import enum
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import DeadlineExceeded, InvocationCancelled

__all__ = [
    "InvocationInfo",
    "InvocationStatus",
    "LogEntry",
    "cancellable_sleep",
    "check_cancelled",
    "current_invocation_id",
]

DEFAULT_MAX_LOG = 1000
"""Log records kept per invocation (the newest)."""
YIELD_EVERY = 0.001
"""Seconds between two GIL releases by ``check_cancelled()`` (see ``InvocationScope.check``)."""
# Records arrive in the method's thread and are read on the loop; a record and
# the count of records go together (rare: only while something logs).
_LOG_LOCK = threading.Lock()


class InvocationStatus(enum.StrEnum):
    """Where an invocation stands; it only moves forward (``FORWARD``)."""

    PENDING = "pending"  # queued
    RUNNING = "running"
    COMPLETED = "completed"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {InvocationStatus.COMPLETED, InvocationStatus.ERROR, InvocationStatus.CANCELLED}
)
FORWARD: dict[InvocationStatus, frozenset[InvocationStatus]] = {
    InvocationStatus.PENDING: frozenset({InvocationStatus.RUNNING, *_FINISHED}),
    InvocationStatus.RUNNING: _FINISHED,
    InvocationStatus.COMPLETED: frozenset(),
    InvocationStatus.ERROR: frozenset(),
    InvocationStatus.CANCELLED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One record the method's code logged while it ran (INFO and above)."""

    time: float  # time.time() where it ran
    level: str  # "INFO", "WARNING", ...
    logger: str
    message: str

    def to_wire(self) -> list[Any]:
        return [self.time, self.level, self.logger, self.message]

    @classmethod
    def from_wire(cls, row: Sequence[Any]) -> LogEntry:
        time_, level, logger, message = row
        return cls(float(time_), str(level), str(logger), str(message))


@dataclass(frozen=True, slots=True)
class InvocationInfo:
    """What the side that runs an invocation knows of it.

    Times are that side's ``time.time()``, None until reached; ``error`` is
    ``"TypeName: message"`` once it failed or was cancelled.
    """

    id: str
    instance: str
    method: str
    status: InvocationStatus
    requested_at: float
    started_at: float | None
    ended_at: float | None
    error: str | None
    log: tuple[LogEntry, ...]

    def to_wire(self) -> dict[str, Any]:
        """Plain values for a message or JSON (the log as lists)."""
        return {
            "id": self.id,
            "instance": self.instance,
            "method": self.method,
            "status": self.status.value,
            "requested_at": self.requested_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error,
            "log": [entry.to_wire() for entry in self.log],
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> InvocationInfo:
        log: Sequence[Sequence[Any]] = data.get("log") or ()
        return cls(
            id=str(data["id"]),
            instance=str(data["instance"]),
            method=str(data["method"]),
            status=InvocationStatus(data["status"]),
            requested_at=float(data["requested_at"]),
            started_at=data.get("started_at"),
            ended_at=data.get("ended_at"),
            error=data.get("error"),
            log=tuple(LogEntry.from_wire(row) for row in log),
        )


class InvocationScope:
    """One invocation as the side that runs it keeps it: its id and stop
    request (which the method's own code checks), and its status, times,
    error and captured log (which anyone may read by id)."""

    __slots__ = (
        "_event",
        "_watchers",
        "_yielded",
        "by_id",
        "cancelled",
        "deadline",
        "detached",
        "ended_at",
        "error",
        "failure",
        "id",
        "instance",
        "log",
        "logged",
        "method",
        "requested_at",
        "started_at",
        "status",
        "value",
    )

    def __init__(self, invocation_id: str, instance: str = "", method: str = "") -> None:
        self.id = invocation_id
        self.instance = instance
        self.method = method
        self.cancelled = False
        self.by_id = False  # cancelled by id (not by its caller)
        self.deadline: float | None = None  # time.monotonic() it must end by
        self._event: threading.Event | None = None  # made only for a cancellable_sleep
        self.status = InvocationStatus.PENDING
        self.requested_at = time.time()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.error: str | None = None
        self.log: deque[LogEntry] | None = None  # made at the first record
        self.logged = 0  # records ever added (the log keeps the newest)
        self._watchers: list[Callable[[], object]] | None = None
        self._yielded = 0.0  # when ``check`` last let other threads run
        # A detached invocation keeps its outcome for whoever asks by id.
        self.detached = False
        self.value: Any = None
        self.failure: BaseException | None = None

    def start(self) -> None:
        if self.status is InvocationStatus.PENDING:
            self.status = InvocationStatus.RUNNING
            self.started_at = time.time()
            if self._watchers:  # a status page shows it running
                self._notify()

    def finish(self, error: BaseException | None = None, *, cancelled: bool = False) -> None:
        """The outcome: completed, or error / cancelled with ``error``. Only once."""
        if self.ended_at is not None:  # set here only: it has finished
            return
        self.ended_at = time.time()
        if error is None and not cancelled:
            self.status = InvocationStatus.COMPLETED
        else:
            # DeadlineExceeded is an InvocationCancelled too.
            cancelled = cancelled or isinstance(error, InvocationCancelled)
            self.status = InvocationStatus.CANCELLED if cancelled else InvocationStatus.ERROR
            if error is not None:
                self.error = f"{type(error).__name__}: {error}"
        if self._watchers:
            self._notify()

    def add_log(self, entry: LogEntry, limit: int = DEFAULT_MAX_LOG) -> None:
        """Keep a record (from the thread or task the method runs in)."""
        with _LOG_LOCK:
            log = self.log
            if log is None:
                log = self.log = deque(maxlen=limit)
            log.append(entry)
            self.logged += 1
        self._notify()

    def new_entries(self, seen: int) -> tuple[list[LogEntry], int]:
        """The records added since ``seen`` were (those the bound kept), and the new count."""
        with _LOG_LOCK:
            logged, log = self.logged, self.log
            if log is None or logged == seen:
                return [], logged
            entries = list(log)
        return entries[max(len(entries) - (logged - seen), 0) :], logged

    def watch(self, wake: Callable[[], object]) -> Callable[[], None]:
        """Call ``wake()`` (from any thread) when it starts, at each new record
        and at the end; returns what stops it."""
        watchers = self._watchers
        if watchers is None:
            watchers = self._watchers = []
        watchers.append(wake)
        return lambda: watchers.remove(wake) if wake in watchers else None

    def _notify(self) -> None:
        watchers = self._watchers
        if watchers:
            for wake in list(watchers):
                wake()

    def info(self) -> InvocationInfo:
        return InvocationInfo(
            self.id,
            self.instance,
            self.method,
            self.status,
            self.requested_at,
            self.started_at,
            self.ended_at,
            self.error,
            self._log_copy(),
        )

    def _log_copy(self) -> tuple[LogEntry, ...]:
        if not self.log:
            return ()
        with _LOG_LOCK:
            return tuple(self.log)

    def cancel(self, *, by_id: bool = False) -> None:
        """Ask the call to stop (from any thread)."""
        if by_id and not self.cancelled:
            self.by_id = True
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

    def cancelled_error(self) -> InvocationCancelled:
        return InvocationCancelled(f"invocation {self.id} was cancelled")

    def expired(self) -> bool:
        deadline = self.deadline
        return deadline is not None and time.monotonic() >= deadline

    def deadline_error(self, where: str) -> DeadlineExceeded:
        """``where``: "queued" (it never started) or "running"."""
        return DeadlineExceeded(f"invocation {self.id} passed its deadline while {where}")

    def check(self) -> None:
        """Raise if asked to stop or past the deadline (``check_cancelled``).

        A sync loop that only checks holds the GIL, and the thread that would
        deliver a cancel waits up to the switch interval (5 ms) to run: every
        millisecond, the check lets it (``time.sleep(0)``).
        """
        now = time.monotonic()
        if now - self._yielded >= YIELD_EVERY:
            self._yielded = now
            time.sleep(0)
        if self.cancelled:
            raise self.cancelled_error()
        if self.deadline is not None and now >= self.deadline:
            raise self.deadline_error("running")


current: contextvars.ContextVar[InvocationScope | None] = contextvars.ContextVar(
    "remote_exec_invocation", default=None
)


def new_session() -> str:
    """A caller's random prefix for the ids of its invocations.

    An invocation's id is ``f"{session}-{n}"``: the caller's session (one per
    connection, or per ThreadExecutor) and the call's stream id on it, so the
    caller knows each id before the call is sent, without sending it.
    """
    return os.urandom(8).hex()


def make_invocation_id(session: str, sid: int) -> str:
    return f"{session}-{sid}"


def current_invocation_id() -> str | None:
    """The id of the call the current code runs in (None outside a call)."""
    scope = current.get()
    return None if scope is None else scope.id


def check_cancelled() -> None:
    """Raise ``InvocationCancelled`` if the current call was asked to stop,
    or ``DeadlineExceeded`` once its deadline passed.

    Call it between the steps of a long sync method: that is where it stops.
    """
    scope = current.get()
    if scope is not None:
        scope.check()


def cancellable_sleep(seconds: float) -> None:
    """``time.sleep(seconds)`` that raises ``InvocationCancelled`` as soon as
    the current call is asked to stop (a plain sleep outside a call).

    For sync code; async code awaits ``anyio.sleep``, which a cancellation reaches.
    """
    scope = current.get()
    if scope is None:
        time.sleep(seconds)
        return
    deadline = scope.deadline
    if deadline is not None:
        seconds = min(seconds, deadline - time.monotonic())
    scope.wait(seconds)
    scope.check()
