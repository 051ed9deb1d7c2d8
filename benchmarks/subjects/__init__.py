"""One module per benchmarked library (a *subject*).

A subject module runs inside a fresh child process and exposes:

``run(workload, params) -> float``
    Sync or async. Starts whatever server side the subject needs (on 127.0.0.1,
    port 0), connects to it as a user would, runs one workload (``"W1"`` ..
    ``"W4"``) with the sizes in ``params`` (a ``benchmarks._harness.Params``,
    whose ``options`` hold the registry's per-subject options) and returns the
    measured value in the workload's unit.

Optional attributes:

``WORKLOADS``
    The workloads it supports (default: all); the others are reported as n/a.
    A subject's ``workloads`` option (comma-separated) narrows it per row.
``BACKEND``
    ``"asyncio"`` (default) or ``"trio"``: the event loop an async ``run``
    runs on; ``params.options["backend"]`` overrides it.
``DISTRIBUTIONS``
    Distribution names whose installed versions go into the results.
``check(options) -> None``
    Raises ``benchmarks._harness.Unavailable`` when the subject cannot run here.
``serve(options) -> None``
    The server side, run by ``python -m benchmarks._child serve <module>``; it
    binds port 0 and announces the port with ``_harness.announce``.

An ``ImportError`` while importing the module marks the subject "not available".
"""
