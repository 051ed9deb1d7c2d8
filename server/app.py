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
* ``GET /invocations`` (query ``instance``, ``method``, ``status``, ``limit``),
  ``GET /invocations/{id}`` and ``DELETE /invocations/{id}`` (cancel): behind
  the token and the ``Origin`` check, JSON as ``InvocationInfo.to_wire``
  (``docs/wire-format.md``); with ``--history``, older ones come from the
  history file (``remote_exec.server.history``).
* ``GET /``, ``/status.js``, ``/status.css``: the status page, open (it holds
  no data); ``GET /status`` and ``GET /events`` (server-sent events), behind
  the token and the ``Origin`` check: what the page shows
  (``remote_exec.server.status``). The page's requests come from the
  daemon's own origin, which these paths (and ``/invocations``) allow.
* anything else: 404.

Every request, websocket or HTTP, must name the daemon in its ``Host`` header
(``HostAllowList``: loopback names, the bound address, ``--allow-host``), or
it gets HTTP 403: a DNS-rebinding web page cannot reach a loopback daemon.

``RemoteExecApp.shutdown(grace)`` stops taking connections, gives in-flight
calls ``grace`` seconds, then cancels what is left (callers get an error) and
closes every websocket with code 1001.

What hypercorn enforces for the app (see ``hypercorn_config``): a connection
must finish its TLS and HTTP handshake within ``handshake_timeout``; one on
which nothing at all arrives for ``idle_timeout`` (no message, no pong to the
pings sent every ``ping_interval``) is dropped, which is how a client that
vanished without a close frame is found; a websocket message is never buffered
past ``max_message_size`` and permessage-deflate is always declined, so that
no message is ever decompressed; nothing of a connection (its socket, its
buffers, its tasks) outlives it (``harden_hypercorn``, called by ``serve``).
Every TCP connection passes a ``ConnectionGate``, which caps those that have
not authenticated a websocket, and keeps them from exhausting the process's
file descriptors.

A client that reads its replies slower than it sends calls is held back: past
``max_outgoing_bytes`` of replies waiting for it, its connection reads nothing
more (``Connection``), so hypercorn's queue for it fills and its TCP window
closes. One that reads nothing of a message for ``idle_timeout`` (or for the
grace, once the server shuts down) has its TCP connection dropped at once
(``ASGIWebSocketTransport.watch_sends``), and the disconnect reaches the app
even while it is not reading (``_guarded_put``). ``docs/security.md`` lists
every default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import json
import logging
import math
import socket
import time
import urllib.parse
from collections import deque
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

from .connection import DEFAULT_MAX_OUTGOING_BYTES
from .history import cancel_invocation, get_invocation, list_invocations
from .status import StatusPage

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PENDING_CONNECTIONS",
    "DEFAULT_PING_INTERVAL",
    "FD_RESERVE",
    "ASGIWebSocketTransport",
    "ConnectionGate",
    "HostAllowList",
    "RemoteExecApp",
    "create_app",
    "harden_hypercorn",
    "hypercorn_config",
    "serve",
]

logger = logging.getLogger("remote_exec.server")
# What peers do before they authenticate (refused handshakes, dropped
# connections): anyone can make it say a lot, so the daemon rate-limits it.
peer_logger = logging.getLogger("remote_exec.server.peers")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_CONNECTIONS = 64
# TCP connections that have not authenticated a websocket yet: past the cap,
# the oldest of them is dropped to make room (see ``ConnectionGate``).
DEFAULT_MAX_PENDING_CONNECTIONS = 128
# File descriptors connections never take (of the process's RLIMIT_NOFILE):
# the daemon's own, its instances' files, and the next accept.
FD_RESERVE = 32
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
    """A ``FrameTransport`` over an accepted ASGI websocket: one frame per binary message.

    A client that stops reading stops the daemon's writes to it, and nothing
    can cut a message short (it would corrupt the connection): ``watch_sends``
    drops the TCP connection (``abort``) of a client that has not read one
    message within the stall timeout, or within the grace once the server is
    shutting down. ``max_outgoing_bytes`` is for the ``Connection``: the bytes
    of replies that may wait to be written before it stops reading
    (``remote_exec.server.connection.DEFAULT_MAX_OUTGOING_BYTES``).
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        *,
        max_size: int | None = None,
        max_outgoing_bytes: int | None = None,
        abort: Callable[[], object] | None = None,
        peer: str = "",
    ) -> None:
        self._receive = receive
        self._send = send
        self._max_size = max_size
        self.max_outgoing_bytes = max_outgoing_bytes
        self._abort = abort  # closes the TCP connection at once (None: cannot)
        self.peer = peer
        self._lock = anyio.Lock(fast_acquire=True)
        self.closed = False
        self.close_reason = ""
        self.aborted = False
        # What ``aclose`` (called by the dispatcher) says; 1001 once the server stops.
        self.going_away = False
        # When the message being written began (time.monotonic()), None between
        # messages; and what ``watch_sends`` goes by.
        self._send_began: float | None = None
        self._stall_timeout: float | None = None
        self._going_away_at: float | None = None
        self._grace = 0.0
        self._poke: anyio.Event | None = None

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        if self.closed:
            raise ConnectionLostError(f"the websocket is closed ({self.close_reason})")
        async with self._lock:
            # Once started, the frames are finished: a cut one would corrupt the rest.
            with anyio.CancelScope(shield=True):
                for message in _messages(pieces):
                    self._send_began = time.monotonic()
                    try:
                        await self._send({"type": "websocket.send", "bytes": message})
                    except Exception as exc:  # the server's connection is gone
                        self.closed = True
                        raise ConnectionLostError(f"sending failed: {exc!r}") from exc
                    finally:
                        self._send_began = None
                    if self.aborted:
                        raise ConnectionLostError(
                            f"the connection was dropped: {self.close_reason}"
                        )

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

    def go_away(self, grace: float) -> None:
        """The server is shutting down: close with 1001, and a message that has
        not gone out within ``grace`` seconds from now drops the connection."""
        self.going_away = True
        self._going_away_at = time.monotonic()
        self._grace = grace
        if self._poke is not None:
            self._poke.set()

    def abort(self, reason: str) -> None:
        """Drop the TCP connection at once (what is buffered for it goes too):
        a send stuck on it fails, and so does everything after it."""
        if self.aborted:
            return
        self.aborted = self.closed = True
        self.close_reason = reason
        if self._abort is not None:
            with contextlib.suppress(Exception):  # gone already
                self._abort()

    def _deadline(self) -> float:
        """When the message being written has taken too long (inf: never, or none)."""
        began = self._send_began
        if began is None:
            return math.inf
        deadline = began + self._stall_timeout if self._stall_timeout else math.inf
        if self._going_away_at is not None:
            deadline = min(deadline, max(began, self._going_away_at) + self._grace)
        return deadline

    async def watch_sends(self, stall_timeout: float | None) -> None:
        """Drop the connection of a client that does not read: one websocket
        message (at most ``CUT_ABOVE`` bytes) not written within
        ``stall_timeout`` seconds (None: no limit), or within the grace once
        the server is going away. Runs until cancelled, or until it drops it.

        The check costs nothing per message (a clock read): this task sleeps
        until the message under way, if any, could first be late.
        """
        self._stall_timeout = stall_timeout
        while not self.aborted:
            now = time.monotonic()
            deadline = self._deadline()
            if deadline <= now:
                took = now - (self._send_began or now)
                if self._stall_timeout and took >= self._stall_timeout:
                    why = f"it read nothing for {took:.0f} s"
                else:
                    why = "the server is shutting down"
                logger.warning(
                    "client %s is not reading its replies (%s): connection dropped",
                    self.peer or "?",
                    why,
                )
                self.abort(f"the client did not read its replies ({why})")
                return
            if deadline == math.inf:
                # Nothing under way: a message begun from now on is late no earlier than this.
                limits = [self._stall_timeout or math.inf]
                if self._going_away_at is not None:
                    limits.append(self._grace)
                wait = min(limits)
            else:
                wait = deadline - now
            self._poke = poke = anyio.Event()
            with anyio.move_on_after(wait):
                await poke.wait()


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


class _Admitted:
    """One TCP connection, as ``ConnectionGate`` tracks it."""

    __slots__ = ("close", "dropped", "key", "peer", "released")

    def __init__(self, peer: tuple[str, int] | None, close: Callable[[], object]) -> None:
        self.peer = peer
        self.key: object = peer if peer is not None else self
        self.close = close
        self.dropped = False  # closed by the gate, to make room
        self.released = False  # its socket is closed, and hypercorn is done with it


class ConnectionGate:
    """Every TCP connection hypercorn serves, from accept to close, and a cap on
    the *pending* ones: those that have not (yet) authenticated a websocket.

    Before the token is checked anyone can open connections, and each holds a
    file descriptor until its handshake times out. Past ``max_pending``, or
    when the connections would take the last ``fd_reserve`` descriptors of the
    process's limit, the oldest pending connection is dropped to make room for
    the new one: a flood of silent or slow sockets then costs each of them its
    place within moments, a client that completes its handshake promptly still
    gets in, and authenticated connections are never touched. Were the
    descriptors exhausted all the same (``accept`` failing with EMFILE), the
    oldest pending connection goes too.

    asyncio accepts up to 100 connections in a row, and only a few loop
    iterations later does each reach hypercorn (``admit``): its listening
    socket asks ``before_accept`` first, which counts the sockets accepted and
    not yet admitted, and makes room before the descriptors run out.
    """

    def __init__(
        self, max_pending: int, *, fd_reserve: int = FD_RESERVE, stale_after: float = 30.0
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
        self.fd_reserve = fd_reserve
        self.stale_after = stale_after
        self._pending: dict[object, _Admitted] = {}  # oldest first
        self._by_peer: dict[tuple[str, int], _Admitted] = {}  # every open one with a peer
        self._open = 0  # admitted connections not released yet (closing ones included)
        self._closing = 0  # of those, the ones dropped: their descriptors are on their way
        # When each socket accepted through ``before_accept`` and not admitted
        # yet was accepted; one that never is (a failed TLS handshake under
        # asyncio) stops counting after ``stale_after`` seconds.
        self._accepting: deque[float] = deque()
        self.dropped = 0  # pending connections dropped to make room, in all
        self._last_exhausted = -math.inf

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def open(self) -> int:
        """Sockets held: admitted and not released, or accepted and not admitted yet."""
        return self._open + len(self._accepting)

    def admit(self, peer: tuple[str, int] | None, close: Callable[[], object]) -> _Admitted:
        """A connection was accepted: track it, and make room if needed.

        Args:
            peer: its (host, port) as the ASGI scope's ``client`` will say it.
            close: closes its socket at once (a sync call).
        """
        entry = _Admitted(peer, close)
        if self._accepting:
            self._accepting.popleft()
        older = self._pending.pop(entry.key, None)
        if older is not None:  # its port was reused before it was released
            older.key = older
            self._pending[older] = older
        self._pending[entry.key] = entry
        if peer is not None:
            self._by_peer[peer] = entry
        self._open += 1
        budget = self.descriptor_budget()
        while len(self._pending) > 1:
            if len(self._pending) > self.max_pending:
                why = f"more than {self.max_pending} connections had not authenticated"
            elif self.open - self._closing > budget:
                why = self._short_of_descriptors(budget)
            else:
                break
            self._drop(next(iter(self._pending.values())), why)
        return entry

    def before_accept(self) -> bool:
        """The listening socket is about to accept. False (accept nothing now,
        the event loop tries again next round) while the descriptors are short
        and room is on its way: dropped sockets still closing, or, with none,
        the oldest pending connection dropped now, or sockets accepted a moment
        ago that will be pending once admitted. With every connection
        authenticated: True (the reserve is there for that)."""
        now = time.monotonic()
        while self._accepting and now - self._accepting[0] > self.stale_after:
            self._accepting.popleft()
        budget = self.descriptor_budget()
        if self.open >= budget:
            if self._closing or self._accepting:
                return False
            if self._pending:
                self._drop(next(iter(self._pending.values())), self._short_of_descriptors(budget))
                return False
        self._accepting.append(now)
        return True

    def not_accepted(self) -> None:
        """The accept that ``before_accept`` allowed found nothing (or failed)."""
        if self._accepting:
            self._accepting.pop()

    def authenticated(self, peer: Any) -> None:
        """The connection of ``peer`` (a scope's ``client``) authenticated a websocket."""
        if peer:
            self._pending.pop(tuple(peer), None)

    def closer(self, peer: Any) -> Callable[[], object] | None:
        """What closes the TCP connection of ``peer`` (a scope's ``client``) at
        once, while it is open; None if there is none."""
        entry = self._by_peer.get(tuple(peer)) if peer else None
        return None if entry is None else entry.close

    def release(self, entry: _Admitted) -> None:
        """The connection is over: its socket is closed."""
        if entry.released:
            return
        entry.released = True
        if self._pending.get(entry.key) is entry:
            del self._pending[entry.key]
        if entry.peer is not None and self._by_peer.get(entry.peer) is entry:
            del self._by_peer[entry.peer]
        self._open -= 1
        if entry.dropped:
            self._closing -= 1

    def descriptors_exhausted(self) -> None:
        """``accept`` failed for want of file descriptors: drop the oldest pending connection
        (at most one every 50 ms: asyncio reports each of many failed accepts in a row)."""
        now = time.monotonic()
        if now - self._last_exhausted < 0.05:
            return
        self._last_exhausted = now
        if self._pending:
            self._drop(next(iter(self._pending.values())), "no file descriptors left")
        else:
            peer_logger.warning(
                "cannot accept connections: no file descriptors left, and every open "
                "connection has authenticated"
            )

    def descriptor_budget(self) -> float:
        """How many connections may hold a socket at once: the process's
        file-descriptor limit, less ``fd_reserve``."""
        try:
            import resource
        except ImportError:  # pragma: no cover - not on this platform
            return math.inf
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return math.inf
        return max(1, soft - self.fd_reserve)

    def _short_of_descriptors(self, budget: float) -> str:
        return f"file descriptors are short ({self.open} connections, room for {budget:g})"

    def _drop(self, entry: _Admitted, why: str) -> None:
        del self._pending[entry.key]
        entry.dropped = True
        self._closing += 1
        self.dropped += 1
        peer = f"{entry.peer[0]}:{entry.peer[1]}" if entry.peer else "?"
        peer_logger.warning("dropped connection from %s before authentication: %s", peer, why)
        with contextlib.suppress(Exception):  # already closing: nothing left to do
            entry.close()

    def statistics(self) -> dict[str, int]:
        return {"pending": len(self._pending), "open": self.open, "dropped": self.dropped}


class _GatedListener(socket.socket):
    """The daemon's listening socket under asyncio: each ``accept`` asks the gate first.

    (trio accepts one connection at a time, and each reaches
    ``ConnectionGate.admit`` at once; it also wants a plain socket.)
    """

    gate: ConnectionGate

    @classmethod
    def adopt(cls, sock: socket.socket, gate: ConnectionGate) -> _GatedListener:
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.gate = gate
        return listener

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.gate.before_accept():
            raise BlockingIOError(errno.EAGAIN, "making room: accept again later")
        try:
            return super().accept()
        except OSError:
            self.gate.not_accepted()
            raise


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
        allowed_hosts: Iterable[str] = (),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS,
        max_outgoing_bytes: int = DEFAULT_MAX_OUTGOING_BYTES,
        limits: Limits | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_pending_connections < 1:
            raise ValueError("max_pending_connections must be at least 1")
        if max_outgoing_bytes < 1:
            raise ValueError("max_outgoing_bytes must be at least 1")
        self.dispatcher = dispatcher
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.max_pending_connections = max_pending_connections
        self.max_outgoing_bytes = max_outgoing_bytes
        # Set by ``serve``: the gate every TCP connection passes, and the time
        # a client may take to read one message before it is dropped (the
        # idle timeout; None: no limit).
        self.gate: ConnectionGate | None = None
        self.stall_timeout: float | None = None
        self._token = token
        self._origins = frozenset(origin.rstrip("/").lower() for origin in allowed_origins)
        self.hosts = HostAllowList(allowed_hosts)
        self._connections: set[_Websocket] = set()
        self._closing = False
        self._dispatcher_closed = False
        self._startup_hooks: list[Callable[[], Any]] = []
        self.status_page = StatusPage(
            dispatcher,
            statistics=self.statistics,
            limits={
                **dataclasses.asdict(self.limits),
                "max_connections": max_connections,
                "max_pending_connections": max_pending_connections,
                "max_outgoing_bytes": max_outgoing_bytes,
            },
        )

    # -- ASGI entry point ------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send, receive)
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

    def _host_refused(self, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        """A ``Host`` off the allow-list: the request came through a name that
        is not this daemon's (a DNS-rebinding page reaching a loopback daemon)."""
        host = headers.get(b"host")
        if host is None or self.hosts.allows(host):  # no Host: HTTP/1.0, not a browser
            return None
        name = _host_name(host.decode("latin-1"))
        return 403, f"host {name!r} is not allowed (see --allow-host)"

    def _origin_refused(
        self, headers: dict[bytes, bytes], scope: Scope | None = None
    ) -> tuple[int, str] | None:
        """An ``Origin`` off the allow-list; with ``scope`` (an HTTP request of
        the status page's), the daemon's own origin passes too."""
        origin = headers.get(b"origin")
        if origin is None:  # not a browser
            return None
        value = origin.decode("latin-1").rstrip("/").lower()
        if value in self._origins or "*" in self._origins:
            return None
        if scope is not None and value == _own_origin(scope, headers):
            return None
        return 403, f"origin {value!r} is not allowed (see --allowed-origin)"

    # -- websocket -----------------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message.get("type") != "websocket.connect":
            return
        headers = _headers(scope)
        peer = _peer(scope)
        refusal = (
            self._host_refused(headers)
            or self._origin_refused(headers)
            or self._authorized(headers)
        )
        if refusal is None and self._closing:
            refusal = 503, "the server is shutting down"
        if refusal is None and len(self._connections) >= self.max_connections:
            refusal = 503, f"too many connections (the cap is {self.max_connections})"
        if refusal is not None:
            peer_logger.warning("refused websocket from %s: %s", peer or "?", refusal[1])
            await _deny(scope, send, *refusal)
            return
        abort = None
        if self.gate is not None:
            self.gate.authenticated(scope.get("client"))
            abort = self.gate.closer(scope.get("client"))
        transport = ASGIWebSocketTransport(
            receive,
            send,
            max_size=self.limits.max_message_size,
            max_outgoing_bytes=self.max_outgoing_bytes,
            abort=abort,
            peer=peer,
        )
        connection = _Websocket(transport, peer)
        self._connections.add(connection)  # before any await: the cap holds
        async with anyio.create_task_group() as watching:
            # Outside the connection's cancel scope: it may still have to drop a
            # client that does not read while the connection closes.
            watching.start_soon(transport.watch_sends, self.stall_timeout)
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
                watching.cancel_scope.cancel()

    # -- HTTP ------------------------------------------------------------------------------
    async def _http(self, scope: Scope, send: Send, receive: Receive | None = None) -> None:
        method = scope.get("method", "GET")
        path = scope.get("path", "/").rstrip("/") or "/"
        refused = self._host_refused(_headers(scope))
        if refused is not None:
            peer_logger.warning("refused HTTP request from %s: %s", _peer(scope) or "?", refused[1])
            await _json(send, refused[0], {"error": refused[1]}, method)
            return
        if path == "/invocations" or path.startswith("/invocations/"):
            await self._invocations(scope, send, method, path)
            return
        if self.status_page.asset(path) is not None:
            await self.status_page.serve_asset(send, method, path)
            return
        if path in ("/status", "/events"):
            await self._status(scope, send, receive, method, path)
            return
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

    async def _status(
        self, scope: Scope, send: Send, receive: Receive | None, method: str, path: str
    ) -> None:
        """The status page's data: the daemon's description, and its event stream."""
        headers = _headers(scope)
        refusal = self._origin_refused(headers, scope) or self._authorized(headers)
        if refusal is not None:
            await _json(
                send, refusal[0], {"error": refusal[1]}, method, [(b"www-authenticate", b"Bearer")]
            )
            return
        if method not in ("GET", "HEAD") or (path == "/events" and method != "GET"):
            await _json(send, 405, {"error": "method not allowed"}, method, [(b"allow", b"GET")])
            return
        if path == "/status" or receive is None:
            await _json(send, 200, self.status_page.describe(), method)
            return
        if self.gate is not None:  # an authenticated stream: never dropped to make room
            self.gate.authenticated(scope.get("client"))
        # The browser sends nothing while it reads the stream, and the idle
        # timeout would cut it: it ends before, and the page opens the next.
        lifetime = 0.75 * self.stall_timeout if self.stall_timeout else None
        await self.status_page.stream(receive, send, lifetime=lifetime)

    async def _invocations(self, scope: Scope, send: Send, method: str, path: str) -> None:
        """The invocations the runtime knows: list, read one, cancel one."""
        headers = _headers(scope)
        refusal = self._origin_refused(headers, scope) or self._authorized(headers)
        if refusal is not None:
            await _json(
                send, refusal[0], {"error": refusal[1]}, method, [(b"www-authenticate", b"Bearer")]
            )
            return
        table = self.dispatcher.runtime.invocations
        history = self.dispatcher.history
        invocation_id = (
            urllib.parse.unquote(path[len("/invocations/") :]) if "/" in path[1:] else None
        )
        allowed = b"GET, DELETE" if invocation_id else b"GET"
        if method not in ("GET", "HEAD") and not (method == "DELETE" and invocation_id):
            await _json(send, 405, {"error": "method not allowed"}, method, [(b"allow", allowed)])
            return
        try:
            if invocation_id is None:
                query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
                filters = {
                    key: query[key][-1] for key in ("instance", "method", "status") if key in query
                }
                limit = int(query["limit"][-1]) if "limit" in query else None
                found = await list_invocations(table, history, limit=limit, **filters)
                body: Any = [info.to_wire() for info in found]
            elif method == "DELETE":
                body = (await cancel_invocation(table, history, invocation_id)).to_wire()
            else:
                body = (await get_invocation(table, history, invocation_id)).to_wire()
        except LookupError as exc:
            await _json(send, 404, {"error": str(exc)}, method)
            return
        except ValueError as exc:  # an unknown status, a bad limit
            await _json(send, 400, {"error": str(exc)}, method)
            return
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
        self.status_page.close()
        for connection in self._connections:
            # A client that does not read gets the grace too, then is dropped.
            connection.transport.go_away(grace)
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
        stats: dict[str, Any] = {"connections": len(self._connections), "closing": self._closing}
        if self.gate is not None:
            stats["tcp"] = self.gate.statistics()
        return stats


def create_app(
    dispatcher: Dispatcher,
    *,
    token: str | None,
    allowed_origins: Sequence[str] = (),
    allowed_hosts: Iterable[str] = (),
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS,
    max_outgoing_bytes: int = DEFAULT_MAX_OUTGOING_BYTES,
    limits: Limits | None = None,
) -> RemoteExecApp:
    """The ASGI app serving ``dispatcher``.

    Args:
        dispatcher: answers the calls of every connection.
        token: the bearer token clients must send (None: no authentication).
        allowed_origins: browser origins allowed to connect (``"*"``: any);
            requests without an ``Origin`` header (non-browser clients) pass.
        allowed_hosts: names a request's ``Host`` header may give besides the
            loopback ones (see ``HostAllowList``); the daemon passes the
            address it is bound to and each ``--allow-host``.
        max_connections: websocket connections served at once.
        max_pending_connections: TCP connections that have not authenticated
            yet (see ``ConnectionGate``).
        max_outgoing_bytes: bytes of replies that may wait to be written to
            one connection before the daemon stops reading from it, until its
            client has read them (back-pressure).
        limits: ``max_message_size`` caps incoming messages.
    """
    return RemoteExecApp(
        dispatcher,
        token=token,
        allowed_origins=allowed_origins,
        allowed_hosts=allowed_hosts,
        max_connections=max_connections,
        max_pending_connections=max_pending_connections,
        max_outgoing_bytes=max_outgoing_bytes,
        limits=limits,
    )


class HostAllowList:
    """The names a request's ``Host`` header may give (its port aside).

    Always allowed: the loopback names (``localhost`` and ``*.localhost``,
    which browsers resolve themselves, and loopback IP literals). Besides
    them, ``names``: host names and IP literals, compared case-insensitively;
    a wildcard address (``0.0.0.0``, ``::``) allows every IP literal (a
    daemon bound to every address is reached through any of its own, and a
    page cannot rebind an IP literal); ``"*"`` allows everything.

    A page that rebinds its own DNS name to 127.0.0.1 talks to a loopback
    daemon as if it were its own origin, but its requests carry its name in
    ``Host``: refusing names that are not the daemon's stops it.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.any_host = False
        self.any_ip = False
        allowed: set[str] = set()
        for raw in names:
            name = _host_name(raw)
            if name == "*":
                self.any_host = True
            elif name in ("0.0.0.0", "::"):  # a wildcard bind's address
                self.any_ip = True
            elif name:
                allowed.add(name)
        self.names = frozenset(allowed)

    def allows(self, host: bytes | str) -> bool:
        """Whether a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``) passes."""
        text = host.decode("latin-1") if isinstance(host, bytes) else host
        name = _host_name(text)
        if not name:
            return False
        if self.any_host or name in self.names:
            return True
        if name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self.any_ip

    def describe(self) -> str:
        """The allow-list, for the start-up log."""
        if self.any_host:
            return "any"
        parts = ["loopback names"]
        if self.any_ip:
            parts.append("any IP address")
        parts.extend(sorted(self.names))
        return ", ".join(parts)


def _host_name(host: str) -> str:
    """The name in a ``Host`` value, lower-case, without its port and a final dot."""
    text = host.strip().lower()
    if text.startswith("["):  # [v6] or [v6]:port
        inside, bracket, _ = text[1:].partition("]")
        return inside if bracket else ""
    if text.count(":") == 1:  # name:port (a bare v6 address has more colons)
        text = text.partition(":")[0]
    return text.rstrip(".")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name (the first value of each)."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(bytes(name).lower(), bytes(value))
    return headers


def _own_origin(scope: Scope, headers: dict[bytes, bytes]) -> str | None:
    """The origin of a page the daemon served on this request's ``Host``
    (already checked against the allow-list): ``http://127.0.0.1:8765``."""
    host = headers.get(b"host")
    if host is None:
        return None
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    name = host.decode("latin-1").strip().lower()
    default = ":443" if scheme == "https" else ":80"
    # An origin leaves the default port out.
    return f"{scheme}://{name.removesuffix(default)}"


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

    Every TCP connection passes through a ``ConnectionGate`` (``app.gate``)
    that caps those not yet authenticated at ``app.max_pending_connections``.
    """

    async def drained() -> None:
        await shutdown_trigger()
        await app.shutdown(grace)

    harden_hypercorn()
    app.stall_timeout = config.read_timeout or None
    gate = app.gate = ConnectionGate(
        app.max_pending_connections,
        stale_after=2 * (config.ssl_handshake_timeout or DEFAULT_HANDSHAKE_TIMEOUT),
    )
    setattr(config, _GATE, gate)
    asgi = cast(Any, app)
    if is_trio():
        from hypercorn.trio import serve as trio_serve

        accept_errors = _TrioAcceptErrors(gate)
        trio_logger = logging.getLogger("trio.serve_listeners")
        trio_logger.addFilter(accept_errors)
        try:
            await trio_serve(asgi, config, shutdown_trigger=drained, mode="asgi")
        finally:
            trio_logger.removeFilter(accept_errors)
        return
    # asyncio accepts through the listening socket's ``accept`` method (trio
    # through the base class's, and wants a plain socket): there the gate
    # makes room before the descriptors run out.
    create_sockets = config.create_sockets

    def gated_sockets() -> Any:
        sockets = create_sockets()
        for group in (sockets.secure_sockets, sockets.insecure_sockets):
            group[:] = [_GatedListener.adopt(sock, gate) for sock in group]
        return sockets

    config.create_sockets = gated_sockets  # type: ignore[method-assign]
    # hypercorn's asyncio worker leaves its task with a pending cancellation
    # (CPython 3.11's TaskGroup does not undo the cancel it sends its parent
    # once it started exiting): give it a task of its own.
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_serve_asyncio, asgi, config, drained, gate)


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
    cap is dropped, and so is every later one; what was buffered of that
    message is freed at once (it will never be delivered), not when the
    connection object goes.
    """

    def extend(self, event: WSMessage[Any]) -> None:
        if self.length + len(event.data) > self.max_length:
            self.length = self.max_length + 1  # stays over: later chunks are dropped too
            self.value = None
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
    * Lingering connections: nothing of a websocket outlives it, and a 1009
      close does not leave the connection half-open (``_harden_ws_streams``).

    Raises:
        RuntimeError: this hypercorn builds its websockets another way: refuse
            to serve rather than serve with these holes open.
    """
    from hypercorn.protocol import ws_stream

    names = vars(ws_stream)
    stream = names.get("WSStream")
    if (
        names.get("PerMessageDeflate") not in (PerMessageDeflate, _DeclinedDeflate)
        or names.get("WebsocketBuffer") not in (WebsocketBuffer, _CappedWebsocketBuffer)
        or not all(
            callable(getattr(stream, name, None))
            for name in ("handle", "app_send", "_send_pings", "_send_wsproto_event")
        )
    ):
        raise RuntimeError(
            "this hypercorn version builds its websockets in an unknown way: cannot turn "
            "off compression and cap message buffers (see remote_exec.server.app)"
        )
    names["PerMessageDeflate"] = _DeclinedDeflate
    names["WebsocketBuffer"] = _CappedWebsocketBuffer
    _harden_trio_sends()
    _harden_ws_streams()
    _gate_connections()


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


class _StreamGuard:
    """What the daemon keeps beside each of hypercorn's websocket streams."""

    __slots__ = ("app_done", "closed", "hanging_up", "put_scopes", "refusing")

    def __init__(self) -> None:
        self.closed = anyio.Event()  # the stream is over: its ping task returns at once
        self.app_done = False  # the app has returned: nothing it would receive is kept
        self.put_scopes: set[anyio.CancelScope] = set()  # puts waiting for room in the queue
        self.hanging_up = False  # a 1009 close went out: the peer's time to hang up runs
        self.refusing = False  # hypercorn answers the handshake itself: the app may not


def _guard(stream: Any) -> _StreamGuard:
    guard: _StreamGuard | None = stream.__dict__.get("_remote_exec_guard")
    if guard is None:
        guard = stream._remote_exec_guard = _StreamGuard()
    return guard


async def _dropped(message: Message) -> None:
    """The app's queue once the app has returned: what would go there is dropped."""


def _guarded_put(
    guard: _StreamGuard,
    put: Callable[[Message], Awaitable[None]],
    spawn: Callable[..., object] | None = None,
) -> Send:
    """``put`` (the app's bounded receive queue), but never stuck once the app
    has returned, and never stuck on the disconnect.

    hypercorn puts every received message, and then the disconnect, into a
    queue of ``max_app_queue_size`` that only the app reads; a put into a full
    queue waits for the app. Once the app has returned, a put would wait
    forever, with the connection's reading task and the queued messages
    (each up to the size cap) held with it: such puts return at once instead.

    The disconnect is put by whichever task finds the connection gone, often
    the app's own writer, whose failing send is what found it: waiting there
    for the app to make room, while the app's reader waits for that writer
    (it stops reading from a client that does not read its replies), would
    hold them both, and the connection, for good. A disconnect that finds
    the queue full is put by a task of its own (``spawn``), behind what is
    queued.
    """
    import asyncio

    import trio

    owner = getattr(put, "__self__", None)

    async def wait_for_room(message: Message) -> None:
        with anyio.CancelScope() as scope:
            guard.put_scopes.add(scope)
            try:
                await put(message)
            finally:
                guard.put_scopes.discard(scope)

    async def guarded(message: Message) -> None:
        if guard.app_done:
            return
        # With room in the queue, a put is what the queue's own would do.
        if isinstance(owner, asyncio.Queue):
            try:
                owner.put_nowait(message)  # asyncio's put does not yield then either
            except asyncio.QueueFull:
                pass
            else:
                return
        elif isinstance(owner, trio.MemorySendChannel):
            try:
                owner.send_nowait(message)
            except trio.WouldBlock:
                pass
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()  # as trio's send does
                return
        if spawn is not None and message.get("type") == "websocket.disconnect":
            try:
                spawn(wait_for_room, message)
            except RuntimeError:  # the connection's task group is closing: wait here
                pass
            else:
                return
        await wait_for_room(message)

    return guarded


async def _hang_up_after_too_big(stream: Any, guard: _StreamGuard) -> None:
    """After a 1009 close, the peer gets the handshake timeout to hang up;
    then its connection is dropped (and the app told) all the same."""
    from hypercorn.protocol.events import StreamClosed

    with anyio.move_on_after(stream.config.keep_alive_timeout):
        await guard.closed.wait()
    if not stream.closed:
        await stream.send(StreamClosed(stream_id=stream.stream_id))


def _harden_ws_streams() -> None:
    """Free each websocket's buffers, tasks and socket when it ends, not later.

    * hypercorn's ping task sleeps out its interval before it sees that its
      stream has closed, and the connection's task group (so its socket, left
      in CLOSE-WAIT, and the stream with its message buffer) waits for it:
      every connection that ended lingered up to ``ping_interval`` while the
      app, told it was over, no longer counted it. The task now returns as
      soon as the stream closes, and the stream's buffer is cleared then.
    * After a 1009 close the peer's end stays open until it hangs up (the
      rest of an endless message is read and dropped, never buffered): it
      gets the handshake timeout to do so, then the connection is dropped.
    * Once the app has returned, the app's receive queue takes nothing more
      (``_guarded_put``).
    * A handshake hypercorn refuses itself (a websocket request over HTTP/1.0,
      data sent before the upgrade was answered) is answered and the
      connection closed, and an app already started for it is told: it used
      to wait for a message forever, holding a place under the connection cap.
    """
    from hypercorn.protocol import ws_stream
    from hypercorn.protocol.events import Body, Data, Request, StreamClosed

    cls: Any = ws_stream.WSStream
    if getattr(cls.handle, "_remote_exec_hardened", False):
        return
    original_handle = cls.handle
    original_app_send = cls.app_send

    async def handle(self: Any, event: Any) -> None:
        guard = _guard(self)
        if (
            isinstance(event, (Body, Data))
            and not self.closed
            and self.state is ws_stream.ASGIWebsocketState.HANDSHAKE
            and not self.handshake.accepted
        ):
            # Data before the upgrade was answered: hypercorn answers 400
            # itself, and the app's own answer (which may come while that one
            # is being sent) would be a second response: h11 raises, and under
            # trio that took the whole server down.
            guard.refusing = True
        await original_handle(self, event)
        if isinstance(event, Request) and self.app_put is not None and not guard.app_done:
            self.app_put = _guarded_put(guard, self.app_put, self.task_group.spawn)
        if self.closed:
            if not guard.closed.is_set():
                self.buffer.clear()
                guard.closed.set()
                if not isinstance(event, StreamClosed):
                    # hypercorn refused the handshake itself (400, 404) and
                    # stopped there, leaving the connection open with no timer
                    # but the idle timeout, and an app it had started (data
                    # sent before the upgrade's answer) never told: end both.
                    if self.app_put is not None:
                        await self.app_put({"type": "websocket.disconnect", "code": 1006})
                    await self.send(StreamClosed(stream_id=self.stream_id))
        elif self.buffer.length > self.buffer.max_length and not guard.hanging_up:
            guard.hanging_up = True
            self.task_group.spawn(_hang_up_after_too_big, self, guard)

    async def app_send(self: Any, message: Message | None) -> None:
        guard = _guard(self)
        if message is None:  # the app has returned
            guard.app_done = True
            if self.app_put is not None:
                self.app_put = _dropped
            for scope in guard.put_scopes:
                scope.cancel()
        if guard.refusing:
            return
        await original_app_send(self, message)

    async def send_pings(self: Any) -> None:
        from wsproto.events import Ping

        guard = _guard(self)
        while not self.closed:
            await self._send_wsproto_event(Ping())
            with anyio.move_on_after(self.config.websocket_ping_interval):
                await guard.closed.wait()

    for patched in (handle, app_send, send_pings):
        cast(Any, patched)._remote_exec_hardened = True
    cls.handle = handle
    cls.app_send = app_send
    cls._send_pings = send_pings


# The config attribute through which the patched TCP servers find their gate.
_GATE = "_remote_exec_gate"


def _gate_connections() -> None:
    """Make hypercorn's TCP servers (asyncio's and trio's) report every
    connection to the ``ConnectionGate`` of their config, if it has one."""
    from hypercorn.asyncio import tcp_server as asyncio_server
    from hypercorn.trio import tcp_server as trio_server

    _gate_run(asyncio_server.TCPServer, _asyncio_socket)
    _gate_run(trio_server.TCPServer, _trio_socket)


def _asyncio_socket(server: Any) -> tuple[socket.socket, Callable[[], object]]:
    writer = server.writer
    return writer.get_extra_info("socket"), writer.transport.abort


def _trio_socket(server: Any) -> tuple[Any, Callable[[], object]]:
    try:
        sock = server.stream.transport_stream.socket  # TLS
    except AttributeError:
        sock = server.stream.socket
    return sock, sock.close


def _gate_run(cls: Any, socket_of: Callable[[Any], tuple[Any, Callable[[], object]]]) -> None:
    """Report each connection of ``cls`` (a hypercorn ``TCPServer``) to its gate,
    and let it end as soon as its socket is done.

    hypercorn stops a connection's keep-alive timer only when it finished a
    request: one that ends before (a silent socket that hangs up, one the gate
    dropped, a handshake cut short) kept its task, and under asyncio its
    socket, in CLOSE-WAIT, until the timer ran out. Once nothing more can be
    read, the timer is stopped, and the connection ends at once.
    """
    from hypercorn.utils import parse_socket_addr

    original = cls.run
    if getattr(original, "_remote_exec_hardened", False):
        return
    original_read_data = cls._read_data

    async def read_data(self: Any) -> None:
        await original_read_data(self)
        await self.idle_task.stop()

    async def run(self: Any) -> None:
        gate: ConnectionGate | None = getattr(self.config, _GATE, None)
        if gate is None:  # hypercorn serving something else in this process
            await original(self)
            return
        sock, close = socket_of(self)
        try:
            peer = parse_socket_addr(sock.family, sock.getpeername())
        except OSError:  # gone already
            peer = None
        entry = gate.admit(peer, close)
        try:
            await original(self)
        except Exception as exc:
            # Never let one connection's failure reach the server (under trio
            # it would cancel every connection). One the gate dropped may
            # raise for being closed under hypercorn's feet: it is gone anyway.
            if not entry.dropped:
                where = f"{peer[0]}:{peer[1]}" if peer else "?"
                peer_logger.warning("connection from %s failed in the server: %r", where, exc)
                logger.debug("connection from %s failed in the server", where, exc_info=True)
        finally:
            gate.release(entry)

    run._remote_exec_hardened = True  # type: ignore[attr-defined]
    cls.run = run
    cls._read_data = read_data


class _TrioAcceptErrors(logging.Filter):
    """trio's accept loop logs a traceback every 100 ms while file descriptors are
    exhausted: each becomes a (rate-limited) warning, and makes room."""

    def __init__(self, gate: ConnectionGate) -> None:
        super().__init__()
        self.gate = gate

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            self.gate.descriptors_exhausted()
            return False
        return True


_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def _serve_asyncio(
    asgi: Any,
    config: Config,
    shutdown_trigger: Callable[[], Awaitable[None]],
    gate: ConnectionGate,
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
        exception = context.get("exception")
        # hypercorn cancels connection tasks that outlive ``graceful_timeout``
        # (a websocket keepalive task sleeping out its interval); asyncio then
        # reports the cancellation as an error. It is not one.
        if drained and isinstance(exception, asyncio.CancelledError):
            return
        # asyncio reports (with a traceback) each of up to 100 failed accepts
        # in a row, every second, while file descriptors are exhausted: make
        # room instead, and say so in a (rate-limited) warning.
        if (
            isinstance(exception, OSError)
            and exception.errno in _OUT_OF_RESOURCES
            and "accept" in str(context.get("message", ""))
        ):
            gate.descriptors_exhausted()
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
