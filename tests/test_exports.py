"""The public names of DESIGN.md are importable from ``remote_exec``, and only
the client and server subpackages exist (no bare ``client``/``server``)."""

from __future__ import annotations

import importlib.util

import remote_exec

PUBLIC = {
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
}


def test_public_names_are_exported() -> None:
    missing = {name for name in PUBLIC if not hasattr(remote_exec, name)}
    assert not missing
    assert set(remote_exec.__all__) >= PUBLIC
    assert len(remote_exec.__all__) == len(set(remote_exec.__all__))


def test_all_names_exist() -> None:
    for name in remote_exec.__all__:
        assert getattr(remote_exec, name) is not None, name


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
