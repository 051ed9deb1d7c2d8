"""Fixtures of the status page's tests: a clean environment, a token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TOKEN = "status-test-token-0123456789"


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment with no token anywhere but in ``tmp_path``."""
    monkeypatch.delenv("REMOTE_EXEC_TOKEN", raising=False)
    monkeypatch.setenv("REMOTE_EXEC_TOKEN_FILE", str(tmp_path / "state" / "remote-exec" / "token"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    return dict(os.environ)
