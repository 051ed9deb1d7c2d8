"""Hostile input against a real daemon, on both backends.

Every attack ends with ``survives``: the daemon lives, answers ``/health``, a
client connected before the attack still works on its own connection (a call
and the next item of a stream it had open), a fresh client works, and the
daemon logged no internal error. Each attack also checks the daemon's answer:
an error reply for that call (the connection keeps serving), or a closed
connection (a protocol error, after a ``Close`` saying why), never silence.
"""

from __future__ import annotations

import functools
import json
import re
import time
import uuid
import zlib
from typing import Any

import anyio
import msgpack
import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.exceptions import NotAllowedError, TooManyCallsError
from remote_exec.framing import CODEC_JSON, CODEC_MSGPACK, HEADER_SIZE, encode_frame
from remote_exec.protocol import Limits
from tests.core.helpers import forged_frame, join, message_frame, raw_frame
from tests.hardening.canary import Canary
from tests.hardening.helpers import (
    CALL,
    CANARY,
    CANARY_FILE,
    CLOSE,
    INSTRUMENTS,
    TIMEOUT,
    TOKEN,
    Daemon,
    HandshakeRefused,
    RawClient,
    bystander,
    connections_are,
    journal_is,
    read_to_eof,
    survives,
    until,
    ws_frame,
)
from tests.hardening.instruments import Instrument
from tests.server.test_dispatch import connect, serving
from tests.ws_instruments import http_get

pytestmark = pytest.mark.anyio

MAX_MESSAGE = 4 * 1024 * 1024
MAX_CALLS = 8
MAX_INSTANCES = 4
HANDSHAKE_TIMEOUT = 2.0
DAEMON_ARGS = (
    "--max-message-size",
    str(MAX_MESSAGE),
    "--max-calls",
    str(MAX_CALLS),
    "--max-instances",
    str(MAX_INSTANCES),
    "--handshake-timeout",
    str(HANDSHAKE_TIMEOUT),
    "--idle-timeout",
    "10",
    "--ping-interval",
    "2",
)
GIB = 1 << 30


def call_frame(*fields: Any, codec: str = "msgpack") -> bytes:
    """A frame holding ``[CALL, *fields]`` exactly as given (types unchecked)."""
    return message_frame([CALL, *fields], codec)


def json_frame(text: str) -> bytes:
    """A JSON-codec frame whose body is ``text`` as is."""
    return join(encode_frame(CODEC_JSON, text.encode()))


def msgpack_body_frame(body: bytes) -> bytes:
    return join(encode_frame(CODEC_MSGPACK, body))


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# -- attacks the daemon answers by closing that connection ----------------------------------

VALID_CALL = call_frame(7, "", "list_instances", [], {}, False, 0, {})

# name -> (what the attacker sends as one binary websocket message, what the
# server's goodbye says)
PROTOCOL_ERRORS: dict[str, tuple[bytes, str]] = {
    "truncated header": (b"RXEC\x01\x01\x00", "truncated frame header"),
    "truncated body": (VALID_CALL[:-3], "truncated frame|length mismatch"),
    "wrong magic": (raw_frame(b"\x90", magic=b"EVIL"), "bad magic"),
    "wrong version": (raw_frame(b"\x90", version=2), "frame version"),
    "wrong codec id": (raw_frame(b"\x90", codec_id=9), "unknown codec"),
    "reserved field set": (raw_frame(b"\x90", reserved=1), "reserved"),
    "header claiming 4 GiB": (raw_frame(b"", rest_length=4 * GIB)[:HEADER_SIZE], "size cap"),
    "header claiming 2**64-1 bytes": (
        raw_frame(b"", rest_length=2**64 - 1)[:HEADER_SIZE],
        "size cap",
    ),
    "more buffers than the cap": (raw_frame(b"\x90", count=0xFFFF), "more than the cap"),
    "body longer than the frame": (raw_frame(b"\x90", body_length=1000), "inconsistent"),
    "buffer table lies": (raw_frame(b"\x90", [b"abc"], lengths=[10]), "inconsistent"),
    "buffer table claims 2**63": (
        raw_frame(b"\x90", [b"abc"], lengths=[2**63], rest_length=8 + 1 + 3),
        "inconsistent",
    ),
    "unknown message kind": (message_frame([99, 1, "x"]), "unexpected message kind"),
    "a reply sent to the server": (message_frame([2, 1, "result"]), "unexpected message kind"),
    "message not an array": (forged_frame({"kind": 1}), "must be an array"),
    "negative stream id": (message_frame([CALL, -1, "", "x", [], {}, False, 0, {}]), "stream id"),
    "stream id over 2**63": (
        forged_frame([CALL, 2**64 - 1, "", "x", [], {}, False, 0, {}]),
        "stream id",
    ),
    "call field of the wrong type": (call_frame(1, "", 5, [], {}, False, 0, {}), "wrong type"),
    "call with missing fields": (call_frame(1, "", "list_instances"), "7 fields"),
    "stream id 0": (call_frame(0, "", "list_instances", [], {}, False, 0, {}), "in flight"),
    "msgpack nesting bomb": (msgpack_body_frame(b"\x91" * 200_000 + b"\xc0"), "undecodable"),
    "json nesting bomb": (json_frame("[" * 200_000), "undecodable"),
    "msgpack map claiming 4 billion entries": (
        msgpack_body_frame(b"\xdf\xff\xff\xff\xff"),
        "undecodable",
    ),
    "msgpack array claiming 4 billion items": (
        msgpack_body_frame(b"\x94\x01\x01\xdd\xff\xff\xff\xff"),
        "undecodable",
    ),
    "msgpack string claiming 4 GiB": (
        msgpack_body_frame(b"\x93\x01\x01\xdb\xff\xff\xff\xff"),
        "undecodable",
    ),
    "msgpack binary in the body": (msgpack_body_frame(b"\x93\x01\x01\xc4\x01x"), "undecodable"),
    "msgpack extension claiming 4 GiB": (
        msgpack_body_frame(b"\x93\x01\x01\xc9\xff\xff\xff\xff\x01"),
        "undecodable",
    ),
    "json integer of 100k digits": (json_frame("[1," + "9" * 100_000 + "]"), "undecodable"),
    "json bare NaN": (json_frame("[NaN, 1]"), "undecodable"),
    "json invalid utf-8": (join(encode_frame(CODEC_JSON, b'[1, 1, "\xff"]')), "undecodable"),
}


@pytest.mark.parametrize("attack", list(PROTOCOL_ERRORS))
async def test_protocol_errors_close_only_that_connection(daemon: Daemon, attack: str) -> None:
    data, expected = PROTOCOL_ERRORS[attack]
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            await raw.send_binary(data)
            reason = await raw.protocol_error()
            assert re.search(expected, reason), reason
        await survives(daemon, witness)


async def test_credit_over_the_cap_closes_only_that_connection(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            # A Credit for a stream that is not open is ignored ...
            await raw.send_binary(message_frame([6, 99, 2**40]))
            await raw.still_serves()
            # ... but one that takes an open stream over the cap is a protocol error.
            sid = await raw.call("", "subscribe", ["", ""], stream=True, credit=1)
            await raw.send_binary(message_frame([6, sid, 2**40]))
            assert "exceeds the cap" in await raw.protocol_error()
        await survives(daemon, witness)


# -- attacks the daemon answers with an error reply, then keeps serving -----------------------


async def bad_calls(raw: RawClient, name: str) -> list[tuple[str, str]]:
    """Calls that must each fail, and only fail; returns (type name, message) of each."""
    failures = []
    calls: list[tuple[str, str, list[Any], dict[str, Any]]] = [
        ("no-such-instance", "echo", [1], {}),
        ("", "no_such_operation", [], {}),
        ("", "list_instances", [], {"keyword": 1}),  # server operations are positional
        ("", "create_instance", [INSTRUMENTS, "Instrument", 5, [], {}, {}], {}),
        ("", "create_instance", [INSTRUMENTS, "Instrument", "n", "args", {}, {}], {}),
        ("", "create_instance", [INSTRUMENTS, "Instrument", name, [], {}, {}], {}),  # exists
        ("", "create_instance", [INSTRUMENTS, "Instrument", "x", [], {}, {"__class__": 1}], {}),
        ("", "get_properties", [name, "label"], {}),
        ("", "get_properties", [name, ["__dict__"]], {}),
        ("", "get_properties", [name, ["_private"]], {}),
        ("", "get_config", [12], {}),
        ("", "sleep", ["soon"], {}),
        ("", "sleep", [float("nan")], {}),
        ("", "sleep", [1, 2, 3], {}),
        ("", "delete_instance", [["not", "a", "name"]], {}),
        ("", "echo_clock", [1, 2, 3, 4], {}),
        (name, "add", ["a", 1], {}),  # TypeError inside the method
        (name, "add", [], {}),  # missing arguments
        (name, "add", [1, 2], {"c": 3}),  # unexpected keyword
    ]
    for target, method, args, kwargs in calls:
        sid = await raw.call(target, method, args, kwargs)
        failures.append(await raw.failure(sid))
    # Server operations that are streams, and methods called as the wrong kind.
    streams: list[tuple[str, str, list[Any], bool]] = [
        ("", "subscribe", [5, ""], True),
        ("", "subscribe", ["", "no-such-channel"], True),
        ("", "subscribe", ["", ""], False),
        ("", "list_instances", [], True),
        (name, "ticks", ["k"], False),
        (name, "echo", [1], True),
    ]
    for target, method, args, stream in streams:
        sid = await raw.call(target, method, args, stream=stream, credit=1)
        failures.append(await raw.failure(sid))
    return failures


async def test_bad_calls_fail_alone(daemon: Daemon) -> None:
    name = f"target-{uuid.uuid4().hex[:8]}"
    async with bystander(daemon) as witness, RawClient.connect(daemon) as raw:
        assert await raw.create(name) is True
        failures = await bad_calls(raw, name)
        names = [type_name for type_name, _ in failures]
        assert "remote_exec.UnknownInstanceError" in names
        assert "remote_exec.NotAllowedError" in names
        assert "TypeError" in names
        assert "ValueError" in names
        assert "remote_exec.DuplicateInstanceError" in names
        await raw.still_serves()
        await survives(daemon, witness)


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_values_the_codec_refuses_fail_only_that_call(daemon: Daemon, codec: str) -> None:
    async with bystander(daemon) as witness, RawClient.connect(daemon) as raw:
        cases: list[tuple[bytes, str]] = []
        if codec == "msgpack":
            tag = msgpack.ExtType
            cases = [
                (
                    forged_frame([CALL, 1, "", "echo_clock", [[tag(1, b""), 7]], {}, False, 0, {}]),
                    "buffer index",
                ),
                (
                    forged_frame(
                        [CALL, 2, "", "echo_clock", [[tag(1, b""), -1]], {}, False, 0, {}], [b"x"]
                    ),
                    "buffer index",
                ),
                (
                    forged_frame([CALL, 3, "", "echo_clock", [[tag(42, b"")]], {}, False, 0, {}]),
                    "unknown tag",
                ),
                (
                    forged_frame(
                        [
                            CALL,
                            4,
                            "",
                            "echo_clock",
                            [[tag(7, b""), "os.system", 1]],
                            {},
                            False,
                            0,
                            {},
                        ]
                    ),
                    "coder",
                ),
                (
                    forged_frame(
                        [
                            CALL,
                            5,
                            "",
                            "echo_clock",
                            [[tag(6, b""), "no-such-instance"]],
                            {},
                            False,
                            0,
                            {},
                        ]
                    ),
                    "no-such-instance",
                ),
                (
                    forged_frame([CALL, 6, "", "echo_clock", [nested(500)], {}, False, 0, {}]),
                    "deeper",
                ),
                (
                    forged_frame(
                        [
                            CALL,
                            7,
                            "",
                            "echo_clock",
                            [[tag(4, b""), 0, "|O", [1]]],
                            {},
                            False,
                            0,
                            {},
                        ],
                        [b"12345678"],
                    ),
                    "object",
                ),
                (
                    forged_frame(
                        [CALL, 8, "", "echo_clock", [2**64 - 1, -(2**63)], {"k": 1}, False, 0, {}]
                    ),
                    "positional",
                ),
            ]
        else:
            cases = [
                (
                    json_frame(
                        '[1, 1, "", "echo_clock", [{"$rx": "bytes", "v": 7}], {}, false, 0, {}]'
                    ),
                    "buffer index",
                ),
                (
                    json_frame(
                        '[1, 2, "", "echo_clock", [{"$rx": "nope", "v": 1}], {}, false, 0, {}]'
                    ),
                    "unknown tag",
                ),
                (
                    json_frame(
                        '[1, 3, "", "echo_clock", [{"$rx": "custom", "v": ["os.system", 1]}], {}, false, 0, {}]'
                    ),
                    "coder",
                ),
                (
                    json_frame(
                        '[1, 4, "", "echo_clock", ['
                        + "[" * 500
                        + "]" * 500
                        + "], {}, false, 0, {}]"
                    ),
                    "deeper",
                ),
                (
                    json_frame('[1, 5, "", "echo_clock", [' + "9" * 4000 + "], {}, false, 0, {}]"),
                    "64 bits",
                ),
                (
                    json_frame(
                        '[1, 6, "", "echo_clock", [{"$rx": "float", "v": "1e999"}], {}, false, 0, {}]'
                    ),
                    "float",
                ),
                (
                    json_frame('[1, 7, "", "echo_clock", [{"$rx": "bytes"}], {}, false, 0, {}]'),
                    "tag",
                ),
            ]
        for sid, (frame, expected) in enumerate(cases, start=1):
            await raw.send_binary(frame)
            tree = await raw.reply(sid)
            assert tree[0] == 3, tree  # a Failure for that call only
            assert expected in tree[3], tree
        await raw.still_serves()
        await survives(daemon, witness)


async def test_private_dotted_and_undecorated_names_are_never_called(daemon: Daemon) -> None:
    name = f"target-{uuid.uuid4().hex[:8]}"
    forbidden = [
        "_private",
        "__class__",
        "__init__",
        "__dict__",
        "__reduce_ex__",
        "__getattribute__",
        "undecorated",
        "echo.__globals__",
        "add.__code__",
        "label",
        "produced",
        "",
        "echo ",
        "ëcho",
        "mro",
    ]
    async with bystander(daemon) as witness, RawClient.connect(daemon) as raw:
        await raw.create(name)
        for method in forbidden:
            for stream in (False, True):
                sid = await raw.call(name, method, [], stream=stream, credit=1)
                type_name, message = await raw.failure(sid)
                assert type_name == "remote_exec.NotAllowedError", (method, message)
        sid = await raw.call(name, "journal", ["forbidden"])
        assert await raw.result(sid) == []  # nothing forbidden ever ran
        await raw.still_serves()
        await survives(daemon, witness)


async def test_modules_off_the_allow_list_are_never_imported(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            requests: list[tuple[str, list[Any]]] = [
                ("import_module", [CANARY]),
                ("import_module", ["tests.hardening"]),
                ("import_module", ["tests.hardening.canary.sub"]),
                ("import_module", [CANARY + "\x00"]),
                ("import_module", ["../hardening/canary"]),
                ("import_module", [".canary"]),
                ("import_module", ["os"]),
                ("import_module", [["not", "a", "string"]]),
                ("register_class", [CANARY, "Canary"]),
                ("register_class", ["__main__", "Canary"]),
                ("register_class", [INSTRUMENTS, "os"]),
                ("register_class", [INSTRUMENTS, "Instrument.__class__"]),
                ("create_instance", [CANARY, "Canary", "c1", [], {}, {}]),
                (
                    "create_instance",
                    ["__main__", "Canary", "c2", [], {}, {}, False, str(CANARY_FILE)],
                ),
                ("create_instance", [INSTRUMENTS, "os.system", "c3", [], {}, {}]),
                ("create_instance", [INSTRUMENTS, "anyio.Event", "c4", [], {}, {}]),
                ("create_instance", [INSTRUMENTS, "JOURNAL", "c5", [], {}, {}]),
                ("create_instance", [INSTRUMENTS, "Instrument.__base__", "c6", [], {}, {}]),
                ("create_instance", [INSTRUMENTS, "threading.Thread", "c7", [], {}, {}]),
            ]
            for method, args in requests:
                sid = await raw.call("", method, args)
                type_name, message = await raw.failure(sid)
                assert type_name == "remote_exec.NotAllowedError", (method, args, message)
            await raw.still_serves()
        # Through the executor's own API too.
        ex = witness.executor
        with pytest.raises(NotAllowedError):
            await ex.remote_import(CANARY)
        with pytest.raises(NotAllowedError):
            await ex.register_remote_class(Canary)
        with pytest.raises(NotAllowedError):
            await ex.create_remote_instance(Canary(), f"canary-{uuid.uuid4().hex[:8]}")
        # The proof: the daemon never imported it, and the module's side effect never happened.
        assert await witness.call("imported", INSTRUMENTS)
        assert not await witness.call("imported", CANARY)
        assert not daemon.canary.exists()
        await survives(daemon, witness)


async def test_an_id_reused_while_in_flight_drops_that_connection_and_its_calls(
    daemon: Daemon,
) -> None:
    key = uuid.uuid4().hex
    name = f"target-{uuid.uuid4().hex[:8]}"
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            await raw.create(name)
            sid = await raw.call(name, "hold", [key, 60])
            await until(journal_is(witness, key, "hold started"))
            await raw.call(name, "echo", [1], sid=sid)
            assert "already in flight" in await raw.protocol_error()
        # The dropped connection's call was cancelled where it ran.
        await until(journal_is(witness, key, "hold started", "hold cancelled"))
        await survives(daemon, witness)


async def test_too_many_calls_fail_fast_then_normal_service(daemon: Daemon) -> None:
    key = uuid.uuid4().hex
    name = f"target-{uuid.uuid4().hex[:8]}"
    async with bystander(daemon) as witness, RawClient.connect(daemon) as raw:
        await raw.create(name)
        held = [await raw.call(name, "hold", [key, 60]) for _ in range(MAX_CALLS)]
        started = time.monotonic()
        extra = await raw.call(name, "echo", [1])
        type_name, message = await raw.failure(extra)
        assert type_name == "remote_exec.TooManyCallsError", message
        assert time.monotonic() - started < 2  # at once, not after the held calls
        for sid in held:
            await raw.send_binary(message_frame([7, sid]))  # Cancel
        for sid in held:
            type_name, _ = await raw.failure(sid)
            assert type_name == "remote_exec.CallCancelledError"
        sid = await raw.call(name, "echo", ["served"])
        assert await raw.result(sid) == "served"
        await survives(daemon, witness)

    # The same through the executor: the callers past the cap get TooManyCallsError
    # at once, the others are served, and so is everything after.
    key = uuid.uuid4().hex
    async with bystander(daemon) as witness, WebSocketExecutor(daemon.url, token=TOKEN) as ex:
        instrument = Instrument()
        async with ex.remote_instance(instrument, f"many-{uuid.uuid4().hex[:8]}"):
            outcomes: list[Any] = []

            async def two_refused() -> bool:
                return len(outcomes) >= 2

            async def echo(value: int) -> None:
                try:
                    outcomes.append(await instrument.echo(value))
                except TooManyCallsError as exc:
                    outcomes.append(exc)

            try:
                with anyio.fail_after(TIMEOUT):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(instrument.block, key)  # holds the instance's thread
                        await until(journal_is(witness, key, "block started"))
                        for value in range(MAX_CALLS + 1):  # 1 + 9 calls in flight: 2 too many
                            tg.start_soon(echo, value)
                        await until(two_refused)
                        await witness.call("release", key)  # from another connection
            finally:
                await witness.call("release", key)  # never leave the instance's thread blocked
            refused = [o for o in outcomes if isinstance(o, TooManyCallsError)]
            served = [o for o in outcomes if not isinstance(o, TooManyCallsError)]
            assert len(refused) == 2, outcomes
            assert len(set(served)) == MAX_CALLS - 1, outcomes
            assert await instrument.echo("after") == "after"
        await survives(daemon, witness)


async def test_instances_per_connection_are_capped(daemon: Daemon) -> None:
    prefix = uuid.uuid4().hex[:8]
    async with bystander(daemon) as witness, RawClient.connect(daemon) as raw:
        for i in range(MAX_INSTANCES):
            assert await raw.create(f"{prefix}-{i}") is True
        sid = await raw.call(
            "", "create_instance", [INSTRUMENTS, "Instrument", f"{prefix}-x", [], {}, {}]
        )
        type_name, message = await raw.failure(sid)
        assert type_name == "remote_exec.NotAllowedError"
        assert "--max-instances" in message
        sid = await raw.call("", "delete_instance", [f"{prefix}-0"])
        assert await raw.result(sid) is None
        assert await raw.create(f"{prefix}-x") is True
        await survives(daemon, witness)  # the bystander's own connection has its own count


async def test_instances_on_the_whole_server_are_capped() -> None:
    limits = Limits(max_instances=3, max_server_instances=4)
    async with serving(limits=limits) as dispatcher:
        async with connect(dispatcher) as one, connect(dispatcher) as two:
            for i in range(3):
                assert await one.create(f"one-{i}")
            with pytest.raises(NotAllowedError, match="--max-instances"):
                await one.create("one-3")
            assert await two.create("two-0")
            with pytest.raises(NotAllowedError, match="--max-server-instances"):
                await two.create("two-1")
            await one.invoke("", "delete_instance", "one-0")
            assert await two.create("two-1")
        # Instances outlive their connection; they count against the server, not a new one.
        async with connect(dispatcher) as three:
            with pytest.raises(NotAllowedError, match="--max-server-instances"):
                await three.create("three-0")


# -- handshake attacks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "options", "status"),
    [
        ("missing token", {"token": None}, 401),
        ("wrong token", {"token": "not-the-token-0123456789"}, 401),
        ("token in the URL", {"token": None, "path": f"/?token={TOKEN}"}, 401),
        ("basic scheme", {"token": None, "headers": {"Authorization": f"Basic {TOKEN}"}}, 401),
        ("token prefix", {"token": TOKEN[:-1]}, 401),
        ("token with a suffix", {"token": TOKEN + "x"}, 401),
        ("browser origin", {"headers": {"Origin": "https://evil.example"}}, 403),
        ("null origin", {"headers": {"Origin": "null"}}, 403),
    ],
)
async def test_refused_handshakes(
    daemon: Daemon, case: str, options: dict[str, Any], status: int
) -> None:
    async with bystander(daemon) as witness:
        with pytest.raises(HandshakeRefused) as refused:
            async with RawClient.connect(daemon, **options):
                pass
        assert refused.value.status == status, refused.value
        await survives(daemon, witness)


async def test_oversized_handshake_headers(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        with pytest.raises((HandshakeRefused, ConnectionError)) as refused:
            async with RawClient.connect(daemon, token="x" * 100_000):
                pass
        if isinstance(refused.value, HandshakeRefused):
            assert refused.value.status >= 400
        await survives(daemon, witness)


async def test_a_stalled_handshake_is_dropped(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        started = time.monotonic()
        async with await anyio.connect_tcp("127.0.0.1", daemon.port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
            assert await read_to_eof(stream) == b""  # dropped without an answer
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 3
        await survives(daemon, witness)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            # HTTP/2 with prior knowledge, then SETTINGS on a stream: a connection error.
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x01",
            id="http2 preface then a bad frame",
        ),
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, id="tls to plain"
        ),
        pytest.param(b"\x00" * 70_000, id="nul bytes"),
        pytest.param(
            b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nabc",
            id="post with a huge body",
        ),
        pytest.param(
            b"GET /instances HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffff\r\n",
            id="chunked garbage",
        ),
    ],
)
async def test_garbage_on_the_socket(daemon: Daemon, data: bytes) -> None:
    async with bystander(daemon) as witness:
        async with await anyio.connect_tcp("127.0.0.1", daemon.port) as stream:
            await stream.send(data)
            with anyio.fail_after(TIMEOUT):
                try:
                    while await stream.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
        await survives(daemon, witness)


# -- websocket-level attacks ------------------------------------------------------------------


async def test_a_text_frame_closes_only_that_connection(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            await raw.send_text(json.dumps([1, 1, "", "list_instances", [], {}, False, 0, {}]))
            closed = await raw.closed()
            assert closed.code == 1003, closed
        await survives(daemon, witness)


async def test_a_websocket_message_over_the_cap_is_not_buffered(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            rss_before = await witness.call("rss")
            # A frame header claiming 1 GiB, then far more than the cap: refused
            # once the cap is passed (1009), and the rest is never buffered.
            await raw.send_raw(ws_frame(0x2, b"", length=GIB))
            chunk = bytes(1024 * 1024)
            with anyio.fail_after(TIMEOUT):
                for _ in range(8 * MAX_MESSAGE // len(chunk)):
                    await raw.send_raw(chunk)
            # The server's close frame; its TCP end waits for our close, which
            # the server reads as more of the endless frame: we hang up ourselves.
            assert await raw.close_frame() == 1009
            rss_after = await witness.call("rss")
            assert rss_after - rss_before < 4 * MAX_MESSAGE, (rss_before, rss_after)
        await survives(daemon, witness)


async def test_a_truncated_websocket_frame_then_eof(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            await raw.send_raw(ws_frame(0x2, VALID_CALL, length=1000)[: 6 + len(VALID_CALL) // 2])
            await raw.stream.send_eof()
            await until(connections_are(daemon, 1))  # only the bystander's is left
        await survives(daemon, witness)


@functools.cache
def deflate_bomb() -> bytes:
    """64 MiB of zeros, deflated (as permessage-deflate frames carry it): about 64 KiB."""
    compressor = zlib.compressobj(wbits=-15)
    data = compressor.compress(bytes(64 * 1024 * 1024)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # permessage-deflate strips the final empty block's tail


async def test_compression_is_declined_and_a_compressed_bomb_is_refused(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        rss_before = await witness.call("rss")
        async with RawClient.connect(daemon, extensions=[ClientPerMessageDeflateFactory()]) as raw:
            # The offer (which every browser makes) is declined...
            assert raw.protocol.extensions == []
            assert "Sec-WebSocket-Extensions" not in raw.response.headers
            # ... so a frame flagged as compressed is a protocol error, never inflated.
            await raw.send_raw(ws_frame(0x2, deflate_bomb(), rsv1=True))
            closed = await raw.closed()
            assert closed.code in (1002, 1006), closed  # protocol error, or just hung up
        rss_after = await witness.call("rss")
        assert rss_after - rss_before < 32 * 1024 * 1024, (rss_before, rss_after)
        await survives(daemon, witness)


async def test_a_close_message_then_more_frames(daemon: Daemon) -> None:
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            await raw.send_binary(message_frame([CLOSE, 0, "bye"]))
            await raw.send_binary(VALID_CALL)
            await raw.closed()
        await survives(daemon, witness)


async def test_streams_of_many_small_attacks_in_one_connection(daemon: Daemon) -> None:
    """Pipelined junk: every valid call is answered until the first protocol error."""
    async with bystander(daemon) as witness, RawClient.connect(daemon) as raw:
        for sid in range(1, 6):
            await raw.send_binary(call_frame(sid, "", "list_instances", [], {}, False, 0, {}))
        await raw.send_binary(b"junk")
        closed = await raw.closed()
        answered = {m[1] for m in closed.messages if m[0] == 2}
        assert answered == {1, 2, 3, 4, 5}
        assert closed.messages[-1][0] == CLOSE
        await survives(daemon, witness)


async def test_health_and_instances_under_junk_requests(daemon: Daemon) -> None:
    for path in [
        "/health?x=" + "a" * 4000,
        "/%2e%2e/etc/passwd",
        "/instances/../health",
        "//health",
    ]:
        status, _, _ = await http_get(daemon.port, path)
        assert status in (200, 400, 404), (path, status)
    status, _, _ = await http_get(daemon.port, "/instances")
    assert status == 401
    status, _, body = await http_get(
        daemon.port, "/instances", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    assert "statistics" in json.loads(body)


async def test_a_byte_stream_cut_mid_frame_ends_that_connection_cleanly() -> None:
    """The process executor's transport: a header, part of the body, then end of file."""
    import socket

    from anyio.abc import SocketStream

    from remote_exec.runtime.transport import StreamTransport

    frame = VALID_CALL
    async with serving() as dispatcher:
        for cut in (HEADER_SIZE // 2, HEADER_SIZE, len(frame) - 1):
            ours, theirs = socket.socketpair()
            client = await SocketStream.from_socket(ours)
            server = StreamTransport(await SocketStream.from_socket(theirs))
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(dispatcher.serve, server)
                    await client.send(frame[:cut])
                    await client.send_eof()
                    await read_to_eof(client)
            await client.aclose()
        assert dispatcher.statistics()["connections"] == 0


def test_hypercorn_is_hardened() -> None:
    """The process-wide switches ``serve`` throws are in place (and idempotent)."""
    from hypercorn.protocol import ws_stream

    from remote_exec.server.app import _CappedWebsocketBuffer, _DeclinedDeflate, harden_hypercorn

    harden_hypercorn()
    harden_hypercorn()
    names = vars(ws_stream)
    assert names["PerMessageDeflate"] is _DeclinedDeflate
    assert names["WebsocketBuffer"] is _CappedWebsocketBuffer
    extension = _DeclinedDeflate()
    assert not extension.accept("permessage-deflate; client_max_window_bits")  # type: ignore[func-returns-value]
    assert not extension.enabled()
