"""The server side: dispatcher, ASGI app and the remote-exec serve daemon."""

from __future__ import annotations

from .app import RemoteExecApp as RemoteExecApp, create_app as create_app
from .dispatch import Dispatcher as Dispatcher

__all__: list[str] = ["Dispatcher", "RemoteExecApp", "create_app"]
