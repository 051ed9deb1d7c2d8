"""Per-invocation log capture on every executor and backend: what a method
logs goes to its own invocation, bounded, and can be followed live."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from remote_exec import Executor, InvocationStatus, LogEntry

from .devices import Chatty
from .helpers import listed

pytestmark = pytest.mark.anyio


def messages(log: tuple[LogEntry, ...] | list[LogEntry]) -> list[str]:
    return [entry.message for entry in log]


async def test_a_method_log_goes_to_its_invocation(executor: Executor, tag: str) -> None:
    chatty = Chatty(tag)
    async with executor.remote_instance(chatty, tag, tag):
        first = await chatty.talk(2, "alpha")
        second = await chatty.talk(1, "beta")
        assert first is not None
        assert second is not None
        info = await executor.get_invocation(first)
        assert messages(info.log) == ["alpha 0", "alpha 1", "alpha done"]  # no DEBUG
        assert [entry.level for entry in info.log] == ["INFO", "INFO", "WARNING"]
        assert {entry.logger for entry in info.log} == {f"tests.chatty.{tag}"}
        assert all(info.started_at <= e.time <= info.ended_at for e in info.log)  # type: ignore[operator]
        assert messages((await executor.get_invocation(second)).log) == ["beta 0", "beta done"]


async def test_concurrent_instances_keep_their_own_records(executor: Executor, tag: str) -> None:
    left, right = Chatty(f"{tag}l"), Chatty(f"{tag}r")
    async with (
        executor.remote_instance(left, f"{tag}l", f"{tag}l"),
        executor.remote_instance(right, f"{tag}r", f"{tag}r"),
    ):
        ids: dict[str, str | None] = {}

        async def talk(chatty: Chatty, word: str, asynchronous: bool) -> None:
            method = chatty.atalk if asynchronous else chatty.talk
            ids[word] = await method(200, word)

        async with anyio.create_task_group() as tg:
            tg.start_soon(talk, left, "left", False)
            tg.start_soon(talk, right, "right", False)
            tg.start_soon(talk, left, "aleft", True)
            tg.start_soon(talk, right, "aright", True)
        for word, invocation_id in ids.items():
            assert invocation_id is not None
            log = (await executor.get_invocation(invocation_id)).log
            words = {message.split()[0] for message in messages(log)}
            assert words == {word}, (word, words)
            assert len([m for m in messages(log) if m != f"{word} done"]) == 200


async def test_the_log_keeps_the_newest_records(executor: Executor, tag: str) -> None:
    chatty = Chatty(tag)
    async with executor.remote_instance(chatty, tag, tag):
        invocation_id = await chatty.talk(1050, "n")
        assert invocation_id is not None
        log = messages((await executor.get_invocation(invocation_id)).log)
        assert len(log) == 1000
        assert log[0] == "n 51"
        assert log[-2:] == ["n 1049", "n done"]


async def test_follow_a_log_while_the_call_runs(
    executor: Executor, tag: str, tmp_path: Path
) -> None:
    chatty = Chatty(tag)
    gate = tmp_path / "gate"
    async with executor.remote_instance(chatty, tag, tag):
        invocation = await executor.submit(chatty.hold, str(gate))
        await listed(executor, tag, "hold", "running")
        try:
            with anyio.fail_after(20):
                async with invocation.follow_log() as records:
                    first = await anext(records)
                    # The record arrived while the call still runs.
                    assert first.message == "waiting for gate"
                    assert (await invocation.info()).status is InvocationStatus.RUNNING
                    gate.touch()
                    rest = [entry.message async for entry in records]  # ends with the call
        finally:
            gate.touch()  # whatever happened above, the held call ends
        assert rest == ["released"]
        assert await invocation.result() == "released"
        # A finished invocation's log can still be followed: what it kept, then the end.
        async with executor.follow_log(invocation.id) as again:
            assert messages([entry async for entry in again]) == ["waiting for gate", "released"]


async def test_follow_an_unknown_invocation(executor: Executor) -> None:
    with anyio.fail_after(10), pytest.raises(LookupError):
        async with executor.follow_log("no-such-id") as records:
            await anext(records)
