"""Every benchmarked subject: its module, its kind, and the floor it is compared with.

Kinds group the subjects that do the same job, so a remote-exec row is compared
with the best peer of its own kind:

``thread``
    Runs the call in a worker thread of the calling process (no copy: the
    object and its arguments are the caller's own). Floor: an in-process call.
``process``
    Starts a local child process and talks to it over a byte stream.
    Floor: a bare asyncio TCP echo to a server process.
``network``
    Connects to a separately started server (daemon) over TCP: a websocket
    daemon, a Pyro5 daemon, an RPyC server. Floor: the bare echo over the same
    transport (TCP for Pyro5 and RPyC, hypercorn websocket for the websocket
    daemons, since both pymoa-remote's and remote-exec's are served by hypercorn).
``cluster``
    Places the object on a node of a Ray cluster (here a local one) and calls
    it there: a plain Ray actor, and ``RayExecutor``. No floor (Ray's own
    call path is the reference).
``floor``
    The raw transports themselves; never a "peer".

To add a subject, write ``benchmarks/subjects/<module>.py`` (see the package
docstring) and add one ``Subject`` line below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "FLOOR_HYPERCORN",
    "FLOOR_INPROCESS",
    "FLOOR_TCP",
    "FLOOR_WEBSOCKETS",
    "SUBJECTS",
    "Kind",
    "Subject",
]

Kind = Literal["floor", "thread", "process", "network", "cluster"]


@dataclass(frozen=True, slots=True)
class Subject:
    """One row of the results table."""

    name: str
    module: str  # under benchmarks.subjects
    kind: Kind
    floor: str | None  # name of the floor subject it is compared with
    options: Mapping[str, str] = field(default_factory=dict)
    ours: bool = False  # a remote-exec executor: gets the ratio rows
    smoke: bool = False  # included in --smoke (CI)


FLOOR_INPROCESS = "floor: in-process call"
FLOOR_TCP = "floor: asyncio TCP"
FLOOR_WEBSOCKETS = "floor: websockets"
FLOOR_HYPERCORN = "floor: hypercorn ws"

_SUBJECTS = [
    # floors
    Subject(FLOOR_INPROCESS, "floor_inprocess", "floor", None, smoke=True),
    Subject(FLOOR_TCP, "floor_tcp", "floor", None, smoke=True),
    Subject(FLOOR_WEBSOCKETS, "floor_websockets", "floor", None, smoke=True),
    Subject(FLOOR_HYPERCORN, "floor_hypercorn", "floor", None),
    # peers
    Subject("anyio to_thread", "peer_anyio", "thread", FLOOR_INPROCESS, {"to": "thread"}),
    Subject("pymoa-remote thread", "peer_pymoa", "thread", FLOOR_INPROCESS, {"executor": "thread"}),
    Subject("anyio to_process", "peer_anyio", "process", FLOOR_TCP, {"to": "process"}),
    Subject(
        "pymoa-remote process", "peer_pymoa", "process", FLOOR_TCP, {"executor": "multiprocess"}
    ),
    Subject("Pyro5 serpent", "peer_pyro5", "network", FLOOR_TCP, {"serializer": "serpent"}),
    Subject("Pyro5 msgpack", "peer_pyro5", "network", FLOOR_TCP, {"serializer": "msgpack"}),
    Subject("RPyC service", "peer_rpyc", "network", FLOOR_TCP),
    Subject(
        "pymoa-remote websocket",
        "peer_pymoa",
        "network",
        FLOOR_HYPERCORN,
        {"executor": "websocket"},
    ),
    # remote-exec itself; reported "not available" until its executors exist
    Subject(
        "remote-exec thread",
        "remote_exec_subject",
        "thread",
        FLOOR_INPROCESS,
        {"executor": "thread", "backend": "asyncio"},
        ours=True,
        smoke=True,
    ),
    Subject(
        "remote-exec process",
        "remote_exec_subject",
        "process",
        FLOOR_TCP,
        {"executor": "process", "backend": "asyncio"},
        ours=True,
        smoke=True,
    ),
    Subject(
        "remote-exec process, blocking=False",
        "remote_exec_subject",
        "process",
        FLOOR_TCP,
        {
            "executor": "process",
            "backend": "asyncio",
            "method": "echo_nonblocking",
            "workloads": "W1,W2,W3",
        },
        ours=True,
    ),
    Subject(
        "remote-exec websocket msgpack asyncio, blocking=False",
        "remote_exec_subject",
        "network",
        FLOOR_HYPERCORN,
        {
            "executor": "websocket",
            "codec": "msgpack",
            "backend": "asyncio",
            "method": "echo_nonblocking",
            "workloads": "W1,W2,W3",
        },
        ours=True,
    ),
    *(
        Subject(
            f"remote-exec websocket {codec} {backend}",
            "remote_exec_subject",
            "network",
            FLOOR_HYPERCORN,
            {"executor": "websocket", "codec": codec, "backend": backend},
            ours=True,
            smoke=True,
        )
        for codec in ("msgpack", "json")
        for backend in ("asyncio", "trio")
    ),
    # Ray (the extra remote-exec[ray]): a plain actor, and RayExecutor
    Subject("Ray actor", "ray_subject", "cluster", None, {"via": "plain"}),
    Subject("remote-exec ray", "ray_subject", "cluster", None, {"via": "remote-exec"}, ours=True),
]

SUBJECTS: dict[str, Subject] = {subject.name: subject for subject in _SUBJECTS}
