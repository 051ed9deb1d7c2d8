"""``remote-exec serve``: the daemon.

::

    remote-exec serve --host 127.0.0.1 --port 8765 [--allow-module PATTERN ...]
        [--allow-import-from-main] [--path DIR ...] [--token-file F | --no-auth]
        [--certfile F --keyfile F] [--insecure] [--backend asyncio|trio]
        [--allowed-origin O ...] [--allow-host NAME ...] [--grace S] [--ping-interval S]
        [--log-level L]
        [--max-message-size SIZE] [--max-buffers N] [--max-depth N] [--max-elements N]
        [--max-calls N] [--max-queued-items N] [--max-stream-bytes SIZE] [--max-queued-events N]
        [--max-instances N]
        [--max-server-instances N] [--max-connections N] [--max-pending-connections N]
        [--max-outgoing-bytes SIZE]
        [--handshake-timeout S] [--idle-timeout S] [--create-timeout S]
        [--history PATH [--history-max-age S] [--history-max-rows N] [--history-max-size SIZE]]
    remote-exec --version

The daemon serves a status page at ``http://HOST:PORT/`` (``https://`` with
TLS): open it in a browser and paste the token (``remote_exec.server.status``).
With ``--history PATH`` finished invocations are kept in a SQLite file that
survives restarts (``remote_exec.server.history``); a path that cannot be used
is reported at start-up (exit code 2).

``python -m remote_exec.server [options]`` is the same as ``remote-exec serve [options]``.

Finding your code: the daemon imports allowed modules from its ``sys.path``,
to which it puts the current directory first (as ``python -m`` does), and each
``--path DIR`` before that. ``--allow-module 'pkg.*'`` allows the package
``pkg`` itself and everything below it.

The daemon binds its listening socket itself (so ``--port 0`` picks a free
port), hands it to hypercorn as ``fd://N``, and once it serves prints exactly
one line to stdout::

    remote-exec serving on ws://127.0.0.1:8765 (token file: /home/me/.local/state/remote-exec/token)

(``wss://`` with TLS; the token file part only when the token is in a file; the
token itself is never printed). Everything else goes to stderr via ``logging``,
starting with one line that says what it serves: its version and backend, the
directories it imports from, its allow-list and its message size cap (sizes
are shown, and accepted, as ``128MiB``, ``64KiB``, ``1GiB`` or plain bytes).

Safety: binds 127.0.0.1 unless told; a non-loopback address needs TLS
(``--certfile``/``--keyfile``) or an explicit ``--insecure`` (else exit code 2);
a token is required unless ``--no-auth``: from ``--token-file``, else
``REMOTE_EXEC_TOKEN``, else the per-user token file (created if missing); a
request's ``Host`` must be a loopback name, the bound address or an
``--allow-host`` (else HTTP 403: a DNS-rebinding page cannot reach the daemon).
What peers do before they authenticate is logged at a bounded rate.

Limits: every one is finite, has a default and a flag (``remote-exec serve
--help`` lists them; ``docs/security.md`` explains each and a test keeps that
page equal to these defaults).

SIGINT/SIGTERM: stop accepting, give in-flight calls ``--grace`` seconds, then
cancel them (their callers get an error), exit code 0. A running sync method
cannot be cancelled: the daemon waits up to 5 s more for it (the dispatcher's
close grace) before it exits anyway, so with one stuck the exit takes about
``--grace`` + 5 s. A client that does not read its replies gets ``--grace``
too, then its connection is dropped. A second signal exits at once (code 1).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.exceptions import TokenFileError
from remote_exec.invocations import InvocationStatus
from remote_exec.protocol import MIN_STREAM_BYTES, Limits
from remote_exec.runtime.auth import (
    TOKEN_ENV,
    is_loopback_host,
    load_or_create_token,
    read_token_file,
)
from remote_exec.runtime.invocations import DEFAULT_MAX_FINISHED, DEFAULT_RETENTION

from .app import (
    DEFAULT_GRACE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PENDING_CONNECTIONS,
    DEFAULT_PING_INTERVAL,
    HostAllowList,
    RemoteExecApp,
    create_app,
    hypercorn_config,
    serve,
)
from .connection import DEFAULT_MAX_OUTGOING_BYTES
from .dispatch import DEFAULT_CREATE_TIMEOUT, Dispatcher
from .history import (
    DEFAULT_HISTORY_MAX_AGE,
    DEFAULT_HISTORY_MAX_ROWS,
    DEFAULT_HISTORY_MAX_SIZE,
    HistoryError,
    InvocationHistory,
)

__all__ = ["build_parser", "format_size", "limits_from_args", "main", "parse_size", "version"]

logger = logging.getLogger("remote_exec.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
_FORCED_EXIT = 1


def version() -> str:
    """The installed remote-exec's version."""
    try:
        return importlib.metadata.version("remote-exec")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remote-exec",
        description="remote-exec: run methods of Python objects remotely.",
        epilog="`remote-exec serve --help` lists the daemon's options and their defaults.",
    )
    _add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve",
        help="run the daemon (websocket endpoint and /health, /instances)",
        description="Serve remote-exec executors over websockets (hypercorn). "
        "`python -m remote_exec.server [options]` is the same command.",
        epilog="Sizes take a unit: 128MiB, 64KiB, 1GiB (also kB, MB, GB: powers of 1000), "
        "or plain bytes. Every limit is explained in docs/security.md.",
    )
    add_serve_arguments(serve_parser)
    listing = commands.add_parser(
        "invocations",
        help="list a daemon's invocations (every client's), oldest first",
        description="List the invocations a daemon knows: what runs, what ran, how it ended.",
    )
    _add_client_arguments(listing)
    listing.add_argument("--instance", help="only this instance's")
    listing.add_argument("--method", help="only this method's")
    listing.add_argument(
        "--status", choices=[status.value for status in InvocationStatus], help="only these"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument(
        "--limit", type=_int_at_least(1), metavar="N", help="only the newest N (default: all)"
    )
    cancel = commands.add_parser(
        "cancel",
        help="ask a daemon's invocation to stop, by id",
        description="Cancel an invocation: pending, it never starts; running async, it is "
        "cancelled; running sync, it stops at its next check_cancelled().",
    )
    _add_client_arguments(cancel)
    cancel.add_argument("id", help="the invocation's id (see `remote-exec invocations`)")
    return parser


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}",
        help="the daemon (default %(default)s)",
    )
    parser.add_argument(
        "--token-file",
        help="read the token here (default: REMOTE_EXEC_TOKEN, or the file a daemon on "
        "this machine wrote)",
    )


async def _invocations_command(args: argparse.Namespace) -> int:
    token = read_token_file(args.token_file) if args.token_file else None
    async with WebSocketExecutor(args.url, token=token, init_context=False) as executor:
        if args.command == "cancel":
            try:
                infos = [await executor.cancel_invocation(args.id)]
            except LookupError as exc:
                print(f"remote-exec cancel: {exc}", file=sys.stderr)
                return 1
        else:
            infos = await executor.list_invocations(
                instance=args.instance, method=args.method, status=args.status
            )
            if args.limit:
                infos = infos[-args.limit :]
    for info in infos:
        if getattr(args, "json", False):
            print(json.dumps(info.to_wire()))
            continue
        took = ""
        if info.started_at is not None:
            took = f"{(info.ended_at or time.time()) - info.started_at:.3f}s"
        print(
            f"{info.id}  {info.instance}.{info.method}  {info.status.value}  {took}"
            + (f"  {info.error}" if info.error else "")
        )
    return 0


def _add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version",
        action="version",
        version=f"remote-exec {version()} (Python {sys.version.split()[0]})",
        help="print the version and exit",
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _add_version(parser)
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    net.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port, 0 for any free one (default %(default)s)",
    )
    net.add_argument(
        "--certfile",
        metavar="FILE",
        help="TLS certificate (PEM): serve wss:// (default: none, ws://)",
    )
    net.add_argument(
        "--keyfile", metavar="FILE", help="TLS private key (PEM), with --certfile (default: none)"
    )
    net.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without TLS (the token travels in clear text) "
        "(default: off, refused)",
    )
    net.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser Origin allowed to connect (repeatable; '*' for any) "
        "(default: none, every browser page is refused)",
    )
    net.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name clients may reach the daemon by, checked against each request's Host "
        "header, e.g. the machine's DNS name (repeatable; '*' for any); other names get "
        "HTTP 403, so a DNS-rebinding web page cannot reach the daemon (default: the "
        "loopback names and the bound address; a wildcard bind allows every IP address)",
    )

    auth = parser.add_argument_group("authentication").add_mutually_exclusive_group()
    auth.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the token (created if missing) (default: ${TOKEN_ENV} if set, "
        "else the per-user token file, created if missing)",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help="accept clients without a token (default: off, a token is required)",
    )

    code = parser.add_argument_group("what may run")
    code.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="PATTERN",
        help="module whose classes may be created (repeatable): a name or a glob; "
        "'mylab.*' allows the package mylab itself and every module below it, not "
        "mylabfoo (default: none, no class can be created)",
    )
    code.add_argument(
        "--allow-import-from-main",
        action="store_true",
        help="allow classes defined in a client's __main__ script, imported from its file "
        'on this machine (its `if __name__ == "__main__":` block does not run) '
        "(default: off)",
    )
    code.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="DIR",
        dest="paths",
        help="directory to import allowed modules from, put on sys.path before the "
        "current directory (repeatable) (default: only the current directory)",
    )
    caps = parser.add_argument_group(
        "limits",
        "Every limit is finite; clients should use the same message size, buffer, "
        "depth and element caps (remote_exec.protocol.Limits).",
    )
    defaults = Limits()
    caps.add_argument(
        "--max-message-size",
        type=_size_at_least(1024),
        default=defaults.max_message_size,
        metavar="SIZE",
        help="largest message accepted or sent, checked from its header "
        f"(default {format_size(defaults.max_message_size)})",
    )
    caps.add_argument(
        "--max-buffers",
        type=_int_in(1, 0xFFFF),
        default=defaults.max_buffers,
        metavar="N",
        help="out-of-band binary buffers in one message (default %(default)s)",
    )
    caps.add_argument(
        "--max-depth",
        type=_int_at_least(8),
        default=defaults.max_depth,
        metavar="N",
        help="nesting depth of a value (default %(default)s)",
    )
    caps.add_argument(
        "--max-elements",
        type=_int_at_least(1024),
        default=defaults.max_elements,
        metavar="N",
        help="values in one message (array items and map entries, nested ones too), "
        "counted before decoding; a message with more closes its connection "
        "(default %(default)s)",
    )
    caps.add_argument(
        "--max-calls",
        type=_int_at_least(1),
        default=defaults.max_calls,
        metavar="N",
        help="calls and streams in flight per connection; past it a call fails at once "
        "with TooManyCallsError (default %(default)s)",
    )
    caps.add_argument(
        "--max-queued-items",
        dest="max_credit",
        type=_int_at_least(1),
        default=defaults.max_credit,
        metavar="N",
        help="stream items produced ahead of a consumer, per stream: the largest window "
        "a client may ask for (default %(default)s)",
    )
    caps.add_argument(
        "--max-stream-bytes",
        type=_size_at_least(MIN_STREAM_BYTES),
        default=defaults.max_stream_bytes,
        metavar="SIZE",
        help="bytes of stream items produced ahead of a consumer, per stream (the frames "
        "sent and not yet granted again); an item larger still goes, alone "
        f"(default {format_size(defaults.max_stream_bytes)})",
    )
    caps.add_argument(
        "--max-queued-events",
        type=_int_at_least(1),
        default=defaults.max_queued_events,
        metavar="N",
        help="events a channel subscriber may fall behind before it is dropped "
        "(default %(default)s)",
    )
    caps.add_argument(
        "--max-instances",
        type=_int_at_least(1),
        default=defaults.max_instances,
        metavar="N",
        help="instances one connection may have created and not deleted (default %(default)s)",
    )
    caps.add_argument(
        "--max-server-instances",
        type=_int_at_least(1),
        default=defaults.max_server_instances,
        metavar="N",
        help="instances the daemon holds at once, each with its own thread (default %(default)s)",
    )
    caps.add_argument(
        "--max-connections",
        type=_int_at_least(1),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="websocket connections at once; more are refused with HTTP 503 (default %(default)s)",
    )
    caps.add_argument(
        "--max-pending-connections",
        type=_int_at_least(1),
        default=DEFAULT_MAX_PENDING_CONNECTIONS,
        metavar="N",
        help="TCP connections that have not authenticated a websocket yet (handshakes under "
        "way, plain HTTP requests); past it, or when file descriptors run short, the oldest "
        "of them is dropped for the newcomer (default %(default)s)",
    )
    caps.add_argument(
        "--max-outgoing-bytes",
        type=_size_at_least(64 * 1024),
        default=DEFAULT_MAX_OUTGOING_BYTES,
        metavar="SIZE",
        help="replies that may wait to be written to one connection; past it the daemon "
        "reads nothing more from that client until it has read them (back-pressure), so a "
        "client that reads slowly or never cannot make it grow "
        f"(default {format_size(DEFAULT_MAX_OUTGOING_BYTES)})",
    )
    caps.add_argument(
        "--handshake-timeout",
        type=_seconds(allow_zero=False),
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="time to finish the TLS and websocket handshake, token included (default %(default)g)",
    )
    caps.add_argument(
        "--idle-timeout",
        type=_seconds(allow_zero=True),
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="drop a connection on which nothing arrives for this long (a live client "
        "answers every ping), or whose client reads nothing of a reply for this long; must "
        "exceed --ping-interval; 0: never (default %(default)g)",
    )

    caps.add_argument(
        "--create-timeout",
        type=_seconds(allow_zero=False),
        default=DEFAULT_CREATE_TIMEOUT,
        metavar="SECONDS",
        help="time creating an instance may take: importing its module (or a client's "
        "__main__ script) and its constructor; past it the client gets a TimeoutError "
        "(default %(default)g)",
    )

    run = parser.add_argument_group("running")
    run.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the async library the daemon runs on; async methods run on it (default %(default)s)",
    )
    run.add_argument(
        "--invocation-retention",
        type=_seconds(allow_zero=True),
        default=DEFAULT_RETENTION,
        metavar="SECONDS",
        help="how long a finished invocation stays readable by id (at most the newest "
        f"{DEFAULT_MAX_FINISHED} are kept; default %(default)g)",
    )
    run.add_argument(
        "--grace",
        type=_seconds(allow_zero=True),
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, time given to in-flight calls; then they are cancelled, and "
        "a sync method, which cannot be, gets up to 5 s more before the daemon exits "
        "(default %(default)g)",
    )
    run.add_argument(
        "--ping-interval",
        type=_seconds(allow_zero=True),
        default=DEFAULT_PING_INTERVAL,
        metavar="SECONDS",
        help="websocket keepalive ping interval, 0 to disable (default %(default)g)",
    )
    run.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="what the log on stderr shows (default %(default)s)",
    )

    kept = parser.add_argument_group(
        "history",
        "Finished invocations kept in a SQLite file, read after memory no longer has them "
        "(by /invocations, `remote-exec invocations` and the status page).",
    )
    kept.add_argument(
        "--history",
        type=Path,
        metavar="PATH",
        help="keep every finished invocation (id, instance, method, status, times, error, "
        "log) in this SQLite file, created if missing; written every half second off the "
        "event loop, so a killed daemon loses at most its last second (default: none, "
        "memory only)",
    )
    kept.add_argument(
        "--history-max-age",
        type=_seconds(allow_zero=False),
        default=DEFAULT_HISTORY_MAX_AGE,
        metavar="SECONDS",
        help="how long an invocation stays in the history file (default %(default)g: a week)",
    )
    kept.add_argument(
        "--history-max-rows",
        type=_int_at_least(1),
        default=DEFAULT_HISTORY_MAX_ROWS,
        metavar="N",
        help="invocations the history file keeps at most, the oldest go first "
        "(default %(default)s)",
    )
    kept.add_argument(
        "--history-max-size",
        type=_size_at_least(64 * 1024),
        default=DEFAULT_HISTORY_MAX_SIZE,
        metavar="SIZE",
        help="bytes of invocations (logs included) the history file keeps at most, the "
        f"oldest go first (default {format_size(DEFAULT_HISTORY_MAX_SIZE)})",
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The ``Limits`` that parsed ``serve`` arguments ask for."""
    return Limits(
        max_message_size=args.max_message_size,
        max_buffers=args.max_buffers,
        max_depth=args.max_depth,
        max_elements=args.max_elements,
        max_calls=args.max_calls,
        max_credit=args.max_credit,
        max_stream_bytes=args.max_stream_bytes,
        max_instances=args.max_instances,
        max_server_instances=args.max_server_instances,
        max_queued_events=args.max_queued_events,
    )


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {value}")
        return value

    return parse


def _int_at_least(low: int) -> Callable[[str], int]:
    return _int_in(low)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """A size in bytes from ``"128MiB"``, ``"64 KiB"``, ``"1GiB"``, ``"1.5MiB"``,
    ``"10MB"`` (powers of 1000) or plain bytes (``"134217728"``); units are
    case-insensitive.

    Raises:
        ValueError: not a size, or not a whole number of bytes.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"not a size: {text!r} (use bytes, or a number with KiB, MiB, GiB, kB, MB or GB)"
        )
    number, factor = match.group(1), _SIZE_UNITS[unit]
    whole, _, fraction = number.partition(".")
    scale: int = 10 ** len(fraction)
    size, remainder = divmod((int(whole or "0") * scale + int(fraction or "0")) * factor, scale)
    if remainder:
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return size


def format_size(size: int) -> str:
    """``size`` bytes as ``parse_size`` reads it back, in the largest binary
    unit that holds it exactly: ``128MiB``, ``64KiB``, or ``1000`` (bytes)."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _size_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            size = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if size < low:
            raise argparse.ArgumentTypeError(
                f"must be at least {format_size(low)}, not {text} ({size} bytes)"
            )
        return size

    return parse


def _seconds(*, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}, not {text}"
            )
        return value

    return parse


class _UsageError(Exception):
    """A bad combination of options: exit code 2, like argparse."""


def _resolve_token(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    if args.no_auth:
        return None, None
    if args.token_file is not None:
        token, path, created = load_or_create_token(args.token_file)
        if created:
            logger.info("generated a new token in %s", path)
        return token, path
    from_env = os.environ.get(TOKEN_ENV)
    if from_env:
        return from_env, None
    token, path, created = load_or_create_token()
    if created:
        logger.info("generated a new token in %s", path)
    return token, path


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0 picks a free port)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let others steal the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket, tls: bool) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if tls else 'ws'}://{host}:{port}"


class _Run:
    """What the signal watcher tells the daemon."""

    def __init__(self) -> None:
        self.stop = anyio.Event()
        self.forced = False


async def _watch_signals(run: _Run, task_group: TaskGroup) -> None:
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if not run.stop.is_set():
                    logger.info("%s: shutting down", signal.Signals(signum).name)
                    run.stop.set()
                else:
                    logger.warning("second signal: exiting now")
                    run.forced = True
                    task_group.cancel_scope.cancel()
                    return
    except NotImplementedError:  # no signal receiver here (Windows): Ctrl+C still stops
        await anyio.sleep_forever()


async def _serve(app: RemoteExecApp, args: argparse.Namespace, sock: socket.socket) -> bool:
    """Serve until a signal; True if a second signal forced the exit."""
    config = hypercorn_config(
        sock,
        limits=app.limits,
        certfile=args.certfile,
        keyfile=args.keyfile,
        ping_interval=args.ping_interval or None,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout or None,
    )
    run = _Run()
    # Detached async calls run in the dispatcher's hosting task group.
    async with app.dispatcher.hosting(), anyio.create_task_group() as task_group:
        task_group.start_soon(_watch_signals, run, task_group)
        await serve(app, config, shutdown_trigger=run.stop.wait, grace=args.grace)
        logger.info("stopped")
        task_group.cancel_scope.cancel()
    return run.forced


def _extend_sys_path(paths: Sequence[str]) -> list[str]:
    """Put each of ``paths``, then the current directory, first on ``sys.path``
    (``python -m`` puts the current directory there, a console script does
    not); the entries put there, labelled for the start-up log."""
    cwd = os.getcwd()
    wanted = [(os.path.abspath(path), f"{os.path.abspath(path)} (--path)") for path in paths]
    wanted.append((cwd, f"{cwd} (the current directory)"))
    added: list[str] = []
    entries: list[str] = []
    for path, label in wanted:
        if path not in entries:
            entries.append(path)
            added.append(label)
    rest = [
        e for e in sys.path if not (isinstance(e, str) and os.path.abspath(e or cwd) in entries)
    ]
    sys.path[:] = [*entries, *rest]
    return added


def _summary(
    args: argparse.Namespace, import_paths: Sequence[str], hosts: HostAllowList | None = None
) -> str:
    """The one log line at start-up: what this daemon serves, and from where."""
    allowed = ", ".join(args.allow_module) or "none (no --allow-module: nothing can be created)"
    line = (
        f"remote-exec {version()} on {args.backend}; imports from {', '.join(import_paths)}; "
        f"allow-module: {allowed}; import from a client's __main__: "
        f"{'on' if args.allow_import_from_main else 'off'}; "
        f"max message size {format_size(args.max_message_size)}; "
        f"create timeout {args.create_timeout:g} s"
    )
    if hosts is not None:
        line += f"; hosts: {hosts.describe()}"
    return line


class _RateLimit(logging.Filter):
    """At most ``burst`` records a ``period`` for each message of the loggers
    that anyone who can connect can make talk: refusals and dropped
    connections (``remote_exec.server.peers``), hypercorn, and the event
    loops' accept errors. The first record after a quiet spell says how many
    were left out; other loggers (calls, instances' own logging) pass.
    """

    LOGGERS = ("remote_exec.server.peers", "hypercorn", "asyncio", "trio")

    def __init__(
        self,
        burst: int = 10,
        period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self.clock = clock
        self._windows: dict[tuple[str, int, str], list[float]] = {}  # key: [start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == root or name.startswith(root + ".") for root in self.LOGGERS):
            return True
        key = (name, record.levelno, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.period:
            window[1] += 1
            return window[1] <= self.burst
        if len(self._windows) >= 1024:  # messages made up on the fly: forget the stale ones
            self._windows = {k: w for k, w in self._windows.items() if now - w[0] < self.period}
        self._windows[key] = [now, 1]
        left_out = int(window[1]) - self.burst if window is not None else 0
        if left_out > 0:
            record.msg = (
                f"{record.msg} (and {left_out} more like this in the {self.period:g} s "
                "before, not logged)"
            )
        return True


class _DropHypercornBanner(logging.Filter):
    """hypercorn logs its own "Running on http://..." line: the daemon's says it better."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on ")


def run_serve(args: argparse.Namespace) -> int:
    """Run the daemon for parsed ``serve`` arguments; the process exit code."""
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("hypercorn.error").addFilter(_DropHypercornBanner())
    rate_limit = _RateLimit()
    for handler in logging.getLogger().handlers:
        handler.addFilter(rate_limit)
    tls = bool(args.certfile or args.keyfile)
    if tls and not (args.certfile and args.keyfile):
        raise _UsageError("TLS needs both --certfile and --keyfile")
    if not is_loopback_host(args.host) and not tls and not args.insecure:
        raise _UsageError(
            f"refusing to listen on {args.host!r} without TLS: the token and every call would "
            "cross the network in clear text. Pass --certfile and --keyfile to serve wss://, "
            "or --insecure if the network is trusted"
        )
    if not 0 <= args.port <= 65535:
        raise _UsageError(f"--port must be between 0 and 65535, not {args.port}")
    if args.idle_timeout and args.ping_interval and args.ping_interval >= args.idle_timeout:
        raise _UsageError(
            f"--idle-timeout ({args.idle_timeout} s) must exceed --ping-interval "
            f"({args.ping_interval} s): a live client is only heard from when it answers a ping"
        )
    if tls:
        for name in (args.certfile, args.keyfile):
            if not Path(name).is_file():
                raise _UsageError(f"no such file: {name}")
    for directory in args.paths:
        if not Path(directory).is_dir():
            raise _UsageError(f"--path {directory}: no such directory")
    import_paths = _extend_sys_path(args.paths)

    try:
        token, token_path = _resolve_token(args)
    except (TokenFileError, OSError) as exc:
        raise _UsageError(str(exc)) from exc
    if token is None:
        logger.warning("authentication is off (--no-auth): anyone who can connect can run calls")
    if args.insecure and not is_loopback_host(args.host):
        logger.warning("serving without TLS on %s (--insecure)", args.host)

    if args.idle_timeout and not args.ping_interval:
        logger.warning(
            "--ping-interval 0 with --idle-timeout %s: clients that send nothing for that "
            "long are disconnected",
            args.idle_timeout,
        )
    limits = limits_from_args(args)
    dispatcher = Dispatcher(
        allow_modules=args.allow_module,
        allow_import_from_main=args.allow_import_from_main,
        limits=limits,
        create_timeout=args.create_timeout,
        invocation_retention=args.invocation_retention,
    )
    app = create_app(
        dispatcher,
        token=token,
        allowed_origins=args.allowed_origin,
        max_connections=args.max_connections,
        max_pending_connections=args.max_pending_connections,
        max_outgoing_bytes=args.max_outgoing_bytes,
        limits=limits,
    )
    history = _open_history(args)
    try:
        return _run_daemon(app, args, tls, token_path, import_paths, history)
    finally:
        if history is not None:
            history.close()


def _open_history(args: argparse.Namespace) -> InvocationHistory | None:
    """The history file of ``--history``, checked now: a path that cannot be
    used is a start-up error, never a failure later."""
    if args.history is None:
        return None
    try:
        history = InvocationHistory(
            args.history,
            max_age=args.history_max_age,
            max_rows=args.history_max_rows,
            max_size=args.history_max_size,
        )
    except HistoryError as exc:
        raise _UsageError(str(exc)) from exc
    return history


def _run_daemon(
    app: RemoteExecApp,
    args: argparse.Namespace,
    tls: bool,
    token_path: Path | None,
    import_paths: Sequence[str],
    history: InvocationHistory | None,
) -> int:
    if history is not None:
        app.dispatcher.history = history
        history.attach(app.dispatcher.runtime.invocations)
        history.start()
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    # Requests must name this daemon: by a loopback name, the address it is
    # bound to (and the name that was bound), or an --allow-host.
    app.hosts = HostAllowList([args.host, sock.getsockname()[0], *args.allow_host])
    line = f"remote-exec serving on {_url(sock, tls)}"
    if token_path is not None:
        line += f" (token file: {token_path})"
    summary = _summary(args, import_paths, app.hosts)
    page = _url(sock, tls).replace("ws", "http", 1) + "/"
    app.status_page.info.update(url=_url(sock, tls), page=page, backend=args.backend)
    summary += f"; status page: {page}"
    if history is not None:
        summary += (
            f"; history: {history.path} ({history.rows} invocations kept, at most "
            f"{history.max_age:g} s old, {history.max_rows}, {format_size(history.max_size)})"
        )

    def announce() -> None:
        print(line, flush=True)  # the one line a parent process waits for
        logger.info("%s", summary)

    app.on_startup(announce)
    try:
        forced = anyio.run(_serve, app, args, sock, backend=args.backend)
    except KeyboardInterrupt:  # a signal before the receiver was installed
        return _FORCED_EXIT
    return _FORCED_EXIT if forced else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``remote-exec`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command in ("invocations", "cancel"):
            return anyio.run(_invocations_command, args)
    except _UsageError as exc:
        parser.exit(2, f"remote-exec serve: error: {exc}\n")
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse checks


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
