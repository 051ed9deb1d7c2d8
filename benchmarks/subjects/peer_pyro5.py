"""Peer: Pyro5, with its default serializer ``serpent`` or with ``msgpack`` (option ``serializer``).

A Pyro5 daemon in a server process (thread-pool server, the default) serves
an exposed class; clients use one proxy per thread, as Pyro5's docs require.
serpent sends bytes as a base64 dict, which both sides turn back into bytes
with ``serpent.tobytes``, as Pyro5's docs tell users to. W4 iterates a
remote generator through Pyro5's iterator streaming (one round trip per item).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import Pyro5.api  # type: ignore[import-untyped]
import serpent  # type: ignore[import-untyped]

from benchmarks import _harness as h
from benchmarks._harness import Params, Workload

DISTRIBUTIONS = ("Pyro5", "serpent", "msgpack")


@Pyro5.api.expose
class PyroEcho:
    def echo(self, x: object) -> object:
        return serpent.tobytes(x) if isinstance(x, dict) else x

    def stream(self, n: int) -> Iterator[int]:
        yield from range(n)


def serve(options: Mapping[str, str]) -> None:
    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    daemon.register(PyroEcho, objectId="echo")
    h.announce(daemon.sock.getsockname()[1])
    daemon.requestLoop()


@contextmanager
def _proxy_echo(uri: str) -> Iterator[Callable[[object], object]]:
    with Pyro5.api.Proxy(uri) as proxy:
        yield proxy.echo


def run(workload: Workload, params: Params) -> float:
    Pyro5.api.config.SERIALIZER = params.options["serializer"]
    with h.module_server(__name__.rpartition(".")[2], params.options) as server:
        uri = f"PYRO:echo@127.0.0.1:{server.port}"
        if workload == "W2":
            return h.w2_threads(lambda: _proxy_echo(uri), params)
        with Pyro5.api.Proxy(uri) as proxy:
            match workload:
                case "W1":
                    return h.w1_latency_sync(proxy.echo, params)
                case "W3":
                    echo = proxy.echo
                    return h.w3_bulk_sync(lambda data: serpent.tobytes(echo(data)), params)
                case "W4":
                    return h.w4_stream_sync(proxy.stream, params)
        raise AssertionError(workload)
