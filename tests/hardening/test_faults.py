"""Faults, on both backends: daemons and children that die, clients that vanish, slow consumers.

The promise (DESIGN.md, Cancellation and Safety): a fault surfaces as a clear
error in every waiting caller within seconds, a stream ends with an error and
never with a clean end, nothing is lost or run twice, and whatever a vanished
client held on the daemon (calls, generators, its connection) is released.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from remote_exec.client.process import ProcessExecutor
from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.exceptions import (
    ConnectionLostError,
    ExecutorStateError,
    RemoteException,
    RemoteExecConnectionError,
)
from remote_exec.executor import Executor
from tests.core.helpers import message_frame
from tests.hardening.helpers import (
    CANCEL,
    INSTRUMENTS,
    TIMEOUT,
    TOKEN,
    Daemon,
    RawClient,
    bystander,
    connections_are,
    start_daemon,
    statistics,
    survives,
    until,
)
from tests.hardening.instruments import Instrument

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

IDLE_TIMEOUT = 1.5
# The module's shared daemon drops a silent peer quickly; live clients answer its pings.
DAEMON_ARGS = ("--idle-timeout", str(IDLE_TIMEOUT), "--ping-interval", "0.25")
# How soon every waiting caller must hear of a fault.
PROMPTLY = 5.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Waiters:
    """Callers that wait on the remote side; each records how it ended, and when."""

    def __init__(self) -> None:
        self.outcomes: dict[str, BaseException | str] = {}
        self.ended_at: dict[str, float] = {}

    async def call(self, label: str, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            await fn()
        except (ConnectionLostError, RemoteException, ExecutorStateError) as exc:
            self.outcomes[label] = exc
        else:
            self.outcomes[label] = "returned"  # a fault must never look like success
        self.ended_at[label] = time.monotonic()

    async def stream(self, label: str, items: Any) -> None:
        """Consume a stream to its end: a clean end is recorded as "ended cleanly"."""
        try:
            async with items as iterator:
                async for _ in iterator:
                    pass
        except (ConnectionLostError, RemoteException, ExecutorStateError) as exc:
            self.outcomes[label] = exc
        else:
            self.outcomes[label] = "ended cleanly"
        self.ended_at[label] = time.monotonic()

    def assert_all_lost(self, labels: set[str], since: float) -> None:
        assert set(self.outcomes) == labels, self.outcomes
        for label, outcome in self.outcomes.items():
            assert isinstance(outcome, ConnectionLostError), (label, outcome)
            assert self.ended_at[label] - since < PROMPTLY, (label, self.ended_at[label] - since)


# -- the daemon dies -----------------------------------------------------------------------


async def test_daemon_killed_fails_every_waiting_caller_and_stream(
    anyio_backend: str, tmp_path: Path
) -> None:
    daemon = start_daemon(anyio_backend, tmp_path)
    try:
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            holder, blocker, streamer, idle, watcher = (Instrument() for _ in range(5))
            for instrument in (holder, blocker, streamer, idle, watcher):
                await ex.create_remote_instance(instrument, unique("i"))
            key = uuid.uuid4().hex
            waiters = Waiters()
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiters.call, "async call", lambda: holder.hold(key, 60))
                    tg.start_soon(waiters.call, "sync call", lambda: blocker.block(key))
                    await until(lambda: _journal_has(watcher, key, "hold started", "block started"))
                    # Queued behind the blocked one: it never started.
                    tg.start_soon(waiters.call, "queued call", lambda: blocker.echo(1))
                    tg.start_soon(waiters.stream, "async stream", streamer.ticks(key))
                    tg.start_soon(waiters.stream, "sync stream", idle.numbers(key))
                    tg.start_soon(waiters.stream, "channel", ex.get_channel_from_remote("", ""))
                    await until(
                        lambda: _journal_has(watcher, key, "ticks started", "numbers started")
                    )
                    await anyio.wait_all_tasks_blocked()
                    killed_at = time.monotonic()
                    daemon.process.send_signal(signal.SIGKILL)
            waiters.assert_all_lost(
                {
                    "async call",
                    "sync call",
                    "queued call",
                    "async stream",
                    "sync stream",
                    "channel",
                },
                killed_at,
            )
            # Later calls fail at once too, with the same clear error.
            with anyio.fail_after(1):
                with pytest.raises(ConnectionLostError):
                    await watcher.echo(1)
                with pytest.raises(ConnectionLostError):
                    async with streamer.ticks(key) as ticks:
                        await anext(ticks)
        assert daemon.process.wait() == -signal.SIGKILL
    finally:
        daemon.process.close()


async def _journal_has(instrument: Instrument, key: str, *events: str) -> bool:
    journal = await instrument.journal(key)
    return all(event in journal for event in events)


async def test_sigterm_finishes_short_calls_and_fails_the_rest(
    anyio_backend: str, tmp_path: Path
) -> None:
    daemon = start_daemon(anyio_backend, tmp_path, "--grace", "1")
    try:
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            short, long, streamer, watcher = (Instrument() for _ in range(4))
            for instrument in (short, long, streamer, watcher):
                await ex.create_remote_instance(instrument, unique("i"))
            short_key, long_key = uuid.uuid4().hex, uuid.uuid4().hex
            waiters = Waiters()
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiters.call, "short call", lambda: short.hold(short_key, 0.3))
                    tg.start_soon(waiters.call, "long call", lambda: long.hold(long_key, 60))
                    tg.start_soon(waiters.stream, "stream", streamer.ticks(long_key))
                    await until(lambda: _journal_has(watcher, short_key, "hold started"))
                    await until(
                        lambda: _journal_has(watcher, long_key, "hold started", "ticks started")
                    )
                    signalled_at = time.monotonic()
                    daemon.process.send_signal(signal.SIGTERM)
            assert waiters.outcomes["short call"] == "returned"  # within the grace
            for label in ("long call", "stream"):  # past it: an error, never a clean end
                outcome = waiters.outcomes[label]
                assert isinstance(outcome, (ConnectionLostError, RemoteException)), (label, outcome)
                assert waiters.ended_at[label] - signalled_at < 1 + PROMPTLY
        assert await anyio.to_thread.run_sync(daemon.process.wait) == 0
        assert "SIGTERM" in daemon.process.log()
    finally:
        daemon.process.close()


# -- the process executor's child dies ----------------------------------------------------------


@pytest.mark.parametrize("how", ["segfault", "exit", "sigkill"])
async def test_process_child_dying_fails_calls_and_streams(how: str) -> None:
    waiters = Waiters()
    async with ProcessExecutor(allow_modules=[INSTRUMENTS], init_context=False) as ex:
        pid = ex.pid
        assert pid is not None
        holder, streamer, crasher = Instrument(), Instrument(), Instrument()
        for instrument in (holder, streamer, crasher):
            await ex.create_remote_instance(instrument, unique("i"))
        key = uuid.uuid4().hex
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    waiters.call, "async call", lambda: ex.execute(holder, "hold", [key, 60])
                )
                tg.start_soon(
                    waiters.stream, "stream", ex.execute_generator(streamer, "ticks", [key])
                )
                await until(
                    lambda: _executes(
                        ex, crasher, "journal", [key], ["hold started", "ticks started"]
                    )
                )
                await anyio.wait_all_tasks_blocked()
                crashed_at = time.monotonic()
                if how == "sigkill":
                    os.kill(pid, signal.SIGKILL)
                elif how == "exit":
                    tg.start_soon(
                        waiters.call, "crashing call", lambda: ex.execute(crasher, "exit_now", [3])
                    )
                else:
                    tg.start_soon(
                        waiters.call, "crashing call", lambda: ex.execute(crasher, "segfault")
                    )
        labels = {"async call", "stream"} | (set() if how == "sigkill" else {"crashing call"})
        waiters.assert_all_lost(labels, crashed_at)
        with pytest.raises(ConnectionLostError):
            await ex.execute(holder, "echo", [1])
    expected = {"sigkill": -signal.SIGKILL, "exit": 3, "segfault": -signal.SIGSEGV}[how]
    assert ex.returncode == expected
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped


async def _executes(ex: Executor, obj: Any, method: str, args: list[Any], want: list[str]) -> bool:
    journal = await ex.execute(obj, method, args)
    return all(event in journal for event in want)


# -- a client vanishes ------------------------------------------------------------------------------


@asynccontextmanager
async def doomed_client(daemon: Daemon, key: str) -> AsyncIterator[RawClient]:
    """A raw client with work in flight on the daemon: a stream of each kind, an
    async call, a sync call and a call queued behind it."""
    async with RawClient.connect(daemon) as raw:
        names = [unique("doomed") for _ in range(4)]
        for name in names:
            assert await raw.create(name) is True
        await raw.call(names[0], "ticks", [key], stream=True, credit=4)
        await raw.call(names[1], "numbers", [key], stream=True, credit=4)
        await raw.call(names[2], "hold", [key, 60])
        await raw.call(names[3], "block", [key])
        await raw.call(names[3], "echo", ["never runs"])
        yield raw


async def released_everything(daemon: Daemon, witness: Any, key: str) -> None:
    """What the vanished client started is over, and nothing is left of it."""
    # Its generators were closed (their ``finally`` ran), its async call cancelled.
    await until(
        journal_is_superset(witness, key, "ticks closed", "numbers closed", "hold cancelled")
    )
    # Its connection is gone; only the witness's own stream is still in flight.
    await until(connections_are(daemon, 1))
    # The running sync call cannot be interrupted: it finishes, unanswered, and
    # the call queued behind it never runs.
    await witness.call("release", key)
    await until(journal_is_superset(witness, key, "block done"))
    stats = await statistics(daemon)
    assert stats["calls_in_flight"] == 1, stats  # the witness's stream
    assert stats["queued"] == 0, stats
    journal = await witness.call("journal", key)
    assert journal.count("block started") == 1, journal


async def test_a_client_that_hangs_up_without_a_close_frame(daemon: Daemon) -> None:
    key = uuid.uuid4().hex
    async with bystander(daemon) as witness:
        async with doomed_client(daemon, key) as raw:
            await until(
                journal_is_superset(
                    witness,
                    key,
                    "ticks started",
                    "numbers started",
                    "hold started",
                    "block started",
                )
            )
            # Reset the TCP connection: no websocket close, no remote-exec Close.
            sock = raw.stream.extra(SocketAttribute.raw_socket)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            await raw.stream.aclose()
        await released_everything(daemon, witness, key)
        await survives(daemon, witness)


async def test_a_silent_client_is_found_by_keepalive(daemon: Daemon) -> None:
    key = uuid.uuid4().hex
    async with bystander(daemon) as witness:
        async with doomed_client(daemon, key):
            await until(
                journal_is_superset(
                    witness,
                    key,
                    "ticks started",
                    "numbers started",
                    "hold started",
                    "block started",
                )
            )
            # From now on the client neither reads nor answers pings, but its
            # socket stays open: only the daemon's keepalive can tell.
            silent_since = time.monotonic()
            await released_everything(daemon, witness, key)
            assert time.monotonic() - silent_since < IDLE_TIMEOUT + PROMPTLY
        await survives(daemon, witness)


def journal_is_superset(witness: Any, key: str, *events: str) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``until``: the daemon's journal for ``key`` has all of ``events``."""

    async def check() -> bool:
        journal = await witness.call("journal", key)
        return all(event in journal for event in events)

    return check


# -- slow consumers --------------------------------------------------------------------------------


async def test_a_slow_consumer_suspends_a_fast_producer(daemon: Daemon) -> None:
    size, window = 1024 * 1024, 8
    async with bystander(daemon) as witness:
        async with WebSocketExecutor(daemon.url, token=TOKEN, window=window) as ex:
            producer = Instrument()
            async with ex.remote_instance(producer, unique("producer")):
                rss_before = await witness.call("rss")
                async with producer.big_items(size) as items:
                    consumed = 0
                    for _ in range(2):
                        assert len(await anext(items)) == size
                        consumed += 1

                    async def produced() -> int:
                        data = await ex.get_remote_object_property_data(producer, ["produced"])
                        return int(data["produced"])

                    async def suspended() -> bool:
                        return await produced() >= window

                    # It runs ahead by the window, then waits for the consumer
                    # (a starved consumer of large items may grant what it
                    # consumed before half the window: never more than that).
                    await until(suspended)
                    level = await produced()
                    assert level <= consumed + window
                    for _ in range(20):  # it stays suspended however long we look
                        assert await produced() == level
                    rss_suspended = await witness.call("rss")
                    # Each item consumed lets it make one more, never more than that.
                    for _ in range(100):
                        await anext(items)
                        consumed += 1
                        assert await produced() <= consumed + window
                # Leaving the block closed the generator: it stops for good.
                stopped = await produced()
                assert stopped <= consumed + window
                assert await produced() == stopped
        # The daemon held about a window of items, not a stream's worth.
        assert rss_suspended - rss_before < 4 * window * size, (rss_before, rss_suspended)
        await survives(daemon, witness)


# -- cancellation races -------------------------------------------------------------------------


async def test_a_cancel_right_behind_its_call_is_never_lost(daemon: Daemon) -> None:
    """A Cancel that arrives before the call's task has even started still cancels it."""
    async with bystander(daemon) as witness, RawClient.connect(daemon) as raw:
        for method, args, stream in [("sleep", [30], False), ("subscribe", ["", ""], True)]:
            sid = raw.new_id()
            call = message_frame([1, sid, "", method, args, {}, stream, 1 if stream else 0, {}])
            raw.protocol.send_binary(call)
            raw.protocol.send_binary(message_frame([CANCEL, sid]))
            started = time.monotonic()
            await raw.send_raw(b"".join(raw.protocol.data_to_send()))  # one write, both at once
            tree = await raw.reply(sid)
            assert time.monotonic() - started < PROMPTLY
            if stream:
                assert tree[0] == 5, tree  # a cancelled stream ends
            else:
                assert tree[:3] == [3, sid, "remote_exec.CallCancelledError"], tree
        await raw.still_serves()
        await survives(daemon, witness)


# -- executors used after stop, or pointed at nothing --------------------------------------------


@pytest.mark.parametrize("kind", ["websocket", "process"])
async def test_streams_of_a_stopped_executor_fail_at_once(daemon: Daemon, kind: str) -> None:
    ex: Executor
    if kind == "websocket":
        ex = WebSocketExecutor(daemon.url, token=TOKEN, init_context=False)
    else:
        ex = ProcessExecutor(allow_modules=[INSTRUMENTS], init_context=False)
    key = uuid.uuid4().hex
    async with ex:
        instrument = Instrument()
        await ex.create_remote_instance(instrument, unique("i"))
        opened = ex.execute_generator(instrument, "ticks", [key])
        assert await anext(opened) == 0
        not_opened = ex.execute_generator(instrument, "numbers", [key])
    with anyio.fail_after(1):
        # What had arrived before the stop may still be read; then an error,
        # never a clean end. (Items the daemon sent after the client's goodbye
        # may end it as a lost connection instead of a stopped executor.)
        leftovers, error = await drain(opened)
        assert isinstance(error, (ExecutorStateError, ConnectionLostError)), error
        assert leftovers <= ex.window
        with pytest.raises(ExecutorStateError, match="stopped"):
            await anext(not_opened)
        with pytest.raises(ExecutorStateError, match="stopped"):
            await ex.execute(instrument, "echo", [1])


async def drain(items: Any) -> tuple[int, BaseException | None]:
    """How many items a stream still gave, and the error that ended it (None: a clean end)."""
    count = 0
    try:
        async for _ in items:
            count += 1
    except Exception as exc:  # noqa: BLE001 - what ended it is the result
        return count, exc
    return count, None


@asynccontextmanager
async def fake_server(behaviour: str) -> AsyncIterator[int]:
    """A TCP server that is not a remote-exec daemon; yields its port."""

    async def handle(stream: SocketStream) -> None:
        async with stream:
            if behaviour == "hangs up":
                return
            await stream.receive()
            if behaviour == "speaks garbage":
                await stream.send(b"\x00\xffnot http at all\r\n\r\n")
            elif behaviour == "plain http":
                await stream.send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                )
            elif behaviour == "accepts the upgrade then hangs up":
                await stream.send(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            await anyio.lowlevel.checkpoint()

    async def run(*, task_status: TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        task_status.started(listener.extra(SocketAttribute.local_port))
        await listener.serve(handle)

    async with anyio.create_task_group() as tg:
        port = await tg.start(run)
        yield port
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    "behaviour",
    ["hangs up", "speaks garbage", "plain http", "accepts the upgrade then hangs up"],
)
async def test_a_websocket_executor_pointed_at_something_else(behaviour: str) -> None:
    async with fake_server(behaviour) as port:
        started = time.monotonic()
        with anyio.fail_after(5), pytest.raises(RemoteExecConnectionError):
            async with WebSocketExecutor(f"ws://127.0.0.1:{port}", token=TOKEN, connect_timeout=2):
                pass
        assert time.monotonic() - started < 2.5
