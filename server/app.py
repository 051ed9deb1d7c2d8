"""The ASGI app the daemon serves (a plain ASGI callable, no framework).

* websocket, any path (``ws://host:port`` reaches it): executors connect here.
  Before accepting, the app rejects a browser ``Origin`` that is not
  allow-listed (HTTP 403), a missing or wrong ``Authorization: Bearer`` token
  (HTTP 401, compared in constant time; a token in the URL is never accepted),
  and connections beyond the cap (HTTP 503). An accepted connection carries
  remote-exec frames as binary messages, handed to ``Dispatcher.serve``; a text
  message closes that connection (code 1003) and no other.
* ``GET /health``: open, ``{"status": "ok"}`` and nothing else.
* ``GET /instances``: behind the token, the instance names and the
  dispatcher's statistics.
* anything else: 404.

``RemoteExecApp.shutdown(grace)`` stops taking connections, gives in-flight
calls ``grace`` seconds, then cancels what is left (callers get an error) and
closes every websocket with code 1001.

What hypercorn enforces for the app (see ``hypercorn_config``): a connection
must finish its TLS and HTTP handshake within ``handshake_timeout``; one on
which nothing at all arrives for ``idle_timeout`` (no message, no pong to the
pings sent every ``ping_interval``) is dropped, which is how a client that
vanished without a close frame is found; a websocket message is never buffered
past ``max_message_size`` and permessage-deflate is always declined, so that
no message is ever decompressed (``harden_hypercorn``, called by ``serve``).
``docs/security.md`` lists every default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
from hypercorn.config import Config
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer
from wsproto.events import Message as WSMessage
from wsproto.extensions import PerMessageDeflate

from remote_exec.exceptions import ConnectionLostError
from remote_exec.protocol import Limits
from remote_exec.runtime.auth import bearer_token, check_token
from remote_exec.runtime.backend import is_trio

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PING_INTERVAL",
    "ASGIWebSocketTransport",
    "RemoteExecApp",
    "create_app",
    "harden_hypercorn",
    "hypercorn_config",
    "serve",
]

logger = logging.getLogger("remote_exec.server")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_CONNECTIONS = 64
# Runs of frames over CUT_ABOVE bytes go out cut into equal messages of at
# most MESSAGE_CHUNK bytes (see ``_messages``).
CUT_ABOVE = 4 * 1024 * 1024
MESSAGE_CHUNK = 1024 * 1024
# Seconds a client has to finish the TLS and HTTP (websocket upgrade) handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Seconds without receiving anything at all before a connection is dropped;
# larger than the ping interval, so a live client (which answers every ping)
# never reaches it.
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_GRACE = 5.0
# How often shutdown looks whether in-flight calls have finished.
_IDLE_POLL = 0.05

# Websocket close codes (RFC 6455).
_NORMAL = 1000
_GOING_AWAY = 1001
_UNSUPPORTED_DATA = 1003
_POLICY = 1008
_TOO_BIG = 1009
_INTERNAL_ERROR = 1011


class ASGIWebSocketTransport:
    """A ``FrameTransport`` over an accepted ASGI websocket: one frame per binary message."""

    def __init__(self, receive: Receive, send: Send, *, max_size: int | None = None) -> None:
        self._receive = receive
        self._send = send
        self._max_size = max_size
        self._lock = anyio.Lock(fast_acquire=True)
        self.closed = False
        self.close_reason = ""
        # What ``aclose`` (called by the dispatcher) says; 1001 once the server stops.
        self.going_away = False

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        if self.closed:
            raise ConnectionLostError(f"the websocket is closed ({self.close_reason})")
        async with self._lock:
            # Once started, the frames are finished: a cut one would corrupt the rest.
            with anyio.CancelScope(shield=True):
                for message in _messages(pieces):
                    try:
                        await self._send({"type": "websocket.send", "bytes": message})
                    except Exception as exc:  # the server's connection is gone
                        self.closed = True
                        raise ConnectionLostError(f"sending failed: {exc!r}") from exc

    async def receive_frame(self) -> bytes:
        if self.closed:
            raise ConnectionLostError(f"the websocket is closed ({self.close_reason})")
        message = await self._receive()
        kind = message.get("type")
        if kind == "websocket.receive":
            data = message.get("bytes")
            if data is None:
                await self.close(
                    _UNSUPPORTED_DATA, "remote-exec takes binary messages only, not text"
                )
                raise ConnectionLostError("the client sent a text message: connection closed")
            if self._max_size is not None and len(data) > self._max_size:
                await self.close(_TOO_BIG, "message too big")
                raise ConnectionLostError("the client sent a message over the size cap")
            return bytes(data)
        self.closed = True
        if kind == "websocket.disconnect":
            self.close_reason = f"client disconnected, code {message.get('code')}"
            raise ConnectionLostError(f"the client went away ({self.close_reason})")
        self.close_reason = f"unexpected ASGI message {kind!r}"
        raise ConnectionLostError(self.close_reason)

    async def close(self, code: int = _NORMAL, reason: str = "") -> None:
        """Close the websocket with ``code`` and ``reason`` (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason or f"code {code}"
        with anyio.CancelScope(shield=True):
            # Already gone: nothing left to close.
            with contextlib.suppress(Exception):
                async with self._lock:
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def aclose(self) -> None:
        if self.going_away:
            await self.close(_GOING_AWAY, "server shutting down")
        else:
            await self.close(_NORMAL, "")


def _messages(pieces: Sequence[bytes | memoryview]) -> Iterator[bytes]:
    """The websocket messages that carry ``pieces``, each a bytes object.

    ASGI sends a message as one bytes object and has no fragments. Up to
    ``CUT_ABOVE`` bytes the pieces travel joined, as one message. A larger run
    of frames is cut into equal messages of at most ``MESSAGE_CHUNK`` bytes,
    which the client joins again (``FrameAssembler``): a 64 MiB reply then
    never takes more than a few chunks of memory on its way out, where one
    message would be copied whole three times (joined, framed by wsproto,
    buffered by the socket). Equal cuts leave no tiny last message.
    """
    total = sum(piece.nbytes if isinstance(piece, memoryview) else len(piece) for piece in pieces)
    if total <= CUT_ABOVE:
        yield pieces[0] if len(pieces) == 1 and type(pieces[0]) is bytes else b"".join(pieces)
        return
    count = -(-total // MESSAGE_CHUNK)
    size = -(-total // count)
    chunk = bytearray()
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while view:
            if not chunk and len(view) >= size:
                yield bytes(view[:size])
                view = view[size:]
                continue
            room = size - len(chunk)
            chunk += view[:room]
            view = view[room:]
            if len(chunk) == size:
                yield bytes(chunk)
                chunk.clear()
    if chunk:
        yield bytes(chunk)


class _Websocket:
    """An accepted websocket, as the app tracks it (to cancel it on shutdown)."""

    __slots__ = ("cancel_scope", "peer", "transport")

    def __init__(self, transport: ASGIWebSocketTransport, peer: str) -> None:
        self.transport = transport
        self.peer = peer
        self.cancel_scope = anyio.CancelScope()


class RemoteExecApp:
    """The ASGI app: see the module docstring. Made by ``create_app``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        token: str | None,
        allowed_origins: Sequence[str] = (),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        limits: Limits | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.dispatcher = dispatcher
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self._token = token
        self._origins = frozenset(origin.rstrip("/").lower() for origin in allowed_origins)
        self._connections: set[_Websocket] = set()
        self._closing = False
        self._dispatcher_closed = False
        self._startup_hooks: list[Callable[[], Any]] = []

    # -- ASGI entry point ------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    def on_startup(self, hook: Callable[[], Any]) -> None:
        """Call ``hook()`` once the server has started (ASGI lifespan startup)."""
        self._startup_hooks.append(hook)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- lifespan ----------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for hook in self._startup_hooks:
                        hook()
                except Exception as exc:
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown(0)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- checks --------------------------------------------------------------------------
    def _authorized(self, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        """None if the token is right, else (HTTP status, reason)."""
        if self._token is None:
            return None
        given = bearer_token(headers.get(b"authorization"))
        if check_token(self._token, given):
            return None
        if given is None:
            return 401, "missing token: send it as an 'Authorization: Bearer <token>' header"
        return 401, "invalid token"

    def _origin_refused(self, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        origin = headers.get(b"origin")
        if origin is None:  # not a browser
            return None
        value = origin.decode("latin-1").rstrip("/").lower()
        if value in self._origins or "*" in self._origins:
            return None
        return 403, f"origin {value!r} is not allowed (see --allowed-origin)"

    # -- websocket -----------------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message.get("type") != "websocket.connect":
            return
        headers = _headers(scope)
        peer = _peer(scope)
        refusal = self._origin_refused(headers) or self._authorized(headers)
        if refusal is None and self._closing:
            refusal = 503, "the server is shutting down"
        if refusal is None and len(self._connections) >= self.max_connections:
            refusal = 503, f"too many connections (the cap is {self.max_connections})"
        if refusal is not None:
            logger.warning("refused websocket from %s: %s", peer or "?", refusal[1])
            await _deny(scope, send, *refusal)
            return
        transport = ASGIWebSocketTransport(receive, send, max_size=self.limits.max_message_size)
        connection = _Websocket(transport, peer)
        self._connections.add(connection)  # before any await: the cap holds
        try:
            await send({"type": "websocket.accept"})
            logger.info("client %s connected", peer or "?")
            with connection.cancel_scope:
                await self.dispatcher.serve(transport, peer=peer)
        except Exception:
            # Never let one connection's failure reach the server.
            logger.exception("connection from %s failed", peer or "?")
            await transport.close(_INTERNAL_ERROR, "internal server error")
        finally:
            self._connections.discard(connection)
            await transport.close(_NORMAL, "")
            logger.info("client %s disconnected", peer or "?")

    # -- HTTP ------------------------------------------------------------------------------
    async def _http(self, scope: Scope, send: Send) -> None:
        method = scope.get("method", "GET")
        path = scope.get("path", "/").rstrip("/") or "/"
        if path not in ("/health", "/instances"):
            await _json(send, 404, {"error": "not found"}, method)
            return
        if method not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "method not allowed"}, method, [(b"allow", b"GET")])
            return
        if path == "/health":
            await _json(send, 200, {"status": "ok"}, method)
            return
        refusal = self._authorized(_headers(scope))
        if refusal is not None:
            await _json(
                send,
                refusal[0],
                {"error": refusal[1]},
                method,
                [(b"www-authenticate", b"Bearer")],
            )
            return
        body = {
            "instances": sorted(self.dispatcher.registry.instance_names()),
            "statistics": self.dispatcher.statistics(),
        }
        await _json(send, 200, body, method)

    # -- shutdown ---------------------------------------------------------------------------
    def _in_flight(self) -> int:
        try:
            stats = self.dispatcher.statistics()
        except Exception:  # noqa: BLE001 - never let statistics stop a shutdown
            return 0
        value = stats.get("calls_in_flight", 0)
        return value if isinstance(value, int) else 0

    async def shutdown(self, grace: float = 5.0) -> None:
        """Refuse new connections, let in-flight calls finish for up to ``grace``
        seconds, then cancel the rest (their callers get an error) and close
        every connection with code 1001. Idempotent."""
        self._closing = True
        for connection in self._connections:
            connection.transport.going_away = True
        if grace > 0 and self._in_flight():
            logger.info("waiting up to %s s for in-flight calls", grace)
            with anyio.move_on_after(grace):
                # The dispatcher has no "idle" event to wait on: look now and then.
                while self._in_flight():  # noqa: ASYNC110
                    await anyio.sleep(_IDLE_POLL)
        if not self._dispatcher_closed:
            self._dispatcher_closed = True
            try:
                await self.dispatcher.aclose()
            except Exception:
                logger.exception("closing the dispatcher failed")
        for connection in list(self._connections):
            await connection.transport.close(_GOING_AWAY, "server shutting down")
            connection.cancel_scope.cancel()

    def statistics(self) -> dict[str, Any]:
        return {"connections": len(self._connections), "closing": self._closing}


def create_app(
    dispatcher: Dispatcher,
    *,
    token: str | None,
    allowed_origins: Sequence[str] = (),
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    limits: Limits | None = None,
) -> RemoteExecApp:
    """The ASGI app serving ``dispatcher``.

    Args:
        dispatcher: answers the calls of every connection.
        token: the bearer token clients must send (None: no authentication).
        allowed_origins: browser origins allowed to connect (``"*"``: any);
            requests without an ``Origin`` header (non-browser clients) pass.
        max_connections: websocket connections served at once.
        limits: ``max_message_size`` caps incoming messages.
    """
    return RemoteExecApp(
        dispatcher,
        token=token,
        allowed_origins=allowed_origins,
        max_connections=max_connections,
        limits=limits,
    )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name (the first value of each)."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(bytes(name).lower(), bytes(value))
    return headers


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def _deny(scope: Scope, send: Send, status: int, reason: str) -> None:
    """Refuse a websocket handshake with an HTTP response saying why."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = reason.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # the server answers 403 for a close before accept
        await send({"type": "websocket.close", "code": _POLICY})


async def _json(
    send: Send,
    status: int,
    payload: Any,
    method: str = "GET",
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    body = json.dumps(payload, default=str).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def hypercorn_config(
    sock: socket.socket,
    *,
    limits: Limits | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    ping_interval: float | None = DEFAULT_PING_INTERVAL,
    graceful_timeout: float = 0.5,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
) -> Config:
    """A hypercorn ``Config`` serving on the bound, listening ``sock``.

    The socket is handed over as ``fd://N`` (hypercorn owns it afterwards), so
    a port the kernel picked (port 0) is served without a race. Websocket
    messages are capped at ``limits.max_message_size`` (hypercorn stops
    buffering a message, and closes with 1009, once it exceeds that); hypercorn
    pings every ``ping_interval`` seconds (None: never). ``graceful_timeout`` is
    short because ``serve`` has already drained the app when hypercorn starts
    waiting.

    Args:
        handshake_timeout: seconds a connection may take for its TLS handshake
            and to send a whole HTTP request (slow or stalled handshakes are
            dropped); also how long an idle HTTP keep-alive connection stays.
        idle_timeout: seconds without receiving a single byte before the
            connection is dropped (None: never). A live websocket client answers
            every ping, so keep this well above ``ping_interval``: then only a
            peer that vanished, or stopped reading and writing, reaches it.
    """
    if handshake_timeout <= 0:
        raise ValueError("handshake_timeout must be positive")
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError("idle_timeout must be positive (or None)")
    limits = limits or Limits()
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.websocket_max_message_size = limits.max_message_size
    config.websocket_ping_interval = ping_interval
    # A whole HTTP request (the websocket upgrade, with its token) must arrive
    # within the keep-alive timeout: hypercorn's idle timer runs from accept
    # until a complete request, then stops for the websocket's lifetime.
    config.keep_alive_timeout = handshake_timeout
    config.ssl_handshake_timeout = handshake_timeout
    # Every read from the socket, handshake and websocket alike (hypercorn
    # types it int, but hands it to wait_for / fail_after: any float works).
    config.read_timeout = idle_timeout  # type: ignore[assignment]
    config.certfile = certfile
    config.keyfile = keyfile
    config.alpn_protocols = ["http/1.1"]  # websockets over HTTP/1.1 only
    config.graceful_timeout = graceful_timeout
    config.include_server_header = False
    config.accesslog = None  # stdout carries only the "serving on" line
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(
    app: RemoteExecApp,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    grace: float = 5.0,
) -> None:
    """Run hypercorn on the current event loop (asyncio or trio) until
    ``shutdown_trigger()`` returns, then shut down gracefully.

    The app drains first (``app.shutdown(grace)``: new websockets are refused,
    in-flight calls get ``grace`` seconds, then the rest are cancelled and
    every connection closed); only then does hypercorn stop, waiting at most
    ``config.graceful_timeout`` for what is left of its connections.
    """

    async def drained() -> None:
        await shutdown_trigger()
        await app.shutdown(grace)

    harden_hypercorn()
    asgi = cast(Any, app)
    if is_trio():
        from hypercorn.trio import serve as trio_serve

        await trio_serve(asgi, config, shutdown_trigger=drained, mode="asgi")
        return
    # hypercorn's asyncio worker leaves its task with a pending cancellation
    # (CPython 3.11's TaskGroup does not undo the cancel it sends its parent
    # once it started exiting): give it a task of its own.
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_serve_asyncio, asgi, config, drained)


class _DeclinedDeflate(PerMessageDeflate):
    """permessage-deflate that declines every offer, so it is never enabled.

    With the extension off, a frame with the compression bit set is a protocol
    error (close 1002): the server never inflates anything a client sends.
    """

    def accept(self, offer: str) -> None:
        return None


class _CappedWebsocketBuffer(WebsocketBuffer):
    """hypercorn's message buffer, made to stop growing at its cap.

    hypercorn writes each chunk before comparing the length with the cap, and
    after it has closed with 1009 it goes on feeding the rest of the message
    (a frame may claim 2**63 bytes) into the same buffer: a client that keeps
    sending would fill the daemon's memory. Here a chunk that would pass the
    cap is dropped, and so is every later one.
    """

    def extend(self, event: WSMessage[Any]) -> None:
        if self.length + len(event.data) > self.max_length:
            self.length = self.max_length + 1  # stays over: later chunks are dropped too
            raise FrameTooLargeError()
        super().extend(event)


def harden_hypercorn() -> None:
    """Close two holes of hypercorn's websocket handling (idempotent, process-wide).

    * Compression: hypercorn offers no setting for it and accepts
      permessage-deflate whenever a client (every browser) offers it; its
      inflater has no output cap, so a small frame could inflate to gigabytes
      before the size cap is checked. hypercorn builds the extension from the
      name ``PerMessageDeflate`` of its ``ws_stream`` module: that name becomes
      a subclass that declines every offer. Clients then talk uncompressed,
      which is what remote-exec's binary frames want anyway.
    * Size cap: ``WebsocketBuffer`` of the same module becomes a subclass that
      never grows past ``websocket_max_message_size`` (see above).

    Raises:
        RuntimeError: this hypercorn builds its websockets another way: refuse
            to serve rather than serve with these holes open.
    """
    from hypercorn.protocol import ws_stream

    names = vars(ws_stream)
    if names.get("PerMessageDeflate") not in (PerMessageDeflate, _DeclinedDeflate) or names.get(
        "WebsocketBuffer"
    ) not in (WebsocketBuffer, _CappedWebsocketBuffer):
        raise RuntimeError(
            "this hypercorn version builds its websockets in an unknown way: cannot turn "
            "off compression and cap message buffers (see remote_exec.server.app)"
        )
    names["PerMessageDeflate"] = _DeclinedDeflate
    names["WebsocketBuffer"] = _CappedWebsocketBuffer
    _harden_trio_sends()


def _harden_trio_sends() -> None:
    """Keep one closing connection from taking down the trio daemon.

    hypercorn's trio ``TCPServer`` half-closes a connection (``send_eof`` in
    ``_close``) without its send lock; a send racing it raises
    ``trio.BusyResourceError``, which its ``protocol_send`` does not catch and
    which then cancels every connection of the server. Such a send can only
    race a close, so it is handled as the connection closing.
    """
    import trio
    from hypercorn.events import Closed
    from hypercorn.trio import tcp_server

    original = tcp_server.TCPServer.protocol_send
    if getattr(original, "_remote_exec_hardened", False):
        return

    async def protocol_send(self: Any, event: Any) -> None:
        try:
            await original(self, event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    protocol_send._remote_exec_hardened = True  # type: ignore[attr-defined]
    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]


async def _serve_asyncio(
    asgi: Any, config: Config, shutdown_trigger: Callable[[], Awaitable[None]]
) -> None:
    import asyncio

    from hypercorn.asyncio import serve as asyncio_serve

    drained = False

    async def trigger() -> None:
        nonlocal drained
        await shutdown_trigger()
        drained = True

    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # hypercorn cancels connection tasks that outlive ``graceful_timeout``
        # (a websocket keepalive task sleeping out its interval); asyncio then
        # reports the cancellation as an error. It is not one.
        if drained and isinstance(context.get("exception"), asyncio.CancelledError):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        await asyncio_serve(asgi, config, shutdown_trigger=trigger, mode="asgi")
    except asyncio.CancelledError:
        # ... and then lets their CancelledError escape ``serve``: once the app
        # has drained, that is the end of a graceful shutdown, not a cancellation.
        if not drained:
            raise
    finally:
        loop.set_exception_handler(previous)
