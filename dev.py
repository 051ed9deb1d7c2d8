#!/usr/bin/env python3
"""The project's two entry points, needing only Python and pip.

    python3 dev.py demo    # start a daemon on loopback and run the example client
    python3 dev.py test    # ruff, mypy and the whole test suite (both backends)
    python3 dev.py mypy    # strict mypy alone, over every package file and the tests

Each creates (or reuses) the project's virtual environment in ``.venv`` and
installs what it needs there; it reinstalls only when ``pyproject.toml`` changed.
Extra arguments after ``test`` go to pytest (``python3 dev.py test -k thread``).

The status page's browser tests drive the system's Chromium and chromedriver
(``apt-get install chromium chromium-driver``). Under CI (``CI`` set) ``test``
installs them from the system's packages when they are missing; elsewhere
those tests are skipped, with one line saying so, if they are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".remote-exec-installed"


def log(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def run(*args: str | Path, check: bool = True) -> int:
    log(" ".join(str(a) for a in args))
    return subprocess.run([str(a) for a in args], cwd=ROOT, check=check).returncode


def ensure_venv() -> None:
    """Create .venv and install the project with its test and ray extras, once per pyproject."""
    if sys.version_info < (3, 11):  # noqa: UP036 - run by whatever python3 is there
        sys.exit(f"remote-exec needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        log(f"creating the virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[test,ray]")
    STAMP.write_text(wanted)


def demo(args: list[str]) -> int:
    ensure_venv()
    return run(PYTHON, "-m", "examples.demo", *args, check=False)


def ensure_browser() -> None:
    """Under CI, install Chromium and its driver from the system's packages if missing
    (the status page's browser tests need them, and must run there)."""
    if not os.environ.get("CI") or (shutil.which("chromium") and shutil.which("chromedriver")):
        return
    if not shutil.which("apt-get") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        log("CI without chromium and chromedriver, and no apt-get as root to install them")
        return
    os.environ.setdefault("DEBIAN_FRONTEND", "noninteractive")
    run("apt-get", "update", "-qq", check=False)
    if run("apt-get", "install", "-y", "-qq", "chromium", "chromium-driver", check=False):
        log("installing chromium and chromium-driver failed: the browser tests will fail")


def test(args: list[str]) -> int:
    ensure_venv()
    ensure_browser()
    steps = [
        (PYTHON, "-m", "ruff", "check", "."),
        (PYTHON, "-m", "ruff", "format", "--check", "."),
        (PYTHON, ROOT / "dev.py", "mypy"),
        (PYTHON, "-m", "pytest", *args),
        (PYTHON, "benchmarks/run.py", "--smoke", "--python", PYTHON),
    ]
    for step in steps:
        code = run(*step, check=False)
        if code != 0:
            log(f"FAILED ({code}): {' '.join(str(s) for s in step)}")
            return code
    log("all checks passed")
    return 0


# The folders installed under another name (pyproject's ``package-dir``).
INSTALLED_AS = {
    "client": "remote_exec.client",
    "runtime": "remote_exec.runtime",
    "server": "remote_exec.server",
}


def mypy(args: list[str]) -> int:
    """Strict mypy over every file at its one path, under its installed module name.

    mypy cannot follow the editable install's import hook that maps
    ``client/`` to ``remote_exec.client``, so the files are handed to it
    with the module names they are imported by.
    """
    if Path(sys.prefix).resolve() != VENV.resolve():
        ensure_venv()
        return run(PYTHON, ROOT / "dev.py", "mypy", *args, check=False)
    from mypy import build
    from mypy.errors import CompileError
    from mypy.main import process_options

    sources, options = process_options(args)
    for source in sources:
        head, _, rest = (source.module or "").partition(".")
        if head in INSTALLED_AS:
            source.module = INSTALLED_AS[head] + ("." + rest if rest else "")
    try:
        result = build.build(sources, options)
    except CompileError as exc:
        print("\n".join(exc.messages))
        return 2
    for line in result.errors:
        print(line)
    files = len(sources)
    if result.errors:
        print(f"mypy: {len(result.errors)} lines of errors in {files} source files")
        return 1
    print(f"mypy: no issues found in {files} source files")
    return 0


def main() -> int:
    commands = {"demo": demo, "test": test, "mypy": mypy}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        return 2
    return commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
