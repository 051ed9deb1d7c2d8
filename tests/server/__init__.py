"""Tests of the server side: the dispatcher, the ASGI app and the daemon."""

from __future__ import annotations
