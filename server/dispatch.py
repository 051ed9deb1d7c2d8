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
import logging
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, ClassVar

import anyio
import anyio.lowlevel

from remote_exec.exceptions import (
    CallCancelledError,
    NotAllowedError,
    SubscriberOverflowError,
    UnknownInstanceError,
)
from remote_exec.executor import RemoteMethod, check_channel, config_of, remote_method
from remote_exec.messages import Call
from remote_exec.protocol import Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.events import EventHub
from remote_exec.runtime.runtime import InstanceRuntime, sleep_until
from remote_exec.runtime.transport import FrameTransport

from .connection import Connection, OpCall

__all__ = ["Dispatcher"]

logger = logging.getLogger("remote_exec.server")


def _valid_module_name(module: str) -> bool:
    return bool(module) and all(part.isidentifier() for part in module.split("."))


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
    """

    # Server operations: name -> (handler name, runs as a task, is a stream).
    _OPS: ClassVar[dict[str, tuple[str, bool, bool]]] = {
        "echo_clock": ("_op_echo_clock", False, False),
        "list_instances": ("_op_list_instances", False, False),
        "get_properties": ("_op_get_properties", False, False),
        "get_config": ("_op_get_config", False, False),
        "create_instance": ("_op_create_instance", True, False),
        "delete_instance": ("_op_delete_instance", True, False),
        "sleep": ("_op_sleep", True, False),
        "import_module": ("_op_import_module", True, False),
        "register_class": ("_op_register_class", True, False),
        "subscribe": ("_op_subscribe", True, True),
    }

    def __init__(
        self,
        *,
        allow_modules: Sequence[str] = (),
        allow_import_from_main: bool = False,
        limits: Limits | None = None,
        max_queued_events: int | None = None,
        close_grace: float = 5.0,
    ) -> None:
        if isinstance(allow_modules, str):
            raise TypeError("allow_modules must be a sequence of patterns, not one string")
        self.allow_modules = tuple(allow_modules)
        self.allow_import_from_main = allow_import_from_main
        self.limits = limits or Limits()
        self.close_grace = close_grace
        self.registry = InstanceRegistry()
        self.events = EventHub(
            self.limits.max_queued_events if max_queued_events is None else max_queued_events
        )
        self.runtime = InstanceRuntime(
            self.registry, self.events, threads_have_loops=False, close_grace=close_grace
        )
        self._connections: set[Connection] = set()
        self._methods: dict[tuple[type, str], RemoteMethod] = {}
        self._main_modules: dict[str, ModuleType] = {}
        self._import_lock: anyio.Lock | None = None
        self._closed = False

    # -- public -----------------------------------------------------------------
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
        self.runtime.call(conn, sid, instance, marker, message.args, message.kwargs)

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
        if not any(fnmatch.fnmatchcase(module, pattern) for pattern in self.allow_modules):
            raise NotAllowedError(
                f"module {module!r} is not on this server's allow-list "
                "(start it with --allow-module PATTERN)"
            )
        return module

    async def _import(self, module: str) -> ModuleType:
        """Import an allowed module (``_check_module`` first), off the loop."""
        loaded = sys.modules.get(module)
        if loaded is None:
            loaded = await anyio.to_thread.run_sync(importlib.import_module, module)
            self.registry.learn_default_coders()
        return loaded

    async def _import_main(self, main_path: Any) -> ModuleType:
        if not self.allow_import_from_main:
            raise NotAllowedError(
                "this server does not create classes from a client's __main__ "
                "(start it with --allow-import-from-main, or move the class to a module)"
            )
        if not isinstance(main_path, str) or not main_path:
            raise NotAllowedError(
                "the class is defined in an interactive __main__ (no file): move it to a module"
            )
        module = self._main_modules.get(main_path)
        if module is not None:
            return module
        if self._import_lock is None:
            self._import_lock = anyio.Lock()
        async with self._import_lock:
            module = self._main_modules.get(main_path)
            if module is None:
                digest = hashlib.sha1(main_path.encode(), usedforsecurity=False).hexdigest()[:12]
                name = f"__remote_exec_main_{digest}__"
                module = await anyio.to_thread.run_sync(_load_main, main_path, name)
                self._main_modules[main_path] = module
                self.registry.learn_default_coders()
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
    ) -> bool:
        if not isinstance(name, str) or not name:
            raise ValueError("an instance name must be a non-empty string")
        if (
            not isinstance(args, list)
            or not isinstance(kwargs, dict)
            or not isinstance(config, dict)
        ):
            raise TypeError("create_instance takes args as a list, kwargs and config as maps")
        cls = await self._resolve_class(module, qualname, main_path)
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
        await self._import(self._check_module(module))

    async def _op_register_class(
        self, conn: Connection, call: OpCall, module: Any, qualname: Any
    ) -> None:
        if module == "__main__":
            raise NotAllowedError(
                "register a class of the client's __main__ by creating an instance"
            )
        self.registry.register_class(await self._resolve_class(module, qualname, None))

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


def _construct(cls: type, args: list[Any], kwargs: dict[str, Any], config: dict[str, Any]) -> Any:
    """Build an instance (in its own thread) and apply its config."""
    obj = cls(*args, **kwargs)
    for prop, value in config.items():
        setattr(obj, prop, value)
    return obj


def _load_main(path: str, name: str) -> ModuleType:
    """Import a client's main script under a private name (its ``__main__`` guard stays shut)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the client's main file {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
