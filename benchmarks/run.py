#!/usr/bin/env python3
"""Run the benchmark suite and print (and save) the results table.

    python benchmarks/run.py [--quick | --smoke] [--only PATTERN] [--json OUT]

Every measurement (subject x workload x repetition) runs in a fresh child
process (``benchmarks/_child.py``) under the benchmark interpreter (by default
``.bench-venv/bin/python``), which starts the subject's server side itself.
Repetitions are interleaved: each round runs every (subject, workload) pair
once, in a shuffled order, so slow drift of the machine spreads over all rows.
A child that fails or outlives its timeout becomes an error cell; its whole
process group is killed, so nothing it started outlives it.

This file only needs the standard library.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import (
    RESULTS_DIR,
    WORKLOAD_INFO,
    WORKLOADS,
    Params,
    Workload,
    add_json_options,
    default_python,
    git_revision,
    run_child,
    write_json,
)
from benchmarks.registry import SUBJECTS, Subject

DASH = "\N{EN DASH}"


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    reps: int
    timeout: float  # seconds, per measurement (one child process)
    params: Params
    json_name: str


MODES = {
    "full": Mode("full", 5, 180.0, Params(), "latest.json"),
    # Fewer repetitions, 100 calls per W2 caller instead of 200 and 5 bulk calls
    # instead of 20 (RPyC's W3 alone takes half a minute at 20); other sizes as "full".
    "quick": Mode("quick", 3, 60.0, Params(w2_calls=100, w3_reps=5), "latest.json"),
    # Proves that every selected subject runs end to end; the numbers mean little.
    "smoke": Mode(
        "smoke",
        1,
        60.0,
        Params(
            w1_warmup=20,
            w1_calls=200,
            w2_callers=4,
            w2_calls=20,
            w2_warmup=2,
            w3_size=2**20,
            w3_reps=2,
            w4_items=500,
            w4_warmup=10,
        ),
        "smoke.json",
    ),
}


@dataclass(slots=True)
class Cell:
    """The repetitions of one workload for one subject."""

    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


@dataclass(slots=True)
class Row:
    subject: Subject
    available: bool = False
    reason: str = ""
    workloads: tuple[Workload, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    cells: dict[Workload, Cell] = field(default_factory=dict)


# --- child processes -----------------------------------------------------------------------


def probe(python: str, rows: Sequence[Row]) -> None:
    def one(row: Row) -> None:
        record = run_child(python, ["probe", row.subject.name], timeout=120.0)
        if record.get("available"):
            row.available = True
            row.workloads = tuple(record["workloads"])
            row.versions = dict(record["versions"])
        else:
            row.reason = str(record.get("reason") or record.get("error"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, rows))


# --- formatting ----------------------------------------------------------------------------


def fmt(value: float) -> str:
    """Three significant digits, with k/M/G/T above a thousand."""
    for suffix in ("", "k", "M", "G", "T"):
        if abs(value) < 999.5 or suffix == "T":
            return f"{value:.3g}{suffix}"
        value /= 1000
    raise AssertionError("unreachable")


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 1 else f"{ratio:.2g}x"


def speed_ratio(workload: Workload, ours: float, theirs: float) -> float:
    """How many times faster ``ours`` is (below 1: slower), whatever the unit's direction."""
    return ours / theirs if WORKLOAD_INFO[workload].higher_is_better else theirs / ours


@dataclass(frozen=True, slots=True)
class Ratio:
    peer: str | None
    vs_peer: float | None
    floor: str | None
    vs_floor: float | None


def ratios(row: Row, rows: Sequence[Row], workloads: Sequence[Workload]) -> dict[Workload, Ratio]:
    """Compare ``row`` with the best peer of its kind and with its floor, per workload."""
    by_name = {r.subject.name: r for r in rows}
    floor = by_name.get(row.subject.floor or "")
    peers = [
        r
        for r in rows
        if r.subject.kind == row.subject.kind
        and r is not row
        and not r.subject.ours
        and r.subject.kind != "floor"
    ]
    result: dict[Workload, Ratio] = {}
    for w in workloads:
        ours = row.cells[w].median if w in row.cells else None
        if ours is None:
            continue
        sign = 1 if WORKLOAD_INFO[w].higher_is_better else -1
        scored = [(sign * m, p.subject.name, m) for p in peers if (m := _median(p, w)) is not None]
        best = max(scored, default=None)
        floor_median = _median(floor, w) if floor else None
        result[w] = Ratio(
            peer=best[1] if best else None,
            vs_peer=speed_ratio(w, ours, best[2]) if best else None,
            floor=floor.subject.name if floor and floor_median is not None else None,
            vs_floor=speed_ratio(w, ours, floor_median) if floor_median is not None else None,
        )
    return result


def _median(row: Row, workload: Workload) -> float | None:
    cell = row.cells.get(workload)
    return cell.median if cell else None


class Notes:
    """Footnotes for error cells, numbered in order of first appearance."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def ref(self, text: str) -> str:
        return f"[e{self.items.setdefault(text, len(self.items) + 1)}]"


def cell_text(row: Row, workload: Workload, notes: Notes) -> str:
    if workload not in row.workloads:
        return "n/a"
    cell = row.cells.get(workload, Cell())
    parts = []
    if len(cell.samples) == 1:
        parts.append(fmt(cell.samples[0]))
    elif cell.samples:
        lo, hi = min(cell.samples), max(cell.samples)
        parts.append(f"{fmt(statistics.median(cell.samples))} [{fmt(lo)}{DASH}{fmt(hi)}]")
    if cell.errors:
        refs = "".join(notes.ref(f"{row.subject.name} {workload}: {e}") for e in set(cell.errors))
        label = "error" if not cell.samples else f"+{len(cell.errors)} err"
        parts.append(f"{label} {refs}")
    return " ".join(parts) or "-"


def render(rows: Sequence[Row], workloads: Sequence[Workload], ratios_for: str) -> str:
    notes = Notes()
    header = [
        "subject",
        "kind",
        *(f"{w} {WORKLOAD_INFO[w].title} ({WORKLOAD_INFO[w].unit})" for w in workloads),
    ]
    table: list[list[str]] = [header]
    for row in rows:
        if not row.available:
            continue
        table.append(
            [row.subject.name, row.subject.kind, *(cell_text(row, w, notes) for w in workloads)]
        )
        if not _wants_ratios(row.subject, ratios_for):
            continue
        found = ratios(row, rows, workloads)
        vs_peer = [f"  vs best {row.subject.kind} peer", ""]
        vs_floor = [f"  vs {row.subject.floor}", ""]
        for w in workloads:
            r = found.get(w)
            vs_peer.append(f"{fmt_ratio(r.vs_peer)} {r.peer}" if r and r.vs_peer else "-")
            vs_floor.append(fmt_ratio(r.vs_floor) if r and r.vs_floor else "-")
        table += [vs_peer, vs_floor] if row.subject.floor else [vs_peer]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    text = "\n".join(line.rstrip() for line in lines)
    text += f"\n\nCells: median [min{DASH}max] over the repetitions."
    if any(_wants_ratios(r.subject, ratios_for) for r in rows if r.available):
        text += " Ratios are speed ratios (above 1x: faster than the peer or floor)."
    if notes.items:
        text += "\n\nErrors:\n" + "\n".join(f"  [e{n}] {t}" for t, n in notes.items.items())
    missing = [r for r in rows if not r.available]
    if missing:
        text += "\n\nNot available:\n" + "\n".join(
            f"  {r.subject.name}: {r.reason}" for r in missing
        )
    return text


def _wants_ratios(subject: Subject, ratios_for: str) -> bool:
    return subject.ours or bool(ratios_for and _matches(subject.name, [ratios_for]))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Case-insensitive glob; a pattern without wildcards matches as a substring."""
    name = name.lower()
    for pattern in patterns:
        pattern = pattern.lower()
        if not any(c in pattern for c in "*?["):
            pattern = f"*{pattern}*"
        if fnmatch.fnmatchcase(name, pattern):
            return True
    return False


# --- JSON ----------------------------------------------------------------------------------


def to_json(
    rows: Sequence[Row],
    workloads: Sequence[Workload],
    mode: Mode,
    params: Params,
    reps: int,
    meta: dict[str, Any],
    ratios_for: str,
) -> dict[str, Any]:
    subjects = []
    for row in rows:
        entry: dict[str, Any] = {
            "name": row.subject.name,
            "module": f"benchmarks.subjects.{row.subject.module}",
            "kind": row.subject.kind,
            "floor": row.subject.floor,
            "options": dict(row.subject.options),
            "ours": row.subject.ours,
            "available": row.available,
        }
        if not row.available:
            entry["reason"] = row.reason
            subjects.append(entry)
            continue
        entry["versions"] = row.versions
        results: dict[str, Any] = {}
        for w in workloads:
            cell = row.cells.get(w)
            if w not in row.workloads or cell is None:
                results[w] = {"status": "n/a"}
                continue
            status = "ok" if not cell.errors else "partial" if cell.samples else "error"
            result: dict[str, Any] = {"status": status, "samples": cell.samples}
            if cell.samples:
                result |= {
                    "median": statistics.median(cell.samples),
                    "min": min(cell.samples),
                    "max": max(cell.samples),
                }
            if cell.errors:
                result["errors"] = cell.errors
            results[w] = result
        entry["results"] = results
        if _wants_ratios(row.subject, ratios_for):
            entry["ratios"] = {w: asdict(r) for w, r in ratios(row, rows, workloads).items()}
        subjects.append(entry)
    return {
        "meta": meta,
        "mode": mode.name,
        "repetitions": reps,
        "params": {k: v for k, v in asdict(params).items() if k != "options"},
        "workloads": {w: asdict(WORKLOAD_INFO[w]) for w in workloads},
        "subjects": subjects,
    }


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark remote-exec against its peers and the raw floors.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick", action="store_true", help="3 repetitions instead of 5 (same sizes)"
    )
    group.add_argument(
        "--smoke",
        action="store_true",
        help="one tiny repetition of the smoke subjects, for CI; exits 1 on any error",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="subjects to run (glob, or substring; case-insensitive; repeatable)",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated, e.g. W1,W3"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default: by mode)")
    parser.add_argument("--timeout", type=float, help="seconds per measurement (default: by mode)")
    add_json_options(
        parser,
        None,
        "where to write the results (default: benchmarks/results/latest.json, "
        "or smoke.json with --smoke)",
    )
    parser.add_argument(
        "--python",
        default=default_python(),
        help="interpreter for the measurements (default: .bench-venv/bin/python if present)",
    )
    parser.add_argument(
        "--ratios-for",
        default="",
        metavar="PATTERN",
        help="also print ratio rows for these subjects (remote-exec rows always get them)",
    )
    parser.add_argument(
        "--require-available",
        action="store_true",
        help="exit 1 if a selected subject is not available (e.g. in CI once remote-exec is done)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--list", action="store_true", help="list the subjects and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    reps = args.reps or mode.reps
    timeout = args.timeout or mode.timeout
    workloads: list[Workload] = [w for w in WORKLOADS if w in args.workloads.upper().split(",")]

    subjects = [s for s in SUBJECTS.values() if (s.smoke or not args.smoke)]
    if args.only:
        subjects = [s for s in subjects if _matches(s.name, args.only)]
    if not subjects or not workloads:
        print("nothing selected", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"benchmark interpreter: {args.python}")
    rows = [Row(s) for s in subjects]
    probe(args.python, rows)
    for row in rows:
        if not row.available:
            log(f"not available: {row.subject.name}: {row.reason}")
    if args.list:
        for row in rows:
            supported = ",".join(row.workloads) if row.available else "not available"
            print(f"{row.subject.name:<40} {row.subject.kind:<8} {supported}")
        return 0

    jobs = [(row, w) for row in rows if row.available for w in workloads if w in row.workloads]
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"warning: load average {load_before[0]:.2f} before starting; numbers will be noisy")
    started = time.monotonic()
    rng = random.Random(args.seed)
    done = 0
    for rep in range(reps):
        order = list(jobs)
        rng.shuffle(order)
        for row, w in order:
            done += 1
            t0 = time.monotonic()
            record = run_child(
                args.python, ["run", row.subject.name, w, mode.params.to_json()], timeout
            )
            cell = row.cells.setdefault(w, Cell())
            if "value" in record:
                cell.samples.append(record["value"])
                outcome = f"{fmt(record['value'])} {WORKLOAD_INFO[w].unit}"
            else:
                cell.errors.append(str(record.get("error")))
                outcome = f"ERROR {record.get('error')}"[:100]
            elapsed = time.monotonic() - t0
            log(
                f"[{done}/{len(jobs) * reps}] rep {rep + 1}/{reps} {row.subject.name} {w}: "
                f"{outcome} ({elapsed:.1f} s)"
            )

    total = time.monotonic() - started
    text = render(rows, workloads, args.ratios_for)
    print(
        f"\nremote-exec benchmarks, mode {mode.name}: {reps} repetition(s), "
        f"{len(jobs) * reps} measurements in {total:.0f} s\n"
    )
    print(text)

    if not args.no_json:
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "git": git_revision(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": args.python,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "seconds": round(total, 1),
        }
        path: Path = args.json or RESULTS_DIR / mode.json_name
        write_json(path, to_json(rows, workloads, mode, mode.params, reps, meta, args.ratios_for))

    failed = args.smoke and any(cell.errors for row in rows for cell in row.cells.values())
    missing = args.require_available and not all(row.available for row in rows)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
