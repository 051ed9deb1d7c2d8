"""Load check: many clients against one ``remote-exec serve`` daemon, every result verified.

::

    python benchmarks/load_check.py [--clients N] [--calls M] [--backend asyncio|trio|both]
                                    [--kill] [--slow] [--restart [--restarts K]]
                                    [--seed S] [--json OUT] [--procs P] ...

Not a timed benchmark (``run.py`` is): a correctness check under load that
also reports throughput, latency and the daemon's memory. See the "Load check"
section of ``benchmarks/README.md``.

For each backend it starts a real daemon (``python -m remote_exec.server
--port 0 --no-auth --allow-module 'benchmarks.*' --backend B``, cwd the
repository root). N clients, each a ``WebSocketExecutor`` with its own
connection and its own ``LoadDevice`` instance in the daemon, make M calls
each, ``--in-flight`` at a time, drawn from a seeded mix: small echoes (sync
and async), 1 MiB buffer echoes (SHA-256 checked both ways), generators of
0..2*ITEMS items (sync and async; complete and in order) and sequence calls
(sync and async, with a callback). Each call carries its number ``n`` in its
client, taken right before the call is made (nothing awaits in between), and
the instance logs ``n`` when the call starts. At the end a fresh connection
reads every log back. The checks:

* every call ended once on the client: a verified value or an explicit
  exception (stuck for ``--call-timeout`` s is a failure);
* each log holds each successful call exactly once, nothing twice, nothing
  never called, the successes in call order; no two plain calls of one
  instance overlapped; the seq callbacks ran once per success, in order;
* without ``--kill``: no error at all, each log is exactly 0..M-1;
* with ``--kill``: clients abort their own connection at random moments (a TCP
  reset or a shut-down socket, never a close frame) and reconnect to their
  instance; every error must be a connection error, successes + errors ==
  total, and a failed call may have run (its reply was lost) but only once.
  Failed calls that ran after a later call are counted, not failed;
* with ``--slow``: some clients read their replies slowly (``--slow-rate``
  bytes a second, with a small socket buffer), and one more client, the
  non-reader, sends echo calls of 64 KiB on its own connection and never
  reads a reply. The daemon runs with a small ``--max-outgoing-bytes``
  (1 MiB) and must hold them back (stop reading from them) without losing
  anything: the slow readers' calls pass every check above, the non-reader
  is held back, and the daemon's memory stays bounded;
* with ``--restart``: each client makes all its calls through ONE
  ``WebSocketExecutor(url, reconnect=True)``, and the daemon is restarted
  ``--restarts`` times (default 2) on the same port, at even fractions of the
  calls done (1/3 and 2/3), alternately with SIGKILL and SIGTERM (the
  daemons run with ``--grace 1``: a daemon keeps running the calls its open
  connections send during its grace, so under load it lasts all of it). A
  restart loses the instances' in-memory logs, so each ``LoadDevice`` is
  created with a record file (an argument, so the executor's re-creation
  after a restart appends to the same file) where it writes every ``n`` it
  starts, and the checks read those files instead of the last daemon's logs.
  Checked, besides the server-log checks above across daemon lifetimes: every
  error is a connection error, successes + errors == total, zero duplicates,
  a failed call ran once or never; every client kept its one executor,
  reconnected once per restart it rode through (and not otherwise), and had
  its instance re-created at most once per daemon lifetime; the record files
  agree with the last daemon's in-memory logs; every daemon stopped with
  SIGTERM exited 0; no lifetime logged a traceback. The memory-flatness check
  is skipped (no lifetime sees the whole load), and the worker threads are
  counted for the instances the last daemon has; each lifetime's peak RSS is
  reported. ``--restart`` combines with ``--kill`` (the executor reconnects
  after a kill too), not with ``--slow`` or ``--procs``;
* with ``--kill`` or ``--restart``: every connection error is a
  ``ConnectionLostError``. A call a daemon fails as it shuts down arrives as a
  ``RemoteException`` whose remote type is ``remote_exec.ConnectionLostError``:
  a connection error for the checks above, but it fails this one;
* the daemon: alive, lets go of every connection and call, no worker thread
  left once the instances are deleted, no traceback logged, exit code 0 on
  SIGTERM; its memory flat over the second half of the load (the median RSS
  sample at the end within 16 MiB, or 10 %, of the one at half-way), since
  finished invocation records are kept (up to 10,000, for 300 s).

Clients share this process and its event loop (``--procs P`` spreads them over
P child processes; on 2 cores that only slows the daemon down). Exit code 1 if
any check fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from websockets.client import ClientProtocol
from websockets.protocol import CONNECTING, OPEN
from websockets.uri import parse_uri

from remote_exec import WebSocketExecutor
from remote_exec.exceptions import RemoteException, RemoteExecConnectionError
from remote_exec.protocol import RpcConnection, Side
from remote_exec.server.cli import format_size, parse_size
from remote_exec.server.testing import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

# kind: weight in the mix
KINDS: dict[str, int] = {
    "echo": 30,
    "aecho": 10,
    "seq": 20,
    "aseq": 10,
    "bytes": 10,
    "stream": 10,
    "astream": 10,
}
PROGRESS_EVERY = 2.0  # seconds between progress lines
CONNECTION_ERRORS = (
    "ConnectionLostError",
    "RemoteExecConnectionError",
    "RemoteConnectionLostError",
)
# A call a daemon failed as it shut down (SIGTERM, at the end of its grace) with
# "the server is shutting down": sent as a remote ConnectionLostError, which
# arrives as a plain RemoteException, not as a ConnectionLostError.
REMOTE_CONNECTION_LOST = "RemoteException[remote_exec.ConnectionLostError]"
# --slow: the daemon's bound on the replies waiting for one connection, and
# the receive buffer of a slow reader's socket (so that what it has not read
# waits in the daemon, not in the kernel).
SLOW_DAEMON_ARGS = ("--max-outgoing-bytes", "1MiB", "--log-level", "INFO")
SLOW_RCVBUF = 64 * 1024
NON_READER_PAYLOAD = 64 * 1024
HELD_BACK = "reads its replies slower than it sends calls"  # the daemon's INFO line
# The daemon's memory over the second half of the load: flat within this (or 10 %).
FLAT = 16 * MIB
# --restart: the daemons' grace on SIGTERM. While it lasts a daemon still runs
# the calls that arrive on its open connections, so under a steady load it
# always lasts the whole grace: the default 5 s would outlast the last third
# of a small run, and no client would ever see that restart.
RESTART_DAEMON_ARGS = ("--grace", "1")


def _device_class() -> type:
    """``benchmarks.load_devices.LoadDevice``, importable under that name (the daemon's)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.load_devices import LoadDevice

    return LoadDevice


# -- the plan: what each client calls, the same for a given seed -------------------------


def _echo_value(rng: random.Random, client: int, n: int) -> Any:
    shape = rng.randrange(5)
    if shape == 0:
        return n * 1_000_003 + client
    if shape == 1:
        return f"c{client}-n{n}-" + "é" * rng.randrange(20)
    if shape == 2:
        return (client, n, rng.random(), None, True)  # a tuple must stay a tuple
    if shape == 3:
        return {"client": client, "n": n, "items": [n, (n, -n), {"deep": [1.5, "x"]}]}
    return b"%d:%d:" % (client, n) + rng.randbytes(rng.randrange(64))  # a small buffer


def make_plan(seed: int, client: int, calls: int, items: int) -> list[tuple[str, Any]]:
    rng = random.Random(f"{seed}:plan:{client}")
    kinds, weights = list(KINDS), list(KINDS.values())
    plan: list[tuple[str, Any]] = []
    for n in range(calls):
        kind = rng.choices(kinds, weights)[0]
        param: Any = None
        if kind in ("echo", "aecho"):
            param = _echo_value(rng, client, n)
        elif kind in ("stream", "astream"):
            param = rng.randint(0, 2 * items)
        elif kind == "bytes":
            param = rng.randrange(MIB)  # offset into the shared random pool
        plan.append((kind, param))
    return plan


# -- clients ------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A call returned, but not what it should have."""


@dataclass
class Settings:
    url: str
    backend: str
    calls: int
    seed: int
    items: int
    in_flight: int
    kill_rate: float
    call_timeout: float
    deadline: float
    bytes_size: int = MIB
    slow_clients: list[int] = field(default_factory=list)  # these read slowly
    slow_rate: float = 4 * MIB  # bytes a second
    # --restart: one executor per client with reconnect=True, and each instance
    # records what it runs in a file of this folder (``record_path``).
    restart: bool = False
    record_dir: str = ""


def record_path(record_dir: str, cid: int) -> str:
    """``--restart``: the file where client ``cid``'s instance records its calls."""
    return str(Path(record_dir) / f"load-{cid}.record")


@dataclass
class _Session:
    executor: WebSocketExecutor
    number: int
    dead: bool = False
    in_flight: int = 0


@dataclass
class Progress:
    done: int = 0
    errors: int = 0


class Client:
    """One connection at a time (a new one after each kill), one instance, M calls.

    With ``--restart``: one executor for the whole run, with ``reconnect=True``;
    a connection error fails the calls in flight but not the session.
    """

    def __init__(self, cid: int, settings: Settings, pool: bytes, progress: Progress) -> None:
        self.cid = cid
        self.settings = settings
        self.pool = pool
        self.progress = progress
        self.name = f"load-{cid}"
        self.plan = make_plan(settings.seed, cid, settings.calls, settings.items)
        self.dev = _device_class()(cid)
        self.next = 0
        self.outcome: list[str | None] = [None] * settings.calls
        self.latency: list[float] = [0.0] * settings.calls
        self.started: list[float] = [0.0] * settings.calls  # time.time() when it was made
        self.ended: list[float] = [0.0] * settings.calls  # time.time() when the call ended
        # Which session made it (--restart: which connection of the one executor).
        self.connection: list[int] = [0] * settings.calls
        # --restart: the executor reconnected while the call was under way (it
        # was made before a reconnect, and either failed or waited for it).
        self.spanned: list[bool] = [False] * settings.calls
        self.sessions = 0
        self.reconnects = 0  # --restart: the executor's count, at the end
        self.kills: list[str] = []
        self.killed: dict[int, str] = {}  # session number: how its connection was killed
        self.setup_errors: list[str] = []
        self.error_examples: dict[str, str] = {}  # the first message of each error type
        self.kill_rng = random.Random(f"{settings.seed}:kill:{cid}")
        self.slow = cid in settings.slow_clients

    async def run(self) -> None:
        if self.settings.restart:
            await self._reconnecting_run()
            return
        while self.next < self.settings.calls:
            try:
                await self._session()
            except Exception as exc:  # noqa: BLE001 - reported, then retried
                self.setup_errors.append(f"{type(exc).__name__}: {exc}")
                if len(self.setup_errors) > 20:
                    return  # the rest stays unattempted: a failed check
                await anyio.sleep(0.05)

    async def _session(self) -> None:
        async with WebSocketExecutor(self.settings.url) as executor:
            if self.slow:
                read_slowly(executor, self.settings.slow_rate)
            await executor.ensure_remote_instance(self.dev, self.name, self.cid)
            self.sessions += 1
            session = _Session(executor, self.sessions)
            async with anyio.create_task_group() as tg:
                for _ in range(self.settings.in_flight):
                    tg.start_soon(self._worker, session, tg)

    async def _reconnecting_run(self) -> None:
        """``--restart``: every call through one executor that reconnects by itself.

        Only the first connection may be retried here (the daemon is not
        restarted before the load has begun); afterwards a second executor
        would be a manual re-session, which the checks count as a failure.
        """
        settings = self.settings
        record = record_path(settings.record_dir, self.cid)
        while self.next < settings.calls:
            try:
                async with WebSocketExecutor(settings.url, reconnect=True) as executor:
                    await executor.ensure_remote_instance(self.dev, self.name, self.cid, record)
                    self.sessions += 1
                    session = _Session(executor, self.sessions)
                    try:
                        async with anyio.create_task_group() as tg:
                            for _ in range(settings.in_flight):
                                tg.start_soon(self._worker, session, tg)
                    finally:
                        self.reconnects += executor.reconnects
            except Exception as exc:  # noqa: BLE001 - reported; a second executor fails a check
                self.setup_errors.append(f"{type(exc).__name__}: {exc}")
                if len(self.setup_errors) > 20:
                    return
                await anyio.sleep(0.05)

    def _connection_number(self, session: _Session) -> int:
        """The session's number; ``--restart``: the executor's current connection (1, 2...)."""
        if self.settings.restart:
            return session.executor.reconnects + 1
        return session.number

    async def _worker(self, session: _Session, tg: TaskGroup) -> None:
        settings = self.settings
        while not session.dead and self.next < settings.calls:
            # From taking ``n`` to sending the call nothing awaits: the order of
            # the ``n`` is the order in which the calls are made.
            n = self.next
            self.next += 1
            kind, param = self.plan[n]
            if settings.kill_rate and self.kill_rng.random() < settings.kill_rate:
                tg.start_soon(self._kill_later, session, self.kill_rng.uniform(0.0, 0.02))
            outcome = "hang"
            self.connection[n] = self._connection_number(session)
            self.started[n] = time.time()
            session.in_flight += 1
            start = time.perf_counter()
            with anyio.move_on_after(settings.call_timeout):
                try:
                    await self._call(kind, n, param)
                    outcome = "ok"
                except _Mismatch as exc:
                    outcome = f"bad:{exc}"
                except RemoteExecConnectionError as exc:
                    outcome = f"error:{type(exc).__name__}"
                    self.error_examples.setdefault(outcome[6:], f"{kind}({n}): {exc}"[:300])
                    # --restart: the executor reconnects; the next calls wait for it.
                    session.dead = not settings.restart
                except Exception as exc:  # noqa: BLE001 - an explicit error, counted by type
                    outcome = f"error:{_error_name(exc)}"
                    self.error_examples.setdefault(outcome[6:], f"{kind}({n}): {exc}"[:300])
            session.in_flight -= 1
            self.latency[n] = time.perf_counter() - start
            self.spanned[n] = self._connection_number(session) != self.connection[n]
            self.ended[n] = time.time()
            self.outcome[n] = outcome
            self.progress.done += 1
            if outcome != "ok":
                self.progress.errors += 1

    async def _kill_later(self, session: _Session, delay: float) -> None:
        await anyio.sleep(delay)
        if session.dead or not session.in_flight or not session.executor.connected:
            return
        how = self.kill_rng.choice(("rst", "shutdown"))
        # No new calls on this connection (--restart: the executor reconnects).
        session.dead = not self.settings.restart
        self.kills.append(how)
        self.killed[self._connection_number(session)] = how
        await abort_connection(session.executor, how)

    def _big(self, n: int, offset: int) -> bytes:
        size = self.settings.bytes_size
        return struct.pack("<II", self.cid, n) + self.pool[offset : offset + size - 8]

    async def _call(self, kind: str, n: int, param: Any) -> None:
        dev: Any = self.dev
        if kind in ("echo", "aecho"):
            got = await (dev.echo(n, param) if kind == "echo" else dev.aecho(n, param))
            if got != param or type(got) is not type(param):
                raise _Mismatch(f"{kind}: sent {param!r}, got {got!r}")
        elif kind in ("seq", "aseq"):
            got = await (dev.seq(n) if kind == "seq" else dev.aseq(n))
            if not isinstance(got, tuple) or len(got) != 2 or got[1] != n:
                raise _Mismatch(f"{kind}({n}) returned {got!r}")
            if not (self.settings.kill_rate or self.settings.restart) and got[0] != n + 1:
                raise _Mismatch(f"{kind}({n}): the log holds {got[0]} entries, not {n + 1}")
        elif kind == "bytes":
            data = self._big(n, param)
            digest = hashlib.sha256(data).hexdigest()
            got = await dev.echo_bytes(n, data)
            if not isinstance(got, tuple) or len(got) != 2:
                raise _Mismatch(f"echo_bytes({n}) returned a {type(got).__name__}")
            if got[0] != digest:
                raise _Mismatch(f"echo_bytes({n}): the daemon received other bytes")
            if len(got[1]) != len(data) or hashlib.sha256(got[1]).hexdigest() != digest:
                raise _Mismatch(f"echo_bytes({n}): other bytes came back ({len(got[1])} bytes)")
        else:
            stream = dev.stream(n, param) if kind == "stream" else dev.astream(n, param)
            async with stream as items:
                got = [item async for item in items]
            expected = [(n, i) for i in range(param)]
            try:
                repeated = len(got) - len(set(got))
            except TypeError:  # unhashable items: wrong anyway, the next test says how
                repeated = 0
            if repeated:
                raise _Mismatch(f"duplicate items: {kind}({n}, {param}) repeated {repeated}")
            if got != expected:
                raise _Mismatch(f"{kind}({n}, {param}): {_stream_diff(got, expected)}")

    def result(self) -> dict[str, Any]:
        return {
            "client": self.cid,
            "outcome": self.outcome,
            "latency": self.latency,
            "sessions": self.sessions,
            "reconnects": self.reconnects,
            "kills": self.kills,
            "killed": self.killed,
            "started": self.started,
            "ended": self.ended,
            "connection": self.connection,
            "spanned": self.spanned,
            "setup_errors": self.setup_errors,
            "error_examples": self.error_examples,
            "seen": list(self.dev.seen),
            "slow": self.slow,
        }


def _error_name(exc: BaseException) -> str:
    """The type of an error, with the remote type of a ``RemoteException``."""
    name = type(exc).__name__
    remote = getattr(exc, "remote_type", None)
    if isinstance(exc, RemoteException) and remote and not name.endswith(remote):
        name += f"[{remote}]"
    return name


def _stream_diff(got: list[Any], expected: list[Any]) -> str:
    if len(got) != len(expected):
        return f"{len(got)} items, expected {len(expected)}"
    index = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    return f"item {index} is {got[index]!r}, expected {expected[index]!r}"


async def abort_connection(executor: WebSocketExecutor, how: str) -> None:
    """Drop ``executor``'s connection without a close frame.

    "rst": SO_LINGER 0 then close (the daemon sees a TCP reset, as if the
    client process had died); "shutdown": shut the socket down both ways (the
    daemon sees a bare FIN mid-conversation, the client's reader sees EOF).
    Uses the executor's transport (``_websocket``, the one semi-public way in).
    """
    websocket = executor._websocket
    if websocket is None:
        return
    raw: socket.socket = websocket._stream.extra(SocketAttribute.raw_socket)
    try:
        if how == "rst":
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await websocket._abort("aborted by the load check (TCP reset)")
        else:
            raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


class _SlowStream(ByteStream):
    """A client's byte stream that reads at most ``rate`` bytes a second."""

    def __init__(self, inner: ByteStream, rate: float) -> None:
        self._inner = inner
        self._rate = rate
        self._free_at = 0.0  # when the next read may start

    async def receive(self, max_bytes: int = 65536) -> bytes:
        # The wait comes before the read: a cancelled reader loses nothing.
        now = anyio.current_time()
        if self._free_at > now:
            await anyio.sleep(self._free_at - now)
        chunk = await self._inner.receive(min(max_bytes, 16384))
        self._free_at = max(self._free_at, anyio.current_time()) + len(chunk) / self._rate
        return chunk

    async def send(self, item: bytes) -> None:
        await self._inner.send(item)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self._inner.extra_attributes


def read_slowly(executor: WebSocketExecutor, rate: float) -> None:
    """Make ``executor`` read what the daemon sends at ``rate`` bytes a second, through
    a small socket buffer (``_websocket._stream``, as ``abort_connection`` uses it)."""
    websocket = executor._websocket
    if websocket is None:
        return
    raw: socket.socket = websocket._stream.extra(SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
    websocket._stream = _SlowStream(websocket._stream, rate)


@dataclass
class NonReader:
    """``--slow``: a client that sends echo calls of 64 KiB and never reads a reply.

    Its calls go to an instance of its own (``load-non-reader``), over a plain
    websocket (``websockets``' sans-I/O protocol); once the daemon stops
    reading from it, its sends wait. It runs until cancelled, reconnecting if
    the daemon drops it, and leaves with a TCP reset (unread data).
    """

    url: str
    sent: int = 0
    sessions: int = 0
    dropped: int = 0
    longest_wait: float = 0.0  # the longest a single send waited for the daemon
    sent_when_held: int | None = None  # calls sent when a send first waited 1 s
    errors: list[str] = field(default_factory=list)
    sending_since: float | None = None  # when the send under way began

    NAME = "load-non-reader"

    async def run(self) -> None:
        async with WebSocketExecutor(self.url) as executor:
            await executor.ensure_remote_instance(_device_class()(-1), self.NAME, -1)
        try:
            while True:
                try:
                    await self._session()
                except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                    self._waited()
                    self.dropped += 1
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    await anyio.sleep(0.1)
        finally:  # cancelled at the end of the load, its last send still waiting
            self._waited()

    async def _session(self) -> None:
        uri = parse_uri(self.url)
        protocol = ClientProtocol(uri, max_size=None)
        protocol.send_request(protocol.connect())
        async with await anyio.connect_tcp(uri.host, uri.port) as stream:
            for data in protocol.data_to_send():
                await stream.send(data)
            while protocol.state is CONNECTING:  # the handshake's answer: read; nothing after
                protocol.receive_data(await stream.receive())
            if protocol.state is not OPEN:
                raise OSError(f"handshake refused: {protocol.handshake_exc}")
            self.sessions += 1
            rpc = RpcConnection(Side.CLIENT)
            payload = bytes(NON_READER_PAYLOAD)
            while True:
                rpc.send_call(self.NAME, "echo", [self.sent, payload])
                protocol.send_binary(
                    b"".join(piece for frame in rpc.data_to_send() for piece in frame)
                )
                self.sending_since = time.perf_counter()
                for data in protocol.data_to_send():
                    await stream.send(data)
                self._waited()
                self.sent += 1

    def _waited(self) -> None:
        """Count the wait of the send under way, if any (the last one may never end)."""
        if self.sending_since is None:
            return
        waited = time.perf_counter() - self.sending_since
        self.sending_since = None
        self.longest_wait = max(self.longest_wait, waited)
        if waited >= 1.0 and self.sent_when_held is None:
            self.sent_when_held = self.sent

    def result(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "sent_mib": self.sent * NON_READER_PAYLOAD / MIB,
            "sessions": self.sessions,
            "dropped": self.dropped,
            "longest_wait_s": self.longest_wait,
            "sent_when_held": self.sent_when_held,
            "errors": self.errors,
        }


async def delete_non_reader(url: str) -> None:
    async with WebSocketExecutor(url) as executor:
        dev: Any = _device_class()(-1)
        await executor.ensure_remote_instance(dev, NonReader.NAME, -1)
        await executor.delete_remote_instance(dev)


async def run_clients(
    settings: Settings,
    client_ids: Iterable[int],
    report: Callable[[Progress], None] | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the clients to the end; their outcomes, JSON-ready. ``progress``: the
    counters to update (read by the ``--restart`` thread), a new one by default."""
    pool = random.Random(f"{settings.seed}:pool").randbytes(2 * MIB)
    progress = Progress() if progress is None else progress
    clients = [Client(cid, settings, pool, progress) for cid in client_ids]
    cpu = time.process_time()
    start = time.perf_counter()
    # The deadline stops clients stuck outside a call (connecting, closing):
    # their remaining calls stay unattempted, which fails the check.
    with anyio.move_on_after(settings.deadline) as deadline:
        async with anyio.create_task_group() as tg:
            if report is not None:
                tg.start_soon(_report_loop, progress, report)
            async with anyio.create_task_group() as inner:
                for client in clients:
                    inner.start_soon(client.run)
            tg.cancel_scope.cancel()
    return {
        "timed_out": deadline.cancelled_caught,
        "elapsed": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "clients": [client.result() for client in clients],
    }


async def _report_loop(progress: Progress, report: Callable[[Progress], None]) -> None:
    while True:
        await anyio.sleep(PROGRESS_EVERY)
        report(progress)


async def read_back(url: str, client_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Every client's instance state, read over a fresh connection; then deleted."""
    device = _device_class()
    states: dict[int, dict[str, Any]] = {}
    async with WebSocketExecutor(url) as executor:
        for cid in client_ids:
            dev: Any = device(cid)
            created = await executor.ensure_remote_instance(dev, f"load-{cid}", cid)
            state = await dev.state()
            state["missing"] = created  # it should have been there already
            states[cid] = state
            await executor.delete_remote_instance(dev)
    return states


# -- the daemon ---------------------------------------------------------------------------


class Daemon(DaemonProcess):
    """The daemon under load, its memory sampled every 0.2 s."""

    def __init__(self, backend: str, max_connections: int, extra: Iterable[str] = ()) -> None:
        super().__init__(
            "--no-auth",
            "--allow-module",
            "benchmarks.*",
            "--backend",
            backend,
            "--max-connections",
            str(max_connections),
            "--log-level",
            "WARNING",
            *extra,
            cwd=ROOT,
            start=False,
        )
        self.samples: list[tuple[float, int]] = []  # (seconds since start, VmRSS bytes)
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self._t0 = 0.0
        self.died_at: float | None = None  # seconds after start, if it died on its own

    @property
    def t0(self) -> float:
        """When it started serving (``time.perf_counter()``): sample times count from it."""
        return self._t0

    def start(self, timeout: float = 30.0) -> str:
        url = super().start(timeout)
        self._t0 = time.perf_counter()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return url

    def _sample(self) -> None:
        while not self._stop_sampling.wait(0.2):
            rss = self.status("VmRSS")
            if rss is None or not self.alive():
                if not self._stop_sampling.is_set():  # not stopped on purpose (--restart)
                    self.died_at = time.perf_counter() - self._t0
                return
            self.samples.append((time.perf_counter() - self._t0, rss))

    def status(self, key: str) -> int | None:
        """A ``/proc/<pid>/status`` field (memory in bytes); None once it is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+)( kB)?$", text, re.MULTILINE)
        if match is None:
            return None
        return int(match.group(1)) * (1024 if match.group(2) else 1)

    def statistics(self) -> dict[str, Any] | None:
        """The dispatcher's statistics, from ``GET /instances`` (None if it does not answer)."""
        address = self.url.replace("ws://", "http://", 1) + "/instances"
        try:
            with urllib.request.urlopen(address, timeout=5) as response:
                body: dict[str, Any] = json.load(response)
        except (OSError, ValueError):
            return None
        statistics: dict[str, Any] = body.get("statistics", {})
        return statistics

    def wait_statistics(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any] | None:
        """Poll ``/instances`` until ``done(statistics)`` or ``timeout``; the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            statistics = self.statistics()
            if statistics is None or done(statistics) or time.monotonic() > deadline:
                return statistics
            time.sleep(0.1)

    def wait_threads(self, target: int | None, timeout: float = 10.0) -> int | None:
        """The daemon's thread count, once back to ``target`` or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            threads = self.status("Threads")
            if threads is None or target is None or threads <= target:
                return threads
            if time.monotonic() > deadline:
                return threads
            time.sleep(0.1)

    def cpu_seconds(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def shutdown(self, timeout: float = 20.0) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds it took), code None if it had to be killed."""
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join()  # before the signal: its exit is not a death
        start = time.perf_counter()
        code = super().stop(timeout)
        return (None if self.killed else code), time.perf_counter() - start

    def kill(self) -> None:
        self._stop_sampling.set()
        super().kill()


# -- --restart: the daemon restarted mid-run --------------------------------------------------


@dataclass
class Lifetime:
    """One daemon process of a ``--restart`` run, from serving to its end."""

    daemon: Daemon
    served: float  # time.time() when it served (its first line)
    rss_start: int | None
    threads_start: int | None
    ended_by: str | None = None  # "SIGKILL" or "SIGTERM"; None: the last one
    stopped: float = 0.0  # time.time() when it was signalled (0: never)
    calls_done: int | None = None  # calls ended (client side) when it was signalled
    vm_hwm: int | None = None  # read just before the signal
    exit_code: int | None = None
    stop_seconds: float | None = None  # from the signal to its exit
    log: str = ""

    def result(self) -> dict[str, Any]:
        daemon = self.daemon
        return {
            "pid": daemon.pid,
            "url": daemon.url,
            "served": self.served,
            "ended_by": self.ended_by,
            "stopped": self.stopped,
            "calls_done": self.calls_done,
            "rss_start": self.rss_start,
            "vm_hwm": self.vm_hwm,
            "rss_peak_sampled": max((rss for _, rss in daemon.samples), default=None),
            "threads_start": self.threads_start,
            "exit_code": self.exit_code,
            "stop_seconds": self.stop_seconds,
            "died_at": daemon.died_at,
            "log_tracebacks": self.log.count("Traceback"),
            "exceptions": _exceptions(self.log),
        }


class Restarter:
    """``--restart``: a thread that restarts the daemon when the load reaches
    1/(K+1), 2/(K+1)... of its calls, alternately with SIGKILL and SIGTERM, each
    time on the same port (the new daemon gets ``--port <port>``, SO_REUSEADDR)."""

    def __init__(
        self,
        first: Daemon,
        make: Callable[[list[str]], Daemon],
        restarts: int,
        total: int,
        done: Callable[[], int],
    ) -> None:
        self.lifetimes = [
            Lifetime(first, time.time(), first.status("VmRSS"), first.status("Threads"))
        ]
        self._make = make
        self.at = [math.ceil(total * (i + 1) / (restarts + 1)) for i in range(restarts)]
        self._done = done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="restarter", daemon=True)
        self.errors: list[str] = []

    @property
    def current(self) -> Daemon:
        return self.lifetimes[-1].daemon

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more restarts; waits for one under way to finish."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join()

    def _run(self) -> None:
        for index, threshold in enumerate(self.at):
            while self._done() < threshold:
                if self._stop.wait(0.005):
                    return
            try:
                self._restart("SIGKILL" if index % 2 == 0 else "SIGTERM")
            except Exception as exc:  # noqa: BLE001 - a failed check
                self.errors.append(f"restart {index + 1}: {type(exc).__name__}: {exc}")
                return

    def _restart(self, how: str) -> None:
        old = self.lifetimes[-1]
        daemon = old.daemon
        old.ended_by = how
        old.calls_done = self._done()
        old.vm_hwm = daemon.status("VmHWM")
        old.stopped = time.time()
        began = time.perf_counter()
        if how == "SIGKILL":
            daemon.kill()
            old.exit_code = daemon.proc.returncode if daemon.proc is not None else None
            old.stop_seconds = time.perf_counter() - began
        else:
            old.exit_code, old.stop_seconds = daemon.shutdown()
        old.log = daemon.log()
        new = self._make(["--port", str(daemon.port)])
        try:
            for attempt in range(3):  # the port is free once the old process is gone
                try:
                    new.start()
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
                    time.sleep(0.5)
            if new.url != daemon.url:
                raise RuntimeError(f"the new daemon serves on {new.url}, not {daemon.url}")
        except BaseException:
            new.close()
            raise
        self.lifetimes.append(
            Lifetime(new, time.time(), new.status("VmRSS"), new.status("Threads"))
        )


def read_records(
    record_dir: str, client_ids: Iterable[int], pids: list[int]
) -> dict[int, dict[str, Any]]:
    """``--restart``: each client's record file, as ``read_back`` gives a state,
    plus ``inits`` (the pid of each daemon that created the instance, in order),
    ``lifetime`` (which of ``pids`` ran each entry of ``log``) and ``bad_lines``."""
    states: dict[int, dict[str, Any]] = {}
    for cid in client_ids:
        log: list[Any] = []
        times: list[float] = []
        lifetime: list[int] = []
        inits: list[int] = []
        overlaps = bad_lines = 0
        path = Path(record_path(record_dir, cid))
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        for line in text.splitlines():
            words = line.split()
            try:
                if words[0] == "init":
                    inits.append(int(words[1]))
                elif words[0] == "overlap":
                    overlaps += 1
                else:
                    n, started = int(words[0]), float(words[1])
                    log.append(n)
                    times.append(started)
                    lifetime.append(pids.index(inits[-1]) if inits[-1] in pids else -1)
            except (IndexError, ValueError):
                bad_lines += 1  # torn or before any "init": counted as never called
                log.append(line)
                times.append(0.0)
                lifetime.append(-1)
        states[cid] = {
            "client": cid,
            "log": log,
            "times": times,
            "overlaps": overlaps,
            "missing": not inits,
            "inits": inits,
            "lifetime": lifetime,
            "bad_lines": bad_lines,
        }
    return states


async def read_back_restart(
    url: str, client_ids: Iterable[int], record_dir: str
) -> dict[int, dict[str, Any]]:
    """``--restart``: the state of each instance the last daemon has (the ones
    re-created after the last restart; nothing is created here); then deleted."""
    device = _device_class()
    states: dict[int, dict[str, Any]] = {}
    async with WebSocketExecutor(url) as executor:
        names = set(await executor.get_remote_objects())
        for cid in client_ids:
            name = f"load-{cid}"
            if name not in names:
                continue
            dev: Any = device(cid)
            created = await executor.ensure_remote_instance(
                dev, name, cid, record_path(record_dir, cid)
            )
            state = await dev.state()
            state["created"] = created  # it was listed: it must not be created now
            states[cid] = state
            await executor.delete_remote_instance(dev)
    return states


def restart_report(
    args: argparse.Namespace,
    load: dict[str, Any],
    records: dict[int, dict[str, Any]],
    final: dict[int, dict[str, Any]],
    restarter: Restarter,
) -> dict[str, Any]:
    """``--restart``: what the restarts did to the clients; its checks."""
    lifetimes = restarter.lifetimes
    pids = [lifetime.daemon.pid for lifetime in lifetimes]
    served = [lifetime.served for lifetime in lifetimes]
    restarts = len(lifetimes) - 1
    reconnects = [client["reconnects"] for client in load["clients"]]
    kills = [len(client["kills"]) for client in load["clients"]]
    sessions = [client["sessions"] for client in load["clients"]]
    examples: list[str] = []

    def example(text: str) -> None:
        if len(examples) < 10:
            examples.append(text)

    # A success made after lifetime i served ran there or later: its client
    # reconnected at least once per such lifetime.
    wrong_reconnects = 0
    waited: list[float] = []  # successes made before a restart's daemon served, run by it
    # After each restart: when each client's first success on the new daemon
    # ended (the old one has exited before the new one starts).
    back_after: list[list[float]] = [[] for _ in lifetimes]
    for client, count, killed in zip(load["clients"], reconnects, kills, strict=True):
        ok = [n for n, o in enumerate(client["outcome"]) if o == "ok"]
        needed = sum(1 for t in served[1:] if any(client["started"][n] > t for n in ok))
        if not needed <= count <= restarts + killed:
            wrong_reconnects += 1
            example(
                f"client {client['client']}: {count} reconnects for {needed} restarts "
                f"it rode through ({restarts} restarts, {killed} connections killed)"
            )
        for index, t in enumerate(served[1:], 1):
            waited.extend(
                client["latency"][n] for n in ok if client["started"][n] < t < client["ended"][n]
            )
            after = [client["ended"][n] for n in ok if client["ended"][n] > t]
            if after:
                back_after[index].append(min(after) - t)
    recreated_wrong = 0
    ran_per_lifetime = [0] * len(lifetimes)
    disagree = 0
    for cid, state in records.items():
        inits = state["inits"]
        if (
            len(set(inits)) != len(inits)
            or any(pid not in pids for pid in inits)
            or (inits and inits[0] != pids[0])
            or [pids.index(pid) for pid in inits] != sorted(pids.index(pid) for pid in inits)
        ):
            recreated_wrong += 1
            example(f"client {cid}: its instance was created by the daemons {inits} ({pids})")
        for index in state["lifetime"]:
            if index >= 0:
                ran_per_lifetime[index] += 1
        in_last = [
            n
            for n, index in zip(state["log"], state["lifetime"], strict=True)
            if index == len(lifetimes) - 1
        ]
        there = final.get(cid)
        if there is None:
            agree = pids[-1] not in inits
        else:
            agree = not there["created"] and pids[-1] in inits and there["log"] == in_last
        if not agree:
            disagree += 1
            example(
                f"client {cid}: the last daemon {'has' if there else 'lacks'} its instance "
                f"({len(there['log']) if there else 0} calls logged), its record file "
                f"{len(in_last)} calls there (created by {inits})"
            )
    sigterm = [lt for lt in lifetimes[:-1] if lt.ended_by == "SIGTERM"]
    tracebacks = sum(lt.log.count("Traceback") for lt in lifetimes[:-1])
    checks = [
        (
            f"the daemon was restarted {args.restarts} times on the same port",
            restarts == args.restarts and not restarter.errors,
            f"{restarts} restarts; {restarter.errors}",
        ),
        (
            "one executor per client for the whole run",
            all(count == 1 for count in sessions),
            f"executors per client {sessions}",
        ),
        (
            "each client reconnected once per restart it rode through, and only then",
            wrong_reconnects == 0,
            f"{wrong_reconnects} clients; reconnects per client {reconnects}",
        ),
        (
            "instances created at most once per daemon, by the reconnect after a restart",
            recreated_wrong == 0,
            str(recreated_wrong),
        ),
        (
            "the record files agree with the last daemon's logs",
            disagree == 0,
            f"{disagree} clients; {len(final)} instances on the last daemon",
        ),
        (
            "every daemon stopped with SIGTERM exited 0",
            all(lt.exit_code == 0 for lt in sigterm),
            str([lt.exit_code for lt in sigterm]),
        ),
        (
            "no daemon before the last logged a traceback",
            tracebacks == 0,
            str([_exceptions(lt.log) for lt in lifetimes[:-1]]),
        ),
        (
            "no torn or stray line in the record files",
            sum(state["bad_lines"] for state in records.values()) == 0,
            str(sum(state["bad_lines"] for state in records.values())),
        ),
    ]
    return {
        "restarts": restarts,
        "at_calls": restarter.at,
        "errors": restarter.errors,
        "reconnects": reconnects,
        "lifetimes": [lt.result() for lt in lifetimes],
        "ran_per_lifetime": ran_per_lifetime,
        "down_s": [lifetimes[i + 1].served - lt.stopped for i, lt in enumerate(lifetimes[:-1])],
        "back_after_s": [max(values) if values else None for values in back_after[1:]],
        "waited": {
            "calls": len(waited),
            "p50_ms": (_percentile(waited, 0.5) or 0) * 1e3,
            "max_ms": max(waited, default=0) * 1e3,
        },
        "instances_on_last_daemon": len(final),
        "examples": examples,
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
    }


# -- one backend, start to end --------------------------------------------------------------


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f} MiB"


class Printer:
    def __init__(self, backend: str, args: argparse.Namespace) -> None:
        flags = [f"--{name}" for name in ("restart", "kill", "slow") if getattr(args, name)]
        self.prefix = f"[{' '.join([backend, *flags])}]"

    def __call__(self, text: str = "") -> None:
        print(f"{self.prefix} {text}" if text else "", flush=True)


def _slow_clients(args: argparse.Namespace) -> list[int]:
    """With ``--slow``: the clients that read slowly (spread over the client ids)."""
    if not args.slow:
        return []
    count = args.slow_readers if args.slow_readers is not None else max(1, args.clients // 4)
    count = min(count, args.clients)
    return sorted({round(i * args.clients / count) for i in range(count)}) if count else []


def run_backend(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    mode = "restart" if args.restart else "kill" if args.kill else "normal"
    say = Printer(backend, args)
    total = args.clients * args.calls
    extra = [*SLOW_DAEMON_ARGS, *args.daemon_arg] if args.slow else args.daemon_arg
    if args.restart:
        extra = [*RESTART_DAEMON_ARGS, *args.daemon_arg]  # a --daemon-arg=--grace=S wins
    max_connections = max(64, args.clients + 8)
    daemon = Daemon(backend, max_connections, extra)
    restarter: Restarter | None = None
    record_dir = tempfile.mkdtemp(prefix="load-check-") if args.restart else ""
    try:
        url = daemon.start()
        rss_start = daemon.status("VmRSS")
        threads_start = daemon.status("Threads")
        say(f"daemon {url} (pid {daemon.pid}, RSS {_mib(rss_start)})")
        progress = Progress()
        if args.restart:
            restarter = Restarter(
                daemon,
                lambda port: Daemon(backend, max_connections, [*extra, *port]),
                args.restarts,
                total,
                lambda: progress.done,
            )
            say(
                f"--restart: the daemon restarted at {restarter.at} calls done, alternately "
                f"with SIGKILL and SIGTERM, on port {daemon.port}; daemon: "
                f"{' '.join(extra)}; instances record to {record_dir}"
            )
        slow_clients = _slow_clients(args)
        say(
            f"{args.clients} clients x {args.calls} calls, {args.in_flight} in flight per "
            f"client, seed {args.seed}, procs {args.procs}, kill rate "
            f"{args.kill_rate if args.kill else 0}"
        )
        if args.slow:
            say(
                f"--slow: clients {slow_clients} read at {format_size(int(args.slow_rate))}/s; "
                "one more client never reads; daemon: "
                + " ".join(SLOW_DAEMON_ARGS + tuple(args.daemon_arg))
            )
        settings = Settings(
            url=url,
            backend=backend,
            calls=args.calls,
            seed=args.seed,
            items=args.items,
            in_flight=args.in_flight,
            kill_rate=args.kill_rate if args.kill else 0.0,
            call_timeout=args.call_timeout,
            deadline=args.deadline,
            slow_clients=slow_clients,
            slow_rate=args.slow_rate,
            restart=args.restart,
            record_dir=record_dir,
        )
        non_reader = NonReader(url) if args.slow else None
        started = time.perf_counter()

        def report(done: int, errors: int) -> None:
            elapsed = time.perf_counter() - started
            flood = "" if non_reader is None else f"  non-reader sent {non_reader.sent}"
            current = daemon if restarter is None else restarter.current
            restarts = "" if restarter is None else f"  restarts {len(restarter.lifetimes) - 1}"
            say(
                f"{elapsed:6.1f} s  {done:6d}/{total} calls  {done / elapsed:7.0f} calls/s  "
                f"errors {errors}  daemon RSS {_mib(current.samples[-1][1] if current.samples else None)}"
                f"{flood}{restarts}"
            )

        with contextlib.ExitStack() as stack:
            if non_reader is not None:
                # On its own event loop, in a thread, whatever --procs says.
                portal = stack.enter_context(anyio.from_thread.start_blocking_portal(backend))
                flooding = portal.start_task_soon(non_reader.run)
                stack.callback(flooding.cancel)  # first thing on the way out
            if restarter is not None:
                restarter.start()
                stack.callback(restarter.stop)  # no restart after the load
            if args.procs <= 1:
                load = anyio.run(
                    run_clients,
                    settings,
                    range(args.clients),
                    lambda p: report(p.done, p.errors),
                    progress,
                    backend=backend,
                )
            else:
                load = _run_children(args, settings, report)
        if restarter is not None:  # the checks below are on the last daemon
            daemon = restarter.current
            rss_start = restarter.lifetimes[-1].rss_start
            threads_start = restarter.lifetimes[-1].threads_start
            url = daemon.url
        load_window = (started - daemon.t0, started - daemon.t0 + load["elapsed"])
        report_done = sum(1 for c in load["clients"] for o in c["outcome"] if o is not None)
        say(f"load done in {load['elapsed']:.1f} s ({report_done} calls); reading the logs back")
        rss_after = daemon.status("VmRSS")
        daemon_cpu = daemon.cpu_seconds()
        alive_after_load = daemon.alive()
        threads_loaded = daemon.status("Threads")
        # Every client has gone: the daemon should let go of every connection.
        settled = daemon.wait_statistics(
            lambda st: st["connections"] == 0 and not st["calls_in_flight"] and not st["queued"]
        )
        states: dict[int, dict[str, Any]] = {}
        last_states: dict[int, dict[str, Any]] = {}  # --restart: the last daemon's instances
        read_back_error = None
        try:
            if restarter is not None:
                last_states = anyio.run(
                    read_back_restart, url, range(args.clients), record_dir, backend=backend
                )
            else:
                states = anyio.run(read_back, url, range(args.clients), backend=backend)
            if non_reader is not None:
                anyio.run(delete_non_reader, url, backend=backend)
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            read_back_error = f"{type(exc).__name__}: {exc}"
        if restarter is not None:
            # --restart: what ran is in the record files, across every daemon.
            pids = [lifetime.daemon.pid for lifetime in restarter.lifetimes]
            states = read_records(record_dir, range(args.clients), pids)
        # ... and once the instances are deleted, of their worker threads (one
        # each; --restart: only the instances the last daemon had).
        deleted = args.clients if restarter is None else len(last_states)
        emptied = daemon.wait_statistics(lambda st: st["instances"] == 0 and st["connections"] == 0)
        threads_end = daemon.wait_threads(
            None if threads_loaded is None else threads_loaded - deleted
        )
        hwm = daemon.status("VmHWM")
        rss_end = daemon.status("VmRSS")
        exit_code, stop_seconds = daemon.shutdown()
        log = daemon.log()
        if restarter is not None:
            restarter.lifetimes[-1].vm_hwm = hwm
            restarter.lifetimes[-1].exit_code = exit_code
            restarter.lifetimes[-1].stop_seconds = stop_seconds
            restarter.lifetimes[-1].log = log
        if args.daemon_log is not None:
            suffix = f"{mode}{'-kill' if args.kill and args.restart else ''}"
            suffix += "-slow" if args.slow else ""
            logs = [log] if restarter is None else [lt.log for lt in restarter.lifetimes]
            for index, text in enumerate(logs):
                number = "" if restarter is None else f".{index}"
                path = args.daemon_log.with_name(
                    f"{args.daemon_log.name}.{backend}.{suffix}{number}"
                )
                path.write_text(text)
                say(f"daemon stderr written to {path}")
        result = analyse(args, backend, mode, load, states)
        result["checks"] += [
            {"name": "load finished before --deadline", "ok": not load["timed_out"], "detail": ""},
            {"name": "logs read back", "ok": read_back_error is None, "detail": read_back_error},
        ]
        if restarter is not None:
            result["restart"] = restart_report(args, load, states, last_states, restarter)
            result["checks"] += result["restart"]["checks"]
        result["daemon"] = {
            "rss_start": rss_start,
            "rss_peak_sampled": max((rss for _, rss in daemon.samples), default=None),
            "rss_after_load": rss_after,
            "vm_hwm": hwm,
            "rss_end": rss_end,
            "cpu_seconds": daemon_cpu,
            "samples": [(round(t, 2), rss) for t, rss in daemon.samples],
            "alive_after_load": alive_after_load,
            "after_load": settled,
            "after_delete": emptied,
            "threads_start": threads_start,
            "threads_after_load": threads_loaded,
            "threads_end": threads_end,
            "instances_deleted": deleted,
            "exit_code": exit_code,
            "stop_seconds": stop_seconds,
            "died_at": daemon.died_at,
            "exceptions": _exceptions(log),
            "log_tracebacks": log.count("Traceback"),
            "log_errors": sum(1 for line in log.splitlines() if " ERROR " in line),
            "log_warnings": sum(1 for line in log.splitlines() if " WARNING " in line),
            # --restart: no daemon sees the whole load.
            "flat": None if restarter is not None else flat_memory(daemon.samples, *load_window),
        }
        if args.slow:
            assert non_reader is not None
            result["slow"] = slow_report(args, load, log, non_reader)
        add_daemon_checks(result)
        print_report(say, result)
        return result
    finally:
        daemon.close()
        if restarter is not None:
            restarter.stop()
            for lifetime in restarter.lifetimes:
                lifetime.daemon.close()
        if record_dir:
            shutil.rmtree(record_dir, ignore_errors=True)


def _run_children(
    args: argparse.Namespace, settings: Settings, report: Callable[[int, int], None]
) -> dict[str, Any]:
    """The clients spread over ``--procs`` child processes (this script, ``--child``)."""
    groups = [list(range(args.clients))[i :: args.procs] for i in range(args.procs)]
    procs = []
    for group in groups:
        spec = {"settings": settings.__dict__, "clients": group}
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
        )
    progress = [(0, 0)] * len(procs)
    results: list[dict[str, Any] | None] = [None] * len(procs)

    def pump(index: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            if "progress" in message:
                progress[index] = tuple(message["progress"])
            elif "result" in message:
                results[index] = message["result"]

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(PROGRESS_EVERY / len(threads))
            report(sum(p[0] for p in progress), sum(p[1] for p in progress))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if any(r is None for r in results):
        raise RuntimeError("a client process died without a result")
    merged: list[dict[str, Any]] = []
    for r in results:
        assert r is not None
        merged.extend(r["clients"])
    merged.sort(key=lambda c: c["client"])
    return {
        "timed_out": any(r["timed_out"] for r in results if r is not None),
        "elapsed": time.perf_counter() - start,
        "cpu": sum(r["cpu"] for r in results if r is not None),
        "clients": merged,
    }


def child_main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    settings = Settings(**spec["settings"])

    def report(progress: Progress) -> None:
        print(json.dumps({"progress": [progress.done, progress.errors]}), flush=True)

    result = anyio.run(run_clients, settings, spec["clients"], report, backend=settings.backend)
    print(json.dumps({"result": result}), flush=True)
    return 0


# -- analysis and report ------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class _LogCheck:
    entries: int = 0
    duplicates: int = 0
    unknown: int = 0
    missing: int = 0  # successes not in the log
    out_of_order: int = 0  # successes not in call order
    out_of_order_spanned: int = 0  # ... both made before a reconnect, and run after it
    failed_ran: int = 0  # failed calls that ran anyway (reply lost): allowed, once
    failed_never_ran: int = 0
    failed_ran_late: int = 0  # ... after a later call had started
    overlaps: int = 0
    missing_instances: int = 0
    exact_mismatch: int = 0  # normal mode: logs that are not exactly 0..M-1
    callback_mismatch: int = 0
    examples: list[str] = field(default_factory=list)

    def example(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)


def check_logs(
    load: dict[str, Any], states: dict[int, dict[str, Any]], calls: int, mode: str
) -> _LogCheck:
    check = _LogCheck()
    if not states:
        check.missing_instances = len(load["clients"])
        check.example("no instance could be read back")
        return check
    for client in load["clients"]:
        cid = client["client"]
        outcome = client["outcome"]
        state = states.get(cid)
        if state is None or state["missing"] or state["client"] != cid:
            check.missing_instances += 1
            check.example(f"client {cid}: its instance is gone or wrong: {state!r:.200}")
            continue
        log: list[int] = state["log"]
        check.entries += len(log)
        check.overlaps += state["overlaps"]
        counts = Counter(log)
        for n, count in counts.items():
            if count > 1:
                check.duplicates += count - 1
                check.example(f"client {cid}: call {n} ran {count} times")
            if not (isinstance(n, int) and 0 <= n < calls and outcome[n] is not None):
                check.unknown += 1
                check.example(f"client {cid}: the log holds {n!r}, never called")
        ok = [n for n in range(calls) if outcome[n] == "ok"]
        check.missing += sum(1 for n in ok if n not in counts)
        for n in ok:
            if n not in counts:
                check.example(f"client {cid}: call {n} succeeded but never ran")
        successes = [n for n in log if isinstance(n, int) and 0 <= n < calls and outcome[n] == "ok"]
        for a, b in itertools.pairwise(successes):
            if b <= a:
                check.out_of_order += 1
                both = client["spanned"][a] and client["spanned"][b]
                check.out_of_order_spanned += both
                made = " (both made before a reconnect, run after it)" if both else ""
                check.example(f"client {cid}: call {b} ran after call {a}{made}")
        check.failed_never_ran += sum(
            1 for n in range(calls) if outcome[n] not in ("ok", None) and n not in counts
        )
        highest = -1
        for n, started in zip(log, state["times"], strict=True):
            if not isinstance(n, int) or not 0 <= n < calls:
                continue
            if outcome[n] not in ("ok", None):
                check.failed_ran += 1
                if n < highest:
                    check.failed_ran_late += 1
                    kinds, conn = client["kinds"], client["connection"]
                    # JSON turned the session numbers into strings
                    how = client["killed"].get(conn[n], client["killed"].get(str(conn[n])))
                    how = how or "a lost connection"
                    check.example(
                        f"client {cid}: call {n} ({kinds[n]}, connection {conn[n]}, killed by "
                        f"{how}) ran {1e3 * (started - client['ended'][n]):.0f} ms after its "
                        f"caller got {outcome[n][6:]}, after call {highest} ({kinds[highest]}, "
                        f"connection {conn[highest]}) had started"
                    )
            highest = max(highest, n)
        if mode == "normal" and log != list(range(calls)):
            check.exact_mismatch += 1
            check.example(f"client {cid}: the log is not 0..{calls - 1}")
        seq_ok = [n for n in ok if client["kinds"][n] in ("seq", "aseq")]
        if client["seen"] != seq_ok:
            check.callback_mismatch += 1
            check.example(
                f"client {cid}: seq callbacks saw {len(client['seen'])} results, "
                f"expected {len(seq_ok)} in call order"
            )
    return check


def analyse(
    args: argparse.Namespace,
    backend: str,
    mode: str,
    load: dict[str, Any],
    states: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    calls, total = args.calls, args.clients * args.calls
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    counts: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    errors: Counter[str] = Counter()
    bad: list[str] = []
    for client in load["clients"]:
        plan = make_plan(args.seed, client["client"], calls, args.items)
        client["kinds"] = [kind for kind, _ in plan]
        for n, outcome in enumerate(client["outcome"]):
            kind = plan[n][0]
            if outcome is None:
                counts[kind]["unattempted"] += 1
            elif outcome == "ok":
                counts[kind]["ok"] += 1
                latencies[kind].append(client["latency"][n])
            elif outcome.startswith("error:"):
                counts[kind]["error"] += 1
                errors[outcome[6:]] += 1
            else:  # "bad:..." or "hang"
                counts[kind]["bad"] += 1
                bad.append(f"client {client['client']} call {n}: {outcome}")
    successes = sum(c["ok"] for c in counts.values())
    n_errors = sum(c["error"] for c in counts.values())
    n_bad = sum(c["bad"] for c in counts.values())
    attempted = successes + n_errors + n_bad
    unexpected = {
        name: k
        for name, k in errors.items()
        if name not in CONNECTION_ERRORS and name != REMOTE_CONNECTION_LOST
    }
    repeated_items = sum(1 for text in bad if ": bad:duplicate" in text)
    logs = check_logs(load, states, calls, mode)
    elapsed = load["elapsed"]
    kills = Counter(how for c in load["clients"] for how in c["kills"])
    per_kind = {}
    for kind in KINDS:
        p50, p99 = _percentile(latencies[kind], 0.50), _percentile(latencies[kind], 0.99)
        per_kind[kind] = {
            "calls": sum(counts[kind].values()),
            "ok": counts[kind]["ok"],
            "errors": counts[kind]["error"],
            "p50_ms": None if p50 is None else p50 * 1e3,
            "p99_ms": None if p99 is None else p99 * 1e3,
        }
    everything = [x for values in latencies.values() for x in values]
    checks: list[tuple[str, bool, str]] = [
        ("every call attempted", attempted == total, f"{attempted}/{total}"),
        (
            "successes + explicit errors == total",
            successes + n_errors == total,
            f"{successes} + {n_errors} = {successes + n_errors}, total {total}",
        ),
        ("no wrong value, no stuck call", n_bad == 0, f"{n_bad}: {bad[:5]}"),
        (
            "zero duplicates",
            logs.duplicates == 0 and repeated_items == 0,
            f"{logs.duplicates} calls ran twice, {repeated_items} streams repeated items",
        ),
        ("nothing ran that was never called", logs.unknown == 0, str(logs.unknown)),
        ("every success ran", logs.missing == 0, str(logs.missing)),
        (
            "successes ran in call order",
            logs.out_of_order == 0,
            (
                f"{logs.out_of_order}, of which {logs.out_of_order_spanned} made before a "
                "reconnect and run after it"
            ),
        ),
        ("plain calls never overlapped", logs.overlaps == 0, str(logs.overlaps)),
        (
            "callbacks once per success, in order",
            logs.callback_mismatch == 0,
            str(logs.callback_mismatch),
        ),
        (
            "every client's record file read"
            if mode == "restart"
            else "every instance still there",
            logs.missing_instances == 0,
            str(logs.missing_instances),
        ),
    ]
    if mode == "normal":
        checks += [
            ("no errors", n_errors == 0, str(dict(errors))),
            ("each log is exactly 0..M-1", logs.exact_mismatch == 0, str(logs.exact_mismatch)),
        ]
    else:
        checks += [
            ("errors are connection errors", not unexpected, str(unexpected)),
            (
                "every connection error is a ConnectionLostError (none a RemoteException)",
                REMOTE_CONNECTION_LOST not in errors,
                f"{errors.get(REMOTE_CONNECTION_LOST, 0)} calls failed with {REMOTE_CONNECTION_LOST}",
            ),
        ]
    if args.kill:
        checks.append(("connections were killed", sum(kills.values()) > 0, str(dict(kills))))
    setup_errors = [e for c in load["clients"] for e in c["setup_errors"]]
    error_examples: dict[str, str] = {}
    for client in load["clients"]:
        for name, text in client["error_examples"].items():
            error_examples.setdefault(name, f"client {client['client']}: {text}")
    return {
        "backend": backend,
        "mode": mode,
        "clients": args.clients,
        "calls_per_client": calls,
        "in_flight": args.in_flight,
        "procs": args.procs,
        "seed": args.seed,
        "total": total,
        "attempted": attempted,
        "successes": successes,
        "errors": n_errors,
        "errors_by_type": dict(errors),
        "error_examples": error_examples,
        "bad": bad[:50],
        "elapsed_s": elapsed,
        "calls_per_s": successes / elapsed if elapsed else None,
        "client_cpu_s": load["cpu"],
        "latency": per_kind,
        "latency_all": {
            "p50_ms": (_percentile(everything, 0.5) or 0) * 1e3,
            "p99_ms": (_percentile(everything, 0.99) or 0) * 1e3,
        },
        "sessions": sum(c["sessions"] for c in load["clients"]),
        "reconnects": sum(c["reconnects"] for c in load["clients"]),
        "kills": dict(kills),
        "setup_errors": setup_errors[:20],
        "duplicates": logs.duplicates + repeated_items,
        "server_logs": dict(logs.__dict__),
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
    }


def flat_memory(samples: list[tuple[float, int]], start: float, end: float) -> dict[str, Any]:
    """The daemon's RSS at half-way through the load and at its end: the
    median of the samples in 45-55 % and in 90-100 % of the load's time (the
    nearest sample if a window holds none), and how much it grew between."""

    def around(low: float, high: float) -> int | None:
        inside = sorted(rss for t, rss in samples if low <= t <= high)
        if inside:
            return inside[len(inside) // 2]
        middle = (low + high) / 2
        return min(samples, key=lambda sample: abs(sample[0] - middle))[1] if samples else None

    length = end - start
    half = around(start + 0.45 * length, start + 0.55 * length)
    last = around(start + 0.9 * length, end)
    growth = None if half is None or last is None else last - half
    return {"half": half, "end": last, "growth": growth}


def slow_report(
    args: argparse.Namespace, load: dict[str, Any], log: str, non_reader: NonReader
) -> dict[str, Any]:
    """``--slow``: who read slowly, what the daemon held back and dropped."""
    held = {line.split(">", 1)[0] for line in log.splitlines() if HELD_BACK in line}
    slow: list[float] = []
    others: list[float] = []
    for client in load["clients"]:
        ok = [lat for lat, o in zip(client["latency"], client["outcome"], strict=True) if o == "ok"]
        (slow if client["slow"] else others).extend(ok)
    return {
        "slow_readers": [c["client"] for c in load["clients"] if c["slow"]],
        "rate": args.slow_rate,
        "held_back_connections": len(held),
        "dropped_for_not_reading": log.count("is not reading its replies"),
        "latency_slow": {
            "p50_ms": (_percentile(slow, 0.5) or 0) * 1e3,
            "p99_ms": (_percentile(slow, 0.99) or 0) * 1e3,
        },
        "latency_others": {
            "p50_ms": (_percentile(others, 0.5) or 0) * 1e3,
            "p99_ms": (_percentile(others, 0.99) or 0) * 1e3,
        },
        "non_reader": non_reader.result(),
    }


def _settled(statistics: dict[str, Any] | None, *keys: str) -> bool:
    return statistics is not None and not any(statistics.get(key) for key in keys)


def add_daemon_checks(result: dict[str, Any]) -> None:
    daemon = result["daemon"]
    after_load, after_delete = daemon["after_load"], daemon["after_delete"]
    short = ("connections", "calls_in_flight", "queued", "instances", "peers")
    result["checks"] += [
        {"name": "daemon alive after the load", "ok": daemon["alive_after_load"], "detail": ""},
        {
            "name": "daemon let go of every connection and call",
            "ok": _settled(after_load, "connections", "calls_in_flight", "queued"),
            "detail": str(after_load and {k: after_load.get(k) for k in short}),
        },
        {
            # Each instance has its own worker thread. (The daemon may keep a few
            # idle anyio worker threads from importing modules: not counted.)
            "name": "deleted instances leave no instance or worker thread behind",
            # (--restart: those of the instances the last daemon had, re-created by
            # the reconnects after the last restart.)
            "ok": _settled(after_delete, "instances", "connections")
            and None not in (daemon["threads_end"], daemon["threads_after_load"])
            and daemon["threads_end"] <= daemon["threads_after_load"] - daemon["instances_deleted"],
            "detail": f"threads: {daemon['threads_start']} at start, "
            f"{daemon['threads_after_load']} after the load, {daemon['threads_end']} after "
            f"deleting {daemon['instances_deleted']} instances; "
            f"{after_delete and {k: after_delete.get(k) for k in short}}",
        },
        {
            "name": "daemon logged no traceback",
            "ok": daemon["log_tracebacks"] == 0,
            "detail": f"{daemon['log_tracebacks']} tracebacks, {daemon['log_errors']} errors",
        },
        {
            "name": "daemon exits 0 on SIGTERM",
            "ok": daemon["exit_code"] == 0,
            "detail": f"code {daemon['exit_code']} after {daemon['stop_seconds']:.1f} s",
        },
    ]
    flat = daemon["flat"]
    if flat is not None:  # None with --restart
        result["checks"].append(
            {
                "name": "daemon memory flat over the second half of the load",
                "ok": flat["growth"] is not None and flat["growth"] <= max(FLAT, flat["half"] / 10),
                "detail": f"RSS {_mib(flat['half'])} at half-way, {_mib(flat['end'])} at the end",
            }
        )
    slow = result.get("slow")
    if slow is not None:
        flood = slow["non_reader"]
        result["checks"].append(
            {
                "name": "the daemon held the non-reader back",
                "ok": flood["sent_when_held"] is not None,
                "detail": f"it sent {flood['sent']} calls ({flood['sent_mib']:.0f} MiB); its "
                f"longest send waited {flood['longest_wait_s']:.1f} s",
            }
        )
    result["passed"] = all(check["ok"] for check in result["checks"])


def _exceptions(log: str) -> list[str]:
    """The distinct exceptions in the daemon's log, each with the last frames that raised it."""
    found: list[str] = []
    frames: list[str] = []
    for raw in log.splitlines():
        line = raw.strip().lstrip("|").strip()
        frame = re.match(r'^File "(?:.*/)?([^/]+/[^/]+)", line (\d+), in (\S+)', line)
        if frame:
            frames.append(f"{frame[1]}:{frame[2]} {frame[3]}")
        elif re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*:", line):
            if "Group" not in line:
                text = f"{line} (at {' > '.join(frames[-3:])})" if frames else line
                if text not in found:
                    found.append(text)
            frames = []
    return found[:10]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_restart(say: Printer, restart: dict[str, Any]) -> None:
    """``--restart``: each daemon lifetime, the reconnects, how long clients waited."""
    lifetimes = restart["lifetimes"]
    for index, lt in enumerate(lifetimes):
        if lt["ended_by"] is None:
            end = "the last one"
        else:
            end = (
                f"{lt['ended_by']} at {lt['calls_done']} calls done, exit code "
                f"{lt['exit_code']} after {lt['stop_seconds']:.1f} s; the next one served "
                f"{restart['down_s'][index]:.1f} s after the signal, every client had a "
                f"success on it within {_seconds(restart['back_after_s'][index])}"
            )
        say(
            f"daemon #{index} (pid {lt['pid']}): ran {restart['ran_per_lifetime'][index]} "
            f"calls; peak RSS (VmHWM) {_mib(lt['vm_hwm'])}, sampled peak "
            f"{_mib(lt['rss_peak_sampled'])}; {end}"
        )
    waited = restart["waited"]
    say(
        f"reconnects per client {restart['reconnects']}; {waited['calls']} successful calls "
        f"were made before a restarted daemon served (p50 {waited['p50_ms']:.0f} ms, max "
        f"{waited['max_ms']:.0f} ms); the last daemon had {restart['instances_on_last_daemon']} "
        "instances"
    )
    for example in restart["examples"]:
        say(f"  {example}")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def print_report(say: Printer, r: dict[str, Any]) -> None:
    say()
    say(
        f"{r['successes']} ok + {r['errors']} errors of {r['total']} calls in "
        f"{r['elapsed_s']:.1f} s: {r['calls_per_s']:.0f} calls/s "
        f"({r['sessions']} executors, {r['reconnects']} reconnects, client CPU "
        f"{r['client_cpu_s']:.1f} s)"
    )
    say(f"{'kind':8} {'calls':>6} {'ok':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, row in r["latency"].items():
        say(
            f"{kind:8} {row['calls']:6d} {row['ok']:6d} {row['errors']:6d} "
            f"{_ms(row['p50_ms']):>8} {_ms(row['p99_ms']):>8}"
        )
    say(
        f"{'all':8} {r['total']:6d} {r['successes']:6d} {r['errors']:6d} "
        f"{_ms(r['latency_all']['p50_ms']):>8} {_ms(r['latency_all']['p99_ms']):>8}"
    )
    if r["errors_by_type"]:
        say(f"errors by type: {r['errors_by_type']}")
        for name, text in r["error_examples"].items():
            say(f"  {name}: {text}")
    if r["kills"]:
        say(f"connections killed: {r['kills']}")
    logs = r["server_logs"]
    say(
        f"server logs: {logs['entries']} entries; duplicates {r['duplicates']} "
        f"(calls that ran twice, repeated stream items), unknown {logs['unknown']}, "
        f"successes missing {logs['missing']}, out of order {logs['out_of_order']} "
        f"({logs['out_of_order_spanned']} made before a reconnect and run after it), "
        f"overlapping calls {logs['overlaps']}"
    )
    if r["successes"] != r["total"]:
        say(
            f"failed calls: {logs['failed_never_ran']} never ran, {logs['failed_ran']} ran "
            f"once (their reply was lost; {logs['failed_ran_late']} of them after a later call)"
        )
    for example in logs["examples"]:
        say(f"  {example}")
    d = r["daemon"]
    say(
        f"daemon memory: VmHWM (peak RSS) {_mib(d['vm_hwm'])}; VmRSS {_mib(d['rss_start'])} "
        f"at start, {_mib(d['rss_peak_sampled'])} peak of {len(d['samples'])} samples, "
        f"{_mib(d['rss_after_load'])} after the load, {_mib(d['rss_end'])} at the end"
    )
    flat = d["flat"]
    if flat is not None:
        growth = "n/a" if flat["growth"] is None else f"{flat['growth'] / MIB:+.1f} MiB"
        say(
            f"daemon memory over the load: VmRSS {_mib(flat['half'])} at half-way, "
            f"{_mib(flat['end'])} at the end of the load ({growth} over the second half)"
        )
    restart = r.get("restart")
    if restart is not None:
        print_restart(say, restart)
    slow = r.get("slow")
    if slow is not None:
        flood = slow["non_reader"]
        say(
            f"slow readers {slow['slow_readers']} at {format_size(int(slow['rate']))}/s: "
            f"p50/p99 {slow['latency_slow']['p50_ms']:.1f}/{slow['latency_slow']['p99_ms']:.1f} "
            f"ms, the other clients {slow['latency_others']['p50_ms']:.1f}/"
            f"{slow['latency_others']['p99_ms']:.1f} ms"
        )
        held = flood["sent_when_held"]
        say(
            f"non-reader: sent {flood['sent']} calls of 64 KiB ({flood['sent_mib']:.0f} MiB) "
            f"on {flood['sessions']} connection(s), held back after "
            f"{'-' if held is None else held}; longest send wait {flood['longest_wait_s']:.1f} s; "
            f"dropped {flood['dropped']} time(s)"
        )
        say(
            f"daemon held back {slow['held_back_connections']} connection(s) "
            f"(stopped reading from them), dropped {slow['dropped_for_not_reading']} for "
            "reading nothing"
        )
    cpu = "n/a" if d["cpu_seconds"] is None else f"{d['cpu_seconds']:.1f} s"
    say(
        f"daemon CPU {cpu}; threads {d['threads_start']} at start, "
        f"{d['threads_after_load']} after the load, {d['threads_end']} once the instances "
        f"were deleted; {d['log_warnings']} warnings logged"
    )
    if d["died_at"] is not None:
        say(f"THE DAEMON DIED {d['died_at']:.1f} s after it started (exit code {d['exit_code']})")
    for text in d["exceptions"]:
        say(f"daemon exception: {text}")
    failed = [c for c in r["checks"] if not c["ok"]]
    if failed:
        for check in failed:
            say(f"FAILED: {check['name']} ({check['detail']})")
    else:
        say(f"all {len(r['checks'])} checks passed")
    for error in r["setup_errors"][:5]:
        say(f"  (re)connect error: {error}")


# -- main ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Load check: N clients x M verified calls against one remote-exec daemon."
    )
    parser.add_argument("--clients", type=int, default=16, help="clients (default %(default)s)")
    parser.add_argument(
        "--calls", type=int, default=2500, help="calls per client (default %(default)s)"
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio", "both"),
        default="both",
        help="the daemon's and the clients' (default %(default)s)",
    )
    parser.add_argument("--kill", action="store_true", help="abort random client connections")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="restart the daemon mid-run (SIGKILL, SIGTERM, ... on the same port); clients "
        "use one WebSocketExecutor(reconnect=True) each",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=2,
        metavar="K",
        help="with --restart: how many times, at 1/(K+1), 2/(K+1)... of the calls "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--slow",
        action="store_true",
        help="some clients read their replies slowly, and one more never reads "
        f"(the daemon gets {' '.join(SLOW_DAEMON_ARGS)})",
    )
    parser.add_argument(
        "--slow-readers",
        type=int,
        metavar="K",
        help="with --slow: how many of the clients read slowly (default: a quarter, at least 1)",
    )
    parser.add_argument(
        "--slow-rate",
        type=parse_size,
        default=4 * MIB,
        metavar="SIZE",
        help="with --slow: bytes a second a slow reader reads (default 4MiB)",
    )
    parser.add_argument("--seed", type=int, default=1, help="the call mix (default %(default)s)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument(
        "--in-flight", type=int, default=4, help="calls in flight per client (default %(default)s)"
    )
    parser.add_argument(
        "--items",
        type=int,
        default=100,
        help="generators yield 0..2*ITEMS items (default %(default)s)",
    )
    parser.add_argument(
        "--kill-rate",
        type=float,
        default=0.01,
        help="with --kill: chance per call that the client aborts its connection 0-20 ms "
        "later (default %(default)s)",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        help="client processes (default %(default)s: all in this one)",
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        default=60.0,
        help="a call stuck this long fails (default %(default)s)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="stop the load after this many seconds, failing the check (default %(default)s)",
    )
    parser.add_argument(
        "--daemon-log",
        type=Path,
        metavar="PATH",
        help="keep the daemon's stderr in PATH.<backend>.<mode>",
    )
    parser.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the daemon, e.g. --daemon-arg=--ping-interval=0 (repeatable)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def _git_revision() -> str | None:
    try:
        run = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() or None


def machine() -> dict[str, Any]:
    return {
        "git": _git_revision(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    for name in ("clients", "calls", "in_flight", "procs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.items < 0 or not 0 <= args.kill_rate <= 1:
        parser.error("--items must be >= 0 and --kill-rate between 0 and 1")
    if args.slow_rate < 1 or (args.slow_readers is not None and args.slow_readers < 0):
        parser.error("--slow-rate must be at least 1 and --slow-readers at least 0")
    if args.restart and (args.slow or args.procs > 1 or args.restarts < 1):
        parser.error("--restart needs --restarts of at least 1, and no --slow or --procs")
    args.procs = min(args.procs, args.clients)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    info = machine()
    print(
        f"load check: nproc {info['nproc']}, Python {info['python']}, "
        f"load average {info['loadavg'][0]:.2f}, git {info['git']}",
        flush=True,
    )
    results = []
    for backend in backends:
        try:
            results.append(run_backend(args, backend))
        except Exception as exc:  # noqa: BLE001 - the other backend still runs
            print(f"[{backend}] FAILED to run: {type(exc).__name__}: {exc}", flush=True)
            results.append({"backend": backend, "passed": False, "error": repr(exc)})
        print(flush=True)
    passed = all(r["passed"] for r in results)
    summary = ", ".join(f"{r['backend']} {'ok' if r['passed'] else 'FAILED'}" for r in results)
    print(f"load check {'passed' if passed else 'FAILED'}: {summary}", flush=True)
    if args.json:
        info["loadavg_after"] = os.getloadavg()
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
