"""A node of a multi-node Ray cluster removed mid-job: its shards rerun on the other node."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from jobs.driver import run_job
from tests.faults.conftest import REPO
from tests.faults.helpers import (
    check_exactly_once,
    manifest,
    part_names,
    read_files,
    read_parts,
    spec_for,
)
from tests.faults.hooks import CONTROLLER, NAMESPACE, FaultController, fault_runtime_env

pytestmark = [pytest.mark.faults, pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, Any]]:
    """A head without CPUs (driver and fault controller) and two worker nodes of 2 CPUs."""
    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"head": 1}})
    for _ in range(2):
        nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, runtime_env=fault_runtime_env(REPO), log_to_driver=False)
    nodes.wait_for_nodes()
    # On the head, which stays: the workers on the surviving node still need it.
    controller = FaultController.options(name=CONTROLLER, namespace=NAMESPACE,
                                         resources={"head": 0.01}).remote()
    try:
        yield nodes, controller
    finally:
        ray.shutdown()
        nodes.shutdown()
        if was_running:  # leave a plain local Ray for the session's other tests, as found

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def test_node_removed_mid_job(cluster: tuple[Cluster, Any], two_input_onnx: Path,
                              dataset: Path, tmp_path: Path) -> None:
    nodes, controller = cluster
    out = tmp_path / "out"
    ray.get(controller.arm.remote("block", times=1))
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_job, spec_for(str(two_input_onnx), str(dataset), str(out)),
                          io.StringIO())
        blocked = ray.get(controller.wait_blocked.remote(180), timeout=200)
        victim = next(n for n in nodes.worker_nodes if n.node_id == blocked["node"])
        nodes.remove_node(victim, allow_graceful=False)  # the node and its workers are gone
        report = job.result(timeout=400)

    assert report.exit_code == 0 and not report.failed, report.failed
    assert report.committed == 9
    check_exactly_once(two_input_onnx.read_bytes(), read_files(sorted(map(str, dataset.iterdir()))),
                       read_parts(str(out)))
    record = manifest(str(out))
    assert record["actors_replaced"] >= 1
    entry = next(s for s in record["shards"] if s["part"] == blocked["part"])
    assert entry["status"] == "committed" and entry["actor_deaths"] == 1
    # The rerun shard's worker ran on the surviving node.
    assert entry["worker"] and all(s["status"] == "committed" for s in record["shards"])
    rows = {s["part"]: s["rows"] for s in record["shards"]}
    assert sorted(part_names(str(out))) == sorted(rows)
    for name in rows:
        assert pq.read_metadata(out / name).num_rows == rows[name]
