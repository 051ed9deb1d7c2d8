"""What only RayExecutor has: actors by name, placement, a dying actor.

The conformance suite checks every promise on RayExecutor too; these tests
check what is Ray's: attaching to an instance by name from another executor
(another driver), placement by a custom resource (and a clear error, in
bounded time, for one no node has), an actor process killed mid-call, and
its restart. Plus the two conformance promises that suite checks through
module globals shared by two instances (one process), checked here through
files. Every wait is bounded; nothing sleeps to synchronise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from remote_exec import ConnectionLostError, RayExecutor, TokenRefusedError
from remote_exec.invocations import InvocationInfo

from .devices import Camera, Journal

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("ray_cluster")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the conformance suite runs RayExecutor on both backends


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    return f"ray-{os.getpid()}-{request.node.name}"


async def remote_entries(device: Journal) -> list[str]:
    """The journal, without the notes of the test's own (local) objects."""
    return [entry for entry in await device.entries() if entry != f"init {os.getpid()}"]


async def listed(executor: RayExecutor, obj: Any, method: str, status: str) -> InvocationInfo:
    """The first invocation of ``method`` in ``status``, once there is one."""
    with anyio.fail_after(20):
        while True:
            found = await executor.list_invocations(instance=obj, method=method, status=status)
            if found:
                return found[0]
            await anyio.sleep(0.01)  # remote state: look again


def test_importing_remote_exec_does_not_import_ray() -> None:
    code = (
        "import sys, remote_exec\n"
        "remote_exec.RayExecutor, remote_exec.ThreadExecutor\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


async def test_a_second_executor_attaches_by_name(tag: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    async with RayExecutor() as first:
        mine = Journal(str(journal))
        async with first.remote_instance(mine, tag, str(journal)):
            pid = await mine.append("from the first")
            async with RayExecutor() as second:
                theirs = Journal(str(journal))
                assert await second.ensure_remote_instance(theirs, tag, str(journal)) is False
                assert await theirs.append("from the second") == pid  # the same actor
                assert tag in await second.get_remote_objects()
            # The second executor stopped: the instance lives on (it is detached).
            assert await remote_entries(mine) == [
                f"init {pid}",
                "from the first",
                "from the second",
            ]
        assert tag not in await first.get_remote_objects()


async def test_placement_by_custom_resource(tag: str, tmp_path: Path) -> None:
    journal = str(tmp_path / "journal")
    async with RayExecutor() as executor:
        placed = Journal(journal)
        async with executor.remote_instance(
            placed, tag, journal, ray_options={"resources": {"camera0": 1}}
        ):
            assert (await placed.resources()).get("camera0") == 1
        camera = Camera(journal)  # its class asks for the camera
        async with executor.remote_instance(camera, tag, journal):
            assert (await camera.resources()).get("camera0") == 1


async def test_a_missing_resource_fails_clearly_in_bounded_time(tag: str, tmp_path: Path) -> None:
    async with RayExecutor(placement_timeout=3) as executor:
        journal = Journal(str(tmp_path / "journal"))
        with anyio.fail_after(30), pytest.raises(TimeoutError, match="could not place") as caught:
            await executor.create_remote_instance(
                journal, tag, str(tmp_path / "journal"), ray_options={"resources": {"camera9": 1}}
            )
        assert "camera9" in str(caught.value)
        assert tag not in await executor.get_remote_objects()  # the actor was killed
        assert executor.registry.name_of(journal) is None


async def test_a_killed_actor_fails_the_call_in_flight(tag: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    async with RayExecutor() as executor:
        device = Journal(str(journal))
        await executor.create_remote_instance(device, tag, str(journal))
        try:
            pid = await device.pid()
            with anyio.fail_after(30):  # never a hang
                async with anyio.create_task_group() as tg:

                    async def blocked() -> None:
                        with pytest.raises(ConnectionLostError, match="Ray actor"):
                            await device.append_then_block("in flight", str(tmp_path / "never"))

                    tg.start_soon(blocked)
                    await listed(executor, device, "append_then_block", "running")
                    os.kill(pid, signal.SIGKILL)
            # Without max_restarts the actor is gone for good: a clear error, at once.
            with anyio.fail_after(20), pytest.raises(ConnectionLostError, match="gone"):
                await device.append("after")
        finally:
            await executor.delete_remote_instance(device)
        assert tag not in await executor.get_remote_objects()


async def test_a_restarted_actor_brings_the_instance_back_running_no_call_twice(
    tag: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    async with RayExecutor() as executor:
        device = Journal(str(journal))
        async with executor.remote_instance(
            device, tag, str(journal), ray_options={"max_restarts": 1}
        ):
            first_pid = await device.append("before")
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:

                    async def blocked() -> None:
                        with pytest.raises(ConnectionLostError):
                            await device.append_then_block("in flight", str(tmp_path / "never"))

                    tg.start_soon(blocked)
                    await listed(executor, device, "append_then_block", "running")
                    os.kill(first_pid, signal.SIGKILL)
                # The next call waits for Ray to restart the actor, which made
                # the instance again (its constructor ran again), then runs once.
                second_pid = await device.append("after")
            assert second_pid != first_pid
            assert await remote_entries(device) == [
                f"init {first_pid}",
                "before",
                "in flight",
                f"init {second_pid}",  # made again by the restarted actor
                "after",
            ]


async def test_instances_run_concurrently(tag: str, tmp_path: Path) -> None:
    """Two instances (two actors) meet: each waits for the other's mark."""
    journal = str(tmp_path / "journal")
    first, second = Journal(journal), Journal(journal)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    met: list[bool] = []
    async with (
        RayExecutor() as executor,
        executor.remote_instance(first, tag + "a", journal),
        executor.remote_instance(second, tag + "b", journal),
    ):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def meet(device: Journal, mine: str, theirs: str) -> None:
                    met.append(await device.meet(mine, theirs))

                tg.start_soon(meet, first, a, b)
                tg.start_soon(meet, second, b, a)
    assert met == [True, True]


async def test_a_cancelled_queued_call_never_starts(tag: str, tmp_path: Path) -> None:
    journal, gate = tmp_path / "journal", tmp_path / "gate"
    async with RayExecutor() as executor:
        device = Journal(str(journal))
        async with executor.remote_instance(device, tag, str(journal)):
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(device.hold, str(gate))
                    await listed(executor, device, "hold", "running")
                    queued = anyio.CancelScope()

                    async def queued_call() -> None:
                        with queued:
                            await device.append("queued ran")

                    tg.start_soon(queued_call)
                    await listed(executor, device, "append", "pending")
                    queued.cancel()
                    await listed(executor, device, "append", "cancelled")
                    gate.touch()
            pid = await device.append("after")
            assert await remote_entries(device) == [
                f"init {pid}",
                "hold started",
                "hold ended",
                "after",
            ]


async def test_a_wrong_token_is_refused(tag: str, tmp_path: Path) -> None:
    from remote_exec.client.ray import _ActorLink

    journal = str(tmp_path / "journal")
    async with RayExecutor() as executor:
        device = Journal(journal)
        async with executor.remote_instance(device, tag, journal):
            link = executor._hosts[tag].link
            assert link is not None
            intruder = _ActorLink(
                tag,
                (link.host, link.port, "not-the-token", link.pid),
                connect_timeout=10,
                codec="msgpack",
                limits=executor.limits,
                window=executor.window,
                registry=executor.registry,
            )
            with anyio.fail_after(20), pytest.raises(TokenRefusedError):
                await intruder.start()
            assert await device.append("still serving") > 0
