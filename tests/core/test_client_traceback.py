"""``client_traceback``: a failure's traceback as a server sends it, without its paths."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from remote_exec.exceptions import client_traceback
from remote_exec.messages import Failure
from remote_exec.protocol import RpcConnection, Side
from remote_exec.registry import InstanceRegistry

FILE_NAME = re.compile(r'File "([^"]*)", line (\d+)')

SOURCE = """\
def leaf(message):
    raise ValueError(message)


def caller(message):
    leaf(message)
"""
PACKAGE_SOURCE = """\
def fail():
    raise KeyError("in the package")
"""


def file_names(text: str) -> list[str]:
    return [name for name, _ in FILE_NAME.findall(text)]


def caught(fn: Callable[[], object]) -> Exception:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc
    raise AssertionError("did not raise")


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package ``ctb_lab`` (with a module ``ctb_lab.stage``) deep under ``tmp_path``."""
    root = tmp_path / "home" / "bob" / "code"
    package = root / "ctb_lab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PACKAGE_SOURCE)
    (package / "stage.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(root))
    yield package
    for name in ("ctb_lab", "ctb_lab.stage"):
        sys.modules.pop(name, None)


def test_a_module_is_named_from_its_package_down(lab: Path) -> None:
    stage = importlib.import_module("ctb_lab.stage")
    text = client_traceback(caught(lambda: stage.caller("bad")))
    assert str(lab.parent) not in text
    # Every frame stays, with its line, function and source line.
    assert 'File "tests/core/test_client_traceback.py", line ' in text  # this test's frames
    assert 'File "ctb_lab/stage.py", line 6, in caller\n    leaf(message)\n' in text
    assert 'File "ctb_lab/stage.py", line 2, in leaf\n    raise ValueError(message)\n' in text
    assert text.startswith("Traceback (most recent call last):\n")
    assert text.endswith("ValueError: bad\n")
    for name in file_names(text):
        assert not name.startswith("/"), text


def test_a_package_init_keeps_its_package(lab: Path) -> None:
    package = importlib.import_module("ctb_lab")
    text = client_traceback(caught(package.fail))
    assert 'File "ctb_lab/__init__.py", line 2, in fail\n' in text
    assert str(lab) not in text


def test_an_installed_and_a_standard_library_module(tmp_path: Path) -> None:
    import json

    text = client_traceback(caught(lambda: json.loads("{")))
    assert str(Path(json.__file__).parent.parent) not in text
    assert 'File "json/decoder.py", line ' in text
    assert 'File "json/__init__.py", line ' in text

    # Installed packages (site-packages): no event loop runs here, so this raises.
    installed = client_traceback(caught(anyio.get_current_task))
    assert "site-packages" not in installed
    assert re.search(r'File "anyio/_core/_\w+\.py", line \d+, in get_current_task', installed)


def test_other_files_by_their_base_name(tmp_path: Path) -> None:
    path = tmp_path / "home" / "bob" / "script.py"
    code = compile("def run():\n    raise OSError('no device')\n", str(path), "exec")
    namespace: dict[str, object] = {"__name__": "__remote_exec_main_0123456789ab__"}
    exec(code, namespace)  # noqa: S102 - a script of the test's own
    run = namespace["run"]
    assert callable(run)
    text = client_traceback(caught(run))
    assert 'File "script.py", line 2, in run\n' in text
    assert str(path.parent) not in text

    # A file that is not its module's own (code compiled in a module's name).
    namespace = {"__name__": "ctb_lab.stage"}
    exec(code, namespace)  # noqa: S102
    run = namespace["run"]
    assert callable(run)
    assert 'File "script.py", line 2, in run\n' in client_traceback(caught(run))


def test_pseudo_files_stay() -> None:
    namespace: dict[str, object] = {}
    exec("def run():\n    raise ValueError('x')\n", namespace)  # noqa: S102
    run = namespace["run"]
    assert callable(run)
    assert 'File "<string>", line 2, in run\n' in client_traceback(caught(run))


def test_chains_and_groups(lab: Path) -> None:
    stage = importlib.import_module("ctb_lab.stage")

    def chained() -> None:
        try:
            stage.caller("first")
        except ValueError as exc:
            raise RuntimeError("second") from exc

    def in_context() -> None:
        try:
            stage.caller("first")
        except ValueError:
            raise RuntimeError("second") from None

    def grouped() -> None:
        raise ExceptionGroup("both", [caught(chained), caught(lambda: stage.leaf("third"))])

    text = client_traceback(caught(chained))
    assert "The above exception was the direct cause" in text
    assert text.count('File "ctb_lab/stage.py"') == 2
    assert "RuntimeError: second" in text
    assert str(lab) not in text

    group = client_traceback(caught(grouped))
    assert re.search(r'\| +File "ctb_lab/stage\.py", line 2, in leaf', group), group
    assert group.count('File "ctb_lab/stage.py"') == 3
    assert str(lab) not in group
    assert str(Path(__file__).parent) not in group
    for name in file_names(group):
        assert not name.startswith("/"), group

    assert "During handling" not in client_traceback(caught(in_context))


def test_a_syntax_error_names_its_file_only(tmp_path: Path) -> None:
    path = tmp_path / "home" / "bob" / "broken.py"
    exc = caught(lambda: compile("def broken(:\n", str(path), "exec"))
    text = client_traceback(exc)
    assert 'File "broken.py", line 1\n    def broken(:\n' in text
    assert str(path.parent) not in text


def test_an_exception_never_raised_has_its_line_only() -> None:
    assert client_traceback(ValueError("x")) == "ValueError: x\n"


def test_send_failure_sends_the_client_traceback(lab: Path) -> None:
    stage: ModuleType = importlib.import_module("ctb_lab.stage")
    registry = InstanceRegistry()
    client = RpcConnection(Side.CLIENT, registry)
    server = RpcConnection(Side.SERVER, registry)
    sid = client.send_call("dev", "read")
    for frame in client.data_to_send():
        server.receive_frame(b"".join(frame))
    server.events_received()
    server.send_failure(sid, caught(lambda: stage.caller("bad")))
    for frame in server.data_to_send():
        client.receive_frame(b"".join(frame))
    (event,) = client.events_received()
    assert isinstance(event, Failure)
    assert 'File "ctb_lab/stage.py", line 2, in leaf\n' in event.traceback
    assert str(lab) not in event.traceback
    assert str(Path(__file__).parent) not in event.traceback
