"""Frames: a fixed header, an encoded body, then out-of-band binary buffers.

Every message of remote-exec travels as one frame. Over a websocket a binary
message carries whole frames (the daemon cuts a large run of frames across
several messages, which ``FrameAssembler`` joins again); over a byte stream
(the process executor) frames follow one another. Either way the header says
how many bytes the rest of the frame takes.

All integers are little-endian and unsigned.

======  ======  ===============  ==================================================
offset  size    field            meaning
======  ======  ===============  ==================================================
0       4       magic            ``b"RXEC"``
4       1       version          ``1``
5       1       codec id         ``1`` msgpack, ``2`` JSON (see ``codecs.py``)
6       2       buffer count     ``n``, number of out-of-band buffers
8       4       body length      ``b``, bytes of the encoded body
12      4       reserved         ``0`` (receivers reject anything else)
16      8       rest length      ``r`` = ``8*n + b + sum(buffer lengths)``
24      8*n     buffer table     length of each buffer, u64 each, in order
24+8n   b       body             the message, encoded by the codec
...     ...     buffers          buffer 0, buffer 1, ... back to back, no padding
======  ======  ===============  ==================================================

A frame is therefore exactly ``24 + r`` bytes. Receivers check, before slicing
anything: the magic, the version, that the codec id is known, that ``n`` is at
most the buffer cap, that ``24 + r`` is at most the size cap, and (once the
buffer table is read) that ``8*n + b + sum(lengths) == r``. Any failure raises
``FrameError``. Buffers are handed to the codec as ``memoryview`` slices of the
received frame: nothing is copied.

``docs/wire-format.md`` describes the whole wire format (frames, both codecs,
messages and their rules) for implementers in other languages.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from .exceptions import FrameError

__all__ = [
    "CODEC_JSON",
    "CODEC_MSGPACK",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "Frame",
    "FrameAssembler",
    "FrameHeader",
    "decode_frame",
    "decode_header",
    "encode_frame",
    "frame_size",
    "pack_frames",
]

MAGIC = b"RXEC"
VERSION = 1
CODEC_MSGPACK = 1
CODEC_JSON = 2
KNOWN_CODECS = frozenset({CODEC_MSGPACK, CODEC_JSON})

_HEADER = struct.Struct("<4sBBHIIQ")
HEADER_SIZE = _HEADER.size  # 24

DEFAULT_MAX_FRAME_SIZE = 128 * 1024 * 1024
DEFAULT_MAX_BUFFERS = 4096


class FrameHeader(NamedTuple):
    """The fixed part of a frame, validated (a tuple: cheap on the hot path)."""

    codec_id: int
    buffer_count: int
    body_length: int
    rest_length: int

    @property
    def frame_length(self) -> int:
        return HEADER_SIZE + self.rest_length


class Frame(NamedTuple):
    """A decoded frame: the codec id, the body and the out-of-band buffers."""

    codec_id: int
    body: memoryview
    buffers: list[memoryview]


def decode_header(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_buffers: int = DEFAULT_MAX_BUFFERS,
) -> FrameHeader:
    """Validate the first ``HEADER_SIZE`` bytes of ``data``.

    Raises:
        FrameError: bad magic, version, codec, counts, or a frame over ``max_size``.
    """
    if len(data) < HEADER_SIZE:
        raise FrameError(f"truncated frame header: {len(data)} of {HEADER_SIZE} bytes")
    magic, version, codec_id, count, body_len, reserved, rest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}: not a remote-exec frame")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this side speaks {VERSION})")
    if codec_id not in KNOWN_CODECS:
        raise FrameError(f"unknown codec id {codec_id}")
    if reserved != 0:
        raise FrameError("reserved header field is not zero")
    if count > max_buffers:
        raise FrameError(f"frame has {count} buffers, more than the cap of {max_buffers}")
    if HEADER_SIZE + rest > max_size:
        raise FrameError(
            f"frame of {HEADER_SIZE + rest} bytes exceeds the size cap of {max_size} bytes"
        )
    if 8 * count + body_len > rest:
        raise FrameError("inconsistent frame lengths: body and buffer table exceed the frame")
    return FrameHeader(codec_id, count, body_len, rest)


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_buffers: int = DEFAULT_MAX_BUFFERS,
    header: FrameHeader | None = None,
) -> Frame:
    """Split one whole frame into body and buffers, without copying.

    ``header``: what ``decode_header`` returned for ``data``, when the caller
    has already checked it (each header is then validated once).

    Raises:
        FrameError: the header is invalid or the lengths do not add up to ``data``.
    """
    if header is None:
        header = decode_header(data, max_size=max_size, max_buffers=max_buffers)
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(view) != header.frame_length:
        raise FrameError(
            f"frame length mismatch: header says {header.frame_length} bytes, got {len(view)}"
        )
    n = header.buffer_count
    if not n:  # the common case: a small message, nothing out of band
        if header.body_length != header.rest_length:
            raise FrameError("inconsistent frame lengths: buffer table does not match the frame")
        return Frame(header.codec_id, view[HEADER_SIZE:], [])
    offset = HEADER_SIZE
    lengths = struct.unpack_from(f"<{n}Q", view, offset) if n else ()
    offset += 8 * n
    if 8 * n + header.body_length + sum(lengths) != header.rest_length:
        raise FrameError("inconsistent frame lengths: buffer table does not match the frame")
    body = view[offset : offset + header.body_length]
    offset += header.body_length
    buffers = []
    for length in lengths:
        buffers.append(view[offset : offset + length])
        offset += length
    return Frame(header.codec_id, body, buffers)


def frame_size(body: bytes, buffers: Sequence[memoryview]) -> int:
    """The size in bytes of the frame ``encode_frame`` would build."""
    return HEADER_SIZE + 8 * len(buffers) + len(body) + sum(b.nbytes for b in buffers)


def encode_frame(
    codec_id: int,
    body: bytes,
    buffers: Sequence[memoryview] = (),
    *,
    max_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_buffers: int = DEFAULT_MAX_BUFFERS,
) -> list[bytes | memoryview]:
    """Build a frame as a list of pieces to write back to back.

    The first piece holds header, buffer table and body; each buffer follows as
    its own piece so that large payloads are never copied into the frame.

    Raises:
        FrameError: the frame would exceed ``max_size`` or ``max_buffers``.
    """
    n = len(buffers)
    if not n and HEADER_SIZE + len(body) <= min(max_size, 0xFFFFFFFF):
        # the common case: a small message, nothing out of band
        return [_HEADER.pack(MAGIC, VERSION, codec_id, 0, len(body), 0, len(body)) + body]
    if n > max_buffers or n > 0xFFFF:  # the count field is a u16
        raise FrameError(
            f"message has {n} buffers, more than the cap of {min(max_buffers, 0xFFFF)}"
        )
    if len(body) > 0xFFFFFFFF:  # the body length field is a u32
        raise FrameError(f"message body of {len(body)} bytes does not fit in a frame")
    lengths = [b.nbytes for b in buffers]
    rest = 8 * n + len(body) + sum(lengths)
    if HEADER_SIZE + rest > max_size:
        raise FrameError(
            f"message of {HEADER_SIZE + rest} bytes exceeds the size cap of {max_size} bytes"
        )
    head = _HEADER.pack(MAGIC, VERSION, codec_id, n, len(body), 0, rest)
    if n:
        head += struct.pack(f"<{n}Q", *lengths)
    pieces: list[bytes | memoryview] = [head + body]
    pieces.extend(buffers)
    return pieces


def pack_frames(
    frames: Sequence[Sequence[bytes | memoryview]], max_size: int = DEFAULT_MAX_FRAME_SIZE
) -> list[list[bytes | memoryview]]:
    """Group whole frames into transport messages of at most ``max_size`` bytes.

    Frames are self-delimiting, so a receiver splits a message back into them
    (``RpcConnection.receive_frame``). A frame is never split across messages.
    """
    messages: list[list[bytes | memoryview]] = []
    current: list[bytes | memoryview] = []
    size = 0
    for frame in frames:
        length = sum(len(piece) for piece in frame)
        if current and size + length > max_size:
            messages.append(current)
            current, size = [], 0
        current.extend(frame)
        size += length
    if current:
        messages.append(current)
    return messages


class FrameAssembler:
    """Whole frames out of chunks that may cut frames anywhere.

    A byte stream cuts frames at random, and the daemon cuts a large frame
    into several websocket messages (ASGI cannot send message fragments);
    ``feed`` hands back runs of whole frames. A chunk of whole frames (the
    usual websocket message) comes back as it is; the parts of a cut frame
    are kept as they came and joined once, when the frame is complete. The
    size cap is checked from the header, before more of the frame is kept.
    What is fed must not change afterwards (``bytes`` never do): runs and
    kept parts are views of it.
    """

    __slots__ = ("_have", "_max_buffers", "_max_size", "_need", "_parts")

    def __init__(
        self, *, max_size: int = DEFAULT_MAX_FRAME_SIZE, max_buffers: int = DEFAULT_MAX_BUFFERS
    ) -> None:
        self._max_size = max_size
        self._max_buffers = max_buffers
        self._parts: list[bytes | bytearray | memoryview] = []  # the start of a cut frame
        self._have = 0  # bytes in _parts
        self._need = 0  # length of the cut frame; 0 while its header is incomplete

    @property
    def pending(self) -> int:
        """Bytes of a frame received so far but not complete yet."""
        return self._have

    def _frame_length(self, data: bytes | bytearray | memoryview) -> int:
        header = decode_header(data, max_size=self._max_size, max_buffers=self._max_buffers)
        return header.frame_length

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
        """The runs of whole frames ``data`` completes, in order (maybe none).

        Raises:
            FrameError: a header is invalid or announces a frame over the cap.
        """
        view = memoryview(data).cast("B")
        end = len(view)
        runs: list[bytes | bytearray | memoryview] = []
        offset = 0
        if self._have:
            offset = self._complete(view, runs)
            if offset == end:
                return runs
        start = offset
        need = 0
        try:
            while end - offset >= HEADER_SIZE:
                need = self._frame_length(view[offset:])
                if offset + need > end:
                    break
                offset += need
                need = 0
        except FrameError:
            if offset == start and not runs:
                raise
            # The frames before the bad header come first: the receiver
            # handles them, then raises at the header, in order.
            runs.append(view[start:])
            return runs
        if offset > start:
            runs.append(data if start == 0 and offset == end else view[start:offset])
        if offset < end:  # the start of a cut frame: keep it
            self._parts.append(view[offset:])
            self._have = end - offset
            self._need = need
        return runs

    def _complete(self, view: memoryview, runs: list[bytes | bytearray | memoryview]) -> int:
        """Continue the cut frame with ``view``; how many bytes of it were used."""
        used = 0
        if not self._need:  # its header is still incomplete
            used = min(HEADER_SIZE - self._have, len(view))
            self._parts.append(view[:used])
            self._have += used
            if self._have < HEADER_SIZE:
                return used
            head = b"".join(self._parts)
            self._parts = [head]
            self._need = self._frame_length(head)
        take = min(self._need - self._have, len(view) - used)
        if take:
            self._parts.append(view[used : used + take])
            self._have += take
            used += take
        if self._have == self._need:
            runs.append(b"".join(self._parts))
            self._parts, self._have, self._need = [], 0, 0
        return used
