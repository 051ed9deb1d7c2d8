"""remote-exec: run methods of ordinary Python objects somewhere else.

This package's own modules are the core both sides share: frames, codecs,
the registry, the sans-I/O wire protocol, the error tree and the executor
interface. They open no sockets and start no threads, and importing them
loads neither websockets nor hypercorn. The executors live in
``remote_exec.client``, the daemon in ``remote_exec.server``, and what both
run on (instance workers, sockets, transports, tokens, events) in
``remote_exec.runtime``.

The public names are re-exported here lazily: ``import remote_exec.protocol``
stays light, and the first use of, say, ``remote_exec.ThreadExecutor`` imports
its home module. The top level exports exactly the ``__all__`` of
``remote_exec.exceptions``, ``remote_exec.executor``, ``remote_exec.invocations``,
``remote_exec.registry`` and ``remote_exec.client``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import (
        BlockingExecutor as BlockingExecutor,
        ProcessExecutor as ProcessExecutor,
        RayExecutor as RayExecutor,
        ThreadExecutor as ThreadExecutor,
        WebSocketExecutor as WebSocketExecutor,
        apply_executor as apply_executor,
        apply_generator_executor as apply_generator_executor,
    )
    from .exceptions import (
        CallCancelledError as CallCancelledError,
        CodecError as CodecError,
        ConnectionLostError as ConnectionLostError,
        DeadlineExceeded as DeadlineExceeded,
        DuplicateInstanceError as DuplicateInstanceError,
        ExecutorStateError as ExecutorStateError,
        FrameError as FrameError,
        InvocationCancelled as InvocationCancelled,
        NotAllowedError as NotAllowedError,
        ProtocolError as ProtocolError,
        RegistryError as RegistryError,
        RemoteException as RemoteException,
        RemoteExecConnectionError as RemoteExecConnectionError,
        RemoteExecError as RemoteExecError,
        SubscriberOverflowError as SubscriberOverflowError,
        TokenFileError as TokenFileError,
        TokenRefusedError as TokenRefusedError,
        TooManyCallsError as TooManyCallsError,
        UnknownInstanceError as UnknownInstanceError,
    )
    from .executor import (
        NO_CALLBACK as NO_CALLBACK,
        Executor as Executor,
        ExecutorContext as ExecutorContext,
        Invocation as Invocation,
        PropertyChange as PropertyChange,
        RemoteStream as RemoteStream,
        current_executor as current_executor,
    )
    from .invocations import (
        InvocationInfo as InvocationInfo,
        InvocationStatus as InvocationStatus,
        LogEntry as LogEntry,
        cancellable_sleep as cancellable_sleep,
        check_cancelled as check_cancelled,
        current_invocation_id as current_invocation_id,
    )
    from .registry import InstanceRegistry as InstanceRegistry, register_coder as register_coder

# Each public name and the module it lives in (imported on first use).
_HOMES: dict[str, str] = {
    # remote_exec.client
    "BlockingExecutor": "remote_exec.client",
    "ProcessExecutor": "remote_exec.client",
    "RayExecutor": "remote_exec.client",
    "ThreadExecutor": "remote_exec.client",
    "WebSocketExecutor": "remote_exec.client",
    "apply_executor": "remote_exec.client",
    "apply_generator_executor": "remote_exec.client",
    # remote_exec.exceptions
    "CallCancelledError": "remote_exec.exceptions",
    "CodecError": "remote_exec.exceptions",
    "ConnectionLostError": "remote_exec.exceptions",
    "DeadlineExceeded": "remote_exec.exceptions",
    "DuplicateInstanceError": "remote_exec.exceptions",
    "ExecutorStateError": "remote_exec.exceptions",
    "FrameError": "remote_exec.exceptions",
    "InvocationCancelled": "remote_exec.exceptions",
    "NotAllowedError": "remote_exec.exceptions",
    "ProtocolError": "remote_exec.exceptions",
    "RegistryError": "remote_exec.exceptions",
    "RemoteException": "remote_exec.exceptions",
    "RemoteExecConnectionError": "remote_exec.exceptions",
    "RemoteExecError": "remote_exec.exceptions",
    "SubscriberOverflowError": "remote_exec.exceptions",
    "TokenFileError": "remote_exec.exceptions",
    "TokenRefusedError": "remote_exec.exceptions",
    "TooManyCallsError": "remote_exec.exceptions",
    "UnknownInstanceError": "remote_exec.exceptions",
    # remote_exec.executor
    "NO_CALLBACK": "remote_exec.executor",
    "Executor": "remote_exec.executor",
    "ExecutorContext": "remote_exec.executor",
    "Invocation": "remote_exec.executor",
    "PropertyChange": "remote_exec.executor",
    "RemoteStream": "remote_exec.executor",
    "current_executor": "remote_exec.executor",
    # remote_exec.invocations
    "InvocationInfo": "remote_exec.invocations",
    "InvocationStatus": "remote_exec.invocations",
    "LogEntry": "remote_exec.invocations",
    "cancellable_sleep": "remote_exec.invocations",
    "check_cancelled": "remote_exec.invocations",
    "current_invocation_id": "remote_exec.invocations",
    # remote_exec.registry
    "InstanceRegistry": "remote_exec.registry",
    "register_coder": "remote_exec.registry",
}

__all__ = [
    "NO_CALLBACK",
    "BlockingExecutor",
    "CallCancelledError",
    "CodecError",
    "ConnectionLostError",
    "DeadlineExceeded",
    "DuplicateInstanceError",
    "Executor",
    "ExecutorContext",
    "ExecutorStateError",
    "FrameError",
    "InstanceRegistry",
    "Invocation",
    "InvocationCancelled",
    "InvocationInfo",
    "InvocationStatus",
    "LogEntry",
    "NotAllowedError",
    "ProcessExecutor",
    "PropertyChange",
    "ProtocolError",
    "RayExecutor",
    "RegistryError",
    "RemoteException",
    "RemoteExecConnectionError",
    "RemoteExecError",
    "RemoteStream",
    "SubscriberOverflowError",
    "ThreadExecutor",
    "TokenFileError",
    "TokenRefusedError",
    "TooManyCallsError",
    "UnknownInstanceError",
    "WebSocketExecutor",
    "apply_executor",
    "apply_generator_executor",
    "cancellable_sleep",
    "check_cancelled",
    "current_executor",
    "current_invocation_id",
    "register_coder",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if not TYPE_CHECKING:  # type checkers see the imports above, and flag unknown names

    def __getattr__(name: str) -> Any:
        """Import a public name's home module on first use (PEP 562)."""
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value  # later lookups skip this function
        return value
