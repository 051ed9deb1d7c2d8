"""Peer: RPyC, service mode (not classic), with a ``ThreadedServer`` in a server process.

Clients use one connection per thread. W4 iterates the remote generator
through its netref, one round trip per item, as RPyC does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import rpyc  # type: ignore[import-untyped]
from rpyc.utils.server import ThreadedServer  # type: ignore[import-untyped]

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload

DISTRIBUTIONS = ("rpyc",)


class EchoService(rpyc.Service):  # type: ignore[misc]
    def exposed_echo(self, x: object) -> object:
        return x

    def exposed_stream(self, n: int) -> Iterator[int]:
        yield from range(n)


def serve(options: Mapping[str, str]) -> None:
    server = ThreadedServer(EchoService, hostname="127.0.0.1", port=0)
    # The constructor only binds; listen before announcing the port so that no
    # client is refused (start() calls listen() again, which is harmless).
    server.listener.listen()
    h.announce(server.port)
    server.start()


@contextmanager
def _connect(port: int) -> Iterator[rpyc.Connection]:
    conn = rpyc.connect("127.0.0.1", port)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def _connection_echo(port: int) -> Iterator[Callable[[object], object]]:
    with _connect(port) as conn:
        yield conn.root.echo


def run(workload: Workload, params: Params) -> float:
    with h.module_server(__name__.rpartition(".")[2], params.options) as server:
        if workload == "W2":
            return h.w2_threads(lambda: _connection_echo(server.port), params)
        with _connect(server.port) as conn:
            match workload:
                case "W1":
                    return h.w1_latency_sync(conn.root.echo, params)
                case "W3":
                    return h.w3_bulk_sync(conn.root.echo, params)
                case "W4":
                    return h.w4_stream_sync(conn.root.stream, params)
        raise AssertionError(workload)
