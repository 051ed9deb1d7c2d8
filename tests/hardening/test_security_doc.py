"""docs/security.md states the real defaults: its tables are parsed and compared with the code."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from hypercorn.config import Config

from remote_exec.client.process import ProcessExecutor
from remote_exec.client.websocket import WebSocketExecutor
from remote_exec.protocol import Limits
from remote_exec.runtime import auth
from remote_exec.server import cli
from remote_exec.server.dispatch import Dispatcher
from tests.ws_instruments import run_cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
CODE = re.compile(r"^`([^`]+)`$")


def tables() -> dict[str, list[list[str]]]:
    """Every markdown table of the page, by the text of its first header cell."""
    found: dict[str, list[list[str]]] = {}
    rows: list[list[str]] = []
    for line in [*DOC.read_text().splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            header, _, *body = rows
            found[header[0]] = body
            rows = []
    return found


def code(cell: str) -> str:
    match = CODE.match(cell)
    assert match, f"expected `code` in {cell!r}"
    return match.group(1)


def number(cell: str) -> float:
    return float(cell.split()[0])


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)
    return parser


def resolve(dotted: str) -> Any:
    """``package.module.NAME`` (or a class attribute) to its value."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            value = getattr(value, part)
        return value
    raise LookupError(dotted)


def default_of(call: str) -> Any:
    """``Class(param)`` to the default of that constructor parameter."""
    match = re.fullmatch(r"(\w+)\((\w+)\)", call)
    assert match, call
    classes = {
        "WebSocketExecutor": WebSocketExecutor,
        "ProcessExecutor": ProcessExecutor,
        "Dispatcher": Dispatcher,
    }
    return inspect.signature(classes[match.group(1)]).parameters[match.group(2)].default


DAEMON = tables()["Flag"]
FIXED = tables()["Bound"]
CLIENTS = tables()["Argument"]


@pytest.mark.parametrize("row", DAEMON, ids=[row[0] for row in DAEMON])
def test_daemon_limits_are_the_cli_defaults(row: list[str]) -> None:
    flag, default, also = code(row[0]), number(row[1]), code(row[2])
    parser = serve_parser()
    action = parser._option_string_actions[flag]  # argparse's table of options
    assert action.default == default, f"{flag}: the CLI says {action.default}, the page {default}"
    if also.startswith("Limits."):
        assert getattr(Limits(), also.removeprefix("Limits.")) == default
    else:
        assert resolve(also) == default


def test_every_limit_is_documented_and_listed_by_help() -> None:
    documented = {code(row[0]) for row in DAEMON}
    parser = serve_parser()
    limit_flags = {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith(("--max-", "--history-max-"))
        or option.endswith(("-timeout", "-interval"))
        or option in ("--grace", "--invocation-retention")
    }
    assert limit_flags == documented
    fields = {f"Limits.{field.name}" for field in dataclasses.fields(Limits)}
    assert fields <= {code(row[2]) for row in DAEMON}
    help_text = serve_parser().format_help()
    for flag in documented:
        assert flag in help_text


def test_every_limit_is_finite_by_default() -> None:
    for row in DAEMON:
        assert 0 < number(row[1]) < float("inf"), row


@pytest.mark.parametrize("row", FIXED, ids=[row[0] for row in FIXED])
def test_fixed_bounds(row: list[str]) -> None:
    value, where = number(row[1]), code(row[2])
    if where.startswith("hypercorn.config.Config."):
        assert getattr(Config(), where.rsplit(".", 1)[1]) == value
    elif where.startswith("secrets.token_urlsafe("):
        assert where in inspect.getsource(auth.load_or_create_token)
        assert where == f"secrets.token_urlsafe({int(value)})"
    else:
        assert default_of(where) == value


@pytest.mark.parametrize("row", CLIENTS, ids=[row[0] for row in CLIENTS])
def test_client_defaults(row: list[str]) -> None:
    assert default_of(code(row[0])) == number(row[1])


def test_documented_daemon_defaults_work_together() -> None:
    """The defaults pass the CLI's own checks (e.g. idle timeout above the ping interval)."""
    args = serve_parser().parse_args([])
    assert args.idle_timeout > args.ping_interval
    assert cli.limits_from_args(args) == Limits()


@pytest.mark.parametrize(
    "args",
    [
        ["--max-calls", "0"],
        ["--max-message-size", "100"],
        ["--max-buffers", "70000"],
        ["--max-depth", "2"],
        ["--max-connections", "-1"],
        ["--handshake-timeout", "0"],
        ["--idle-timeout", "inf"],
        ["--grace", "-1"],
        ["--ping-interval", "nan"],
        ["--max-instances", "many"],
    ],
)
def test_limits_out_of_range_are_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        serve_parser().parse_args(args)
    assert exited.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_an_idle_timeout_below_the_ping_interval_is_refused() -> None:
    result = run_cli(["--port", "0", "--no-auth", "--idle-timeout", "5", "--ping-interval", "10"])
    assert result.returncode == 2
    assert "--idle-timeout" in result.stderr
    assert result.stdout == ""
