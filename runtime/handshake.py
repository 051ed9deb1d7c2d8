"""A token preamble for raw byte-stream connections (a Ray actor's TCP port).

The daemon checks its token in the websocket handshake; a connection that is
a bare TCP stream (``RayExecutor`` to the runtime inside a Ray actor) has no
handshake, so the client sends one first, before any frame:

=========  =======  =================================================
bytes      value    meaning
=========  =======  =================================================
8          MAGIC    ``b"REXTOKN1"``: this is a remote-exec token preamble
2          n        the token's length in bytes, big-endian (1..1024)
n          token    the token, UTF-8
=========  =======  =================================================

The server answers one byte: ``0x01`` (accepted: frames follow, both ways)
or ``0x00`` (refused: it closes the connection). The token is compared in
constant time (``check_token``), and a peer that sends no preamble within
the server's timeout is dropped.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream

from remote_exec.exceptions import ConnectionLostError, TokenRefusedError

from .auth import check_token

__all__ = ["MAGIC", "accept_token", "send_token"]

MAGIC = b"REXTOKN1"
_MAX_TOKEN = 1024
_ACCEPTED = b"\x01"
_REFUSED = b"\x00"
_STREAM_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


async def _read_exactly(stream: ByteStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        data += await stream.receive(count - len(data))
    return bytes(data)


async def send_token(stream: ByteStream, token: str) -> None:
    """Send the preamble and wait for the answer (the caller bounds the wait).

    Raises:
        TokenRefusedError: the server refused the token.
        ConnectionLostError: the connection closed before an answer.
    """
    raw = token.encode("utf-8")
    if not 0 < len(raw) <= _MAX_TOKEN:
        raise ValueError(f"a token is 1 to {_MAX_TOKEN} bytes long")
    try:
        await stream.send(MAGIC + len(raw).to_bytes(2, "big") + raw)
        answer = await _read_exactly(stream, 1)
    except _STREAM_ERRORS as exc:
        raise ConnectionLostError(
            f"the connection closed during the token preamble: {exc!r}"
        ) from exc
    if answer != _ACCEPTED:
        raise TokenRefusedError("the server refused the token")


async def accept_token(stream: ByteStream, expected: str) -> bool:
    """Read a client's preamble and answer it; whether its token is ``expected``.

    The caller bounds the wait and closes the stream when this returns False.
    """
    try:
        head = await _read_exactly(stream, len(MAGIC) + 2)
        length = int.from_bytes(head[len(MAGIC) :], "big")
        if head[: len(MAGIC)] != MAGIC or not 0 < length <= _MAX_TOKEN:
            return False
        given = (await _read_exactly(stream, length)).decode("utf-8", "replace")
        accepted = check_token(expected, given)
        await stream.send(_ACCEPTED if accepted else _REFUSED)
    except _STREAM_ERRORS:
        return False
    return accepted
