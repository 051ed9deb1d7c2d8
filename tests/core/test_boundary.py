"""The core's boundary: importing it loads no transport, server or runtime.

Each import runs in a fresh interpreter, since this one has loaded everything
already. The modules are found on disk, so a new core module is checked too.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import remote_exec

# The packages installed under remote_exec that are not the core.
OUTSIDE = ("client", "runtime", "server")

CORE = [
    "remote_exec",
    *sorted(
        f"remote_exec.{info.name}"
        for info in pkgutil.iter_modules(remote_exec.__path__)
        if info.name not in OUTSIDE
    ),
]

# Top-level packages, and remote_exec's subpackages, that the core must not load.
FORBIDDEN = ("websockets", "hypercorn", *(f"remote_exec.{name}" for name in OUTSIDE))

PROBE = """
import json, sys
{imports}
forbidden = {forbidden!r}
print(json.dumps(sorted(
    name for name in sys.modules
    if any(name == f or name.startswith(f + ".") for f in forbidden)
)))
"""


def loaded_after(*statements: str) -> list[str]:
    """The forbidden modules loaded after running ``statements`` in a fresh interpreter."""
    code = PROBE.format(imports="\n".join(statements), forbidden=FORBIDDEN)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_the_core_modules_are_found() -> None:
    assert {"remote_exec.protocol", "remote_exec.codecs", "remote_exec.executor"} <= set(CORE)


@pytest.mark.parametrize("module", CORE)
def test_importing_a_core_module_loads_no_transport_server_or_runtime(module: str) -> None:
    assert loaded_after(f"import {module}") == []


def test_core_names_of_the_top_level_stay_light() -> None:
    """The errors and the executor interface come from the core alone."""
    statements = (
        "import remote_exec",
        "dir(remote_exec)",
        "remote_exec.RemoteException, remote_exec.ConnectionLostError",
        "remote_exec.ExecutorContext, remote_exec.register_coder",
        "from remote_exec import TokenRefusedError, current_executor",
    )
    assert loaded_after(*statements) == []


def test_a_client_name_loads_the_client() -> None:
    """The probe itself works: the lazy names do load their homes."""
    loaded = loaded_after("import remote_exec", "remote_exec.ThreadExecutor")
    assert "remote_exec.client" in loaded
