"""``DetachedPeer``: the peer of submitted (detached) invocations.

A detached call belongs to no connection: losing the connection that sent it,
or cancelling the task that submitted it, does not stop it. Its outcome stays
on its invocation record (``InvocationScope.value`` / ``.failure``) until the
record expires, for whoever asks for it by id.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from anyio.abc import TaskGroup

from remote_exec.exceptions import ExecutorStateError, exception_type_name
from remote_exec.invocations import InvocationScope

from .calls import Runner, RuntimeCall, StreamCall, runner_in
from .instances import Instance

__all__ = ["DetachedPeer"]

logger = logging.getLogger("remote_exec.runtime")


class DetachedPeer:
    """Runs calls for nobody in particular and keeps their outcomes.

    Args:
        call_soon: the loop's thread-safe entry point (worker threads use it).
        keep_error: what of a failure is kept (a server keeps a copy without
            the live traceback, whose frames may hold large arguments).
    """

    session = "detached"  # never used: every detached call gets its sender's id

    def __init__(
        self,
        call_soon: Callable[..., object],
        keep_error: Callable[[BaseException], BaseException] = lambda exc: exc,
    ) -> None:
        self.call_soon = call_soon
        self.keep_error = keep_error
        self.alive = True
        self.calls: dict[int, RuntimeCall] = {}
        self.runners: dict[Instance, Runner] = {}
        self.tg: TaskGroup | None = None  # where async methods run (a server's)
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def _scope(self, sid: int) -> InvocationScope | None:
        call = self.calls.get(sid)
        return None if call is None else call.invocation

    # -- the Peer interface ----------------------------------------------------
    def reply(self, sid: int, value: Any) -> None:
        scope = self._scope(sid)
        if scope is not None:
            scope.value = value

    def fail(self, sid: int, exc: BaseException) -> None:
        scope = self._scope(sid)
        if scope is not None:
            logger.debug(
                "detached invocation %s failed with %s",
                scope.id,
                exception_type_name(exc),
                exc_info=exc,
            )
            scope.failure = self.keep_error(exc)

    def send_items(self, sid: int, items: list[Any]) -> None:
        raise TypeError("a generator cannot be submitted")  # refused before it runs

    def end_stream(self, sid: int) -> None:
        pass

    def credit(self, sid: int) -> int:
        return 0

    def schedule_flush(self, stream: StreamCall) -> None:
        stream.flush()

    def forget(self, call: RuntimeCall) -> None:
        if self.calls.get(call.sid) is call:
            del self.calls[call.sid]

    def runner_for(self, instance: Instance) -> Runner:
        if self.tg is None:
            raise ExecutorStateError("detached async calls are not hosted here")
        return runner_in(self.runners, instance, self.tg)

    def stop(self) -> None:
        """The side is shutting down: nothing more runs for this peer."""
        self.alive = False
        for runner in list(self.runners.values()):
            runner.stop()
