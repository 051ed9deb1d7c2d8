"""The stream window in bytes (``Limits.max_stream_bytes``), on a sans-I/O pair.

The server counts the frames of the items it sent and the client has not
granted again; past the bound its ``allowance`` is 0 (the runtime parks the
generator) until a ``Credit`` says the oldest items were consumed. The client
sees each frame's size on its ``StreamItems`` (``nbytes``): the very count the
server keeps, so that it grants before the server would wait forever.
"""

from __future__ import annotations

import pytest

from remote_exec.framing import pack_frames
from remote_exec.messages import Call, Credit, StreamItems
from remote_exec.protocol import MIN_STREAM_BYTES, Limits, RpcConnection, Side

from .helpers import ConnectionPair, join

KIB = 1024
LIMITS = Limits(max_stream_bytes=256 * KIB)


@pytest.fixture(params=["frame", "data"])
def pair(request: pytest.FixtureRequest) -> ConnectionPair:
    mode: str = request.param
    return ConnectionPair(mode=mode, client_limits=LIMITS, server_limits=LIMITS)


def open_stream(pair: ConnectionPair, credit: int = 16) -> int:
    sid = pair.client.send_call("dev", "gen", stream=True, credit=credit)
    (event,) = pair.to_server()
    assert isinstance(event, Call)
    return sid


def received(pair: ConnectionPair) -> list[StreamItems]:
    events = pair.to_client()
    assert all(isinstance(event, StreamItems) for event in events)
    return [event for event in events if isinstance(event, StreamItems)]


def item(n: int, size: int = 64 * KIB) -> bytes:
    return bytes([n]) * size


def test_the_server_stops_at_the_byte_bound_and_goes_on_with_credit(pair: ConnectionPair) -> None:
    server = pair.server
    sid = open_stream(pair)
    # Nothing sent yet: the items' size is unknown, so one item first.
    assert server.allowance(sid) == 1
    server.send_items(sid, [item(0)])
    (first,) = received(pair)
    assert first.nbytes > 64 * KIB
    assert server.stream_bytes(sid) == first.nbytes
    # Now as many as fit in the rest of the 256 KiB, by the last item's size.
    assert server.allowance(sid) == 2
    server.send_items(sid, [item(1), item(2)])
    assert server.allowance(sid) == 1  # under the bound: one more may go past it
    server.send_items(sid, [item(3)])
    events = received(pair)
    sent = first.nbytes + sum(event.nbytes for event in events)
    assert server.stream_bytes(sid) == sent > LIMITS.max_stream_bytes
    assert server.allowance(sid) == 0
    assert server.credit(sid) == 12  # the item credit is another matter

    # The client consumed the oldest item: its bytes are no longer in flight.
    pair.client.send_credit(sid, 1)
    assert pair.to_server() == [Credit(sid, 1)]
    assert server.stream_bytes(sid) == sent - first.nbytes
    assert server.allowance(sid) == 1
    # One of the frame of two: half of that frame, prorated.
    pair.client.send_credit(sid, 1)
    pair.to_server()
    assert server.stream_bytes(sid) == round(sent - first.nbytes - events[0].nbytes / 2)
    assert server.allowance(sid) == 1  # two items a bit over 64 KiB in flight: room for one
    # All of them: nothing in flight, the whole bound is free again.
    pair.client.send_credit(sid, 2)
    pair.to_server()
    assert server.stream_bytes(sid) == 0
    assert server.allowance(sid) == 3  # 256 KiB of items of a bit over 64 KiB
    # A grant beyond what was sent changes nothing in bytes.
    pair.client.send_credit(sid, 4)
    pair.to_server()
    assert server.stream_bytes(sid) == 0
    assert server.credit(sid) == 20


def test_one_item_of_any_size_may_go_when_none_is_in_flight(pair: ConnectionPair) -> None:
    server = pair.server
    sid = open_stream(pair)
    huge = item(7, 1024 * KIB)  # four times the bound
    assert server.allowance(sid) == 1
    server.send_items(sid, [huge])
    assert server.allowance(sid) == 0
    (event,) = received(pair)
    assert event.items == [huge]
    pair.client.send_credit(sid, 1)
    pair.to_server()
    assert server.stream_bytes(sid) == 0
    assert server.allowance(sid) == 1  # the next one, although it will not fit either
    server.send_items(sid, [huge])
    assert server.allowance(sid) == 0


def test_small_items_are_bounded_by_the_item_credit_only(pair: ConnectionPair) -> None:
    server = pair.server
    sid = open_stream(pair, credit=16)
    server.send_items(sid, [0])
    assert server.allowance(sid) == 15 == server.credit(sid)
    server.send_items(sid, list(range(1, 16)))
    assert server.allowance(sid) == 0 == server.credit(sid)
    pair.client.send_credit(sid, 8)
    pair.to_server()
    assert server.allowance(sid) == 8


def test_the_count_ends_with_the_stream() -> None:
    pair = ConnectionPair(client_limits=LIMITS, server_limits=LIMITS)
    sid = open_stream(pair)
    pair.server.send_items(sid, [item(0)])
    pair.server.send_stream_end(sid)
    assert pair.server.stream_bytes(sid) == 0
    assert pair.server.allowance(sid) == 0
    assert not pair.server._in_flight  # nothing kept for a finished stream


def test_plain_calls_have_no_allowance() -> None:
    pair = ConnectionPair()
    sid = pair.client.send_call("dev", "read")
    pair.to_server()
    assert pair.server.allowance(sid) == 0
    assert pair.server.stream_bytes(sid) == 0


def test_the_client_sees_each_frame_size_when_frames_are_packed_together() -> None:
    """Several frames in one transport message (``pack_frames``), and the
    ``decode`` / ``receive_decoded`` halves: each StreamItems has its own frame's size."""
    pair = ConnectionPair(client_limits=LIMITS, server_limits=LIMITS)
    sid = open_stream(pair)
    pair.server.send_items(sid, [item(0, 100)])
    pair.server.send_items(sid, [item(1, 10 * KIB), b"x"])
    pair.server.send_items(sid, [item(2, 70 * KIB)])
    frames = pair.server.data_to_send()
    sizes = [len(join(frame)) for frame in frames]
    assert pair.server.stream_bytes(sid) == sum(sizes)
    (message,) = pack_frames(frames)
    data = join(message)

    pair.client.receive_frame(data)
    events = pair.client.events_received()
    assert [event.nbytes for event in events if isinstance(event, StreamItems)] == sizes

    client = RpcConnection(Side.CLIENT, limits=LIMITS)
    sid = client.send_call("dev", "gen", stream=True, credit=16)
    client.receive_decoded(client.decode(data))
    events = client.events_received()
    assert [event.nbytes for event in events if isinstance(event, StreamItems)] == sizes


def test_the_bound_has_a_floor() -> None:
    assert Limits().max_stream_bytes == 16 * 1024 * KIB
    Limits(max_stream_bytes=MIN_STREAM_BYTES)
    with pytest.raises(ValueError, match="max_stream_bytes"):
        Limits(max_stream_bytes=MIN_STREAM_BYTES - 1)
