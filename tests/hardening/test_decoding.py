"""One message can neither balloon the daemon nor stall its other clients (issue 16, item 3).

The audit's reproducers were 16 MiB messages of millions of empty arrays or
maps (2.4 GB of peak RSS and a 16 s stall of every client for the first).
Each is now refused by the element cap (``--max-elements``) before it is
decoded; and a large message within the cap is decoded in a worker thread,
so a client on another connection keeps getting answers meanwhile. Each test
reads the daemon's peak RSS (``VmHWM``, reset before the attack through
``/proc/PID/clear_refs``) and the worst latency of a paced client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgpack
import pytest

from remote_exec.exceptions import FrameError
from remote_exec.framing import CODEC_JSON, CODEC_MSGPACK, encode_frame
from remote_exec.protocol import Limits
from tests.core.helpers import join
from tests.hardening.helpers import CALL, Bystander, Daemon, RawClient, bystander, survives

pytestmark = pytest.mark.anyio

MiB = 1 << 20
PEAK_BOUND = 300 * MiB  # over the daemon's RSS before the attack; the audit saw up to 2.4 GB
STALL_BOUND = 1.0  # seconds: the worst a paced client waits (a bound on stalls, not a speed)


def vm(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def reset_peak(pid: int) -> int:
    """Reset the daemon's ``VmHWM`` to its RSS now (Linux: ``clear_refs`` 5); that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = vm(pid, "VmRSS")
    assert vm(pid, "VmHWM") <= before + MiB, "VmHWM was not reset"
    return before


@dataclass
class Probe:
    """A well-behaved client's calls, paced, during an attack: the worst latency and the count."""

    worst: float = 0.0
    answered: int = 0


@asynccontextmanager
async def paced_calls(witness: Bystander) -> AsyncIterator[Probe]:
    """Call the bystander's instrument every 10 ms until the block ends."""
    probe = Probe()
    async with anyio.create_task_group() as tg:

        async def ping() -> None:
            while True:
                started = time.monotonic()
                try:
                    assert await witness.call("echo", "ping") == "ping"
                finally:  # a call still waiting when the block ends counts too
                    probe.worst = max(probe.worst, time.monotonic() - started)
                probe.answered += 1
                await anyio.sleep(0.01)  # pacing, not synchronisation

        tg.start_soon(ping)
        yield probe
        tg.cancel_scope.cancel()


def msgpack_call(sid: int, args_body: bytes, count: int) -> bytes:
    """A msgpack Call of ``list_instances`` whose args array holds ``count`` values, as given."""
    body = (
        b"\x99"
        + msgpack.packb(CALL)
        + msgpack.packb(sid)
        + msgpack.packb("")
        + msgpack.packb("list_instances")
        + b"\xdd"
        + count.to_bytes(4, "big")
        + args_body
        + b"\x80\xc2\x00\x80"  # {}, false, 0, {}
    )
    return join(encode_frame(CODEC_MSGPACK, body))


def json_call(sid: int, items: bytes) -> bytes:
    body = b'[1,%d,"","list_instances",[%s],{},false,0,{}]' % (sid, items)
    return join(encode_frame(CODEC_JSON, body))


SIXTEEN = 16 * MiB
ATTACKS: dict[str, Callable[[], bytes]] = {
    # the audit's reproducers: 2.4 GB, 1.2 GB and 851 MiB of peak RSS
    "a msgpack call of 16M empty arrays": lambda: msgpack_call(1, b"\x90" * SIXTEEN, SIXTEEN),
    "a msgpack array of 16M empty maps": lambda: join(
        encode_frame(CODEC_MSGPACK, b"\xdd" + SIXTEEN.to_bytes(4, "big") + b"\x80" * SIXTEEN)
    ),
    "a json array of 5.6M empty objects": lambda: join(
        encode_frame(CODEC_JSON, b"[" + b"{}," * (SIXTEEN // 3) + b"{}]")
    ),
    # each array under a per-array cap of a million, 16M values in all
    "a msgpack call of 16 arrays of 1M empty arrays": lambda: msgpack_call(
        1, (b"\xdd" + MiB.to_bytes(4, "big") + b"\x90" * MiB) * 16, 16
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_message_over_the_element_cap_is_refused_cheaply(
    daemon: Daemon, attack: str
) -> None:
    data = ATTACKS[attack]()
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            before = reset_peak(daemon.pid)
            async with paced_calls(witness) as probe:
                await raw.send_binary(data)
                reason = await raw.protocol_error()
            peak = vm(daemon.pid, "VmHWM") - before
        assert f"more than {Limits().max_elements} values" in reason, reason
        assert "element cap" in reason, reason
        assert peak < PEAK_BOUND, f"peak RSS +{peak / MiB:.0f} MiB"
        assert probe.answered >= 1
        assert probe.worst < STALL_BOUND, f"a client waited {probe.worst:.2f} s"
        await survives(daemon, witness)


# In-cap messages that took seconds to decode on the event loop: 16 calls of
# 250,000 empty arrays each, packed in one 4 MiB websocket message.
CALLS = 16
VALUES = 250_000
BIG_MESSAGES: dict[str, Callable[[], bytes]] = {
    "msgpack": lambda: b"".join(
        msgpack_call(sid, b"\x90" * VALUES, VALUES) for sid in range(1, CALLS + 1)
    ),
    "json": lambda: b"".join(
        json_call(sid, b",".join([b"[]"] * VALUES)) for sid in range(1, CALLS + 1)
    ),
}


@pytest.mark.parametrize("codec", list(BIG_MESSAGES))
async def test_a_large_message_is_decoded_off_the_event_loop(daemon: Daemon, codec: str) -> None:
    data = BIG_MESSAGES[codec]()
    async with bystander(daemon) as witness:
        async with RawClient.connect(daemon) as raw:
            before = reset_peak(daemon.pid)
            async with paced_calls(witness) as probe:
                await raw.send_binary(data)
                # Each call was decoded, then dispatched: list_instances takes no arguments.
                for sid in range(1, CALLS + 1):
                    type_name, message = await raw.failure(sid)
                    assert type_name == "TypeError", (type_name, message)
                    assert f"{VALUES + 3} were given" in message, message
            peak = vm(daemon.pid, "VmHWM") - before
            await raw.still_serves()
        assert probe.answered >= 1
        assert probe.worst < STALL_BOUND, f"a client waited {probe.worst:.2f} s"
        assert peak < PEAK_BOUND, f"peak RSS +{peak / MiB:.0f} MiB"
        await survives(daemon, witness)


async def test_a_client_refuses_to_send_a_call_over_the_cap(daemon: Daemon) -> None:
    cap = Limits().max_elements
    async with bystander(daemon) as witness:
        with pytest.raises(FrameError, match="element cap"):
            await witness.call("echo", [0] * cap)  # the call's own fields make it cap + 3
        under = [0] * (cap - 100)  # room for the call's own fields and meta
        assert await witness.call("echo", under) == under
        await survives(daemon, witness)
