"""``remote-exec serve`` as a newcomer meets it: finding their code, the
allow-list's patterns, the creation bound, sizes, ``--version`` and ``--help``.

Daemons here are the real console script (``remote-exec serve``, which, unlike
``python -m``, gets no current directory on ``sys.path`` from Python), started
in a temporary directory that holds the user's modules.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.exceptions import NotAllowedError, RemoteException
from remote_exec.server import cli
from remote_exec.server.dispatch import module_allowed
from remote_exec.server.testing import DaemonProcess

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX console script")

REMOTE_EXEC = Path(sys.executable).with_name("remote-exec")

MODULE = """
import os
from pathlib import Path

from remote_exec import apply_executor

Path(__file__).with_suffix(".imported").write_text("imported")


class Meter:
    def __init__(self, gain: int = 1) -> None:
        self.gain = gain

    @apply_executor
    def where(self) -> tuple[int, str, str]:
        return os.getpid(), os.getcwd(), __name__
"""


def serve(cwd: Path, *args: str, backend: str = "asyncio") -> DaemonProcess:
    """``remote-exec serve --no-auth --backend B ARGS`` started in ``cwd``."""
    daemon = DaemonProcess("--no-auth", "--backend", backend, *args, cwd=cwd, start=False)
    assert daemon.args[1:3] == ["-m", "remote_exec.server"]
    daemon.args[:3] = [str(REMOTE_EXEC), "serve"]
    try:
        daemon.start()
    except BaseException:
        daemon.close()
        raise
    return daemon


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory for the user's modules, importable by this (client) process too."""
    lab = tmp_path / "lab"
    lab.mkdir()
    monkeypatch.syspath_prepend(str(lab))
    before = set(sys.modules)
    yield lab
    for name in set(sys.modules) - before:
        if name.startswith(("myinstruments", "slow", "ghost", "needsdep")):
            del sys.modules[name]


def write_module(directory: Path, name: str, source: str = MODULE) -> None:
    (directory / f"{name}.py").write_text(source)


def meter_class(name: str) -> type:
    return importlib.import_module(name).Meter  # type: ignore[no-any-return]


# -- finding the user's code -------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("pattern", ["myinstruments", "myinstruments.*"])
async def test_serve_imports_from_the_current_directory(
    anyio_backend: str, modules: Path, pattern: str
) -> None:
    assert REMOTE_EXEC.is_file()
    write_module(modules, "myinstruments")
    with serve(modules, "--allow-module", pattern, backend=anyio_backend) as daemon:
        with anyio.fail_after(30):
            async with WebSocketExecutor(daemon.url) as executor:
                meter = meter_class("myinstruments")()
                async with executor.remote_instance(meter, "meter"):
                    pid, cwd, name = await meter.where()
        assert (pid, cwd, name) == (daemon.pid, str(modules), "myinstruments")
        assert f"imports from {modules} (the current directory)" in daemon.log()


@pytest.mark.anyio
async def test_serve_imports_from_each_path(
    anyio_backend: str, modules: Path, tmp_path: Path
) -> None:
    write_module(modules, "myinstruments")
    elsewhere, empty = tmp_path / "elsewhere", tmp_path / "empty"
    elsewhere.mkdir()
    empty.mkdir()
    args = ["--allow-module", "myinstruments.*", "--path", str(empty), "--path", str(modules)]
    with serve(elsewhere, *args, backend=anyio_backend) as daemon:
        with anyio.fail_after(30):
            async with WebSocketExecutor(daemon.url) as executor:
                meter = meter_class("myinstruments")()
                async with executor.remote_instance(meter, "meter"):
                    assert (await meter.where())[1:] == (str(elsewhere), "myinstruments")
        log = daemon.log()
    assert (
        f"imports from {empty} (--path), {modules} (--path), {elsewhere} (the current directory)"
        in log
    )


def test_path_must_be_a_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REMOTE_EXEC), "serve", "--port", "0", "--no-auth", "--path", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"--path {tmp_path / 'no'}: no such directory" in result.stderr


@pytest.mark.anyio
async def test_an_allowed_module_that_cannot_be_imported_says_where_it_looked(
    anyio_backend: str, modules: Path, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    write_module(modules, "ghost")  # the client has it, the daemon does not
    write_module(served, "needsdep", "import not_installed_dependency_xyz\n")
    args = ["--allow-module", "ghost.*", "--allow-module", "needsdep"]
    with serve(served, *args, backend=anyio_backend) as daemon:
        with anyio.fail_after(30):
            async with WebSocketExecutor(daemon.url) as executor:
                with pytest.raises(ModuleNotFoundError) as missing:
                    await executor.remote_import("ghost")
                with pytest.raises(ModuleNotFoundError) as created:
                    await executor.create_remote_instance(meter_class("ghost")(), "g")
                with pytest.raises(ModuleNotFoundError) as dependency:
                    await executor.remote_import("needsdep")
    for error in (missing.value, created.value):
        message = str(error)
        assert "cannot import module 'ghost'" in message
        assert "No module named 'ghost'" in message
        assert f"sys.path: {served} (the current directory)" in message
        assert "entries of the Python installation" in message
        assert "--path DIR" in message
    # A module that is there but misses a dependency says so, not where it looked.
    assert "not_installed_dependency_xyz" in str(dependency.value)
    assert "--path" not in str(dependency.value)


# -- the allow-list ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "patterns", "allowed"),
    [
        ("pkg", ["pkg.*"], True),
        ("pkg.sub", ["pkg.*"], True),
        ("pkg.sub.deep", ["pkg.*"], True),
        ("pkgfoo", ["pkg.*"], False),
        ("pkg_private", ["pkg.*"], False),
        ("pk", ["pkg.*"], False),
        ("Pkg", ["pkg.*"], False),
        ("pkg", ["pkg"], True),
        ("pkg.sub", ["pkg"], False),
        ("lab.a.drivers", ["lab.*.drivers.*"], True),
        ("lab.a.drivers.x", ["lab.*.drivers.*"], True),
        ("lab.a.driversx", ["lab.*.drivers.*"], False),
        ("anything", [], False),
        ("pkgfoo", ["pkg*"], True),  # a glob is a glob: prefer pkg.*
    ],
)
def test_allow_list_patterns(module: str, patterns: list[str], allowed: bool) -> None:
    assert module_allowed(module, patterns) is allowed


@pytest.mark.anyio
async def test_package_pattern_allows_the_package_but_not_a_longer_name(
    anyio_backend: str, modules: Path
) -> None:
    write_module(modules, "myinstruments")
    write_module(modules, "myinstrumentsfoo")
    for module in ("myinstruments", "myinstrumentsfoo"):  # the client imports both
        meter_class(module)
        (modules / f"{module}.imported").unlink()
    with serve(modules, "--allow-module", "myinstruments.*", backend=anyio_backend) as daemon:
        with anyio.fail_after(30):
            async with WebSocketExecutor(daemon.url) as executor:
                await executor.create_remote_instance(meter_class("myinstruments")(), "ok")
                with pytest.raises(NotAllowedError) as refused:
                    await executor.create_remote_instance(meter_class("myinstrumentsfoo")(), "no")
                assert await executor.get_remote_objects() == ["ok"]
    assert (modules / "myinstruments.imported").exists()
    assert not (modules / "myinstrumentsfoo.imported").exists()  # never imported
    assert "not on this server's allow-list" in str(refused.value)
    assert "--allow-module myinstrumentsfoo" in str(refused.value)


# -- the creation bound ----------------------------------------------------------------

STUCK_IMPORT = """
import threading
from pathlib import Path

with open(Path(__file__).with_suffix(".log"), "a") as log:
    log.write("import started\\n")
threading.Event().wait()  # top-level code that never returns
"""

STUCK_CONSTRUCTOR = """
import threading


class Meter:
    def __init__(self) -> None:
        threading.Event().wait()
"""


@pytest.mark.anyio
async def test_a_stuck_import_gives_an_error_and_runs_once(
    anyio_backend: str, modules: Path, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    write_module(served, "slowimport", STUCK_IMPORT)
    args = ["--allow-module", "slow*", "--create-timeout", "0.5"]
    with serve(served, *args, backend=anyio_backend) as daemon:
        with anyio.fail_after(30):
            async with WebSocketExecutor(daemon.url) as executor:
                for _ in range(2):
                    with pytest.raises(TimeoutError) as stuck:
                        await executor.remote_import("slowimport")
                    assert "importing module 'slowimport'" in str(stuck.value)
                    assert "did not finish within 0.5 s" in str(stuck.value)
                    assert "--create-timeout" in str(stuck.value)
                assert await executor.get_remote_objects() == []  # still serving
        assert daemon.stop() == 0
    # The second request waited for the same import instead of starting another.
    assert (served / "slowimport.log").read_text() == "import started\n"


@pytest.mark.anyio
async def test_a_stuck_constructor_gives_an_error(anyio_backend: str, modules: Path) -> None:
    write_module(modules, "slowinit", STUCK_CONSTRUCTOR)
    args = ["--allow-module", "slowinit", "--create-timeout", "0.5"]
    with serve(modules, *args, backend=anyio_backend) as daemon:
        with anyio.fail_after(30):
            async with WebSocketExecutor(daemon.url) as executor:
                meter: object = object.__new__(meter_class("slowinit"))  # __init__ blocks
                with pytest.raises(TimeoutError) as stuck:
                    await executor.create_remote_instance(meter, "stuck")
                assert await executor.get_remote_objects() == []
        assert daemon.stop() == 0
    message = str(stuck.value)
    assert "creating 'stuck' (slowinit.Meter): its constructor" in message
    assert "--create-timeout" in message
    assert isinstance(stuck.value, RemoteException)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_create_timeout_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["serve", "--create-timeout", value])
    assert exited.value.code == 2
    assert "--create-timeout" in capsys.readouterr().err


# -- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("134217728", 134217728),
        ("128MiB", 128 << 20),
        ("128 MiB", 128 << 20),
        ("64KiB", 64 << 10),
        ("64kib", 64 << 10),
        ("1GiB", 1 << 30),
        ("1.5MiB", 3 << 19),
        (".5KiB", 512),
        ("10MB", 10_000_000),
        ("2kB", 2000),
        ("100B", 100),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "12XB", "1e3", "-1", "0x10", "0.1KiB", "1.5", "1 2"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|whole number of bytes"):
        cli.parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(128 << 20, "128MiB"), (64 << 10, "64KiB"), (1 << 30, "1GiB"), (1000, "1000"), (1536, "1536")],
)
def test_format_size(size: int, text: str) -> None:
    assert cli.format_size(size) == text
    assert cli.parse_size(text) == size


def test_size_options_accept_and_show_human_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["serve", "--max-message-size", "64KiB"]).max_message_size == 65536
    assert parser.parse_args(["serve", "--max-message-size", "2048"]).max_message_size == 2048
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-message-size", "1000"])
    assert "must be at least 1KiB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-message-size", "lots"])
    assert "not a size: 'lots'" in capsys.readouterr().err
    assert "(default 128MiB)" in " ".join(serve_help().split())


# -- --version, --help, the start-up lines ----------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remote-exec serve")
    cli.add_serve_arguments(parser)
    return parser


def serve_help() -> str:
    return serve_parser().format_help()


@pytest.mark.parametrize(
    "command",
    [
        [str(REMOTE_EXEC), "--version"],
        [str(REMOTE_EXEC), "serve", "--version"],
        [sys.executable, "-m", "remote_exec.server", "--version"],
    ],
)
def test_version(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"remote-exec {importlib.metadata.version('remote-exec')} ")


def test_help_gives_every_option_its_default() -> None:
    parser = serve_parser()
    options = [action for action in parser._actions if action.option_strings]
    assert len(options) > 20
    for action in options:
        if action.dest in ("help", "version"):
            continue
        assert action.help is not None, action.option_strings
        assert "default" in action.help, action.option_strings
    text = " ".join(serve_help().split())
    for phrase in (
        "--allow-module PATTERN",
        "(default: none, no class can be created)",
        "--backend {asyncio,trio}",
        "(default asyncio)",
        "(default INFO)",
        "--path DIR",
        "'mylab.*' allows the package mylab itself",
        "(default 60)",
    ):
        assert phrase in text


def test_top_level_help_mentions_version_and_serve() -> None:
    result = subprocess.run(
        [str(REMOTE_EXEC), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0
    assert "--version" in result.stdout
    assert "remote-exec serve --help" in result.stdout


def test_one_start_up_line_each_on_stdout_and_in_the_log(tmp_path: Path) -> None:
    with serve(tmp_path, "--max-message-size", "32MiB", "--allow-module", "lab.*") as daemon:
        assert daemon.line == f"remote-exec serving on {daemon.url}"
        assert daemon.stop() == 0
        assert daemon.proc is not None
        assert daemon.proc.stdout is not None
        assert daemon.proc.stdout.read() == b""  # nothing more on stdout
        log = daemon.log()
    assert "Running on" not in log  # hypercorn's own banner is gone
    started = [line for line in log.splitlines() if " INFO " in line and "imports from" in line]
    assert len(started) == 1, log
    (line,) = started
    version = importlib.metadata.version("remote-exec")
    assert f"remote-exec {version} on asyncio; imports from {tmp_path} (the current directory)" in (
        line
    )
    assert "allow-module: lab.*" in line
    assert "max message size 32MiB" in line
    assert "create timeout 60 s" in line
    lines = log.splitlines()
    before_stop = lines[: next(i for i, text in enumerate(lines) if "SIGTERM" in text)]
    assert sum(" INFO " in text for text in before_stop) == 1, log


def test_the_daemon_command_is_the_same_under_python_m(tmp_path: Path) -> None:
    """``python -m remote_exec.server`` gets the same start-up line (and sys.path)."""
    with DaemonProcess("--no-auth", cwd=tmp_path) as daemon:
        assert daemon.stop() == 0
        log = daemon.log()
    assert f"imports from {tmp_path} (the current directory)" in log
    assert os.path.isdir(tmp_path)
