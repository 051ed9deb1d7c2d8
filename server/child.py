"""The process executor's child: serves one connection over an inherited socket.

::

    python -m remote_exec.server.child --fd N [--allow-module PATTERN ...]
        [--allow-import-from-main] [--backend asyncio|trio] [--create-timeout S]
        [--parent-pipe FD] [--pdeathsig]

``ProcessExecutor`` starts this with one end of a ``socketpair`` passed as file
descriptor ``N``; frames travel over it back to back (``StreamTransport``).
stdout and stderr are the user's: remote methods may print freely, the
protocol never touches them.

The child never outlives its parent:

* end of file on the socket ends the connection, and then the process exits
  within a short grace even if a sync method keeps a worker thread blocked;
* ``--parent-pipe FD`` is the read end of a pipe whose write end only the
  parent holds: a thread blocked on it sees end of file when the parent
  process is gone, however it died, even if an async method blocks this
  process's event loop (so that the socket's end of file goes unnoticed);
* ``--pdeathsig`` asks the kernel to SIGKILL this process when its parent
  dies (Linux ``PR_SET_PDEATHSIG``). The kernel means the parent *thread*
  that forked: the parent passes it only when it forks from its event loop's
  thread (asyncio), never from a thread pool's (trio forks from a cached
  worker thread that exits when idle, which would kill a healthy child).

Ctrl+C in a terminal reaches the whole process group: the child ignores it
and lets the parent decide. SIGTERM shuts it down gracefully, like the
daemon: calls in flight get a grace, then every instance is exited (its
``__exit__``/``__aexit__`` runs), then the process exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

import anyio

from remote_exec.exceptions import ConnectionLostError
from remote_exec.protocol import Limits
from remote_exec.runtime.sockets import socket_stream
from remote_exec.runtime.transport import StreamTransport

from .dispatch import DEFAULT_CREATE_TIMEOUT, Dispatcher

__all__ = ["main"]

logger = logging.getLogger("remote_exec.server")

# How long cleanup may take once the parent is gone before the child just exits.
_EXIT_GRACE = 2.0
# On SIGTERM, how long calls in flight may take before they are cancelled.
_TERM_GRACE = 5.0
_PR_SET_PDEATHSIG = 1
_IMPORT_HINT = (
    "run the parent from the directory that holds it, put that directory on the "
    "parent's sys.path (the child gets it as PYTHONPATH), or start the executor "
    "with ProcessExecutor(cwd=DIR) or env={'PYTHONPATH': DIR}"
)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the parent thread that forked it exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the socket's end of file still guards
        pass


def _watch_parent(fd: int) -> None:
    """Start the exit watchdog once the parent's end of the pipe closes."""

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        _start_watchdog()

    threading.Thread(target=watch, name="remote-exec parent watch", daemon=True).start()


def _exit_now(code: int) -> None:
    """Flush what user code printed, then leave without waiting for any thread."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_watchdog_lock = threading.Lock()
_watchdog: threading.Timer | None = None


def _start_watchdog() -> None:
    """From now on the process exits within ``_EXIT_GRACE``, whatever blocks."""
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = threading.Timer(_EXIT_GRACE, _exit_now, (0,))
            _watchdog.daemon = True
            _watchdog.start()


class _ParentLink(StreamTransport):
    """The socket to the parent; its end of file starts the exit watchdog."""

    async def receive_frame(self) -> bytearray:
        try:
            return await super().receive_frame()
        except ConnectionLostError:
            _start_watchdog()
            raise


async def _serve(
    fd: int,
    allow_modules: Sequence[str],
    allow_import_from_main: bool,
    limits: Limits,
    create_timeout: float,
) -> None:
    dispatcher = Dispatcher(
        allow_modules=allow_modules,
        allow_import_from_main=allow_import_from_main,
        limits=limits,
        close_grace=_EXIT_GRACE / 2,
        create_timeout=create_timeout,
        import_hint=_IMPORT_HINT,
    )
    stream = await socket_stream(socket.socket(fileno=fd))
    link = _ParentLink(stream, max_size=limits.max_message_size, max_buffers=limits.max_buffers)
    try:
        async with dispatcher.hosting(), anyio.create_task_group() as tg:
            tg.start_soon(_on_sigterm, dispatcher, tg.cancel_scope)
            await dispatcher.serve(link, peer=f"parent process {os.getppid()}")
            tg.cancel_scope.cancel()
    finally:
        _start_watchdog()
        with anyio.CancelScope(shield=True):
            await dispatcher.aclose()


async def _on_sigterm(dispatcher: Dispatcher, serving: anyio.CancelScope) -> None:
    """SIGTERM: in-flight calls get ``_TERM_GRACE``, then every instance is
    exited (``Dispatcher.aclose``) and the process exits 0."""
    try:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
    except NotImplementedError:  # no signal receiver here (Windows)
        await anyio.sleep_forever()
    logger.info("SIGTERM: shutting down")
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(_TERM_GRACE):
            # The dispatcher has no "idle" event to wait on: look now and then.
            while dispatcher.statistics()["calls_in_flight"]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await dispatcher.aclose()
    serving.cancel()


def _limits(text: str) -> Limits:
    try:
        return Limits(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"invalid limits {text!r}: {exc}") from None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m remote_exec.server.child",
        description="Serve one remote-exec connection over an inherited socket "
        "(started by ProcessExecutor).",
    )
    parser.add_argument("--fd", type=int, required=True, help="the connected socket's descriptor")
    parser.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="PATTERN",
        help="fnmatch pattern of the modules whose classes may be created (repeatable)",
    )
    parser.add_argument(
        "--allow-import-from-main",
        action="store_true",
        help="create classes defined in the parent's __main__ by importing its main file",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument(
        "--create-timeout",
        type=float,
        default=DEFAULT_CREATE_TIMEOUT,
        metavar="SECONDS",
        help="time creating an instance may take, its import included (default %(default)g)",
    )
    parser.add_argument(
        "--limits",
        type=_limits,
        default=Limits(),
        metavar="JSON",
        help="the parent's Limits as a JSON object (both ends use the same caps)",
    )
    parser.add_argument(
        "--parent-pipe",
        type=int,
        metavar="FD",
        help="read end of a pipe only the parent writes to: its end of file means the parent died",
    )
    parser.add_argument(
        "--pdeathsig",
        action="store_true",
        help="be killed when the parent thread that forked this process exits (Linux)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until the parent goes away, then exit (never returns)."""
    options = _parse(argv)
    if options.pdeathsig:
        _die_with_parent()
    if options.parent_pipe is not None:
        _watch_parent(options.parent_pipe)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What remote methods print shows up as it happens, line by line.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    code = 0
    try:
        anyio.run(
            _serve,
            options.fd,
            options.allow_module,
            options.allow_import_from_main,
            options.limits,
            options.create_timeout,
            backend=options.backend,
        )
    except BaseException:
        logger.exception("the remote-exec child failed")
        code = 1
    _exit_now(code)


if __name__ == "__main__":
    main()
