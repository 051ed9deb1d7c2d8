"""The body of a ``RayExecutor`` instance's Ray actor: remote-exec's own server inside it.

``RayExecutor`` turns ``InstanceHost`` into a Ray actor class (``ray.remote``)
and starts one actor per held instance, named after it. The actor runs the
same ``Dispatcher`` as the daemon and the process executor's child, on an
event loop in a thread of its own, listening on a TCP port of its node
(``bind``: the node's IP address by default) behind a random token (the
preamble of ``remote_exec.runtime.handshake``). ``address()`` tells a client
where to connect and which token to send; from then on the client speaks
remote-exec's protocol to it directly, so calls, streams, cancellation,
invocations, deadlines and events are the runtime's own, and Ray's task
machinery is not on the path of a call.

Ray does what it is good at: placing the actor on a node with the resources
asked for, naming it cluster-wide, and restarting it (``max_restarts``). The
first creation of the instance goes through the protocol (the client's
``create_instance``, so its errors and its "create" event reach the client
as usual); when Ray restarts the actor after its process died, the actor
re-creates the instance itself from ``spec`` (class, arguments encoded by the
codec, config) before it answers ``address()``, so the instance comes back,
entering its lifecycle hooks again. Nothing is replayed: calls in flight at
the death failed with ``ConnectionLostError`` on their callers' side.

This module imports ray only inside ``InstanceHost``'s methods, which run in
a Ray worker.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import secrets
import socket
import threading
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from remote_exec.codecs import MsgpackCodec
from remote_exec.framing import decode_frame, encode_frame
from remote_exec.protocol import Limits
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.handshake import accept_token
from remote_exec.runtime.sockets import socket_stream
from remote_exec.runtime.transport import StreamTransport

from .dispatch import Dispatcher

__all__ = ["InstanceHost", "decode_arguments", "encode_arguments", "host_spec"]

logger = logging.getLogger("remote_exec.server")

# How long a new connection may take to send its token preamble.
_PREAMBLE_TIMEOUT = 10.0
# How long the actor's constructor waits for its server to listen (and, after
# a restart, for the instance to be created again).
_READY_TIMEOUT = 120.0


def encode_arguments(value: Any, registry: InstanceRegistry | None = None) -> bytes:
    """``value`` (constructor arguments and config) as one msgpack frame: what a
    restarted actor decodes, so arguments travel by remote-exec's codec rules
    (never pickled), like every other call."""
    codec = MsgpackCodec()
    body, buffers = codec.dumps(value, registry)
    return b"".join(encode_frame(codec.codec_id, body, buffers, max_size=1 << 62))


def decode_arguments(data: bytes, registry: InstanceRegistry | None = None) -> Any:
    frame = decode_frame(data, max_size=1 << 62)
    return MsgpackCodec().loads(frame.body, frame.buffers, registry)


class InstanceHost:
    """A Ray actor's body: a remote-exec server for one instance (see the module docstring).

    Args:
        spec: what the actor serves, a dict of plain values: ``name``,
            ``module``, ``qualname``, ``main_path`` (the instance's class; all
            None for an actor without an instance, which serves the
            executor-wide operations), ``arguments`` (``encode_arguments`` of
            ``[args, kwargs, config]``), ``backend`` ("asyncio" or "trio"),
            ``bind`` (the address to listen on, None for the node's),
            ``limits`` (``Limits`` fields).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        import ray

        self._spec = spec
        self._token = secrets.token_urlsafe(32)
        bind = spec.get("bind") or ray.util.get_node_ip_address()
        self._limits = Limits(**spec.get("limits", {}))
        self._listener = socket.create_server((bind, 0))
        self._listener.setblocking(False)
        self._address = (bind, self._listener.getsockname()[1])
        self._ready = threading.Event()
        self._error: BaseException | None = None
        restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._thread = threading.Thread(
            target=self._run,
            args=(restarted,),
            name=f"remote-exec host {spec.get('name') or '(executor)'}",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(_READY_TIMEOUT):
            raise TimeoutError(f"the remote-exec server did not start within {_READY_TIMEOUT} s")
        if self._error is not None:
            raise self._error

    # -- what the client asks through Ray ------------------------------------------
    def address(self) -> tuple[str, int, str, int]:
        """(host, port, token, process id): where to connect, and with what."""
        return (*self._address, self._token, os.getpid())

    # -- the server thread ---------------------------------------------------------
    def _run(self, restarted: bool) -> None:
        try:
            anyio.run(self._serve, restarted, backend=self._spec.get("backend", "asyncio"))
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                logger.exception("the remote-exec server of a Ray actor failed")

    async def _serve(self, restarted: bool) -> None:
        dispatcher = Dispatcher(
            allow_modules=("*",),  # whoever can reach Ray runs any code anyway
            allow_import_from_main=True,
            limits=self._limits,
            close_grace=2.0,
        )
        # ``hosting``: detached (submitted) calls run in its task group, and
        # leaving it closes the dispatcher.
        async with dispatcher.hosting(), anyio.create_task_group() as tg:
            if restarted and self._spec.get("name"):
                await self._recreate(dispatcher, tg)
            self._ready.set()
            while True:
                await anyio.wait_readable(self._listener)
                try:
                    conn, peer = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                tg.start_soon(self._serve_connection, dispatcher, conn, f"{peer[0]}:{peer[1]}")

    async def _serve_connection(
        self, dispatcher: Dispatcher, conn: socket.socket, peer: str
    ) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = await socket_stream(conn)
        accepted = False
        with anyio.move_on_after(_PREAMBLE_TIMEOUT):
            accepted = await accept_token(stream, self._token)
        if not accepted:
            logger.warning("refused a connection from %s: no valid token", peer)
            await anyio.aclose_forcefully(stream)
            return
        limits = self._limits
        transport = StreamTransport(
            stream, max_size=limits.max_message_size, max_buffers=limits.max_buffers
        )
        await dispatcher.serve(transport, peer=peer)

    async def _recreate(self, dispatcher: Dispatcher, tg: TaskGroup) -> None:
        """After a restart: create the instance again, through a connection to
        this very dispatcher (the same path as a client's ``create_instance``),
        kept open for the actor's life."""
        from .testing import memory_transport_pair

        spec = self._spec
        module = spec["module"]
        if module != "__main__":
            # Its coders (registered at import) decode the arguments.
            await anyio.to_thread.run_sync(importlib.import_module, module)
        args, kwargs, config = decode_arguments(spec["arguments"], InstanceRegistry())
        ours, theirs = memory_transport_pair()
        tg.start_soon(functools.partial(dispatcher.serve, theirs, peer="the actor (restarted)"))
        request = [module, spec["qualname"], spec["name"], args, kwargs, config]
        await tg.start(self._hold_loopback, ours, [*request, True, spec["main_path"]])
        logger.info("instance %r created again after the actor restarted", spec["name"])

    async def _hold_loopback(
        self, transport: Any, request: list[Any], *, task_status: TaskStatus[None]
    ) -> None:
        from remote_exec.client.remote import RemoteExecutor

        class Loopback(RemoteExecutor):
            async def _connect(self) -> Any:
                return transport

        async with Loopback(limits=self._limits, init_context=False) as client:
            await client._request("", "create_instance", request)
            task_status.started()
            await anyio.sleep_forever()


def host_spec(
    *,
    name: str | None,
    module: str | None,
    qualname: str | None,
    main_path: str | None,
    arguments: bytes,
    backend: str,
    bind: str | None,
    limits: dict[str, Any],
) -> dict[str, Any]:
    """The ``spec`` of an ``InstanceHost`` (plain values: Ray pickles them)."""
    return {
        "name": name,
        "module": module,
        "qualname": qualname,
        "main_path": main_path,
        "arguments": arguments,
        "backend": backend,
        "bind": bind,
        "limits": limits,
    }
