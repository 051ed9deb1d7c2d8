"""The ``__main__`` trap: a client's script imported on the remote side.

The process executor's child, and a daemon with ``--allow-import-from-main``,
import the client's main script to create the classes it defines. Its
``if __name__ == "__main__":`` block stays shut there; an unguarded
``anyio.run(main)`` must not run the client's program again over there (the
daemon connected to itself and hung; the child failed with a puzzling
``No module named '__remote_exec_main_...'``): it fails at once, saying how to
guard the script. The scripts are the README's own examples, run as files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import anyio.from_thread  # noqa: F401 - imported here, not first in a test's import thread
import pytest

from remote_exec.exceptions import ExecutorStateError
from remote_exec.executor import (
    ClientMainImport,
    check_not_importing_client_main,
    importing_client_main,
)
from remote_exec.server.dispatch import _load_main
from remote_exec.server.testing import DaemonProcess

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX console script")

README = Path(__file__).resolve().parents[2] / "README.md"
REMOTE_EXEC = Path(sys.executable).with_name("remote-exec")
GUARD = 'if __name__ == "__main__":'
FIX = f"Put that code under `{GUARD}`"


def python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def camera_example() -> str:
    """The README's first example: ``Camera`` and a ThreadExecutor ``main``."""
    source = python_blocks()[0]
    assert "class Camera" in source
    assert GUARD in source
    return source


def daemon_client_example() -> str:
    """The README's script that uses ``camera.py`` through a daemon."""
    (source,) = [block for block in python_blocks() if "from camera import Camera" in block]
    return source


def unguard(source: str) -> str:
    """``source`` with its ``if __name__ == "__main__":`` block run unconditionally."""
    head, guard, body = source.partition(GUARD)
    assert guard, "no main guard"
    body = body.split("\n", 1)[1]  # what the guard line says after the colon goes
    return head + "\n".join(line.removeprefix("    ") for line in body.splitlines()) + "\n"


def one_script_for_the_daemon(guarded: bool) -> str:
    """The README's daemon example as one script: ``Camera`` defined in it (its
    ``__main__``), created through a WebSocketExecutor."""
    camera = camera_example().split("\n\nasync def main")[0]
    client = daemon_client_example()
    client = client.replace(
        "from camera import Camera  # the example above, saved as camera.py\n", ""
    )
    script = camera + "\n\n" + client
    return script if guarded else unguard(script)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """This process's environment, the token in ``tmp_path``, none elsewhere."""
    environ = {k: v for k, v in os.environ.items() if k != "REMOTE_EXEC_TOKEN"}
    environ["REMOTE_EXEC_TOKEN_FILE"] = str(tmp_path / "state" / "token")
    environ["XDG_STATE_HOME"] = str(tmp_path / "state")
    return environ


def run_script(path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a script file (hang guard: 60 s); its result and how long it took."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, path.name],
        cwd=path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, time.monotonic() - started


def serve(cwd: Path, env: dict[str, str], *args: str) -> DaemonProcess:
    """``remote-exec serve ARGS`` (the console script, with a token) started in ``cwd``."""
    daemon = DaemonProcess(*args, cwd=cwd, env=env, start=False)
    daemon.args[:3] = [str(REMOTE_EXEC), "serve"]
    try:
        daemon.start()
    except BaseException:
        daemon.close()
        raise
    return daemon


# -- the README's examples, run as written -------------------------------------------------


def test_every_example_that_runs_a_loop_is_guarded() -> None:
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    checked = 0
    for page in docs:
        for block in python_blocks(page):
            if re.search(r"\b(anyio|trio|asyncio)\.run\(", block):
                checked += 1
                assert GUARD in block, f"{page.name}: unguarded example:\n{block}"
                (after,) = re.findall(
                    rf"^{re.escape(GUARD)}.*\n((?:    .*\n?)+)", block, re.MULTILINE
                )
                assert re.search(r"\b(anyio|trio|asyncio)\.run\(", after), block
    assert checked >= 3


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_readme_daemon_example_runs_as_written(
    backend: str, tmp_path: Path, env: dict[str, str]
) -> None:
    (tmp_path / "camera.py").write_text(camera_example())
    client = tmp_path / "client.py"
    with serve(tmp_path, env, "--allow-module", "camera", "--backend", backend) as daemon:
        client.write_text(daemon_client_example().replace("ws://127.0.0.1:8765", daemon.url))
        result, _ = run_script(client, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["got 1024 bytes", "1024 bytes from the daemon"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_readme_script_with_its_class_in_main_through_the_daemon(
    backend: str, tmp_path: Path, env: dict[str, str]
) -> None:
    args = ["--allow-import-from-main", "--backend", backend]
    with serve(tmp_path, env, *args) as daemon:
        guarded, unguarded = tmp_path / "guarded.py", tmp_path / "unguarded.py"
        for path, ok in ((guarded, True), (unguarded, False)):
            path.write_text(
                one_script_for_the_daemon(ok).replace("ws://127.0.0.1:8765", daemon.url)
            )
        good, _ = run_script(guarded, env)
        bad, took = run_script(unguarded, env)
        still, _ = run_script(guarded, env)  # the daemon is fine afterwards
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == ["got 1024 bytes", "1024 bytes from the daemon"]
    assert still.returncode == 0, still.stderr
    # Unguarded: a clear error within seconds (not the 60 s creation bound, not a hang).
    assert bad.returncode == 1
    assert took < 30
    assert "RemoteImportError" in bad.stderr
    assert f"the client's main script {unguarded} was imported on the remote side" in bad.stderr
    assert "calls anyio.run() (line " in bad.stderr
    assert FIX in bad.stderr
    assert bad.stdout == ""  # the script's main never ran in the daemon (nor got a frame)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_readme_example_with_a_process_executor(
    backend: str, tmp_path: Path, env: dict[str, str]
) -> None:
    source = camera_example().replace("ThreadExecutor", "ProcessExecutor")
    source = source.replace(
        "    anyio.run(main)  #", f"    anyio.run(main, backend={backend!r})  #"
    )
    assert f"backend={backend!r}" in source
    guarded, unguarded = tmp_path / "guarded.py", tmp_path / "unguarded.py"
    guarded.write_text(source)
    unguarded.write_text(unguard(source))
    good, _ = run_script(guarded, env)
    bad, took = run_script(unguarded, env)
    assert good.returncode == 0, good.stderr
    assert good.stdout.split() == ["got", "1024", "bytes", "0", "1", "2", "3", "4"]
    assert bad.returncode == 1
    assert took < 30
    assert "__remote_exec_main_" not in bad.stderr.split("Remote traceback")[0]
    assert "RemoteImportError" in bad.stderr
    assert f"the client's main script {unguarded} was imported on the remote side" in bad.stderr
    assert FIX in bad.stderr
    assert bad.stdout == ""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_class_of_an_interactive_main_gets_one_clear_error(
    backend: str, tmp_path: Path, env: dict[str, str]
) -> None:
    # A notebook's, `python -c`'s or stdin's __main__ has no file to import.
    source = camera_example().replace("ThreadExecutor", "ProcessExecutor")
    source = source.replace(
        "    anyio.run(main)  #", f"    anyio.run(main, backend={backend!r})  #"
    )
    result = subprocess.run(
        [sys.executable, "-"],
        input=source,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "NotAllowedError" in result.stderr
    assert "interactive __main__" in result.stderr
    assert "move it to a module" in result.stderr
    assert result.stdout == ""


def test_readme_blocking_example_with_a_process_executor(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Sync code too: the executor starts on a loop in another thread."""
    (source,) = [block for block in python_blocks() if "BlockingExecutor(" in block]
    source = source.replace("ThreadExecutor", "ProcessExecutor")
    guarded, unguarded = tmp_path / "guarded.py", tmp_path / "unguarded.py"
    guarded.write_text(source)
    unguarded.write_text(unguard(source))
    good, _ = run_script(guarded, env)
    bad, took = run_script(unguarded, env)
    assert good.returncode == 0, good.stderr
    assert "['stage']" in good.stdout
    assert bad.returncode == 1
    assert took < 30
    assert "its top-level code starts a ProcessExecutor (line " in bad.stderr
    assert FIX in bad.stderr


# -- how the trap works, in this process ------------------------------------------------------


def load_in_a_thread(path: Path) -> ModuleType:
    """``_load_main`` in a fresh thread (its trap is that thread's only), bounded."""
    outcome: list[ModuleType | BaseException] = []

    def load() -> None:
        try:
            outcome.append(_load_main(str(path)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(30)
    assert outcome, "the import hung"
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.fixture
def marker_file(tmp_path: Path) -> Path:
    return tmp_path / "main-ran"


RUNNERS = {
    "anyio.run": ("import anyio\n", "anyio.run(main)", "anyio.run()"),
    "anyio trio": ("import anyio\n", "anyio.run(main, backend='trio')", "anyio.run()"),
    "trio.run": ("import trio\n", "trio.run(main)", "trio.run()"),
    "asyncio.run": ("import asyncio\n", "asyncio.run(main())", "asyncio.run()"),
    "asyncio.Runner": (
        "import asyncio\n",
        "with asyncio.Runner() as runner:\n    runner.run(main())",
        "asyncio.Runner.run()",
    ),
    "run_until_complete": (
        "import asyncio\n",
        (
            "loop = asyncio.new_event_loop()\ntry:\n    loop.run_until_complete(main())\n"
            "finally:\n    loop.close()"
        ),
        "loop.run_until_complete()",
    ),
}


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_an_event_loop_started_while_importing_a_client_main_never_runs(
    runner: str, tmp_path: Path, marker_file: Path
) -> None:
    imports, call, named = RUNNERS[runner]
    script = tmp_path / "script.py"
    script.write_text(
        f"{imports}from pathlib import Path\n\n\nclass Camera:\n    pass\n\n\n"
        f"async def main():\n    Path({str(marker_file)!r}).write_text('ran')\n\n\n{call}\n"
    )
    (calling,) = [text for text in call.splitlines() if ".run" in text]
    line = 1 + script.read_text().splitlines().index(calling)
    with pytest.raises(ImportError) as trapped:
        load_in_a_thread(script)
    assert (
        str(trapped.value)
        == ClientMainImport(str(script), f"calls {named} (line {line})").message()
    )
    assert not marker_file.exists()
    assert not [m for m in list(sys.modules.values()) if getattr(m, "__file__", "") == str(script)]
    guarded = script.read_text().replace(
        call, GUARD + "\n" + "\n".join("    " + part for part in call.splitlines())
    )
    script.write_text(guarded)
    module = load_in_a_thread(script)
    del sys.modules[module.__name__]
    assert module.Camera.__name__ == "Camera"
    assert not marker_file.exists()


def test_an_executor_started_while_importing_a_client_main_raises(tmp_path: Path) -> None:
    """Even on a loop the trap does not see start (a blocking portal's own thread)."""
    script = tmp_path / "portal.py"
    script.write_text(
        "from anyio.from_thread import start_blocking_portal\n"
        "from remote_exec import ThreadExecutor\n\n\n"
        "async def main():\n"
        "    async with ThreadExecutor():\n"
        "        pass\n\n\n"
        "with start_blocking_portal() as portal:\n"
        "    portal.call(main)\n"
    )
    with pytest.raises(ImportError) as trapped:
        load_in_a_thread(script)
    assert "its top-level code starts a ThreadExecutor (line 6)" in str(trapped.value)
    assert FIX in str(trapped.value)
    # Started from no line of the script's on that loop: the line is the importing thread's.
    script.write_text(
        "from anyio.from_thread import start_blocking_portal\n"
        "from remote_exec import ProcessExecutor\n\n"
        "with start_blocking_portal() as portal:\n"
        "    portal.call(ProcessExecutor().start)\n"
    )
    with pytest.raises(ImportError) as trapped:
        load_in_a_thread(script)
    assert "its top-level code starts a ProcessExecutor (line 5)" in str(trapped.value)


def test_the_marker_is_only_set_inside(tmp_path: Path) -> None:
    check_not_importing_client_main("starts nothing")  # outside: no error
    with importing_client_main(str(tmp_path / "x.py")) as marker:
        with pytest.raises(ExecutorStateError, match="starts a thing"):
            check_not_importing_client_main("starts a thing")
        assert marker.trapped == "starts a thing"
    check_not_importing_client_main("starts nothing")
