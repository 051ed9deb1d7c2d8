"""The README's 30-second example runs as written, on both backends."""

from __future__ import annotations

import re
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
