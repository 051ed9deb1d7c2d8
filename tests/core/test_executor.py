"""Helpers of the executor interface that need no executor."""

from __future__ import annotations

import json

import pytest

from remote_exec.executor import module_name


def test_module_name_takes_a_module_or_its_name() -> None:
    assert module_name(json) == "json"
    assert module_name("json.decoder") == "json.decoder"


@pytest.mark.parametrize("wrong", [None, 3, b"json", json.loads])
def test_module_name_refuses_anything_else(wrong: object) -> None:
    with pytest.raises(TypeError, match="a module or its name"):
        module_name(wrong)  # type: ignore[arg-type]
