"""The README's examples run as written: the 30-second one on both backends, and
every one of them copied into a file and run as a script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _first_python_block() -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python example"
    return blocks[0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_readme_example_runs(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    source = _first_python_block()
    namespace: dict[str, object] = {"__name__": "readme_example"}  # its main guard stays shut
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README
    anyio.run(namespace["main"], backend=backend)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "got 1024 bytes" in out
    assert out.split()[-5:] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_readme_daemon_for_tests_example_runs(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (source,) = [block for block in blocks if "DaemonProcess" in block]
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - its main guard stays shut
    anyio.run(namespace["main"], backend=backend)  # type: ignore[arg-type]
    assert capsys.readouterr().out.strip() == "[]"


def test_readme_blocking_example_runs_as_a_script(capsys: pytest.CaptureFixture[str]) -> None:
    """The "From plain scripts and notebooks" block, run as a script (its main guard open)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (source,) = [block for block in blocks if "BlockingExecutor(" in block]
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert capsys.readouterr().out.splitlines() == ["2.5", "scan closed", "['stage']"]


# -- every example, run as a script --------------------------------------------------------

# Run, with a real daemon, by tests/server/test_main_trap.py and the test above.
DAEMON_EXAMPLES = (
    "from camera import Camera",
    "DaemonProcess",
    # run by tests/server/test_lifecycles.py, then killed with SIGKILL
    'create_remote_instance(shutter, "shutter", scope="connection")',
)

# What each script prints (a regular expression for all of its output), keyed by
# a line that appears in that block only.
EXPECTED_OUTPUT = {
    "class Camera:\n    _config_props_": r"got 1024 bytes\n0\n1\n2\n3\n4\n",
    "BlockingExecutor(": r"2\.5\nscan closed\n\['stage'\]\n",
    "with ExecutorContext(threads):": (
        r"in this process\nin a child process\nin this process\nin a child process\n"
    ),
    "cam.remote_executor = child": r"in a child process\nin a child process\nin this process\n",
    "@apply_executor(blocking=False)": r"2\.5\n",
    "anyio.move_on_after(": r"stopped after [1-9]\d* spectra\n\[0\.0\]\n",
    "list_invocations(": r"spectra running\nspectra cancelled\n",
    "invocation.follow_log()": (
        # a busy machine may take the next spectrum before the cancel lands
        r"INFO spectrum 0 taken\nINFO spectrum 1 taken\nINFO spectrum 2 taken\n"
        r"(INFO spectrum [34] taken\n)?cancelled\n"
    ),
    "get_echo_clock()": r"True\n",
    "class SerialPort:": r"opened /dev/ttyUSB0 at 115200 baud\n\*IDN\? -> ok\nclosed /dev/ttyUSB0\n",
    "executor.observe(stage": (
        r"#1 position = 0\.0\n#2 homed = False\n#3 homed = True\n"
        r"#4 position = 1\.0\n#5 position = 2\.0\n#6 position = 0\.5\n"
    ),
}


def _scripts() -> list[tuple[int, int, str]]:
    """(index among the python blocks, README line of its first line, source)."""
    text = README.read_text()
    return [
        (index, text.count("\n", 0, match.start(1)) + 1, match.group(1))
        for index, match in enumerate(re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL))
    ]


def _expected_output(source: str) -> str:
    keys = [key for key in EXPECTED_OUTPUT if key in source]
    assert len(keys) == 1, f"say in EXPECTED_OUTPUT what this example prints:\n{source}"
    return EXPECTED_OUTPUT[keys[0]]


def test_each_expected_output_names_one_example() -> None:
    sources = [source for _, _, source in _scripts()]
    for key in EXPECTED_OUTPUT:
        assert sum(key in source for source in sources) == 1, key


@pytest.mark.parametrize(
    ("index", "source"),
    [
        pytest.param(index, source, id=f"block{index}-line{line}")
        for index, line, source in _scripts()
        if not any(marker in source for marker in DAEMON_EXAMPLES)
    ],
)
def test_readme_example_runs_as_a_script(index: int, source: str, tmp_path: Path) -> None:
    """Copied into a file in an empty directory and run: no daemon, no token."""
    script = tmp_path / f"example_{index}.py"
    script.write_text(source)
    env = {key: value for key, value in os.environ.items() if key != "REMOTE_EXEC_TOKEN"}
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(_expected_output(source), result.stdout), result.stdout
