"""What a client learns from a remote failure: a traceback without the daemon's paths.

A real daemon serves a package ``lab`` from a directory under its home
directory. A method of ``lab.probe_fail.Failing`` raises from inside an
installed package (sniffio, in site-packages); a module with a syntax error
fails to import. The client's tracebacks name every file relative to its
package (``lab/probe_fail.py``, ``sniffio/_impl.py``) with its line, never by
an absolute path; the daemon's log (at DEBUG) has the full traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import anyio
import pytest

import remote_exec
from remote_exec import RemoteException, apply_executor
from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.server.testing import DaemonProcess

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX daemon"),
    pytest.mark.timeout(60),
]

TOKEN = "traceback-test-token-0123456789"

MODULE = """\
import sniffio

from remote_exec import apply_executor


class Failing:
    @apply_executor
    def fail(self, message):
        try:
            sniffio.current_async_library()  # no event loop in this thread: raises
        except sniffio.AsyncLibraryNotFoundError as exc:
            raise ValueError(message) from exc
"""
FAIL_LINE = MODULE.splitlines().index("            raise ValueError(message) from exc") + 1
BROKEN = "x = 1\n\ndef broken(:\n    pass\n"


class Failing:
    """The client's twin of ``lab.probe_fail.Failing``."""

    @apply_executor
    def fail(self, message: str) -> None:
        raise AssertionError("runs remotely only")


Failing.__module__ = "lab.probe_fail"


class Broken:
    """A class of ``lab.broken``, a module that cannot be imported."""


Broken.__module__ = "lab.broken"

FILE_NAME = re.compile(r'File "([^"]*)", line \d+')


def assert_no_server_paths(text: str, home: Path) -> list[str]:
    """``text`` names no file by an absolute path of the daemon's machine;
    returns the file names it has."""
    names = FILE_NAME.findall(text)
    assert names, text
    for name in names:
        assert not name.startswith("/"), (name, text)
        assert "\\" not in name, (name, text)
    for secret in (
        str(home),
        str(home.parent),
        "site-packages",
        sys.prefix,
        str(Path(remote_exec.__file__).resolve().parent.parent),
    ):
        assert secret not in text, (secret, text)
    return names


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home directory of the daemon's user (``bob``) holding the package ``lab``."""
    home = tmp_path / "users" / "bob"
    package = home / "code" / "lab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "probe_fail.py").write_text(MODULE)
    (package / "broken.py").write_text(BROKEN)
    return home


@pytest.mark.anyio
async def test_clients_get_tracebacks_without_server_paths(
    anyio_backend: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REMOTE_EXEC_TOKEN", raising=False)
    monkeypatch.setenv("REMOTE_EXEC_TOKEN_FILE", str(tmp_path / "state" / "token"))
    env = dict(os.environ, HOME=str(home))
    module_path = home / "code" / "lab" / "probe_fail.py"
    with DaemonProcess(
        "--backend",
        anyio_backend,
        "--allow-module",
        "lab.*",
        "--path",
        str(home / "code"),
        "--log-level",
        "DEBUG",
        env=env,
        token=TOKEN,
        cwd=home,
    ) as daemon:
        with anyio.fail_after(30):
            async with WebSocketExecutor(daemon.url, token=TOKEN) as executor:
                probe = Failing()
                async with executor.remote_instance(probe, "failing"):
                    with pytest.raises(ValueError, match="probe failed") as caught:
                        await probe.fail("probe failed")
                with pytest.raises(SyntaxError) as import_failed:
                    await executor.ensure_remote_instance(Broken(), "broken")

        assert isinstance(caught.value, RemoteException)
        remote = caught.value.remote_traceback
        names = assert_no_server_paths(remote, home)
        # Still useful: the failing method's file (from its package down),
        # line and source, and the installed package's frame it called.
        assert f'File "lab/probe_fail.py", line {FAIL_LINE}, in fail\n' in remote
        assert "raise ValueError(message) from exc" in remote
        assert "sniffio/_impl.py" in names
        assert "AsyncLibraryNotFoundError" in remote
        assert "ValueError: probe failed" in remote
        # The note on the client's exception is the same text.
        assert remote.rstrip() in "\n".join(caught.value.__notes__)

        broken = import_failed.value
        assert isinstance(broken, RemoteException)
        broken_names = assert_no_server_paths(broken.remote_traceback, home)
        assert "broken.py" in broken_names
        assert "def broken(:" in broken.remote_traceback

        # The daemon's log keeps the full tracebacks, absolute paths and all.
        log = daemon.log()
        assert re.search(r"call \d+ from 127\.0\.0\.1:\d+ failed with ValueError", log), log
        assert f'File "{module_path}", line {FAIL_LINE}, in fail' in log
        assert re.search(r'File "/[^"]*/site-packages/sniffio/_impl\.py", line \d+', log), log
        assert f'File "{module_path.parent / "broken.py"}", line 3' in log
