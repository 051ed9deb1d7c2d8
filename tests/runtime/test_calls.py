"""The calls' state machines: every move of each kind's table, and the real paths.

The tables are restated here on purpose: a change to a kind's moves must be
a change of this test too.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from remote_exec import apply_executor, apply_generator_executor
from remote_exec.exceptions import CallCancelledError, ExecutorStateError, UnknownInstanceError
from remote_exec.executor import remote_method
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.backend import threadsafe_call_soon
from remote_exec.runtime.calls import (
    AsyncCall,
    CallState,
    InlineCall,
    InvalidTransition,
    Runner,
    RuntimeCall,
    StreamCall,
    SyncCall,
)
from remote_exec.runtime.events import EventHub
from remote_exec.runtime.instances import Instance
from remote_exec.runtime.runtime import InstanceRuntime

pytestmark = pytest.mark.anyio

Q, R, P, D = CallState.QUEUED, CallState.RUNNING, CallState.PARKED, CallState.DONE
CALL_MOVES = {(Q, R), (Q, D), (R, D)}
STREAM_MOVES = {
    (P, Q), (P, P), (P, D),
    (Q, Q), (Q, R), (Q, P), (Q, D),
    (R, R), (R, Q), (R, P), (R, D),
}  # fmt: skip
TIMEOUT = 10  # a failure bound: nothing waits on it when the code is right


class Probe:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.closed = False

    @apply_executor
    def echo(self, value: Any) -> Any:
        return value

    @apply_executor
    def block(self) -> str:
        self.started.set()
        self.release.wait(TIMEOUT)
        return "released"

    @apply_executor
    async def nap(self) -> str:
        await anyio.sleep(TIMEOUT)
        return "woke"

    @apply_generator_executor
    def count(self, n: int) -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            self.closed = True


class FakePeer:
    """A peer that records what the calls send it."""

    def __init__(self, credit: int = 0) -> None:
        self.alive = True
        self.calls: dict[int, RuntimeCall] = {}
        self.session = "fake"
        self.call_soon: Callable[..., object] = threadsafe_call_soon()
        self.sent: list[tuple[str, int, Any]] = []
        self.credits: dict[int, int] = {}
        self.default_credit = credit
        self.changed = anyio.Event()

    def _record(self, kind: str, sid: int, value: Any) -> None:
        self.sent.append((kind, sid, value))
        self.changed.set()

    def reply(self, sid: int, value: Any) -> None:
        self._record("reply", sid, value)

    def fail(self, sid: int, exc: BaseException) -> None:
        self._record("fail", sid, exc)

    def send_items(self, sid: int, items: list[Any]) -> None:
        self.credits[sid] = self.credit(sid) - len(items)
        self._record("items", sid, items)

    def end_stream(self, sid: int) -> None:
        self._record("end", sid, None)

    def credit(self, sid: int) -> int:
        return self.credits.get(sid, self.default_credit)

    def schedule_flush(self, stream: StreamCall) -> None:
        stream.flush()

    def forget(self, call: RuntimeCall) -> None:
        self.calls.pop(call.sid, None)

    def runner_for(self, instance: Instance) -> Runner:
        raise AssertionError("no async entries here")

    async def until(self, kind: str) -> tuple[str, int, Any]:
        with anyio.fail_after(TIMEOUT):
            while not any(sent[0] == kind for sent in self.sent):
                self.changed = anyio.Event()
                await self.changed.wait()
        return next(sent for sent in self.sent if sent[0] == kind)


@asynccontextmanager
async def held(probe: Probe) -> AsyncIterator[tuple[InstanceRuntime, Instance]]:
    runtime = InstanceRuntime(InstanceRegistry(), EventHub(), threads_have_loops=False)
    await runtime.create("probe", ("tests", "Probe"), lambda: probe)
    try:
        yield runtime, runtime.instances["probe"]
    finally:
        await runtime.close()


def bare_calls(instance: Instance) -> list[RuntimeCall]:
    peer = FakePeer()
    echo = remote_method(Probe, "echo")
    return [
        SyncCall(peer, 1, instance, echo.func, [], {}, "echo"),
        InlineCall(peer, 2, instance, echo.func, [], {}, "echo"),
        AsyncCall(peer, 3, instance, remote_method(Probe, "nap"), [], {}, Runner(instance)),
        StreamCall(peer, 4, instance, remote_method(Probe, "count"), [3], {}, None),
    ]


async def test_every_move_of_every_kind_follows_its_table() -> None:
    async with held(Probe()) as (_, instance):
        for call in bare_calls(instance):
            allowed = STREAM_MOVES if isinstance(call, StreamCall) else CALL_MOVES
            assert call.moves == {
                old: frozenset(new for (o, new) in allowed if o == old) for old in CallState
            }
            for old, new in itertools.product(CallState, repeat=2):
                call.state = old
                if (old, new) in allowed:
                    call._move(new)
                    assert call.state is new
                else:
                    with pytest.raises(InvalidTransition, match=f"from {old.value} to {new.value}"):
                        call._move(new)
                    assert call.state is old


async def test_a_sync_call_goes_queued_running_done() -> None:
    probe = Probe()
    async with held(probe) as (runtime, instance):
        peer = FakePeer()
        blocker = runtime.call(peer, 1, instance, remote_method(Probe, "block"), [], {})
        follower = runtime.call(peer, 2, instance, remote_method(Probe, "echo"), [5], {})
        assert blocker.state is R
        assert follower.state in (Q, R)  # sync calls are handed on to the thread in order
        probe.release.set()
        await peer.until("reply")
        with anyio.fail_after(TIMEOUT):
            while len(peer.sent) < 2:
                await peer.until("reply")
                await anyio.lowlevel.checkpoint()
        assert [sent[:2] for sent in peer.sent] == [("reply", 1), ("reply", 2)]
        assert [sent[2] for sent in peer.sent] == ["released", 5]
        assert blocker.state is D
        assert follower.state is D
        assert peer.calls == {}


async def test_a_queued_call_cancelled_never_starts() -> None:
    probe = Probe()
    async with held(probe) as (runtime, instance):
        peer = FakePeer()
        runtime.call(peer, 1, instance, remote_method(Probe, "block"), [], {})
        inline = InlineCall(peer, 2, instance, remote_method(Probe, "echo").func, [9], {}, "echo")
        peer.calls[2] = inline
        instance.enqueue(inline)  # not pipelined: waits for the blocker
        assert inline.state is Q
        inline.on_cancel()
        assert inline.state is D
        kind, sid, error = await peer.until("fail")
        assert (kind, sid) == ("fail", 2)
        assert isinstance(error, CallCancelledError)
        probe.release.set()
        await peer.until("reply")
        assert ("reply", 2, 9) not in peer.sent


async def test_a_stream_parks_without_credit_and_runs_with_it() -> None:
    probe = Probe()
    async with held(probe) as (runtime, instance):
        peer = FakePeer(credit=0)
        stream = runtime.call(peer, 1, instance, remote_method(Probe, "count"), [3], {})
        assert isinstance(stream, StreamCall)
        assert stream.state is P  # no credit: no step
        await anyio.wait_all_tasks_blocked()
        assert peer.sent == []
        peer.credits[1] = 2
        stream.on_credit()
        assert stream.state in (Q, R)
        await peer.until("items")
        with anyio.fail_after(TIMEOUT):
            while stream.state is not P:  # two items, then parked again
                await anyio.lowlevel.checkpoint()
        assert [value for kind, _, value in peer.sent if kind == "items"] == [[0, 1]]
        peer.credits[1] = 2
        stream.on_credit()
        await peer.until("end")
        items = [item for kind, _, value in peer.sent if kind == "items" for item in value]
        assert items == [0, 1, 2]
        assert stream.state is D
        assert probe.closed


async def test_deleting_runs_what_was_queued_before_then_closes_streams() -> None:
    probe = Probe()
    async with held(probe) as (runtime, instance):
        peer = FakePeer(credit=1)
        stream = runtime.call(peer, 1, instance, remote_method(Probe, "count"), [10], {})
        await peer.until("items")
        runtime.call(peer, 2, instance, remote_method(Probe, "block"), [], {})
        queued = InlineCall(peer, 3, instance, remote_method(Probe, "echo").func, [1], {}, "echo")
        peer.calls[3] = queued
        instance.enqueue(queued)
        async with anyio.create_task_group() as tg:
            tg.start_soon(runtime.delete, "probe")
            await anyio.wait_all_tasks_blocked()
            probe.release.set()
        failures = {sid: error for kind, sid, error in peer.sent if kind == "fail"}
        replies = {sid: value for kind, sid, value in peer.sent if kind == "reply"}
        assert replies == {2: "released", 3: 1}  # queued before the delete: they ran
        assert list(failures) == [1]
        assert isinstance(failures[1], UnknownInstanceError)
        assert "'probe' was deleted" in str(failures[1])
        assert stream.state is D
        assert queued.state is D
        assert probe.closed
        assert "probe" not in runtime.instances


async def test_closing_answers_the_running_call_and_fails_the_queued_ones() -> None:
    probe = Probe()
    runtime = InstanceRuntime(InstanceRegistry(), EventHub(), threads_have_loops=False)
    await runtime.create("probe", ("tests", "Probe"), lambda: probe)
    instance = runtime.instances["probe"]
    peer = FakePeer()
    runtime.call(peer, 1, instance, remote_method(Probe, "block"), [], {})
    queued = InlineCall(peer, 2, instance, remote_method(Probe, "echo").func, [1], {}, "echo")
    peer.calls[2] = queued
    instance.enqueue(queued)
    assert await anyio.to_thread.run_sync(probe.started.wait, TIMEOUT)  # it runs: it finishes
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.close, "going away")
        await anyio.wait_all_tasks_blocked()
        probe.release.set()
    assert ("reply", 1, "released") in peer.sent
    failures = [(sid, error) for kind, sid, error in peer.sent if kind == "fail"]
    assert [sid for sid, _ in failures] == [2]
    assert isinstance(failures[0][1], ExecutorStateError)
    assert str(failures[0][1]) == "going away"
    assert runtime.instances == {}
    assert not instance.worker.thread or not instance.worker.thread.is_alive()
