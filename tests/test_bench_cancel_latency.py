"""``benchmarks/cancel_latency.py`` runs end to end: one round on every executor.

Nothing here is timed: the benchmark's numbers are for its report, not for
assertions. What is checked is that each cancel happened as the benchmark
says (the caller got ``InvocationCancelled``, the loop recorded its stop,
the next call answered) and that the events came in their causal order.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import cancel_latency

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", ["thread", "process", "websocket"])
async def test_one_round_of_cancels(kind: str, anyio_backend: str) -> None:
    spec = {"executor": kind, "backend": anyio_backend, "rounds": 1, "seed": 0}
    result = await cancel_latency.measure(spec)
    assert len(result["echo_us"]) == cancel_latency.ECHO_CALLS
    assert len(result["after_rest_us"]) == 1
    for loop in cancel_latency.LOOPS:
        (sample,) = result["samples"][loop]
        assert set(sample) == {*cancel_latency.METRICS, "next_alone"}
        assert all(math.isfinite(value) for value in sample.values()), sample
        # Causal order, on the one CLOCK_MONOTONIC of the machine: the loop
        # stopped after the cancel was asked for and before its caller heard;
        # the next call answered after that.
        assert 0 < sample["stopped"] < sample["caller"] < sample["next"], sample
        assert 0 < sample["returned"]
    summary = cancel_latency.summarise([result])
    table = cancel_latency.render({f"{kind} {anyio_backend}": summary}, [kind])
    assert cancel_latency.EXECUTORS[kind] in table
