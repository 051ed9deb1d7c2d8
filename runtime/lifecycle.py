"""Instance lifecycles: the context-manager protocol as open and close hooks.

A held object whose class is a context manager is entered right after it is
built, where it lives, and exited exactly once when it goes away (deleted,
its scope ended, or its side shutting down). ``InstanceRuntime`` is the only
user: the hooks are the same on every executor.

Where they run:

* ``__enter__``/``__exit__`` (sync): in the instance's own thread, like its
  sync methods;
* ``__aenter__``/``__aexit__`` (async): where its async methods run, i.e. in
  the instance's thread's loop when it has one (ThreadExecutor), else on the
  server's event loop.

A class with both protocols is used as an async one (the protocol of an
async framework). Both are looked up on the class, as ``with`` does.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from remote_exec.exceptions import exception_type_name
from remote_exec.executor import SCOPES, running_in_place

__all__ = ["SCOPES", "Hooks", "Lifecycle", "describe_error", "lifecycle_of"]


class Lifecycle(Enum):
    """Which hooks a held object has."""

    SYNC = "sync"  # __enter__ / __exit__
    ASYNC = "async"  # __aenter__ / __aexit__


def lifecycle_of(obj: Any) -> Lifecycle | None:
    """The hooks of ``obj``'s class, or None if it is not a context manager."""
    cls = type(obj)
    if callable(getattr(cls, "__aenter__", None)) and callable(getattr(cls, "__aexit__", None)):
        return Lifecycle.ASYNC
    if callable(getattr(cls, "__enter__", None)) and callable(getattr(cls, "__exit__", None)):
        return Lifecycle.SYNC
    return None


def describe_error(exc: BaseException) -> str:
    """``"TypeName: message"``, as a delete event and an invocation record say it."""
    return f"{exception_type_name(exc)}: {exc}"


class Hooks:
    """The open and close hooks of one object, and whether it is open.

    ``entered`` is set where the hook ran, right after ``__enter__`` (or
    ``__aenter__``) returned: a creation given up on while its sync
    ``__enter__`` still ran (its caller cancelled, or out of time) sees it
    afterwards, in the instance's thread, and exits the object then. Each
    hook runs at most once.
    """

    __slots__ = ("entered", "exited", "kind", "obj")

    def __init__(self, obj: Any, kind: Lifecycle) -> None:
        self.obj = obj
        self.kind = kind
        self.entered = False
        self.exited = False

    # -- sync, in the instance's thread ------------------------------------------
    def enter(self) -> None:
        type(self.obj).__enter__(self.obj)
        self.entered = True

    def exit(self) -> None:
        if not self.entered or self.exited:
            return
        self.exited = True
        type(self.obj).__exit__(self.obj, None, None, None)

    # -- async, where the object's async methods run -----------------------------
    async def aenter(self) -> None:
        with running_in_place():
            await type(self.obj).__aenter__(self.obj)
        self.entered = True

    async def aexit(self) -> None:
        if not self.entered or self.exited:
            return
        self.exited = True
        with running_in_place():
            await type(self.obj).__aexit__(self.obj, None, None, None)
