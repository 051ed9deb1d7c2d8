"""Helpers shared by the core tests: frame building, deep comparison, a connection pair."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from remote_exec.codecs import Codec, codec_named
from remote_exec.framing import CODEC_MSGPACK, HEADER_SIZE, MAGIC, VERSION, encode_frame
from remote_exec.messages import Message
from remote_exec.protocol import Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry


def join(pieces: Sequence[bytes | memoryview]) -> bytes:
    """The bytes of one frame given as pieces (what a transport writes back to back)."""
    return b"".join(bytes(piece) for piece in pieces)


def raw_frame(
    body: bytes,
    buffers: Sequence[bytes] = (),
    *,
    codec_id: int = CODEC_MSGPACK,
    magic: bytes = MAGIC,
    version: int = VERSION,
    reserved: int = 0,
    count: int | None = None,
    body_length: int | None = None,
    rest_length: int | None = None,
    lengths: Sequence[int] | None = None,
) -> bytes:
    """A frame built by hand, with every header field overridable (for hostile tests)."""
    lengths = [len(b) for b in buffers] if lengths is None else list(lengths)
    count = len(lengths) if count is None else count
    body_length = len(body) if body_length is None else body_length
    if rest_length is None:
        rest_length = 8 * len(lengths) + len(body) + sum(len(b) for b in buffers)
    header = struct.pack(
        "<4sBBHIIQ", magic, version, codec_id, count, body_length, reserved, rest_length
    )
    assert len(header) == HEADER_SIZE
    table = struct.pack(f"<{len(lengths)}Q", *lengths)
    return header + table + body + b"".join(buffers)


def message_frame(
    message: list[Any],
    codec: str = "msgpack",
    registry: InstanceRegistry | None = None,
) -> bytes:
    """A whole frame carrying ``message`` (a raw ``[kind, stream_id, ...]`` list)."""
    coder: Codec = codec_named(codec)
    body, buffers = coder.dumps(message, registry)
    return join(encode_frame(coder.codec_id, body, buffers))


def forged_frame(tree: Any, buffers: Sequence[bytes] = ()) -> bytes:
    """A msgpack frame whose body is ``tree`` packed as is (tags included, unchecked)."""
    body = msgpack.packb(tree, use_bin_type=True)
    return join(encode_frame(CODEC_MSGPACK, body, [memoryview(b) for b in buffers]))


def float_same(a: float, b: float) -> bool:
    """Equal including the sign of zero; any NaN equals any NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return struct.pack("<d", a) == struct.pack("<d", b)


def assert_same(expected: Any, actual: Any, path: str = "value") -> None:
    """Deep equality that also checks types (tuples stay tuples) and handles NaN.

    A memoryview must arrive as a flat byte memoryview with the same bytes; numpy
    arrays must keep dtype, shape and every byte.
    """
    if isinstance(expected, np.ndarray):
        assert type(actual) is np.ndarray, f"{path}: {type(actual).__name__} is not an ndarray"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), (
            f"{path}: array bytes differ"
        )
        return
    if type(expected) is memoryview:
        assert type(actual) is memoryview, f"{path}: {type(actual).__name__} is not a memoryview"
        assert actual.format == "B", f"{path}: format {actual.format!r}"
        assert actual.ndim == 1, f"{path}: ndim {actual.ndim}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: bytes differ"
        return
    assert type(actual) is type(expected), (
        f"{path}: {type(actual).__name__} arrived for {type(expected).__name__}"
    )
    if type(expected) is float:
        assert float_same(expected, actual), f"{path}: {actual!r} != {expected!r}"
    elif type(expected) in (list, tuple):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}[{i}]")
    elif type(expected) is dict:
        # Compare in order: NaN keys cannot be looked up, and both codecs keep order.
        assert len(actual) == len(expected), f"{path}: {len(actual)} keys != {len(expected)}"
        for i, ((ek, ev), (ak, av)) in enumerate(
            zip(expected.items(), actual.items(), strict=True)
        ):
            assert_same(ek, ak, f"{path}.keys()[{i}]")
            assert_same(ev, av, f"{path}[{ek!r}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def _deliver(frames: list[list[bytes | memoryview]], to: RpcConnection, mode: str) -> None:
    if mode == "frame":
        for pieces in frames:
            to.receive_frame(join(pieces))
    else:  # a byte stream: frames back to back, in one chunk
        to.receive_data(b"".join(join(pieces) for pieces in frames))


class ConnectionPair:
    """A client and a server ``RpcConnection`` wired back to back, in memory.

    ``mode`` is ``"frame"`` (websocket-like: one ``receive_frame`` per frame) or
    ``"data"`` (byte-stream-like: ``receive_data`` with everything written).
    """

    def __init__(
        self,
        *,
        mode: str = "frame",
        client_codec: str = "msgpack",
        server_codec: str = "msgpack",
        client_limits: Limits | None = None,
        server_limits: Limits | None = None,
        client_registry: InstanceRegistry | None = None,
        server_registry: InstanceRegistry | None = None,
    ) -> None:
        self.mode = mode
        self.client = RpcConnection(
            Side.CLIENT, client_registry, codec=client_codec, limits=client_limits
        )
        self.server = RpcConnection(
            Side.SERVER, server_registry, codec=server_codec, limits=server_limits
        )

    def to_server(self) -> list[Message]:
        """Deliver what the client wrote; returns the server's new events."""
        _deliver(self.client.data_to_send(), self.server, self.mode)
        return self.server.events_received()

    def to_client(self) -> list[Message]:
        """Deliver what the server wrote; returns the client's new events."""
        _deliver(self.server.data_to_send(), self.client, self.mode)
        return self.client.events_received()
