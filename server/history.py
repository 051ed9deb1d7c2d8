"""``remote-exec serve --history PATH``: finished invocations kept in a SQLite file.

What did the instrument do last night, and what did it log? The daemon keeps
recent invocations in memory (``InvocationTable``, for ``--invocation-retention``
seconds, at most 10,000); with ``--history`` every finished invocation (id,
instance, method, status, times, error and captured log) also goes to a
SQLite file (the standard library's ``sqlite3``, WAL mode), which survives
restarts. ``/invocations``, ``GET /invocations/{id}``, the CLI's
``remote-exec invocations`` and the status page read recent invocations from
memory and older ones from the file (``list_invocations``, ``get_invocation``).

Writing never happens on the event loop: a finished invocation's record is
appended to a queue (``observe``, a deque append), and a writer thread
stores what has queued up in one transaction every ``flush_interval``
(0.5 s), so a daemon killed with SIGKILL loses at most the invocations that
finished in its last half second (a committed WAL transaction survives the
process; ``synchronous=NORMAL`` gives up only what the OS had not written at
a power cut). SIGTERM and SIGINT flush everything before the daemon exits.

The file is bounded by age (``--history-max-age``), rows
(``--history-max-rows``) and size (``--history-max-size``: the bytes of the
rows stored, logs included; the file itself, with its ``-wal``, stays within
that plus about 8 MiB). The oldest rows go first, after each batch; one row
never takes more than a sixteenth of the size bound (its oldest log records
are dropped to fit).

A new file is created readable by the daemon's user only (mode 0600): logs
may hold what others should not read. A path that cannot be used (its folder
missing, not writable, a file that is not a SQLite database, a corrupt one, a
database of something else) fails ``InvocationHistory(...)`` with
``HistoryError`` saying why: the daemon reports it at start-up and exits,
rather than fail later. A write that fails
later (the disk full) is logged, at most once a minute, and its batch
dropped: the daemon goes on serving.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import anyio

from remote_exec.invocations import InvocationInfo, InvocationScope, InvocationStatus, LogEntry
from remote_exec.runtime.invocations import InvocationTable

__all__ = [
    "DEFAULT_HISTORY_MAX_AGE",
    "DEFAULT_HISTORY_MAX_ROWS",
    "DEFAULT_HISTORY_MAX_SIZE",
    "FLUSH_INTERVAL",
    "HISTORY_LIST_LIMIT",
    "HistoryError",
    "InvocationHistory",
    "cancel_invocation",
    "get_invocation",
    "list_invocations",
]

logger = logging.getLogger("remote_exec.server.history")

DEFAULT_HISTORY_MAX_AGE = 7 * 24 * 3600.0
"""Seconds a finished invocation stays in the history file (a week)."""
DEFAULT_HISTORY_MAX_ROWS = 100_000
"""Invocations the history file keeps at most (the oldest go first)."""
DEFAULT_HISTORY_MAX_SIZE = 256 * 1024 * 1024
"""Bytes of rows (logs included) the history file keeps at most."""
FLUSH_INTERVAL = 0.5
"""Seconds between two writes of what finished meanwhile."""
HISTORY_LIST_LIMIT = 1000
"""Invocations read from the file for a listing that gives no limit (the newest)."""
# Rows that may wait for the writer; past it the oldest are dropped (a writer
# that cannot keep up must not grow the daemon without bound).
MAX_QUEUED = 100_000
# The -wal file is cut back to this after each checkpoint.
WAL_LIMIT = 8 * 1024 * 1024
# What a row costs beside its text (times, status, the row's own overhead).
ROW_OVERHEAD = 64
_FORMAT = "remote-exec-history 1"
_COLUMNS = (
    "seq",
    "id",
    "instance",
    "method",
    "status",
    "requested_at",
    "started_at",
    "ended_at",
    "error",
    "log",
    "size",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invocations (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    instance TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL,
    requested_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    error TEXT,
    log TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""
_INDEX = "CREATE INDEX IF NOT EXISTS invocations_ended ON invocations (ended_at)"
_SELECT = "SELECT id, instance, method, status, requested_at, started_at, ended_at, error, log"


class HistoryError(Exception):
    """The history file cannot be used (said at start-up)."""


class InvocationHistory:
    """The history file: a writer thread fed by ``observe``, and reads.

    Args:
        path: the SQLite file (created if missing; its folder must exist).
        max_age: seconds a row is kept after its invocation ended.
        max_rows: rows kept at most.
        max_size: bytes of rows kept at most (see the module docstring).
        flush_interval: seconds between two writes.
        clock: ``time.time`` (tests move it).

    Raises:
        HistoryError: the file cannot be opened, written, or is not a history.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_age: float = DEFAULT_HISTORY_MAX_AGE,
        max_rows: int = DEFAULT_HISTORY_MAX_ROWS,
        max_size: int = DEFAULT_HISTORY_MAX_SIZE,
        flush_interval: float = FLUSH_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not max_age > 0 or max_rows < 1 or max_size < 4096 or not flush_interval > 0:
            raise ValueError("the history's bounds must be positive (max_size at least 4 KiB)")
        self.path = Path(path).expanduser().absolute()
        self.max_age = max_age
        self.max_rows = max_rows
        self.max_size = max_size
        self.max_row_size = max(max_size // 16, 1024)
        self.flush_interval = flush_interval
        self.clock = clock
        self.written = 0  # rows written since start
        self.dropped = 0  # rows lost: a failed write, or a full queue
        self.rows = 0  # rows in the file (after the last batch)
        self.size = 0  # their bytes
        self._queue: deque[InvocationScope | InvocationInfo] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()  # one batch at a time (the thread, or close)
        self._read_lock = threading.Lock()
        self._last_error = -1e9
        self._writer = self._open()
        self._reader = self._connect()

    # -- opening -----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA busy_timeout = 5000")
        return connection

    def _open(self) -> sqlite3.Connection:
        where = f"--history {self.path}"
        if self.path.is_dir():
            raise HistoryError(f"{where}: is a directory, not a file")
        if not self.path.parent.is_dir():
            raise HistoryError(f"{where}: its folder {self.path.parent} does not exist")
        try:
            # The logs of every call may hold what only the daemon's user should
            # read: a new file is private (SQLite gives its -wal the same mode).
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise HistoryError(
                f"{where}: cannot create it: {exc.strerror} (is its folder writable by this user?)"
            ) from exc
        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            raise HistoryError(f"{where}: cannot open it: {exc}") from exc
        try:
            # Only a new file takes it: freed pages can then be given back.
            connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise HistoryError(
                    f"{where}: cannot use write-ahead logging here (journal mode {mode!r}): "
                    "is it writable, and on a local file system?"
                )
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
            check = connection.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise HistoryError(f"{where}: the file is corrupt ({check}): move it away")
            connection.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            columns = tuple(row[1] for row in connection.execute("PRAGMA table_info(invocations)"))
            found = connection.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if columns != _COLUMNS or (found is not None and found[0] != _FORMAT):
                raise HistoryError(
                    f"{where}: this SQLite file is not a remote-exec history (its tables "
                    "differ): give another path"
                )
            connection.execute(_INDEX)
            # Writing now proves that it can be written.
            connection.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (_FORMAT,))
            connection.execute(
                "INSERT OR REPLACE INTO meta VALUES ('opened_at', ?)", (repr(self.clock()),)
            )
            connection.execute("COMMIT")
            self.rows, self.size = connection.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM invocations"
            ).fetchone()
        except HistoryError:
            _rollback(connection)
            connection.close()
            raise
        except sqlite3.Error as exc:
            _rollback(connection)
            connection.close()
            reason = str(exc)
            if "not a database" in reason or "malformed" in reason:
                reason += " (corrupt, or not a SQLite file: move it away)"
            elif "readonly" in reason or "unable to open" in reason:
                reason += " (is it, and its folder, writable by this user?)"
            raise HistoryError(f"{where}: cannot use it: {reason}") from exc
        return connection

    # -- writing -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="remote-exec-history", daemon=True
            )
            self._thread.start()

    def attach(self, table: InvocationTable) -> None:
        """Keep every invocation of ``table`` that finishes from now on."""
        table.observers.append(self.observe)

    def observe(self, scope: InvocationScope) -> None:
        """An ``InvocationTable`` observer: queue ``scope`` once it has finished
        (on the loop: only a deque append)."""
        if scope.status.finished:
            self.queue(scope)

    def queue(self, record: InvocationScope | InvocationInfo) -> None:
        """Have the writer store ``record`` (a finished invocation) at its next batch."""
        queue = self._queue
        if len(queue) >= MAX_QUEUED:
            queue.popleft()
            self.dropped += 1
        queue.append(record)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        last_prune = self.clock()
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
                if self.clock() - last_prune >= 60.0:  # old rows age out with no new ones too
                    last_prune = self.clock()
                    with self._write_lock:
                        self._prune(recount=True)
            except Exception:  # the writer must never die: the next batch tries again
                logger.exception("the history writer failed")

    def flush(self) -> int:
        """Store what is queued, in one transaction; the rows written."""
        with self._write_lock:
            batch: list[InvocationScope | InvocationInfo] = []
            queue = self._queue
            while queue:
                batch.append(queue.popleft())
            if not batch:
                return 0
            return self.write(batch)

    def write(self, records: Sequence[InvocationScope | InvocationInfo]) -> int:
        """Store ``records`` now, in one transaction, then apply the bounds; the
        rows written (0 if the write failed: logged, and counted as dropped).

        The writer thread calls it; tests may too (with no thread started).
        """
        rows = [self._row(record) for record in records]
        connection = self._writer
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "INSERT OR REPLACE INTO invocations "
                "(id, instance, method, status, requested_at, started_at, ended_at, error, "
                "log, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(connection)
            self.dropped += len(rows)
            self._complain(f"could not write {len(rows)} invocations to {self.path}: {exc}")
            return 0
        self.written += len(rows)
        self.rows += len(rows)
        self.size += sum(row[-1] for row in rows)
        self._prune()
        return len(rows)

    def _row(self, record: InvocationScope | InvocationInfo) -> tuple[Any, ...]:
        info = record.info() if isinstance(record, InvocationScope) else record
        error = info.error
        if error is not None and len(error) > self.max_row_size // 2:
            error = error[: self.max_row_size // 2] + "..."
        fixed = len(info.id) + len(info.instance) + len(info.method) + len(error or "")
        log = _fit(info.log, self.max_row_size - fixed - ROW_OVERHEAD)
        size = fixed + len(log) + ROW_OVERHEAD
        return (
            info.id,
            info.instance,
            info.method,
            info.status.value,
            info.requested_at,
            info.started_at,
            info.ended_at,
            error,
            log,
            size,
        )

    def _prune(self, recount: bool = False) -> None:
        """Drop rows past the age, row and size bounds (the oldest first).

        The counts are kept as rows come and go (``recount``: counted anew).
        """
        connection = self._writer
        try:
            connection.execute("BEGIN IMMEDIATE")
            rows, size = self.rows, self.size
            if recount:
                rows, size = connection.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM invocations"
                ).fetchone()
            horizon = self.clock() - self.max_age
            gone, freed = connection.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM invocations WHERE ended_at < ?",
                (horizon,),
            ).fetchone()
            if gone:
                connection.execute("DELETE FROM invocations WHERE ended_at < ?", (horizon,))
                rows, size = rows - gone, size - freed
            cut = None
            if rows > self.max_rows:
                found = connection.execute(
                    "SELECT seq FROM invocations ORDER BY seq LIMIT 1 OFFSET ?",
                    (rows - self.max_rows - 1,),
                ).fetchone()
                cut = found[0] if found else None
            if size > self.max_size:
                excess, counted = size - self.max_size, 0
                for seq, row_size in connection.execute(
                    "SELECT seq, size FROM invocations ORDER BY seq"
                ):
                    counted += row_size
                    if counted >= excess:
                        cut = seq if cut is None else max(cut, seq)
                        break
            if cut is not None:
                more, more_freed = connection.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM invocations WHERE seq <= ?",
                    (cut,),
                ).fetchone()
                connection.execute("DELETE FROM invocations WHERE seq <= ?", (cut,))
                rows, size = rows - more, size - more_freed
                gone += more
            connection.execute("COMMIT")
            self.rows, self.size = rows, size
            if gone:
                free = connection.execute("PRAGMA freelist_count").fetchone()[0]
                pages = connection.execute("PRAGMA page_count").fetchone()[0]
                if free * 4 > pages:  # give a quarter of the file back, not every page
                    # (sqlite3's execute would free one page: a script runs it through)
                    connection.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            _rollback(connection)
            self._complain(f"could not prune {self.path}: {exc}")

    def _complain(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error >= 60.0:
            self._last_error = now
            logger.error("history: %s (said at most once a minute)", message)

    def close(self) -> None:
        """Stop the writer, store what is queued, close the file (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(30.0)
        try:
            self.flush()
        finally:
            with self._write_lock, self._read_lock:
                for connection in (self._writer, self._reader):
                    try:
                        connection.close()
                    except sqlite3.Error:  # pragma: no cover - closing anyway
                        pass

    # -- reading (blocking: call these in a worker thread) -----------------------------
    def read_list(
        self,
        *,
        instance: str | None = None,
        method: str | None = None,
        status: str | None = None,
        limit: int = HISTORY_LIST_LIMIT,
        ended_before: float | None = None,
        exclude: Collection[str] = (),
    ) -> list[InvocationInfo]:
        """The newest ``limit`` rows that match (and that ended before
        ``ended_before``, and are not in ``exclude``), oldest first."""
        where: list[str] = ["1"]
        params: list[Any] = []
        for column, value in (("instance", instance), ("method", method), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if ended_before is not None:
            where.append("ended_at < ?")
            params.append(ended_before)
        query = f"{_SELECT} FROM invocations WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        found: list[InvocationInfo] = []
        with self._read_lock:
            cursor = self._reader.execute(query, (*params, limit + len(exclude)))
            for row in cursor:
                if row[0] in exclude:
                    continue
                found.append(_info(row))
                if len(found) >= limit:
                    break
            cursor.close()
        found.reverse()
        return found

    def read_one(self, invocation_id: str) -> InvocationInfo | None:
        """The row of ``invocation_id``, if the file has it."""
        with self._read_lock:
            row = self._reader.execute(
                f"{_SELECT} FROM invocations WHERE id = ?", (invocation_id,)
            ).fetchone()
        return None if row is None else _info(row)

    def statistics(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "rows": self.rows,
            "bytes": self.size,
            "written": self.written,
            "dropped": self.dropped,
            "queued": len(self._queue),
            "max_age": self.max_age,
            "max_rows": self.max_rows,
            "max_size": self.max_size,
        }


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error:  # pragma: no cover - the connection is unusable anyway
            pass


def _fit(log: Sequence[LogEntry], budget: int) -> str:
    """``log`` as JSON, its oldest records left out until it fits in ``budget`` bytes."""
    rows = [entry.to_wire() for entry in log]
    text = json.dumps(rows, ensure_ascii=False)
    if len(text) <= budget:
        return text
    kept: list[list[Any]] = []
    used = 2
    for row in reversed(rows):
        piece = json.dumps(row, ensure_ascii=False)
        if used + len(piece) + 1 > budget:
            break
        kept.append(row)
        used += len(piece) + 1
    kept.reverse()
    return json.dumps(kept, ensure_ascii=False)


def _info(row: Sequence[Any]) -> InvocationInfo:
    invocation_id, instance, method, status, requested, started, ended, error, log = row
    try:
        entries = tuple(LogEntry.from_wire(item) for item in json.loads(log))
    except (ValueError, TypeError):
        entries = ()
    return InvocationInfo(
        invocation_id,
        instance,
        method,
        InvocationStatus(status),
        requested,
        started,
        ended,
        error,
        entries,
    )


# -- memory first, then the file -----------------------------------------------------------
async def list_invocations(
    table: InvocationTable,
    history: InvocationHistory | None,
    *,
    instance: str | None = None,
    method: str | None = None,
    status: str | InvocationStatus | None = None,
    limit: int | None = None,
) -> list[InvocationInfo]:
    """The invocations in memory, and older ones from the history file, oldest first.

    Without ``limit``: every one in memory, and up to ``HISTORY_LIST_LIMIT``
    (the newest) from the file; with it, the newest ``limit`` of those.

    Raises:
        ValueError: an unknown status, or a limit below 1.
    """
    wanted = None if status is None else InvocationStatus(status)
    if limit is not None and limit < 1:
        raise ValueError(f"a limit is at least 1, not {limit}")
    found = table.list(instance=instance, method=method, status=wanted)
    if history is not None and (wanted is None or wanted.finished):
        # Memory keeps every invocation that finished after its oldest
        # finished one: the file is read below that.
        ended = [info.ended_at for info in found if info.ended_at is not None]
        older = await anyio.to_thread.run_sync(
            lambda: history.read_list(
                instance=instance,
                method=method,
                status=None if wanted is None else wanted.value,
                limit=limit or HISTORY_LIST_LIMIT,
                ended_before=min(ended) if ended else None,
                exclude={info.id for info in found},
            )
        )
        if older:
            found = sorted([*older, *found], key=lambda info: info.requested_at)
    if limit is not None:
        found = found[-limit:]
    return found


async def get_invocation(
    table: InvocationTable, history: InvocationHistory | None, invocation_id: Any
) -> InvocationInfo:
    """The invocation ``invocation_id``, from memory or else from the history file.

    Raises:
        LookupError: neither has it.
    """
    try:
        return table.get(invocation_id)
    except LookupError:
        if history is None or not isinstance(invocation_id, str):
            raise
        found = await anyio.to_thread.run_sync(history.read_one, invocation_id)
        if found is None:
            raise
        return found


async def cancel_invocation(
    table: InvocationTable, history: InvocationHistory | None, invocation_id: Any
) -> InvocationInfo:
    """``table.cancel``, or for an invocation only the file has (it has
    finished: nothing to cancel), its record there.

    Raises:
        LookupError: neither has it.
    """
    try:
        return table.cancel(invocation_id)
    except LookupError:
        return await get_invocation(table, history, invocation_id)
