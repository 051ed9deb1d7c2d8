"""WebSocketExecutor: connecting, losing the connection, keepalive, lifecycle, tokens."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from websockets.http11 import Request
from websockets.server import ServerProtocol

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.exceptions import (
    ConnectionLostError,
    ExecutorStateError,
    RemoteExecConnectionError,
    TokenFileError,
)
from remote_exec.runtime.auth import (
    check_token,
    client_token,
    default_token_path,
    load_or_create_token,
    read_token_file,
)
from tests.ws_instruments import DaemonProcess, Probe

TOKEN = "executor-test-token-0123456789"


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("REMOTE_EXEC_TOKEN", raising=False)
    monkeypatch.setenv("REMOTE_EXEC_TOKEN_FILE", str(tmp_path / "state" / "token"))
    return dict(os.environ)


@pytest.fixture
def daemon(anyio_backend: str, clean_env: dict[str, str]) -> Iterator[DaemonProcess]:
    with DaemonProcess(
        "--allow-module", "tests.*", "--backend", anyio_backend, env=clean_env, token=TOKEN
    ) as process:
        yield process


# -- connecting --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_connect_to_nothing_is_a_clear_error() -> None:
    # A bound socket that does not listen: connections are refused, and no
    # other process can take the port while the test runs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with anyio.fail_after(5):
            with pytest.raises(RemoteExecConnectionError, match="could not connect"):
                async with WebSocketExecutor(f"ws://127.0.0.1:{port}", token=TOKEN):
                    pass


@pytest.mark.anyio
async def test_wss_to_a_plain_daemon_says_to_use_ws(daemon: DaemonProcess) -> None:
    url = daemon.url.replace("ws://", "wss://", 1)
    plain = daemon.url
    with anyio.fail_after(10):
        with pytest.raises(RemoteExecConnectionError) as caught:
            async with WebSocketExecutor(url, token=TOKEN):
                pass
    message = str(caught.value)
    assert "TLS handshake" in message
    assert "did not answer with TLS" in message
    assert f"connect to {plain}" in message


@pytest.mark.anyio
async def test_connect_timeout_when_nothing_answers() -> None:
    # A listening socket nobody accepts from: TCP connects, the handshake never ends.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with anyio.fail_after(5):
            with pytest.raises(RemoteExecConnectionError, match=r"within 0\.3 s"):
                async with WebSocketExecutor(
                    f"ws://127.0.0.1:{port}", token=TOKEN, connect_timeout=0.3
                ):
                    pass


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="websocket URL"):
        WebSocketExecutor("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="credentials"):
        WebSocketExecutor("ws://user:secret@127.0.0.1:1")
    with pytest.raises(ValueError, match="wss://"):
        WebSocketExecutor("ws://127.0.0.1:1", ssl=__import__("ssl").create_default_context())
    with pytest.raises(ValueError, match="token"):
        WebSocketExecutor("ws://127.0.0.1:1", token="two words")
    assert "secret" not in repr(WebSocketExecutor("ws://127.0.0.1:1", token="secret"))


# -- losing the connection ---------------------------------------------------------------


@pytest.mark.anyio
async def test_lost_connection_mid_stream_raises(daemon: DaemonProcess) -> None:
    async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
        probe, other = Probe(), Probe()
        await ex.ensure_remote_instance(probe, "probe")
        await ex.ensure_remote_instance(other, "other")
        with anyio.fail_after(10):
            async with probe.ticks() as ticks:
                assert await anext(ticks) == 0
                daemon.send_signal(signal.SIGKILL)
                with pytest.raises(ConnectionLostError):
                    await anext(ticks)
            # Every waiting or later call fails at once too.
            with pytest.raises(ConnectionLostError):
                await other.echo(1)


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A websocket server that completes the handshake, then never answers again."""

    async def handle(stream: SocketStream) -> None:
        protocol = ServerProtocol()
        async with stream:
            while True:
                protocol.receive_data(await stream.receive())
                for event in protocol.events_received():
                    if isinstance(event, Request):
                        protocol.send_response(protocol.accept(event))
                        for data in protocol.data_to_send():
                            await stream.send(data)
                        await anyio.sleep_forever()  # no pongs, no replies

    async def run(*, task_status: TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        task_status.started(listener.extra(SocketAttribute.local_port))
        await listener.serve(handle)

    async with anyio.create_task_group() as tg:
        port = await tg.start(run)
        yield port
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_keepalive_detects_a_silent_server() -> None:
    async with silent_server() as port:
        executor = WebSocketExecutor(
            f"ws://127.0.0.1:{port}", token=TOKEN, ping_interval=0.05, ping_timeout=0.2
        )
        with anyio.fail_after(5):
            async with executor as ex:
                with pytest.raises(ConnectionLostError, match="keepalive"):
                    await ex.get_remote_objects()


# -- lifecycle ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_use_before_start_and_after_stop(daemon: DaemonProcess) -> None:
    executor = WebSocketExecutor(daemon.url, token=TOKEN)
    with pytest.raises(ExecutorStateError, match="not started"):
        await executor.get_remote_objects()
    async with executor as ex:
        assert await ex.get_remote_objects() == []
    with pytest.raises(ExecutorStateError, match="stopped"):
        await executor.get_remote_objects()
    with pytest.raises(ExecutorStateError):
        await executor.start()
    await executor.stop()  # idempotent


@pytest.mark.anyio
async def test_cancelling_a_call_keeps_the_connection(daemon: DaemonProcess) -> None:
    async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
        probe = Probe()
        await ex.ensure_remote_instance(probe, "probe")
        with anyio.move_on_after(0.2) as scope:
            await probe.hold("never-awaited", 60)
        assert scope.cancelled_caught
        assert await probe.echo("after") == "after"


# -- tokens -------------------------------------------------------------------------------


def test_client_token_resolution(
    clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client_token("127.0.0.1") is None  # no file yet
    token, path, created = load_or_create_token()
    assert created
    assert path == default_token_path()
    # The default file counts only for a server on this machine.
    assert client_token("127.0.0.1") == token
    assert client_token("localhost") == token
    assert client_token("::1") == token
    assert client_token("lab-pi.local") is None
    monkeypatch.setenv("REMOTE_EXEC_TOKEN", "from-env")
    assert client_token("lab-pi.local") == "from-env"
    assert client_token("127.0.0.1") == "from-env"
    assert client_token("127.0.0.1", "explicit") == "explicit"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_token_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "token"
    token, _, created = load_or_create_token(path)
    assert created
    assert load_or_create_token(path) == (token, path, False)
    assert read_token_file(path) == token
    path.chmod(0o640)
    with pytest.raises(TokenFileError, match="chmod 600"):
        read_token_file(path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(TokenFileError, match="empty"):
        read_token_file(empty)


def test_check_token() -> None:
    assert check_token("abc", "abc")
    assert not check_token("abc", "abd")
    assert not check_token("abc", "abcd")
    assert not check_token("abc", "")
    assert not check_token("abc", None)
