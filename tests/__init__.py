"""The remote-exec test suite."""

from __future__ import annotations
