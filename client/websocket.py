"""``WebSocketExecutor``: the client of a ``remote-exec serve`` daemon.

One code path for asyncio and trio: the websocket protocol is websockets'
sans-I/O ``ClientProtocol``, driven over an anyio TCP (or TLS) stream. Each
remote-exec frame travels as one binary websocket message; a large frame is
sent as several websocket fragments straight from its pieces, so big buffers
are never joined into one bytes object before sending.

Keepalive: every ``ping_interval`` seconds the executor sends a ping; if
nothing at all (the pong, or any other data) arrives within ``ping_timeout``
seconds, the connection is considered lost and every waiting call and stream
fails at once with ``ConnectionLostError``.
"""

from __future__ import annotations

import secrets
import ssl as ssl_module
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import anyio
from anyio.abc import ByteStream
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI, WebSocketException
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import OPEN, SEND_EOF
from websockets.uri import WebSocketURI, parse_uri

from remote_exec.exceptions import ConnectionLostError, RemoteExecConnectionError, TokenRefusedError
from remote_exec.framing import DEFAULT_MAX_FRAME_SIZE, FrameAssembler
from remote_exec.protocol import DEFAULT_WINDOW, Limits
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.auth import TOKEN_ENV, client_token, default_token_path
from remote_exec.runtime.sockets import connect_tcp
from remote_exec.runtime.transport import FrameTransport

from .remote import RemoteExecutor

if TYPE_CHECKING:
    from websockets.typing import Origin

__all__ = ["WebSocketExecutor"]

_READ_SIZE = 256 * 1024
# Pieces smaller than this are joined into one fragment: fewer, larger writes.
_COALESCE = 64 * 1024
# Larger pieces are cut into fragments of at most this size, which bounds the
# masked copy websockets makes of each fragment.
_FRAGMENT = 1024 * 1024
# How long closing waits for the server to acknowledge the close frame.
_CLOSE_TIMEOUT = 1.0
_USER_AGENT = "remote-exec (websockets sans-I/O over anyio)"

_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class WebSocketTransport:
    """A ``FrameTransport`` over one client websocket connection.

    Made by ``connect_websocket``. Writes never interleave (one lock) and are
    shielded from cancellation once a message has started, because a websocket
    message cut half-way would corrupt the connection for every other call.
    """

    def __init__(
        self,
        stream: ByteStream,
        protocol: ClientProtocol,
        *,
        url: str,
        write_timeout: float | None = 20.0,
        max_size: int | None = None,
    ) -> None:
        self.url = url
        self._stream = stream
        self._protocol = protocol
        self._write_timeout = write_timeout
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._writes_at_once = getattr(stream, "writes_at_once", False)  # see send_frame
        self._messages: deque[bytes | bytearray | memoryview] = deque()
        # The daemon cuts a large frame across several messages (ASGI has no
        # fragments): runs of whole frames come out of the assembler.
        self._frames: deque[bytes | bytearray | memoryview] = deque()
        self._assembler = FrameAssembler(
            max_size=max_size if max_size is not None else DEFAULT_MAX_FRAME_SIZE
        )
        self._fragments: list[bytes | bytearray | memoryview] | None = None
        self._error: str | None = None  # why the connection is gone, once it is
        self._alive: anyio.Event | None = None  # set by any data (keepalive)
        self._close_received = anyio.Event()
        self._receiving = False
        self._closed = False
        self._stream_closed = False

    # -- state -------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._error is None

    def _lose(self, reason: str) -> None:
        """Record the first reason the connection went away."""
        if self._error is None:
            self._error = reason
        self._close_received.set()

    def _lost_error(self) -> ConnectionLostError:
        return ConnectionLostError(f"connection to {self.url} lost: {self._error}")

    async def _abort(self, reason: str) -> None:
        """Give up on the connection now; a reader blocked on it wakes with ``reason``."""
        self._lose(reason)
        self._stream_closed = True
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(self._stream)

    # -- writing -------------------------------------------------------------------
    async def _write_pending(self) -> None:
        """Write everything the protocol has queued; the caller holds the send lock."""
        while writes := self._protocol.data_to_send():
            small: list[bytes] = []
            for data in writes:
                if data == SEND_EOF:
                    await self._write_raw(b"".join(small))
                    small = []
                    try:
                        await self._stream.send_eof()
                    except (NotImplementedError, *_STREAM_ERRORS):
                        pass  # TLS cannot half-close; the close that follows suffices
                elif len(data) < _COALESCE:
                    small.append(data)
                else:
                    if small:
                        await self._write_raw(b"".join(small))
                        small = []
                    await self._write_raw(data)
            if small:
                await self._write_raw(b"".join(small))

    async def _write_raw(self, data: bytes) -> None:
        if not data:
            return
        if self._stream_closed:
            raise self._lost_error()
        try:
            if len(data) < _COALESCE:
                # Small writes fit the socket buffers; a peer that stops reading
                # altogether is caught by the keepalive, which aborts the stream.
                # (A timeout scope per call would cost more than the write.)
                await self._stream.send(data)
            else:
                with anyio.fail_after(self._write_timeout):
                    await self._stream.send(data)
        except TimeoutError:
            await self._abort(
                f"the server accepted no data for {self._write_timeout} s (it is gone or stuck)"
            )
            raise self._lost_error() from None
        except _STREAM_ERRORS as exc:
            await self._abort(f"sending failed: {str(exc) or type(exc).__name__}")
            raise self._lost_error() from exc

    async def _flush_control(self) -> None:
        """Write queued control frames (pongs, pings, close) unless a sender is busy.

        A sender holding the lock writes them after its current fragment, so
        the reader never waits behind a large message.
        """
        if not self._protocol.writes or self._send_lock.locked() or self._stream_closed:
            return
        async with self._send_lock:
            with anyio.CancelScope(shield=True):
                try:
                    await self._write_pending()
                except ConnectionLostError:
                    if self._error is None:
                        raise
                    # Already going down (e.g. echoing the server's close): no matter.

    async def send_frame(self, pieces: Sequence[bytes | memoryview]) -> None:
        if self._error is not None:
            raise self._lost_error()
        fragments = _fragments(pieces)
        if (
            len(fragments) == 1
            and len(fragments[0]) < _COALESCE
            and self._writes_at_once
            and not self._send_lock.locked()
        ):
            # The usual small message: framed and written in one go (with any
            # control frame queued before it) before anything can suspend, so
            # neither another sender nor a cancellation can cut into it; the
            # lock and the shield would cost more than the write.
            try:
                self._protocol.send_binary(fragments[0])
            except WebSocketException as exc:  # closing or closed meanwhile
                self._lose(f"the websocket is closing ({exc})")
                raise self._lost_error() from exc
            await self._write_pending()
            return
        async with self._send_lock:  # waiting here is a clean cancellation point
            # From the first fragment on, the message must be finished: shield it.
            with anyio.CancelScope(shield=True):
                if self._error is not None:
                    raise self._lost_error()
                try:
                    last = len(fragments) - 1
                    for index, fragment in enumerate(fragments):
                        if index == 0:
                            self._protocol.send_binary(fragment, fin=index == last)
                        else:
                            self._protocol.send_continuation(fragment, fin=index == last)
                        await self._write_pending()
                except WebSocketException as exc:  # closing or closed meanwhile
                    self._lose(f"the websocket is closing ({exc})")
                    raise self._lost_error() from exc

    # -- reading ---------------------------------------------------------------------
    async def _read_chunk(self) -> bytes:
        try:
            chunk = await self._stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            chunk = b""
        except _STREAM_ERRORS as exc:
            self._lose(f"the connection failed: {str(exc) or type(exc).__name__}")
            raise self._lost_error() from exc
        if self._alive is not None:
            self._alive.set()
        return chunk

    def _feed(self, chunk: bytes) -> list[Response]:
        """Hand ``chunk`` to the protocol and sort out what it produced."""
        protocol = self._protocol
        if chunk:
            protocol.receive_data(chunk)
        else:
            protocol.receive_eof()
        responses: list[Response] = []
        for event in protocol.events_received():
            if isinstance(event, Response):
                responses.append(event)
            elif isinstance(event, Frame):
                self._handle_frame(event)
        if self._error is None:
            if protocol.parser_exc is not None:
                self._lose(f"websocket protocol error: {protocol.parser_exc}")
            elif not chunk:
                self._lose("the server closed the connection")
        return responses

    def _handle_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.BINARY:
            if frame.fin:
                self._messages.append(frame.data)
            else:
                self._fragments = [frame.data]
        elif opcode is Opcode.CONT:
            if self._fragments is not None:
                self._fragments.append(frame.data)
                if frame.fin:
                    self._messages.append(b"".join(self._fragments))
                    self._fragments = None
        elif opcode is Opcode.TEXT:
            reason = "remote-exec expects binary messages, the server sent text"
            if self._protocol.state is OPEN:
                self._protocol.fail(CloseCode.UNSUPPORTED_DATA, reason)
            self._lose(reason)
        elif opcode is Opcode.CLOSE:
            close = self._protocol.close_rcvd
            if self._closed:
                self._lose("the connection was closed")
            elif close is None or close.code in (
                CloseCode.NO_STATUS_RCVD,
                CloseCode.NORMAL_CLOSURE,
            ):
                self._lose("the server closed the connection")
            else:
                detail = f": {close.reason}" if close.reason else ""
                self._lose(f"the server closed the connection (code {close.code}{detail})")
        # PING is answered by the protocol itself; PONG only counts as activity.

    async def receive_frame(self) -> bytes | bytearray | memoryview:
        self._receiving = True
        try:
            frames, messages = self._frames, self._messages
            while not frames:
                if messages:
                    frames.extend(self._assembler.feed(messages.popleft()))
                    continue
                if self._error is not None:
                    raise self._lost_error()
                chunk = await self._read_chunk()
                self._feed(chunk)
                await self._flush_control()  # pongs and the close echo
            return frames.popleft()
        finally:
            self._receiving = False

    async def _handshake(self, token: str | None) -> None:
        protocol = self._protocol
        request = protocol.connect()
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        request.headers["User-Agent"] = _USER_AGENT
        protocol.send_request(request)
        async with self._send_lock:
            await self._write_pending()
        while True:
            chunk = await self._read_chunk()
            responses = self._feed(chunk)
            if protocol.handshake_exc is not None:
                response = responses[0] if responses else None
                raise _handshake_error(self.url, protocol.handshake_exc, response, token)
            if protocol.state is OPEN:
                return
            if self._error is not None:
                raise RemoteExecConnectionError(
                    f"websocket handshake with {self.url} failed: {self._error}"
                )

    # -- keepalive --------------------------------------------------------------------
    async def keepalive(self, interval: float, reply_timeout: float | None) -> None:
        """Ping every ``interval`` s; abort if nothing arrives within ``reply_timeout`` s.

        Runs until the connection is gone; never raises (the reader reports the loss).
        """
        while self._error is None:
            await anyio.sleep(interval)
            if self._error is not None or self._protocol.state is not OPEN:
                return
            alive = self._alive = anyio.Event()
            self._protocol.send_ping(secrets.token_bytes(4))
            try:
                await self._flush_control()
            except ConnectionLostError:
                return
            if reply_timeout is None:
                continue
            with anyio.move_on_after(reply_timeout):
                await alive.wait()
            if not alive.is_set() and self._error is None:
                await self._abort(
                    f"no reply to a keepalive ping within {reply_timeout} s (the server or the network is gone)"
                )
                return

    # -- closing ------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                if self._error is None and self._protocol.state is OPEN:
                    self._protocol.send_close(CloseCode.NORMAL_CLOSURE, "client closing")
                    with anyio.move_on_after(_CLOSE_TIMEOUT):
                        async with self._send_lock:
                            await self._write_pending()
                        if self._receiving:  # the reader will see the server's answer
                            await self._close_received.wait()
            except (ConnectionLostError, WebSocketException):
                pass  # the server closed first (or the connection broke): closed anyway
            finally:
                self._lose("the connection was closed")
                self._stream_closed = True
                await anyio.aclose_forcefully(self._stream)


def _fragments(pieces: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """The websocket fragments of one message: small pieces joined, large ones cut."""
    fragments: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    small_size = 0
    for piece in pieces:
        size = len(piece) if isinstance(piece, bytes) else piece.nbytes
        if size < _COALESCE:
            small.append(piece)
            small_size += size
            if small_size >= _COALESCE:
                fragments.append(b"".join(small))
                small, small_size = [], 0
            continue
        if small:
            fragments.append(b"".join(small))
            small, small_size = [], 0
        view = memoryview(piece).cast("B")
        fragments.extend(view[start : start + _FRAGMENT] for start in range(0, size, _FRAGMENT))
    if small or not fragments:
        fragments.append(b"".join(small))
    return fragments


def _handshake_error(
    url: str, exc: Exception, response: Response | None, token: str | None
) -> RemoteExecConnectionError:
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        body = bytes(exc.response.body or b"").decode("utf-8", "replace").strip()
        detail = f": {body}" if body else ""
        if status == 401 or (status == 403 and not body):
            if token is None:
                return TokenRefusedError(
                    f"the server at {url} requires a token (HTTP {status}){detail}. Pass "
                    f"token=..., set {TOKEN_ENV}, or on the daemon's machine let the client "
                    f"read the daemon's token file ({default_token_path()})"
                )
            return TokenRefusedError(
                f"the server at {url} refused the token (HTTP {status}){detail}"
            )
        if status == 403:
            return TokenRefusedError(
                f"the server at {url} refused the connection (HTTP 403){detail}"
            )
        return RemoteExecConnectionError(
            f"the server at {url} refused the websocket connection (HTTP {status}){detail}"
        )
    if isinstance(exc, InvalidHandshake):
        return RemoteExecConnectionError(f"websocket handshake with {url} failed: {exc}")
    return RemoteExecConnectionError(f"websocket handshake with {url} failed: {exc!r}")


def _parse_url(url: str) -> WebSocketURI:
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"not a websocket URL: {exc}") from None
    if uri.user_info is not None:
        raise ValueError("do not put credentials in the URL: pass token=... instead")
    return uri


def _check_token(token: str) -> None:
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("a token must be non-empty printable ASCII without spaces")


async def connect_websocket(
    url: str,
    *,
    token: str | None = None,
    ssl: ssl_module.SSLContext | bool | None = None,
    connect_timeout: float | None = 10.0,
    max_size: int | None = None,
    write_timeout: float | None = 20.0,
    origin: str | None = None,
) -> WebSocketTransport:
    """Open a websocket to ``url`` and return it as a ``FrameTransport``.

    ``token`` is sent as ``Authorization: Bearer`` (pass it resolved: this does
    not look in the environment). ``ssl``: for ``wss://``, an ``SSLContext`` or
    None/True for the system's default verification. ``origin`` sets the
    ``Origin`` header, as a browser would.

    Raises:
        RemoteExecConnectionError: nothing answered, or not within
            ``connect_timeout`` seconds, or the handshake failed.
        TokenRefusedError: the server refused the token or the Origin.
    """
    uri = _parse_url(url)
    if token is not None:
        _check_token(token)
    if not uri.secure and ssl not in (None, False):
        raise ValueError(f"ssl= is only for wss:// URLs, not {url}")
    context: ssl_module.SSLContext | None = None
    if uri.secure:
        context = (
            ssl if isinstance(ssl, ssl_module.SSLContext) else ssl_module.create_default_context()
        )
    stream: ByteStream | None = None
    try:
        with anyio.fail_after(connect_timeout):
            try:
                if context is not None:
                    stream = await anyio.connect_tcp(
                        uri.host, uri.port, ssl_context=context, tls_hostname=uri.host
                    )
                else:
                    stream = await connect_tcp(uri.host, uri.port)
            except ssl_module.SSLError as exc:
                hint = ""
                if exc.reason == "WRONG_VERSION_NUMBER":  # the answer was not TLS
                    plain = url.replace("wss://", "ws://", 1)
                    hint = (
                        ": the server did not answer with TLS; if the daemon serves plain "
                        f"websockets (started without --certfile), connect to {plain}"
                    )
                raise RemoteExecConnectionError(
                    f"TLS handshake with {url} failed ({exc.reason or exc}){hint}"
                ) from exc
            except OSError as exc:
                raise RemoteExecConnectionError(f"could not connect to {url}: {exc}") from exc
            except (anyio.BrokenResourceError, anyio.EndOfStream) as exc:  # TLS handshake
                raise RemoteExecConnectionError(
                    f"could not connect to {url}: TLS handshake failed ({exc!r})"
                ) from exc
            protocol = ClientProtocol(
                uri,
                origin=cast("Origin | None", origin),
                extensions=None,  # no per-message compression
                max_size=max_size,
            )
            transport = WebSocketTransport(
                stream, protocol, url=url, write_timeout=write_timeout, max_size=max_size
            )
            try:
                await transport._handshake(token)
            except ConnectionLostError as exc:
                raise RemoteExecConnectionError(
                    f"websocket handshake with {url} failed: {transport._error}"
                ) from exc
    except TimeoutError:
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        raise RemoteExecConnectionError(
            f"could not connect to {url} within {connect_timeout} s (is `remote-exec serve` running there?)"
        ) from None
    except BaseException:
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        raise
    return transport


class WebSocketExecutor(RemoteExecutor):
    """Runs methods inside a ``remote-exec serve`` daemon, over a websocket.

    Args:
        url: ``ws://host:port`` or ``wss://host:port`` (any path reaches the daemon).
        token: the daemon's token. Default: ``REMOTE_EXEC_TOKEN``, else (for a
            loopback host) the daemon's per-user token file, else none.
        ssl: for ``wss://``: an ``ssl.SSLContext`` (e.g. trusting your own CA),
            or None for the system's default certificate verification.
        codec: "msgpack" (default) or "json".
        connect_timeout: seconds to connect and finish the handshake.
        ping_interval: seconds between keepalive pings (None: no keepalive).
        ping_timeout: seconds without any reply after a ping before the
            connection counts as lost (None: never).
        limits: message size and other caps; ``max_message_size`` also caps
            incoming websocket messages.
        window: stream items the server may send ahead of the consumer.
        registry: the instance registry (a fresh one by default).
        init_context: enter ``ExecutorContext(self)`` inside ``async with``.
        reconnect: open the connection again when it is lost (bounded,
            jittered exponential backoff). Calls and streams in flight then
            fail with ``ConnectionLostError`` and are never sent again; calls
            made meanwhile wait for it (within their deadline); the instances
            this executor created are attached again, and re-created (class,
            arguments, config) where the daemon no longer has them.
            ``connected`` and ``reconnects`` tell where it stands.
    """

    is_remote = True

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        codec: str = "msgpack",
        connect_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        limits: Limits | None = None,
        window: int = DEFAULT_WINDOW,
        registry: InstanceRegistry | None = None,
        init_context: bool = True,
        reconnect: bool = False,
    ) -> None:
        super().__init__(
            codec=codec, limits=limits, window=window, registry=registry, init_context=init_context
        )
        self.reconnect = reconnect
        self._uri = _parse_url(url)
        if ssl is not None and not self._uri.secure:
            raise ValueError(f"ssl= is only for wss:// URLs, not {url}")
        if token is not None:
            _check_token(token)
        self.url = url
        self._token = token
        self._ssl = ssl
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._websocket: WebSocketTransport | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    async def _connect(self) -> FrameTransport:
        # Resolved now, not in __init__: a daemon started meanwhile may have
        # just written its token file.
        token = client_token(self._uri.host, self._token)
        transport = await connect_websocket(
            self.url,
            token=token,
            ssl=self._ssl,
            connect_timeout=self.connect_timeout,
            max_size=self.limits.max_message_size,
            write_timeout=self.ping_timeout,
        )
        self._websocket = transport
        return transport

    def _known_lost(self) -> ConnectionLostError | None:
        websocket = self._websocket
        if websocket is None or websocket.is_open:
            return None
        return websocket._lost_error()

    def _connected(self, transport: FrameTransport) -> None:
        websocket = self._websocket
        if (
            self.ping_interval is not None
            and websocket is transport
            and self._task_group is not None
        ):
            # The keepalive of this connection lives in this executor's own
            # task group, beside the reader; it ends with its connection.
            self._task_group.start_soon(
                websocket.keepalive,
                self.ping_interval,
                self.ping_timeout,
                name=f"{self!r} keepalive",
            )
