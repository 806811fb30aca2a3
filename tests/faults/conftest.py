"""Fixtures of the fault tests: a Ray cluster whose workers take injected faults, the S3 proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from tests.faults.hooks import CONTROLLER, NAMESPACE, FaultController, fault_runtime_env
from tests.faults.proxy import FaultProxy

REPO = str(Path(__file__).resolve().parents[2])


def restart_ray(**init: Any) -> bool:
    """Shut down the Ray this process may hold (another test module's) and start this one's.

    Returns whether one was running, so the caller can leave a plain Ray behind for the
    session's other tests, as tests/conftest.py's `ray_cluster` made it.
    """
    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    ray.init(address="local", **init)
    return was_running


def leave_ray(was_running: bool) -> None:
    ray.shutdown()
    if was_running:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module")
def fault_ray(s3_endpoint: str) -> Iterator[Any]:
    """A local Ray (2 CPUs) whose workers run the fault hook; yields the controller actor."""
    was_running = restart_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,
                              runtime_env=fault_runtime_env(REPO))
    controller = FaultController.options(name=CONTROLLER, namespace=NAMESPACE).remote()
    yield controller
    leave_ray(was_running)


@pytest.fixture
def controller(fault_ray: Any) -> Iterator[Any]:
    """The controller, with nothing armed before and after the test."""
    ray.get(fault_ray.disarm.remote())
    yield fault_ray
    ray.get(fault_ray.disarm.remote())


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's S3 server."""
    with FaultProxy(s3_endpoint) as p:
        yield p
