"""``remote-exec serve --history``: the SQLite file, its bounds, and restarts."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.invocations import InvocationInfo, InvocationScope, InvocationStatus, LogEntry
from remote_exec.runtime.invocations import InvocationTable
from remote_exec.server.history import (
    HistoryError,
    InvocationHistory,
    get_invocation,
    list_invocations,
)
from tests.status.conftest import TOKEN
from tests.status.instruments import Stage
from tests.ws_instruments import DaemonProcess, http_get, run_cli

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def info(
    n: int,
    *,
    ended: float | None = None,
    log: int = 2,
    message: str = "line",
    status: InvocationStatus = InvocationStatus.COMPLETED,
    instance: str = "stage",
    method: str = "scan",
) -> InvocationInfo:
    end = time.time() if ended is None else ended
    return InvocationInfo(
        id=f"session-{n}",
        instance=instance,
        method=method,
        status=status,
        requested_at=end - 1.0,
        started_at=end - 0.5,
        ended_at=end,
        error=None if status is InvocationStatus.COMPLETED else "InvocationCancelled: stop",
        log=tuple(LogEntry(end - 0.1, "INFO", "lab.stage", f"{message} {i}") for i in range(log)),
    )


@pytest.fixture
def history(tmp_path: Path) -> Iterator[InvocationHistory]:
    kept = InvocationHistory(tmp_path / "history.db")
    yield kept
    kept.close()


def file_size(path: Path) -> int:
    return sum(
        candidate.stat().st_size
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        if candidate.exists()
    )


# -- the file -------------------------------------------------------------------------------
def test_rows_round_trip(history: InvocationHistory) -> None:
    first, second = info(1), info(2, status=InvocationStatus.CANCELLED, message="<b>bold</b>")
    assert history.write([first, second]) == 2
    assert history.read_one("session-1") == first
    assert history.read_one("session-2") == second
    assert history.read_one("nope") is None
    assert history.read_list() == [first, second]
    assert history.read_list(status="cancelled") == [second]
    assert history.read_list(limit=1) == [second]  # the newest
    assert history.read_list(exclude={"session-2"}) == [first]
    assert history.statistics()["rows"] == 2


def test_a_new_history_is_wal_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    first = InvocationHistory(path)
    written = info(1)
    first.write([written])
    first.close()
    again = InvocationHistory(path)
    try:
        assert again.rows == 1
        assert again.read_one("session-1") == written
    finally:
        again.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    if sys.platform != "win32":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # logs are private


def test_the_row_bound_holds_after_20000_invocations(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    history = InvocationHistory(path, max_rows=1000)
    try:
        for batch in range(40):
            history.write([info(batch * 500 + n) for n in range(500)])
            assert history.rows <= 1000
        assert history.written == 20_000
        kept = history.read_list(limit=5000)
        assert len(kept) == 1000
        assert [row.id for row in kept] == [f"session-{n}" for n in range(19_000, 20_000)]
    finally:
        history.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM invocations").fetchone()[0] == 1000


def test_the_size_bound_holds_after_20000_invocations(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    limit = 512 * 1024
    history = InvocationHistory(path, max_size=limit)
    try:
        for batch in range(40):
            # About 1.2 KB of log each: 24 MB written in all, 20 times the bound.
            history.write([info(batch * 500 + n, log=20, message="x" * 40) for n in range(500)])
            assert history.size <= limit
        assert history.written == 20_000
        rows = history.rows
        assert 200 < rows < 600  # what fits in 512 KiB
        newest = history.read_list(limit=1)[0]
        assert newest.id == "session-19999"
        assert len(newest.log) == 20
    finally:
        history.close()
    with sqlite3.connect(path) as raw:
        stored = raw.execute("SELECT coalesce(sum(size), 0) FROM invocations").fetchone()[0]
        assert stored <= limit
    # The file itself (with its -wal) stays within the bound and the WAL's own.
    assert file_size(path) < 2 * limit + 8 * 1024 * 1024
    assert path.stat().st_size < 2 * limit


def test_old_rows_age_out(tmp_path: Path) -> None:
    now = [1_000_000.0]
    history = InvocationHistory(tmp_path / "h.db", max_age=3600, clock=lambda: now[0])
    try:
        history.write([info(1, ended=now[0] - 7200), info(2, ended=now[0] - 60)])
        assert [row.id for row in history.read_list()] == ["session-2"]
        now[0] += 3600
        history.write([info(3, ended=now[0])])
        assert [row.id for row in history.read_list()] == ["session-3"]
    finally:
        history.close()


def test_one_huge_log_keeps_its_newest_records(tmp_path: Path) -> None:
    history = InvocationHistory(tmp_path / "h.db", max_size=64 * 1024)
    try:
        history.write([info(1, log=1000, message="y" * 100)])
        (row,) = history.read_list()
        assert 0 < len(row.log) < 1000
        assert row.log[-1].message.endswith(" 999")  # the newest records are the ones kept
        assert history.size <= 64 * 1024 // 16 + 1024
    finally:
        history.close()


def test_the_writer_thread_stores_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    history = InvocationHistory(path)
    reader = InvocationHistory(path)
    try:
        history.start()
        scope = InvocationScope("session-9", "stage", "home")
        scope.start()
        scope.add_log(LogEntry(time.time(), "INFO", "lab.stage", "homing"))
        history.observe(scope)  # not finished: not kept
        scope.finish()
        history.observe(scope)
        deadline = time.monotonic() + 1.0
        while reader.read_one("session-9") is None:
            assert time.monotonic() < deadline, "not written within a second"
            time.sleep(0.02)
        found = reader.read_one("session-9")
        assert found is not None
        assert found.status is InvocationStatus.COMPLETED
        assert [entry.message for entry in found.log] == ["homing"]
        assert history.written == 1
    finally:
        history.close()
        reader.close()


# -- paths that cannot be used -----------------------------------------------------------------
def test_unusable_paths_are_refused_with_a_reason(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"these are not the bytes of a database " * 100)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE invocations (who TEXT)")
    cases = {
        tmp_path: "is a directory",
        tmp_path / "missing" / "h.db": "does not exist",
        a_file / "h.db": "does not exist",
        corrupt: "corrupt",
        garbage: "not a database",
        other: "not a remote-exec history",
    }
    for path, reason in cases.items():
        with pytest.raises(HistoryError, match=reason) as refused:
            InvocationHistory(path)
        assert str(path) in str(refused.value)
        assert str(refused.value).startswith("--history ")


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="root writes read-only folders"
)
def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(HistoryError, match="writable"):
            InvocationHistory(folder / "h.db")
    finally:
        folder.chmod(0o700)


# -- memory first, then the file --------------------------------------------------------------
class _Done:
    """A finished call, as ``InvocationTable`` tracks one."""

    def __init__(self, scope: InvocationScope) -> None:
        self.invocation = scope

    def cancel_by_id(self) -> None:  # pragma: no cover - finished
        pass


@pytest.mark.anyio
async def test_listing_reads_memory_then_the_file(history: InvocationHistory) -> None:
    table = InvocationTable(max_finished=3)
    history.attach(table)
    for n in range(6):
        scope = InvocationScope(f"session-{n}", "stage", "scan" if n % 2 else "home")
        call = _Done(scope)
        assert table.add(call)
        scope.start()
        scope.add_log(LogEntry(time.time(), "INFO", "lab.stage", f"step {n}"))
        scope.finish()
        table.finished(call)
        await anyio.sleep(0.002)  # distinct times
    history.flush()
    assert [i.id for i in table.list()] == ["session-3", "session-4", "session-5"]
    listed = await list_invocations(table, history)
    assert [i.id for i in listed] == [f"session-{n}" for n in range(6)]
    assert [entry.message for entry in listed[0].log] == ["step 0"]
    assert [i.id for i in await list_invocations(table, history, method="home")] == [
        "session-0",
        "session-2",
        "session-4",
    ]
    assert [i.id for i in await list_invocations(table, history, limit=2)] == [
        "session-4",
        "session-5",
    ]
    assert await list_invocations(table, history, status="running") == []
    assert (await get_invocation(table, history, "session-0")).log[0].message == "step 0"
    with pytest.raises(LookupError):
        await get_invocation(table, history, "session-99")
    with pytest.raises(ValueError, match="bogus"):
        await list_invocations(table, history, status="bogus")


# -- the daemon --------------------------------------------------------------------------------
def daemon_with(history: Path, backend: str, env: dict[str, str], *more: str) -> DaemonProcess:
    return DaemonProcess(
        "--allow-module",
        "tests.*",
        "--backend",
        backend,
        "--history",
        str(history),
        *more,
        env=env,
        token=TOKEN,
    )


async def run_some(url: str, count: int, tag: str) -> list[str]:
    """``count`` finished invocations that log, on a fresh instance; their ids."""
    async with WebSocketExecutor(url, token=TOKEN) as ex:
        stage = Stage(tag)
        async with ex.remote_instance(stage, f"stage-{tag}", tag):
            for n in range(count):
                await stage.say(f"{tag} says <i>{n}</i>")
            ids = [found.id for found in await ex.list_invocations(instance=f"stage-{tag}")]
    assert len(ids) == count
    return ids


@posix_only
@pytest.mark.anyio
async def test_invocations_survive_sigterm_and_sigkill(
    anyio_backend: str, clean_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "history.db"
    with daemon_with(path, anyio_backend, clean_env) as daemon:
        before_term = await run_some(daemon.url, 5, "term")
        # One still running when the daemon is told to stop: kept, cancelled.
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            stage = Stage("long")
            await ex.create_remote_instance(stage, "stage-long", "long")
            long = await ex.submit(stage.scan, 10_000, 0.05)
            with anyio.fail_after(10):
                while len((await ex.get_invocation(long.id)).log) < 3:  # noqa: ASYNC110 - it logs
                    await anyio.sleep(0.02)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait() == 0

    with daemon_with(path, anyio_backend, clean_env) as daemon:
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            listed = {found.id: found for found in await ex.list_invocations()}
            assert set(before_term) <= set(listed)
            first = listed[before_term[0]]
            assert first.status == "completed"
            assert [entry.message for entry in first.log] == ["term says <i>0</i>"]
            assert listed[long.id].status == "cancelled"
            assert any("step 1:" in entry.message for entry in listed[long.id].log)
            assert (await ex.get_invocation(before_term[-1])).log[0].message.endswith("4</i>")
        status, _, body = await http_get(
            daemon.port,
            f"/invocations/{before_term[1]}",
            {"Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 200
        assert json.loads(body)["log"][0][3] == "term says <i>1</i>"
        # The rest of this daemon's life is lost to SIGKILL, but not what
        # finished a second before.
        before_kill = await run_some(daemon.url, 5, "kill")
        await anyio.sleep(1.0)
        daemon.kill()

    with daemon_with(path, anyio_backend, clean_env) as daemon:
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            listed = {found.id: found for found in await ex.list_invocations()}
            assert set(before_term) | set(before_kill) <= set(listed)
            assert listed[before_kill[-1]].log[0].message == "kill says <i>4</i>"
        command = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "remote_exec.server.cli",
                "invocations",
                "--url",
                daemon.url,
                "--instance",
                "stage-kill",
                "--json",
            ],
            env={**clean_env, "REMOTE_EXEC_TOKEN": TOKEN},
            check=False,
        )
        assert command.returncode == 0, command.stderr
        rows = [json.loads(line) for line in command.stdout.decode().splitlines()]
        assert [row["id"] for row in rows] == before_kill


@posix_only
@pytest.mark.anyio
async def test_the_daemon_keeps_its_bound(clean_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with daemon_with(path, "asyncio", clean_env, "--history-max-rows", "50") as daemon:
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            stage = Stage("many")
            async with ex.remote_instance(stage, "stage"):
                for _ in range(300):
                    await stage.home()
        assert daemon.stop() == 0
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM invocations").fetchone()[0] == 50


@posix_only
def test_an_unusable_history_fails_at_start_up(clean_env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"junk" * 1000)
    for path, reason in ((blocker / "h.db", "does not exist"), (corrupt, "not a database")):
        result = run_cli(["--port", "0", "--no-auth", "--history", str(path)], env=clean_env)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""  # it never served
        assert f"--history {path}" in result.stderr
        assert reason in result.stderr
        assert "Traceback" not in result.stderr
