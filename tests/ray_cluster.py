"""One local Ray for the whole test session (conformance suite and ``tests/ray``).

Small on purpose: two CPUs, no dashboard, a 128 MiB object store, and a
custom resource ``camera0`` (one unit) for the placement tests. Started on
first use (the ``ray_cluster`` fixture of the conftests that need it), shut
down at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

CAMERA = "camera0"


def start_local_ray() -> None:
    """Start the session's local Ray unless this process already runs one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        resources={CAMERA: 1},
        object_store_memory=128 * 1024 * 1024,
        log_to_driver=False,
        configure_logging=False,
    )


def local_ray() -> Iterator[None]:
    """The body of the ``ray_cluster`` session fixture of the conftests that need it."""
    start_local_ray()
    yield
    import ray

    ray.shutdown()
