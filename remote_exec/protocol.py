"""The sans-I/O wire protocol: bytes or frames in, messages out, and back.

``RpcConnection`` never awaits and never touches a socket. A transport feeds it
what it reads (``receive_data`` for a byte stream, ``receive_frame`` for a
message transport such as a websocket), collects the decoded messages with
``events_received()`` and writes whatever ``data_to_send()`` returns.

Streams (one per call) move through these states::

    client:  CALL ──Result/Failure──▶ done
             STREAM ──StreamItems*──▶ STREAM ──StreamEnd/Failure──▶ done
    server:  Call received ──send_result/send_failure──▶ done
             Call(stream) ──send_items* (within credit)──▶ ──send_stream_end/failure──▶ done

Rules the state machine enforces:

1. An id is in flight from its ``Call`` until its terminal reply (``Result``,
   ``Failure`` or ``StreamEnd``); a ``Cancel`` does not end it, the server still
   answers. A ``Call`` reusing an id in flight is a protocol error.
2. The server never sends more stream items than the client granted
   (``Call.credit`` plus every ``Credit``); a client receiving more raises.
3. A ``Call`` past the in-flight cap is answered at once with a
   ``TooManyCallsError`` failure and never reaches the application.
4. A call whose arguments cannot be decoded is answered with a failure for
   its id; an envelope that cannot be decoded is a ``ProtocolError``.

Receiving has two halves: ``decode`` (check, parse and build the frames of a
transport message) reads no state that changes, so it may run in a worker
thread while the connection goes on; ``receive_decoded`` then updates the
state, in order, where the connection lives. ``receive_frame`` does both at
once, for the common small message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, NamedTuple

from .codecs import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ELEMENTS, Codec, codec_for, codec_named
from .exceptions import (
    CodecError,
    FrameError,
    ProtocolError,
    RemoteExecError,
    TooManyCallsError,
    client_traceback,
    exception_type_name,
)
from .framing import (
    DEFAULT_MAX_BUFFERS,
    DEFAULT_MAX_FRAME_SIZE,
    FrameAssembler,
    FrameHeader,
    decode_frame,
    decode_header,
    encode_frame,
)
from .messages import (
    KIND_OF,
    Call,
    Cancel,
    Close,
    Credit,
    Failure,
    Message,
    Result,
    StreamEnd,
    StreamItems,
)
from .registry import InstanceRegistry

__all__ = [
    "DEFAULT_MAX_STREAM_BYTES",
    "DEFAULT_WINDOW",
    "MIN_STREAM_BYTES",
    "Decoded",
    "DecodedFrame",
    "Limits",
    "RpcConnection",
    "Side",
]

FramePieces = list[bytes | memoryview]


DEFAULT_WINDOW = 16
"""Stream items a generator may run ahead of its consumer, on every executor.

Each item reaches the consumer as soon as it is produced; the window only
bounds how far a producer runs ahead of a slower consumer. It is small by
default because a generator often drives hardware: a camera should not
acquire dozens of frames that a consumer stopping early never asked for.
Throughput over a network is about ``window / 2`` items per round trip
(credit comes back in halves): raise it (up to ``Limits.max_credit``) for
fast streams of many small items.
"""

DEFAULT_MAX_STREAM_BYTES = 16 * 1024 * 1024
"""``Limits.max_stream_bytes``: the window in bytes, beside ``DEFAULT_WINDOW`` in items."""

MIN_STREAM_BYTES = 64 * 1024
"""The least ``Limits.max_stream_bytes``, and what a starved client grants at.

A client whose consumer waits for items grants the items it consumed as soon
as their bytes reach this, whatever its own ``max_stream_bytes``: a server
whose bound is smaller than the client's, but at least this, then never waits
for a grant that would not come.
"""


class Side(Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps of one connection; every one is finite (the daemon's are CLI flags).

    The wire caps (size, buffers, depth) should be the same on both ends: a
    side refuses to send what it would refuse to receive. ``docs/security.md``
    lists every default; a test keeps that page and these values equal.

    Attributes:
        max_message_size: largest frame in bytes, header and buffers included;
            a frame over it is refused from its header (``--max-message-size``).
        max_buffers: out-of-band buffers in one frame (``--max-buffers``).
        max_depth: nesting depth of a decoded value (``--max-depth``).
        max_elements: values in one message: every array item and map entry
            of its body, nested ones too, counted before anything is built
            (``--max-elements``). A receiver refuses a message over it as
            undecodable (a ``ProtocolError``); a sender refuses to send one
            (``FrameError``, as for a message over the size cap).
        max_calls: calls and streams in flight on one connection; past it a
            call is answered at once with ``TooManyCallsError`` (``--max-calls``).
        max_credit: stream items the server may produce ahead of the consumer,
            per stream: the most credit a client may grant (``--max-queued-items``).
        max_stream_bytes: the same window in bytes (``--max-stream-bytes``,
            at least ``MIN_STREAM_BYTES``): a server produces no more items on
            a stream while the frames of items it sent and the client has not
            granted again (consumed) hold this many bytes; one item always
            may go when none is in flight, whatever its size. A client grants
            again once the items it consumed hold half of it. Both sides
            should use the same value.
        max_instances: server side: instances one connection may have created
            and not yet deleted (``--max-instances``).
        max_server_instances: server side: instances held at once, whoever
            created them (``--max-server-instances``).
        max_queued_events: server side: events an event-channel subscriber may
            fall behind before it is dropped (``--max-queued-events``).
    """

    max_message_size: int = DEFAULT_MAX_FRAME_SIZE
    max_buffers: int = DEFAULT_MAX_BUFFERS
    max_depth: int = DEFAULT_MAX_DEPTH
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_calls: int = 256
    max_credit: int = 1024
    max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES
    max_instances: int = 64
    max_server_instances: int = 1024
    max_queued_events: int = 1024

    def __post_init__(self) -> None:
        for field in fields(self):
            name, value = field.name, getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, not {value!r}")
        if self.max_buffers > 0xFFFF:  # the frame header's buffer count is a u16
            raise ValueError("Limits.max_buffers cannot exceed 65535")
        if self.max_stream_bytes < MIN_STREAM_BYTES:
            raise ValueError(f"Limits.max_stream_bytes must be at least {MIN_STREAM_BYTES}")


class DecodedFrame(NamedTuple):
    """One frame as ``RpcConnection.decode`` left it for ``receive_decoded``."""

    codec: Codec | None  # None: the frame could not be decoded; ``payload`` says why
    tree: Any  # the parsed body: ``[kind, stream_id, ...]`` once checked
    buffers: list[memoryview]
    # The payload built already: a tuple of values (a Call's args, kwargs and
    # meta; a Result's value; StreamItems' items), or what building it raised;
    # None when there is none (the message's handler builds, or refuses, it).
    payload: Any
    size: int = 0  # the frame's length in bytes, header included


class Decoded(NamedTuple):
    """Frames of one transport message, decoded by ``RpcConnection.decode``."""

    frames: list[DecodedFrame]
    error: Exception | None  # what the next frame's header raised: raised after ``frames``
    rest: int | None  # where the frames not decoded yet start (None: no more)


class _InFlight:
    """Server side: the bytes of a stream's items sent and not yet granted again.

    ``batches`` holds ``[items, bytes per item]`` per frame of items, oldest
    first: each ``Credit`` of ``k`` means the client consumed the oldest ``k``
    items, so their share of their frames' bytes is no longer in flight.
    """

    __slots__ = ("batches", "nbytes", "share")

    def __init__(self) -> None:
        self.batches: deque[list[float]] = deque()
        self.nbytes = 0.0
        self.share = 0.0  # bytes per item of the last frame sent; 0: none sent yet

    def sent(self, count: int, size: int) -> None:
        share = self.share = size / count
        self.batches.append([count, share])
        self.nbytes += size

    def granted(self, count: int) -> None:
        batches = self.batches
        while count and batches:
            batch = batches[0]
            if batch[0] > count:
                batch[0] -= count
                self.nbytes -= count * batch[1]
                return
            count -= int(batch[0])
            batches.popleft()
            self.nbytes -= batch[0] * batch[1]
        if not batches:
            self.nbytes = 0.0  # no rounding left over


class RpcConnection:
    """One end of a remote-exec connection, as a state machine.

    Args:
        side: ``Side.CLIENT`` sends calls, ``Side.SERVER`` answers them.
        registry: resolves instance references and custom types in payloads.
        codec: the codec this side sends with ("msgpack" or "json"); a server
            answers in the codec of the call it answers.
        limits: size, depth and in-flight caps.
    """

    def __init__(
        self,
        side: Side,
        registry: InstanceRegistry | None = None,
        *,
        codec: str = "msgpack",
        limits: Limits | None = None,
    ) -> None:
        self.side = side
        self.registry = registry
        self.limits = limits or Limits()
        self._codec = codec_named(codec, self.limits.max_depth, self.limits.max_elements)
        self._codecs: dict[int, Codec] = {self._codec.codec_id: self._codec}
        self._assembler = FrameAssembler(
            max_size=self.limits.max_message_size, max_buffers=self.limits.max_buffers
        )
        self._events: list[Message] = []
        self._outgoing: list[FramePieces] = []
        self._next_id = 1
        # client: id -> outstanding credit (None for a plain call)
        # server: id -> remaining credit (None for a plain call)
        self._open: dict[int, int | None] = {}
        self._reply_codec: dict[int, Codec] = {}
        self._in_flight: dict[int, _InFlight] = {}  # server: open streams' bytes
        self._frame_size = 0  # the length of the frame being received
        self._abandoned: set[int] = set()  # client: undecodable streams, answers dropped
        self.closed = False

    # -- state -----------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """How many calls and streams are open on this connection."""
        return len(self._open)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._open

    def credit(self, stream_id: int) -> int:
        """Server side: how many items may still be sent on ``stream_id``."""
        return self._open.get(stream_id) or 0

    def stream_bytes(self, stream_id: int) -> int:
        """Server side: the bytes of the frames of items sent on ``stream_id``
        and not granted again yet (items of a frame partly granted count
        their share of it)."""
        flight = self._in_flight.get(stream_id)
        return 0 if flight is None else round(flight.nbytes)

    def allowance(self, stream_id: int) -> int:
        """Server side: how many items to produce now on ``stream_id``: its
        credit, bounded by ``Limits.max_stream_bytes``.

        0 while the items sent and not granted again hold that many bytes;
        else as many items as fit in what is left, by the size of the last
        frame's items, and at least one. Before any item was sent, one: its
        size is not known yet.
        """
        left = self._open.get(stream_id)
        if not left:
            return 0
        flight = self._in_flight.get(stream_id)
        if flight is None:
            return left
        if not flight.share:
            return 1
        room = self.limits.max_stream_bytes - flight.nbytes
        if room <= 0:
            return 0
        return max(1, min(left, int(room / flight.share)))

    def open_ids(self) -> list[int]:
        return list(self._open)

    # -- input -----------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from a byte stream; whole frames become events.

        Raises:
            FrameError: a header is invalid (checked before the body arrives).
            ProtocolError: a frame holds an invalid message.
        """
        for run in self._assembler.feed(data if type(data) is bytes else bytes(data)):
            self.receive_frame(run)

    def receive_frame(self, data: bytes | bytearray | memoryview) -> None:
        """Feed one transport message: one or more whole frames back to back.

        Senders may pack the frames they have queued together into one
        websocket message (see ``pack_frames``): fewer messages and syscalls
        when many calls are in flight. Frames are sliced, never copied.

        Raises:
            FrameError, ProtocolError: a frame or its envelope is invalid (the
                frames before it have been received).
        """
        limits = self.limits
        header = decode_header(
            data, max_size=limits.max_message_size, max_buffers=limits.max_buffers
        )
        if header.frame_length == len(data):
            self._receive_one(data, header)
            return
        view = memoryview(data).cast("B")
        offset, end = 0, len(view)
        while offset < end:
            if offset:
                header = decode_header(
                    view[offset:], max_size=limits.max_message_size, max_buffers=limits.max_buffers
                )
            size = header.frame_length
            if offset + size > end:
                raise FrameError(
                    f"truncated frame: header says {size} bytes, {end - offset} left in the message"
                )
            self._receive_one(view[offset : offset + size], header)
            offset += size

    def _receive_one(self, data: bytes | bytearray | memoryview, header: FrameHeader) -> None:
        if self.closed:
            raise ProtocolError("received a frame after the connection closed")
        frame = decode_frame(data, header=header)
        codec = self._codecs.get(frame.codec_id)
        if codec is None:
            limits = self.limits
            codec = self._codecs[frame.codec_id] = codec_for(
                frame.codec_id, limits.max_depth, limits.max_elements
            )
        try:
            tree = codec.parse(frame.body)
        except CodecError as exc:
            raise ProtocolError(f"undecodable message: {exc}") from exc
        stream_id, handler = self._envelope(tree)
        self._frame_size = header.frame_length
        handler(self, codec, stream_id, tree[2:], frame.buffers)

    def _envelope(self, tree: Any) -> tuple[int, Callable[..., None]]:
        """A decoded message's stream id and the receiver of its kind.

        Raises:
            ProtocolError: not ``[kind, stream_id, ...]``, or a kind this side
                does not receive.
        """
        if type(tree) is not list or len(tree) < 2 or type(tree[0]) is not int:
            raise ProtocolError("a message must be an array [kind, stream_id, ...]")
        kind, stream_id = tree[0], tree[1]
        if type(stream_id) is not int or not 0 <= stream_id < 2**63:
            raise ProtocolError(f"invalid stream id {stream_id!r}")
        handler = _RECEIVERS.get((self.side, kind))
        if handler is None:
            raise ProtocolError(f"unexpected message kind {kind!r} for the {self.side.value}")
        return stream_id, handler

    def decode(self, data: bytes | bytearray | memoryview, start: int = 0) -> Decoded:
        """The first half of ``receive_frame``, for a large message: check,
        parse and build its frames from offset ``start``, touching no state.

        It reads only what does not change (the limits, the codecs, the
        registry's coders and instances), so it may run in a worker thread
        while the connection sends and answers; hand the result to
        ``receive_decoded``, on the connection's own thread, before decoding
        anything else. It stops before a frame that would take the bodies
        decoded together past ``max_elements`` bytes (a value takes at least
        one byte), so that one call holds at most about ``max_elements``
        values however many frames a message packs; decode again from
        ``rest`` for the others.

        Never raises: an error is kept in ``error``, to be raised by
        ``receive_decoded`` once the frames before it are received.
        """
        limits = self.limits
        view = memoryview(data).cast("B")
        end = len(view)
        frames: list[DecodedFrame] = []
        offset = start
        bodies = 0
        try:
            while True:
                header = decode_header(
                    view[offset:], max_size=limits.max_message_size, max_buffers=limits.max_buffers
                )
                bodies += header.body_length
                if frames and bodies > limits.max_elements:
                    return Decoded(frames, None, offset)
                size = header.frame_length
                if offset + size > end:
                    raise FrameError(
                        f"truncated frame: header says {size} bytes, {end - offset} left in the message"
                    )
                try:
                    frames.append(self._decode_one(view[offset : offset + size], header))
                except Exception as exc:  # noqa: BLE001 - raised in order by receive_decoded
                    frames.append(DecodedFrame(None, None, [], exc))
                    return Decoded(frames, None, None)
                offset += size
                if offset >= end:
                    return Decoded(frames, None, None)
        except Exception as exc:  # noqa: BLE001 - raised in order by receive_decoded
            return Decoded(frames, exc, None)

    def _decode_one(self, data: memoryview, header: FrameHeader) -> DecodedFrame:
        frame = decode_frame(data, header=header)
        codec = self._codecs.get(frame.codec_id)
        if codec is None:
            limits = self.limits
            codec = codec_for(frame.codec_id, limits.max_depth, limits.max_elements)
        try:
            tree = codec.parse(frame.body)
        except CodecError as exc:
            raise ProtocolError(f"undecodable message: {exc}") from exc
        payload = None
        if type(tree) is list and len(tree) >= 2 and type(tree[0]) is int:
            build = _PAYLOADS.get((self.side, tree[0]))
            if build is not None:
                try:
                    payload = build(self, codec, tree[2:], frame.buffers)
                except Exception as exc:  # noqa: BLE001 - raised where building would have been
                    payload = exc
        return DecodedFrame(codec, tree, frame.buffers, payload, header.frame_length)

    def receive_decoded(self, decoded: Decoded) -> None:
        """The second half of ``receive_frame``: receive what ``decode`` made,
        in order, as ``receive_frame`` would have.

        Raises:
            FrameError, ProtocolError: as ``receive_frame`` (the frames before
                the invalid one have been received).
        """
        for frame in decoded.frames:
            if self.closed:
                raise ProtocolError("received a frame after the connection closed")
            codec, tree = frame.codec, frame.tree
            if codec is None:
                raise frame.payload
            self._codecs.setdefault(codec.codec_id, codec)
            stream_id, handler = self._envelope(tree)
            self._frame_size = frame.size
            if frame.payload is None:
                handler(self, codec, stream_id, tree[2:], frame.buffers)
            else:  # a handler of _PAYLOADS' kinds, which takes it
                handler(self, codec, stream_id, tree[2:], frame.buffers, frame.payload)
        if decoded.error is not None:
            raise decoded.error

    def events_received(self) -> list[Message]:
        """The messages decoded since the last call, in order."""
        events, self._events = self._events, []
        return events

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outgoing)

    def data_to_send(self) -> list[FramePieces]:
        """Frames to write, each as a list of pieces (header+body, then buffers)."""
        frames, self._outgoing = self._outgoing, []
        return frames

    # -- output: client ----------------------------------------------------------
    def send_call(
        self,
        target: str,
        method: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        stream: bool = False,
        credit: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Queue a call; returns its stream id.

        Raises:
            CodecError, FrameError: the arguments cannot be sent (nothing is queued).
        """
        self._require(Side.CLIENT)
        if stream and not 0 <= credit <= self.limits.max_credit:
            raise ValueError(f"credit must be between 0 and {self.limits.max_credit}")
        stream_id = self._next_id
        self._send(
            self._codec,
            [
                1,
                stream_id,
                target,
                method,
                list(args),
                kwargs or {},
                stream,
                credit if stream else 0,
                meta or {},
            ],
        )
        self._next_id += 1
        self._open[stream_id] = credit if stream else None
        return stream_id

    def send_credit(self, stream_id: int, count: int) -> None:
        """Grant ``count`` more items on an open stream."""
        self._require(Side.CLIENT)
        if self._open.get(stream_id) is None:
            return  # finished meanwhile: nothing to grant
        if count <= 0:
            raise ValueError("credit must be positive")
        # The server refuses a grant that takes its view of the credit over the
        # cap, and its view never exceeds ours: check here instead of failing there.
        if (self._open[stream_id] or 0) + count > self.limits.max_credit:
            raise ValueError(f"outstanding credit would exceed {self.limits.max_credit}")
        self._send(self._codec, [6, stream_id, count])
        self._open[stream_id] = (self._open[stream_id] or 0) + count

    def send_cancel(self, stream_id: int) -> None:
        """Ask the server to cancel a call or close a stream (it still answers)."""
        self._require(Side.CLIENT)
        if stream_id in self._open:
            self._send(self._codec, [7, stream_id])

    # -- output: server ----------------------------------------------------------
    def send_result(self, stream_id: int, value: Any) -> None:
        """Answer a call.

        Raises:
            CodecError, FrameError: the value cannot be sent; the call stays open
                so that the caller can send a failure instead.
        """
        self._end(stream_id, [2, stream_id, value])

    def send_failure(self, stream_id: int, exc: BaseException) -> None:
        """End a call or stream with ``exc``: its type name, message and traceback
        travel, the traceback without the server's paths (``client_traceback``)."""
        tb = client_traceback(exc)
        self._end(stream_id, [3, stream_id, exception_type_name(exc), str(exc), tb])

    def send_items(self, stream_id: int, items: Sequence[Any]) -> None:
        """Send stream items; never more than the credit left.

        Items that together would make a frame over the size cap go in as many
        frames as it takes (halving the batch until each fits).

        Raises:
            ProtocolError: more items than the client granted.
            CodecError, FrameError: an item cannot be sent, even alone (the
                items before it were sent; the stream stays open).
        """
        self._require(Side.SERVER)
        left = self._open.get(stream_id)
        if left is None:
            raise ProtocolError(f"stream {stream_id} is not open")
        if len(items) > left:
            raise ProtocolError(
                f"{len(items)} items exceed the credit of {left} on stream {stream_id}"
            )
        self._send_items(self._reply_codec.get(stream_id, self._codec), stream_id, list(items))

    def _send_items(self, codec: Codec, stream_id: int, items: list[Any]) -> None:
        try:
            frame = self._send(codec, [4, stream_id, items])
        except FrameError:
            if len(items) < 2:
                raise
            half = len(items) // 2
            self._send_items(codec, stream_id, items[:half])
            self._send_items(codec, stream_id, items[half:])
            return
        self._open[stream_id] = (self._open[stream_id] or 0) - len(items)
        flight = self._in_flight.get(stream_id)
        if flight is not None and items:
            if len(frame) == 1:  # nothing out of band: the common case
                size = len(frame[0])
            else:
                size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in frame)
            flight.sent(len(items), size)

    def send_stream_end(self, stream_id: int) -> None:
        self._end(stream_id, [5, stream_id])

    # -- output: both ------------------------------------------------------------
    def send_close(self, reason: str = "") -> None:
        """Say goodbye; nothing more is sent after this."""
        if not self.closed:
            self._send(self._codec, [8, 0, reason])
            self.closed = True

    # -- internals ---------------------------------------------------------------
    def _require(self, side: Side) -> None:
        if self.side is not side:
            raise ProtocolError(f"only the {side.value} sends that message")
        if self.closed:
            raise ProtocolError("the connection is closed")

    def _end(self, stream_id: int, message: list[Any]) -> None:
        self._require(Side.SERVER)
        if stream_id not in self._open:
            raise ProtocolError(f"stream {stream_id} is not open")
        self._send(self._reply_codec.get(stream_id, self._codec), message)
        del self._open[stream_id]
        self._reply_codec.pop(stream_id, None)
        self._in_flight.pop(stream_id, None)

    def _send(self, codec: Codec, message: list[Any]) -> FramePieces:
        # Every message starts [kind, stream id]: ints of our own, not walked.
        body, buffers = codec.dumps(message, self.registry, head=2)
        frame = encode_frame(
            codec.codec_id,
            body,
            buffers,
            max_size=self.limits.max_message_size,
            max_buffers=self.limits.max_buffers,
        )
        self._outgoing.append(frame)
        return frame

    def _build(self, codec: Codec, tree: Any, buffers: list[memoryview]) -> Any:
        return codec.build(tree, self.registry, buffers)

    def _queue_failure(self, codec: Codec, stream_id: int, exc: BaseException) -> None:
        self._send(codec, [3, stream_id, exception_type_name(exc), str(exc), ""])

    # server receives
    def _on_call(
        self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview], payload: Any = None
    ) -> None:
        if len(f) != 7:
            raise ProtocolError("a Call has 7 fields")
        target, method, args, kwargs, stream, credit, meta = f
        if (
            type(target) is not str
            or type(method) is not str
            or type(args) is not list
            or type(kwargs) is not dict
            or type(stream) is not bool
            or type(credit) is not int
            or type(meta) is not dict
        ):
            raise ProtocolError("a Call field has the wrong type")
        if sid == 0 or sid in self._open:
            raise ProtocolError(f"stream id {sid} is already in flight")
        if len(self._open) >= self.limits.max_calls:
            self._queue_failure(
                codec,
                sid,
                TooManyCallsError(f"this connection already has {len(self._open)} calls in flight"),
            )
            return
        if stream and not 0 <= credit <= self.limits.max_credit:
            self._queue_failure(codec, sid, ProtocolError(f"credit {credit} is out of range"))
            return
        try:
            if payload is None:
                args, kwargs, meta = self._call_payload(codec, args, kwargs, meta, buffers)
            else:
                args, kwargs, meta = _built(payload)
        except RemoteExecError as exc:
            self._queue_failure(codec, sid, exc)
            return
        self._open[sid] = credit if stream else None
        self._reply_codec[sid] = codec
        if stream:
            self._in_flight[sid] = _InFlight()
        self._events.append(Call(sid, target, method, args, kwargs, stream, credit, meta))

    def _call_payload(
        self, codec: Codec, args: list[Any], kwargs: dict[Any, Any], meta: Any, buffers: Any
    ) -> tuple[Any, Any, Any]:
        """A Call's args, kwargs and meta, built (its fields' types are checked)."""
        args = self._build(codec, args, buffers)
        if kwargs:  # an empty map needs no walk (the common case)
            kwargs = self._build(codec, kwargs, buffers)
            if not all(type(k) is str for k in kwargs):
                raise CodecError("keyword argument names must be strings")
        if meta:
            meta = self._build(codec, meta, buffers)
        # A tag in place of the list/map (e.g. a bytes or tuple tag) builds
        # to another type: refuse it here rather than in the application.
        if type(args) is not list or type(kwargs) is not dict or type(meta) is not dict:
            raise CodecError("a Call's args must be a list, kwargs and meta maps")
        return args, kwargs, meta

    def _prebuild_call(
        self, codec: Codec, f: list[Any], buffers: list[memoryview]
    ) -> tuple[Any, Any, Any] | None:
        if (
            len(f) != 7
            or type(f[2]) is not list
            or type(f[3]) is not dict
            or type(f[6]) is not dict
        ):
            return None  # malformed: _on_call says so
        return self._call_payload(codec, f[2], f[3], f[6], buffers)

    def _on_credit(self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview]) -> None:
        if len(f) != 1 or type(f[0]) is not int or f[0] <= 0:
            raise ProtocolError("a Credit carries one positive count")
        left = self._open.get(sid)
        if left is None:
            return  # the stream ended meanwhile, or it is a plain call
        if left + f[0] > self.limits.max_credit:
            raise ProtocolError(
                f"credit on stream {sid} exceeds the cap of {self.limits.max_credit}"
            )
        self._open[sid] = left + f[0]
        flight = self._in_flight.get(sid)
        if flight is not None:
            flight.granted(f[0])
        self._events.append(Credit(sid, f[0]))

    def _on_cancel(self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview]) -> None:
        if f:
            raise ProtocolError("a Cancel has no fields")
        if sid in self._open:  # else: finished meanwhile
            self._events.append(Cancel(sid))

    def _on_close(self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview]) -> None:
        reason = f[0] if f and type(f[0]) is str else ""
        self.closed = True
        self._events.append(Close(sid, reason))

    # client receives
    def _expect(self, sid: int) -> int | None:
        if sid not in self._open:
            raise ProtocolError(f"reply for stream {sid}, which is not in flight")
        return self._open[sid]

    def _finish(self, sid: int) -> bool:
        """Client: close ``sid``; False if its answers are being dropped."""
        self._expect(sid)
        del self._open[sid]
        if sid in self._abandoned:
            self._abandoned.discard(sid)
            return False
        return True

    def _on_result(
        self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview], payload: Any = None
    ) -> None:
        if len(f) != 1:
            raise ProtocolError("a Result has 1 field")
        if not self._finish(sid):
            return
        try:
            if payload is None:
                value = self._build(codec, f[0], buffers)
            else:
                (value,) = _built(payload)
            self._events.append(Result(sid, value))
        except RemoteExecError as exc:
            self._events.append(Failure(sid, exception_type_name(exc), str(exc)))

    def _on_failure(self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview]) -> None:
        if len(f) != 3 or not all(type(x) is str for x in f):
            raise ProtocolError("a Failure has 3 string fields")
        if self._finish(sid):
            self._events.append(Failure(sid, f[0], f[1], f[2]))

    def _prebuild_one(self, codec: Codec, f: list[Any], buffers: list[memoryview]) -> Any:
        """A Result's value or the StreamItems' list, built."""
        if len(f) != 1:
            return None  # malformed: the handler says so
        return (self._build(codec, f[0], buffers),)

    def _on_items(
        self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview], payload: Any = None
    ) -> None:
        if len(f) != 1 or type(f[0]) is not list:
            raise ProtocolError("StreamItems carry one list")
        left = self._expect(sid)
        if left is None:
            raise ProtocolError(f"stream items for call {sid}, which is not a stream")
        if len(f[0]) > left:
            raise ProtocolError(f"server sent {len(f[0])} items with only {left} granted")
        self._open[sid] = left - len(f[0])
        if sid in self._abandoned:
            return
        try:
            if payload is None:
                items = self._build(codec, f[0], buffers)
            else:
                (items,) = _built(payload)
        except RemoteExecError as exc:
            # The consumer sees the error now; the server is told to stop, and
            # whatever it still sends for this stream is dropped.
            self._abandoned.add(sid)
            self._events.append(Failure(sid, exception_type_name(exc), str(exc)))
            self._send(self._codec, [7, sid])
            return
        if type(items) is not list:  # a tag in place of the list
            raise ProtocolError("StreamItems carry one list")
        self._events.append(StreamItems(sid, items, self._frame_size))

    def _on_stream_end(
        self, codec: Codec, sid: int, f: list[Any], buffers: list[memoryview]
    ) -> None:
        if f:
            raise ProtocolError("StreamEnd has no fields")
        if self._expect(sid) is None:
            raise ProtocolError(f"stream end for call {sid}, which is not a stream")
        if self._finish(sid):
            self._events.append(StreamEnd(sid))


_RECEIVERS = {
    (Side.SERVER, KIND_OF[Call]): RpcConnection._on_call,
    (Side.SERVER, KIND_OF[Credit]): RpcConnection._on_credit,
    (Side.SERVER, KIND_OF[Cancel]): RpcConnection._on_cancel,
    (Side.SERVER, KIND_OF[Close]): RpcConnection._on_close,
    (Side.CLIENT, KIND_OF[Result]): RpcConnection._on_result,
    (Side.CLIENT, KIND_OF[Failure]): RpcConnection._on_failure,
    (Side.CLIENT, KIND_OF[StreamItems]): RpcConnection._on_items,
    (Side.CLIENT, KIND_OF[StreamEnd]): RpcConnection._on_stream_end,
    (Side.CLIENT, KIND_OF[Close]): RpcConnection._on_close,
}

# What ``decode`` builds ahead, by (side, kind): the payload a handler would build.
_PAYLOADS = {
    (Side.SERVER, KIND_OF[Call]): RpcConnection._prebuild_call,
    (Side.CLIENT, KIND_OF[Result]): RpcConnection._prebuild_one,
    (Side.CLIENT, KIND_OF[StreamItems]): RpcConnection._prebuild_one,
}


def _built(payload: Any) -> Any:
    """A payload ``decode`` built, or the exception building it raised, raised now."""
    if isinstance(payload, BaseException):
        raise payload
    return payload
