"""The server side: dispatcher, ASGI app and the remote-exec serve daemon."""

from __future__ import annotations

__all__: list[str] = []
