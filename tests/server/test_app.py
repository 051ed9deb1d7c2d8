"""The ASGI app under a real hypercorn, in-process, on a port the kernel picks."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import pytest

from remote_exec import InvocationCancelled
from remote_exec.client.websocket import WebSocketExecutor, connect_websocket
from remote_exec.exceptions import (
    ConnectionLostError,
    RemoteException,
    RemoteExecConnectionError,
    TokenRefusedError,
)
from remote_exec.framing import FrameAssembler
from remote_exec.protocol import Limits
from remote_exec.server.app import (
    MESSAGE_CHUNK,
    RemoteExecApp,
    create_app,
    hypercorn_config,
    serve,
)
from remote_exec.server.dispatch import Dispatcher
from tests.conformance.devices import Spinner
from tests.conformance.helpers import listed
from tests.ws_instruments import Probe, http_get

pytestmark = pytest.mark.anyio

TOKEN = "app-test-token-0123456789"
GOOD_ORIGIN = "https://lab.example"


@dataclass
class Server:
    url: str
    port: int
    app: RemoteExecApp


@asynccontextmanager
async def running_server(**options: Any) -> AsyncIterator[Server]:
    limits = options.pop("limits", None)
    dispatcher = Dispatcher(allow_modules=["tests.*"], limits=limits)
    options.setdefault("token", TOKEN)
    options.setdefault("allowed_origins", [GOOD_ORIGIN])
    app = create_app(dispatcher, limits=limits, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connectable before hypercorn accepts: no race
    port = sock.getsockname()[1]
    config = hypercorn_config(sock, limits=limits, ping_interval=None)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait, grace=0))
        try:
            yield Server(f"ws://127.0.0.1:{port}", port, app)
        finally:
            stop.set()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with running_server() as running:
        yield running


async def test_health_is_open_and_says_only_that_it_lives(server: Server) -> None:
    status, headers, body = await http_get(server.port, "/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok"}


async def test_unknown_paths_are_404(server: Server) -> None:
    for path in ("/nope", "/instances/x", "/static/status.js"):  # "/" is the status page
        status, _, _ = await http_get(server.port, path)
        assert status == 404, path


async def test_instances_needs_the_token(server: Server) -> None:
    status, headers, _ = await http_get(server.port, "/instances")
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    status, _, _ = await http_get(server.port, "/instances", {"Authorization": "Bearer nope"})
    assert status == 401
    # A token in the URL is never accepted.
    status, _, _ = await http_get(server.port, f"/instances?token={TOKEN}")
    assert status == 401

    async with WebSocketExecutor(server.url, token=TOKEN) as ex:
        probe = Probe()
        async with ex.remote_instance(probe, "probe"):
            status, _, body = await http_get(
                server.port, "/instances", {"Authorization": f"Bearer {TOKEN}"}
            )
    assert status == 200
    data = json.loads(body)
    assert data["instances"] == ["probe"]
    assert data["statistics"]["connections"] == 1


async def test_invocations_over_http(server: Server) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/invocations", "/invocations/x"):
        status, headers, _ = await http_get(server.port, path)
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        status, _, _ = await http_get(server.port, path, {**auth, "Origin": "https://evil.example"})
        assert status == 403
    async with WebSocketExecutor(server.url, token=TOKEN) as ex:
        probe = Probe()
        async with ex.remote_instance(probe, "probe"):
            assert await probe.scale(2) == 2
            with pytest.raises(ValueError, match="http"):
                await probe.fail("http")
            status, _, body = await http_get(server.port, "/invocations?instance=probe", auth)
            assert status == 200
            listed = json.loads(body)
            assert [(i["method"], i["status"]) for i in listed] == [
                ("scale", "completed"),
                ("fail", "error"),
            ]
            assert listed[1]["error"] == "ValueError: http"
            status, _, body = await http_get(
                server.port, "/invocations?status=error&method=fail", auth
            )
            assert [i["id"] for i in json.loads(body)] == [listed[1]["id"]]
            status, _, body = await http_get(
                server.port, f"/invocations/{listed[0]['id']}", {**auth, "Origin": GOOD_ORIGIN}
            )
            assert status == 200
            assert json.loads(body) == listed[0]
            assert (await ex.get_invocation(listed[0]["id"])).to_wire() == listed[0]
            status, _, body = await http_get(
                server.port, f"/invocations/{listed[0]['id']}", auth, method="DELETE"
            )
            assert status == 200  # finished: cancelling changes nothing
            assert json.loads(body) == listed[0]
            status, _, _ = await http_get(server.port, "/invocations/nope", auth)
            assert status == 404
            status, _, _ = await http_get(server.port, "/invocations?status=bogus", auth)
            assert status == 400
            status, headers, _ = await http_get(server.port, "/invocations", auth, method="DELETE")
            assert status == 405
            assert headers["allow"] == "GET"


async def test_delete_over_http_cancels_a_running_invocation(server: Server) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with WebSocketExecutor(server.url, token=TOKEN) as ex:
        spinner = Spinner("http")
        async with ex.remote_instance(spinner, "spinner", "http"):
            async with anyio.create_task_group() as tg:
                outcome: list[BaseException] = []

                async def spin() -> None:
                    try:
                        await spinner.spin(1000)  # 20 s uninterrupted
                    except InvocationCancelled as exc:
                        outcome.append(exc)

                tg.start_soon(spin)
                running = await listed(ex, spinner, "spin", "running")
                with anyio.fail_after(5):
                    status, _, body = await http_get(
                        server.port, f"/invocations/{running.id}", auth, method="DELETE"
                    )
                assert status == 200
                assert json.loads(body)["id"] == running.id
            assert len(outcome) == 1
            assert (await ex.get_invocation(running.id)).status == "cancelled"


async def test_calls_through_the_websocket_executor(server: Server) -> None:
    async with WebSocketExecutor(server.url, token=TOKEN) as ex:
        probe = Probe(gain=3)
        async with ex.remote_instance(probe, "probe", gain=3):
            assert await probe.echo((1, b"bytes", [2.5])) == (1, b"bytes", [2.5])
            assert await probe.scale(5) == 15
            assert probe.seen == [15]  # the callback ran here
            async with probe.count(4) as items:
                assert [item async for item in items] == [0, 1, 2, 3]
            with pytest.raises(ValueError, match="boom") as info:
                await probe.fail("boom")
            assert isinstance(info.value, RemoteException)
            assert await ex.get_remote_objects() == ["probe"]
            big = bytes(range(256)) * 8192  # 2 MiB: sent as several fragments
            assert await probe.echo(big) == big


class CountingAssembler(FrameAssembler):
    """Records the size of every message it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.fed: list[int] = []

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
        self.fed.append(len(data))
        return super().feed(data)


async def test_a_large_reply_travels_cut_into_messages_and_arrives_whole(server: Server) -> None:
    async with WebSocketExecutor(server.url, token=TOKEN) as ex:
        assert ex._websocket is not None
        assembler = ex._websocket._assembler = CountingAssembler()
        probe = Probe()
        async with ex.remote_instance(probe, "probe"):
            assembler.fed.clear()
            big = bytes(range(256)) * (20 * 1024)  # 5 MiB: over CUT_ABOVE
            assert await probe.echo((big, "after")) == (big, "after")
            # The daemon cut the reply into 6 equal messages of at most MESSAGE_CHUNK.
            assert len(assembler.fed) == 6
            assert max(assembler.fed) - min(assembler.fed) < len(assembler.fed)
            assert max(assembler.fed) <= MESSAGE_CHUNK
            assert sum(assembler.fed) > len(big)
            assert assembler.pending == 0
            assembler.fed.clear()
            medium = big[: 4 * 1024 * 1024 - 100]  # under CUT_ABOVE with its frame: one message
            assert await probe.echo(medium) == medium
            assert len(assembler.fed) == 1
            assert await probe.echo(b"small") == b"small"  # the stream goes on after it


async def test_json_codec(server: Server) -> None:
    async with WebSocketExecutor(server.url, token=TOKEN, codec="json") as ex:
        probe = Probe()
        async with ex.remote_instance(probe, "probe"):
            assert await probe.echo({"a": [1, 2]}) == {"a": [1, 2]}


async def test_wrong_token_is_refused_clearly(server: Server) -> None:
    with pytest.raises(TokenRefusedError, match="refused the token"):
        async with WebSocketExecutor(server.url, token="wrong-token"):
            pass


async def test_missing_token_is_refused_clearly(server: Server) -> None:
    with pytest.raises(TokenRefusedError, match="requires a token"):
        await connect_websocket(server.url, token=None)


async def test_token_in_the_url_is_not_accepted(server: Server) -> None:
    with pytest.raises(TokenRefusedError):
        await connect_websocket(f"{server.url}/?token={TOKEN}", token=None)


async def test_any_path_reaches_the_endpoint(server: Server) -> None:
    async with WebSocketExecutor(f"{server.url}/some/path", token=TOKEN) as ex:
        assert await ex.get_remote_objects() == []


async def test_origin_not_allow_listed_is_refused(server: Server) -> None:
    with pytest.raises(TokenRefusedError, match="origin"):
        await connect_websocket(server.url, token=TOKEN, origin="https://evil.example")
    transport = await connect_websocket(server.url, token=TOKEN, origin=GOOD_ORIGIN)
    await transport.aclose()


async def test_text_frame_closes_only_that_connection(server: Server) -> None:
    async with WebSocketExecutor(server.url, token=TOKEN) as ex:
        probe = Probe()
        async with ex.remote_instance(probe, "probe"):
            rogue = await connect_websocket(server.url, token=TOKEN)
            rogue._protocol.send_text(b"hello")
            await rogue._flush_control()
            with pytest.raises(ConnectionLostError, match="1003"):
                await rogue.receive_frame()
            await rogue.aclose()
            assert await probe.echo("still here") == "still here"


async def test_connection_cap() -> None:
    async with running_server(max_connections=2) as server:
        first = await connect_websocket(server.url, token=TOKEN)
        second = await connect_websocket(server.url, token=TOKEN)
        with pytest.raises(RemoteExecConnectionError, match="too many connections"):
            await connect_websocket(server.url, token=TOKEN)
        await first.aclose()
        await second.aclose()


async def test_message_over_the_size_cap_closes_the_connection() -> None:
    limits = Limits(max_message_size=64 * 1024)
    async with (
        running_server(limits=limits) as server,
        WebSocketExecutor(server.url, token=TOKEN) as ex,
    ):
        probe = Probe()
        await ex.ensure_remote_instance(probe, "probe")
        with pytest.raises(ConnectionLostError, match="1009"):
            await probe.echo(b"x" * (256 * 1024))
        with pytest.raises(ConnectionLostError):  # and it stays lost
            await probe.echo(b"")


async def test_shutdown_fails_calls_in_flight(server: Server) -> None:
    outcome: list[BaseException | str] = []
    key = uuid.uuid4().hex

    async def hold(probe: Probe) -> None:
        try:
            outcome.append(await probe.hold(key, 60))
        except (ConnectionLostError, RemoteException) as exc:
            outcome.append(exc)

    async with WebSocketExecutor(server.url, token=TOKEN) as ex:
        holder, watcher = Probe(), Probe()
        await ex.ensure_remote_instance(holder, "holder")
        await ex.ensure_remote_instance(watcher, "watcher")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, holder)
                assert await watcher.wait_started(key)
                await server.app.shutdown(grace=0)
    assert len(outcome) == 1
    assert isinstance(outcome[0], (ConnectionLostError, RemoteException))
    # New connections are refused once shutting down.
    with pytest.raises(RemoteExecConnectionError, match="shutting down"):
        await connect_websocket(server.url, token=TOKEN)


async def test_no_auth_server_accepts_without_token() -> None:
    async with running_server(token=None) as server:
        transport = await connect_websocket(server.url, token=None)
        await transport.aclose()
        status, _, _ = await http_get(server.port, "/instances")
        assert status == 200
