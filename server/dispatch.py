"""The request dispatcher: protocol messages to the instance runtime.

One ``Dispatcher`` serves every connection of a server (the daemon's
websockets, or the process executor's single socket). Instances are
server-wide: any connection may call any instance by name. How calls are
queued, run, cancelled and closed is the runtime's (``remote_exec.runtime``,
shared with ThreadExecutor); this module checks what clients ask for
(allow-list, decorated methods, caps), creates classes, and serves the
server operations; ``connection`` holds one client's reader, writer and
calls in flight.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from types import ModuleType
from typing import Any, ClassVar, Self

import anyio
import anyio.lowlevel

from remote_exec.exceptions import (
    CallCancelledError,
    CodecError,
    ExecutorStateError,
    FrameError,
    NotAllowedError,
    SubscriberOverflowError,
    UnknownInstanceError,
    client_traceback,
    exception_type_name,
    remote_exception,
)
from remote_exec.executor import (
    ClientMainImport,
    PropertyChange,
    RemoteMethod,
    check_channel,
    check_observed_names,
    check_scope,
    config_of,
    importing_client_main,
    remote_method,
    script_location,
)
from remote_exec.invocations import make_invocation_id
from remote_exec.messages import Call
from remote_exec.protocol import Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.backend import threadsafe_call_soon
from remote_exec.runtime.detached import DetachedPeer
from remote_exec.runtime.events import EventHub
from remote_exec.runtime.instances import Instance
from remote_exec.runtime.invocations import (
    DEFAULT_RETENTION,
    InvocationTable,
    detached_outcome,
    follow_log,
)
from remote_exec.runtime.observe import Observer
from remote_exec.runtime.runtime import InstanceRuntime, sleep_until
from remote_exec.runtime.transport import FrameTransport

from .connection import Connection, OpCall
from .history import InvocationHistory, get_invocation, list_invocations

__all__ = ["DEFAULT_CREATE_TIMEOUT", "Dispatcher", "describe_sys_path", "module_allowed"]

logger = logging.getLogger("remote_exec.server")

DEFAULT_CREATE_TIMEOUT = 60.0
"""Seconds creating an instance may take: importing its module (or the client's
main script) and running its constructor; also bounds ``remote_import`` and
``register_remote_class`` (the daemon's ``--create-timeout``)."""

DAEMON_IMPORT_HINT = (
    "start `remote-exec serve` in the directory that holds it, or add that directory "
    "with --path DIR (repeatable)"
)


def _valid_module_name(module: str) -> bool:
    return bool(module) and all(part.isidentifier() for part in module.split("."))


def module_allowed(module: str, patterns: Sequence[str]) -> bool:
    """Whether ``module`` matches one of the allow-list ``patterns``.

    A pattern is an ``fnmatch`` glob matched against the whole dotted name,
    case-sensitively (``*`` also matches dots), and ``pkg.*`` matches the
    package ``pkg`` itself as well as every module below it, never ``pkgfoo``.
    """
    for pattern in patterns:
        if fnmatch.fnmatchcase(module, pattern):
            return True
        if pattern.endswith(".*") and fnmatch.fnmatchcase(module, pattern[:-2]):
            return True
    return False


def describe_sys_path(limit: int = 8) -> str:
    """This process's ``sys.path`` for an error message: the entries outside
    the Python installation in full (at most ``limit``), the rest counted."""
    cwd = os.getcwd()
    roots = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    shown: list[str] = []
    installation = 0
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        path = os.path.abspath(entry or cwd)
        if any(path == root or path.startswith(root + os.sep) for root in roots):
            installation += 1
            continue
        label = f"{path} (the current directory)" if path == cwd else path
        if label not in shown:
            shown.append(label)
    if len(shown) > limit:
        shown[limit:] = [f"{len(shown) - limit} more"]
    if installation:
        shown.append(f"{installation} entries of the Python installation in {sys.prefix}")
    return "; ".join(shown) or "empty"


_NO_REPLY = object()


class Dispatcher:
    """Serves connections: creates instances and runs their methods.

    Args:
        allow_modules: ``fnmatch`` patterns of the modules whose classes may be
            created, imported or registered (e.g. ``"myinstruments.*"``); a
            module off the list is never imported.
        allow_import_from_main: create classes defined in a client's
            ``__main__``, by importing the client's main file (given as a path
            on this machine) under a private module name.
        limits: message size, nesting depth and calls-in-flight caps per connection.
        max_queued_events: how many events a subscriber may lag behind before
            it is dropped with ``SubscriberOverflowError`` (default:
            ``limits.max_queued_events``).
        close_grace: how long a closing connection waits for its cancelled work
            and generators to finish, in seconds.
        create_timeout: how long creating an instance may take, in seconds:
            importing its module (or the client's main script) and running its
            constructor; past it the creation fails with ``TimeoutError`` (a
            stuck import or constructor is left behind in its thread). Also
            bounds ``import_module`` and ``register_class``. None: no bound.
        import_hint: what an error about an allowed module that cannot be
            imported tells the client to do (how this server finds modules).
    """

    # Server operations: name -> (handler name, runs as a task, is a stream).
    _OPS: ClassVar[dict[str, tuple[str, bool, bool]]] = {
        "echo_clock": ("_op_echo_clock", False, False),
        "hello": ("_op_hello", False, False),
        "list_invocations": ("_op_list_invocations", False, False),
        "get_invocation": ("_op_get_invocation", False, False),
        "cancel_invocation": ("_op_cancel_invocation", False, False),
        "invocation_result": ("_op_invocation_result", True, False),
        "follow_log": ("_op_follow_log", True, True),
        "list_instances": ("_op_list_instances", False, False),
        "get_properties": ("_op_get_properties", False, False),
        "get_config": ("_op_get_config", False, False),
        "create_instance": ("_op_create_instance", True, False),
        "delete_instance": ("_op_delete_instance", True, False),
        "sleep": ("_op_sleep", True, False),
        "import_module": ("_op_import_module", True, False),
        "register_class": ("_op_register_class", True, False),
        "subscribe": ("_op_subscribe", True, True),
        "observe": ("_op_observe", True, True),
    }

    def __init__(
        self,
        *,
        allow_modules: Sequence[str] = (),
        allow_import_from_main: bool = False,
        limits: Limits | None = None,
        max_queued_events: int | None = None,
        close_grace: float = 5.0,
        create_timeout: float | None = DEFAULT_CREATE_TIMEOUT,
        import_hint: str = DAEMON_IMPORT_HINT,
        invocation_retention: float = DEFAULT_RETENTION,
    ) -> None:
        if isinstance(allow_modules, str):
            raise TypeError("allow_modules must be a sequence of patterns, not one string")
        if create_timeout is not None and not create_timeout > 0:
            raise ValueError(f"create_timeout must be positive or None, not {create_timeout!r}")
        self.allow_modules = tuple(allow_modules)
        self.allow_import_from_main = allow_import_from_main
        self.create_timeout = create_timeout
        self.import_hint = import_hint
        self.limits = limits or Limits()
        self.close_grace = close_grace
        self.registry = InstanceRegistry()
        # Enum members arrive only for classes of modules this server may import.
        self.registry.module_allowed = functools.partial(
            module_allowed, patterns=self.allow_modules
        )
        self.events = EventHub(
            self.limits.max_queued_events if max_queued_events is None else max_queued_events
        )
        self.runtime = InstanceRuntime(
            self.registry,
            self.events,
            threads_have_loops=False,
            close_grace=close_grace,
            invocations=InvocationTable(retention=invocation_retention),
        )
        self.detached = DetachedPeer(_not_on_loop_yet, keep_error=_kept_failure)
        self._connections: set[Connection] = set()
        self._methods: dict[tuple[type, str], RemoteMethod] = {}
        self._main_modules: dict[str, ModuleType] = {}
        # Imports under way or finished and not yet collected, by ("module",
        # name) or ("main", path): every request that needs one waits for the
        # same import, which may outlive them (see ``_Loading``).
        self._loading: dict[tuple[str, str], _Loading] = {}
        self._closed = False
        # Finished invocations kept in a file (``remote-exec serve --history``):
        # read when memory no longer has them.
        self.history: InvocationHistory | None = None

    # -- public -----------------------------------------------------------------
    @asynccontextmanager
    async def hosting(self) -> AsyncIterator[Self]:
        """Serve connections inside this block: detached async calls run in its
        task group (they outlive the connection that sent them); leaving it
        closes the dispatcher."""
        try:
            async with anyio.create_task_group() as tg:
                self.detached.tg = tg
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.aclose()
        finally:
            self.detached.tg = None

    async def serve(self, transport: FrameTransport, *, peer: str = "") -> None:
        """Serve one connection until it closes (or the server shuts down).

        Never raises because of what the client sent; closes ``transport`` on return.
        """
        if self._closed:
            await self._refuse(transport)
            return
        conn = Connection(
            transport,
            peer,
            registry=self.registry,
            limits=self.limits,
            close_grace=self.close_grace,
            on_call=self.dispatch_call,
        )
        self._connections.add(conn)
        logger.info("connection opened: %s", peer or "(unnamed peer)")
        try:
            async with anyio.create_task_group() as tg:
                conn.tg = tg
                tg.start_soon(conn.write_loop)
                await conn.read_loop()
                await conn.wind_down()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("internal error while serving %r", conn)
        finally:
            conn.tg = None
            conn.release()
            self._connections.discard(conn)
            with anyio.move_on_after(self.close_grace, shield=True):
                await transport.aclose()
            # Its connection-scoped instances go with it (exited, events published).
            try:
                await self.runtime.end_scope(
                    conn.held, f"its connection closed ({peer or 'unnamed peer'}: {conn.reason})"
                )
            except Exception:
                logger.exception("could not end the scope of %r", conn)
            conn.finished.set()
            logger.info("connection closed: %s: %s", peer or "(unnamed peer)", conn.reason)

    async def aclose(self) -> None:
        """Shut the server down: fail in-flight calls, close connections, stop workers."""
        if self._closed:
            return
        self._closed = True
        connections = list(self._connections)
        for conn in connections:
            conn.shutdown("the server is shutting down")
        with anyio.move_on_after(2 * self.close_grace, shield=True):
            for conn in connections:
                await conn.finished.wait()
        self.detached.stop()
        await self.runtime.close()
        self.events.close()
        logger.info("dispatcher closed")

    def statistics(self) -> dict[str, Any]:
        """Connections, instances and calls in flight (for ``/instances`` and logs)."""
        return {
            "connections": len(self._connections),
            "peers": sorted(conn.peer for conn in self._connections),
            "instances": len(self.runtime.instances),
            "instance_names": list(self.runtime.instances),
            "calls_in_flight": sum(conn.rpc.in_flight for conn in self._connections),
            "queued": self.runtime.queued(),
            "subscribers": self.events.has_subscribers,
        }

    # -- internals --------------------------------------------------------------------
    async def _refuse(self, transport: FrameTransport) -> None:
        rpc = RpcConnection(Side.SERVER, self.registry, limits=self.limits)
        rpc.send_close("the server is shutting down")
        with anyio.move_on_after(self.close_grace, shield=True):
            try:
                for frame in rpc.data_to_send():
                    await transport.send_frame(frame)
            except Exception:  # noqa: BLE001, S110 - the connection is being refused anyway
                pass
            await transport.aclose()

    def _method(self, cls: type, name: str) -> RemoteMethod:
        key = (cls, name)
        marker = self._methods.get(key)
        if marker is None:
            marker = remote_method(cls, name)  # raises NotAllowedError
            self._methods[key] = marker
        return marker

    def dispatch_call(self, conn: Connection, message: Call) -> None:
        """Act on a ``Call``: a method of an instance, or a server operation."""
        sid = message.stream_id
        if not conn.alive:
            return
        if not message.target:
            self._dispatch_op(conn, message)
            return
        instance = self.runtime.instances.get(message.target)
        if instance is None:
            conn.fail(sid, UnknownInstanceError(f"no instance named {message.target!r} is held"))
            return
        try:
            marker = self._method(type(instance.obj), message.method)
        except NotAllowedError as exc:
            conn.fail(sid, exc)
            return
        if message.stream != marker.is_generator:
            kind = "a generator" if marker.is_generator else "not a generator"
            conn.fail(sid, TypeError(f"{message.target}.{message.method} is {kind}"))
            return
        deadline = None
        meta = message.meta
        if meta:
            deadline = meta.get("deadline")
            if deadline is not None and (
                type(deadline) not in (int, float) or not 0 <= deadline < math.inf
            ):
                conn.fail(sid, TypeError("a call's deadline is a number of seconds"))
                return
            if meta.get("detached") is True:
                self._submit(conn, sid, instance, marker, message, deadline)
                return
        try:
            self.runtime.call(conn, sid, instance, marker, message.args, message.kwargs, deadline)
        except ValueError as exc:  # its invocation id is taken
            conn.fail(sid, exc)

    def _submit(
        self,
        conn: Connection,
        sid: int,
        instance: Instance,
        marker: RemoteMethod,
        message: Call,
        deadline: float | None,
    ) -> None:
        """Start a detached call: answered at once with its invocation id; its
        outcome is kept for whoever asks by id (``invocation_result``)."""
        if marker.is_generator:
            conn.fail(sid, TypeError(f"{marker.name} is a generator: it cannot be submitted"))
            return
        peer = self.detached
        if peer.call_soon is _not_on_loop_yet:
            peer.call_soon = threadsafe_call_soon()
        invocation_id = make_invocation_id(conn.session, sid)
        try:
            call = self.runtime.call(
                peer,
                peer.next_id(),
                instance,
                marker,
                message.args,
                message.kwargs,
                deadline,
                invocation_id=invocation_id,
                detached=True,
            )
        except (ValueError, ExecutorStateError) as exc:
            conn.fail(sid, exc)
            return
        conn.reply(sid, call.invocation.id)

    def _dispatch_op(self, conn: Connection, message: Call) -> None:
        sid = message.stream_id
        op = self._OPS.get(message.method)
        if op is None:
            conn.fail(sid, NotAllowedError(f"{message.method!r} is not a server operation"))
            return
        handler_name, as_task, is_stream = op
        if message.kwargs:
            conn.fail(sid, TypeError("server operations take positional arguments only"))
            return
        if message.stream != is_stream:
            conn.fail(
                sid, TypeError(f"{message.method} {'is' if is_stream else 'is not'} a stream")
            )
            return
        handler = getattr(self, handler_name)
        if not as_task:
            try:
                value = handler(conn, sid, *message.args)
            except Exception as exc:  # noqa: BLE001 - anything a handler raises is the caller's
                conn.fail(sid, exc)
                return
            if value is not _NO_REPLY:
                conn.reply(sid, value)
            return
        call = OpCall(conn, sid, is_stream)
        conn.calls[sid] = call
        assert conn.tg is not None
        conn.tg.start_soon(self._run_op, call, handler, message.args)

    async def _run_op(self, call: OpCall, handler: Callable[..., Any], args: list[Any]) -> None:
        conn = call.conn
        try:
            with anyio.CancelScope() as scope:
                call.scope = scope
                if call.cancelled:  # cancelled before this task began: never starts
                    scope.cancel()
                try:
                    value = await handler(conn, call, *args)
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # noqa: BLE001 - anything a handler raises is the caller's
                    conn.fail(call.sid, exc)
                    return
            if scope.cancelled_caught:
                if call.stream:
                    conn.end_stream(call.sid)
                else:
                    conn.fail(call.sid, CallCancelledError("the call was cancelled while it ran"))
            elif value is not _NO_REPLY:
                conn.reply(call.sid, value)
        finally:
            conn.forget(call)

    # -- allow-list and imports ---------------------------------------------------------
    def _check_module(self, module: Any) -> str:
        if not isinstance(module, str) or not _valid_module_name(module):
            raise NotAllowedError(f"{module!r} is not a module name")
        if not module_allowed(module, self.allow_modules):
            top = module.split(".", 1)[0]
            raise NotAllowedError(
                f"module {module!r} is not on this server's allow-list "
                f"(start it with --allow-module {module}, or --allow-module '{top}.*' for "
                f"the package {top} and everything in it)"
            )
        return module

    @contextmanager
    def _bounded(self, what: Callable[[], str]) -> Iterator[None]:
        """Fail with ``TimeoutError`` if the block takes longer than
        ``create_timeout``; ``what()`` says what was still going on."""
        timeout = math.inf if self.create_timeout is None else self.create_timeout
        with anyio.move_on_after(timeout) as scope:
            yield
        if scope.cancelled_caught:
            raise TimeoutError(
                f"{what()} did not finish within {timeout:g} s (the server's --create-timeout)"
            )

    async def _import(self, module: str) -> ModuleType:
        """Import an allowed module (``_check_module`` first), off the loop."""
        loaded = sys.modules.get(module)
        if (
            loaded is not None
            and not _initializing(loaded)
            and ("module", module) not in self._loading
        ):
            return loaded
        try:
            return await self._load(("module", module), importlib.import_module, module)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and (module == missing or module.startswith(missing + ".")):
                raise ModuleNotFoundError(
                    f"the server cannot import module {module!r}, which its allow-list "
                    f"allows: {exc}. It looks for modules on its sys.path: "
                    f"{describe_sys_path()}. To serve it, {self.import_hint}",
                    name=missing,
                ) from None
            raise

    async def _load(
        self, key: tuple[str, str], load: Callable[[str], ModuleType], target: str
    ) -> ModuleType:
        """``load(target)`` in a thread of its own, once for every request that
        waits for it at the same time; a failed import is tried again by the
        next request."""
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = _Loading(load, target)
        await loading.wait()
        if self._loading.get(key) is loading:
            del self._loading[key]
        module = loading.result()
        self.registry.learn_default_coders()
        return module

    async def _import_main(self, main_path: Any) -> ModuleType:
        if not self.allow_import_from_main:
            raise NotAllowedError(
                "this server does not create classes from a client's __main__ "
                "(start it with --allow-import-from-main, or move the class to a module)"
            )
        if not isinstance(main_path, str) or not main_path:
            raise NotAllowedError(
                "the class is defined in an interactive __main__ (a notebook, `python -c` or "
                "stdin: no file to import on the remote side): move it to a module next to "
                "your script or notebook and import it from there"
            )
        module = self._main_modules.get(main_path)
        if module is None:
            module = await self._load(("main", main_path), _load_main, main_path)
            self._main_modules[main_path] = module
        return module

    async def _resolve_class(self, module: Any, qualname: Any, main_path: Any) -> type:
        if not isinstance(qualname, str) or not qualname:
            raise NotAllowedError(f"{qualname!r} is not a class name")
        if module == "__main__":
            loaded = await self._import_main(main_path)
        else:
            loaded = await self._import(self._check_module(module))
        obj: Any = loaded
        for part in qualname.split("."):
            if not part.isidentifier() or part.startswith("__"):
                raise NotAllowedError(
                    f"{qualname!r} is not a class that can be created remotely "
                    "(classes defined inside functions cannot be)"
                )
            obj = getattr(obj, part, None)
            if obj is None:
                raise NotAllowedError(f"module {module!r} has no class {qualname!r}")
        if not isinstance(obj, type) or obj.__module__ != loaded.__name__:
            raise NotAllowedError(f"{module}.{qualname} is not a class defined in {module!r}")
        return obj

    # -- server operations (target "") ------------------------------------------------
    def _op_echo_clock(self, conn: Connection, sid: int) -> int:
        return time.perf_counter_ns()

    def _op_hello(self, conn: Connection, sid: int, session: Any) -> None:
        """The client's session: the prefix of its invocation ids (``new_session``)."""
        if not isinstance(session, str) or not _SESSION.fullmatch(session):
            raise ValueError("a session is 8 to 64 letters, digits or underscores")
        if any(other.session == session for other in self._connections if other is not conn):
            raise ValueError("that session is in use by another connection")
        conn.session = session

    def _op_list_invocations(
        self,
        conn: Connection,
        sid: int,
        instance: Any = None,
        method: Any = None,
        status: Any = None,
    ) -> object:
        for value in (instance, method, status):
            if value is not None and not isinstance(value, str):
                raise TypeError("invocation filters are strings or nil")
        table, history = self.runtime.invocations, self.history
        if history is None:
            found = table.list(instance=instance, method=method, status=status)
            return [info.to_wire() for info in found]

        async def read() -> list[dict[str, Any]]:
            found = await list_invocations(
                table, history, instance=instance, method=method, status=status
            )
            return [info.to_wire() for info in found]

        return self._reply_later(conn, sid, read)

    def _op_get_invocation(self, conn: Connection, sid: int, invocation_id: Any) -> object:
        try:
            return self.runtime.invocations.get(invocation_id).to_wire()
        except LookupError:
            if self.history is None:
                raise
            return self._from_history(conn, sid, invocation_id)

    def _op_cancel_invocation(self, conn: Connection, sid: int, invocation_id: Any) -> object:
        try:
            return self.runtime.invocations.cancel(invocation_id).to_wire()
        except LookupError:
            if self.history is None:
                raise
            # Only the history file has it: it finished, nothing to cancel.
            return self._from_history(conn, sid, invocation_id)

    def _from_history(self, conn: Connection, sid: int, invocation_id: Any) -> object:
        table, history = self.runtime.invocations, self.history

        async def read() -> dict[str, Any]:
            return (await get_invocation(table, history, invocation_id)).to_wire()

        return self._reply_later(conn, sid, read)

    def _reply_later(
        self, conn: Connection, sid: int, work: Callable[[], Awaitable[Any]]
    ) -> object:
        """Answer ``sid`` with what ``work()`` returns, from a task of the
        connection's (reading the history file takes a worker thread)."""

        async def run() -> None:
            try:
                value = await work()
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                conn.fail(sid, exc)
                return
            conn.reply(sid, value)

        assert conn.tg is not None
        conn.tg.start_soon(run)
        return _NO_REPLY

    async def _op_invocation_result(
        self, conn: Connection, call: OpCall, invocation_id: Any
    ) -> object:
        """The outcome of a detached invocation, once it has finished."""
        scope = await detached_outcome(self.runtime.invocations, invocation_id, conn.call_soon)
        if scope.failure is not None:
            conn.fail(call.sid, scope.failure)
            return _NO_REPLY
        return scope.value

    async def _op_follow_log(self, conn: Connection, call: OpCall, invocation_id: Any) -> object:
        """An invocation's log records, as they come, until it has finished."""
        scope = self.runtime.invocations.scope(invocation_id)
        async for entries in follow_log(scope, conn.call_soon):
            rows = [entry.to_wire() for entry in entries]
            while rows:
                await call.wait_credit()
                count = conn.credit(call.sid)
                conn.send_items(call.sid, rows[:count])
                del rows[:count]
        conn.end_stream(call.sid)
        return _NO_REPLY

    def _op_list_instances(self, conn: Connection, sid: int) -> list[str]:
        return list(self.runtime.instances)

    def _op_get_properties(self, conn: Connection, sid: int, name: Any, names: Any) -> object:
        instance = self.runtime.get(name)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("property names must be a list of strings")
        for attr in names:
            if not attr.isidentifier() or attr.startswith("_"):
                raise NotAllowedError(f"{attr!r} is not a public attribute name")
        obj = instance.obj

        def read() -> dict[str, Any]:
            return {attr: getattr(obj, attr) for attr in names}

        self.runtime.read(conn, sid, instance, read)
        return _NO_REPLY

    def _op_get_config(self, conn: Connection, sid: int, name: Any) -> object:
        if name is None:
            call = OpCall(conn, sid, False)
            conn.calls[sid] = call
            assert conn.tg is not None
            conn.tg.start_soon(self._run_op, call, self._all_configs, [])
            return _NO_REPLY
        instance = self.runtime.get(name)
        obj = instance.obj
        self.runtime.read(conn, sid, instance, lambda: config_of(obj))
        return _NO_REPLY

    async def _all_configs(self, conn: Connection, call: OpCall) -> dict[str, Any]:
        return await self.runtime.all_configs()

    async def _op_create_instance(
        self,
        conn: Connection,
        call: OpCall,
        module: Any,
        qualname: Any,
        name: Any,
        args: Any,
        kwargs: Any,
        config: Any,
        exist_ok: Any = False,
        main_path: Any = None,
        scope: Any = "server",
    ) -> bool:
        if not isinstance(name, str) or not name:
            raise ValueError("an instance name must be a non-empty string")
        check_scope(scope)
        if (
            not isinstance(args, list)
            or not isinstance(kwargs, dict)
            or not isinstance(config, dict)
        ):
            raise TypeError("create_instance takes args as a list, kwargs and config as maps")
        if module == "__main__":
            stage = f"importing the client's main script {main_path}"
        else:
            stage = f"importing module {module!r}"

        def what() -> str:
            return f"creating {name!r} ({module}.{qualname}): {stage}"

        with self._bounded(what):
            cls = await self._resolve_class(module, qualname, main_path)
            stage = "its constructor (or __enter__)"
            return await self._create_instance(
                conn, cls, module, qualname, name, args, kwargs, config, exist_ok, scope
            )

    async def _create_instance(
        self,
        conn: Connection,
        cls: type,
        module: str,
        qualname: str,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        config: dict[str, Any],
        exist_ok: Any,
        scope: str = "server",
    ) -> bool:
        allowed = set(getattr(cls, "_config_props_", ()))
        for prop in config:
            if prop not in allowed or not isinstance(prop, str) or prop.startswith("__"):
                raise NotAllowedError(f"{prop!r} is not in {qualname}._config_props_")
        counted = False

        def check() -> None:
            nonlocal counted
            self._check_instance_caps(conn)
            conn.creating += 1
            counted = True

        try:
            return await self.runtime.create(
                name,
                (module, qualname),
                functools.partial(_construct, cls, args, kwargs, config),
                exist_ok=bool(exist_ok),
                owner=conn.held,
                check=check,
                scope=scope,
            )
        finally:
            if counted:
                conn.creating -= 1

    def _check_instance_caps(self, conn: Connection) -> None:
        limits = self.limits
        if len(conn.held) + conn.creating >= limits.max_instances:
            raise NotAllowedError(
                f"this connection already holds {limits.max_instances} instances, the cap "
                "(--max-instances): delete some first"
            )
        if len(self.runtime) >= limits.max_server_instances:
            raise NotAllowedError(
                f"the server already holds {limits.max_server_instances} instances, the cap "
                "(--max-server-instances)"
            )

    async def _op_delete_instance(self, conn: Connection, call: OpCall, name: Any) -> None:
        await self.runtime.delete(name)

    async def _op_sleep(
        self, conn: Connection, call: OpCall, duration: Any = None, deadline: Any = None
    ) -> int:
        return await sleep_until(duration, deadline)

    async def _op_import_module(self, conn: Connection, call: OpCall, module: Any) -> None:
        name = self._check_module(module)
        with self._bounded(lambda: f"importing module {name!r}"):
            await self._import(name)

    async def _op_register_class(
        self, conn: Connection, call: OpCall, module: Any, qualname: Any
    ) -> None:
        if module == "__main__":
            raise NotAllowedError(
                "register a class of the client's __main__ by creating an instance"
            )
        with self._bounded(lambda: f"registering {module}.{qualname}: importing {module!r}"):
            cls = await self._resolve_class(module, qualname, None)
        self.registry.register_class(cls)

    async def _op_subscribe(
        self, conn: Connection, call: OpCall, name: Any, channel: Any
    ) -> object:
        check_channel(name, channel)
        subscription = self.events.subscribe(name, channel)
        try:
            async for event in subscription:
                await call.wait_credit()
                conn.send_items(call.sid, [event])
        except SubscriberOverflowError as exc:
            conn.fail(call.sid, exc)
            return _NO_REPLY
        finally:
            await subscription.aclose()
        conn.end_stream(call.sid)
        return _NO_REPLY

    async def _op_observe(self, conn: Connection, call: OpCall, name: Any, names: Any) -> object:
        """Changes of the attributes ``names`` of instance ``name`` (initial
        values first), as ``[seq, name, value, resync, error]`` rows within
        credit, until cancelled or the instance is deleted."""
        instance = self.runtime.get(name)
        async with Observer(instance, check_observed_names(names), self.events.max_queue) as seen:
            async for change in seen:
                await call.wait_credit()
                for item in [change, *seen.take(conn.credit(call.sid) - 1)]:
                    try:
                        conn.send_items(call.sid, [item.to_wire()])
                    except (CodecError, FrameError) as exc:  # this value cannot travel
                        error = f"{exception_type_name(exc)}: {exc}"
                        row = PropertyChange(item.seq, item.name, None, item.resync, error)
                        conn.send_items(call.sid, [row.to_wire()])
        conn.end_stream(call.sid)
        return _NO_REPLY


_SESSION = re.compile(r"[0-9A-Za-z_]{8,64}")


def _not_on_loop_yet(*args: Any) -> None:
    raise RuntimeError("no call was submitted yet")


def _kept_failure(exc: BaseException) -> BaseException:
    """What a detached call's failure leaves on its record: its type, message
    and client traceback, not its frames (which may hold large arguments)."""
    return remote_exception(exception_type_name(exc), str(exc), client_traceback(exc))


def _construct(cls: type, args: list[Any], kwargs: dict[str, Any], config: dict[str, Any]) -> Any:
    """Build an instance (in its own thread) and apply its config."""
    obj = cls(*args, **kwargs)
    for prop, value in config.items():
        setattr(obj, prop, value)
    return obj


class _Loading:
    """One import, run in a thread of its own so that a request can stop
    waiting for it (its creation timeout) while it goes on: an import cannot be
    interrupted. Requests that need it meanwhile wait for the same import
    instead of starting another."""

    def __init__(self, load: Callable[[str], ModuleType], target: str) -> None:
        self._finished = threading.Event()
        self._module: ModuleType | None = None
        self._error: BaseException | None = None
        threading.Thread(
            target=self._run, args=(load, target), name=f"remote-exec import {target}", daemon=True
        ).start()

    def _run(self, load: Callable[[str], ModuleType], target: str) -> None:
        try:
            self._module = load(target)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt: not ours to raise
                error = ImportError(f"importing {target} raised {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                exc = error
            self._error = exc
        finally:
            self._finished.set()

    async def wait(self) -> None:
        """Until the import finished, or the caller's deadline passes (then the
        thread that waits here returns by itself at that deadline too)."""
        while not self._finished.is_set():
            deadline = anyio.current_effective_deadline()
            timeout = None if math.isinf(deadline) else max(deadline - anyio.current_time(), 0.0)
            await anyio.to_thread.run_sync(self._finished.wait, timeout, abandon_on_cancel=True)

    def result(self) -> ModuleType:
        if self._error is not None:
            raise self._error
        assert self._module is not None
        return self._module


def _initializing(module: ModuleType) -> bool:
    """Whether ``module`` is still being imported (it is in ``sys.modules`` already)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


# What runs an event loop, by (module, qualified name): a client's main script
# must not call it while it is imported on the remote side (see ``_load_main``).
_LOOP_RUNNERS = {
    ("anyio._core._eventloop", "run"): "anyio.run()",
    ("trio._core._run", "run"): "trio.run()",
    ("asyncio.runners", "run"): "asyncio.run()",
    ("asyncio.runners", "Runner.run"): "asyncio.Runner.run()",
    ("asyncio.base_events", "BaseEventLoop.run_until_complete"): "loop.run_until_complete()",
    ("asyncio.base_events", "BaseEventLoop.run_forever"): "loop.run_forever()",
}
_LOOP_RUNNER_NAMES = frozenset(qualname.rsplit(".", 1)[-1] for _, qualname in _LOOP_RUNNERS)


def _trap_loop_runners(marker: ClientMainImport) -> Callable[[Any, str, Any], None]:
    """A profile function (this thread's only) that stops the script before
    one of ``_LOOP_RUNNERS`` runs, so none of the client's program runs here."""

    def profile(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event != "call" or code.co_name not in _LOOP_RUNNER_NAMES:
            return
        what = _LOOP_RUNNERS.get((frame.f_globals.get("__name__"), code.co_qualname))
        if what is not None:
            marker.trapped = f"calls {what}{script_location(marker.path, frame.f_back)}"
            for value in frame.f_locals.values():  # the arguments: asyncio.run(main())'s
                if inspect.iscoroutine(value):  # coroutine would warn it was never awaited
                    value.close()
            # Raised in the called function before its first line (and this
            # profile function is removed: Python does that when it raises).
            raise ExecutorStateError(marker.message())

    return profile


def _load_main(path: str) -> ModuleType:
    """Import a client's main script under a private name (its ``__main__`` guard stays shut).

    Its top-level code must not start the client's program here: an event loop
    it runs (``anyio.run(main)`` outside ``if __name__ == "__main__":``) is
    stopped before it starts, an executor it starts raises, and either way the
    import fails with an ``ImportError`` that says how to guard the script.
    """
    digest = hashlib.sha1(path.encode(), usedforsecurity=False).hexdigest()[:12]
    name = f"__remote_exec_main_{digest}__"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the client's main file {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with importing_client_main(path) as marker:
        trap = sys.getprofile() is None  # a profiler in this thread is left alone
        if trap:
            sys.setprofile(_trap_loop_runners(marker))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            if marker.trapped is not None:
                raise ImportError(marker.message(), name=name, path=path) from None
            raise
        finally:
            if trap:
                sys.setprofile(None)
    return module
