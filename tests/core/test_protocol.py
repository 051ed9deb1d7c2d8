"""The sans-I/O protocol: a client and a server RpcConnection wired back to back."""

from __future__ import annotations

import traceback
from typing import Any

import msgpack
import numpy as np
import pytest

from remote_exec.codecs import MsgpackCodec
from remote_exec.exceptions import (
    CodecError,
    FrameError,
    ProtocolError,
    RemoteException,
    TooManyCallsError,
    UnknownInstanceError,
    remote_exception,
)
from remote_exec.framing import (
    CODEC_JSON,
    CODEC_MSGPACK,
    decode_frame,
    decode_header,
)
from remote_exec.messages import (
    Call,
    Cancel,
    Close,
    Credit,
    Failure,
    Result,
    StreamEnd,
    StreamItems,
)
from remote_exec.protocol import Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry

from .helpers import ConnectionPair, assert_same, forged_frame, join, message_frame


@pytest.fixture(params=["frame", "data"])
def pair(request: pytest.FixtureRequest) -> ConnectionPair:
    """A connection pair over each transport shape (websocket-like, byte-stream-like)."""
    mode: str = request.param
    return ConnectionPair(mode=mode)


def call(pair: ConnectionPair, *args: Any, **kwargs: Any) -> tuple[int, Call]:
    """Send a call and return its id and the server's Call event."""
    sid = pair.client.send_call(*args, **kwargs)
    (event,) = pair.to_server()
    assert isinstance(event, Call)
    assert event.stream_id == sid
    return sid, event


class DeviceError(Exception):
    pass


def raised(exc: BaseException) -> BaseException:
    """``exc`` after being raised, so that it has a traceback."""
    try:
        raise exc
    except type(exc) as caught:
        return caught


# -- calls -------------------------------------------------------------------------------------


def test_call_and_result(pair: ConnectionPair) -> None:
    sid = pair.client.send_call("dev", "read", [3, b"raw"], {"n": (1, 2)}, meta={"trace": "x"})
    assert sid == 1
    assert pair.client.is_open(sid)
    events = pair.to_server()
    assert events == [
        Call(sid, "dev", "read", [3, b"raw"], {"n": (1, 2)}, False, 0, {"trace": "x"})
    ]
    assert pair.server.in_flight == 1
    pair.server.send_result(sid, {"value": (1.5, b"\x00" * 10)})
    events = pair.to_client()
    assert events == [Result(sid, {"value": (1.5, b"\x00" * 10)})]
    assert pair.client.in_flight == pair.server.in_flight == 0
    assert pair.client.data_to_send() == pair.server.data_to_send() == []


def test_failure_carries_type_message_and_traceback(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "read")
    pair.server.send_failure(sid, raised(ValueError("bad value")))
    (event,) = pair.to_client()
    assert isinstance(event, Failure)
    assert (event.stream_id, event.type_name, event.message) == (sid, "ValueError", "bad value")
    assert event.traceback.startswith("Traceback (most recent call last)")
    assert "in raised" in event.traceback
    assert event.traceback.rstrip().endswith("ValueError: bad value")
    exc = remote_exception(event.type_name, event.message, event.traceback)
    assert isinstance(exc, ValueError)
    assert isinstance(exc, RemoteException)

    sid, _ = call(pair, "dev", "read")
    pair.server.send_failure(sid, raised(DeviceError("jammed")))
    (event,) = pair.to_client()
    assert isinstance(event, Failure)
    assert event.type_name == f"{__name__}.DeviceError"
    assert event.message == "jammed"
    assert type(remote_exception(event.type_name, event.message, event.traceback)) is (
        RemoteException
    )


def test_failure_of_an_exception_never_raised(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "read")
    pair.server.send_failure(sid, KeyError("k"))
    (event,) = pair.to_client()
    assert event == Failure(sid, "KeyError", "'k'", "KeyError: 'k'\n")


def test_many_calls_are_multiplexed(pair: ConnectionPair) -> None:
    ids = [pair.client.send_call("dev", "echo", [i]) for i in range(50)]
    assert len(set(ids)) == 50
    assert pair.client.open_ids() == ids
    events = pair.to_server()
    assert [e.stream_id for e in events] == ids
    assert pair.server.in_flight == 50
    for event in reversed(events):  # answered out of order
        assert isinstance(event, Call)
        pair.server.send_result(event.stream_id, event.args[0] * 10)
    results = pair.to_client()
    assert {r.stream_id: r.value for r in results if isinstance(r, Result)} == {
        sid: i * 10 for i, sid in enumerate(ids)
    }
    assert len(results) == 50
    assert pair.client.in_flight == 0


def test_ids_are_not_reused_after_completion(pair: ConnectionPair) -> None:
    first, _ = call(pair, "dev", "a")
    pair.server.send_result(first, None)
    pair.to_client()
    second, _ = call(pair, "dev", "b")
    assert second > first


def test_unencodable_result_keeps_the_call_open(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "read")
    with pytest.raises(CodecError, match="register_coder"):
        pair.server.send_result(sid, object())
    assert pair.server.is_open(sid)
    assert pair.server.data_to_send() == []
    pair.server.send_failure(sid, CodecError("cannot send the result"))
    (event,) = pair.to_client()
    assert isinstance(event, Failure)
    assert (event.stream_id, event.type_name, event.message) == (
        sid,
        "remote_exec.CodecError",
        "cannot send the result",
    )


def test_unencodable_call_queues_nothing(pair: ConnectionPair) -> None:
    with pytest.raises(CodecError):
        pair.client.send_call("dev", "f", [object()])
    assert pair.client.data_to_send() == []
    assert pair.client.in_flight == 0
    assert pair.client.send_call("dev", "f") == 1  # the id was not used up


def test_only_the_right_side_sends(pair: ConnectionPair) -> None:
    with pytest.raises(ProtocolError):
        pair.server.send_call("dev", "f")
    with pytest.raises(ProtocolError):
        pair.client.send_result(1, None)
    with pytest.raises(ProtocolError):
        pair.client.send_items(1, [])
    with pytest.raises(ProtocolError):
        pair.server.send_credit(1, 1)
    with pytest.raises(ProtocolError):
        pair.server.send_cancel(1)
    with pytest.raises(ProtocolError, match="not open"):
        pair.server.send_result(7, None)
    with pytest.raises(ProtocolError, match="not open"):
        pair.server.send_stream_end(7)


# -- streams and credit --------------------------------------------------------------------------


def test_stream_with_credit(pair: ConnectionPair) -> None:
    sid, event = call(pair, "dev", "gen", [5], stream=True, credit=2)
    assert (event.stream, event.credit) == (True, 2)
    assert pair.server.credit(sid) == 2
    pair.server.send_items(sid, [0, 1])
    assert pair.server.credit(sid) == 0
    with pytest.raises(ProtocolError, match="credit"):
        pair.server.send_items(sid, [2])
    pair.server.send_items(sid, [])  # nothing is always allowed
    assert pair.to_client() == [StreamItems(sid, [0, 1]), StreamItems(sid, [])]

    pair.client.send_credit(sid, 3)
    assert pair.to_server() == [Credit(sid, 3)]
    assert pair.server.credit(sid) == 3
    pair.server.send_items(sid, [2, (3,)])
    pair.server.send_items(sid, [b"4"])
    with pytest.raises(ProtocolError, match="credit"):
        pair.server.send_items(sid, [5])
    pair.server.send_stream_end(sid)
    assert pair.to_client() == [
        StreamItems(sid, [2, (3,)]),
        StreamItems(sid, [b"4"]),
        StreamEnd(sid),
    ]
    assert pair.client.in_flight == pair.server.in_flight == 0
    # finished meanwhile: a late grant sends nothing
    pair.client.send_credit(sid, 1)
    assert pair.client.data_to_send() == []


def test_stream_can_end_with_a_failure(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "gen", stream=True, credit=1)
    pair.server.send_items(sid, ["a"])
    pair.server.send_failure(sid, raised(RuntimeError("generator broke")))
    items, failure = pair.to_client()
    assert items == StreamItems(sid, ["a"])
    assert isinstance(failure, Failure)
    assert failure.type_name == "RuntimeError"
    assert not pair.client.is_open(sid)


def test_stream_with_no_credit_up_front(pair: ConnectionPair) -> None:
    sid, event = call(pair, "dev", "gen", stream=True)
    assert event.credit == 0
    with pytest.raises(ProtocolError):
        pair.server.send_items(sid, [1])
    pair.client.send_credit(sid, 1)
    pair.to_server()
    pair.server.send_items(sid, [1])
    assert pair.to_client() == [StreamItems(sid, [1])]


def test_client_refuses_more_items_than_granted() -> None:
    client = RpcConnection(Side.CLIENT)
    sid = client.send_call("dev", "gen", stream=True, credit=2)
    client.receive_frame(message_frame([4, sid, [1]]))
    client.receive_frame(message_frame([4, sid, [2]]))
    assert client.events_received() == [StreamItems(sid, [1]), StreamItems(sid, [2])]
    with pytest.raises(ProtocolError, match="granted"):
        client.receive_frame(message_frame([4, sid, [3]]))

    client = RpcConnection(Side.CLIENT)
    sid = client.send_call("dev", "gen", stream=True, credit=2)
    with pytest.raises(ProtocolError, match="granted"):
        client.receive_frame(message_frame([4, sid, [1, 2, 3]]))


def test_credit_rules_on_the_server() -> None:
    limits = Limits(max_credit=10)
    server = RpcConnection(Side.SERVER, limits=limits)
    server.receive_frame(message_frame([1, 1, "", "gen", [], {}, True, 10, {}]))
    server.receive_frame(message_frame([1, 2, "", "plain", [], {}, False, 0, {}]))
    assert len(server.events_received()) == 2
    server.receive_frame(message_frame([6, 2, 5]))  # a plain call: ignored
    server.receive_frame(message_frame([6, 99, 5]))  # unknown or finished: ignored
    assert server.events_received() == []
    server.send_items(1, [1, 2, 3])
    server.receive_frame(message_frame([6, 1, 3]))  # back to 10
    assert server.events_received() == [Credit(1, 3)]
    with pytest.raises(ProtocolError, match="cap"):
        server.receive_frame(message_frame([6, 1, 1]))
    for bad in ([6, 1, 0], [6, 1, -1], [6, 1, True], [6, 1, 1.0], [6, 1], [6, 1, 1, 1]):
        with pytest.raises(ProtocolError):
            RpcConnection(Side.SERVER).receive_frame(message_frame(bad))


def test_client_credit_checks() -> None:
    client = RpcConnection(Side.CLIENT, limits=Limits(max_credit=10))
    with pytest.raises(ValueError, match="credit"):
        client.send_call("dev", "gen", stream=True, credit=11)
    with pytest.raises(ValueError, match="credit"):
        client.send_call("dev", "gen", stream=True, credit=-1)
    assert client.data_to_send() == []
    sid = client.send_call("dev", "gen", stream=True, credit=6)
    with pytest.raises(ValueError, match="positive"):
        client.send_credit(sid, 0)
    with pytest.raises(ValueError, match="exceed"):
        client.send_credit(sid, 5)  # 11 outstanding: the server would refuse it
    client.send_credit(sid, 4)
    client.receive_frame(message_frame([4, sid, [1, 2, 3]]))
    client.send_credit(sid, 3)  # 7 outstanding + 3
    assert len(client.data_to_send()) == 3


def test_credit_flow_keeps_both_views_within_the_cap() -> None:
    # A consumer that re-grants every item it takes never trips the server's cap.
    pair = ConnectionPair(client_limits=Limits(max_credit=4), server_limits=Limits(max_credit=4))
    sid, _ = call(pair, "dev", "gen", stream=True, credit=4)
    received: list[Any] = []
    for i in range(0, 20, 2):
        pair.server.send_items(sid, [i, i + 1])
        (event,) = pair.to_client()
        assert isinstance(event, StreamItems)
        received.extend(event.items)
        pair.client.send_credit(sid, len(event.items))
        pair.to_server()
    assert received == list(range(20))


def test_items_over_the_size_cap_together_go_in_several_frames() -> None:
    limits = Limits(max_message_size=64 * 1024, max_credit=16)
    pair = ConnectionPair(client_limits=limits, server_limits=limits)
    sid, _ = call(pair, "dev", "frames", stream=True, credit=16)
    frames = [bytes([i]) * 20_000 for i in range(8)]  # 160 kB together, 20 kB each
    pair.server.send_items(sid, frames)
    events = pair.to_client()
    assert len(events) >= 3  # at most three 20 kB items fit in one 64 KiB frame
    received = [item for event in events if isinstance(event, StreamItems) for item in event.items]
    assert received == frames
    assert pair.server.credit(sid) == 8
    too_big = b"x" * 70_000
    with pytest.raises(FrameError, match="size cap"):
        pair.server.send_items(sid, [b"ok", too_big])
    (event,) = pair.to_client()  # what fitted before the item that never can went out
    assert isinstance(event, StreamItems)
    assert event.items == [b"ok"]
    assert pair.server.credit(sid) == 7


# -- cancel --------------------------------------------------------------------------------------


def test_cancel_a_call_still_gets_a_terminal_reply(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "slow")
    pair.client.send_cancel(sid)
    assert pair.to_server() == [Cancel(sid)]
    assert pair.server.is_open(sid)  # the server still owes an answer
    assert pair.client.is_open(sid)
    pair.client.send_cancel(sid)  # cancelling twice is harmless
    assert pair.to_server() == [Cancel(sid)]
    pair.server.send_failure(sid, raised(TimeoutError("cancelled")))
    (event,) = pair.to_client()
    assert isinstance(event, Failure)
    assert not pair.client.is_open(sid)
    pair.client.send_cancel(sid)  # finished: nothing is sent
    assert pair.client.data_to_send() == []


def test_late_result_after_cancel_is_fine(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "fast")
    pair.client.send_cancel(sid)
    pair.server.send_result(sid, 42)  # crossed the Cancel on the wire
    assert pair.to_client() == [Result(sid, 42)]
    assert pair.to_server() == []  # the Cancel of a finished call is dropped
    assert pair.server.in_flight == 0


def test_cancel_a_stream(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "gen", stream=True, credit=5)
    pair.server.send_items(sid, [1])
    pair.client.send_cancel(sid)
    assert pair.to_server() == [Cancel(sid)]
    pair.server.send_items(sid, [2])  # in flight before the Cancel arrived
    pair.server.send_stream_end(sid)
    assert pair.to_client() == [StreamItems(sid, [1]), StreamItems(sid, [2]), StreamEnd(sid)]
    assert pair.client.in_flight == pair.server.in_flight == 0


def test_cancel_with_fields_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        RpcConnection(Side.SERVER).receive_frame(message_frame([7, 1, "why"]))


# -- caps and bad calls ----------------------------------------------------------------------------


def test_max_calls(pair: ConnectionPair) -> None:
    pair.server.limits = Limits(max_calls=2)
    first = pair.client.send_call("dev", "a")
    second = pair.client.send_call("dev", "b")
    third = pair.client.send_call("dev", "c")
    events = pair.to_server()
    assert [e.stream_id for e in events] == [first, second]  # the third never reaches the app
    (failure,) = pair.to_client()
    assert isinstance(failure, Failure)
    assert failure.stream_id == third
    assert failure.type_name == "remote_exec.TooManyCallsError"
    exc = remote_exception(failure.type_name, failure.message, failure.traceback)
    assert isinstance(exc, TooManyCallsError)
    assert not pair.client.is_open(third)
    # then normal service
    pair.server.send_result(first, "a")
    assert pair.to_client() == [Result(first, "a")]
    fourth, _ = call(pair, "dev", "d")
    pair.server.send_result(fourth, "d")
    pair.server.send_result(second, "b")
    assert pair.to_client() == [Result(fourth, "d"), Result(second, "b")]


def test_id_reuse_while_in_flight_is_a_protocol_error() -> None:
    server = RpcConnection(Side.SERVER)
    frame = message_frame([1, 5, "dev", "f", [], {}, False, 0, {}])
    server.receive_frame(frame)
    assert len(server.events_received()) == 1
    with pytest.raises(ProtocolError, match="in flight"):
        server.receive_frame(frame)
    # once answered, the id is free again
    server = RpcConnection(Side.SERVER)
    server.receive_frame(frame)
    server.send_result(5, None)
    server.receive_frame(frame)
    assert len(server.events_received()) == 2


def test_stream_id_zero_is_the_connection() -> None:
    with pytest.raises(ProtocolError):
        RpcConnection(Side.SERVER).receive_frame(
            message_frame([1, 0, "dev", "f", [], {}, False, 0, {}])
        )


def test_undecodable_arguments_fail_only_that_call(pair: ConnectionPair) -> None:
    class Unknown:
        pass

    held = Unknown()
    client_registry = InstanceRegistry()
    client_registry.add_instance(held, "held-only-here")
    client_registry.register_coder("tests.core.unknown", Unknown, lambda u: 1, lambda v: Unknown())
    pair.client.registry = client_registry
    pair.server.registry = InstanceRegistry()
    first = pair.client.send_call("dev", "f", [held])  # a reference the server cannot resolve
    second = pair.client.send_call("dev", "f", [], {"u": Unknown()})  # a coder it does not have
    assert pair.to_server() == []
    failures = pair.to_client()
    assert [f.stream_id for f in failures] == [first, second]
    assert isinstance(failures[0], Failure)
    assert failures[0].type_name == "remote_exec.UnknownInstanceError"
    assert "held-only-here" in failures[0].message
    assert isinstance(failures[1], Failure)
    assert failures[1].type_name == "remote_exec.CodecError"
    assert isinstance(
        remote_exception(failures[0].type_name, failures[0].message, ""), UnknownInstanceError
    )
    # the connection carries on
    sid, _ = call(pair, "dev", "g", [1])
    pair.server.send_result(sid, 1)
    assert pair.to_client() == [Result(sid, 1)]


E = msgpack.ExtType


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("case", "message", "buffers"),
    [
        ("buffer index out of range", [1, 1, "d", "f", [[E(1, b""), 3]], {}, False, 0, {}], 0),
        ("unknown tag", [1, 1, "d", "f", [[E(42, b""), 3]], {}, False, 0, {}], 0),
        ("args is a bytes tag", [1, 1, "d", "f", [E(1, b""), 0], {}, False, 0, {}], 1),
        ("args is a tuple tag", [1, 1, "d", "f", [E(5, b""), 1], {}, False, 0, {}], 0),
        ("kwargs not str keys", [1, 1, "d", "f", [], {1: 2}, False, 0, {}], 0),
        ("credit over the cap", [1, 1, "d", "f", [], {}, True, 10**6, {}], 0),
        ("negative credit", [1, 1, "d", "f", [], {}, True, -1, {}], 0),
        ("too deep", [1, 1, "d", "f", nested(70), {}, False, 0, {}], 0),
    ],
)
def test_bad_call_payload_is_a_failure_for_that_id(
    case: str, message: list[Any], buffers: int
) -> None:
    server = RpcConnection(Side.SERVER)
    server.receive_frame(forged_frame(message, [b"x"] * buffers))
    assert server.events_received() == []
    assert server.in_flight == 0
    (reply,) = server.data_to_send()
    decoded = decode_frame(join(reply))
    tree = MsgpackCodec().parse(decoded.body)
    assert tree[:2] == [3, 1]
    assert tree[2] in ("remote_exec.CodecError", "remote_exec.ProtocolError")
    server.receive_frame(message_frame([1, 2, "d", "f", [], {}, False, 0, {}]))  # still serving
    assert len(server.events_received()) == 1


BAD_SERVER_INPUT = [
    ("not a list", 5),
    ("a map", {"kind": 1}),
    ("too short", [1]),
    ("kind not int", ["1", 1]),
    ("kind bool", [True, 1]),
    ("unknown kind", [99, 1]),
    ("kind 0", [0, 1]),
    ("result to the server", [2, 1, None]),
    ("failure to the server", [3, 1, "a", "b", "c"]),
    ("items to the server", [4, 1, []]),
    ("stream end to the server", [5, 1]),
    ("stream id negative", [1, -1, "d", "f", [], {}, False, 0, {}]),
    ("stream id too big", [1, 2**63, "d", "f", [], {}, False, 0, {}]),
    ("stream id str", [1, "1", "d", "f", [], {}, False, 0, {}]),
    ("stream id float", [1, 1.0, "d", "f", [], {}, False, 0, {}]),
    ("call with 6 fields", [1, 1, "d", "f", [], {}, False, 0]),
    ("call with 8 fields", [1, 1, "d", "f", [], {}, False, 0, {}, 1]),
    ("target not str", [1, 1, 5, "f", [], {}, False, 0, {}]),
    ("method not str", [1, 1, "d", None, [], {}, False, 0, {}]),
    ("args a map", [1, 1, "d", "f", {}, {}, False, 0, {}]),
    ("kwargs a list", [1, 1, "d", "f", [], [], False, 0, {}]),
    ("stream an int", [1, 1, "d", "f", [], {}, 1, 0, {}]),
    ("credit a float", [1, 1, "d", "f", [], {}, True, 1.0, {}]),
    ("meta a list", [1, 1, "d", "f", [], {}, False, 0, []]),
]


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize(
    ("case", "message"), BAD_SERVER_INPUT, ids=[c[0] for c in BAD_SERVER_INPUT]
)
def test_server_refuses_malformed_messages(codec: str, case: str, message: Any) -> None:
    with pytest.raises(ProtocolError):
        RpcConnection(Side.SERVER).receive_frame(message_frame(message, codec))


BAD_CLIENT_INPUT = [
    ("call to the client", [1, 1, "d", "f", [], {}, False, 0, {}]),
    ("credit to the client", [6, 1, 1]),
    ("cancel to the client", [7, 1]),
    ("result for an unknown id", [2, 9, None]),
    ("result with 2 fields", [2, 1, None, None]),
    ("result with no field", [2, 1]),
    ("failure with 2 fields", [3, 1, "a", "b"]),
    ("failure with an int", [3, 1, "a", "b", 3]),
    ("failure for an unknown id", [3, 9, "a", "b", "c"]),
    ("items for a plain call", [4, 1, [1]]),
    ("items not a list", [4, 2, 1]),
    ("items a map", [4, 2, {}]),
    ("items a tuple tag", [4, 2, (1,)]),
    ("items for an unknown id", [4, 9, []]),
    ("stream end for a plain call", [5, 1]),
    ("stream end with a field", [5, 2, 0]),
    ("stream end for an unknown id", [5, 9]),
]


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize(
    ("case", "message"), BAD_CLIENT_INPUT, ids=[c[0] for c in BAD_CLIENT_INPUT]
)
def test_client_refuses_malformed_messages(codec: str, case: str, message: Any) -> None:
    client = RpcConnection(Side.CLIENT)
    assert client.send_call("dev", "f") == 1
    assert client.send_call("dev", "gen", stream=True, credit=5) == 2
    with pytest.raises(ProtocolError):
        client.receive_frame(message_frame(message, codec))


def test_undecodable_result_is_a_failure_event() -> None:
    client = RpcConnection(Side.CLIENT)
    sid = client.send_call("dev", "f")
    client.data_to_send()
    client.receive_frame(forged_frame([2, sid, [E(6, b""), "nobody"]]))
    (event,) = client.events_received()
    assert isinstance(event, Failure)
    assert event.stream_id == sid
    assert event.type_name == "remote_exec.CodecError"  # no registry: refs cannot resolve
    assert not client.is_open(sid)
    assert client.data_to_send() == []


def test_undecodable_stream_items_fail_and_cancel_the_stream() -> None:
    client = RpcConnection(Side.CLIENT, InstanceRegistry())
    sid = client.send_call("dev", "gen", stream=True, credit=10)
    client.data_to_send()
    client.receive_frame(message_frame([4, sid, [1]]))
    client.receive_frame(forged_frame([4, sid, [[E(6, b""), "nobody"]]]))
    first, failure = client.events_received()
    assert first == StreamItems(sid, [1])
    assert isinstance(failure, Failure)
    assert failure.type_name == "remote_exec.UnknownInstanceError"
    (cancel,) = client.data_to_send()  # the server is told to stop
    assert msgpack.unpackb(decode_frame(join(cancel)).body) == [7, sid]
    # whatever still arrives for that stream is dropped, and the id ends with it
    client.receive_frame(message_frame([4, sid, [2]]))
    client.receive_frame(message_frame([5, sid]))
    assert client.events_received() == []
    assert not client.is_open(sid)
    with pytest.raises(ProtocolError):
        client.receive_frame(message_frame([5, sid]))


def test_registry_resolves_references_both_ways() -> None:
    class Device:
        pass

    client_side, server_side = Device(), Device()
    client_registry, server_registry = InstanceRegistry(), InstanceRegistry()
    client_registry.add_instance(client_side, "cam")
    server_registry.add_instance(server_side, "cam")
    pair = ConnectionPair(client_registry=client_registry, server_registry=server_registry)
    sid, event = call(pair, "cam", "compare", [client_side])
    assert event.args[0] is server_side
    pair.server.send_result(sid, [server_side])
    (result,) = pair.to_client()
    assert isinstance(result, Result)
    assert result.value[0] is client_side


# -- close -----------------------------------------------------------------------------------------


def test_client_closes(pair: ConnectionPair) -> None:
    pair.client.send_close("done")
    pair.client.send_close("again")  # only one Close is sent
    assert pair.client.closed
    assert pair.to_server() == [Close(0, "done")]
    assert pair.server.closed
    with pytest.raises(ProtocolError, match="closed"):
        pair.client.send_call("dev", "f")
    with pytest.raises(ProtocolError, match="closed"):
        pair.server.receive_frame(message_frame([1, 1, "d", "f", [], {}, False, 0, {}]))


def test_server_closes(pair: ConnectionPair) -> None:
    sid, _ = call(pair, "dev", "f")
    pair.server.send_close("shutting down")
    assert pair.to_client() == [Close(0, "shutting down")]
    assert pair.client.closed
    assert pair.client.is_open(sid)  # the transport fails the waiters; the state says which
    with pytest.raises(ProtocolError, match="closed"):
        pair.server.send_result(sid, None)


def test_close_with_odd_fields_is_tolerated() -> None:
    server = RpcConnection(Side.SERVER)
    server.receive_frame(message_frame([8, 0]))
    assert server.events_received() == [Close(0, "")]
    client = RpcConnection(Side.CLIENT)
    client.receive_frame(message_frame([8, 0, 5]))
    assert client.events_received() == [Close(0, "")]


# -- codecs on the wire ---------------------------------------------------------------------------


def frame_codecs(frames: list[list[bytes | memoryview]]) -> list[int]:
    return [decode_header(join(pieces)).codec_id for pieces in frames]


def test_json_calls_are_answered_in_json() -> None:
    pair = ConnectionPair(client_codec="json", server_codec="msgpack")
    sid = pair.client.send_call("dev", "read", [1, b"x", (2,)], {"k": {1: 2}})
    frames = pair.client.data_to_send()
    assert frame_codecs(frames) == [CODEC_JSON]
    body = bytes(decode_frame(join(frames[0])).body)
    assert body == (
        b'[1,1,"dev","read",[1,{"$rx":"bytes","v":0},{"$rx":"tuple","v":[2]}],'
        b'{"k":{"$rx":"dict","v":[[1,2]]}},false,0,{}]'
    )
    for pieces in frames:
        pair.server.receive_frame(join(pieces))
    (event,) = pair.server.events_received()
    assert event == Call(sid, "dev", "read", [1, b"x", (2,)], {"k": {1: 2}}, False, 0, {})
    pair.server.send_result(sid, [b"y", float("nan")])
    frames = pair.server.data_to_send()
    assert frame_codecs(frames) == [CODEC_JSON]
    for pieces in frames:
        pair.client.receive_frame(join(pieces))
    (result,) = pair.client.events_received()
    assert isinstance(result, Result)
    assert_same([b"y", float("nan")], result.value)

    # a stream and a refused call are answered in JSON too; a msgpack call in msgpack
    pair.server.limits = Limits(max_calls=1)
    gen = pair.client.send_call("dev", "gen", stream=True, credit=1)
    refused = pair.client.send_call("dev", "other")
    pair.to_server()
    pair.server.send_items(gen, [1])
    frames = pair.server.data_to_send()
    assert frame_codecs(frames) == [CODEC_JSON, CODEC_JSON]
    assert [bytes(decode_frame(join(f)).body)[:6] for f in frames] == [b'[3,3,"', b"[4,2,["]
    assert refused == 3
    pair.server.send_stream_end(gen)
    other = RpcConnection(Side.CLIENT)
    other.send_call("dev", "f")
    for pieces in other.data_to_send():
        pair.server.receive_frame(join(pieces))
    assert frame_codecs(pair.server.data_to_send()) == [CODEC_JSON]  # the stream end
    pair.server.send_result(1, None)
    assert frame_codecs(pair.server.data_to_send()) == [CODEC_MSGPACK]


def test_receive_data_one_byte_at_a_time() -> None:
    client = RpcConnection(Side.CLIENT)
    for i in range(5):
        client.send_call("dev", "f", [i, b"x" * i, (i,)], {"k": [b"y"] * i})
    client.send_call("dev", "gen", stream=True, credit=3)
    client.send_credit(6, 2)
    client.send_cancel(6)
    client.send_close("bye")
    data = b"".join(join(pieces) for pieces in client.data_to_send())

    whole = RpcConnection(Side.SERVER)
    whole.receive_data(data)
    expected = whole.events_received()
    assert len(expected) == 9

    bytewise = RpcConnection(Side.SERVER)
    events = []
    for i in range(len(data)):
        bytewise.receive_data(data[i : i + 1])
        events.extend(bytewise.events_received())
    assert events == expected

    for cut in range(0, len(data), 7):  # every split into two chunks at a 7-byte stride
        split = RpcConnection(Side.SERVER)
        split.receive_data(data[:cut])
        split.receive_data(memoryview(data)[cut:])
        assert split.events_received() == expected


def test_client_receive_data_one_byte_at_a_time() -> None:
    pair = ConnectionPair()
    sid, _ = call(pair, "dev", "gen", stream=True, credit=3)
    plain, _ = call(pair, "dev", "f")
    pair.server.send_items(sid, [b"a", 1])
    pair.server.send_result(plain, {"x": bytearray(b"zz")})
    pair.server.send_items(sid, [None])
    pair.server.send_stream_end(sid)
    data = b"".join(join(pieces) for pieces in pair.server.data_to_send())
    events = []
    for i in range(len(data)):
        pair.client.receive_data(data[i : i + 1])
        events.extend(pair.client.events_received())
    assert events == [
        StreamItems(sid, [b"a", 1]),
        Result(plain, {"x": bytearray(b"zz")}),
        StreamItems(sid, [None]),
        StreamEnd(sid),
    ]


def test_exact_call_frame() -> None:
    # The worked example of docs/wire-format.md.
    client = RpcConnection(Side.CLIENT)
    client.send_call("cam", "snap", [b"\x01\x02"])
    (pieces,) = client.data_to_send()
    data = join(pieces)
    assert data.hex(" ") == (
        "52 58 45 43 01 01 01 00 16 00 00 00 00 00 00 00 "  # RXEC v1 msgpack, 1 buffer, body 22
        "20 00 00 00 00 00 00 00 "  # rest: 8 + 22 + 2
        "02 00 00 00 00 00 00 00 "  # buffer 0 is 2 bytes
        "99 01 01 a3 63 61 6d a4 73 6e 61 70 91 92 c7 00 01 00 80 c2 00 80 "  # body
        "01 02"  # buffer 0
    )
    client = RpcConnection(Side.CLIENT, codec="json")
    client.send_call("cam", "snap", [b"\x01\x02"])
    (pieces,) = client.data_to_send()
    data = join(pieces)
    assert data[:32].hex(" ") == (
        "52 58 45 43 01 02 01 00 38 00 00 00 00 00 00 00 "
        "42 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00"
    )
    assert data[32:] == b'[1,1,"cam","snap",[{"$rx":"bytes","v":0}],{},false,0,{}]\x01\x02'


def test_traceback_text_of_the_failure_is_the_formatted_exception() -> None:
    pair = ConnectionPair()
    sid, _ = call(pair, "dev", "f")
    exc = raised(ZeroDivisionError("division by zero"))
    pair.server.send_failure(sid, exc)
    (event,) = pair.to_client()
    assert isinstance(event, Failure)
    # Formatted as Python does, with this file named from its package down.
    path = __file__
    full = "".join(traceback.format_exception(exc))
    assert event.traceback == full.replace(path, "tests/core/test_protocol.py")
    assert path not in event.traceback


def test_exact_result_frame() -> None:
    # The second worked example of docs/wire-format.md.
    pair = ConnectionPair()
    sid, _ = call(pair, "cam", "snap", [b"\x01\x02"])
    pair.server.send_result(sid, ("ok", b"\xff"))
    (pieces,) = pair.server.data_to_send()
    assert join(pieces).hex(" ") == (
        "52 58 45 43 01 01 01 00 0f 00 00 00 00 00 00 00 "
        "18 00 00 00 00 00 00 00 "
        "01 00 00 00 00 00 00 00 "
        "93 02 01 93 c7 00 05 a2 6f 6b 92 c7 00 01 00 "
        "ff"
    )


def test_json_stream_example() -> None:
    # The stream example of docs/wire-format.md, message by message.
    pair = ConnectionPair(client_codec="json")

    def bodies(frames: list[list[bytes | memoryview]]) -> list[bytes]:
        return [bytes(decode_frame(join(pieces)).body) for pieces in frames]

    sid = pair.client.send_call("cam", "frames", [3], {"fast": True}, stream=True, credit=2)
    frames = pair.client.data_to_send()
    assert bodies(frames) == [b'[1,1,"cam","frames",[3],{"fast":true},true,2,{}]']
    for pieces in frames:
        pair.server.receive_frame(join(pieces))
    pair.server.events_received()
    pair.server.send_items(sid, [np.arange(2, dtype="<u1"), 7])
    frames = pair.server.data_to_send()
    assert bodies(frames) == [b'[4,1,[{"$rx":"ndarray","v":[0,"|u1",[2]]},7]]']
    assert [bytes(b) for b in decode_frame(join(frames[0])).buffers] == [b"\x00\x01"]
    for pieces in frames:
        pair.client.receive_frame(join(pieces))
    pair.client.send_credit(sid, 1)
    pair.client.send_cancel(sid)
    assert bodies(pair.client.data_to_send()) == [b"[6,1,1]", b"[7,1]"]
    pair.server.send_stream_end(sid)
    assert bodies(pair.server.data_to_send()) == [b"[5,1]"]
    pair.client.send_close("bye")
    assert bodies(pair.client.data_to_send()) == [b'[8,0,"bye"]']
