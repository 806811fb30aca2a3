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

from jobs.driver import prepare, run_job
from jobs.pool import PoolConfig, ShardFailure, ShardPool
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
from workers.backends import BackendConfig
from workers.types import WorkerConfig

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

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


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


def test_no_node_left_for_workers(cluster: tuple[Cluster, Any], two_input_onnx: Path,
                                  dataset: Path, tmp_path: Path) -> None:
    """The last worker node goes: no replacement worker can be scheduled, so after the pool's
    start timeout the remaining shards fail as `no_workers` instead of the job waiting forever.
    (Runs last in this module: it leaves the cluster with no worker node.)"""
    nodes, controller = cluster
    spec = spec_for(str(two_input_onnx), str(dataset), str(tmp_path / "out"))
    job = prepare(spec)
    worker_config = WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(threads=1),
                                 output_url=spec.output, bindings=job.bindings, keep=spec.keep,
                                 batch_size=spec.batch_size)
    pool = ShardPool(PoolConfig(workers=1, num_gpus=0, num_cpus=1, shards_in_flight=1,
                                max_retries=0, start_timeout=3.0),
                     worker_config, ray.put(job.model_bytes))
    pool.start(1)
    failures: list[ShardFailure] = []
    ray.get(controller.arm.remote("block", times=1))
    with ThreadPoolExecutor(1) as threads:
        run = threads.submit(pool.run, list(job.shards),
                             lambda result, failure: failures.append(failure) if failure else None)
        blocked = ray.get(controller.wait_blocked.remote(180), timeout=200)
        for node in list(nodes.worker_nodes):
            nodes.remove_node(node, allow_graceful=False)
        outcome = run.result(timeout=300)
    pool.shutdown()
    assert not outcome.results and len(outcome.failures) == len(job.shards) == 9
    assert {f.kind for f in outcome.failures.values()} == {"no_workers"}
    assert outcome.failures[next(s.id for s in job.shards
                                 if s.part_name == blocked["part"])].actor_deaths == 1
    assert next(iter(outcome.failures.values())).reason.startswith(
        "no worker could be started for 3s (each needs 1 CPU, 0 GPU; the cluster lost the nodes "
        "that had them?)")
