"""The layout's promises: each file at one path, and no import cycle."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folders and the package each installs as (pyproject's package-dir).
PACKAGES = {
    "remote_exec": "remote_exec",
    "client": "remote_exec.client",
    "runtime": "remote_exec.runtime",
    "server": "remote_exec.server",
}


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports at its top level, TYPE_CHECKING blocks
    included (imports inside functions run late, and cannot make a cycle at import)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    nodes: list[ast.stmt] = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If):
            nodes.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            nodes.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                nodes.extend(handler.body)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known and name != module}


def test_no_file_is_a_symlink() -> None:
    listing = subprocess.run(
        ["git", "ls-files", "--stage"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    links = [line.split("\t")[1] for line in listing.splitlines() if line.startswith("120000")]
    assert links == []
    assert not any(path.is_symlink() for path in ROOT.glob("*/") if path.name in PACKAGES)


def test_package_modules_import_no_cycle() -> None:
    modules = module_files()
    known = set(modules)
    graph = {name: imports_of(name, path, known) for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import two\n")
    two.write_text("from .one import x\n")
    known = {"pkg.one", "pkg.two"}
    assert imports_of("pkg.one", one, known) == {"pkg.two"}
    assert imports_of("pkg.two", two, known) == {"pkg.one"}
