"""The daemon answers only requests that name it in ``Host`` (against DNS rebinding).

A page at ``http://evil.example:PORT`` that rebinds its name to 127.0.0.1
reaches a loopback daemon as its own origin, but its requests still say
``Host: evil.example:PORT``: they are refused with 403, websocket and HTTP
alike. Loopback names and the bound address pass; ``--allow-host`` adds names.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from collections.abc import Iterator

import anyio
import pytest

from remote_exec.server.app import HostAllowList
from remote_exec.server.cli import add_serve_arguments
from remote_exec.server.testing import DaemonProcess

pytestmark = pytest.mark.anyio

TOKEN = "host-check-token-0123456789abcdef"
TIMEOUT = 15  # a failure bound only


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTE_EXEC")}
    with DaemonProcess("--allow-host", "lab-pi.example", env=env, token=TOKEN) as running:
        yield running


async def request(
    port: int, host: str | None, *, websocket: bool, path: str = "/"
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to 127.0.0.1:``port`` with this ``Host`` (None: none);
    the status and body (a websocket upgrade: 101 and no body)."""
    lines = [f"GET {path} HTTP/1.1" if host is not None else f"GET {path} HTTP/1.0"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"Authorization: Bearer {TOKEN}", "Connection: close"]
    if websocket:
        key = base64.b64encode(os.urandom(16)).decode()
        lines[-1] = "Connection: Upgrade"
        lines += ["Upgrade: websocket", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    data = bytearray()
    with anyio.fail_after(TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode())
            while not complete(bytes(data)):
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def complete(response: bytes) -> bool:
    """A whole response: its head, and as much body as its Content-Length says."""
    head, separator, body = response.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return head.startswith(b"HTTP/1.1 101 ")  # otherwise: until the server hangs up


@pytest.mark.parametrize("websocket", [True, False], ids=["websocket", "http"])
async def test_a_foreign_host_is_refused(daemon: DaemonProcess, websocket: bool) -> None:
    for host in ("evil.example", f"evil.example:{daemon.port}", f"10.1.2.3:{daemon.port}"):
        for path in ("/", "/health", "/instances"):
            status, body = await request(daemon.port, host, websocket=websocket, path=path)
            assert status == 403, (host, path, status, body)
            assert b"--allow-host" in body, body
            assert b"instances" not in body, body  # nothing else is said
            assert b"status" not in body, body
    log = daemon.log()
    assert "host 'evil.example' is not allowed" in log


@pytest.mark.parametrize("websocket", [True, False], ids=["websocket", "http"])
async def test_loopback_names_and_the_bound_address_pass(
    daemon: DaemonProcess, websocket: bool
) -> None:
    expected = 101 if websocket else 200
    for host in (
        f"127.0.0.1:{daemon.port}",
        f"localhost:{daemon.port}",
        "LOCALHOST",
        f"[::1]:{daemon.port}",
        f"lab.localhost:{daemon.port}",
        None,  # HTTP/1.0 without Host: not a browser
    ):
        status, body = await request(daemon.port, host, websocket=websocket, path="/health")
        if host is None and websocket:
            assert status == 400, body  # websockets need HTTP/1.1 (and so a Host)
            continue
        assert status == expected, (host, status, body)
        if not websocket:
            assert json.loads(body) == {"status": "ok"}


async def test_allow_host_admits_a_name(daemon: DaemonProcess) -> None:
    for host in ("lab-pi.example", f"LAB-PI.example.:{daemon.port}"):
        assert (await request(daemon.port, host, websocket=True))[0] == 101, host
        assert (await request(daemon.port, host, websocket=False, path="/health"))[0] == 200
    # Not its subdomains, nor names that merely end like it.
    for host in ("x.lab-pi.example", "evil-lab-pi.example"):
        assert (await request(daemon.port, host, websocket=True))[0] == 403, host


def test_the_allow_list() -> None:
    hosts = HostAllowList(["127.0.0.1", "lab-pi.example", "192.168.1.20"])
    for allowed in (
        "localhost",
        "localhost:8765",
        "localhost.",
        "a.b.localhost",
        "127.0.0.1",
        "127.8.9.10:1",
        "[::1]:8765",
        "::1",
        "Lab-Pi.Example",
        "lab-pi.example.:80",
        "192.168.1.20:8765",
    ):
        assert hosts.allows(allowed), allowed
        assert hosts.allows(allowed.encode()), allowed
    for refused in (
        "",
        ":8765",
        "evil.example",
        "localhost.evil.example",
        "lab-pi.example.evil.example",
        "192.168.1.21",
        "[fe80::1]:8765",
        "[::1",
        "0.0.0.0",
    ):
        assert not hosts.allows(refused), refused
    wildcard = HostAllowList(["0.0.0.0"])
    assert wildcard.allows("10.0.0.7:8765")
    assert wildcard.allows("[fe80::1]")
    assert not wildcard.allows("evil.example")
    assert HostAllowList(["*"]).allows("evil.example")
    assert HostAllowList().describe() == "loopback names"
    assert wildcard.describe() == "loopback names, any IP address"


def test_help_lists_allow_host() -> None:
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    text = " ".join(serve.format_help().split())
    assert "--allow-host NAME" in text
    assert "a DNS-rebinding web page cannot reach the daemon" in text
    args = serve.parse_args(["--allow-host", "a.example", "--allow-host", "b.example"])
    assert args.allow_host == ["a.example", "b.example"]
    assert serve.parse_args([]).allow_host == []
