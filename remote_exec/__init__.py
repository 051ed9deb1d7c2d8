"""remote-exec: run methods of ordinary Python objects somewhere else.

The core (this package) is I/O-free: frames, codecs, the registry, the wire
protocol, the error tree and the executor interface. The executors live in
``remote_exec.client`` and the server in ``remote_exec.server``; the public
names are re-exported here.
"""

from __future__ import annotations

from .client import (
    ProcessExecutor as ProcessExecutor,
    ThreadExecutor as ThreadExecutor,
    WebSocketExecutor as WebSocketExecutor,
    apply_executor as apply_executor,
    apply_generator_executor as apply_generator_executor,
)
from .exceptions import RemoteException as RemoteException
from .executor import (
    NO_CALLBACK as NO_CALLBACK,
    Executor as Executor,
    ExecutorContext as ExecutorContext,
    current_executor as current_executor,
)
from .registry import InstanceRegistry as InstanceRegistry, register_coder as register_coder

__all__ = [
    "NO_CALLBACK",
    "Executor",
    "ExecutorContext",
    "InstanceRegistry",
    "ProcessExecutor",
    "RemoteException",
    "ThreadExecutor",
    "WebSocketExecutor",
    "apply_executor",
    "apply_generator_executor",
    "current_executor",
    "register_coder",
]
