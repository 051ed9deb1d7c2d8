"""``remote-exec serve`` as a real child process on a port the kernel picks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import trustme

from remote_exec import InvocationCancelled
from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.exceptions import (
    ConnectionLostError,
    RemoteException,
    RemoteExecConnectionError,
)
from tests.conformance.devices import Spinner
from tests.conformance.helpers import listed as listed_invocation
from tests.ws_instruments import DaemonProcess, Probe, http_get, run_cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and modes")

TOKEN = "daemon-test-token-0123456789"


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment with no token anywhere but in ``tmp_path``."""
    monkeypatch.delenv("REMOTE_EXEC_TOKEN", raising=False)
    monkeypatch.setenv("REMOTE_EXEC_TOKEN_FILE", str(tmp_path / "state" / "remote-exec" / "token"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    return dict(os.environ)


@pytest.fixture
def daemon(anyio_backend: str, clean_env: dict[str, str]) -> Iterator[DaemonProcess]:
    with DaemonProcess(
        "--allow-module", "tests.*", "--backend", anyio_backend, env=clean_env, token=TOKEN
    ) as process:
        yield process


@pytest.mark.anyio
async def test_start_connect_call(daemon: DaemonProcess) -> None:
    assert daemon.line == f"remote-exec serving on {daemon.url}"  # the token is never printed
    assert daemon.url.startswith("ws://127.0.0.1:")
    async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
        probe = Probe(gain=2)
        async with ex.remote_instance(probe, "probe", gain=2):
            assert await probe.pid() == daemon.proc.pid  # type: ignore[union-attr]
            assert await probe.scale(21) == 42
            async with probe.count(3) as items:
                assert [item async for item in items] == [0, 1, 2]
            with pytest.raises(ValueError, match="remote"):
                await probe.fail("remote")
            status, _, body = await http_get(
                daemon.port, "/instances", {"Authorization": f"Bearer {TOKEN}"}
            )
            assert status == 200
            assert json.loads(body)["instances"] == ["probe"]
    status, _, body = await http_get(daemon.port, "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert daemon.stop() == 0


@pytest.mark.anyio
@pytest.mark.parametrize("retention", ["0", "300"])
async def test_invocation_retention(
    anyio_backend: str, clean_env: dict[str, str], retention: str
) -> None:
    with DaemonProcess(
        "--allow-module",
        "tests.*",
        "--backend",
        anyio_backend,
        "--invocation-retention",
        retention,
        env=clean_env,
        token=TOKEN,
    ) as daemon:
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            probe = Probe(gain=2)
            async with ex.remote_instance(probe, "probe", gain=2):
                assert await probe.scale(1) == 2
                kept = await ex.list_invocations(instance="probe")
                if retention == "0":  # finished: forgotten at once
                    assert kept == []
                else:
                    (info,) = kept
                    assert info.status == "completed"
                    assert await ex.get_invocation(info.id) == info


@pytest.mark.anyio
async def test_invocations_and_cancel_commands(
    anyio_backend: str, clean_env: dict[str, str], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    with DaemonProcess(
        "--allow-module", "tests.*", "--backend", anyio_backend, env=clean_env, token=TOKEN
    ) as daemon:
        common = ["--url", daemon.url, "--token-file", str(token_file)]

        async def command(*args: str) -> subprocess.CompletedProcess[bytes]:
            return await anyio.run_process(
                [sys.executable, "-m", "remote_exec.server.cli", *args],
                env=clean_env,
                check=False,
            )

        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            spinner = Spinner("cli")
            async with ex.remote_instance(spinner, "spinner", "cli"):
                assert await spinner.echo(1) == 1
                listed = await command("invocations", "--json", *common)
                assert listed.returncode == 0, listed.stderr
                infos = [json.loads(line) for line in listed.stdout.decode().splitlines()]
                assert [(i["method"], i["status"]) for i in infos] == [("echo", "completed")]
                async with anyio.create_task_group() as tg:
                    outcome: list[BaseException] = []

                    async def spin() -> None:
                        try:
                            await spinner.spin(1000)  # 20 s uninterrupted
                        except InvocationCancelled as exc:
                            outcome.append(exc)

                    tg.start_soon(spin)
                    running = await listed_invocation(ex, spinner, "spin", "running")
                    shown = await command("invocations", "--status", "running", *common)
                    assert f"{running.id}  spinner.spin  running" in shown.stdout.decode()
                    cancelled = await command("cancel", running.id, *common)
                    assert cancelled.returncode == 0, cancelled.stderr
                assert len(outcome) == 1
                unknown = await command("cancel", "no-such-id", *common)
                assert unknown.returncode == 1
                assert b"no invocation" in unknown.stderr


@pytest.mark.anyio
async def test_generated_token_file_is_private_and_found(clean_env: dict[str, str]) -> None:
    token_file = Path(clean_env["REMOTE_EXEC_TOKEN_FILE"])
    with DaemonProcess("--allow-module", "tests.*", env=clean_env) as daemon:
        assert daemon.line == f"remote-exec serving on {daemon.url} (token file: {token_file})"
        assert _mode(token_file) == 0o600
        assert _mode(token_file.parent) == 0o700
        token = _read(token_file)
        assert len(token) >= 40
        assert token not in daemon.line
        assert token not in daemon.log()
        # A client on the same machine finds the token file by itself.
        async with WebSocketExecutor(daemon.url) as ex:
            assert await ex.get_remote_objects() == []
        assert daemon.stop() == 0
    # A restarted daemon keeps the token.
    with DaemonProcess("--allow-module", "tests.*", env=clean_env) as daemon:
        assert _read(token_file) == token
        async with WebSocketExecutor(daemon.url, token=token) as ex:
            assert await ex.get_remote_objects() == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _read(path: Path) -> str:
    return path.read_text().strip()


def test_token_file_readable_by_others_is_refused(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    token_file = tmp_path / "shared-token"
    token_file.write_text("a-token-everybody-can-read\n")
    token_file.chmod(0o644)
    result = run_cli(["--port", "0", "--token-file", str(token_file)], env=clean_env)
    assert result.returncode == 2
    assert "chmod 600" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_non_loopback_bind_without_tls_is_refused(host: str, clean_env: dict[str, str]) -> None:
    result = run_cli(["--host", host, "--port", "0"], env=clean_env)
    assert result.returncode == 2
    assert "without TLS" in result.stderr
    assert "--insecure" in result.stderr
    assert result.stdout == ""


def test_console_script_is_the_same_command(clean_env: dict[str, str]) -> None:
    script = shutil.which("remote-exec", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the remote-exec console script is not installed")
    import subprocess

    result = subprocess.run(
        [script, "serve", "--host", "0.0.0.0", "--port", "0"],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "without TLS" in result.stderr


@pytest.mark.anyio
async def test_tls(anyio_backend: str, clean_env: dict[str, str], tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    args = ["--certfile", str(certfile), "--keyfile", str(keyfile), "--backend", anyio_backend]
    with DaemonProcess("--allow-module", "tests.*", *args, env=clean_env, token=TOKEN) as daemon:
        assert daemon.url.startswith("wss://127.0.0.1:")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with WebSocketExecutor(daemon.url, token=TOKEN, ssl=context) as ex:
            probe = Probe()
            async with ex.remote_instance(probe, "probe"):
                assert await probe.echo(b"secret" * 1000) == b"secret" * 1000
        # Without trusting the certificate, the client refuses to talk.
        with pytest.raises(RemoteExecConnectionError, match=r"(?i)certificate"):
            async with WebSocketExecutor(daemon.url, token=TOKEN, connect_timeout=5):
                pass
        assert daemon.stop() == 0


@pytest.mark.anyio
async def test_sigterm_lets_a_short_call_finish(daemon: DaemonProcess) -> None:
    key = uuid.uuid4().hex
    async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
        holder, watcher = Probe(), Probe()
        await ex.ensure_remote_instance(holder, "holder")
        await ex.ensure_remote_instance(watcher, "watcher")
        result: list[str] = []

        async def call() -> None:
            result.append(await holder.hold(key, 0.5))

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await watcher.wait_started(key)
                daemon.send_signal(signal.SIGTERM)
        assert result == ["held"]  # within the default 5 s grace
    assert await anyio.to_thread.run_sync(daemon.wait) == 0


@pytest.mark.anyio
async def test_sigterm_cancels_a_long_call_after_the_grace(
    anyio_backend: str, clean_env: dict[str, str]
) -> None:
    key = uuid.uuid4().hex
    args = ["--allow-module", "tests.*", "--backend", anyio_backend, "--grace", "0.2"]
    with DaemonProcess(*args, env=clean_env, token=TOKEN) as daemon:
        async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
            holder, watcher = Probe(), Probe()
            await ex.ensure_remote_instance(holder, "holder")
            await ex.ensure_remote_instance(watcher, "watcher")
            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_signal_when_started, watcher, key, daemon)
                    with pytest.raises((RemoteException, ConnectionLostError)):
                        await holder.hold(key, 60)
        assert await anyio.to_thread.run_sync(daemon.wait) == 0
        assert "SIGTERM" in daemon.log()


async def _signal_when_started(watcher: Probe, key: str, daemon: DaemonProcess) -> None:
    await watcher.wait_started(key)
    daemon.send_signal(signal.SIGTERM)


@pytest.mark.anyio
async def test_sigkill_mid_call_raises_connection_lost(daemon: DaemonProcess) -> None:
    key = uuid.uuid4().hex
    async with WebSocketExecutor(daemon.url, token=TOKEN) as ex:
        holder, watcher = Probe(), Probe()
        await ex.ensure_remote_instance(holder, "holder")
        await ex.ensure_remote_instance(watcher, "watcher")

        async def kill_when_started() -> None:
            await watcher.wait_started(key)
            daemon.send_signal(signal.SIGKILL)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_when_started)
                with pytest.raises(ConnectionLostError):
                    await holder.hold(key, 60)
        with pytest.raises(ConnectionLostError):  # every later call too, at once
            await holder.echo(1)
    assert daemon.wait() == -signal.SIGKILL


@pytest.mark.anyio
async def test_the_library_daemon_launcher_starts_serves_and_stops(
    anyio_backend: str, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """``remote_exec.server.testing.DaemonProcess`` as a user's own tests would use it:
    from any directory, a real daemon on a free loopback port, stopped gracefully."""
    from remote_exec.server.testing import DaemonProcess as LibraryDaemon

    with LibraryDaemon("--backend", anyio_backend, env=clean_env, token=TOKEN, cwd=tmp_path) as d:
        assert d.url.startswith("ws://127.0.0.1:")
        assert d.port > 0
        assert d.alive()
        async with WebSocketExecutor(d.url, token=TOKEN) as ex:
            assert await ex.get_remote_objects() == []
        assert d.stop() == 0
        assert not d.alive()
        assert not d.killed
        assert "SIGTERM" in d.log()


def test_the_library_daemon_launcher_reports_a_daemon_that_cannot_start(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    from remote_exec.server.testing import DaemonProcess as LibraryDaemon

    with pytest.raises(RuntimeError, match="did not start"):
        LibraryDaemon("--max-message-size", "-1", env=clean_env, cwd=tmp_path)
