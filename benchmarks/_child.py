"""Entry point of the processes that ``run.py`` starts; one job per process.

``python -m benchmarks._child probe NAME``
    Import the subject's module and report whether it can run, which workloads
    it supports and the versions of its libraries.
``python -m benchmarks._child run NAME WORKLOAD PARAMS_JSON``
    Measure one workload once, in this fresh process.
``python -m benchmarks._child serve MODULE OPTIONS_JSON``
    Run a subject's server side (started by the subject itself, not by run.py).

``probe`` and ``run`` print exactly one line starting with ``@@BENCH `` and
holding a JSON object; anything else the subject prints is ignored by run.py.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import traceback
from collections.abc import Mapping
from importlib import metadata
from types import ModuleType

from benchmarks._harness import WORKLOADS, Params, Unavailable, describe, emit, run_on
from benchmarks.registry import SUBJECTS


def _import_subject(module: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.subjects.{module}")


def _backend(module: ModuleType, options: Mapping[str, str]) -> str:
    return options.get("backend", getattr(module, "BACKEND", "asyncio"))


def _versions(module: ModuleType) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in getattr(module, "DISTRIBUTIONS", ()):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def probe(name: str) -> None:
    subject = SUBJECTS[name]
    try:
        module = _import_subject(subject.module)
        check = getattr(module, "check", None)
        if check is not None:
            check(subject.options)
    except (ImportError, Unavailable) as exc:
        emit({"available": False, "reason": describe(exc)})
        return
    supported = getattr(module, "WORKLOADS", WORKLOADS)
    if "workloads" in subject.options:
        supported = subject.options["workloads"].split(",")
    workloads = [w for w in WORKLOADS if w in supported]
    emit({"available": True, "workloads": workloads, "versions": _versions(module)})


def run(name: str, workload: str, params_json: str) -> None:
    subject = SUBJECTS[name]
    params = Params.from_json(params_json).with_options(subject.options)
    module = _import_subject(subject.module)
    value = float(run_on(module.run, (workload, params), _backend(module, subject.options)))
    if not value > 0 or value == float("inf"):
        raise RuntimeError(f"measured a meaningless value: {value!r}")
    emit({"value": value})


def serve(module_name: str, options_json: str) -> None:
    options = json.loads(options_json)
    module = _import_subject(module_name)
    run_on(module.serve, (options,), _backend(module, options))


def main(argv: list[str]) -> int:
    command, *args = argv
    try:
        if command == "probe":
            probe(*args)
        elif command == "run":
            run(*args)
        elif command == "serve":
            serve(*args)
        else:
            raise SystemExit(f"unknown command {command!r}")
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if command == "serve":
            raise
        traceback.print_exc()
        emit({"error": describe(exc)})
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave at once: a library's lingering non-daemon thread must not turn a
    # finished measurement into a timeout. Servers were stopped by the subject.
    os._exit(code)
