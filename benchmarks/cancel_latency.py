#!/usr/bin/env python3
"""How soon a cooperative sync loop stops once ``cancel_invocation(id)`` is called.

    .bench-venv/bin/python benchmarks/cancel_latency.py [--quick] [--json OUT]

For ``ThreadExecutor``, ``ProcessExecutor`` and ``WebSocketExecutor``
(msgpack, to a ``remote_exec.server`` daemon on 127.0.0.1, port 0), on
asyncio and on trio, a task calls a sync method of a remote instance
(``benchmarks.cancel_loops.Looper``) that never returns by itself:

* ``spin``: ``while True: check_cancelled()`` plus a tiny bit of work, which
  holds the GIL between checks;
* ``nap``: ``while True: cancellable_sleep(1.0)``, which waits on an event.

The measuring task finds the call the way another client would, by polling
``list_invocations(instance=..., method=..., status="running")``, waits
20-40 ms (random) so the loop is well under way, then reads the clock
(``t0``) and awaits ``executor.cancel_invocation(id)``. Times from ``t0``:

* ``loop stops``: the method's own ``time.monotonic()`` as it catches
  ``InvocationCancelled`` (``CLOCK_MONOTONIC``: one clock for all the
  processes of this machine, so the child process's and the daemon's
  readings compare with the client's);
* ``cancel returns``: ``await cancel_invocation(id)`` is back;
* ``caller gets it``: the task that awaits the call gets
  ``InvocationCancelled`` (the headline number);
* ``next call done``: that task then at once calls ``echo`` on the same
  instance; it must start at once, not behind the loop.

That ``echo``'s own duration (``next call alone``) is shown next to two
references from the same processes: an ``echo`` right after a 30 ms call
that returned by itself (``rest``: the first call after a long one wakes
idle threads, cancelled or not) and plain back-to-back ``echo`` calls.

Each measurement process (one per executor x backend x repetition, through
``_harness.run_child``, in a shuffled order) opens its executor and one
instance, warms up (an untimed cancel of each loop, plain echoes), times
plain ``echo`` calls, then runs rounds: each round cancels one ``spin`` and
one ``nap`` and times one ``echo`` after a ``rest``, in a shuffled order.
The table shows medians, and the 90th percentile of the two main times,
over every cancel of a cell.

``--switch-interval S`` first calls ``sys.setswitchinterval(S)`` in the
process that runs the loops: how long that process's event loop may wait
for the GIL while ``spin`` holds it (0.005 s by default).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import anyio

from benchmarks import _harness as h
from benchmarks.cancel_loops import Looper
from benchmarks.subjects.remote_exec_subject import URL, daemon_argv
from remote_exec import InvocationCancelled, ProcessExecutor, ThreadExecutor, WebSocketExecutor
from remote_exec.invocations import InvocationStatus

EXECUTORS = {
    "thread": "ThreadExecutor",
    "process": "ProcessExecutor",
    "websocket": "WebSocketExecutor",
}
BACKENDS = ("asyncio", "trio")
LOOPS = {
    "spin": "check_cancelled()",
    "nap": "cancellable_sleep(1.0)",
}
# Per cancel, from t0 (the clock read just before `await cancel_invocation(id)`), µs.
METRICS = {
    "stopped": "loop stops",
    "returned": "cancel returns",
    "caller": "caller gets it",
    "next": "next call done",
}
LOOP_MODULE = "benchmarks.cancel_loops"
INSTANCE = "looper"
SETTLE = (0.02, 0.04)  # seconds between seeing the call run and cancelling it
ECHO_CALLS = 50  # plain echo calls timed one by one, for the baseline
REST = 0.03  # seconds of the reference call that returns by itself
WAIT = 10.0  # seconds any one step may take before the measurement fails


# --- child side ----------------------------------------------------------------------------


@asynccontextmanager
async def _executor(kind: str, backend: str) -> AsyncIterator[Any]:
    """A started executor; the websocket one with a fresh daemon on ``backend``."""
    if kind == "thread":
        async with ThreadExecutor() as ex:
            yield ex
    elif kind == "process":
        async with ProcessExecutor() as ex:
            yield ex
    elif kind == "websocket":
        argv = [*daemon_argv(backend), "--allow-module", LOOP_MODULE, "--log-level", "WARNING"]
        with h.ServerProcess(argv, ready=URL) as daemon:
            assert daemon.match is not None
            async with WebSocketExecutor(daemon.match.group("url"), codec="msgpack") as ex:
                yield ex
    else:
        raise ValueError(f"unknown executor {kind!r}")


async def _running(ex: Any, loop: str) -> str:
    """The id of the running ``loop`` call, as another client would find it."""
    while True:
        found = await ex.list_invocations(instance=INSTANCE, method=loop, status="running")
        if found:
            if len(found) != 1:
                raise RuntimeError(f"{len(found)} {loop} calls running, expected 1")
            invocation_id: str = found[0].id
            return invocation_id
        await anyio.sleep(0.002)


async def cancel_once(ex: Any, obj: Any, loop: str, settle: float, seq: int) -> dict[str, float]:
    """Start ``loop``, cancel it by id; times from t0, in µs (see ``METRICS``)."""
    marks: dict[str, float] = {}

    async def caller() -> None:
        try:
            await getattr(obj, loop)()
        except InvocationCancelled:
            marks["caller"] = time.monotonic()
        else:
            raise RuntimeError(f"{loop} returned without being cancelled")
        echoed = await obj.echo(seq)
        marks["next"] = time.monotonic()
        if echoed != seq:
            raise RuntimeError(f"echo returned {echoed!r}, expected {seq!r}")

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            invocation_id = await _running(ex, loop)
            await anyio.sleep(settle)
            t0 = time.monotonic()
            await ex.cancel_invocation(invocation_id)
            marks["returned"] = time.monotonic()
        final = await ex.get_invocation(invocation_id)
        seen = await ex.get_remote_object_property_data(obj, ["stopped_at", "steps"])
    if final.status is not InvocationStatus.CANCELLED:
        raise RuntimeError(f"{loop} ended {final.status}, expected cancelled")
    if seen["stopped_at"] is None or (loop == "spin" and seen["steps"] < 1):
        raise RuntimeError(f"{loop} did not record its stop: {seen}")
    marks["stopped"] = seen["stopped_at"]
    sample = {key: (marks[key] - t0) * 1e6 for key in METRICS}
    sample["next_alone"] = (marks["next"] - marks["caller"]) * 1e6
    return sample


async def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One process: warm-up, plain echo times, then ``rounds`` cancels of each loop."""
    rng = random.Random(spec["seed"])
    samples: dict[str, list[dict[str, float]]] = {loop: [] for loop in LOOPS}
    after_rest_us = []
    async with (
        _executor(spec["executor"], spec["backend"]) as ex,
        ex.remote_instance(Looper(), INSTANCE) as obj,
    ):
        if spec.get("switch_interval"):  # in the process that runs the loops
            await obj.set_switch_interval(spec["switch_interval"])
        for i in range(ECHO_CALLS):  # warm-up
            await obj.echo(i)
        for loop in LOOPS:
            await cancel_once(ex, obj, loop, SETTLE[0], -1)
        echo_us = []
        for i in range(ECHO_CALLS):
            start = time.monotonic()
            await obj.echo(i)
            echo_us.append((time.monotonic() - start) * 1e6)
        for seq in range(spec["rounds"]):
            order = [*LOOPS, "rest"]
            rng.shuffle(order)
            for loop in order:
                if loop == "rest":
                    await obj.rest(REST)
                    start = time.monotonic()
                    await obj.echo(seq)
                    after_rest_us.append((time.monotonic() - start) * 1e6)
                    continue
                settle = rng.uniform(*SETTLE)
                samples[loop].append(await cancel_once(ex, obj, loop, settle, seq))
    return {"echo_us": echo_us, "after_rest_us": after_rest_us, "samples": samples}


# --- parent side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    reps: int  # measurement processes per (executor, backend)
    rounds: int  # cancels of each loop in each process
    timeout: float


MODES = {
    "full": Mode("full", reps=3, rounds=30, timeout=300.0),
    "quick": Mode("quick", reps=1, rounds=15, timeout=60.0),
}


def jobs(
    executors: Sequence[str], backends: Sequence[str], rounds: int, switch_interval: float | None
) -> list[dict[str, Any]]:
    return [
        {"executor": kind, "backend": backend, "rounds": rounds, "switch_interval": switch_interval}
        for kind in executors
        for backend in backends
    ]


def _key(spec: dict[str, Any]) -> str:
    return f"{spec['executor']} {spec['backend']}"


def percentile(values: Sequence[float], p: int) -> float:
    """The ``p``-th percentile (inclusive method: within the data's range)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median and p90 of each metric per loop, over every process of a cell."""
    result: dict[str, Any] = {
        "echo_median_us": statistics.median(t for run in runs for t in run["echo_us"]),
        "after_rest_median_us": statistics.median(t for run in runs for t in run["after_rest_us"]),
    }
    for loop in LOOPS:
        found = [sample for run in runs for sample in run["samples"][loop]]
        result[loop] = {
            metric: {
                "median_us": statistics.median(s[metric] for s in found),
                "p90_us": percentile([s[metric] for s in found], 90),
                "max_us": max(s[metric] for s in found),
            }
            for metric in [*METRICS, "next_alone"]
        } | {"cancels": len(found)}
    return result


def fmt(us: float) -> str:
    """µs below a millisecond, ms above."""
    if abs(us) < 1000:
        return f"{us:.0f} µs"
    return f"{us / 1000:.2f} ms"


def render(summaries: dict[str, dict[str, Any]], executors: Sequence[str]) -> str:
    header = ["executor", "backend", "loop"]
    for metric, title in METRICS.items():
        header += [title] if metric in ("stopped", "returned") else [title, "p90"]
    header += ["next call alone", "echo after rest", "plain echo"]
    rows = [header]
    for kind in executors:
        for backend in BACKENDS:
            found = summaries.get(f"{kind} {backend}")
            if found is None:
                continue
            for loop, what in LOOPS.items():
                cell = found[loop]
                row = [EXECUTORS[kind], backend, what]
                for metric in METRICS:
                    row.append(fmt(cell[metric]["median_us"]))
                    if metric not in ("stopped", "returned"):
                        row.append(fmt(cell[metric]["p90_us"]))
                row += [
                    fmt(cell["next_alone"]["median_us"]),
                    fmt(found["after_rest_median_us"]),
                    fmt(found["echo_median_us"]),
                ]
                rows.append(row)
    counts = sorted({found[loop]["cancels"] for found in summaries.values() for loop in LOOPS})
    note = (
        "Times from just before `await cancel_invocation(id)`, medians (p90: 90th "
        f"percentile) over {', '.join(map(str, counts))} cancels per row. 'next call "
        "alone': the echo the cancelled caller makes at once, from its start; 'echo after "
        f"rest': an echo right after a {REST * 1000:g} ms call that returned by itself; "
        f"'plain echo': back-to-back echo calls; both medians, in the same processes."
    )
    return "\n".join([h.text_table(rows), "", note])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="1 process x 15 cancels of each loop per cell"
    )
    h.add_json_options(
        parser,
        h.RESULTS_DIR / "cancel_latency.json",
        "where to write the results (default: %(default)s)",
    )
    parser.add_argument(
        "--executors", default=",".join(EXECUTORS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument("--reps", type=int, help="processes per cell (default: by mode)")
    parser.add_argument("--rounds", type=int, help="cancels of each loop per process")
    parser.add_argument(
        "--switch-interval",
        type=float,
        metavar="S",
        help="sys.setswitchinterval(S) in the process that runs the loops (the client's "
        "for ThreadExecutor, the child's or the daemon's otherwise; default: leave it, 0.005)",
    )
    parser.add_argument("--python", default=h.default_python(), help="measurement interpreter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving orders")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = MODES["quick" if args.quick else "full"]
    if args.rounds:
        mode = replace(mode, rounds=args.rounds)
    if args.reps:
        mode = replace(mode, reps=args.reps)
    executors = [e for e in EXECUTORS if e in args.executors.split(",")]
    backends = [b for b in BACKENDS if b in args.backends.split(",")]
    meta = h.machine(args.python)
    if meta["load_average_before"][0] > 0.5:
        print(
            f"warning: load average {meta['load_average_before'][0]:.2f}; numbers will be noisy",
            file=sys.stderr,
        )
    rng = random.Random(args.seed)
    round_ = jobs(executors, backends, mode.rounds, args.switch_interval)
    runs: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, list[str]] = {}
    started = time.monotonic()
    for rep in range(mode.reps):
        order = list(round_)
        rng.shuffle(order)
        for i, job in enumerate(order, 1):
            spec = job | {"seed": rng.randrange(2**32)}
            t0 = time.monotonic()
            record = h.run_child(
                args.python,
                ["--child", json.dumps(spec)],
                mode.timeout,
                module="benchmarks.cancel_latency",
            )
            if "value" in record:
                runs.setdefault(_key(spec), []).append(record["value"])
                outcome = "ok"
            else:
                errors.setdefault(_key(spec), []).append(str(record.get("error")))
                outcome = f"ERROR {record.get('error')}"[:120]
            print(
                f"[{rep * len(round_) + i}/{mode.reps * len(round_)}] {_key(spec)}: {outcome} "
                f"({time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    meta |= {"load_average_after": os.getloadavg(), "seconds": round(time.monotonic() - started)}
    summaries = {key: summarise(found) for key, found in runs.items()}
    print(
        f"\nremote-exec cancel_invocation -> cooperative sync loop stopped, mode {mode.name}, "
        f"{mode.reps} process(es) x {mode.rounds} cancels of each loop per cell; "
        f"{meta['nproc']} CPUs, Python {meta['python_version']}, git {meta['git']}, "
        f"{meta['seconds']} s"
        + (f"; switch interval {args.switch_interval:g} s" if args.switch_interval else "")
        + "\n"
    )
    if summaries:
        print(render(summaries, executors))
    if errors:
        print("\nErrors:")
        for key, found in errors.items():
            print("\n".join(f"  {key}: {e}" for e in sorted(set(found))))
    if not args.no_json:
        data = {
            "meta": meta,
            "mode": asdict(mode),
            "switch_interval": args.switch_interval,
            "loops": LOOPS,
            "metrics": METRICS,
            "summaries": summaries,
            "runs": runs,
            "errors": errors,
        }
        h.write_json(args.json, data)
    return 1 if errors else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        h.child_main(measure, sys.argv[2])
    sys.exit(main())
