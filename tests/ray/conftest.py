"""The Ray tests run on the session's local Ray (``tests/ray_cluster``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..ray_cluster import local_ray


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """The session's local Ray (started on first use)."""
    yield from local_ray()
