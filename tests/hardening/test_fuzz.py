"""A hypothesis fuzz harness over the frame and message decoders.

The only outcomes allowed for anything a peer may send are a decoded message
(of a kind that side accepts, with the documented field types), a failure
reply for that one call, or the documented error: ``ProtocolError`` (its
subclasses ``FrameError`` and ``CodecError`` included). Never another
exception, never a reply that does not itself decode, and never an answer
that depends on how the bytes were cut into reads.

Inputs are built to get past the first checks: well-formed frames whose
bodies are hostile message trees (tags, buffer references, wrong types, huge
or deep values) in both codecs, then optionally mutated, packed several to a
message, and fed in random chunks. The amount run in CI is bounded; set
``REMOTE_EXEC_FUZZ_EXAMPLES`` to run more (e.g. 20000 for a night).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Sequence
from typing import Any

import anyio
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from remote_exec.exceptions import ConnectionLostError, ProtocolError
from remote_exec.framing import CODEC_JSON, CODEC_MSGPACK, decode_frame, encode_frame
from remote_exec.messages import (
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
from remote_exec.protocol import Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry
from remote_exec.server.dispatch import Dispatcher
from remote_exec.server.testing import memory_transport_pair
from tests.core.helpers import join
from tests.server.test_dispatch import connect, serving

EXAMPLES = int(os.environ.get("REMOTE_EXEC_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Small caps, so that the cap checks are reached too.
LIMITS = Limits(max_message_size=64 * 1024, max_buffers=8, max_depth=16, max_calls=4, max_credit=16)

ACCEPTED = {
    Side.SERVER: (Call, Credit, Cancel, Close),
    Side.CLIENT: (Result, Failure, StreamItems, StreamEnd, Close),
}

# -- hostile message trees ------------------------------------------------------------------

names = st.sampled_from(
    ["", "dev", "echo", "create_instance", "list_instances", "subscribe", "_x", "__class__"]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=6),
    names,
)


def msgpack_values() -> st.SearchStrategy[Any]:
    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        tags = st.builds(
            lambda code, fields: [msgpack.ExtType(code, b""), *fields],
            st.integers(0, 12),
            st.lists(
                st.one_of(children, st.integers(-2, 9), st.sampled_from(["<f8", "|O"])), max_size=4
            ),
        )
        return st.one_of(
            tags,
            st.lists(children, max_size=4),
            st.dictionaries(scalars, children, max_size=3),
        )

    return st.recursive(scalars | st.binary(max_size=4), extend, max_leaves=12)


def json_values() -> st.SearchStrategy[Any]:
    tag_names = st.sampled_from(
        ["bytes", "bytearray", "memview", "ndarray", "tuple", "ref", "custom", "dict", "float", "?"]
    )

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        tags = st.builds(lambda name, v: {"$rx": name, "v": v}, tag_names, children)
        return st.one_of(
            tags,
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=3), children, max_size=3),
        )

    return st.recursive(scalars, extend, max_leaves=12)


@st.composite
def envelopes(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> list[Any]:
    """``[kind, stream_id, *fields]``: mostly plausible, sometimes anything."""
    kind = draw(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 7, 8]) | st.integers(-1, 12) | values)
    sid = draw(st.integers(0, 6) | st.integers(-(2**63), 2**64 - 1) | values)
    if kind == 1 and draw(st.booleans()):
        fields = [
            draw(names | values),
            draw(names | values),
            draw(st.lists(values, max_size=3) | values),
            draw(st.dictionaries(st.text(max_size=3), values, max_size=2) | values),
            draw(st.booleans() | values),
            draw(st.integers(-2, 20) | values),
            draw(st.dictionaries(st.text(max_size=3), values, max_size=2) | values),
        ]
        if draw(st.integers(0, 9)) == 0:
            fields = fields[: draw(st.integers(0, 8))]
    else:
        fields = draw(st.lists(values, max_size=5))
    return [kind, sid, *fields]


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame: a hostile envelope in either codec, with 0-3 buffers, maybe mutated."""
    if draw(st.booleans()):
        tree = draw(envelopes(msgpack_values()))
        try:
            body = msgpack.packb(tree, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            assume(False)
        codec_id = CODEC_MSGPACK
    else:
        tree = draw(envelopes(json_values()))
        body = json.dumps(tree).encode()
        codec_id = CODEC_JSON
    buffers = [memoryview(b) for b in draw(st.lists(st.binary(max_size=16), max_size=3))]
    data = bytearray(join(encode_frame(codec_id, body, buffers)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "length"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[position:]
        elif len(data) >= 24:  # rewrite a header length field
            offset, fmt = draw(st.sampled_from([(6, "<H"), (8, "<I"), (16, "<Q")]))
            struct.pack_into(
                fmt, data, offset, draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
            )
        if not data:
            break
    return bytes(data)


# -- what must hold -------------------------------------------------------------------------


def fresh(side: Side) -> RpcConnection:
    connection = RpcConnection(side, InstanceRegistry(), limits=LIMITS)
    if side is Side.CLIENT:
        # Replies are only accepted for calls in flight: a plain call and two streams.
        connection.send_call("dev", "read", [1])
        connection.send_call("dev", "stream", stream=True, credit=LIMITS.max_credit)
        connection.send_call("dev", "other", stream=True, credit=0)
        connection.data_to_send()
    return connection


def normal(value: Any) -> Any:
    """A comparable form of a decoded value (views as bytes, NaN as a marker)."""
    if isinstance(value, memoryview):
        return ("view", value.tobytes())
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [normal(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(normal(k), normal(v)) for k, v in value.items()])
    if hasattr(value, "__array__"):
        return ("array", str(value.dtype), value.shape, value.tobytes())
    if hasattr(value, "__dataclass_fields__"):
        return (
            type(value).__name__,
            [normal(getattr(value, f)) for f in value.__dataclass_fields__],
        )
    return value


def check_event(side: Side, event: Message) -> None:
    assert isinstance(event, ACCEPTED[side]), event
    assert type(event.stream_id) is int
    assert 0 <= event.stream_id < 2**63
    if isinstance(event, Call):
        fields = (event.target, event.method, event.args, event.kwargs, event.stream, event.meta)
        assert tuple(map(type, fields)) == (str, str, list, dict, bool, dict), event
        assert all(type(key) is str for key in event.kwargs)
        assert 0 <= event.credit <= LIMITS.max_credit
    elif isinstance(event, Failure):
        assert all(type(x) is str for x in (event.type_name, event.message, event.traceback))
    elif isinstance(event, StreamItems):
        assert type(event.items) is list
    elif isinstance(event, Credit):
        assert 0 < event.count <= LIMITS.max_credit


def check_replies(connection: RpcConnection) -> None:
    """Whatever the server queued by itself is a well-formed Failure frame."""
    for pieces in connection.data_to_send():
        frame = decode_frame(join(pieces), max_size=LIMITS.max_message_size)
        body = bytes(frame.body)
        tree = msgpack.unpackb(body) if frame.codec_id == CODEC_MSGPACK else json.loads(body)
        assert [type(x) for x in tree] == [int, int, str, str, str], tree
        assert tree[0] == 3, tree  # a Failure


def outcome(side: Side, data: bytes, feed: str, cuts: Sequence[int] = ()) -> tuple[Any, ...]:
    """Feed ``data``; returns the events (normalised) and the error, if any."""
    connection = fresh(side)
    events: list[Message] = []
    error: BaseException | None = None
    try:
        if feed == "frame":
            connection.receive_frame(data)
        else:
            start = 0
            for cut in [*sorted(cuts), len(data)]:
                connection.receive_data(data[start:cut])
                start = max(start, cut)
                events.extend(connection.events_received())
    except ProtocolError as exc:  # the documented error: anything else fails the test
        error = exc
    events.extend(connection.events_received())
    for event in events:
        check_event(side, event)
    if side is Side.SERVER:
        check_replies(connection)
    return tuple(normal(event) for event in events), type(error)


@FUZZ
@given(frame=frames(), side=st.sampled_from(list(Side)))
def test_one_frame_decodes_or_raises_the_documented_error(frame: bytes, side: Side) -> None:
    outcome(side, frame, "frame")


@FUZZ
@given(
    batch=st.lists(frames(), min_size=1, max_size=4),
    side=st.sampled_from(list(Side)),
    data=st.data(),
)
def test_byte_streams_decode_the_same_however_they_are_cut(
    batch: list[bytes], side: Side, data: st.DataObject
) -> None:
    stream = b"".join(batch)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    whole = outcome(side, stream, "bytes")
    chunked = outcome(side, stream, "bytes", cuts)
    one_byte = outcome(side, stream[:2000], "bytes", range(min(len(stream), 2000)))
    assert chunked == whole
    if len(stream) <= 2000:
        assert one_byte == whole


@FUZZ
@given(batch=st.lists(frames(), min_size=2, max_size=4), side=st.sampled_from(list(Side)))
def test_several_frames_in_one_message(batch: list[bytes], side: Side) -> None:
    """A sender may pack frames into one websocket message: same rules for each."""
    outcome(side, b"".join(batch), "frame")


# -- the dispatcher behind the decoders ---------------------------------------------------------


@pytest.mark.anyio
@settings(
    max_examples=max(EXAMPLES // 5, 10),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(frames(), min_size=1, max_size=5))
async def test_the_dispatcher_survives_any_frames(batch: list[bytes]) -> None:
    """Frames go to a live dispatcher; a client on another connection keeps working."""
    async with serving(limits=LIMITS) as dispatcher, connect(dispatcher) as bystander:
        await _serve_batch(dispatcher, batch)
        assert isinstance(await bystander.invoke("", "list_instances"), list)


async def _serve_batch(dispatcher: Dispatcher, batch: list[bytes]) -> None:
    """Send ``batch`` on a connection of its own, read whatever comes back, hang up."""
    attacker, server_end = memory_transport_pair()

    async def drain() -> None:
        with contextlib.suppress(ConnectionLostError):
            while True:
                await attacker.receive_frame()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.serve, server_end)
            tg.start_soon(drain)
            with contextlib.suppress(ConnectionLostError):  # the server may hang up first
                for frame in batch:
                    await attacker.send_raw(frame)
            await anyio.wait_all_tasks_blocked()  # everything it will answer, answered
            await attacker.aclose()
