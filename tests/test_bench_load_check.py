"""``benchmarks/load_check.py --restart`` runs end to end, on a small load.

The daemon is restarted twice (SIGKILL, then SIGTERM) on the same port while
the clients, each with one ``WebSocketExecutor(reconnect=True)``, keep calling.
Asserted: the checks that say no call was lost or ran twice, and that the
clients rode through the restarts with the executor they started with. Not
asserted (the load check reports them, see the "Load check" section of
``benchmarks/README.md``): that successes ran in call order (on trio, calls
made while the executor reconnects go out in the order the scheduler wakes
them) and that every connection error is a ``ConnectionLostError`` (a call a
daemon fails at the end of its SIGTERM grace arrives as a ``RemoteException``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import load_check

MUST_PASS = (
    "every call attempted",
    "successes + explicit errors == total",
    "no wrong value, no stuck call",
    "zero duplicates",
    "nothing ran that was never called",
    "every success ran",
    "plain calls never overlapped",
    "every client's record file read",
    "errors are connection errors",
    "the daemon was restarted 2 times on the same port",
    "one executor per client for the whole run",
    "each client reconnected once per restart it rode through, and only then",
    "instances created at most once per daemon, by the reconnect after a restart",
    "the record files agree with the last daemon's logs",
    "every daemon stopped with SIGTERM exited 0",
    "no daemon before the last logged a traceback",
    "no torn or stray line in the record files",
    "daemon alive after the load",
    "daemon let go of every connection and call",
    "deleted instances leave no instance or worker thread behind",
    "daemon logged no traceback",
    "daemon exits 0 on SIGTERM",
    "logs read back",
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_restart_mode(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    load_check.main(
        [
            "--restart",
            "--backend",
            backend,
            "--clients",
            "4",
            "--calls",
            "300",
            "--items",
            "20",
            "--json",
            str(out),
            # A short grace: the clients still have calls left once it ends.
            "--daemon-arg=--grace=0.3",
        ]
    )
    (result,) = json.loads(out.read_text())["results"]
    checks = {check["name"]: check for check in result["checks"]}
    failed = [checks[name] for name in MUST_PASS if not checks[name]["ok"]]
    assert not failed, failed
    assert result["successes"] + result["errors"] == result["total"] == 1200
    assert result["duplicates"] == 0
    restart = result["restart"]
    assert restart["restarts"] == 2
    assert [lt["ended_by"] for lt in restart["lifetimes"]] == ["SIGKILL", "SIGTERM", None]
    assert len({lt["url"] for lt in restart["lifetimes"]}) == 1  # the same port
    # Every client was still calling at the first restart, and reconnected.
    assert all(count >= 1 for count in restart["reconnects"]), restart["reconnects"]
