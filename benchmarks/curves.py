#!/usr/bin/env python3
"""The cost curves: how remote-exec's time and memory grow with payload, callers, connections.

    .bench-venv/bin/python benchmarks/curves.py [--quick] [--json OUT] [--backend trio]

(a) **Latency vs payload.** W1-style sequential ``echo(payload)`` of ``bytes``
    from 1 KiB to 64 MiB through ``WebSocketExecutor`` (msgpack), through
    ``ProcessExecutor`` and through the bare ``websockets`` floor: µs per call
    and MB/s (payload both ways), a least-squares line of time against size
    (slope in ns/byte) and, next to it, the slope of a plain memory copy of
    the same sizes. Does time grow linearly, with a slope close to a memcpy?
(b) **Concurrency.** W2 (each caller with its own instance, calls in a loop)
    with 1 to 64 concurrent callers on one connection, then 32 callers spread
    over 1, 4 and 16 connections: calls/s, ``WebSocketExecutor``.
(c) **Daemon memory.** The daemon's RSS per idle connection (VmRSS with 50
    idle ``WebSocketExecutor`` connections minus VmRSS without, divided by
    50) and its peak RSS (VmHWM of ``/proc/<pid>/status``) while a 16 MiB and
    a 64 MiB payload are echoed repeatedly, as a multiple of the payload.

Every measurement runs in a fresh process (``python -m benchmarks.curves
--child SPEC``, through ``_harness.run_child``) that starts its own daemon
(``python -m remote_exec.server --port 0``, as the benchmark subjects do) or
floor server; the measurements are interleaved in a shuffled order,
repeated, and the tables show medians. The daemon runs with
``--max-message-size`` 160 MiB and the clients with the same
``Limits(max_message_size=...)``, so 64 MiB payloads fit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import anyio

from benchmarks import _harness as h, workloads
from benchmarks.subjects.remote_exec_subject import URL, daemon_argv
from remote_exec import ExecutorContext, ProcessExecutor, ThreadExecutor, WebSocketExecutor
from remote_exec.protocol import Limits

__all__ = [
    "MAX_MESSAGE_SIZE",
    "daemon",
    "executor",
    "fit_line",
    "proc_status",
    "websocket_executor",
]

KiB, MiB = 2**10, 2**20
MAX_MESSAGE_SIZE = 160 * MiB  # daemon and clients: room for a 64 MiB payload and its framing
LIMITS = Limits(max_message_size=MAX_MESSAGE_SIZE)
MEMCPY = "memcpy (warm buffer)"
SUBJECTS = {
    "websocket": "remote-exec WebSocketExecutor",
    "process": "remote-exec ProcessExecutor",
    "floor": "floor: websockets",
}


# --- child side: executors, daemons, /proc ------------------------------------------------


def daemon(backend: str, *extra: str) -> h.ServerProcess:
    """A ``remote_exec.server`` daemon on 127.0.0.1, port 0, sized for 64 MiB payloads."""
    argv = [
        *daemon_argv(backend),
        "--max-message-size",
        str(MAX_MESSAGE_SIZE),
        "--log-level",
        "WARNING",
        *extra,
    ]
    return h.ServerProcess(argv, ready=URL)


def _url(server: h.ServerProcess) -> str:
    assert server.match is not None
    return server.match.group("url")


def _pid(server: h.ServerProcess) -> int:
    assert server.process is not None
    return server.process.pid


def websocket_executor(url: str, *, init_context: bool = True) -> WebSocketExecutor:
    return WebSocketExecutor(url, limits=LIMITS, init_context=init_context)


@asynccontextmanager
async def executor(kind: str, backend: str) -> AsyncIterator[Any]:
    """A started remote-exec executor: ``thread``, ``process`` or ``websocket``.

    The websocket one gets a fresh daemon on ``backend``, killed on exit.
    """
    if kind == "thread":
        async with ThreadExecutor() as ex:
            yield ex
    elif kind == "process":
        async with ProcessExecutor(limits=LIMITS) as ex:
            yield ex
    elif kind == "websocket":
        with daemon(backend) as server:
            async with websocket_executor(_url(server)) as ex:
                yield ex
    else:
        raise ValueError(f"unknown executor {kind!r}")


def proc_status(pid: int, key: str) -> int:
    """A memory field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            number, *unit = value.split()
            return int(number) * (1024 if unit == ["kB"] else 1)
    raise KeyError(f"{key} not in /proc/{pid}/status")


# --- child side: the measurements ---------------------------------------------------------

BytesEcho = Callable[[bytes], Awaitable[Any]]


@asynccontextmanager
async def _bytes_echo(subject: str, backend: str) -> AsyncIterator[BytesEcho]:
    if subject == "floor":
        from benchmarks.subjects import floor_websockets as floor

        with h.module_server("floor_websockets", {}) as server:
            async with floor.open_client(f"ws://127.0.0.1:{server.port}/") as ws:
                yield floor.Client(ws).echo_bytes
        return
    async with executor(subject, backend) as ex:
        obj = workloads.Echo()
        async with ex.remote_instance(obj, "echo0"):
            yield obj.echo


async def _latency(spec: dict[str, Any]) -> float:
    """µs per sequential ``echo(payload)``, by the W3 driver (checked, warm-up first)."""
    size: int = spec["size"]
    calls: int = spec["calls"]
    async with _bytes_echo(spec["subject"], spec["backend"]) as echo:
        payload = h.make_payload(size)
        for _ in range(spec["warmup"]):
            await echo(payload)
        mb_per_s = await h.w3_bulk(echo, h.Params(w3_size=size, w3_reps=calls))
    return 2 * size / mb_per_s  # W3 counts the payload both ways, in 10^6 bytes


def _memcpy(spec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """µs per copy of each size: into a warm buffer, and into a fresh ``bytearray``."""
    result = {}
    for size, calls in zip(spec["sizes"], spec["calls"], strict=True):
        src = h.make_payload(size)
        dst = bytearray(size)
        dst[:] = src
        start = time.perf_counter()
        for _ in range(calls):
            dst[:] = src
        warm = (time.perf_counter() - start) / calls * 1e6
        fresh_copy = bytearray(src)
        start = time.perf_counter()
        for _ in range(calls):
            fresh_copy = bytearray(src)
        fresh = (time.perf_counter() - start) / calls * 1e6
        if fresh_copy != dst:
            raise RuntimeError("the copies differ")
        result[str(size)] = {"warm": warm, "fresh": fresh}
    return result


async def _concurrency(spec: dict[str, Any]) -> float:
    """W2: calls/s of ``callers`` concurrent callers spread over ``connections`` connections."""
    callers, connections = spec["callers"], spec["connections"]
    with daemon(spec["backend"]) as server:
        async with AsyncExitStack() as stack:
            executors = [
                await stack.enter_async_context(
                    websocket_executor(_url(server), init_context=False)
                )
                for _ in range(connections)
            ]
            echoes = []
            for i in range(callers):
                ex = executors[i % connections]
                obj = await stack.enter_async_context(
                    ex.remote_instance(workloads.Echo(), f"echo{i}")
                )
                echoes.append(_bound(ex, obj.echo))
            params = h.Params(w2_callers=callers, w2_calls=spec["calls"], w2_warmup=spec["warmup"])
            return await h.w2_concurrency(echoes, params)


def _bound(ex: Any, echo: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """``echo`` through ``ex``: a caller's executor is task-local (an ``ExecutorContext``)."""

    async def call(x: Any) -> Any:
        with ExecutorContext(ex):
            return await echo(x)

    return call


async def _idle_rss(spec: dict[str, Any]) -> dict[str, float]:
    """The daemon's VmRSS with one busy connection, then with ``connections`` more idle ones."""
    n = spec["connections"]
    with daemon(spec["backend"], "--max-connections", str(n + 8)) as server:
        url, pid = _url(server), _pid(server)
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(websocket_executor(url, init_context=False))
            obj = await stack.enter_async_context(first.remote_instance(workloads.Echo(), "echo0"))
            with ExecutorContext(first):
                await obj.echo(b"x" * 1024)
            await anyio.sleep(spec["settle"])
            before = proc_status(pid, "VmRSS")
            for _ in range(n):
                await stack.enter_async_context(websocket_executor(url, init_context=False))
            await anyio.sleep(spec["settle"])
            after = proc_status(pid, "VmRSS")
            with ExecutorContext(first):  # the daemon still answers
                await obj.echo(1)
    return {"rss_before": before, "rss_after": after, "per_connection": (after - before) / n}


async def _peak_rss(spec: dict[str, Any]) -> dict[str, float]:
    """W3-style: echo ``size`` bytes ``calls`` times; the daemon's VmRSS before, VmHWM after."""
    size, calls = spec["size"], spec["calls"]
    with daemon(spec["backend"]) as server:
        pid = _pid(server)
        async with (
            websocket_executor(_url(server)) as ex,
            ex.remote_instance(workloads.Echo(), "echo0") as obj,
        ):
            await obj.echo(b"x" * 1024)
            payload = h.make_payload(size)
            await anyio.sleep(spec["settle"])
            before = proc_status(pid, "VmRSS")
            start = time.perf_counter()
            for _ in range(calls):
                received = await obj.echo(payload)
                if len(received) != size:
                    raise RuntimeError(f"echo returned {len(received)} bytes, expected {size}")
            elapsed = time.perf_counter() - start
            del received
            peak = proc_status(pid, "VmHWM")
            await anyio.sleep(spec["settle"])
            after = proc_status(pid, "VmRSS")
    return {
        "rss_before": before,
        "vm_hwm": peak,
        "rss_after": after,
        "mb_per_s": 2 * size * calls / elapsed / 1e6,
    }


async def measure(spec: dict[str, Any]) -> Any:
    """The job of one measurement process."""
    match spec["job"]:
        case "latency":
            return await _latency(spec)
        case "memcpy":
            return _memcpy(spec)
        case "concurrency":
            return await _concurrency(spec)
        case "idle_rss":
            return await _idle_rss(spec)
        case "peak_rss":
            return await _peak_rss(spec)
    raise ValueError(f"unknown job {spec['job']!r}")


# --- parent side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    reps: int
    sizes: tuple[int, ...]
    bytes_per_point: int  # payload echoed per latency measurement: calls = this // size
    max_calls: int
    min_calls: int
    callers: tuple[int, ...]  # on one connection
    connections: tuple[int, ...]  # with `spread_callers` callers
    spread_callers: int
    w2_calls: int  # calls in one W2 measurement, shared by its callers
    idle_connections: int
    rss_sizes: tuple[int, ...]
    rss_bytes: int  # payload echoed per peak-RSS measurement
    timeout: float


MODES = {
    "full": Mode(
        name="full",
        reps=3,
        sizes=(KiB, 16 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB),
        bytes_per_point=512 * MiB,
        max_calls=2000,
        min_calls=5,
        callers=(1, 4, 16, 32, 64),
        connections=(1, 4, 16),
        spread_callers=32,
        w2_calls=6400,
        idle_connections=50,
        rss_sizes=(16 * MiB, 64 * MiB),
        rss_bytes=256 * MiB,
        timeout=300.0,
    ),
    "quick": Mode(
        name="quick",
        reps=2,
        sizes=(KiB, 256 * KiB, 4 * MiB, 16 * MiB, 64 * MiB),
        bytes_per_point=128 * MiB,
        max_calls=500,
        min_calls=2,
        callers=(1, 4, 16, 64),
        connections=(1, 4, 16),
        spread_callers=32,
        w2_calls=3200,
        idle_connections=50,
        rss_sizes=(16 * MiB, 64 * MiB),
        rss_bytes=128 * MiB,
        timeout=120.0,
    ),
}


def _calls(mode: Mode, size: int) -> int:
    return max(mode.min_calls, min(mode.max_calls, mode.bytes_per_point // size))


def jobs(mode: Mode, backend: str) -> list[dict[str, Any]]:
    """One round: every measurement once."""
    specs: list[dict[str, Any]] = []
    for subject in SUBJECTS:
        for size in mode.sizes:
            calls = _calls(mode, size)
            specs.append(
                {
                    "job": "latency",
                    "subject": subject,
                    # the floor is a websockets (asyncio) server and client
                    "backend": "asyncio" if subject == "floor" else backend,
                    "size": size,
                    "calls": calls,
                    "warmup": min(200, max(1, calls // 10)),
                }
            )
    specs.append(
        {
            "job": "memcpy",
            "sizes": list(mode.sizes),
            "calls": [max(20, 4 * _calls(mode, size)) for size in mode.sizes],
        }
    )
    w2 = [(c, 1) for c in mode.callers]
    w2 += [(mode.spread_callers, n) for n in mode.connections if (mode.spread_callers, n) not in w2]
    for callers, connections in w2:
        specs.append(
            {
                "job": "concurrency",
                "backend": backend,
                "callers": callers,
                "connections": connections,
                "calls": max(20, mode.w2_calls // callers),
                "warmup": 5,
            }
        )
    specs.append(
        {
            "job": "idle_rss",
            "backend": backend,
            "connections": mode.idle_connections,
            "settle": 0.5,
        }
    )
    specs += [
        {
            "job": "peak_rss",
            "backend": backend,
            "size": size,
            "calls": max(3, mode.rss_bytes // size),
            "settle": 0.3,
        }
        for size in mode.rss_sizes
    ]
    return specs


def label(spec: dict[str, Any]) -> str:
    match spec["job"]:
        case "latency":
            return f"latency {SUBJECTS[spec['subject']]} {_size(spec['size'])}"
        case "concurrency":
            return f"W2 {spec['callers']} callers / {spec['connections']} connection(s)"
        case "idle_rss":
            return f"daemon RSS, {spec['connections']} idle connections"
        case "peak_rss":
            return f"daemon peak RSS, {_size(spec['size'])} echo x {spec['calls']}"
    return str(spec["job"])


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y = slope * x + intercept``: (slope, intercept, R²)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - slope * x - intercept) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, 1 - ss_res / ss_tot if ss_tot else 1.0


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _num(value: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, no exponent below a billion; ``-`` for None."""
    if value is None:
        return "-"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


class Results:
    """Every sample and error, by measurement; the summaries the tables and the JSON show."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.samples: dict[str, list[Any]] = {}
        self.errors: dict[str, list[str]] = {}

    def add(self, spec: dict[str, Any], record: dict[str, Any]) -> None:
        key = label(spec)
        if "value" in record:
            self.samples.setdefault(key, []).append(record["value"])
        else:
            self.errors.setdefault(key, []).append(str(record.get("error")))

    # (a)
    def latency(self, subject: str, size: int) -> float | None:
        return _median(self.samples.get(f"latency {SUBJECTS[subject]} {_size(size)}", []))

    def memcpy(self, size: int, kind: str) -> float | None:
        runs = self.samples.get("memcpy", [])
        return _median([run[str(size)][kind] for run in runs])

    def slopes(self, sizes: Sequence[int]) -> dict[str, dict[str, float]]:
        """The line fitted to each subject's and each copy's times at ``sizes``.

        Slope in ns/byte, intercept in µs.
        """
        series: dict[str, list[float | None]] = {
            SUBJECTS[s]: [self.latency(s, n) for n in sizes] for s in SUBJECTS
        }
        series[MEMCPY] = [self.memcpy(n, "warm") for n in sizes]
        series["copy to a new bytearray"] = [self.memcpy(n, "fresh") for n in sizes]
        fits = {}
        for name, times in series.items():
            points = [(n, t) for n, t in zip(sizes, times, strict=True) if t is not None]
            if len(points) < 2:
                continue
            slope, intercept, r2 = fit_line([p[0] for p in points], [p[1] for p in points])
            fits[name] = {"ns_per_byte": slope * 1e3, "intercept_us": intercept, "r2": r2}
        return fits

    # (b)
    def calls_per_s(self, callers: int, connections: int) -> float | None:
        return _median(self.samples.get(f"W2 {callers} callers / {connections} connection(s)", []))

    # (c)
    def memory(self, key: str, field: str) -> float | None:
        return _median([run[field] for run in self.samples.get(key, [])])


def _fit_sets(sizes: Sequence[int]) -> list[tuple[str, Sequence[int]]]:
    """The sizes a line is fitted to: all of them, and all but the largest (which dominates)."""
    found: list[tuple[str, Sequence[int]]] = [("all sizes", sizes)]
    if len(sizes) > 3:
        found.append((f"{_size(sizes[0])} to {_size(sizes[-2])}", sizes[:-1]))
    return found


def render(results: Results, backend: str) -> str:
    mode = results.mode
    sizes = mode.sizes
    out: list[str] = []

    header = ["payload", *(f"{SUBJECTS[s]}" for s in SUBJECTS), "memcpy", "new bytearray"]
    rows = [header]
    rows += [
        [
            _size(n),
            *(_num(results.latency(s, n)) for s in SUBJECTS),
            _num(results.memcpy(n, "warm")),
            _num(results.memcpy(n, "fresh")),
        ]
        for n in sizes
    ]
    out += ["(a) Latency vs payload: µs per sequential echo(bytes) call", h.text_table(rows), ""]

    rows = [["payload", *(SUBJECTS[s] for s in SUBJECTS)]]
    for n in sizes:
        cells = []
        for s in SUBJECTS:
            t = results.latency(s, n)
            cells.append(_num(2 * n / t) if t else "-")
        rows.append([_size(n), *cells])
    out += ["MB/s of payload, both directions (2 x payload per call)", h.text_table(rows), ""]

    rows = [["payload", *(SUBJECTS[s] for s in SUBJECTS), "memcpy"]]
    smallest = sizes[0]
    for n in sizes[1:]:
        cells = []
        for s in SUBJECTS:
            t, t0 = results.latency(s, n), results.latency(s, smallest)
            cells.append(_num((t - t0) * 1e3 / (n - smallest)) if t and t0 else "-")
        t, t0 = results.memcpy(n, "warm"), results.memcpy(smallest, "warm")
        cells.append(_num((t - t0) * 1e3 / (n - smallest)) if t and t0 else "-")
        rows.append([_size(n), *cells])
    first = _size(smallest)
    title = f"ns per byte above the {first} call, (t(n) - t({first})) / (n - {first}):"
    out += [f"{title} constant if time grows linearly", h.text_table(rows), ""]

    for what, fitted in _fit_sets(sizes):
        fits = results.slopes(fitted)
        memcpy_slope = fits.get(MEMCPY, {}).get("ns_per_byte")
        rows = [[f"least squares over {what}", "ns/byte", "intercept µs", "R²", "/ memcpy slope"]]
        for name, f in fits.items():
            ratio = f["ns_per_byte"] / memcpy_slope if memcpy_slope else None
            rows.append(
                [
                    name,
                    _num(f["ns_per_byte"]),
                    _num(f["intercept_us"]),
                    f"{f['r2']:.5f}",
                    _num(ratio),
                ]
            )
        out += [h.text_table(rows), ""]

    rows = [["callers on 1 connection", "calls/s"]]
    rows += [[str(c), _num(results.calls_per_s(c, 1))] for c in mode.callers]
    out += [f"(b) W2 concurrency, WebSocketExecutor msgpack, {backend}", h.text_table(rows), ""]
    rows = [[f"{mode.spread_callers} callers over", "calls/s"]]
    rows += [
        [f"{n} connection{'s' if n > 1 else ''}", _num(results.calls_per_s(mode.spread_callers, n))]
        for n in mode.connections
    ]
    out += [h.text_table(rows), ""]

    key = f"daemon RSS, {mode.idle_connections} idle connections"
    before, after = results.memory(key, "rss_before"), results.memory(key, "rss_after")
    per = results.memory(key, "per_connection")
    rows = [
        ["daemon RSS", "MiB"],
        ["with 1 busy connection", _num(before / MiB if before else None)],
        [
            f"with {mode.idle_connections} more idle connections",
            _num(after / MiB if after else None),
        ],
        ["per idle connection (KiB)", _num(per / KiB if per else None)],
    ]
    out += [f"(c) Daemon memory ({backend})", h.text_table(rows), ""]

    rows = [
        [
            "echo repeated",
            "RSS before MiB",
            "VmHWM MiB",
            "(VmHWM - before) / payload",
            "VmHWM / payload",
            "RSS after MiB",
            "MB/s",
        ]
    ]
    for n in mode.rss_sizes:
        calls = max(3, mode.rss_bytes // n)
        key = f"daemon peak RSS, {_size(n)} echo x {calls}"
        before, peak = results.memory(key, "rss_before"), results.memory(key, "vm_hwm")
        after, speed = results.memory(key, "rss_after"), results.memory(key, "mb_per_s")
        rows.append(
            [
                f"{_size(n)} x {calls}",
                _num(before / MiB if before else None),
                _num(peak / MiB if peak else None),
                _num((peak - before) / n if peak and before else None),
                _num(peak / n if peak else None),
                _num(after / MiB if after else None),
                _num(speed),
            ]
        )
    out += [h.text_table(rows)]

    if results.errors:
        out += ["", "Errors:"]
        out += [
            f"  {key}: {e}" for key, errors in results.errors.items() for e in sorted(set(errors))
        ]
    return "\n".join(out)


def to_json(results: Results, backend: str, meta: dict[str, Any]) -> dict[str, Any]:
    mode = results.mode
    return {
        "meta": meta,
        "mode": asdict(mode),
        "backend": backend,
        "latency_us": {
            SUBJECTS[s]: {str(n): results.latency(s, n) for n in mode.sizes} for s in SUBJECTS
        },
        "memcpy_us": {
            kind: {str(n): results.memcpy(n, kind) for n in mode.sizes}
            for kind in ("warm", "fresh")
        },
        "fits": {what: results.slopes(fitted) for what, fitted in _fit_sets(mode.sizes)},
        "samples": results.samples,
        "errors": results.errors,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes and repetitions (under ~2 min)"
    )
    h.add_json_options(
        parser, h.RESULTS_DIR / "curves.json", "where to write the results (default: %(default)s)"
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the daemon's and the clients' backend (the websockets floor is always asyncio)",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default: by mode)")
    parser.add_argument("--python", default=h.default_python(), help="measurement interpreter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = MODES["quick" if args.quick else "full"]
    reps = args.reps or mode.reps
    meta = h.machine(args.python)
    if meta["load_average_before"][0] > 0.5:
        print(
            f"warning: load average {meta['load_average_before'][0]:.2f}; numbers will be noisy",
            file=sys.stderr,
        )
    results = Results(mode)
    rng = random.Random(args.seed)
    round_ = jobs(mode, args.backend)
    started = time.monotonic()
    for rep in range(reps):
        order = list(round_)
        rng.shuffle(order)
        for i, spec in enumerate(order, 1):
            t0 = time.monotonic()
            record = h.run_child(
                args.python, ["--child", json.dumps(spec)], mode.timeout, module="benchmarks.curves"
            )
            results.add(spec, record)
            outcome = "ok" if "value" in record else f"ERROR {record.get('error')}"[:120]
            print(
                f"[{rep * len(round_) + i}/{reps * len(round_)}] {label(spec)}: {outcome} "
                f"({time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    meta |= {"load_average_after": os.getloadavg(), "seconds": round(time.monotonic() - started)}
    print(
        f"\nremote-exec cost curves, mode {mode.name}, {reps} repetition(s), medians; "
        f"{meta['nproc']} CPUs, Python {meta['python_version']}, git {meta['git']}, "
        f"{meta['seconds']} s\n"
    )
    print(render(results, args.backend))
    if not args.no_json:
        h.write_json(args.json, to_json(results, args.backend, meta))
    return 1 if results.errors else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        h.child_main(measure, sys.argv[2])
    sys.exit(main())
