"""The executors under test: each test runs once per executor and backend.

The websocket executor talks to a real ``remote-exec serve`` daemon started
once per session and backend (the daemon runs the same backend as the
client); the process executor starts a real child per test. The Ray
executor runs on one local Ray started once per session (``tests/ray_cluster``);
a few tests that need every instance in one process are skipped for it
(``RAY_SKIPS`` says why).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from remote_exec import (
    Executor,
    ProcessExecutor,
    RayExecutor,
    ThreadExecutor,
    WebSocketExecutor,
)

from ..ray_cluster import local_ray
from ..ws_instruments import DaemonProcess

EXECUTORS = ["thread", "process", "websocket", "ray"]

# Each Ray instance is an actor of its own, in a process of its own: what a
# test shares between two instances through module globals (a barrier, a log
# read through a second instance), or an instance passed to another one as an
# argument (it must live where the callee lives), cannot work there. Each
# promise these tests check is checked for Ray another way in tests/ray.
_ONE_PROCESS = "needs every instance in one process (RayExecutor: one actor each)"
RAY_SKIPS = {
    "test_calls_to_different_instances_run_concurrently": _ONE_PROCESS
    + "; see tests/ray/test_ray.py::test_instances_run_concurrently",
    "test_a_cancelled_queued_call_never_starts": _ONE_PROCESS
    + "; see tests/ray/test_ray.py::test_a_cancelled_queued_call_never_starts",
    "test_instances_as_arguments_and_results": "an instance passed as an argument must live "
    "in the callee's process (RayExecutor: one actor per instance)",
}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """The session's local Ray (started on first use)."""
    yield from local_ray()


@pytest.fixture(scope="session")
def daemons() -> Iterator[dict[str, DaemonProcess]]:
    started: dict[str, DaemonProcess] = {}
    yield started
    for daemon in started.values():
        daemon.close()


@pytest.fixture(params=EXECUTORS)
def executor_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_executor(
    executor_kind: str,
    anyio_backend: str,
    daemons: dict[str, DaemonProcess],
    request: pytest.FixtureRequest,
):
    """A factory of not-yet-started executors of the kind under test."""
    if executor_kind == "ray":
        name = getattr(request.node, "originalname", request.node.name)
        if name in RAY_SKIPS:
            pytest.skip(RAY_SKIPS[name])
        request.getfixturevalue("ray_cluster")

    def make(**options: object) -> Executor:
        if executor_kind == "thread":
            # check_codec: what could not travel to the remote executors fails here too
            options.setdefault("check_codec", True)
            return ThreadExecutor(**options)  # type: ignore[arg-type]
        if executor_kind == "process":
            return ProcessExecutor(**options)  # type: ignore[arg-type]
        if executor_kind == "ray":
            return RayExecutor(**options)  # type: ignore[arg-type]
        if anyio_backend not in daemons:
            daemons[anyio_backend] = DaemonProcess(
                "--host",
                "127.0.0.1",
                "--no-auth",
                "--allow-module",
                "tests.*",
                "--backend",
                anyio_backend,
            )
        return WebSocketExecutor(daemons[anyio_backend].url, **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def executor(make_executor) -> AsyncIterator[Executor]:
    async with make_executor() as started:
        yield started


@pytest.fixture
def tag() -> str:
    """A name no other test uses (instances and shared state are keyed by it)."""
    return f"t{uuid.uuid4().hex[:12]}"
