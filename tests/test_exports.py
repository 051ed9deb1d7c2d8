"""What ``remote_exec`` exports: exactly the public names of the submodules it
draws from (websockets' rule), each resolving to its home module's object; and
only the client and server subpackages exist (no bare ``client``/``server``)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

import remote_exec

# The submodules whose ``__all__`` the top level re-exports, all of it.
SOURCES = (
    "remote_exec.exceptions",
    "remote_exec.invocations",
    "remote_exec.executor",
    "remote_exec.registry",
    "remote_exec.client",
)

# What DESIGN.md's public API section and the errors users catch name.
CONTRACT = {
    "apply_executor",
    "apply_generator_executor",
    "ExecutorContext",
    "current_executor",
    "ThreadExecutor",
    "ProcessExecutor",
    "WebSocketExecutor",
    "RemoteException",
    "NO_CALLBACK",
    "register_coder",
    "ConnectionLostError",
    "ExecutorStateError",
    "RemoteExecError",
    "NotAllowedError",
    "UnknownInstanceError",
    "DuplicateInstanceError",
    "ProtocolError",
    "TokenFileError",
    "TokenRefusedError",
    "CallCancelledError",
}


def source_exports() -> dict[str, list[str]]:
    """Each public name and the source modules that list it in ``__all__``."""
    homes: dict[str, list[str]] = {}
    for module_name in SOURCES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            homes.setdefault(name, []).append(module_name)
    return homes


def test_top_level_exports_exactly_the_sources_public_names() -> None:
    assert set(remote_exec.__all__) == set(source_exports())
    assert len(remote_exec.__all__) == len(set(remote_exec.__all__))


def test_a_name_in_several_sources_is_one_object() -> None:
    """``remote_exec.client`` re-exports the context helpers it is documented with."""
    for name, modules in source_exports().items():
        objects = {id(getattr(importlib.import_module(m), name)) for m in modules}
        assert len(objects) == 1, (name, modules)


def test_every_name_resolves_to_its_source_object() -> None:
    homes = source_exports()
    for name in remote_exec.__all__:
        value = getattr(remote_exec, name)
        assert value is getattr(importlib.import_module(homes[name][0]), name), name


def test_contract_names_and_every_error_class_are_exported() -> None:
    import remote_exec.exceptions as exceptions_module

    errors = {
        name
        for name, value in vars(exceptions_module).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == exceptions_module.__name__
    }
    assert errors >= {"RemoteExecError", "TokenRefusedError", "CallCancelledError"}
    assert set(remote_exec.__all__) >= CONTRACT | errors


def test_dir_lists_every_export() -> None:
    assert set(dir(remote_exec)) >= set(remote_exec.__all__)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = remote_exec.nope  # type: ignore[attr-defined]
    assert not hasattr(remote_exec, "remote_exception")  # a helper, not an export


def test_star_import_gives_every_export() -> None:
    code = (
        "from remote_exec import *\n"
        "import remote_exec\n"
        "missing = [n for n in remote_exec.__all__ if n not in globals()]\n"
        "assert not missing, missing\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


def test_client_and_server_are_subpackages_only() -> None:
    import remote_exec.client
    import remote_exec.server

    assert remote_exec.client.__name__ == "remote_exec.client"
    assert remote_exec.server.__name__ == "remote_exec.server"
    for bare in ("client", "server"):
        spec = importlib.util.find_spec(bare)
        # pytest runs from the repo root, where the folders sit; an installed
        # bare module would live in site-packages instead.
        assert spec is None or "site-packages" not in (spec.origin or ""), bare
