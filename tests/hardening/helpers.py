"""What the hardening suites share: daemons, a raw websocket client, survival checks.

``RawClient`` speaks websockets through the sans-I/O ``ClientProtocol`` over an
anyio TCP stream (so it runs on asyncio and trio alike), and can also put
hand-made bytes on the wire: it is the attacker. ``survives`` is the check
every attack ends with: the daemon answers ``/health``, a client connected
before the attack still works on its own connection, and a fresh client works.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, SocketStream
from websockets.client import ClientProtocol
from websockets.extensions.base import ClientExtensionFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import CLOSED, OPEN
from websockets.uri import parse_uri

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.codecs import codec_for
from remote_exec.framing import decode_frame, decode_header
from tests.core.helpers import message_frame
from tests.hardening.instruments import Instrument
from tests.ws_instruments import DaemonProcess, http_get

TOKEN = "hardening-token-0123456789abcdef"
INSTRUMENTS = "tests.hardening.instruments"
CANARY = "tests.hardening.canary"
CANARY_FILE = Path(__file__).resolve().parent / "canary.py"
# A failure bound only: nothing waits for it when the code is right.
TIMEOUT = 15

# Message kinds (docs/wire-format.md).
CALL, RESULT, FAILURE, ITEMS, END, CREDIT, CANCEL, CLOSE = range(1, 9)


# -- daemons -------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A running ``remote-exec serve`` child and what a test needs to reach it."""

    process: DaemonProcess
    backend: str
    canary: Path
    _log_mark: int = 0

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def alive(self) -> bool:
        assert self.process.proc is not None
        return self.process.proc.poll() is None

    def mark_log(self) -> None:
        self._log_mark = len(self.process.log())

    def new_log(self) -> str:
        """What the daemon logged since ``mark_log``."""
        return self.process.log()[self._log_mark :]


def start_daemon(backend: str, tmp: Path, *extra: str, allow_instruments: bool = True) -> Daemon:
    """A daemon on 127.0.0.1, port 0, token required, this backend.

    Only ``tests.hardening.instruments`` (and ``tests.ws_instruments``) are on
    its allow-list: ``tests.hardening.canary`` is off it, and writes ``canary``
    if it is ever imported.
    """
    canary = tmp / f"canary-{backend}-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTE_EXEC")}
    env["REMOTE_EXEC_CANARY"] = str(canary)
    env["REMOTE_EXEC_TOKEN_FILE"] = str(tmp / "unused-token-file")
    args = ["--backend", backend, "--log-level", "INFO", *extra]
    if allow_instruments:
        args = ["--allow-module", INSTRUMENTS, "--allow-module", "tests.ws_instruments", *args]
    process = DaemonProcess(*args, env=env, token=TOKEN)
    return Daemon(process, backend, canary)


async def health(daemon: Daemon) -> None:
    status, _, body = await http_get(daemon.port, "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"}), (status, body)


async def until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``await predicate()`` until it holds: a bounded loop on a condition.

    The condition lives in another process (the daemon's journal, its
    statistics), so there is no event to wait on: look every few milliseconds.
    """
    with anyio.fail_after(TIMEOUT):
        while not await predicate():  # noqa: ASYNC110 - the condition is remote
            await anyio.sleep(0.01)


async def statistics(daemon: Daemon) -> dict[str, Any]:
    """The dispatcher's statistics, from ``/instances`` (behind the token)."""
    status, _, body = await http_get(
        daemon.port, "/instances", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, (status, body)
    stats: dict[str, Any] = json.loads(body)["statistics"]
    return stats


def connections_are(daemon: Daemon, count: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``until``: the daemon serves exactly ``count`` connections."""

    async def check() -> bool:
        return bool((await statistics(daemon))["connections"] == count)

    return check


def journal_is(witness: Bystander, key: str, *events: str) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``until``: the daemon's journal for ``key`` is exactly ``events``."""

    async def check() -> bool:
        return bool(await witness.call("journal", key) == list(events))

    return check


async def read_to_eof(stream: ByteReceiveStream) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection."""
    data = bytearray()
    with anyio.fail_after(TIMEOUT):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return bytes(data)


# -- the client that stays connected through an attack --------------------------------------


@dataclass
class Bystander:
    """An executor connected before the attack, with an instance and a stream in flight."""

    executor: WebSocketExecutor
    instrument: Instrument
    ticks: Any
    seen: list[int] = field(default_factory=list)

    async def call(self, method: str, *args: Any) -> Any:
        """Call the bystander's instrument through its own executor, whatever context is active."""
        return await self.executor.execute(self.instrument, method, args)


@asynccontextmanager
async def bystander(daemon: Daemon) -> AsyncIterator[Bystander]:
    try:
        async with _bystander(daemon) as witness:
            yield witness
    except BaseException as exc:
        # What the daemon saw is the first thing to read when an attack test fails.
        exc.add_note(f"daemon log since the test began:\n{daemon.new_log()[-6000:]}")
        raise


@asynccontextmanager
async def _bystander(daemon: Daemon) -> AsyncIterator[Bystander]:
    async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
        instrument = Instrument()
        name = f"bystander-{uuid.uuid4().hex[:8]}"
        async with executor.remote_instance(instrument, name), instrument.ticks(name) as ticks:
            witness = Bystander(executor, instrument, ticks)
            witness.seen.append(await anext(ticks))
            assert await witness.call("echo", "before") == "before"
            yield witness


async def survives(daemon: Daemon, witness: Bystander) -> None:
    """The daemon lives, answers /health, and serves old and new clients."""
    with anyio.fail_after(TIMEOUT):
        assert daemon.alive(), daemon.process.log()
        await health(daemon)
        # The client connected before the attack, on its own connection.
        assert await witness.call("echo", b"after" * 10) == b"after" * 10
        witness.seen.append(await anext(witness.ticks))
        assert witness.seen == list(range(len(witness.seen)))
        # A fresh client.
        async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
            fresh = Instrument()
            async with executor.remote_instance(fresh, f"fresh-{uuid.uuid4().hex[:8]}"):
                assert await fresh.add(2, 3) == 5
    log = daemon.new_log()
    # Hostile input is a warning at most: never an internal error of the daemon.
    for needle in ("Traceback", "internal error", "ERROR"):
        assert needle not in log, log


# -- raw websocket ---------------------------------------------------------------------------


def split_frames(message: bytes) -> list[bytes]:
    """The frames of one websocket message (a sender may pack several back to back)."""
    frames = []
    offset = 0
    while offset < len(message):
        size = decode_header(message[offset:]).frame_length
        frames.append(message[offset : offset + size])
        offset += size
    return frames


def parse_frame(data: bytes) -> list[Any]:
    frame = decode_frame(data)
    tree: list[Any] = codec_for(frame.codec_id).parse(frame.body)
    return tree


class ServerClosed(Exception):
    """The server closed the websocket (``code`` 1006: without a close frame)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed by the server: {code} {reason}")
        self.code = code
        self.reason = reason
        self.messages: list[list[Any]] = []


class HandshakeRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv1: bool = False,
    length: int | None = None,
) -> bytes:
    """A masked client websocket frame built by hand (``length`` may lie)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    size = len(payload) if length is None else length
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    mask = secrets.token_bytes(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class RawClient:
    """A websocket client for attacks: raw bytes out, replies and close codes in."""

    def __init__(self, stream: SocketStream, protocol: ClientProtocol, response: Response) -> None:
        self.stream = stream
        self.protocol = protocol
        self.response = response
        self._messages: list[bytes] = []
        self._fragments: list[bytes] | None = None
        self._unclaimed: list[list[Any]] = []
        self._frames: list[bytes] = []  # received, not yet parsed
        self._next_id = 1

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        daemon: Daemon,
        *,
        token: str | None = TOKEN,
        path: str = "/",
        headers: dict[str, str] | None = None,
        extensions: Sequence[ClientExtensionFactory] | None = None,
    ) -> AsyncIterator[RawClient]:
        """Open a websocket (raises ``HandshakeRefused`` for an HTTP answer)."""
        protocol = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{daemon.port}{path}"),
            extensions=extensions,
            max_size=None,
        )
        request = protocol.connect()
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        for name, value in (headers or {}).items():
            request.headers[name] = value
        protocol.send_request(request)
        stream = await anyio.connect_tcp("127.0.0.1", daemon.port)
        async with stream:
            with anyio.fail_after(TIMEOUT):
                for data in protocol.data_to_send():
                    await stream.send(data)
                response = None
                while response is None:
                    try:
                        chunk = await stream.receive()
                    except anyio.EndOfStream:
                        chunk = b""
                    if chunk:
                        protocol.receive_data(chunk)
                    else:
                        protocol.receive_eof()
                    for event in protocol.events_received():
                        if isinstance(event, Response):
                            response = event
                    if not chunk and response is None:
                        raise ConnectionError("the server closed during the handshake")
            if protocol.state is not OPEN:
                raise HandshakeRefused(response.status_code, bytes(response.body or b""))
            yield cls(stream, protocol, response)

    # -- sending ----------------------------------------------------------------------
    async def send_binary(self, data: bytes) -> None:
        self.protocol.send_binary(data)
        await self._flush()

    async def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        await self._flush()

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the TCP stream (hand-made frames)."""
        await self.stream.send(data)

    def new_id(self) -> int:
        sid, self._next_id = self._next_id, self._next_id + 1
        return sid

    async def call(
        self,
        target: str,
        method: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        stream: bool = False,
        credit: int = 0,
        sid: int | None = None,
        codec: str = "msgpack",
    ) -> int:
        """Send a well-formed Call; returns its stream id."""
        sid = self.new_id() if sid is None else sid
        message = [CALL, sid, target, method, list(args), kwargs or {}, stream, credit, {}]
        await self.send_binary(message_frame(message, codec))
        return sid

    async def create(
        self, name: str, qualname: str = "Instrument", module: str = INSTRUMENTS
    ) -> Any:
        sid = await self.call("", "create_instance", [module, qualname, name, [], {}, {}])
        return await self.result(sid)

    async def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                await self.stream.send(data)

    # -- receiving ---------------------------------------------------------------------
    async def receive(self) -> bytes:
        """The next binary message; raises ``ServerClosed`` once the server closed."""
        while not self._messages:
            if self.protocol.state is CLOSED:
                code = int(self.protocol.close_code or 1006)
                raise ServerClosed(code, self.protocol.close_reason or "")
            try:
                chunk = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                chunk = b""
            if chunk:
                self.protocol.receive_data(chunk)
            else:
                self.protocol.receive_eof()
            for event in self.protocol.events_received():
                if isinstance(event, Frame):
                    self._on_frame(event)
            try:
                await self._flush()  # pongs and the close echo
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
        return self._messages.pop(0)

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.BINARY or frame.opcode is Opcode.TEXT:
            if frame.fin:
                self._messages.append(bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
        elif frame.opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                self._messages.append(b"".join(self._fragments))
                self._fragments = None

    async def message(self) -> list[Any]:
        """The next remote-exec message, as its raw tree ``[kind, stream_id, ...]``."""
        while not self._frames:
            self._frames.extend(split_frames(await self.receive()))
        return parse_frame(self._frames.pop(0))

    async def reply(self, sid: int) -> list[Any]:
        """The terminal reply (Result, Failure or StreamEnd) for ``sid``.

        Replies for other ids that arrive meanwhile are kept for their turn.
        """
        with anyio.fail_after(TIMEOUT):
            while True:
                for index, tree in enumerate(self._unclaimed):
                    if tree[1] == sid and tree[0] in (RESULT, FAILURE, END):
                        del self._unclaimed[index]
                        return tree
                self._unclaimed.append(await self.message())

    async def result(self, sid: int) -> Any:
        tree = await self.reply(sid)
        assert tree[0] == RESULT, tree
        return tree[2]

    async def failure(self, sid: int) -> tuple[str, str]:
        """(remote type name, message) of the Failure that answers ``sid``."""
        tree = await self.reply(sid)
        assert tree[0] == FAILURE, tree
        return tree[2], tree[3]

    async def closed(self) -> ServerClosed:
        """Wait until the server ends the connection; ``.messages`` holds what it sent first."""
        messages: list[list[Any]] = []
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    messages.append(await self.message())
                except ServerClosed as closed:
                    closed.messages = messages
                    return closed

    async def close_frame(self) -> int:
        """Read until the server's close frame arrives; its code (not waiting for the end of TCP)."""
        with anyio.fail_after(TIMEOUT):
            while self.protocol.close_rcvd is None:
                if self.protocol.state is CLOSED:
                    return int(self.protocol.close_code or 1006)
                try:
                    chunk = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    chunk = b""
                if chunk:
                    self.protocol.receive_data(chunk)
                else:
                    self.protocol.receive_eof()
                self.protocol.events_received()
            return int(self.protocol.close_rcvd.code)

    async def protocol_error(self) -> str:
        """Wait for the server's goodbye after a protocol error; returns its reason."""
        closed = await self.closed()
        goodbyes = [m for m in closed.messages if m[0] == CLOSE]
        assert goodbyes, closed.messages
        reason: str = goodbyes[-1][2]
        assert reason.startswith("protocol error"), reason
        assert closed.code == 1000, closed  # then a clean websocket close
        return reason

    async def dropped(self) -> None:
        """Stay silent (answer no ping, send nothing) until the server drops the connection."""
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return

    async def still_serves(self) -> None:
        """This very connection still answers a call."""
        sid = await self.call("", "list_instances")
        assert isinstance(await self.result(sid), list)
