"""The pieces behind the daemon's connection limits, one at a time: the gate
that caps unauthenticated connections, the log's rate limit, and hypercorn's
websocket streams releasing what they hold once the app is done."""

from __future__ import annotations

import base64
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from remote_exec.server.app import (
    ConnectionGate,
    RemoteExecApp,
    harden_hypercorn,
    hypercorn_config,
    serve,
)
from remote_exec.server.cli import _RateLimit
from remote_exec.server.dispatch import Dispatcher

TIMEOUT = 10  # a failure bound only


# -- the gate ------------------------------------------------------------------------------


class Gate(ConnectionGate):
    """A gate whose descriptor budget the test sets."""

    budget: float = 1000

    def descriptor_budget(self) -> float:
        return self.budget


class Sock:
    def __init__(self, port: int) -> None:
        self.peer = ("127.0.0.1", port)
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def admit(gate: ConnectionGate, port: int) -> tuple[Sock, Any]:
    sock = Sock(port)
    return sock, gate.admit(sock.peer, sock.close)


def test_the_oldest_pending_connection_makes_room() -> None:
    gate = Gate(3)
    socks = [admit(gate, port) for port in range(1, 6)]
    assert [s.closed for s, _ in socks] == [1, 1, 0, 0, 0]
    assert (gate.pending, gate.dropped) == (3, 2)
    # Dropped ones count until hypercorn is done with them.
    assert gate.open == 5
    for _, entry in socks:
        gate.release(entry)
        gate.release(entry)  # once only
    assert gate.statistics() == {"pending": 0, "open": 0, "dropped": 2}


def test_authenticated_connections_are_never_dropped() -> None:
    gate = Gate(2)
    first, first_entry = admit(gate, 1)
    gate.authenticated(["127.0.0.1", 1])  # as an ASGI scope gives it
    others = [admit(gate, port) for port in range(2, 10)]
    assert first.closed == 0
    assert sum(s.closed for s, _ in others) == 6
    assert gate.pending == 2
    gate.release(first_entry)
    assert gate.open == 8


def test_descriptors_short_drop_the_oldest_pending_first() -> None:
    gate = Gate(100)
    gate.budget = 4
    authenticated = [admit(gate, port) for port in (1, 2)]
    for port in (1, 2):
        gate.authenticated(("127.0.0.1", port))
    pending = [admit(gate, port) for port in range(3, 8)]
    assert [s.closed for s, _ in authenticated] == [0, 0]
    assert [s.closed for s, _ in pending] == [1, 1, 1, 0, 0]
    # The newest always stays, even when the budget is all authenticated.
    gate.budget = 1
    last, _ = admit(gate, 9)
    assert last.closed == 0
    assert gate.pending == 1


def test_before_accept_makes_room_then_waits_for_it() -> None:
    gate = Gate(100)
    gate.budget = 3
    assert gate.before_accept()
    assert gate.before_accept()
    gate.not_accepted()  # nothing was there after all
    assert gate.open == 1
    assert gate.before_accept()
    assert gate.before_accept()
    assert gate.open == 3
    # At the budget, with accepted sockets on their way: nothing more for now.
    assert not gate.before_accept()
    socks = [admit(gate, port) for port in range(1, 4)]
    assert gate.open == 3
    # Then the oldest pending connection is dropped, and the loop tries again later ...
    assert not gate.before_accept()
    assert [s.closed for s, _ in socks] == [1, 0, 0]
    # ... without dropping more while that socket is still closing.
    assert not gate.before_accept()
    assert [s.closed for s, _ in socks] == [1, 0, 0]
    gate.release(socks[0][1])
    assert gate.before_accept()
    # With every connection authenticated there is nothing to drop: accept.
    _, entry = admit(gate, 4)
    for port in (2, 3, 4):
        gate.authenticated(("127.0.0.1", port))
    assert gate.open == 3
    assert gate.before_accept()
    del entry


def test_accepts_that_never_arrive_stop_counting() -> None:
    gate = Gate(100, stale_after=-1)
    gate.budget = 2
    assert gate.before_accept()
    assert gate.before_accept()
    # (say, two TLS handshakes that failed before hypercorn saw them)
    assert gate.before_accept()  # stale at once here: no longer counted
    assert gate.open == 1


def test_out_of_descriptors_drops_the_oldest_pending(caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate(100)
    socks = [admit(gate, port) for port in (1, 2)]
    with caplog.at_level(logging.WARNING, "remote_exec.server.peers"):
        gate.descriptors_exhausted()
        gate.descriptors_exhausted()  # the same burst of failed accepts: once
    assert [s.closed for s, _ in socks] == [1, 0]
    assert "no file descriptors left" in caplog.text
    gate = Gate(100)
    with caplog.at_level(logging.WARNING, "remote_exec.server.peers"):
        gate.descriptors_exhausted()
    assert "every open connection has authenticated" in caplog.text


def test_a_reused_peer_address_keeps_both_connections() -> None:
    gate = Gate(10)
    old, old_entry = admit(gate, 1)
    new, new_entry = admit(gate, 1)
    assert gate.pending == 2
    gate.authenticated(("127.0.0.1", 1))  # the newer one is the websocket
    assert gate.pending == 1
    gate.release(old_entry)
    gate.release(new_entry)
    assert (gate.pending, gate.open) == (0, 0)
    assert (old.closed, new.closed) == (0, 0)


def test_the_budget_is_the_descriptor_limit_less_the_reserve() -> None:
    resource = pytest.importorskip("resource")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    gate = ConnectionGate(10, fd_reserve=32)
    expected = float("inf") if soft == resource.RLIM_INFINITY else max(1, soft - 32)
    assert gate.descriptor_budget() == expected
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionGate(0)


# -- the log's rate limit ---------------------------------------------------------------------


def record(name: str, msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_the_log_rate_limit() -> None:
    now = [0.0]
    limit = _RateLimit(burst=3, period=10, clock=lambda: now[0])
    peers = "remote_exec.server.peers"
    passed = [limit.filter(record(peers, "refused %s", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    # Another message, another logger of the list: counted apart.
    assert limit.filter(record("asyncio", "socket.accept() out of system resource"))
    assert limit.filter(record("trio.serve_listeners", "accept returned %s", "EMFILE"))
    # Loggers anyone cannot flood (calls, the instances' own) always pass.
    assert all(
        limit.filter(record("remote_exec.server", "client %s connected", i)) for i in range(20)
    )
    assert all(limit.filter(record("mylab.stage", "moved %d", i)) for i in range(20))
    # After the period, the next one says how many were left out.
    now[0] = 10.5
    late = record(peers, "refused %s", "late")
    assert limit.filter(late)
    assert late.getMessage() == "refused late (and 7 more like this in the 10 s before, not logged)"
    again = record(peers, "refused %s", "again")
    assert limit.filter(again)
    assert again.getMessage() == "refused again"


def test_the_log_rate_limit_forgets_stale_messages() -> None:
    now = [0.0]
    limit = _RateLimit(burst=1, period=1, clock=lambda: now[0])
    for i in range(1024):
        limit.filter(record("hypercorn.error", f"made up {i}"))
    now[0] = 5
    assert limit.filter(record("hypercorn.error", "one more"))
    assert len(limit._windows) == 1


# -- hypercorn's streams once the app is done ------------------------------------------------


class StubbornApp(RemoteExecApp):
    """Accepts a websocket, reads nothing until its queue is full, then closes and returns."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await super().__call__(scope, receive, send)
            return
        await receive()
        await send({"type": "websocket.accept"})
        owner = receive.__self__  # asyncio.Queue or trio's MemoryReceiveChannel
        with anyio.fail_after(TIMEOUT):
            while not queue_full(owner):  # noqa: ASYNC110 - hypercorn's queue has no event
                await anyio.sleep(0.01)
        await send({"type": "websocket.close", "code": 1000})


def queue_full(owner: Any) -> bool:
    if hasattr(owner, "full"):
        return bool(owner.full())
    stats = owner.statistics()
    return bool(stats.current_buffer_used >= stats.max_buffer_size)


@asynccontextmanager
async def stubborn_server() -> AsyncIterator[tuple[int, StubbornApp]]:
    harden_hypercorn()
    app = StubbornApp(Dispatcher(allow_modules=[]), token=None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = hypercorn_config(sock, ping_interval=None)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait, grace=0))
        try:
            yield port, app
        finally:
            stop.set()


def masked(payload: bytes) -> bytes:
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + b"\0\0\0\0" + payload


@pytest.mark.anyio
async def test_a_connection_whose_app_stopped_reading_ends_when_the_app_returns() -> None:
    """hypercorn's reader waits for room in the app's queue (10 messages); once
    the app has returned, nothing will ever make room: the connection must end
    anyway (it used to stay open for good, its queued messages with it), and
    hypercorn's task for it too."""
    async with stubborn_server() as (port, app):
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with anyio.fail_after(TIMEOUT):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(handshake.encode())
                received = b""
                while b"\r\n\r\n" not in received:
                    received += await stream.receive()
                assert received.startswith(b"HTTP/1.1 101 ")
                # 30 small messages at once: 10 fill the queue, the 11th waits.
                await stream.send(b"".join(masked(b"m%d" % i) for i in range(30)))
                # The app closes and returns; the server hangs up.
                while True:
                    try:
                        received += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        assert b"\x88\x02\x03\xe8" in received  # the app's close frame (1000)
        # And hypercorn is done with it: its reader no longer waits on the queue.
        assert app.gate is not None
        with anyio.fail_after(TIMEOUT):
            while app.gate.open:  # noqa: ASYNC110 - the gate has no event
                await anyio.sleep(0.01)


class FailingServer:
    """A hypercorn TCP server whose connection fails with an unexpected error."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.config = type("Config", (), {"_remote_exec_gate": gate})()

    async def run(self) -> None:
        raise RuntimeError("h11 raised in the middle of a race")

    async def _read_data(self) -> None:
        pass


class PeerSocket:
    family = socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 4321)


@pytest.mark.anyio
async def test_one_connections_failure_never_reaches_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from remote_exec.server.app import _gate_run

    _gate_run(FailingServer, lambda server: (PeerSocket(), lambda: None))
    _gate_run(FailingServer, lambda server: (PeerSocket(), lambda: None))  # idempotent
    gate = Gate(10)
    with caplog.at_level(logging.WARNING, "remote_exec.server.peers"):
        await FailingServer(gate).run()  # does not raise (under trio it cancelled them all)
    assert "connection from 127.0.0.1:4321 failed in the server" in caplog.text
    assert (gate.open, gate.pending) == (0, 0)
