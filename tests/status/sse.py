"""A bare server-sent-events reader over HTTP/1.1 (chunked), for the tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import SocketStream


class EventStream:
    """The events of one ``GET /events`` response: ``await next_event()``."""

    def __init__(self, stream: SocketStream, status: int, headers: dict[str, str]) -> None:
        self.stream = stream
        self.status = status
        self.headers = headers
        self._raw = bytearray()  # received, not yet de-chunked
        self._text = ""  # de-chunked, not yet parsed
        self.comments = 0

    async def _fill(self) -> None:
        data = await self.stream.receive()
        self._raw += data

    async def _chunk(self) -> bytes:
        while b"\r\n" not in self._raw:
            await self._fill()
        line, _, rest = bytes(self._raw).partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        while len(rest) < size + 2:
            await self._fill()
            line, _, rest = bytes(self._raw).partition(b"\r\n")
        self._raw = bytearray(rest[size + 2 :])
        if size == 0:
            raise EOFError("the stream ended")
        return rest[:size]

    async def next_event(self) -> tuple[str, Any]:
        """The next event (name, decoded data); comments are counted and skipped."""
        while True:
            while "\n\n" not in self._text:
                self._text += (await self._chunk()).decode()
            block, _, self._text = self._text.partition("\n\n")
            name, data = "message", []
            for line in block.split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                    continue
                field, _, value = line.partition(": ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
            if data:
                return name, json.loads("\n".join(data))

    async def until(self, wanted: Any) -> tuple[str, Any]:
        """The first event for which ``wanted(name, data)`` is true (within 10 s)."""
        with anyio.fail_after(10):
            while True:
                name, data = await self.next_event()
                if wanted(name, data):
                    return name, data


@asynccontextmanager
async def open_events(
    port: int, headers: dict[str, str] | None = None, path: str = "/events"
) -> AsyncIterator[EventStream]:
    """``GET /events`` on the daemon at ``port``; the stream once its head arrived."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += await stream.receive()
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parsed = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            parsed[name.strip().lower()] = value.strip()
        events = EventStream(stream, int(status_line.split()[1]), parsed)
        events._raw += rest
        yield events
