"""``InvocationTable``: every invocation one side runs, live and recently finished.

Anyone with access may list them, read one by id (with its captured log) and
cancel one by id. Finished invocations are kept for a retention and up to a
count, then forgotten, so memory stays flat however many calls run.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Protocol

from remote_exec.invocations import InvocationInfo, InvocationScope, InvocationStatus

__all__ = ["DEFAULT_MAX_FINISHED", "DEFAULT_RETENTION", "InvocationTable"]

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

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

    def add(self, call: _Cancellable) -> None:
        self._live[call.invocation.id] = call

    def finished(self, call: _Cancellable) -> None:
        """``call`` is over: keep its record for the retention."""
        scope = call.invocation
        if self._live.get(scope.id) is not call:
            return  # not an invocation of its own (a property read, a server operation)
        del self._live[scope.id]
        self._finished[scope.id] = scope
        self._prune()

    def _prune(self) -> None:
        finished = self._finished
        horizon = time.time() - self.retention
        while finished:
            oldest = next(iter(finished.values()))
            if len(finished) <= self.max_finished and (oldest.ended_at or 0.0) >= horizon:
                break
            finished.popitem(last=False)

    def _scope(self, invocation_id: Any) -> InvocationScope | None:
        call = self._live.get(invocation_id)
        if call is not None:
            return call.invocation
        return self._finished.get(invocation_id)

    def get(self, invocation_id: Any) -> InvocationInfo:
        """The invocation ``invocation_id``.

        Raises:
            LookupError: no such invocation, or it expired.
        """
        self._prune()
        scope = self._scope(invocation_id) if isinstance(invocation_id, str) else None
        if scope is None:
            raise LookupError(f"no invocation {invocation_id!r} (unknown, or expired)")
        return scope.info()

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
