"""A client that does not read its replies cannot grow the daemon (issue 16, item 2).

A client that sends calls and never reads the replies used to grow the daemon
without limit: the replies piled up in the connection's outgoing queue while
the daemon kept reading new calls, and ``--max-calls`` did not help, since a
queued reply frees its call's place. 3,000 echo calls of 64 KiB took the
daemon from 51 to 243 MiB (8,000: 557 MiB). Now past ``--max-outgoing-bytes``
of replies waiting for a connection the daemon reads nothing more from it
until its client has read them (back-pressure); a client that reads nothing
at all for ``--idle-timeout`` is dropped, and one that does not read never
holds up a shutdown for longer than ``--grace``. The process executor's child
writes the same way, and holds the same bound.

Each test reads the daemon's (or the child's) memory from ``/proc`` (Linux),
with generous bounds, and watches a well-behaved client that stays connected
and keeps calling throughout.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.framing import FrameAssembler
from remote_exec.protocol import RpcConnection, Side
from remote_exec.runtime.sockets import socket_stream
from remote_exec.runtime.transport import StreamTransport
from remote_exec.server import cli
from remote_exec.server.connection import DEFAULT_MAX_OUTGOING_BYTES
from tests.hardening.helpers import (
    FAILURE,
    INSTRUMENTS,
    RESULT,
    TIMEOUT,
    TOKEN,
    Daemon,
    RawClient,
    connections_are,
    health,
    parse_frame,
    split_frames,
    start_daemon,
    until,
)
from tests.hardening.instruments import Instrument
from tests.hardening.pressure import STALL, Watch, memory, settles, watched

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)"),
]

MIB = 1024 * 1024
PAYLOAD = bytes(64 * 1024)
# Replies of 64 KiB: with nothing to bound them, 3,000 take about 190 MiB.
CALLS = 3000
# The daemon's growth while a non-reader floods it: the bound (32 MiB by
# default), what was read before it was reached, and the replies of the calls
# already running then. Unbounded, it is about 190 MiB.
GROWTH = 96 * MIB
# Back near the baseline once the client has gone.
SETTLED = 24 * MIB
HELD_BACK = "reads its replies slower than it sends calls"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Flood:
    """What a client that never reads has sent."""

    sent: int = 0
    done: bool = False
    failed: BaseException | None = None  # its connection broke (dropped by the daemon)


async def flood(raw: RawClient, name: str, state: Flood, calls: int = CALLS) -> None:
    """Send ``calls`` echo calls of 64 KiB as fast as the daemon takes them; read nothing."""
    try:
        for _ in range(calls):
            await raw.call(name, "echo", [PAYLOAD])
            state.sent += 1
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        state.failed = exc
    else:
        state.done = True


@asynccontextmanager
async def non_reader(daemon: Daemon, calls: int = CALLS) -> AsyncIterator[tuple[RawClient, Flood]]:
    """A client that sends ``calls`` echo calls without reading a reply, until the
    daemon stops reading from it (its INFO line says so) or it has sent them all."""
    async with RawClient.connect(daemon) as raw:
        name = f"flood-{uuid.uuid4().hex[:8]}"
        await raw.create(name)
        state = Flood()
        async with anyio.create_task_group() as tg:
            tg.start_soon(flood, raw, name, state, calls)

            async def held_back() -> bool:
                return state.done or HELD_BACK in daemon.new_log()

            await until(held_back)
            yield raw, state
            tg.cancel_scope.cancel()
        # Leaving without reading: the socket is closed with unread data (a reset).


def rss(daemon: Daemon) -> int:
    return memory(daemon.pid)["VmRSS"]


def fresh_daemon(backend: str, tmp: Path, *extra: str) -> Daemon:
    daemon = start_daemon(backend, tmp, *extra)  # at INFO: it says when it holds back
    daemon.mark_log()
    return daemon


async def healthy(daemon: Daemon, watch: Watch) -> None:
    """The daemon lives, answers /health and a fresh client; the watcher never stalled."""
    assert daemon.alive(), daemon.process.log()[-4000:]
    assert watch.worst < STALL, watch
    with anyio.fail_after(TIMEOUT):
        await health(daemon)
        async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
            fresh = Instrument()
            async with executor.remote_instance(fresh, f"fresh-{uuid.uuid4().hex[:8]}"):
                assert await fresh.add(2, 3) == 5
    log = daemon.new_log()
    for needle in ("Traceback", " ERROR "):
        assert needle not in log, log[-4000:]


async def test_a_client_that_never_reads_cannot_grow_the_daemon(
    anyio_backend: str, tmp_path: Path
) -> None:
    daemon = fresh_daemon(anyio_backend, tmp_path)
    try:
        async with watched(daemon) as watch:
            base = rss(daemon)
            async with non_reader(daemon) as (_, state):
                # Held back long before its 3,000 calls: the daemon stopped reading.
                assert not state.done, f"the daemon read all {state.sent} calls"
                assert state.sent < CALLS // 2, state
                calls_before = watch.calls
                # The watcher's calls go on, at their usual pace, meanwhile.
                await until(_more_calls(watch, calls_before + 20))
                assert memory(daemon.pid)["VmHWM"] < base + GROWTH, (memory(daemon.pid), base)
            # Gone (without reading): its connection and what waited for it go.
            await until(connections_are(daemon, 1))
            await settles(lambda: rss(daemon) < base + SETTLED, within=TIMEOUT)
            assert memory(daemon.pid)["VmHWM"] < base + GROWTH, (memory(daemon.pid), base)
        await healthy(daemon, watch)
    except BaseException as exc:
        exc.add_note(daemon.new_log()[-4000:])
        raise
    finally:
        daemon.process.close()


def _more_calls(watch: Watch, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return watch.calls >= count

    return check


async def test_a_slow_reader_is_held_back_and_loses_nothing(
    anyio_backend: str, tmp_path: Path
) -> None:
    # A smaller bound (the flag), and no pings: nothing but this test talks on the raw client.
    daemon = fresh_daemon(
        anyio_backend,
        tmp_path,
        "--max-outgoing-bytes",
        "4MiB",
        "--ping-interval",
        "60",
        "--idle-timeout",
        "120",
    )
    try:
        async with watched(daemon) as watch:
            base = rss(daemon)
            async with non_reader(daemon, CALLS) as (raw, state):
                assert not state.done, f"the daemon read all {state.sent} calls"
                assert state.sent < CALLS // 4, state
                assert memory(daemon.pid)["VmHWM"] < base + GROWTH // 2, memory(daemon.pid)
                # It starts reading: every call is answered exactly once (a
                # result, or a TooManyCallsError from --max-calls), none lost.
                answers: dict[int, list[Any]] = {}
                # Replies travel many to a message, and a run of them over 4 MiB
                # is cut across messages: frames are put together again here.
                assembler = FrameAssembler()
                with anyio.fail_after(4 * TIMEOUT):
                    while len(answers) < CALLS:
                        for run in assembler.feed(await raw.receive()):
                            for frame in split_frames(bytes(run)):
                                message = parse_frame(frame)
                                assert message[0] in (RESULT, FAILURE), message
                                assert message[1] not in answers, f"{message[1]} answered twice"
                                answers[message[1]] = message
                assert state.done
                results = [m for m in answers.values() if m[0] == RESULT]
                failures = {str(m[2]) for m in answers.values() if m[0] == FAILURE}
                assert failures <= {"TooManyCallsError"}, failures
                assert len(results) > CALLS // 2, len(results)
            await until(connections_are(daemon, 1))
            await settles(lambda: rss(daemon) < base + SETTLED, within=TIMEOUT)
        await healthy(daemon, watch)
    except BaseException as exc:
        exc.add_note(daemon.new_log()[-4000:])
        raise
    finally:
        daemon.process.close()


async def test_a_client_that_reads_nothing_is_dropped_after_the_idle_timeout(
    anyio_backend: str, tmp_path: Path
) -> None:
    idle = 2.0
    daemon = fresh_daemon(
        anyio_backend, tmp_path, "--idle-timeout", str(idle), "--ping-interval", "1"
    )
    try:
        async with watched(daemon) as watch:
            base = rss(daemon)
            async with non_reader(daemon) as (_, state):
                assert not state.done, f"the daemon read all {state.sent} calls"
                start = time.monotonic()
                # Dropped (its send fails), not left hanging: within the idle
                # timeout of its last read, and long before TIMEOUT.
                await until(connections_are(daemon, 1))
                assert time.monotonic() - start < idle + 5, time.monotonic() - start
                await settles(lambda: rss(daemon) < base + SETTLED, within=TIMEOUT)
            log = daemon.new_log()
            dropped = (
                r"is not reading its replies \(it read nothing for \d+ s\): connection dropped"
            )
            assert re.search(dropped, log), log[-4000:]
        await healthy(daemon, watch)
    except BaseException as exc:
        exc.add_note(daemon.new_log()[-4000:])
        raise
    finally:
        daemon.process.close()


async def test_shutdown_does_not_wait_for_a_client_that_does_not_read(
    anyio_backend: str, tmp_path: Path
) -> None:
    grace = 1.0
    # The idle timeout (60 s) is far away: the shutdown must not wait for it.
    daemon = fresh_daemon(anyio_backend, tmp_path, "--grace", str(grace))
    try:
        async with non_reader(daemon) as (_, state):
            assert not state.done, f"the daemon read all {state.sent} calls"
            start = time.monotonic()
            code = await anyio.to_thread.run_sync(daemon.process.stop, 30.0)
            took = time.monotonic() - start
        assert code == 0, (code, daemon.process.log()[-4000:])
        assert took < grace + 5, took
        log = daemon.process.log()
        assert "(the server is shutting down): connection dropped" in log, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
    finally:
        daemon.process.close()


# -- the process executor's child ------------------------------------------------------------

# The child as ProcessExecutor starts it, its INFO log on stderr (it logs
# nothing by default): the line that says it stopped reading is the signal.
_CHILD = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
    "from remote_exec.server.child import main; main(sys.argv[1:])"
)


async def test_the_process_child_holds_back_a_parent_that_does_not_read(
    anyio_backend: str, tmp_path: Path
) -> None:
    ours, theirs = socket.socketpair()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTE_EXEC")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log_path = tmp_path / "child.log"
    command = [sys.executable, "-c", _CHILD, "--fd", str(theirs.fileno())]
    with log_path.open("wb") as log_file:
        child = await anyio.open_process(
            [*command, "--backend", anyio_backend, "--allow-module", INSTRUMENTS],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            cwd=ROOT,
            env=env,
        )
    theirs.close()
    link = StreamTransport(await socket_stream(ours))
    try:
        rpc = RpcConnection(Side.CLIENT)

        async def send_pending() -> None:
            for frame in rpc.data_to_send():
                await link.send_frame(frame)

        async def next_message() -> object:
            while True:
                events = rpc.events_received()
                if events:
                    assert len(events) == 1, events
                    return events[0]
                rpc.receive_frame(await link.receive_frame())

        with anyio.fail_after(TIMEOUT):
            rpc.send_call("", "create_instance", [INSTRUMENTS, "Instrument", "x", [], {}, {}])
            await send_pending()
            assert getattr(await next_message(), "value", None) is True
        base = memory(child.pid)["VmRSS"]
        state = Flood()

        async def parent_flood() -> None:
            for _ in range(CALLS):
                rpc.send_call("x", "echo", [PAYLOAD])
                await send_pending()
                state.sent += 1
            state.done = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(parent_flood)

            async def held_back() -> bool:
                return state.done or HELD_BACK in log_path.read_text(errors="replace")

            await until(held_back)
            assert not state.done, f"the child read all {state.sent} calls"
            assert memory(child.pid)["VmHWM"] < base + GROWTH, (memory(child.pid), base)
            # The parent reads at last: every call is answered, none lost.
            answered = 0
            with anyio.fail_after(4 * TIMEOUT):
                while answered < CALLS:
                    reply = await next_message()
                    assert getattr(reply, "value", None) == PAYLOAD, reply
                    answered += 1
        assert state.done
        assert rpc.in_flight == 0
        await settles(lambda: memory(child.pid)["VmRSS"] < base + SETTLED, within=TIMEOUT)
        assert memory(child.pid)["VmHWM"] < base + GROWTH, memory(child.pid)
    finally:
        with anyio.CancelScope(shield=True):
            await link.aclose()  # end of file: the child exits
        with anyio.move_on_after(TIMEOUT, shield=True):
            await child.wait()
        if child.returncode is None:
            child.kill()
            with anyio.CancelScope(shield=True):
                await child.wait()
    assert child.returncode == 0, log_path.read_text(errors="replace")[-4000:]


def test_the_outgoing_bound_is_a_flag() -> None:
    serve = argparse.ArgumentParser()
    cli.add_serve_arguments(serve)
    assert serve.parse_args([]).max_outgoing_bytes == DEFAULT_MAX_OUTGOING_BYTES == 32 * MIB
    assert serve.parse_args(["--max-outgoing-bytes", "4MiB"]).max_outgoing_bytes == 4 * MIB
    with pytest.raises(SystemExit):
        serve.parse_args(["--max-outgoing-bytes", "1KiB"])
    assert "--max-outgoing-bytes SIZE" in serve.format_help()
