"""The daemon's status page: ``GET /`` and its assets, ``GET /status``, ``GET /events``.

A lab operator opens ``http://127.0.0.1:8765/`` (or the daemon's address) in
a browser and sees what the daemon holds and what it is doing: its version,
uptime, address, limits and connections; the instances (name, class, scope,
calls queued, the creating connection); the invocations, running first, then
recent ones, each with its captured log arriving live, and a button that
cancels a pending or running one.

* ``GET /``, ``/status.js``, ``/status.css``: the page, served from memory
  (package data under ``server/static``) without the token, since it holds
  no data: a form asking for the token, and the code that shows the rest.
  Every answer carries a strict Content-Security-Policy (``PAGE_CSP``: only
  the daemon's own script, style and requests; nothing inline, nothing
  remote; no framing) and ``nosniff``.
* ``GET /status`` and ``GET /events``: behind the token and the ``Origin``
  check like every data endpoint (the app checks them): the daemon's own
  origin is allowed, every other one refused. ``/status`` is the daemon's
  description as JSON; ``/events`` is a stream of server-sent events (read
  by the page with ``fetch()``, which sends the ``Authorization`` header;
  ``EventSource`` cannot):

  - ``snapshot``: everything the page shows (``{"daemon", "instances",
    "invocations"}``), first, and again whenever the page fell behind;
  - ``update``: what changed since (``{"invocations": [...], "instances":
    [...]?, "stats": {...}}``), each changed invocation with the log records
    it logged since the last message;
  - a comment line every 15 s while nothing happens.

What an open page costs the daemon (``_Feed``): one subscriber on the events
channel (create and delete events tell it about instances; it holds at most
``--max-queued-events`` of them and is dropped past that, like any other),
one observer of the invocation table (called when an invocation is added
and when it finishes), and a watcher on each pending or running invocation
(called when it starts, logs, and ends). None of them queues anything: each
only marks which invocations changed, in a set of at most ``MAX_MARKS``; at
most five times a second the page gets one message with what those marks
name, read at that moment. A page that reads slower than the daemon changes
lets the marks pile up; past ``MAX_MARKS``, or past an overflow of its
subscription, they are dropped and the page gets a fresh snapshot instead
(resynchronised). At most ``MAX_PAGES`` streams are open at once; each ends
after ``lifetime`` seconds (below the idle timeout, which would cut it: the
browser sends nothing while it reads), and the page opens the next one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio

from remote_exec.invocations import InvocationScope, InvocationStatus
from remote_exec.runtime.backend import threadsafe_call_soon

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = [
    "MAX_PAGES",
    "PAGE_CSP",
    "PAGE_HEADERS",
    "StatusPage",
]

logger = logging.getLogger("remote_exec.server.status")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page's Content-Security-Policy: its own files and requests, nothing else."""
PAGE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", PAGE_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
"""Headers of every answer of the page's paths."""
ASSETS = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/status.js": ("status.js", b"text/javascript; charset=utf-8"),
    "/status.css": ("status.css", b"text/css; charset=utf-8"),
}
"""Path -> (file under ``server/static``, content type)."""
MAX_PAGES = 16
"""Event streams open at once; more get HTTP 503."""
MAX_MARKS = 2000
"""Invocations marked as changed that a page may fall behind by before it is resynchronised."""
MAX_LIVE_SHOWN = 500
"""Pending and running invocations a snapshot lists at most (the oldest)."""
RECENT_SHOWN = 100
"""Finished invocations a snapshot lists (the newest; from the history file too)."""
LOG_SENT = 200
"""Log records of one invocation one message carries at most (the newest)."""
BATCH_DELAY = 0.2
"""Seconds changes gather before they go out together."""
HEARTBEAT = 15.0
"""Seconds of quiet after which the stream carries a comment (a dead page is found)."""
DEFAULT_LIFETIME = 300.0
"""Seconds one event stream lasts at most (without an idle timeout)."""


def _load_assets() -> dict[str, tuple[bytes, bytes]]:
    folder = resources.files("remote_exec.server").joinpath("static")
    return {
        path: (folder.joinpath(name).read_bytes(), content_type)
        for path, (name, content_type) in ASSETS.items()
    }


class StatusPage:
    """The page's assets, its ``/status`` description and its event streams.

    Args:
        dispatcher: what the daemon holds and runs.
        statistics: the app's connection counts (called for each message).
        limits: the daemon's limits, as the page lists them.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        statistics: Callable[[], dict[str, Any]],
        limits: dict[str, Any],
    ) -> None:
        self.dispatcher = dispatcher
        self.statistics = statistics
        self.started_at = time.time()
        # What the daemon says of itself (the CLI adds its address, backend, history).
        self.info: dict[str, Any] = {
            "version": _version(),
            "python": sys.version.split()[0],
            "pid": os.getpid(),
            "url": None,
            "backend": None,
            "limits": limits,
        }
        self._assets: dict[str, tuple[bytes, bytes]] | None = None
        self._feeds: set[_Feed] = set()
        self._closed = False

    # -- the page's files ----------------------------------------------------------------
    def asset(self, path: str) -> tuple[bytes, bytes] | None:
        """(body, content type) of the page's file at ``path``, or None."""
        if path not in ASSETS:
            return None
        if self._assets is None:
            self._assets = _load_assets()
        return self._assets[path]

    async def serve_asset(self, send: Send, method: str, path: str) -> None:
        found = self.asset(path)
        assert found is not None
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed", b"text/plain", [(b"allow", b"GET")])
            return
        body, content_type = found
        await _respond(send, 200, b"" if method == "HEAD" else body, content_type, length=len(body))

    # -- what the page shows ---------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The daemon: version, address, uptime, limits, connections, history."""
        now = time.time()
        history = self.dispatcher.history
        return {
            **self.info,
            "started_at": self.started_at,
            "now": now,
            "uptime": now - self.started_at,
            "connections": self.statistics(),
            "dispatcher": _plain(self.dispatcher.statistics()),
            "history": None if history is None else history.statistics(),
            "pages": len(self._feeds),
        }

    def instances(self) -> list[dict[str, Any]]:
        dispatcher = self.dispatcher
        # The creating connection of an instance: the one whose set of held
        # names is the instance's ``owner`` (an instance never refers to it).
        owners = {id(conn.held): conn.peer for conn in list(dispatcher._connections)}
        rows = []
        for name, instance in list(dispatcher.runtime.instances.items()):
            waiting = instance.waiting()
            scope = getattr(instance, "scope", None)
            rows.append(
                {
                    "name": name,
                    "class": instance.class_name,
                    "scope": None if scope is None else str(getattr(scope, "value", scope)),
                    "queued": waiting,
                    "running": max(len(instance.queue) - waiting, 0),
                    "owner": None
                    if instance.owner is None
                    else owners.get(id(instance.owner), "(gone)"),
                }
            )
        return rows

    async def snapshot(self) -> dict[str, Any]:
        table = self.dispatcher.runtime.invocations
        live = table.live()[:MAX_LIVE_SHOWN]
        items = [_item(scope, 0, with_log=True) for scope in live]
        recent = table.recent(RECENT_SHOWN)
        items.extend(_item(scope, 0, with_log=False) for scope in recent)
        history = self.dispatcher.history
        if history is not None and len(recent) < RECENT_SHOWN:
            known = {scope.id for scope in recent}
            ended = [scope.ended_at for scope in recent if scope.ended_at is not None]
            older = await anyio.to_thread.run_sync(
                lambda: history.read_list(
                    limit=RECENT_SHOWN - len(recent),
                    ended_before=min(ended) if ended else None,
                    exclude=known,
                )
            )
            for info in older:
                wire = info.to_wire()
                wire["logged"] = len(wire.pop("log"))
                wire["from_history"] = True
                items.append(wire)
        return {
            "daemon": self.describe(),
            "instances": self.instances(),
            "invocations": items,
            "live_shown": len(live),
            "live_total": len(table.live()) if len(live) >= MAX_LIVE_SHOWN else len(live),
        }

    # -- the event stream -------------------------------------------------------------------
    async def stream(self, receive: Receive, send: Send, *, lifetime: float | None) -> None:
        """Serve one ``/events`` request (its token and origin already checked)."""
        if self._closed:
            await _respond(send, 503, b"the server is shutting down", b"text/plain")
            return
        if len(self._feeds) >= MAX_PAGES:
            await _respond(
                send,
                503,
                f"too many open status pages (at most {MAX_PAGES})".encode(),
                b"text/plain",
            )
            return
        feed = _Feed(self, send, lifetime or DEFAULT_LIFETIME)
        self._feeds.add(feed)
        try:
            await feed.run(receive)
        finally:
            self._feeds.discard(feed)

    def close(self) -> None:
        """End every open stream (the daemon is shutting down)."""
        self._closed = True
        for feed in list(self._feeds):
            feed.scope.cancel()


class _Feed:
    """One open ``/events`` stream: marks of what changed, sent in batches."""

    def __init__(self, page: StatusPage, send: Send, lifetime: float) -> None:
        self.page = page
        self._send = send
        self.lifetime = lifetime
        self.scope = anyio.CancelScope()
        self.table = page.dispatcher.runtime.invocations
        self.call_soon = threadsafe_call_soon()
        self._lock = threading.Lock()  # marks come from the instances' threads too
        self._marks: dict[str, InvocationScope] = {}
        self._scheduled = False
        self._resync = False
        self._instances_changed = False
        self._wake = anyio.Event()
        self._watching: dict[str, Callable[[], None]] = {}  # id -> stop watching it
        self._sent: dict[str, int] = {}  # id -> log records sent

    # -- marks (any thread) -------------------------------------------------------------
    def _mark(self, scope: InvocationScope) -> None:
        with self._lock:
            if not self._resync:
                self._marks[scope.id] = scope
                if len(self._marks) > MAX_MARKS:  # fell behind: a snapshot instead
                    self._marks.clear()
                    self._resync = True
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.call_soon(self._wakeup)
        except RuntimeError:  # the loop is gone: so is the page
            pass

    def _wakeup(self) -> None:
        self._wake.set()

    def _take(self) -> tuple[bool, dict[str, InvocationScope]]:
        with self._lock:
            resync, marks = self._resync, self._marks
            self._resync, self._marks, self._scheduled = False, {}, False
        self._wake = anyio.Event()
        return resync, marks

    def _observe(self, scope: InvocationScope) -> None:
        """The table's observer (on the loop): an invocation was added, or finished."""
        if not scope.status.finished and scope.id not in self._watching:
            self._watch(scope)
        elif scope.status.finished:
            stop = self._watching.pop(scope.id, None)
            if stop is not None:
                stop()
        self._instances_changed = True  # its instance's queue changed
        self._mark(scope)

    def _watch(self, scope: InvocationScope) -> None:
        self._watching[scope.id] = scope.watch(lambda: self._mark(scope))

    # -- the stream ---------------------------------------------------------------------------
    async def run(self, receive: Receive) -> None:
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                    *PAGE_HEADERS,
                ],
            }
        )
        self.table.observers.append(self._observe)
        try:
            with self.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._until_disconnect, receive, tg.cancel_scope)
                    tg.start_soon(self._follow_events)
                    await self._loop()
                    tg.cancel_scope.cancel()
        finally:
            with contextlib.suppress(ValueError):
                self.table.observers.remove(self._observe)
            for stop in self._watching.values():
                stop()
            self._watching.clear()
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _until_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive()).get("type") != "http.disconnect":
            pass
        scope.cancel()

    async def _follow_events(self) -> None:
        """Instances come and go: the one subscription to the events channel."""
        from remote_exec.exceptions import SubscriberOverflowError

        hub = self.page.dispatcher.events
        while True:
            subscription = hub.subscribe()
            try:
                async for event in subscription:
                    if event.get("channel") in ("create", "delete"):
                        self._instances_changed = True
                        self._mark_nothing()
                return  # the hub closed: the daemon is stopping
            except SubscriberOverflowError:
                with self._lock:
                    self._marks.clear()
                    self._resync = True
                self._mark_nothing()
            finally:
                await subscription.aclose()

    def _mark_nothing(self) -> None:
        """Wake the stream (on the loop) for a change that is not an invocation's."""
        self._wake.set()

    async def _loop(self) -> None:
        ends = anyio.current_time() + self.lifetime
        await self._snapshot()
        while anyio.current_time() < ends:
            with anyio.move_on_after(min(HEARTBEAT, max(ends - anyio.current_time(), 0))):
                await self._wake.wait()
            if not self._wake.is_set():
                if anyio.current_time() < ends:
                    await self._write(b": still here\n\n")
                continue
            await anyio.sleep(BATCH_DELAY)  # let a burst of changes go out as one message
            resync, marks = self._take()
            if resync:
                await self._snapshot()
            else:
                await self._update(marks)
        await self._event("end", {"reason": "reconnect"})

    async def _snapshot(self) -> None:
        self._take()
        self._instances_changed = False
        for scope in self.table.live():
            if scope.id not in self._watching:
                self._watch(scope)
        snapshot = await self.page.snapshot()
        self._sent = {
            item["id"]: item["logged"]
            for item in snapshot["invocations"]
            if not InvocationStatus(item["status"]).finished
        }
        await self._event("snapshot", snapshot)

    async def _update(self, marks: dict[str, InvocationScope]) -> None:
        items = []
        for scope in marks.values():
            items.append(_item(scope, self._sent.get(scope.id, 0), with_log=True))
            if scope.status.finished:
                self._sent.pop(scope.id, None)
            else:
                self._sent[scope.id] = items[-1]["logged"]
        message: dict[str, Any] = {"invocations": items, "stats": self._stats()}
        if self._instances_changed:
            self._instances_changed = False
            message["instances"] = self.page.instances()
        await self._event("update", message)

    def _stats(self) -> dict[str, Any]:
        return {
            "now": time.time(),
            "connections": self.page.statistics(),
            "dispatcher": _plain(self.page.dispatcher.statistics()),
        }

    async def _event(self, name: str, data: Any) -> None:
        text = json.dumps(data, default=str, separators=(",", ":"))
        await self._write(f"event: {name}\ndata: {text}\n\n".encode())

    async def _write(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})


def _item(scope: InvocationScope, sent: int, *, with_log: bool) -> dict[str, Any]:
    """An invocation as the page gets it: its record without its log, with
    ``logged`` (records ever logged) and, ``with_log``, those after ``sent``
    (the newest ``LOG_SENT`` of them) from ``log_start`` on."""
    item: dict[str, Any] = {
        "id": scope.id,
        "instance": scope.instance,
        "method": scope.method,
        "status": scope.status.value,
        "requested_at": scope.requested_at,
        "started_at": scope.started_at,
        "ended_at": scope.ended_at,
        "error": scope.error,
        "logged": scope.logged,
    }
    if with_log:
        entries, logged = scope.new_entries(sent)
        entries = entries[-LOG_SENT:]
        item["logged"] = logged
        item["log_start"] = logged - len(entries)
        item["log"] = [entry.to_wire() for entry in entries]
    return item


def _plain(stats: dict[str, Any]) -> dict[str, Any]:
    """Statistics without the long lists (names, peers): the page has those."""
    return {key: value for key, value in stats.items() if not isinstance(value, list)}


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("remote-exec")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare tree
        return "unknown"


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    length: int | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body) if length is None else length).encode()),
        (b"cache-control", b"no-cache"),
        *PAGE_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
