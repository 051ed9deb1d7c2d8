"""The invocation record and table: forward-only status, retention, filters."""

from __future__ import annotations

import pytest

from remote_exec.exceptions import InvocationCancelled
from remote_exec.invocations import (
    FORWARD,
    InvocationInfo,
    InvocationScope,
    InvocationStatus,
    LogEntry,
)
from remote_exec.runtime.invocations import InvocationTable


class FakeCall:
    def __init__(self, invocation_id: str, instance: str = "dev", method: str = "read") -> None:
        self.invocation = InvocationScope(invocation_id, instance, method)
        self.cancels = 0

    def cancel_by_id(self) -> None:
        self.cancels += 1
        self.invocation.cancel(by_id=True)


def test_status_only_moves_forward() -> None:
    scope = InvocationScope("a", "dev", "read")
    assert scope.status is InvocationStatus.PENDING
    scope.start()
    assert scope.info().status is InvocationStatus.RUNNING
    started = scope.started_at
    scope.start()  # no way back, no second start
    assert scope.started_at == started
    scope.finish(ValueError("bad"))
    assert scope.info().status is InvocationStatus.ERROR
    assert scope.error == "ValueError: bad"
    scope.finish()  # finished once: never completed afterwards
    assert scope.info().status is InvocationStatus.ERROR
    for status, nexts in FORWARD.items():
        assert status not in nexts
        if status.finished:
            assert nexts == frozenset()


@pytest.mark.parametrize(
    ("error", "cancelled", "status"),
    [
        (None, False, InvocationStatus.COMPLETED),
        (KeyError("k"), False, InvocationStatus.ERROR),
        (InvocationCancelled("stop"), False, InvocationStatus.CANCELLED),
        (None, True, InvocationStatus.CANCELLED),
    ],
)
def test_the_outcome_decides_the_final_status(
    error: BaseException | None, cancelled: bool, status: InvocationStatus
) -> None:
    scope = InvocationScope("a")
    scope.finish(error, cancelled=cancelled)
    assert scope.status is status
    assert scope.ended_at is not None
    assert scope.started_at is None  # it never ran


def test_info_travels_as_plain_values() -> None:
    scope = InvocationScope("a", "dev", "read")
    scope.start()
    scope.add_log(LogEntry(1.5, "INFO", "lab", "moved"))
    scope.finish()
    info = scope.info()
    assert info.status == "completed"  # a str enum
    assert info.log == (LogEntry(1.5, "INFO", "lab", "moved"),)
    assert InvocationInfo.from_wire(info.to_wire()) == info


def test_the_log_keeps_the_newest_records() -> None:
    scope = InvocationScope("a")
    for i in range(10):
        scope.add_log(LogEntry(float(i), "INFO", "lab", str(i)), limit=3)
    assert [entry.message for entry in scope.info().log] == ["7", "8", "9"]


def test_finished_invocations_expire_by_age_and_by_count() -> None:
    table = InvocationTable(retention=3600, max_finished=2)
    calls = [FakeCall(str(i)) for i in range(3)]
    for call in calls:
        table.add(call)
    for call in calls:
        call.invocation.finish()
        table.finished(call)
    with pytest.raises(LookupError):
        table.get("0")  # the oldest went first
    assert [info.id for info in table.list()] == ["1", "2"]
    expiring = InvocationTable(retention=0)
    call = FakeCall("x")
    expiring.add(call)
    assert expiring.get("x").status is InvocationStatus.PENDING  # live: never expires
    call.invocation.finish()
    call.invocation.ended_at = 0.0  # finished long ago
    expiring.finished(call)
    with pytest.raises(LookupError):
        expiring.get("x")
    assert len(expiring) == 0


def test_filters_and_cancel() -> None:
    table = InvocationTable()
    read, move = FakeCall("r", "dev", "read"), FakeCall("m", "stage", "move")
    table.add(read)
    table.add(move)
    move.invocation.start()
    assert [i.id for i in table.list(instance="stage")] == ["m"]
    assert [i.id for i in table.list(method="read")] == ["r"]
    assert [i.id for i in table.list(status="running")] == ["m"]
    assert [i.id for i in table.list(status=InvocationStatus.PENDING)] == ["r"]
    with pytest.raises(ValueError, match="sleeping"):
        table.list(status="sleeping")
    table.cancel("m")
    assert move.cancels == 1
    assert move.invocation.cancelled
    with pytest.raises(LookupError):
        table.cancel("nope")
    assert read.cancels == 0


def test_a_call_that_was_never_added_is_not_kept() -> None:
    table = InvocationTable()
    stray = FakeCall("s")
    stray.invocation.finish()
    table.finished(stray)  # e.g. a property read
    assert len(table) == 0
