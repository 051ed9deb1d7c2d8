#!/usr/bin/env python3
"""What a cancel scope around each call costs: W1 and W4 with and without one.

    .bench-venv/bin/python benchmarks/cancel_cost.py [--quick] [--json OUT]

remote-exec promises that a call or a stream can be cancelled (a scope that
fires cancels it where it runs) and that streams are flow-controlled (a
credit window). This shows that neither costs anything measurable when
nothing is cancelled: for ``ThreadExecutor``, ``ProcessExecutor`` and
``WebSocketExecutor`` (msgpack), on asyncio and on trio,

* W1: sequential ``echo(small int)``, µs per call;
* W4: a remote generator of 10,000 ints, consumed to the end, items/s;

each run plain, inside ``anyio.CancelScope()`` and inside
``anyio.move_on_after(60)``: one scope around each call (W1), one around
the whole stream iteration (W4). The "in-process" row calls a local async
method (a checkpoint, then the value) the same way: what the scope itself
costs the event loop, with no executor at all.

Every measurement process (one per executor x backend x workload x
repetition, through ``_harness.run_child``) opens its executor once, warms up,
then runs several rounds; each round runs every variant once, in a shuffled
order, so the variants are interleaved on the same connection. The tables
show each variant's median and its overhead: the median over all rounds of
(variant's time / plain's time in the same round) - 1, with the interquartile
range of that ratio as the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import anyio
import anyio.lowlevel

from benchmarks import _harness as h, workloads
from benchmarks.curves import executor

EXECUTORS = {
    "inprocess": "in-process (no executor)",
    "thread": "ThreadExecutor",
    "process": "ProcessExecutor",
    "websocket": "WebSocketExecutor",
}
BACKENDS = ("asyncio", "trio")
WORKLOADS = ("W1", "W4")
Scope = Callable[[], AbstractContextManager[Any]]
VARIANTS: dict[str, Scope | None] = {
    "plain": None,
    "CancelScope()": anyio.CancelScope,
    "move_on_after(60)": lambda: anyio.move_on_after(60),
}
PLAIN = "plain"

Echo = Callable[[Any], Awaitable[Any]]
StreamOpener = Callable[[int], AbstractAsyncContextManager[Any]]


# --- child side ----------------------------------------------------------------------------


class Local:
    """The in-process reference: an async call and an async generator, a checkpoint each."""

    async def echo(self, x: object) -> object:
        await anyio.lowlevel.checkpoint()
        return x

    @asynccontextmanager
    async def stream(self, n: int) -> AsyncIterator[AsyncGenerator[int]]:
        async def items() -> AsyncGenerator[int]:
            for i in range(n):
                await anyio.lowlevel.checkpoint()
                yield i

        iterator = items()
        try:
            yield iterator
        finally:
            await iterator.aclose()


@asynccontextmanager
async def _target(kind: str, backend: str) -> AsyncIterator[Any]:
    """An object whose ``echo`` and ``stream`` run through the executor ``kind``."""
    if kind == "inprocess":
        yield Local()
        return
    async with executor(kind, backend) as ex, ex.remote_instance(workloads.Echo(), "echo0") as obj:
        yield obj


def scoped_echo(echo: Echo, scope: Scope | None) -> Echo:
    """``echo`` inside a fresh ``scope()`` per call; without one, the same extra frame."""
    if scope is None:

        async def plain(x: Any) -> Any:
            return await echo(x)

        return plain

    async def scoped(x: Any) -> Any:
        with scope():
            return await echo(x)

        raise AssertionError("cancelled")  # only if the scope fired: it never does here

    return scoped


def scoped_stream(open_stream: StreamOpener, scope: Scope | None) -> StreamOpener:
    """``open_stream`` whose whole iteration runs inside one ``scope()``."""
    if scope is None:

        @asynccontextmanager
        async def plain(n: int) -> AsyncIterator[Any]:
            async with open_stream(n) as items:
                yield items

        return plain

    @asynccontextmanager
    async def scoped(n: int) -> AsyncIterator[Any]:
        with scope():
            async with open_stream(n) as items:
                yield items

    return scoped


async def measure(spec: dict[str, Any]) -> dict[str, list[float]]:
    """Rounds of every variant, interleaved; µs per call (W1) or per item (W4), per round."""
    n, workload = spec["n"], spec["workload"]
    rng = random.Random(spec["seed"])
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    async with _target(spec["executor"], spec["backend"]) as obj:

        async def block(variant: str, count: int) -> float:
            scope = VARIANTS[variant]
            if workload == "W1":
                params = h.Params(w1_warmup=0, w1_calls=count)
                return await h.w1_latency(scoped_echo(obj.echo, scope), params)
            params = h.Params(w4_warmup=0, w4_items=count)
            return 1e6 / await h.w4_stream(scoped_stream(obj.stream, scope), params)

        for variant in VARIANTS:  # warm-up, untimed
            await block(variant, spec["warmup"])
        for _ in range(spec["rounds"]):
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                samples[variant].append(await block(variant, n))
    return samples


# --- parent side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    reps: int  # measurement processes per (executor, backend, workload)
    rounds: int  # rounds in each process
    w1_calls: int
    w4_items: int
    timeout: float


MODES = {
    "full": Mode("full", reps=3, rounds=7, w1_calls=2000, w4_items=10_000, timeout=300.0),
    "quick": Mode("quick", reps=1, rounds=5, w1_calls=1000, w4_items=10_000, timeout=120.0),
}


def jobs(mode: Mode, executors: Sequence[str], backends: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "executor": kind,
            "backend": backend,
            "workload": workload,
            "n": mode.w1_calls if workload == "W1" else mode.w4_items,
            "warmup": 200 if workload == "W1" else 1000,
            "rounds": mode.rounds,
        }
        for kind in executors
        for backend in backends
        for workload in WORKLOADS
    ]


def _key(spec: dict[str, Any]) -> str:
    return f"{spec['workload']} {spec['executor']} {spec['backend']}"


@dataclass(frozen=True, slots=True)
class Summary:
    """One variant of one (workload, executor, backend): median time and overhead vs plain."""

    median_us: float
    delta_us: float  # median of the per-round differences to plain (per call or item)
    overhead: float  # median of the per-round time ratios to plain, minus 1
    overhead_q1: float
    overhead_q3: float
    rounds: int


def summarise(runs: Sequence[dict[str, list[float]]]) -> dict[str, Summary]:
    result = {}
    for variant in VARIANTS:
        times = [t for run in runs for t in run[variant]]
        pairs = [pair for run in runs for pair in zip(run[variant], run[PLAIN], strict=True)]
        ratios = [t / p for t, p in pairs]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
        result[variant] = Summary(
            median_us=statistics.median(times),
            delta_us=statistics.median(t - p for t, p in pairs),
            overhead=statistics.median(ratios) - 1,
            overhead_q1=q1 - 1,
            overhead_q3=q3 - 1,
            rounds=len(ratios),
        )
    return result


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def render(summaries: dict[str, dict[str, Summary]], executors: Sequence[str]) -> str:
    out = []
    for workload in WORKLOADS:
        if workload == "W1":
            title = "W1: sequential echo(small int), µs per call"
        else:
            title = "W4: a generator of 10,000 ints, items/s"
        header = ["executor", "backend"]
        for variant in VARIANTS:
            header.append(variant)
            if variant != PLAIN:
                header.append("overhead [IQR]")
        rows = [header]
        for kind in executors:
            for backend in BACKENDS:
                found = summaries.get(f"{workload} {kind} {backend}")
                if found is None:
                    continue
                row = [EXECUTORS[kind], backend]
                for variant, s in found.items():
                    value = s.median_us if workload == "W1" else 1e6 / s.median_us
                    row.append(f"{value:.1f}" if workload == "W1" else f"{value:,.0f}")
                    if variant != PLAIN:
                        delta = f" {s.delta_us:+.1f} µs" if workload == "W1" else ""
                        spread = f"[{_pct(s.overhead_q1)} {_pct(s.overhead_q3)}]"
                        row.append(f"{_pct(s.overhead)}{delta} {spread}")
                rows.append(row)
        out += [title, h.text_table(rows), ""]
    rounds = {s.rounds for found in summaries.values() for s in found.values()}
    out.append(
        "Medians over all rounds. Overhead: median over the rounds of (time with the scope / "
        "plain time in the same round) - 1, positive = slower; for W1 also the median "
        "difference per call; [IQR] the interquartile range of the ratio over the "
        f"{', '.join(map(str, sorted(rounds)))} rounds."
    )
    return "\n".join(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 process x 5 rounds per cell")
    h.add_json_options(
        parser,
        h.RESULTS_DIR / "cancel_cost.json",
        "where to write the results (default: %(default)s)",
    )
    parser.add_argument(
        "--executors",
        default=",".join(EXECUTORS),
        help="comma-separated subset of %(default)s",
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument("--reps", type=int, help="processes per cell (default: by mode)")
    parser.add_argument("--rounds", type=int, help="rounds per process (default: by mode)")
    parser.add_argument("--python", default=h.default_python(), help="measurement interpreter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving orders")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = MODES["quick" if args.quick else "full"]
    if args.rounds:
        mode = replace(mode, rounds=args.rounds)
    reps = args.reps or mode.reps
    executors = [e for e in EXECUTORS if e in args.executors.split(",")]
    backends = [b for b in BACKENDS if b in args.backends.split(",")]
    meta = h.machine(args.python)
    if meta["load_average_before"][0] > 0.5:
        print(
            f"warning: load average {meta['load_average_before'][0]:.2f}; numbers will be noisy",
            file=sys.stderr,
        )
    rng = random.Random(args.seed)
    round_ = jobs(mode, executors, backends)
    runs: dict[str, list[dict[str, list[float]]]] = {}
    errors: dict[str, list[str]] = {}
    started = time.monotonic()
    for rep in range(reps):
        order = list(round_)
        rng.shuffle(order)
        for i, job in enumerate(order, 1):
            spec = job | {"seed": rng.randrange(2**32)}
            t0 = time.monotonic()
            record = h.run_child(
                args.python,
                ["--child", json.dumps(spec)],
                mode.timeout,
                module="benchmarks.cancel_cost",
            )
            if "value" in record:
                runs.setdefault(_key(spec), []).append(record["value"])
                outcome = "ok"
            else:
                errors.setdefault(_key(spec), []).append(str(record.get("error")))
                outcome = f"ERROR {record.get('error')}"[:120]
            print(
                f"[{rep * len(round_) + i}/{reps * len(round_)}] {_key(spec)}: {outcome} "
                f"({time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    meta |= {"load_average_after": os.getloadavg(), "seconds": round(time.monotonic() - started)}
    summaries = {key: summarise(found) for key, found in runs.items()}
    print(
        f"\nremote-exec cancellation cost, mode {mode.name}, {reps} process(es) x {mode.rounds} "
        f"rounds per cell; {meta['nproc']} CPUs, Python {meta['python_version']}, "
        f"git {meta['git']}, {meta['seconds']} s\n"
    )
    print(render(summaries, executors))
    if errors:
        print("\nErrors:")
        for key, found in errors.items():
            print("\n".join(f"  {key}: {e}" for e in sorted(set(found))))
    if not args.no_json:
        data = {
            "meta": meta,
            "mode": asdict(mode),
            "repetitions": reps,
            "variants": list(VARIANTS),
            "summaries": {
                key: {v: asdict(s) for v, s in found.items()} for key, found in summaries.items()
            },
            "samples_us": runs,
            "errors": errors,
        }
        h.write_json(args.json, data)
    return 1 if errors else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        h.child_main(measure, sys.argv[2])
    sys.exit(main())
