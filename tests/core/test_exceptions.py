"""The error tree, and how remote errors arrive (``except ValueError`` across the wire)."""

from __future__ import annotations

import builtins
import re

import pytest
from hypothesis import given, settings, strategies as st

import remote_exec.exceptions as exceptions_module
from remote_exec.exceptions import (
    CallCancelledError,
    CodecError,
    ConnectionLostError,
    ExecutorStateError,
    FrameError,
    NotAllowedError,
    ProtocolError,
    RegistryError,
    RemoteException,
    RemoteExecConnectionError,
    RemoteExecError,
    TokenFileError,
    TokenRefusedError,
    TooManyCallsError,
    UnknownInstanceError,
    exception_type_name,
    remote_exception,
)

TRACEBACK = (
    'Traceback (most recent call last):\n  File "dev.py", line 3, in read\nValueError: bad\n'
)

BUILTINS = [
    ValueError,
    KeyError,
    IndexError,
    LookupError,
    TypeError,
    TimeoutError,
    OSError,
    FileNotFoundError,
    PermissionError,
    ConnectionResetError,
    ZeroDivisionError,
    ArithmeticError,
    RuntimeError,
    NotImplementedError,
    RecursionError,
    AttributeError,
    AssertionError,
    UnicodeDecodeError,
    Exception,
]


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("prefix", ["", "builtins."])
def test_builtin_remote_types_are_both(builtin: type[Exception], prefix: str) -> None:
    remote_type = prefix + builtin.__name__
    exc = remote_exception(remote_type, "it broke", TRACEBACK)
    assert isinstance(exc, RemoteException)
    assert isinstance(exc, RemoteExecError)
    assert isinstance(exc, builtin)
    assert exc.remote_type == remote_type
    assert exc.remote_traceback == TRACEBACK
    assert exc.args == ("it broke",)
    notes = getattr(exc, "__notes__", [])
    assert len(notes) == 1
    assert remote_type in notes[0]
    assert TRACEBACK.rstrip() in notes[0]
    with pytest.raises(builtin):
        raise exc
    # one class per builtin, reused
    assert type(remote_exception(remote_type, "again", "")) is type(exc)


def test_except_clause_works_across_the_wire() -> None:
    def call_remote() -> None:
        raise remote_exception("KeyError", "'missing'", TRACEBACK)

    with pytest.raises(KeyError) as info:
        call_remote()
    assert isinstance(info.value, RemoteException)
    assert info.value.remote_type == "KeyError"

    with pytest.raises(OSError, match="disk full") as os_info:
        raise remote_exception("OSError", "disk full", "")
    assert isinstance(os_info.value, RemoteException)

    caught: list[TimeoutError] = []
    try:
        raise remote_exception("TimeoutError", "too slow", "")
    except TimeoutError as exc:  # the plain except clause a caller writes
        caught.append(exc)
    assert [str(exc) for exc in caught] == ["too slow"]


@pytest.mark.parametrize(
    "remote_type",
    [
        "mymodule.DeviceError",
        "mymodule.ValueError",  # a module's own ValueError is not the builtin
        "__main__.Jammed",
        "NoSuchBuiltinError",
        "print",  # a builtin, but not an exception
        "StopIteration",  # would confuse generators
        "StopAsyncIteration",
        "KeyboardInterrupt",  # not an Exception
        "SystemExit",
        "GeneratorExit",
        "BaseException",
        "remote_exec.NoSuchError",
        "remote_exec.RemoteExecError",  # not one of the errors that travel as themselves
        "",
    ],
)
def test_other_remote_types_are_plain_remote_exceptions(remote_type: str) -> None:
    exc = remote_exception(remote_type, "message", TRACEBACK)
    assert type(exc) is RemoteException
    assert exc.remote_type == remote_type
    assert exc.remote_traceback == TRACEBACK
    assert str(exc) == "message"


@pytest.mark.parametrize("name", ["ExceptionGroup", "MemoryError", "BaseExceptionGroup"])
def test_builtins_that_cannot_be_combined_still_arrive(name: str) -> None:
    exc = remote_exception(name, "message", TRACEBACK)
    assert isinstance(exc, RemoteException)
    assert exc.remote_type == name
    assert str(exc) == "message"


def test_every_builtin_exception_name_arrives() -> None:
    names = [
        name
        for name, value in vars(builtins).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert len(names) > 50
    for name in names:
        exc = remote_exception(name, "m", "tb")
        assert isinstance(exc, RemoteException), name
        str(exc)
        repr(exc)


@settings(max_examples=200, deadline=None)
@given(remote_type=st.text(max_size=30), message=st.text(max_size=30), tb=st.text(max_size=30))
def test_any_remote_type_gives_a_remote_exception(remote_type: str, message: str, tb: str) -> None:
    exc = remote_exception(remote_type, message, tb)
    assert isinstance(exc, RemoteException)
    assert (exc.remote_type, exc.remote_traceback) == (remote_type, tb)


def test_no_note_without_a_traceback() -> None:
    exc = remote_exception("ValueError", "bad", "")
    assert not getattr(exc, "__notes__", [])


@pytest.mark.parametrize(
    ("remote_type", "expected"),
    [
        ("remote_exec.UnknownInstanceError", (UnknownInstanceError, KeyError, RegistryError)),
        ("remote_exec.NotAllowedError", (NotAllowedError, PermissionError)),
        ("remote_exec.TooManyCallsError", (TooManyCallsError,)),
        ("remote_exec.CodecError", (CodecError, ProtocolError)),
        ("remote_exec.ProtocolError", (ProtocolError,)),
        ("remote_exec.ExecutorStateError", (ExecutorStateError, RuntimeError)),
        ("remote_exec.CallCancelledError", (CallCancelledError,)),
    ],
)
def test_own_errors_arrive_as_themselves(
    remote_type: str, expected: tuple[type[BaseException], ...]
) -> None:
    exc = remote_exception(remote_type, "no instance named 'cam' is held", "")
    assert isinstance(exc, RemoteException)
    for cls in expected:
        assert isinstance(exc, cls)


def test_unknown_instance_error_message_is_not_quoted() -> None:
    assert str(UnknownInstanceError("no instance named 'cam'")) == "no instance named 'cam'"
    assert str(UnknownInstanceError()) == ""


def test_remote_exception_constructor() -> None:
    exc = RemoteException("msg", "mod.Type", "tb text")
    assert (str(exc), exc.remote_type, exc.remote_traceback) == ("msg", "mod.Type", "tb text")
    assert RemoteException().remote_type == ""


class LocalError(Exception):
    class Inner(Exception):
        pass


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (ValueError("x"), "ValueError"),
        (KeyError("x"), "KeyError"),
        (TooManyCallsError("x"), "remote_exec.TooManyCallsError"),
        (UnknownInstanceError("x"), "remote_exec.UnknownInstanceError"),
        (LocalError("x"), f"{__name__}.LocalError"),
        (LocalError.Inner("x"), f"{__name__}.LocalError.Inner"),
        (remote_exception("mod.Error", "x", ""), "mod.Error"),  # relayed unchanged
        (remote_exception("ValueError", "x", ""), "ValueError"),
    ],
)
def test_exception_type_name(exc: BaseException, name: str) -> None:
    assert exception_type_name(exc) == name


def test_type_names_round_trip() -> None:
    for exc in (ValueError("v"), UnknownInstanceError("u"), NotAllowedError("n")):
        arrived = remote_exception(exception_type_name(exc), str(exc), "")
        assert isinstance(arrived, type(exc))


# -- the tree drawn in the module docstring -------------------------------------------------


def docstring_tree() -> list[tuple[str, str | None, list[str]]]:
    """(class, parent, extra builtin bases) for each line of the drawn tree."""
    doc = exceptions_module.__doc__
    assert doc
    lines = doc.split("::", 1)[1].strip("\n").split("\n\n", 1)[0].splitlines()
    stack: list[tuple[int, str]] = []
    tree = []
    for line in lines:
        match = re.match(r"^([\s│├└─]*)(\w+)(?: \(also (\w+)\))?", line)
        assert match, line
        indent, name, also = match.groups()
        level = len(indent)
        while stack and stack[-1][0] >= level:
            stack.pop()
        parent = stack[-1][1] if stack else None
        tree.append((name, parent, [also] if also else []))
        stack.append((level, name))
    return tree


def test_docstring_tree_is_the_class_tree() -> None:
    tree = docstring_tree()
    names = [name for name, _, _ in tree]
    assert names[0] == "RemoteExecError"
    assert len(names) == len(set(names))
    for name, parent, also in tree:
        cls = getattr(exceptions_module, name)
        assert issubclass(cls, Exception), name
        if parent is not None:
            assert cls.__bases__[0] is getattr(exceptions_module, parent), name
        for builtin in also:
            assert issubclass(cls, getattr(builtins, builtin)), (name, builtin)
    # every exception class the module defines is exported and drawn
    defined = {
        name
        for name, value in vars(exceptions_module).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == exceptions_module.__name__
    }
    assert set(exceptions_module.__all__) == defined == set(names)


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (ExecutorStateError, (RemoteExecError, RuntimeError)),
        (ConnectionLostError, (RemoteExecError, ConnectionError, OSError)),
        (FrameError, (ProtocolError, RemoteExecError)),
        (CodecError, (ProtocolError, RemoteExecError)),
        (UnknownInstanceError, (RegistryError, KeyError, LookupError)),
        (NotAllowedError, (RegistryError, PermissionError, OSError)),
        (TooManyCallsError, (RemoteExecError,)),
        (RemoteException, (RemoteExecError,)),
        (TokenFileError, (RemoteExecError, PermissionError)),
        (TokenRefusedError, (RemoteExecConnectionError, ConnectionError, PermissionError)),
        (CallCancelledError, (RemoteExecError,)),
    ],
)
def test_explicit_bases(cls: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)
    assert not issubclass(RemoteExecError, (ValueError, KeyError, RuntimeError))


def test_combined_classes_are_named_after_the_builtin() -> None:
    cls = type(remote_exception("ValueError", "x", ""))
    assert cls.__module__ == "remote_exec.exceptions"
    assert cls.__name__ == "RemoteValueError"
    assert cls.__mro__[1] is RemoteException
