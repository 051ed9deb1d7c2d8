"""Helpers the conformance tests share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from remote_exec import Executor
from remote_exec.invocations import InvocationInfo


async def listed(executor: Executor, instance: Any, method: str, status: str) -> InvocationInfo:
    """The first invocation of ``method`` in ``status``, once there is one (the
    condition is on the remote side: look often)."""
    with anyio.fail_after(10):
        while True:
            found = await executor.list_invocations(instance=instance, method=method, status=status)
            if found:
                return found[0]
            await anyio.sleep(0.01)


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (within 15 s): it is about another process
    (a file its hooks write), so there is no event to wait on: look often."""
    with anyio.fail_after(15):
        while not condition():  # noqa: ASYNC110 - the condition is remote
            await anyio.sleep(0.02)
