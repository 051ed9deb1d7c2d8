"""Tokens: where the daemon keeps its token, how clients find it, how it is checked.

The daemon requires a bearer token by default, loopback included. It comes from
``--token-file``, else the ``REMOTE_EXEC_TOKEN`` environment variable, else a
per-user token file that is generated on first use with a random value and
mode ``0600`` in a ``0700`` directory:

* ``$REMOTE_EXEC_TOKEN_FILE`` when set, else
* ``$XDG_STATE_HOME/remote-exec/token`` when ``XDG_STATE_HOME`` is set, else
* ``~/.local/state/remote-exec/token``.

A client resolves its token as: the explicit ``token=`` argument, else
``REMOTE_EXEC_TOKEN``, else the default token file when the server is on this
machine (a loopback host), else none. The token travels only as
``Authorization: Bearer <token>`` in the websocket handshake, never in the URL,
and the server compares it in constant time.

A token file that other users can read or write is refused (as ``ssh`` does for
private keys): a token anyone can read protects nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import tempfile
from pathlib import Path

from remote_exec.exceptions import TokenFileError

__all__ = [
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "bearer_token",
    "check_token",
    "client_token",
    "default_token_path",
    "is_loopback_host",
    "load_or_create_token",
    "read_token_file",
]

TOKEN_ENV = "REMOTE_EXEC_TOKEN"
"""Environment variable holding the token (read by the daemon and by clients)."""

TOKEN_FILE_ENV = "REMOTE_EXEC_TOKEN_FILE"
"""Environment variable overriding the path of the default token file."""

# Only POSIX permission bits say who can read a file.
_CHECK_MODE = os.name == "posix"


def default_token_path() -> Path:
    """The per-user token file the daemon generates and same-machine clients read."""
    override = os.environ.get(TOKEN_FILE_ENV)
    if override:
        return Path(override).expanduser()
    state_home = os.environ.get("XDG_STATE_HOME")
    base = Path(state_home) if state_home else Path.home() / ".local" / "state"
    return base / "remote-exec" / "token"


def _check_private(path: Path, st: os.stat_result) -> None:
    if not _CHECK_MODE:
        return
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"token file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise TokenFileError(
            f"token file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):#o}); "
            f"make it private with `chmod 600 {path}`"
        )


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token stored in ``path`` (surrounding whitespace removed).

    Raises:
        TokenFileError: the file is empty, not a regular file, or other users can
            read or write it.
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as file:
        # Check the file we opened, not the name (no race with a swapped file).
        _check_private(path, os.fstat(file.fileno()))
        token = file.read().strip()
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    if any(ch.isspace() for ch in token) or not token.isprintable():
        raise TokenFileError(f"token file {path} must hold one token without spaces")
    return token


def load_or_create_token(path: str | os.PathLike[str] | None = None) -> tuple[str, Path, bool]:
    """Read the token in ``path`` (the default token file if None), creating it if missing.

    A new token is ``secrets.token_urlsafe(32)``, written to a private file
    (mode ``0600``, in a directory made with mode ``0700``). Creation is atomic:
    two daemons starting at once end up with the same token.

    Returns:
        (token, path, created)
    """
    path = Path(path) if path is not None else default_token_path()
    try:
        return read_token_file(path), path, False
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Write a private temporary file, then link it into place: readers never see
    # a partial file, and an existing token (another daemon won the race) wins.
    fd, tmp = tempfile.mkstemp(prefix=".token-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(token + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_token_file(path), path, False
        except OSError:  # no hard links here (some network or FAT file systems)
            if path.exists():
                return read_token_file(path), path, False
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return token, path, True


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def check_token(expected: str, given: str | None) -> bool:
    """Whether ``given`` is ``expected``, in time independent of both (lengths included)."""
    if given is None:
        hmac.compare_digest(_digest(expected), _digest(""))
        return False
    return hmac.compare_digest(_digest(expected), _digest(given))


def bearer_token(authorization: bytes | str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    if authorization is None:
        return None
    if isinstance(authorization, bytes):
        try:
            authorization = authorization.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
            return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, IPv6 with or without brackets) is this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_token(host: str, token: str | None = None) -> str | None:
    """The token a client sends to a server on ``host``.

    The explicit ``token`` wins, then ``REMOTE_EXEC_TOKEN``, then the default
    token file when ``host`` is loopback (the daemon on this machine wrote it),
    else None.

    Raises:
        TokenFileError: the default token file exists but is not private.
    """
    if token is not None:
        return token
    from_env = os.environ.get(TOKEN_ENV)
    if from_env:
        return from_env
    if is_loopback_host(host):
        try:
            return read_token_file(default_token_path())
        except FileNotFoundError:
            return None
    return None
