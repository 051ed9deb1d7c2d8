"""Frames: round trips, every header check, and hostile bytes that must only raise FrameError."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from remote_exec.exceptions import FrameError, ProtocolError
from remote_exec.framing import (
    CODEC_JSON,
    CODEC_MSGPACK,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    FrameAssembler,
    decode_frame,
    decode_header,
    encode_frame,
    frame_size,
    pack_frames,
)
from remote_exec.messages import Call
from remote_exec.protocol import Limits, RpcConnection, Side

from .helpers import join, message_frame, raw_frame

GIB = 1 << 30


def build(body: bytes, buffers: list[bytes], codec_id: int = CODEC_MSGPACK) -> bytes:
    return join(encode_frame(codec_id, body, [memoryview(b) for b in buffers]))


# -- round trips ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=100),
    buffers=st.lists(st.binary(max_size=50), max_size=8),
    codec_id=st.sampled_from([CODEC_MSGPACK, CODEC_JSON]),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_roundtrip(body: bytes, buffers: list[bytes], codec_id: int, kind: Any) -> None:
    views = [memoryview(b) for b in buffers]
    pieces = encode_frame(codec_id, body, views)
    assert len(pieces) == 1 + len(buffers)
    assert all(piece is view for piece, view in zip(pieces[1:], views, strict=True))
    data = join(pieces)
    assert (
        len(data)
        == frame_size(body, views)
        == HEADER_SIZE + 8 * len(buffers) + len(body) + sum(map(len, buffers))
    )
    header = decode_header(data)
    assert header.codec_id == codec_id
    assert header.buffer_count == len(buffers)
    assert header.body_length == len(body)
    assert header.frame_length == len(data)
    frame = decode_frame(kind(data))
    assert frame.codec_id == codec_id
    assert bytes(frame.body) == body
    assert [bytes(b) for b in frame.buffers] == buffers


def test_header_layout() -> None:
    data = build(b"BODY", [b"xy", b""], CODEC_JSON)
    assert data[:4] == b"RXEC" == MAGIC
    assert data[4] == VERSION == 1
    assert data[5] == CODEC_JSON == 2
    assert struct.unpack_from("<H", data, 6) == (2,)  # buffer count
    assert struct.unpack_from("<I", data, 8) == (4,)  # body length
    assert struct.unpack_from("<I", data, 12) == (0,)  # reserved
    assert struct.unpack_from("<Q", data, 16) == (8 * 2 + 4 + 2,)  # rest length
    assert struct.unpack_from("<2Q", data, 24) == (2, 0)  # buffer table
    assert data[40:44] == b"BODY"
    assert data[44:] == b"xy"
    assert data.hex() == (
        "52584543"
        "01"
        "02"
        "0200"
        "04000000"
        "00000000"
        "1600000000000000"
        "0200000000000000"
        "0000000000000000"
        "424f4459"
        "7879"
    )


def test_decoded_buffers_are_views_of_the_frame() -> None:
    data = bytearray(build(b"b", [b"abc", b"defg"]))
    frame = decode_frame(data)
    assert all(buffer.obj is data for buffer in [frame.body, *frame.buffers])
    data[-1:] = b"!"
    assert bytes(frame.buffers[1]) == b"def!"


# -- header checks ---------------------------------------------------------------------


BAD_FRAMES = [
    ("bad magic", raw_frame(b"x", magic=b"RXEX"), "magic"),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "magic"),
    ("version 0", raw_frame(b"x", version=0), "version"),
    ("version 2", raw_frame(b"x", version=2), "version"),
    ("codec 0", raw_frame(b"x", codec_id=0), "codec"),
    ("codec 3", raw_frame(b"x", codec_id=3), "codec"),
    ("codec 255", raw_frame(b"x", codec_id=255), "codec"),
    ("reserved", raw_frame(b"x", reserved=1), "reserved"),
    ("reserved high bit", raw_frame(b"x", reserved=1 << 31), "reserved"),
    ("too many buffers", raw_frame(b"", [b""] * 4097), "buffers"),
    ("count claims 65535", raw_frame(b"", count=65535, lengths=[]), "buffers"),
    ("huge", raw_frame(b"", rest_length=10 * GIB), "size cap"),
    ("max u64", raw_frame(b"", rest_length=2**64 - 1), "size cap"),
    ("body over rest", raw_frame(b"abc", rest_length=2), "inconsistent"),
    ("body under rest", raw_frame(b"ab", rest_length=3) + b"!", "inconsistent"),
    ("table over rest", raw_frame(b"", [b"a", b"b"], rest_length=8), "inconsistent"),
    ("table sum too big", raw_frame(b"", [b"ab"], lengths=[3], rest_length=10), "inconsistent"),
    ("table sum too small", raw_frame(b"", [b"ab"], lengths=[1]), "inconsistent"),
    ("extra byte", raw_frame(b"x") + b"\x00", "length"),
    ("missing byte", raw_frame(b"xy")[:-1], "length"),
    ("header only", raw_frame(b"xy")[:HEADER_SIZE], "length"),
    ("truncated header", raw_frame(b"xy")[: HEADER_SIZE - 1], "truncated"),
    ("empty", b"", "truncated"),
]


@pytest.mark.parametrize(("case", "data", "match"), BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_bad_frames(case: str, data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode_frame(data)
    for side in Side:
        # A transport message may hold several frames back to back, so the
        # connection may first decode a frame and then fail on what follows.
        with pytest.raises(ProtocolError):
            RpcConnection(side).receive_frame(data)


def test_caps_are_configurable() -> None:
    data = build(b"x" * 100, [b"a", b"b", b"c"])
    assert decode_frame(data, max_size=len(data), max_buffers=3).buffers
    with pytest.raises(FrameError, match="size cap"):
        decode_frame(data, max_size=len(data) - 1)
    with pytest.raises(FrameError, match="buffers"):
        decode_frame(data, max_buffers=2)
    with pytest.raises(FrameError, match="size cap"):
        encode_frame(
            CODEC_MSGPACK,
            b"x" * 100,
            [memoryview(b) for b in (b"a", b"b", b"c")],
            max_size=len(data) - 1,
        )
    with pytest.raises(FrameError, match="buffers"):
        encode_frame(CODEC_MSGPACK, b"", [memoryview(b"")] * 3, max_buffers=2)
    # the u16 count field is a hard cap whatever the configured one
    with pytest.raises(FrameError, match="buffers"):
        encode_frame(CODEC_MSGPACK, b"", [memoryview(b"")] * 65536, max_buffers=10**6)


def test_huge_header_is_refused_without_allocating() -> None:
    header = raw_frame(b"", rest_length=10 * GIB)
    assert len(header) == HEADER_SIZE
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="size cap"):
            decode_header(header)
        with pytest.raises(FrameError, match="size cap"):
            decode_frame(header)
        connection = RpcConnection(Side.SERVER)
        with pytest.raises(FrameError, match="size cap"):
            connection.receive_data(header)  # refused before any body arrives
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_receive_data_checks_the_header_before_the_body() -> None:
    limits = Limits(max_message_size=1000)
    connection = RpcConnection(Side.SERVER, limits=limits)
    with pytest.raises(FrameError, match="size cap"):
        connection.receive_data(raw_frame(b"", rest_length=2000)[:HEADER_SIZE])
    connection = RpcConnection(Side.SERVER)
    data = message_frame([1, 1, "", "f", [], {}, False, 0, {}])
    connection.receive_data(data[:HEADER_SIZE])
    assert connection.events_received() == []
    connection.receive_data(data[HEADER_SIZE:])
    assert len(connection.events_received()) == 1


def test_assembler_refuses_a_frame_over_the_cap_from_its_header_alone() -> None:
    assembler = FrameAssembler(max_size=1000)
    header = raw_frame(b"", rest_length=2000)[:HEADER_SIZE]
    assert assembler.feed(header[:10]) == []  # not yet a whole header: kept
    with pytest.raises(FrameError, match="size cap"):
        assembler.feed(header[10:])


def test_assembler_hands_back_a_message_of_whole_frames_as_it_is() -> None:
    data = message_frame([1, 1, "", "f", [], {}, False, 0, {}]) * 3
    assembler = FrameAssembler()
    runs = assembler.feed(data)
    assert runs == [data]
    assert runs[0] is data
    assert assembler.pending == 0


@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_assembler_gives_back_the_same_frames_however_they_are_cut(
    payloads: list[bytes], cuts: list[int]
) -> None:
    frames = [
        message_frame([1, 2 * sid + 1, "", "f", [payload], {}, False, 0, {}])
        for sid, payload in enumerate(payloads)
    ]
    data = b"".join(frames)
    bounds = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    assembler = FrameAssembler()
    runs: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        for run in assembler.feed(data[start:end]):
            runs.append(bytes(run))
            assert run[:4] == MAGIC  # every run starts at a frame boundary
    assert b"".join(runs) == data
    assert assembler.pending == 0
    whole = RpcConnection(Side.SERVER)
    for run in runs:
        whole.receive_frame(run)
    assert len(whole.events_received()) == len(frames)


# -- hostile bytes ------------------------------------------------------------------------


def feed_everywhere(data: bytes) -> None:
    """``data`` must decode or raise FrameError/ProtocolError, whatever the entry point."""
    try:
        decode_frame(data)
    except FrameError:
        pass
    for side in Side:
        for entry in ("receive_frame", "receive_data"):
            connection = RpcConnection(side)
            if side is Side.CLIENT:
                # calls 1 (plain) and 2 (a stream with credit) are waiting for replies
                connection.send_call("dev", "read", [1])
                connection.send_call("dev", "stream", stream=True, credit=3)
            try:
                getattr(connection, entry)(data)
            except ProtocolError:
                pass
            connection.events_received()
            connection.data_to_send()


header_prefixes = st.builds(
    lambda codec, count, tail: MAGIC + bytes([VERSION, codec]) + struct.pack("<H", count) + tail,
    st.sampled_from([CODEC_MSGPACK, CODEC_JSON]),
    st.integers(0, 4),
    st.binary(max_size=80),
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120) | header_prefixes)
def test_any_bytes_decode_or_raise_frame_errors(data: bytes) -> None:
    feed_everywhere(data)


# Valid frames of every message kind, in both codecs, to start mutations from.
VALID_MESSAGES: list[list[Any]] = [
    [1, 1, "dev", "read", [1, b"xy", (2,)], {"k": 1.5}, False, 0, {}],
    [1, 3, "", "gen", [], {}, True, 4, {"deadline": 1}],
    [2, 1, {"a": [b"buf", bytearray(b"x")]}],
    [3, 1, "ValueError", "bad", "Traceback..."],
    [4, 2, [1, (2, 3), b"z"]],
    [5, 2],
    [6, 2, 5],
    [7, 1],
    [8, 0, "bye"],
]
VALID_FRAMES = [message_frame(m, codec) for m in VALID_MESSAGES for codec in ("msgpack", "json")]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length"]))
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[position] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[position:]
        elif op == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[position : position + draw(st.integers(1, 4))]
        else:  # rewrite one length field, keeping the rest of the header valid
            offset, fmt = draw(st.sampled_from([(6, "<H"), (8, "<I"), (16, "<Q"), (24, "<Q")]))
            if len(data) >= offset + struct.calcsize(fmt):
                size = 8 * struct.calcsize(fmt)
                struct.pack_into(fmt, data, offset, draw(st.integers(0, 2**size - 1)))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(data=mutated_frames())
def test_mutated_frames_decode_or_raise_protocol_errors(data: bytes) -> None:
    feed_everywhere(data)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, 200), frames=st.lists(st.sampled_from(VALID_FRAMES), max_size=4))
def test_concatenated_and_cut_streams(cut: int, frames: list[bytes]) -> None:
    data = b"".join(frames)
    feed_everywhere(data[:cut] + data[cut + 1 :])


def test_one_message_carries_several_frames() -> None:
    client, server = RpcConnection(Side.CLIENT), RpcConnection(Side.SERVER)
    ids = [client.send_call("dev", "echo", [i, b"x" * i]) for i in range(5)]
    frames = client.data_to_send()
    messages = pack_frames(frames, max_size=10**6)
    assert len(messages) == 1
    server.receive_frame(b"".join(messages[0]))
    calls = [c for c in server.events_received() if isinstance(c, Call)]
    assert [c.stream_id for c in calls] == ids
    assert [c.args for c in calls] == [[i, b"x" * i] for i in range(5)]


def test_pack_frames_respects_the_size_cap() -> None:
    frames = [[build(b"a" * 100, [])], [build(b"b" * 100, [])], [build(b"c" * 100, [])]]
    size = len(frames[0][0])
    messages = pack_frames(frames, max_size=2 * size)
    assert [len(m) for m in messages] == [2, 1]
    assert pack_frames(frames, max_size=size - 1) == [[f[0]] for f in frames]  # never split


def test_a_truncated_second_frame_is_refused() -> None:
    client, server = RpcConnection(Side.CLIENT), RpcConnection(Side.SERVER)
    client.send_call("dev", "echo", [1])
    client.send_call("dev", "echo", [2])
    data = b"".join(b"".join(f) for f in client.data_to_send())
    with pytest.raises(FrameError, match="truncated"):
        server.receive_frame(data[:-1])
    assert [c.args for c in server.events_received() if isinstance(c, Call)] == [[1]]
