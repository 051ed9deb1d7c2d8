"""``InvocationTable``: every invocation one side runs, live and recently finished.

Anyone with access may list them, read one by id (with its captured log) and
cancel one by id. Finished invocations are kept for a retention and up to a
count, then forgotten, so memory stays flat however many calls run.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from itertools import islice
from typing import Any, Protocol

import anyio

from remote_exec.executor import RemoteStream
from remote_exec.invocations import InvocationInfo, InvocationScope, InvocationStatus, LogEntry

__all__ = [
    "DEFAULT_MAX_FINISHED",
    "DEFAULT_RETENTION",
    "InvocationTable",
    "LogFollower",
    "detached_outcome",
    "follow_log",
    "wait_finished",
]

DEFAULT_RETENTION = 300.0
"""Seconds a finished invocation stays readable by id."""
DEFAULT_MAX_FINISHED = 10_000
"""Finished invocations kept at most (the oldest go first)."""


class _Cancellable(Protocol):
    invocation: InvocationScope

    def cancel_by_id(self) -> None: ...


class InvocationTable:
    """Live invocations (with the call that runs each) and finished ones."""

    def __init__(
        self, *, retention: float = DEFAULT_RETENTION, max_finished: int = DEFAULT_MAX_FINISHED
    ) -> None:
        if not retention >= 0 or max_finished < 0:
            raise ValueError("retention and max_finished must not be negative")
        self.retention = retention
        self.max_finished = max_finished
        self._live: dict[str, _Cancellable] = {}
        self._finished: OrderedDict[str, InvocationScope] = OrderedDict()
        self._expiry = -math.inf  # when the oldest finished one expires (prune then)
        # Called (on the loop) with an invocation's record when it is added
        # and when it finishes: the daemon's history and status pages.
        self.observers: list[Callable[[InvocationScope], object]] = []

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

    def add(self, call: _Cancellable) -> bool:
        """Track ``call``; False if its id is taken (by a live or kept invocation)."""
        invocation_id = call.invocation.id
        live = self._live
        if invocation_id in live or invocation_id in self._finished:
            return False
        live[invocation_id] = call
        if self.observers:
            self._observe(call.invocation)
        return True

    def finished(self, call: _Cancellable) -> None:
        """``call`` is over: keep its record for the retention."""
        scope = call.invocation
        key = scope.id
        live = self._live
        if live.get(key) is not call:
            return  # not an invocation of its own (a property read, a server operation)
        del live[key]
        finished = self._finished
        finished[key] = scope
        # Its end is now: no clock read, no look at the oldest, until one may expire.
        if len(finished) > self.max_finished or (scope.ended_at or 0.0) >= self._expiry:
            self._prune()
        if self.observers:
            self._observe(scope)

    def _observe(self, scope: InvocationScope) -> None:
        for observer in list(self.observers):
            observer(scope)

    def live(self) -> list[InvocationScope]:
        """The records of the pending and running invocations, oldest first."""
        return [call.invocation for call in self._live.values()]

    def recent(self, count: int) -> list[InvocationScope]:
        """The records of the ``count`` invocations that finished last, newest first."""
        self._prune()
        finished = self._finished
        return [finished[key] for key in islice(reversed(finished), count)]

    def find(self, invocation_id: str) -> InvocationScope | None:
        """The record of ``invocation_id`` if it is kept here, else None."""
        call = self._live.get(invocation_id)
        return call.invocation if call is not None else self._finished.get(invocation_id)

    def _prune(self) -> None:
        finished = self._finished
        horizon = time.time() - self.retention
        self._expiry = math.inf
        while finished:
            oldest = next(iter(finished.values()))
            if len(finished) <= self.max_finished and (oldest.ended_at or 0.0) >= horizon:
                self._expiry = (oldest.ended_at or 0.0) + self.retention  # when it expires
                break
            finished.popitem(last=False)

    def scope(self, invocation_id: Any) -> InvocationScope:
        """The record of ``invocation_id``.

        Raises:
            LookupError: no such invocation, or it expired.
        """
        self._prune()
        if isinstance(invocation_id, str):
            call = self._live.get(invocation_id)
            if call is not None:
                return call.invocation
            scope = self._finished.get(invocation_id)
            if scope is not None:
                return scope
        raise LookupError(f"no invocation {invocation_id!r} (unknown, or expired)")

    def get(self, invocation_id: Any) -> InvocationInfo:
        """The invocation ``invocation_id``.

        Raises:
            LookupError: no such invocation, or it expired.
        """
        return self.scope(invocation_id).info()

    def list(
        self,
        *,
        instance: str | None = None,
        method: str | None = None,
        status: str | InvocationStatus | None = None,
    ) -> list[InvocationInfo]:
        """Every invocation known here, oldest first, filtered."""
        self._prune()
        wanted = None if status is None else InvocationStatus(status)
        scopes = [call.invocation for call in self._live.values()]
        scopes.extend(self._finished.values())
        scopes.sort(key=lambda scope: scope.requested_at)
        return [
            scope.info()
            for scope in scopes
            if (instance is None or scope.instance == instance)
            and (method is None or scope.method == method)
            and (wanted is None or scope.status is wanted)
        ]

    def cancel(self, invocation_id: Any) -> InvocationInfo:
        """Ask ``invocation_id`` to stop: pending, it never starts; running
        async, it is cancelled; running sync, it stops at its next check.
        Finished: nothing happens. Its info as it is now.

        Raises:
            LookupError: no such invocation, or it expired.
        """
        call = self._live.get(invocation_id) if isinstance(invocation_id, str) else None
        if call is not None:
            call.cancel_by_id()
        return self.get(invocation_id)


async def wait_finished(scope: InvocationScope, call_soon: Callable[..., object]) -> None:
    """Until ``scope`` has finished (``call_soon``: its loop's thread-safe entry point)."""
    done = anyio.Event()
    # The lambda reads ``done`` when it runs: it always sets the current event.
    unwatch = scope.watch(lambda: call_soon(done.set))
    try:
        while not scope.status.finished:
            await done.wait()
            done = anyio.Event()
    finally:
        unwatch()


async def follow_log(
    scope: InvocationScope, call_soon: Callable[..., object]
) -> AsyncGenerator[list[LogEntry], None]:
    """``scope``'s log records, those kept so far then each new batch as it
    comes, until the invocation has finished and its last records were given."""
    wake = anyio.Event()
    # The lambda reads ``wake`` when it runs: it always sets the current event.
    unwatch = scope.watch(lambda: call_soon(wake.set))
    try:
        seen = 0
        while True:
            wake = anyio.Event()  # set by any record, or the end, from now on
            finished = scope.status.finished  # before the read: nothing logged after is missed
            entries, seen = scope.new_entries(seen)
            if entries:
                yield entries
            if finished:
                return
            if seen == scope.logged and not scope.status.finished:
                await wake.wait()
    finally:
        unwatch()


async def detached_outcome(
    table: InvocationTable, invocation_id: Any, call_soon: Callable[..., object]
) -> InvocationScope:
    """The record of the submitted invocation ``invocation_id``, once it has
    finished (its ``value`` or ``failure`` is its outcome).

    Raises:
        LookupError: unknown, expired, or not submitted.
    """
    scope = table.scope(invocation_id)
    if not scope.detached:
        raise LookupError(
            f"invocation {scope.id} was not submitted: its outcome went to its caller"
        )
    await wait_finished(scope, call_soon)
    return scope


class LogFollower(RemoteStream):
    """``follow_log`` one record at a time, as a stream (``Executor.follow_log``)."""

    def __init__(
        self, table: InvocationTable, invocation_id: str, call_soon: Callable[..., object]
    ) -> None:
        self._table = table
        self._id = invocation_id
        self._call_soon = call_soon
        self._batches: AsyncGenerator[list[LogEntry], None] | None = None
        self._pending: list[LogEntry] = []

    async def __anext__(self) -> LogEntry:
        if self._batches is None:
            self._batches = follow_log(self._table.scope(self._id), self._call_soon)
        while not self._pending:
            self._pending = await self._batches.__anext__()
        return self._pending.pop(0)

    async def aclose(self) -> None:
        batches, self._batches = self._batches, None
        if batches is not None:
            await batches.aclose()
