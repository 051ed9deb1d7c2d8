"""The status page over plain HTTP: its files, its access rules, its event stream."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.invocations import InvocationScope
from remote_exec.server import status
from remote_exec.server.app import RemoteExecApp, create_app, hypercorn_config, serve
from remote_exec.server.dispatch import Dispatcher
from remote_exec.server.status import PAGE_CSP, StatusPage, _Feed
from tests.status.conftest import TOKEN
from tests.status.instruments import Stage
from tests.status.sse import EventStream, open_events
from tests.ws_instruments import DaemonProcess, http_get

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def daemon(anyio_backend: str, clean_env: dict[str, str]) -> Iterator[DaemonProcess]:
    with DaemonProcess(
        "--allow-module", "tests.*", "--backend", anyio_backend, env=clean_env, token=TOKEN
    ) as process:
        yield process


def own(port: int) -> dict[str, str]:
    """The headers of a request the page makes: its token, the daemon's own origin."""
    return {**AUTH, "Origin": f"http://127.0.0.1:{port}"}


# -- the page's files ----------------------------------------------------------------------
@pytest.mark.anyio
async def test_the_page_is_open_strict_and_empty(daemon: DaemonProcess) -> None:
    status_code, headers, body = await http_get(daemon.port, "/")
    assert status_code == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == PAGE_CSP
    assert "script-src 'self';" in PAGE_CSP
    assert "'unsafe-inline'" not in PAGE_CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    html = body.decode()
    assert '<script src="/status.js" defer></script>' in html
    # Nothing inline: no script body, no style element or attribute, no handler.
    assert re.findall(r"<script[^>]*>([^<]+)</script>", html) == []
    assert "<style" not in html
    assert "style=" not in html
    assert not re.search(r"\son\w+=", html)
    assert "http" not in html.replace("http-equiv", "")  # nothing from elsewhere
    for path, kind in (("/status.js", "text/javascript"), ("/status.css", "text/css")):
        status_code, headers, body = await http_get(daemon.port, path)
        assert status_code == 200
        assert headers["content-type"].startswith(kind)
        assert headers["content-security-policy"] == PAGE_CSP
        assert b"innerHTML" not in body
        assert b"eval(" not in body
    status_code, headers, body = await http_get(daemon.port, "/", method="HEAD")
    assert (status_code, body) == (200, b"")
    status_code, headers, _ = await http_get(daemon.port, "/", method="POST")
    assert (status_code, headers["allow"]) == (405, "GET")


@pytest.mark.anyio
async def test_the_data_needs_the_token(daemon: DaemonProcess) -> None:
    for path in ("/status", "/events", f"/status?token={TOKEN}", f"/events?token={TOKEN}"):
        status_code, headers, body = await http_get(daemon.port, path)
        assert status_code == 401, path
        assert headers["www-authenticate"] == "Bearer"
        assert b"version" not in body
    status_code, _, _ = await http_get(daemon.port, "/status", {"Authorization": "Bearer nope"})
    assert status_code == 401
    status_code, _, body = await http_get(daemon.port, "/status", AUTH)
    assert status_code == 200
    described = json.loads(body)
    assert described["url"] == daemon.url
    assert described["page"] == f"http://127.0.0.1:{daemon.port}/"
    assert described["limits"]["max_calls"] == 256
    assert described["history"] is None


@pytest.mark.anyio
async def test_only_the_daemons_own_origin_is_allowed(daemon: DaemonProcess) -> None:
    port = daemon.port
    for path in ("/status", "/invocations"):
        status_code, _, _ = await http_get(port, path, own(port))
        assert status_code == 200, path
        for origin in (
            "http://evil.example",
            f"http://127.0.0.1:{port + 1}",
            f"https://127.0.0.1:{port}",
            "null",
        ):
            status_code, _, body = await http_get(port, path, {**AUTH, "Origin": origin})
            assert status_code == 403, (path, origin)
            assert b"not allowed" in body
    async with open_events(port, {**AUTH, "Origin": "http://evil.example"}) as events:
        assert events.status == 403
    # The page's cancel: a DELETE from the daemon's own origin.
    status_code, _, _ = await http_get(port, "/invocations/nope", own(port), method="DELETE")
    assert status_code == 404


# -- the event stream ----------------------------------------------------------------------
def has(kind: str, wanted: Any) -> Any:
    def check(name: str, data: Any) -> bool:
        return name == kind and bool(wanted(data))

    return check


def invocation(data: dict[str, Any], invocation_id: str) -> dict[str, Any] | None:
    for item in data.get("invocations", []):
        if item["id"] == invocation_id:
            found: dict[str, Any] = item
            return found
    return None


@pytest.mark.anyio
async def test_the_stream_shows_instances_and_live_logs(daemon: DaemonProcess) -> None:
    async with open_events(daemon.port, own(daemon.port)) as events:
        assert events.status == 200
        assert events.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert events.headers["content-security-policy"] == PAGE_CSP
        name, snapshot = await events.next_event()
        assert name == "snapshot"
        assert snapshot["daemon"]["url"] == daemon.url
        assert snapshot["instances"] == []
        assert snapshot["invocations"] == []
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            stage = Stage("x")
            async with ex.remote_instance(stage, "stage", "x"):
                _, update = await events.until(has("update", lambda d: d.get("instances")))
                (row,) = update["instances"]
                assert row["name"] == "stage"
                assert row["class"] == "tests.status.instruments.Stage"
                assert row["scope"] == "server"
                assert row["owner"].startswith("127.0.0.1:")
                scan = await ex.submit(stage.scan, 10_000, 0.02)
                lines: list[str] = []
                logged = 0
                item: dict[str, Any] | None = None
                while len(lines) < 20:
                    _, update = await events.until(has("update", lambda d: invocation(d, scan.id)))
                    item = invocation(update, scan.id)
                    assert item is not None
                    assert item["status"] in ("pending", "running")
                    assert item["log_start"] == logged  # each record once, none missed
                    lines += [entry[3] for entry in item["log"]]
                    logged = item["logged"]
                assert lines[0] == "scan of 10000 steps along x"
                assert lines[1].startswith("step 1: x = 0.1 mm, reading")
                assert item is not None
                assert item["status"] == "running"
                status_code, _, _ = await http_get(
                    daemon.port, f"/invocations/{scan.id}", own(daemon.port), method="DELETE"
                )
                assert status_code == 200
                _, update = await events.until(
                    has(
                        "update",
                        lambda d: (invocation(d, scan.id) or {}).get("status") == "cancelled",
                    )
                )
                item = invocation(update, scan.id)
                assert item is not None
                assert item["error"].startswith("InvocationCancelled")
                await stage.say("<script>alert(1)</script>")
                _, update = await events.until(
                    has("update", lambda d: any(i["method"] == "say" for i in d["invocations"]))
                )
                (said,) = [i for i in update["invocations"] if i["method"] == "say"]
                assert said["log"][0][3] == "<script>alert(1)</script>"  # as it was logged
        _, update = await events.until(has("update", lambda d: d.get("instances") == []))
        # A new page gets it all at once.
        async with open_events(daemon.port, AUTH) as again:
            name, snapshot = await again.next_event()
            assert name == "snapshot"
            methods = [item["method"] for item in snapshot["invocations"]]
            assert {"scan", "say"} <= set(methods)
            assert all("log" not in item for item in snapshot["invocations"])  # finished


# -- what a page costs, in-process ---------------------------------------------------------------
@asynccontextmanager
async def in_process(**options: Any) -> AsyncIterator[tuple[int, RemoteExecApp]]:
    dispatcher = Dispatcher(allow_modules=["tests.*"])
    app = create_app(dispatcher, token=TOKEN, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = hypercorn_config(sock, ping_interval=None)
    stop = anyio.Event()
    async with dispatcher.hosting(), anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait, grace=0))
        try:
            yield port, app
        finally:
            stop.set()


async def ended(events: EventStream) -> bool:
    with anyio.fail_after(10):
        try:
            while True:
                await events.next_event()
        except (EOFError, anyio.EndOfStream, anyio.BrokenResourceError):
            return True


@pytest.mark.anyio
async def test_a_page_costs_one_subscriber_and_one_observer() -> None:
    async with in_process() as (port, app):
        hub = app.dispatcher.events
        table = app.dispatcher.runtime.invocations
        assert not hub.has_subscribers
        assert table.observers == []
        async with open_events(port, AUTH) as events:
            await events.next_event()
            await anyio.sleep(0.05)
            assert len(hub._subscribers) == 1
            assert len(table.observers) == 1
        with anyio.fail_after(5):
            while hub.has_subscribers or table.observers:  # noqa: ASYNC110 - the daemon's state
                await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_pages_are_capped_and_end_with_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status, "MAX_PAGES", 2)
    async with (
        in_process() as (port, app),
        open_events(port, AUTH) as first,
        open_events(port, AUTH) as second,
    ):
        await first.next_event()
        await second.next_event()
        async with open_events(port, AUTH) as third:
            assert third.status == 503
        await app.shutdown(0)
        assert await ended(first)
        assert await ended(second)


@pytest.mark.anyio
async def test_a_stream_ends_before_the_idle_timeout_would_cut_it() -> None:
    async with in_process() as (port, app):
        await http_get(port, "/health")  # serving: ``serve`` has set its own
        app.stall_timeout = 0.4  # the idle timeout the daemon was given
        async with open_events(port, AUTH) as events:
            assert (await events.next_event())[0] == "snapshot"
            with anyio.fail_after(5):
                assert await events.next_event() == ("end", {"reason": "reconnect"})
            assert await ended(events)


@pytest.mark.anyio
async def test_a_page_that_falls_behind_is_resynchronised() -> None:
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    dispatcher = Dispatcher()
    page = StatusPage(dispatcher, statistics=dict, limits={})
    feed = _Feed(page, send, 60)
    for n in range(status.MAX_MARKS):
        feed._mark(InvocationScope(f"s-{n}", "stage", "home"))
    resync, marks = feed._take()
    assert (resync, len(marks)) == (False, status.MAX_MARKS)
    for n in range(status.MAX_MARKS + 1):  # one too many: dropped, and a snapshot instead
        feed._mark(InvocationScope(f"s-{n}", "stage", "home"))
    resync, marks = feed._take()
    assert (resync, marks) == (True, {})
    feed._mark(InvocationScope("later", "stage", "home"))
    resync, marks = feed._take()
    assert (resync, list(marks)) == (False, ["later"])
    await dispatcher.aclose()
