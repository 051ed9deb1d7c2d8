"""The examples run as written and show what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_acquisition_example(kind: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.acquisition", kind],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dashboard sees spectrometer.acquire running" in out
    assert "the acquisition was cancelled" in out
    assert "dark frame taken" not in out
    assert "dark frame: queued, never taken" in out
    table = [line.split()[:2] for line in out.splitlines() if line.startswith(("acquire ", "dark"))]
    assert ["acquire", "cancelled"] in table
    assert ["dark_frame", "cancelled"] in table
    live = [line for line in out.splitlines() if line.startswith("live: ")]
    assert live[:3] == [f"live: INFO spectrum {i} taken" for i in range(3)]
    assert "submitted acquisition cancelled" in out


def test_the_reconnect_example() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.reconnect"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "at 1.0",
        "the call in flight failed at once: ConnectionLostError",
        "at 2.0",
        "connected: True, reconnects: 1",
        "move 1.0 at speed 2.5",
        "home started",
        "move 2.0 at speed 2.5",
    ]
