#!/usr/bin/env python3
"""Compare two revisions side by side: the speed of HEAD (or the working tree) against a base.

    python benchmarks/compare.py --base REV [--head REV|WORKTREE] [--reps N]
        [--only PATTERN ...] [--workloads W1,W2] [--quick | --smoke] [--json OUT]

For a refactor, speed is measured against the previous commit in one run and
reported as ratios. This script materialises the base revision as a plain tree
(``git archive REV | tar -x``) in ``.bench-base/<full sha>/``, creates a venv
there once (``.venv``: ``pip install -e <tree> numpy``; reused when its stamp
says the install finished), then, for each repetition r, runs that tree's own
``benchmarks/run.py --reps 1 --seed r`` once in the base tree and once in the
head tree (by default the working tree, with ``.venv/bin/python``),
alternating which side goes first, so the machine's drift spreads over both.

It prints, per subject present on both sides and per workload, each side's
median [min-max] over the repetitions and the ratio of the medians oriented so
that above 1x means head is better (the per-repetition ratios' range follows in
brackets), and writes the same as JSON (default ``benchmarks/results/compare.json``).

Each side runs its own ``benchmarks/`` (harness, subjects, sizes): a difference
there shows up in the ratios as much as one in remote-exec, and is warned about
when the sizes differ. A side run that fails, or outlives ``--side-timeout``
(its measurement processes are killed with it), becomes an error, shown with
its output's last lines; the other side's numbers are still reported.

This file only needs the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".bench-base"
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "compare.json"
WORKTREE = "WORKTREE"
STAMP = "compare-install-done"  # in the venv; written once pip has finished
SIDES = ("base", "head")
DASH = "\N{EN DASH}"
WORKLOAD_ORDER = ("W1", "W2", "W3", "W4")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Failure(Exception):
    """Setting up a side failed; the message says why."""


# --- git and the trees -----------------------------------------------------------------------


def git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise Failure(f"git {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout.strip()


def resolve(rev: str) -> str:
    """The full sha of the commit ``rev`` names."""
    return git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")


def describe_commit(sha: str) -> str:
    """``<short sha> <date> <subject>``, cut to 80 characters."""
    line = git("log", "-1", "--format=%h %ad %s", "--date=short", sha)
    return line if len(line) <= 80 else line[:79] + "\N{HORIZONTAL ELLIPSIS}"


def worktree_state() -> dict[str, Any]:
    """HEAD, the changed files and a fingerprint of the working tree's content.

    The fingerprint (tracked changes against HEAD plus the untracked files'
    content) is taken before and after the run: if it moved, the head side
    measured a tree that was being edited.
    """
    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=all").splitlines()
    digest = hashlib.sha256(head.encode())
    diff = subprocess.run(
        ["git", "diff", "HEAD", "--binary"], cwd=REPO_ROOT, capture_output=True, check=False
    ).stdout
    digest.update(diff)
    for name in sorted(git("ls-files", "--others", "--exclude-standard", "-z").split("\0")):
        path = REPO_ROOT / name
        if name and path.is_file():
            digest.update(name.encode() + b"\0")
            with contextlib.suppress(OSError):
                digest.update(path.read_bytes())
    return {"head": head, "changes": status, "fingerprint": digest.hexdigest()[:16]}


def materialise(sha: str) -> Path:
    """``.bench-base/<sha>/``: the plain tree of commit ``sha``, extracted once."""
    tree = CACHE_DIR / sha
    if tree.is_dir():
        return tree
    CACHE_DIR.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:12]}-", dir=CACHE_DIR))
    try:
        log(f"extracting {sha[:12]} into {tree.relative_to(REPO_ROOT)}/")
        archive = subprocess.Popen(
            ["git", "archive", "--format=tar", sha], cwd=REPO_ROOT, stdout=subprocess.PIPE
        )
        assert archive.stdout is not None
        tar = subprocess.run(
            ["tar", "-x", "-C", str(tmp)], stdin=archive.stdout, capture_output=True, check=False
        )
        archive.stdout.close()
        if archive.wait() != 0 or tar.returncode != 0:
            raise Failure(f"git archive {sha} | tar -x failed: {tar.stderr.decode().strip()}")
        os.rename(tmp, tree)  # atomic: a tree that exists is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def ensure_venv(tree: Path, creator: str, timeout: float) -> str:
    """``tree/.venv`` with the tree installed (editable) and numpy; its python."""
    venv = tree / ".venv"
    python = venv / "bin" / "python"
    if (venv / STAMP).is_file() and python.exists():
        return str(python)
    if venv.exists():
        log(f"removing the unfinished venv {venv}")
        shutil.rmtree(venv)
    install_log = tree / "compare-install.log"
    log(f"creating {venv} with {creator}; pip install -e . numpy (log: {install_log})")
    with install_log.open("w") as out:
        for argv in (
            [creator, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-e", str(tree), "numpy"],
        ):
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            try:
                code = subprocess.run(
                    argv,
                    check=False,
                    cwd=tree,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                ).returncode
                outcome = f"exit code {code}"
            except subprocess.TimeoutExpired:
                code, outcome = -1, f"timed out after {timeout:g} s"
            if code != 0:
                raise Failure(
                    f"{' '.join(argv[:4])}: {outcome}; the end of {install_log}:\n"
                    + tail(install_log)
                )
    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=False
    ).stdout
    (venv / STAMP).write_text(frozen)
    return str(python)


def tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError as exc:
        return f"({exc})"


# --- one side, one repetition ----------------------------------------------------------------


@dataclass(slots=True)
class Side:
    name: str  # "base" or "head"
    label: str  # what the user asked for: a revision, or WORKTREE
    sha: str  # the commit (for WORKTREE: HEAD, plus the working tree's changes)
    tree: Path
    python: str
    runs: list[dict[str, Any]] = field(default_factory=list)  # per repetition
    results: list[dict[str, Any]] = field(default_factory=list)  # run.py's JSON per repetition


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (Linux: from /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill run.py's process group and each measurement's (they run in their own sessions)."""
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGSTOP)  # no new children while we collect them
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # a session leader's group id is its pid
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run_side(side: Side, rep: int, args: argparse.Namespace, workdir: Path) -> None:
    """``run.py --reps 1 --seed rep`` in ``side.tree``; appends to ``side.runs``/``results``."""
    out_json = workdir / f"{side.name}-{rep}.json"
    argv = [
        side.python,
        str(side.tree / "benchmarks" / "run.py"),
        "--reps",
        "1",
        "--seed",
        str(rep),
        "--json",
        str(out_json),
        "--workloads",
        args.workloads,
        "--python",
        side.python,
    ]
    for pattern in args.only:
        argv += ["--only", pattern]
    if args.quick:
        argv.append("--quick")
    if args.smoke:
        argv.append("--smoke")
    if args.timeout:
        argv += ["--timeout", str(args.timeout)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    stdout_path, stderr_path = (
        workdir / f"{side.name}-{rep}.out",
        workdir / f"{side.name}-{rep}.err",
    )
    record: dict[str, Any] = {"rep": rep, "argv": argv, "ok": False}
    started = time.monotonic()
    log(f"rep {rep + 1}/{args.reps} {side.name} ({side.label}): run.py in {side.tree}")
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=side.tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        timed_out = False
        progress = Progress(stderr_path, side.name)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > args.side_timeout:
                    timed_out = True
                    kill_tree(proc)
                    proc.wait()
                    break
                progress.echo()
                time.sleep(0.2)
        except BaseException:  # Ctrl-C: leave nothing running
            kill_tree(proc)
            proc.wait()
            raise
        progress.echo(final=True)
    record["seconds"] = round(time.monotonic() - started, 1)
    record["exit_code"] = proc.returncode
    data = None
    if timed_out:
        record["error"] = f"run.py timed out after {args.side_timeout:g} s (killed)"
    elif out_json.is_file():
        try:
            data = json.loads(out_json.read_text())
        except (OSError, ValueError) as exc:
            record["error"] = f"unreadable results {out_json}: {exc}"
    else:
        last = tail(stderr_path, 8) or tail(stdout_path, 8) or "no output"
        record["error"] = f"run.py exited with code {proc.returncode} and no results:\n{last}"
    if data is not None:
        record["ok"] = True
        if proc.returncode != 0:  # e.g. --smoke exits 1 when a measurement failed
            record["note"] = f"run.py exited with code {proc.returncode}"
        data["_rep"] = rep
        side.results.append(data)
    if "error" in record:
        log(f"rep {rep + 1} {side.name}: ERROR {record['error']}")
    side.runs.append(record)


class Progress:
    """Copies run.py's stderr (its progress lines) to ours as it grows, prefixed by the side."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path, self.prefix, self.offset, self.partial = path, prefix, 0, b""

    def echo(self, *, final: bool = False) -> None:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = b"" if final else lines.pop()
        for line in lines:
            text = line.decode(errors="replace").rstrip()
            if text:
                log(f"  {self.prefix}| {text}")


# --- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Cell:
    samples: list[float] = field(default_factory=list)
    by_rep: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    na: bool = False

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples}
        if self.samples:
            out |= {
                "median": statistics.median(self.samples),
                "min": min(self.samples),
                "max": max(self.samples),
            }
        if self.errors:
            out["errors"] = self.errors
        if self.na:
            out["status"] = "n/a"
        return out


def collect(side: Side) -> tuple[dict[str, dict[str, Cell]], dict[str, Any], dict[str, str]]:
    """Per subject, per workload, the samples of every repetition; options; unavailable."""
    cells: dict[str, dict[str, Cell]] = {}
    options: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for data in side.results:
        rep = data["_rep"]
        for subject in data.get("subjects", []):
            name = subject["name"]
            options[name] = subject.get("options", {})
            if not subject.get("available"):
                unavailable[name] = str(subject.get("reason", "not available"))
                continue
            unavailable.pop(name, None)
            for w, result in subject.get("results", {}).items():
                cell = cells.setdefault(name, {}).setdefault(w, Cell())
                if result.get("status") == "n/a":
                    cell.na = True
                    continue
                for value in result.get("samples", []):
                    cell.samples.append(value)
                    cell.by_rep[rep] = value
                cell.errors += [str(e) for e in result.get("errors", [])]
    return cells, options, unavailable


def fmt(value: float) -> str:
    """Three significant digits, with k/M/G above a thousand (as run.py)."""
    for suffix in ("", "k", "M", "G", "T"):
        if abs(value) < 999.5 or suffix == "T":
            return f"{value:.3g}{suffix}"
        value /= 1000
    raise AssertionError("unreachable")


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.3f}x"


def oriented(head: float, base: float, higher_is_better: bool) -> float:
    """Above 1: head is better."""
    return head / base if higher_is_better else base / head


def cell_text(cell: Cell | None, notes: dict[str, int], who: str) -> str:
    if cell is None:
        return "-"
    if cell.na:
        return "n/a"
    parts = []
    if cell.samples:
        med = statistics.median(cell.samples)
        if len(cell.samples) == 1:
            parts.append(fmt(med))
        else:
            parts.append(f"{fmt(med)} [{fmt(min(cell.samples))}{DASH}{fmt(max(cell.samples))}]")
    if cell.errors:
        refs = "".join(
            f"[e{notes.setdefault(f'{who}: {e}', len(notes) + 1)}]"
            for e in dict.fromkeys(cell.errors)
        )
        parts.append(("error " if not cell.samples else f"+{len(cell.errors)} err ") + refs)
    return " ".join(parts) or "-"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare(base: Side, head: Side) -> tuple[str, dict[str, Any], bool]:
    """The text report, its JSON, and whether everything compared cleanly."""
    b_cells, b_opts, b_unavail = collect(base)
    h_cells, h_opts, h_unavail = collect(head)
    infos: dict[str, Any] = {}
    warnings: list[str] = []
    for side in (base, head):
        for data in side.results:
            for w, info in data.get("workloads", {}).items():
                if w in infos and infos[w].get("higher_is_better") != info.get("higher_is_better"):
                    warnings.append(f"{w}: the sides disagree on which direction is better")
                infos.setdefault(w, info)
    params = {s.name: s.results[0].get("params") for s in (base, head) if s.results}
    if len(params) == 2 and params["base"] != params["head"]:
        diff = sorted(
            k
            for k in set(params["base"] or {}) | set(params["head"] or {})
            if (params["base"] or {}).get(k) != (params["head"] or {}).get(k)
        )
        warnings.append(
            "the sides ran different sizes ("
            + ", ".join(
                f"{k} {(params['base'] or {}).get(k)} vs {(params['head'] or {}).get(k)}"
                for k in diff
            )
            + "): their ratios compare different work"
        )
    names = [n for n in h_cells if n in b_cells]
    warnings += [
        f"{n}: options differ (base {b_opts.get(n)}, head {h_opts.get(n)})"
        for n in names
        if b_opts.get(n) != h_opts.get(n)
    ]
    workloads = [w for w in WORKLOAD_ORDER if w in infos] + sorted(set(infos) - set(WORKLOAD_ORDER))

    notes: dict[str, int] = {}
    rows: list[list[str]] = [["subject", "workload", "base", "head", "head vs base"]]
    comparisons: list[dict[str, Any]] = []
    clean = all(r.get("ok") and "note" not in r for s in (base, head) for r in s.runs)
    for name in names:
        for w in workloads:
            bc, hc = b_cells[name].get(w), h_cells[name].get(w)
            if bc is None and hc is None:
                continue
            info = infos[w]
            better_high = bool(info.get("higher_is_better"))
            entry: dict[str, Any] = {
                "subject": name,
                "options": h_opts.get(name),
                "workload": w,
                "unit": info.get("unit"),
                "higher_is_better": better_high,
                "base": bc.summary() if bc else None,
                "head": hc.summary() if hc else None,
                "ratio": None,
            }
            ratio_text = "-"
            if bc and hc and bc.na and hc.na:
                ratio_text = "n/a"
            elif bc and hc and bc.samples and hc.samples:
                ratio = oriented(
                    statistics.median(hc.samples), statistics.median(bc.samples), better_high
                )
                paired = [
                    oriented(hc.by_rep[r], bc.by_rep[r], better_high)
                    for r in sorted(set(bc.by_rep) & set(hc.by_rep))
                ]
                entry["ratio"] = ratio
                entry["paired_ratios"] = paired
                ratio_text = fmt_ratio(ratio)
                if len(paired) > 1:
                    ratio_text += f" [{min(paired):.3f}{DASH}{max(paired):.3f}]"
            if (bc and bc.errors) or (hc and hc.errors):
                clean = False
            comparisons.append(entry)
            rows.append(
                [
                    name,
                    f"{w} {info.get('title', '')} ({info.get('unit', '')})",
                    cell_text(bc, notes, f"base {name} {w}"),
                    cell_text(hc, notes, f"head {name} {w}"),
                    ratio_text,
                ]
            )
    only = {  # only meaningful when the other side produced results at all
        "base": sorted(set(b_cells) - set(h_cells) - set(h_unavail)) if head.results else [],
        "head": sorted(set(h_cells) - set(b_cells) - set(b_unavail)) if base.results else [],
    }
    unavailable = {"base": b_unavail, "head": h_unavail}

    text = []
    if not any(c["ratio"] for c in comparisons):
        clean = False
    if len(rows) > 1:
        text.append(table(rows))
        text.append(
            f"\nCells: median [min{DASH}max] over the repetitions. head vs base: ratio of the "
            f"medians, above 1x = head better (for W1, lower is better, so base/head); in "
            f"brackets the range of the per-repetition ratios."
        )
    else:
        text.append("No subject has results on both sides.")
        clean = False
    failed = [(s.name, r) for s in (base, head) for r in s.runs if not r.get("ok") or "note" in r]
    if failed:
        text.append("\nSide runs that failed:")
        for n, r in failed:
            message = str(r.get("error") or r.get("note")).replace("\n", "\n      ")
            text.append(f"  rep {r['rep'] + 1} {n}: {message}")
    if notes:
        text.append("\nErrors:")
        text += [f"  [e{i}] {t}" for t, i in notes.items()]
    for side_name in SIDES:
        if only[side_name]:
            text.append(f"\nOnly on the {side_name} side: {', '.join(only[side_name])}")
        for n, reason in unavailable[side_name].items():
            text.append(f"Not available on the {side_name} side: {n}: {reason}")
    if warnings:
        text.append("\nWarnings:")
        text += [f"  {w}" for w in dict.fromkeys(warnings)]
    data = {
        "workloads": infos,
        "params": params,
        "comparisons": comparisons,
        "only_on": only,
        "unavailable": unavailable,
        "warnings": list(dict.fromkeys(warnings)),
    }
    return "\n".join(text), data, clean


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark a head revision (default: the working tree) against a base "
        "revision, side by side, interleaved; report speed ratios.",
    )
    parser.add_argument("--base", required=True, metavar="REV", help="e.g. HEAD~1 or a sha")
    parser.add_argument(
        "--head",
        default=WORKTREE,
        metavar="REV|WORKTREE",
        help="a revision, or WORKTREE (default): this working tree with .venv/bin/python",
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions per side (default 5)")
    parser.add_argument(
        "--only",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="subjects, as run.py's --only (glob or case-insensitive substring; repeatable)",
    )
    parser.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated, e.g. W1,W4")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="run.py --quick sizes (W2, W3 smaller)")
    sizes.add_argument(
        "--smoke",
        action="store_true",
        help="run.py --smoke: tiny sizes, smoke subjects only; to check the tool, not to measure",
    )
    parser.add_argument("--timeout", type=float, help="run.py's seconds per measurement")
    parser.add_argument(
        "--side-timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="kill one side's run.py (and its measurements) after S seconds (default 3600)",
    )
    parser.add_argument(
        "--head-python",
        help="interpreter for a WORKTREE head (default: .venv/bin/python of this tree)",
    )
    parser.add_argument(
        "--venv-python",
        help="interpreter that creates the revisions' venvs (default: the head's for "
        "WORKTREE, so both sides run the same Python; else this one)",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the comparison"
    )
    parser.add_argument("--no-json", action="store_true", help="do not write any JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep run.py's per-side results and output"
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


def make_side(name: str, rev: str, args: argparse.Namespace) -> Side:
    if name == "head" and rev.upper() == WORKTREE:
        python = args.head_python or str(REPO_ROOT / ".venv" / "bin" / "python")
        if not Path(python).exists():
            raise Failure(f"no {python}: create the project's venv, or pass --head-python")
        return Side(name, WORKTREE, git("rev-parse", "HEAD"), REPO_ROOT, python)
    sha = resolve(rev)
    return Side(name, rev, sha, materialise(sha), "")


def venv_creator(head: Side, args: argparse.Namespace) -> str:
    if args.venv_python:
        return str(args.venv_python)
    return head.python if head.label == WORKTREE else sys.executable


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        yield path
    finally:
        if keep:
            log(f"run.py's results and output kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def python_version(python: str) -> str:
    return (
        subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        or "unknown"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        base = make_side("base", args.base, args)
        head = make_side("head", args.head, args)
        creator = venv_creator(head, args)
        for side in (base, head):
            if not side.python:
                side.python = ensure_venv(side.tree, creator, timeout=1800.0)
            if not (side.tree / "benchmarks" / "run.py").is_file():
                raise Failure(
                    f"{side.name} {side.label} ({side.sha[:12]}) has no benchmarks/run.py"
                )
        state_before = worktree_state() if head.label == WORKTREE else None
    except Failure as exc:
        log(f"compare: {exc}")
        return 2

    def revision(side: Side) -> str:
        named = f"{side.label} = " if side.label != side.sha else ""
        text = f"{named}{side.sha} ({describe_commit(side.sha)})"
        if side.label == WORKTREE:
            assert state_before is not None
            changed = state_before["changes"]
            text = f"the working tree {REPO_ROOT} at HEAD {side.sha} ({describe_commit(side.sha)})"
            text += f" + {len(changed)} uncommitted change(s)" if changed else ", clean"
        return text

    versions = {s.name: python_version(s.python) for s in (base, head)}
    header = [
        f"base: {revision(base)}",
        f"      python {base.python} ({versions['base']})",
        f"head: {revision(head)}",
        f"      python {head.python} ({versions['head']})",
    ]
    if versions["base"] != versions["head"]:
        header.append(
            f"warning: the sides run different Pythons ({versions['base']} vs {versions['head']})"
        )
    for line in header:
        log(line)
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"warning: load average {load_before[0]:.2f} before starting; numbers will be noisy")
    started = time.monotonic()
    with workdir(args.keep) as tmp:
        for rep in range(args.reps):
            order = (base, head) if rep % 2 == 0 else (head, base)
            for side in order:
                run_side(side, rep, args, tmp)
    total = time.monotonic() - started

    state_after = worktree_state() if head.label == WORKTREE else None
    text, data, clean = compare(base, head)
    if state_before and state_after and state_before["fingerprint"] != state_after["fingerprint"]:
        text += (
            "\n\nwarning: the working tree changed during the run (someone edited it): "
            "the head side may have measured more than one version"
        )
        clean = False
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    print(
        f"\nbenchmarks/compare.py: {args.reps} repetition(s) per side, sizes {mode}, {total:.0f} s"
    )
    print("\n".join(header) + "\n")
    print(text)

    if not args.no_json:
        sides = {}
        for side in (base, head):
            entry: dict[str, Any] = {
                "rev": side.label,
                "sha": side.sha,
                "commit": describe_commit(side.sha),
                "tree": str(side.tree),
                "python": side.python,
                "python_version": versions[side.name],
                "runs": side.runs,
            }
            if side.label == WORKTREE:
                entry["worktree_before"] = state_before
                entry["worktree_after"] = state_after
            sides[side.name] = entry
        out = {
            "meta": {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "seconds": round(total, 1),
                "argv": sys.argv[1:] if argv is None else list(argv),
            },
            "settings": {
                "reps": args.reps,
                "only": args.only,
                "workloads": args.workloads,
                "sizes": mode,
                "timeout": args.timeout,
            },
            "sides": sides,
            **data,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
