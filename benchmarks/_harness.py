"""Shared pieces of the benchmark harness: workloads, parameters, drivers, servers.

The parent (``run.py``, ``curves.py``, ``cancel_cost.py``) uses the workload
table, ``Params``, ``run_child`` (one fresh process per measurement) and the
report helpers; everything else runs in the child measurement process or in
the server processes it starts. Only the standard library is imported at
module level, so the parent runs under any Python >= 3.11; trio is imported
only when a trio subject runs.

The drivers time only the measured calls: process start, imports, server
start, connecting and the warm-up calls are outside the timed section. Every
reply is checked, so a subject that returns the wrong thing fails loudly
instead of looking fast.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import queue
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractAsyncContextManager, AbstractContextManager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, Self

__all__ = [
    "BENCH_PYTHON",
    "MARKER",
    "REPO_ROOT",
    "RESULTS_DIR",
    "WORKLOADS",
    "WORKLOAD_INFO",
    "Params",
    "ServerProcess",
    "Unavailable",
    "Workload",
    "WorkloadInfo",
    "announce",
    "child_main",
    "default_python",
    "describe",
    "emit",
    "gather",
    "git_revision",
    "machine",
    "make_payload",
    "module_server",
    "run_child",
    "run_on",
    "text_table",
    "w1_latency",
    "w1_latency_sync",
    "w2_concurrency",
    "w2_threads",
    "w3_bulk",
    "w3_bulk_sync",
    "w4_stream",
    "w4_stream_sync",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

Workload = Literal["W1", "W2", "W3", "W4"]
WORKLOADS: tuple[Workload, ...] = ("W1", "W2", "W3", "W4")


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """How a workload's value reads: its title, unit and direction."""

    title: str
    unit: str
    higher_is_better: bool


WORKLOAD_INFO: dict[Workload, WorkloadInfo] = {
    "W1": WorkloadInfo("latency", "µs/call", higher_is_better=False),
    "W2": WorkloadInfo("concurrency", "calls/s", higher_is_better=True),
    "W3": WorkloadInfo("bulk", "MB/s", higher_is_better=True),
    "W4": WorkloadInfo("streaming", "items/s", higher_is_better=True),
}


class Unavailable(Exception):
    """The subject cannot run here (a library or feature is missing)."""


@dataclass(frozen=True, slots=True)
class Params:
    """Sizes of the workloads, plus the registry's per-subject options."""

    w1_warmup: int = 200
    w1_calls: int = 2000
    w2_callers: int = 32
    w2_calls: int = 200
    w2_warmup: int = 5  # per caller, before the timed section
    w3_size: int = 16 * 2**20
    w3_reps: int = 20
    w4_items: int = 10_000
    w4_warmup: int = 100  # items in one warm-up stream
    options: Mapping[str, str] = field(default_factory=dict)

    def with_options(self, options: Mapping[str, str]) -> Params:
        return replace(self, options=dict(options))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Params:
        return cls(**json.loads(text))


def make_payload(size: int) -> bytes:
    """Incompressible bytes, the same on every run, so compression cannot flatter anyone."""
    return random.Random(20240601).randbytes(size)


def _small_int(i: int) -> int:
    return i & 0xFF


def _check_echo(sent: object, received: object) -> None:
    if received != sent:
        raise RuntimeError(f"echo returned {received!r:.60}, expected {sent!r:.60}")


def _check_bulk(received: object, size: int) -> None:
    if not isinstance(received, bytes | bytearray | memoryview):
        raise TypeError(f"bulk echo returned {type(received).__name__}, expected bytes")
    if len(received) != size:
        raise RuntimeError(f"bulk echo returned {len(received)} bytes, expected {size}")


def _check_stream(count: int, total: int, n: int) -> None:
    if count != n or total != n * (n - 1) // 2:
        raise RuntimeError(f"stream gave {count} items summing to {total}, expected 0..{n - 1}")


# --- async drivers -------------------------------------------------------------------------

AsyncEcho = Callable[[Any], Awaitable[Any]]
StreamOpener = Callable[[int], AbstractAsyncContextManager[AsyncIterable[int]]]


def _current_backend() -> str:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "asyncio"


async def gather(fns: Sequence[Callable[[], Coroutine[Any, Any, object]]]) -> None:
    """Run the callables concurrently on the running backend and wait for all of them."""
    if _current_backend() == "asyncio":
        async with asyncio.TaskGroup() as tg:
            for fn in fns:
                tg.create_task(fn())
    else:
        import trio

        async with trio.open_nursery() as nursery:
            for fn in fns:
                nursery.start_soon(fn)


async def w1_latency(echo: AsyncEcho, params: Params) -> float:
    """W1: sequential ``echo(small int)``; µs per call."""
    for i in range(params.w1_warmup):
        _check_echo(_small_int(i), await echo(_small_int(i)))
    start = time.perf_counter()
    for i in range(params.w1_calls):
        x = _small_int(i)
        received = await echo(x)
        if received != x:
            _check_echo(x, received)
    return (time.perf_counter() - start) / params.w1_calls * 1e6


async def w2_concurrency(echoes: Sequence[AsyncEcho], params: Params) -> float:
    """W2: one concurrent caller per element of ``echoes``; calls per second."""

    def caller(echo: AsyncEcho, n: int) -> Callable[[], Coroutine[Any, Any, None]]:
        async def call() -> None:
            for i in range(n):
                x = _small_int(i)
                _check_echo(x, await echo(x))

        return call

    await gather([caller(echo, params.w2_warmup) for echo in echoes])
    start = time.perf_counter()
    await gather([caller(echo, params.w2_calls) for echo in echoes])
    return len(echoes) * params.w2_calls / (time.perf_counter() - start)


async def w3_bulk(echo: AsyncEcho, params: Params) -> float:
    """W3: echo a ``w3_size`` bytes argument; MB/s of payload, both directions counted."""
    payload = make_payload(params.w3_size)
    _check_echo(payload, bytes(await echo(payload)))
    start = time.perf_counter()
    for _ in range(params.w3_reps):
        _check_bulk(await echo(payload), params.w3_size)
    elapsed = time.perf_counter() - start
    return 2 * params.w3_size * params.w3_reps / elapsed / 1e6


async def _drain(open_stream: StreamOpener, n: int) -> None:
    count = total = 0
    async with open_stream(n) as items:
        async for item in items:
            count += 1
            total += item
    _check_stream(count, total, n)


async def w4_stream(open_stream: StreamOpener, params: Params) -> float:
    """W4: consume a remote stream of small ints; items per second (setup included)."""
    await _drain(open_stream, params.w4_warmup)
    start = time.perf_counter()
    await _drain(open_stream, params.w4_items)
    return params.w4_items / (time.perf_counter() - start)


# --- sync drivers, for thread-based libraries (Pyro5, RPyC) -------------------------------

SyncEcho = Callable[[Any], Any]


def w1_latency_sync(echo: SyncEcho, params: Params) -> float:
    for i in range(params.w1_warmup):
        _check_echo(_small_int(i), echo(_small_int(i)))
    start = time.perf_counter()
    for i in range(params.w1_calls):
        x = _small_int(i)
        received = echo(x)
        if received != x:
            _check_echo(x, received)
    return (time.perf_counter() - start) / params.w1_calls * 1e6


def w2_threads(
    open_client: Callable[[], AbstractContextManager[SyncEcho]],
    params: Params,
    *,
    timeout: float = 120.0,
) -> float:
    """W2 with one thread and one client (proxy, connection) per caller.

    Each thread connects and warms up, then all start together at a barrier;
    the clock runs from the barrier to the last thread's end.
    """
    barrier = threading.Barrier(params.w2_callers + 1, timeout=timeout)

    def caller() -> None:
        started = False
        try:
            with open_client() as echo:
                for i in range(params.w2_warmup):
                    _check_echo(_small_int(i), echo(_small_int(i)))
                started = True
                barrier.wait()
                for i in range(params.w2_calls):
                    x = _small_int(i)
                    _check_echo(x, echo(x))
        finally:
            if not started:
                barrier.abort()  # a caller that cannot start must not leave the others waiting

    with ThreadPoolExecutor(max_workers=params.w2_callers) as pool:
        futures = [pool.submit(caller) for _ in range(params.w2_callers)]
        with suppress(threading.BrokenBarrierError):
            barrier.wait()
        start = time.perf_counter()
        wait(futures)
        elapsed = time.perf_counter() - start
    errors = [e for f in futures if (e := f.exception()) is not None]
    # Report the cause, not the BrokenBarrierError it caused in the other threads.
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if errors:
        raise errors[0]
    return params.w2_callers * params.w2_calls / elapsed


def w3_bulk_sync(echo: SyncEcho, params: Params) -> float:
    payload = make_payload(params.w3_size)
    _check_echo(payload, bytes(echo(payload)))
    start = time.perf_counter()
    for _ in range(params.w3_reps):
        _check_bulk(echo(payload), params.w3_size)
    elapsed = time.perf_counter() - start
    return 2 * params.w3_size * params.w3_reps / elapsed / 1e6


def _drain_sync(stream: Callable[[int], Iterable[int]], n: int) -> None:
    count = total = 0
    for item in stream(n):
        count += 1
        total += item
    _check_stream(count, total, n)


def w4_stream_sync(stream: Callable[[int], Iterable[int]], params: Params) -> float:
    _drain_sync(stream, params.w4_warmup)
    start = time.perf_counter()
    _drain_sync(stream, params.w4_items)
    return params.w4_items / (time.perf_counter() - start)


# --- server processes ----------------------------------------------------------------------

READY_LINE = "LISTENING"


def announce(port: int, host: str = "127.0.0.1") -> None:
    """Tell the measuring process where a server listens (see ``module_server``)."""
    print(f"{READY_LINE} {host} {port}", flush=True)


class ServerProcess:
    """A server process started for one measurement, killed on exit.

    Entering starts ``argv`` and waits until a line of its ``stream`` matches
    ``ready``; ``match`` then holds that match (e.g. the port). The stream is
    drained for the rest of the run so that a chatty server never blocks on a
    full pipe; the other stream is inherited, so its output lands in the
    measurement's log. Exiting kills it at once: its graceful shutdown is not
    what is measured, and waiting for it (a second for some daemons) would
    only lengthen the run.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready: str,
        stream: Literal["stdout", "stderr"] = "stdout",
        timeout: float = 30.0,
    ) -> None:
        self.argv = list(argv)
        self.ready = re.compile(ready)
        self.stream = stream
        self.timeout = timeout
        self.process: subprocess.Popen[str] | None = None
        self.match: re.Match[str] | None = None
        self._tail: deque[str] = deque(maxlen=20)

    def __enter__(self) -> Self:
        piped = subprocess.PIPE
        self.process = subprocess.Popen(
            self.argv,
            text=True,
            cwd=REPO_ROOT,
            stdout=piped if self.stream == "stdout" else None,
            stderr=piped if self.stream == "stderr" else None,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        out = self.process.stdout if self.stream == "stdout" else self.process.stderr
        assert out is not None

        def pump() -> None:
            for line in out:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, name="server-output", daemon=True).start()
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(self._failure("was not ready")) from None
                if line is None:
                    raise RuntimeError(self._failure("exited before it was ready"))
                self._tail.append(line.rstrip())
                self.match = self.ready.search(line)
                if self.match:
                    return self
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self.match is not None
        return int(self.match.group("port"))

    def _failure(self, what: str) -> str:
        name = Path(self.argv[0]).name if self.argv[1:2] != ["-m"] else self.argv[2]
        tail = " | ".join(self._tail)
        return f"server {name} {what} within {self.timeout:g} s; its {self.stream}: {tail}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def module_server(module: str, options: Mapping[str, str], timeout: float = 30.0) -> ServerProcess:
    """A ``ServerProcess`` running ``module.serve(options)`` under this interpreter."""
    argv = [sys.executable, "-m", "benchmarks._child", "serve", module, json.dumps(dict(options))]
    return ServerProcess(argv, ready=rf"{READY_LINE} \S+ (?P<port>\d+)", timeout=timeout)


# --- measurement processes -----------------------------------------------------------------
#
# The parent side (``run_child``) starts one process per measurement and reads back the one
# ``@@BENCH {json}`` line it prints; the child side (``emit``, ``describe``, ``run_on``,
# ``child_main``) produces it. ``run.py`` runs ``benchmarks._child``; the cost-curve and
# cancellation scripts run themselves (``python -m benchmarks.curves --child SPEC``).

MARKER = "@@BENCH "
BENCH_PYTHON = REPO_ROOT / ".bench-venv" / "bin" / "python"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def default_python() -> str:
    """The benchmark interpreter: ``.bench-venv/bin/python`` if present, else this one."""
    return str(BENCH_PYTHON) if BENCH_PYTHON.exists() else sys.executable


def emit(record: Mapping[str, object]) -> None:
    """Print the measurement's one result line (see ``run_child``)."""
    sys.stdout.write(MARKER + json.dumps(record) + "\n")
    sys.stdout.flush()


def describe(exc: BaseException) -> str:
    """``Type: message`` of the first leaf exception, on one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def run_on(fn: Callable[..., Any], args: tuple[object, ...], backend: str) -> Any:
    """``fn(*args)``; a coroutine function runs on ``backend`` (asyncio or trio)."""
    if not inspect.iscoroutinefunction(fn):
        return fn(*args)
    if backend == "trio":
        import trio

        return trio.run(fn, *args)
    if backend != "asyncio":
        raise ValueError(f"unknown backend {backend!r}")
    return asyncio.run(fn(*args))


def child_main(measure: Callable[[dict[str, Any]], Any], spec_json: str) -> NoReturn:
    """Body of a measurement process: ``measure(spec)``, its result emitted, then exit.

    ``spec["backend"]`` (default asyncio) is the event loop it runs on. The
    result must be JSON-serialisable; any exception (a stray cancellation
    included) becomes ``{"error": ...}``.
    Exits with ``os._exit``, so a library's lingering thread cannot hold it up.
    """
    spec: dict[str, Any] = json.loads(spec_json)
    code = 0
    try:
        emit({"value": run_on(measure, (spec,), spec.get("backend", "asyncio"))})
    except BaseException as exc:  # noqa: BLE001 - it becomes the measurement's error record
        traceback.print_exc()
        emit({"error": describe(exc)})
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait until child ``pid`` exits, without reaping it; False on timeout."""
    if hasattr(os, "pidfd_open"):  # Linux: sleep until it exits
        fd = os.pidfd_open(pid)
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_child(
    python: str, args: Sequence[str], timeout: float, *, module: str = "benchmarks._child"
) -> dict[str, Any]:
    """Run ``python -m MODULE ARGS`` and return its ``@@BENCH`` record.

    The child runs in its own process group, killed as a whole when it ends,
    so no server it started survives it. Output goes to temporary files, not
    pipes, so a chatty child can never block on a full pipe and leftover
    grandchildren cannot hold us up. A timeout or a missing record becomes
    ``{"error": ...}``.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [python, "-m", module, *args],
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, killed as a whole below
        )
        timed_out = True
        try:
            timed_out = not _wait_unreaped(proc.pid, timeout)
        finally:
            # Not yet reaped, the child still holds its pid and so its group id:
            # this kill cannot hit an unrelated process that reused them.
            _kill_group(proc.pid)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if timed_out:
        return {"error": f"timed out after {timeout:g} s"}
    records = [line[len(MARKER) :] for line in stdout.splitlines() if line.startswith(MARKER)]
    if records:
        return dict(json.loads(records[-1]))
    last = [line for line in stderr.splitlines() if line.strip()][-1:] or ["no output"]
    return {"error": f"exited with code {proc.returncode} and no result: {last[0].strip()}"}


# --- reports -------------------------------------------------------------------------------


def git_revision() -> str:
    """Short HEAD, with ``+dirty`` if tracked files changed; ``unknown`` outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}+dirty" if dirty else rev


def add_json_options(parser: argparse.ArgumentParser, default: Path | None, help: str) -> None:
    """``--json PATH`` and ``--no-json``: where a tool writes its results, if anywhere."""
    parser.add_argument("--json", type=Path, default=default, help=help)
    parser.add_argument("--no-json", action="store_true", help="do not write any JSON")


def write_json(path: Path, data: Any) -> None:
    """Write a tool's results as indented JSON, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {path}")


def machine(python: str) -> dict[str, Any]:
    """Where and when a run happens, for its JSON: CPUs, the interpreter, git, load."""
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": python,
        "python_version": version or "unknown",
        "load_average_before": os.getloadavg(),
    }


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as aligned columns; the first row is the header, underlined.

    The first column is left-aligned, the others right-aligned (they hold numbers).
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])
