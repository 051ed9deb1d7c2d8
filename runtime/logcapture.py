"""Per-invocation log capture: what a method logs goes into its invocation's log.

One handler on the root logger keeps each record at INFO or above that is
emitted where an invocation is current (the method's thread for sync code,
its task for async code: ``remote_exec.invocations.current``), so records of
other calls and other instances never mix in. Records still propagate to the
normal handlers as before.

A root logger above INFO (Python's default is WARNING) would drop INFO
records before any handler sees them, so while capturing, the root level is
at most INFO; root handlers without a level of their own get the old one, and
records that no handler would have shown before still reach
``logging.lastResort`` as they did, so what is printed does not change.
"""

from __future__ import annotations

import logging
import threading

from remote_exec.invocations import LogEntry, current

__all__ = ["capturing_logs", "release_logs"]

_lock = threading.Lock()
_users = 0
_handler: _CaptureHandler | None = None
_saved: tuple[int, list[logging.Handler]] | None = None  # old root level, handlers leveled


class _CaptureHandler(logging.Handler):
    def __init__(self, old_level: int) -> None:
        super().__init__(logging.INFO)
        self.old_level = old_level

    def emit(self, record: logging.LogRecord) -> None:
        scope = current.get()
        if scope is not None:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string: as logging itself shows it
                message = str(record.msg)
            scope.add_log(LogEntry(record.created, record.levelname, record.name, message))
        if record.levelno >= self.old_level and not _other_handler(record):
            last = logging.lastResort
            if last is not None and record.levelno >= last.level:
                last.handle(record)


def _other_handler(record: logging.LogRecord) -> bool:
    """Whether a handler besides the capture one would see ``record``."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(handler is not _handler for handler in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def capturing_logs() -> None:
    """Start capturing (counted: every ``capturing_logs`` needs a ``release_logs``)."""
    global _users, _handler, _saved
    with _lock:
        _users += 1
        if _users > 1:
            return
        root = logging.getLogger()
        old_level = root.level
        leveled: list[logging.Handler] = []
        if old_level > logging.INFO:
            for handler in root.handlers:
                if handler.level == logging.NOTSET:
                    handler.setLevel(old_level)
                    leveled.append(handler)
            root.setLevel(logging.INFO)
        _saved = (old_level, leveled)
        _handler = _CaptureHandler(max(old_level, logging.INFO))
        root.addHandler(_handler)


def release_logs() -> None:
    """Stop capturing once the last user has released it."""
    global _users, _handler, _saved
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users or _handler is None or _saved is None:
            return
        root = logging.getLogger()
        root.removeHandler(_handler)
        old_level, leveled = _saved
        if root.level == logging.INFO and old_level > logging.INFO:
            root.setLevel(old_level)
        for handler in leveled:
            if handler.level == old_level:
                handler.setLevel(logging.NOTSET)
        _handler = _saved = None
