"""The whole error tree of remote-exec.

::

    RemoteExecError
    ├── ExecutorStateError (also RuntimeError)   executor used before start / after stop
    ├── RemoteExecConnectionError (also ConnectionError)
    │   ├── ConnectionLostError                  the peer went away mid-call
    │   └── TokenRefusedError (also PermissionError)  token missing/wrong, Origin refused
    ├── TokenFileError (also PermissionError)    token file empty, not private, not a file
    ├── ProtocolError                            a peer broke the wire protocol
    │   ├── FrameError                           bad header, lengths or size cap
    │   └── CodecError                           body could not be encoded/decoded
    ├── RegistryError
    │   ├── UnknownInstanceError (also KeyError) the object/name is not held
    │   ├── DuplicateInstanceError (also ValueError)
    │   └── NotAllowedError (also PermissionError)  off the allow-list, private name
    ├── TooManyCallsError                        per-connection in-flight cap reached
    ├── CallCancelledError                       the reply to a call its client cancelled
    ├── InvocationCancelled                      a running method was asked to stop
    │   └── DeadlineExceeded (also TimeoutError) its deadline passed, queued or running
    ├── SubscriberOverflowError                  an event subscriber fell behind
    └── RemoteException                          raised by the remote code itself

``RemoteException`` is the public name fixed by the contract. When the remote type
is a builtin exception, the raised object is an instance of a class that derives
from both ``RemoteException`` and the builtin, so ``except ValueError`` works
across the wire.

Every class here is also exported by the top-level ``remote_exec`` package.
"""

from __future__ import annotations

import builtins
import re
import traceback
from typing import Any

__all__ = [
    "CallCancelledError",
    "CodecError",
    "ConnectionLostError",
    "DeadlineExceeded",
    "DuplicateInstanceError",
    "ExecutorStateError",
    "FrameError",
    "InvocationCancelled",
    "NotAllowedError",
    "ProtocolError",
    "RegistryError",
    "RemoteException",
    "RemoteExecConnectionError",
    "RemoteExecError",
    "SubscriberOverflowError",
    "TokenFileError",
    "TokenRefusedError",
    "TooManyCallsError",
    "UnknownInstanceError",
]


class RemoteExecError(Exception):
    """Root of every error remote-exec raises itself."""


class ExecutorStateError(RemoteExecError, RuntimeError):
    """An executor was used before it was started or after it was stopped."""


class RemoteExecConnectionError(RemoteExecError, ConnectionError):
    """The transport to the remote side could not be opened or was lost."""


class ConnectionLostError(RemoteExecConnectionError):
    """The connection went away while calls or streams were waiting on it."""


class TokenRefusedError(RemoteExecConnectionError, PermissionError):
    """The server refused the connection: the token is missing or wrong, or the
    ``Origin`` is not allowed."""


class TokenFileError(RemoteExecError, PermissionError):
    """A token file is missing, empty, or readable by other users."""


class ProtocolError(RemoteExecError):
    """The peer sent something the wire protocol does not allow."""


class FrameError(ProtocolError):
    """A frame header or its lengths are invalid, or it exceeds the size cap."""


class CodecError(ProtocolError):
    """A body could not be encoded or decoded (unknown tag, depth, type...)."""


class RegistryError(RemoteExecError):
    """A problem with named instances, classes or coders."""


class UnknownInstanceError(RegistryError, KeyError):
    """The object or name is not held by the registry of this executor."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateInstanceError(RegistryError, ValueError):
    """An instance name (or object) is already registered."""


class NotAllowedError(RegistryError, PermissionError):
    """The request touches a module, class or name the server does not allow."""


class TooManyCallsError(RemoteExecError):
    """The connection already has as many calls in flight as the server allows."""


class CallCancelledError(RemoteExecError):
    """The client cancelled the call before it finished (the reply frees its id)."""


class InvocationCancelled(RemoteExecError):
    """The invocation was asked to stop (``check_cancelled`` and
    ``cancellable_sleep`` raise it in the method's code).

    An ``Exception``, not a ``BaseException``: a method's cleanup code may
    catch it like any other error.
    """


class DeadlineExceeded(InvocationCancelled, TimeoutError):
    """A call's deadline (its method's ``timeout=``, or its caller's own)
    passed: it never started (``where == "queued"``), or it was stopped while
    it ran (``"running"``). What ``check_cancelled()`` raises then, so a
    method's ``except InvocationCancelled`` sees it too."""

    @property
    def where(self) -> str:
        """``"queued"`` or ``"running"`` (read from the message, which travels)."""
        return "queued" if "while queued" in str(self) else "running"


class SubscriberOverflowError(RemoteExecError):
    """An event subscriber fell too far behind and was dropped."""


class RemoteException(RemoteExecError):
    """An exception raised by the remote code.

    Attributes:
        remote_type: the qualified name of the remote exception type.
        remote_traceback: the remote traceback, formatted as text.
    """

    remote_type: str
    remote_traceback: str

    def __init__(self, message: str = "", remote_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


_remote_builtin_classes: dict[type[BaseException], type[RemoteException]] = {}

# Errors of our own that travel back as themselves (they are "builtin" to us).
_OWN_ERRORS: dict[str, type[RemoteExecError]] = {
    cls.__name__: cls
    for cls in (
        ConnectionLostError,
        UnknownInstanceError,
        DuplicateInstanceError,
        NotAllowedError,
        TooManyCallsError,
        CallCancelledError,
        InvocationCancelled,
        DeadlineExceeded,
        SubscriberOverflowError,
        CodecError,
        ProtocolError,
        ExecutorStateError,
    )
}


def _class_for(remote_type: str) -> type[RemoteException]:
    """The class a remote error of type ``remote_type`` arrives as."""
    short = remote_type.rsplit(".", 1)[-1]
    base: type[BaseException] | None = None
    if remote_type.startswith("remote_exec.") and short in _OWN_ERRORS:
        base = _OWN_ERRORS[short]
    elif "." not in remote_type or remote_type.startswith("builtins."):
        candidate = getattr(builtins, short, None)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, Exception)
            and not issubclass(candidate, (StopIteration, StopAsyncIteration))
        ):
            base = candidate
    if base is None:
        return RemoteException
    cls = _remote_builtin_classes.get(base)
    if cls is None:
        # A class deriving from both: ``except ValueError`` keeps working.
        cls = type(f"Remote{base.__name__}", (RemoteException, base), {"__module__": __name__})
        try:
            cls.__new__(cls)  # remote_exception() builds it this way
        except Exception:  # noqa: BLE001 - e.g. ExceptionGroup, MemoryError: their __new__ refuses
            cls = RemoteException
        _remote_builtin_classes[base] = cls
    return cls


def remote_exception(remote_type: str, message: str, remote_traceback: str) -> RemoteException:
    """Build the exception a caller sees for an error raised on the remote side."""
    cls = _class_for(remote_type)
    exc: Any = cls.__new__(cls)
    # Initialise both bases; builtins such as KeyError/OSError take plain args.
    Exception.__init__(exc, message)
    exc.remote_type = remote_type
    exc.remote_traceback = remote_traceback
    if remote_traceback:
        exc.add_note(f"Remote traceback ({remote_type}):\n{remote_traceback.rstrip()}")
    result: RemoteException = exc
    return result


def exception_type_name(exc: BaseException) -> str:
    """The qualified type name sent over the wire for ``exc``."""
    cls = type(exc)
    if isinstance(exc, RemoteException) and exc.remote_type:
        return exc.remote_type
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module.startswith("remote_exec"):
        return f"remote_exec.{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


# A frame's "File" line, also inside an exception group's "|" margin.
_FILE_LINE = re.compile(r'^([ |]*File ")(.*)(", line \d+)', re.MULTILINE)
_SEPARATORS = re.compile(r"[\\/]")


def client_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as a server sends it to its client.

    Every frame, line number, function and source line is kept, but no file
    is named by its path on the server, which would tell every client the
    server's install layout and user names: a module's file is named from
    its package down (``mylab/stage.py``, ``anyio/_core/_tasks.py``), any
    other file by its base name (``script.py``); ``<string>``-like names stay.
    The server logs the full traceback. A remote error kept without its
    frames (``remote_exception``) gives the traceback it arrived with.
    """
    if isinstance(exc, RemoteException) and exc.__traceback__ is None and exc.remote_traceback:
        return exc.remote_traceback
    modules = _frame_modules(exc)
    text = "".join(traceback.format_exception(exc))
    return _FILE_LINE.sub(
        lambda match: match[1] + _client_file_name(match[2], modules.get(match[2])) + match[3],
        text,
    )


def _frame_modules(exc: BaseException) -> dict[str, str]:
    """The module (``__name__``) each file of ``exc``'s tracebacks belongs to,
    over its whole chain (causes, contexts and groups)."""
    modules: dict[str, str] = {}
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        for frame, _ in traceback.walk_tb(error.__traceback__):
            name = frame.f_globals.get("__name__")
            if isinstance(name, str):
                modules.setdefault(frame.f_code.co_filename, name)
        pending += (error.__cause__, error.__context__)
        if isinstance(error, BaseExceptionGroup):
            pending += error.exceptions
    return modules


def _client_file_name(filename: str, module: str | None) -> str:
    """``filename`` without the directories above its module's top package."""
    if filename.startswith("<") and filename.endswith(">"):
        return filename  # <string>, <frozen importlib._bootstrap>: no path
    base = _SEPARATORS.split(filename)[-1] or "<unknown>"
    if module and all(part.isidentifier() for part in module.split(".")):
        parts = module.split(".")
        stem = base.split(".", 1)[0]
        if stem == "__init__":  # a package
            return "/".join([*parts, base])
        if stem == parts[-1]:
            return "/".join([*parts[:-1], base])
    return base
