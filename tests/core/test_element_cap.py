"""The element cap (``Limits.max_elements``) and decoding off the connection's thread.

A message holds at most ``max_elements`` values (array items and map
entries, nested ones too), counted before anything is built; both codecs
count exactly, refuse a body over the cap cheaply, and a sender refuses to
send one. ``RpcConnection.decode`` + ``receive_decoded`` (a large message,
decoded in a worker thread) must do exactly what ``receive_frame`` does.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

import remote_exec.codecs as codecs_module
from remote_exec.codecs import (
    DEFAULT_MAX_ELEMENTS,
    CodecCheck,
    JsonCodec,
    MsgpackCodec,
    codec_for,
    codec_named,
)
from remote_exec.exceptions import CodecError, FrameError, ProtocolError
from remote_exec.framing import CODEC_JSON, CODEC_MSGPACK, HEADER_SIZE, encode_frame
from remote_exec.messages import Call, Result, StreamItems
from remote_exec.protocol import Decoded, Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry

from .helpers import ConnectionPair, forged_frame, join, message_frame

CODECS = ["msgpack", "json"]
MiB = 1 << 20
E = msgpack.ExtType


def elements(tree: Any) -> int:
    """The reference count: array items plus map entries, at every depth."""
    if isinstance(tree, list):
        return len(tree) + sum(elements(item) for item in tree)
    if isinstance(tree, dict):
        return len(tree) + sum(elements(k) + elements(v) for k, v in tree.items())
    return 0


def body_of(name: str, tree: Any, **json_options: Any) -> bytes:
    if name == "msgpack":
        return bytes(msgpack.packb(tree, use_bin_type=True))
    return json.dumps(tree, **json_options).encode()


def empties(count: int, name: str = "msgpack", empty: str = "[]") -> bytes:
    """A body: an array of ``count`` empty arrays (or maps), written fast."""
    if name == "json":
        return b"[" + b",".join([empty.encode()] * count) + b"]"
    item = b"\x90" if empty == "[]" else b"\x80"
    return b"\xdd" + count.to_bytes(4, "big") + item * count


# -- counting ----------------------------------------------------------------------------

text = st.text(alphabet=st.sampled_from(list('ab,[]{}":\\ \n\té\x00')), max_size=6)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
    st.text(max_size=300),
)
trees = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(text, children, max_size=4),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(tree=trees)
def test_msgpack_counts_every_value_exactly(tree: Any) -> None:
    assert MsgpackCodec().count_elements(body_of("msgpack", tree), 10**9) == elements(tree)


@settings(max_examples=400, deadline=None)
@given(tree=trees, indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans())
def test_json_counts_every_value_exactly(tree: Any, indent: int | None, ascii_only: bool) -> None:
    body = body_of("json", tree, indent=indent, ensure_ascii=ascii_only)
    assert JsonCodec().count_elements(body, 10**9) == elements(tree)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_json_counts_across_its_chunks(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Strings, escapes, whitespace and empty containers cut anywhere by a chunk end."""
    monkeypatch.setattr(codecs_module, "_JSON_CHUNK", chunk)
    for n in range(12):
        tree = ["a" * n, [], {}, ['x,"y', [[]]], {"k\\": [], "[{": {}}, "", [[], [""]]] * 2
        for indent in (None, 1):
            body = json.dumps(tree, indent=indent).encode()
            assert JsonCodec().count_elements(body, 10**9) == elements(tree), (n, body)


@pytest.mark.parametrize("name", CODECS)
def test_tags_count_as_the_codec_writes_them(name: str) -> None:
    codec = codec_named(name)
    body, _ = codec.dumps((1, 2), None)  # [ExtType(5), 1, 2] / {"$rx": "tuple", "v": [1, 2]}
    assert codec.count_elements(body, 10**9) == (3 if name == "msgpack" else 4)
    body, _ = codec.dumps([b"x", b"y"], None)  # buffers travel out of band: 2 tags of 2
    assert codec.count_elements(body, 10**9) == 6


@pytest.mark.parametrize("name", CODECS)
def test_counting_stops_soon_after_the_limit(name: str) -> None:
    tree: list[list[list[Any]]] = [[[] for _ in range(20_000)] for _ in range(10)]  # 200,010
    count = codec_named(name).count_elements(body_of(name, tree, separators=(",", ":")), 1000)
    assert 1000 < count < 100_000
    # a claimed length is counted at once, not stepped through
    assert MsgpackCodec().count_elements(b"\xdd\xff\xff\xff\xff", 10) == 2**32 - 1
    assert MsgpackCodec().count_elements(b"\xdf\xff\xff\xff\xff", 10) == 2**32 - 1


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=80))
def test_any_body_under_a_tiny_cap_decodes_or_raises_codec_error(name: str, body: bytes) -> None:
    """Every body over 4 bytes is counted first: the counter never fails on garbage."""
    codec = codec_for(codec_named(name).codec_id, max_elements=4)
    try:
        tree = codec.parse(memoryview(body))
    except CodecError:
        return
    assert elements(tree) <= 4


@pytest.mark.parametrize(
    "body",
    [
        b"[" + b'"a,b,[c],{d}",' * 100 + b'""]',
        b'["' + b'\\\\\\",' * 300 + b'", 1]',  # escaped backslashes and quotes
        b'{"' + b"," * 5000 + b'": [1, 2]}',
    ],
)
def test_json_commas_and_brackets_in_strings_do_not_count(body: bytes) -> None:
    codec = codec_for(CODEC_JSON, max_elements=300)
    tree = codec.parse(memoryview(body))
    assert codec.count_elements(body, 10**9) == elements(tree) <= 300


# -- the cap --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_the_cap_is_exact_on_both_ends(name: str) -> None:
    cap = 5000
    codec = codec_for(codec_named(name).codec_id, max_elements=cap)
    at_cap: list[list[Any]] = [[] for _ in range(cap)]
    body, _ = codec.dumps(at_cap, None)
    assert len(body) > cap  # so that it is counted
    assert codec.parse(memoryview(body)) == at_cap
    assert codec.loads(memoryview(body), [], None) == at_cap
    over: list[list[Any]] = [[] for _ in range(cap + 1)]
    with pytest.raises(FrameError, match=r"more than 5000 values.*element cap"):
        codec.dumps(over, None)
    with pytest.raises(FrameError, match="element cap"):
        codec.dumps([[[]] * (cap // 2)] * 2, None)  # nested: every level counts
    # a peer that does not check: the receiver refuses
    with pytest.raises(CodecError, match=r"more than 5000 values.*element cap"):
        codec.parse(memoryview(body_of(name, over)))
    with pytest.raises(CodecError, match="element cap"):
        codec.parse(memoryview(body_of(name, {str(i): [] for i in range(cap + 1)})))


@pytest.mark.parametrize("name", CODECS)
def test_large_strings_cost_no_elements(name: str) -> None:
    """A body far longer than the cap with few values passes: only values count."""
    codec = codec_for(codec_named(name).codec_id, max_elements=1024)
    value = ["a,[{" * MiB, {"k": "]}" * MiB}]
    body, _ = codec.dumps(value, None)
    assert codec.loads(memoryview(body), [], None) == value


def peak_while(function: Callable[[], object]) -> tuple[int, float]:
    """(bytes allocated at the peak, seconds) while ``function`` runs."""
    tracemalloc.start()
    try:
        started = time.perf_counter()
        try:
            function()
        except CodecError:
            pass
        elapsed = time.perf_counter() - started
        return tracemalloc.get_traced_memory()[1], elapsed
    finally:
        tracemalloc.stop()


HOSTILE_BODIES: dict[str, Callable[[], tuple[str, bytes]]] = {
    # the audit's reproducers (issue 16, item 3): 16 MiB each
    "msgpack: 16M empty arrays": lambda: ("msgpack", empties(16 * MiB)),
    "msgpack: 16M empty maps": lambda: ("msgpack", empties(16 * MiB, empty="{}")),
    "json: 5.6M empty objects": lambda: ("json", empties(16 * MiB // 3, "json", "{}")),
    # every array under a per-array cap, the whole over the cap
    "msgpack: 16 arrays of 1M empty arrays": lambda: (
        "msgpack",
        b"\xdc\x00\x10" + (b"\xdd\x00\x10\x00\x00" + b"\x90" * MiB) * 16,
    ),
    "json: 5.6M empty strings": lambda: ("json", empties(16 * MiB // 3, "json", '""')),
    "json: 4M strings of commas": lambda: ("json", empties(16 * MiB // 4, "json", '","')),
}


@pytest.mark.parametrize("case", list(HOSTILE_BODIES))
def test_a_body_over_the_cap_is_refused_before_anything_is_built(case: str) -> None:
    name, body = HOSTILE_BODIES[case]()
    codec = codec_named(name)
    with pytest.raises(CodecError, match=f"more than {DEFAULT_MAX_ELEMENTS} values"):
        codec.parse(memoryview(body))
    peak, elapsed = peak_while(lambda: codec.parse(memoryview(body)))
    # Building them took 0.4 to 2.4 GB; counting copies the body once at most.
    assert peak < 2 * len(body) + MiB, (peak, len(body))
    assert elapsed < 5.0  # a failure bound: it takes well under a second


# -- the protocol: receiving, sending -------------------------------------------------


def call_message(sid: int, args: list[Any]) -> list[Any]:
    return [1, sid, "dev", "f", args, {}, False, 0, {}]


@pytest.mark.parametrize("codec", CODECS)
def test_a_message_over_the_cap_is_a_protocol_error(codec: str) -> None:
    server = RpcConnection(Side.SERVER, limits=Limits(max_elements=2000))
    server.receive_frame(message_frame(call_message(1, [[]] * 1990), codec))
    assert len(server.events_received()) == 1
    with pytest.raises(ProtocolError, match=r"undecodable message: .*element cap"):
        server.receive_frame(message_frame(call_message(2, [[]] * 2000), codec))


def test_a_sender_refuses_a_message_over_the_cap() -> None:
    pair = ConnectionPair(
        client_limits=Limits(max_elements=2000), server_limits=Limits(max_elements=2000)
    )
    with pytest.raises(FrameError, match="element cap"):
        pair.client.send_call("dev", "f", [list(range(2001))])
    assert pair.client.in_flight == 0
    assert not pair.client.has_data_to_send
    sid = pair.client.send_call("dev", "f", [1])
    pair.to_server()
    with pytest.raises(FrameError, match="element cap"):
        pair.server.send_result(sid, list(range(2001)))
    assert pair.server.is_open(sid)  # the caller can be sent a failure instead
    pair.server.send_result(sid, "small")
    assert pair.to_client() == [Result(sid, "small")]


def test_stream_items_over_the_cap_together_go_in_several_messages() -> None:
    limits = Limits(max_elements=2000)
    pair = ConnectionPair(client_limits=limits, server_limits=limits)
    sid = pair.client.send_call("dev", "gen", stream=True, credit=8)
    pair.to_server()
    items = [list(range(600)) for _ in range(8)]  # 4808 values together, 600 each
    pair.server.send_items(sid, items)
    frames = pair.server.data_to_send()
    assert len(frames) == 4
    for pieces in frames:
        pair.client.receive_frame(join(pieces))
    received = [event for event in pair.client.events_received() if isinstance(event, StreamItems)]
    assert len(received) == 4
    assert [item for event in received for item in event.items] == items


def test_codec_check_refuses_what_the_receiver_would() -> None:
    check = CodecCheck(InstanceRegistry())
    check.call([[0] * 1000], {})
    with pytest.raises(FrameError, match="element cap"):
        check.call([[0] * DEFAULT_MAX_ELEMENTS], {})


def test_limits_max_elements_is_a_positive_int() -> None:
    assert Limits().max_elements == DEFAULT_MAX_ELEMENTS == 1_000_000
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="max_elements"):
            Limits(max_elements=bad)  # type: ignore[arg-type]


# -- decode + receive_decoded == receive_frame ---------------------------------------------


def frame(message: Any, codec: str = "msgpack", buffers: tuple[bytes, ...] = ()) -> bytes:
    if buffers or codec == "forged":
        return forged_frame(message, list(buffers))
    return message_frame(message, codec)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


GOOD_CALL = frame(call_message(1, [1, "two"]))
SERVER_INPUT: dict[str, bytes] = {
    "a call": GOOD_CALL,
    "a json call": frame(call_message(1, [1.5, (1, 2)]), "json"),
    "a call with kwargs, meta and buffers": frame(
        [1, 1, "dev", "f", [[E(1, b""), 0]], {"k": [E(2, b""), 1]}, True, 4, {"m": 1}],
        buffers=(b"abc", b"de"),
    ),
    "args undecodable": frame([1, 1, "d", "f", [[E(42, b""), 3]], {}, False, 0, {}], "forged"),
    "kwargs not str keys": frame([1, 1, "d", "f", [], {1: 2}, False, 0, {}], "forged"),
    "args a bytes tag": frame([1, 1, "d", "f", [E(1, b""), 0], {}, False, 0, {}], buffers=(b"x",)),
    "too deep": frame(call_message(1, [nested(70)]), "forged"),
    "credit over the cap": frame([1, 1, "d", "f", [], {}, True, 10**6, {}]),
    "not a list": frame({"kind": 1}, "forged"),
    "kind a bool": frame([True, 1], "forged"),
    "unknown kind": frame([99, 1]),
    "a result to the server": frame([2, 1, None]),
    "stream id negative": frame(call_message(-1, [])),
    "six fields": frame([1, 1, "d", "f", [], {}, False, 0]),
    "args a map": frame([1, 1, "d", "f", {}, {}, False, 0, {}]),
    "meta a list": frame([1, 1, "d", "f", [], {}, False, 0, []]),
    "over the element cap": frame(call_message(1, [[]] * 300)),
    "undecodable body": join(encode_frame(CODEC_MSGPACK, b"\xc1")),
    "a credit, a cancel": frame([6, 9, 1]) + frame([7, 9]),
    "packed calls": b"".join(frame(call_message(sid, [sid])) for sid in range(1, 6)),
    "more calls than the cap": b"".join(frame(call_message(sid, [])) for sid in range(1, 7)),
    "an id reused in one message": GOOD_CALL + GOOD_CALL,
    "an id already in flight": frame(call_message(100, [])),
    "a call after a close": frame([8, 0, "bye"]) + GOOD_CALL,
    "bad header after calls": GOOD_CALL + b"RXEC\x02" + bytes(19),
    "truncated after a call": GOOD_CALL + GOOD_CALL[:-2],
    "envelope error between calls": GOOD_CALL + frame([99, 1]) + frame(call_message(2, [])),
    "garbage after a close": frame([8, 0, "bye"]) + b"junk" * 10,
    "empty": b"",
}


def outcome(rpc: RpcConnection, receive: Callable[[], None]) -> tuple[Any, ...]:
    try:
        receive()
        error = None
    except Exception as exc:  # noqa: BLE001 - compared below
        error = (type(exc), str(exc))
    sent = [join(pieces) for pieces in rpc.data_to_send()]
    return error, rpc.events_received(), sent, rpc.open_ids(), rpc.closed


def receive_split(rpc: RpcConnection, data: bytes) -> None:
    start: int | None = 0
    while start is not None:
        decoded = rpc.decode(data, start)
        assert isinstance(decoded, Decoded)
        start = decoded.rest
        rpc.receive_decoded(decoded)


def server() -> RpcConnection:
    rpc = RpcConnection(Side.SERVER, limits=Limits(max_calls=6, max_elements=256))
    rpc.receive_frame(frame(call_message(100, [])))  # one call in flight already
    rpc.events_received()
    return rpc


@pytest.mark.parametrize("case", list(SERVER_INPUT))
def test_the_server_receives_decoded_frames_as_it_receives_frames(case: str) -> None:
    data = SERVER_INPUT[case]
    inline, split = server(), server()
    expected = outcome(inline, lambda: inline.receive_frame(data))
    assert outcome(split, lambda: receive_split(split, data)) == expected


def client() -> RpcConnection:
    rpc = RpcConnection(Side.CLIENT, limits=Limits(max_elements=256))
    rpc.send_call("dev", "f")  # 1
    rpc.send_call("dev", "gen", stream=True, credit=3)  # 2
    rpc.data_to_send()
    return rpc


CLIENT_INPUT: dict[str, bytes] = {
    "a result": frame([2, 1, [1, (2, 3), {"a": None}]]),
    "a result with a buffer": frame([2, 1, [E(1, b""), 0]], buffers=(b"xyz",)),
    "a result that is None": frame([2, 1, None]),
    "a result undecodable": frame([2, 1, [E(42, b""), 0]], "forged"),
    "items, end": frame([4, 2, [1, [2]]]) + frame([5, 2]),
    "items undecodable, then more": frame([4, 2, [[E(42, b"")]]], "forged") + frame([4, 2, [1]]),
    "items over the credit": frame([4, 2, [1, 2, 3, 4]]),
    "items not a list": frame([4, 2, "abc"]),
    "a result for an unknown id": frame([2, 9, 1]),
    "a result with two fields": frame([2, 1, 1, 2]),
    "a failure, a close": frame([3, 1, "ValueError", "bad", ""]) + frame([8, 0, "bye"]),
    "a call to the client": frame(call_message(5, [])),
    "over the element cap": frame([2, 1, [[]] * 300]),
}


@pytest.mark.parametrize("case", list(CLIENT_INPUT))
def test_the_client_receives_decoded_frames_as_it_receives_frames(case: str) -> None:
    data = CLIENT_INPUT[case]
    inline, split = client(), client()
    expected = outcome(inline, lambda: inline.receive_frame(data))
    assert outcome(split, lambda: receive_split(split, data)) == expected


def test_decode_changes_nothing_and_raises_nothing() -> None:
    rpc = server()
    state = (dict(rpc._open), list(rpc._events), rpc.has_data_to_send, rpc.closed)
    codecs = dict(rpc._codecs)
    for data in SERVER_INPUT.values():
        decoded = rpc.decode(data)
        assert isinstance(decoded, Decoded)
        assert (dict(rpc._open), list(rpc._events), rpc.has_data_to_send, rpc.closed) == state
        assert rpc._codecs == codecs


def test_decode_stops_before_a_frame_that_passes_the_budget() -> None:
    """One decode holds about ``max_elements`` values at most, however many frames a message packs."""
    cap = 1000
    frames = [frame(call_message(sid, [[]] * 400)) for sid in range(1, 11)]
    bodies = [len(f) - HEADER_SIZE for f in frames]
    assert all(cap // 3 < body < cap // 2 for body in bodies)
    data = b"".join(frames)
    rpc = RpcConnection(Side.SERVER, limits=Limits(max_elements=cap))
    start: int | None = 0
    groups = []
    while start is not None:
        decoded = rpc.decode(data, start)
        assert decoded.error is None
        groups.append(len(decoded.frames))
        start = decoded.rest
        rpc.receive_decoded(decoded)
    assert groups == [2, 2, 2, 2, 2]  # three bodies together pass 1000 bytes
    assert [event.stream_id for event in rpc.events_received()] == list(range(1, 11))
    # a frame longer than the budget goes alone
    big = frame(call_message(11, [[]] * 990))
    assert len(big) - HEADER_SIZE > cap
    decoded = rpc.decode(big + frame(call_message(12, [])))
    assert (len(decoded.frames), decoded.error, decoded.rest) == (1, None, len(big))


@pytest.mark.anyio
async def test_decode_runs_in_a_thread_while_the_connection_answers() -> None:
    """The state moves only on the loop: replies sent while a large call decodes
    in a thread, then that call received, leave the connection consistent."""
    limits = Limits(max_elements=DEFAULT_MAX_ELEMENTS)
    pair = ConnectionPair(client_limits=limits, server_limits=limits)
    sids = [pair.client.send_call("dev", "f", [i]) for i in range(50)]
    pair.to_server()
    big = [[i] for i in range(200_000)]
    big_sid = pair.client.send_call("dev", "big", [big])
    (pieces,) = pair.client.data_to_send()
    data = join(pieces)
    server = pair.server
    async with anyio.create_task_group() as tg:

        async def answer() -> None:
            for sid in sids:
                server.send_result(sid, sid)
                await anyio.lowlevel.checkpoint()

        tg.start_soon(answer)
        decoded = await anyio.to_thread.run_sync(server.decode, data)
    server.receive_decoded(decoded)
    (event,) = server.events_received()
    assert isinstance(event, Call)
    assert (event.stream_id, event.method, event.args) == (big_sid, "big", [big])
    assert sorted(server.open_ids()) == [big_sid]
    results = pair.to_client()
    assert [result.stream_id for result in results] == sids
    server.send_result(big_sid, len(big))
    assert pair.to_client() == [Result(big_sid, 200_000)]


def test_stream_items_are_built_ahead_for_the_client() -> None:
    rpc = client()
    decoded = rpc.decode(frame([4, 2, [1, (2, 3)]]))
    (decoded_frame,) = decoded.frames
    assert decoded_frame.payload == ([1, (2, 3)],)
    rpc.receive_decoded(decoded)
    assert rpc.events_received() == [StreamItems(2, [1, (2, 3)])]
