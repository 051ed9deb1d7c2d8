"""The client side: decorators, contexts and executors."""

from __future__ import annotations

from remote_exec.executor import (
    NO_CALLBACK as NO_CALLBACK,
    ExecutorContext as ExecutorContext,
    current_executor as current_executor,
)

from .blocking import BlockingExecutor as BlockingExecutor
from .decorators import (
    apply_executor as apply_executor,
    apply_generator_executor as apply_generator_executor,
)
from .process import ProcessExecutor as ProcessExecutor
from .ray import RayExecutor as RayExecutor
from .thread import ThreadExecutor as ThreadExecutor
from .websocket import WebSocketExecutor as WebSocketExecutor

__all__ = [
    "NO_CALLBACK",
    "BlockingExecutor",
    "ExecutorContext",
    "ProcessExecutor",
    "RayExecutor",
    "ThreadExecutor",
    "WebSocketExecutor",
    "apply_executor",
    "apply_generator_executor",
    "current_executor",
]
