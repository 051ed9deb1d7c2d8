"""One daemon per backend per test module, started on first use.

A module sets ``DAEMON_ARGS`` (extra ``remote-exec serve`` options) for its
daemons. The ``daemon`` fixture gives the one of the test's backend and marks
its log, so that ``survives`` sees only what the test itself caused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.hardening.helpers import Daemon, start_daemon


@pytest.fixture(scope="module")
def daemons(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Daemon]]:
    args: tuple[str, ...] = tuple(getattr(request.module, "DAEMON_ARGS", ()))
    tmp = tmp_path_factory.mktemp("daemons")
    started: dict[str, Daemon] = {}

    def get(backend: str) -> Daemon:
        daemon = started.get(backend)
        if daemon is None or not daemon.alive():
            daemon = started[backend] = start_daemon(backend, tmp, *args)
        return daemon

    try:
        yield get
    finally:
        for daemon in started.values():
            daemon.process.close()


@pytest.fixture
def daemon(daemons: Callable[[str], Daemon], anyio_backend: str) -> Daemon:
    running = daemons(anyio_backend)
    running.mark_log()
    return running
