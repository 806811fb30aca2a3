"""Each actor's CPUs and threads from the cluster's nodes (`jobs.resources`)."""

from __future__ import annotations

from typing import Any

from jobs.resources import cpus_per_gpu, worker_resources
from jobs.spec import spec_from_args


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict[str, Any]:
    resources = {"CPU": cpus, "memory": 1e9}
    if gpus:
        resources["GPU"] = gpus
    return {"Alive": alive, "Resources": resources}


def test_a_gpu_actor_gets_its_nodes_cpus_per_gpu() -> None:
    got = worker_resources([node(16, 1)])
    assert (got.cpus, got.readers, got.preprocess_threads, got.gpus, got.default_workers) == (
        16, 16, 16, 1, 1)


def test_the_fewest_cpus_per_gpu_over_gpu_nodes_so_every_actor_fits() -> None:
    # A CPU-only head (CPU 0, as cluster.yaml has it), an 8-GPU node with 96 CPUs and a 2-GPU
    # node with 32: 12 and 16 per GPU, so 12; a dead node does not count.
    nodes = [node(0), node(96, 8), node(32, 2), node(4, 4, alive=False)]
    assert cpus_per_gpu(nodes) == 12
    got = worker_resources(nodes)
    assert (got.cpus, got.readers, got.gpus, got.default_workers) == (12, 12, 10, 10)


def test_fewer_cpus_than_gpus_still_gives_one() -> None:
    assert worker_resources([node(2, 4)]).cpus == 1


def test_cpu_clusters_keep_one_cpu_per_actor() -> None:
    got = worker_resources([node(8), node(4)])
    assert (got.cpus, got.readers, got.preprocess_threads, got.gpus, got.default_workers) == (
        1, 1, 1, 0, 12)
    assert worker_resources([node(8)], cpus_per_worker=4).default_workers == 2


def test_flags_override_each_part() -> None:
    got = worker_resources([node(16, 1)], cpus_per_worker=6, readers=3, preprocess_threads=5)
    assert (got.cpus, got.readers, got.preprocess_threads) == (6, 3, 5)
    got = worker_resources([node(16, 1)], readers=2)
    assert (got.cpus, got.readers, got.preprocess_threads) == (16, 2, 16)


def test_the_spec_leaves_them_to_the_cluster_unless_given() -> None:
    base = ["--model", "m.onnx", "--input", "in/", "--output", "out/"]
    spec = spec_from_args(base)
    assert (spec.cpus_per_worker, spec.readers, spec.preprocess_threads) == (None, None, None)
    spec = spec_from_args([*base, "--cpus-per-worker", "8", "--readers", "6"])
    assert (spec.cpus_per_worker, spec.readers) == (8, 6)


def test_short_shards_get_more_shards_in_flight_on_gpu_actors() -> None:
    """A GPU actor finishes a 4-batch shard before a replacement sent after its commit has read
    its first batch: shards of few batches get up to 4 in flight; long ones, and CPU actors, 2."""
    from jobs.driver import default_shards_in_flight
    from workers.types import Shard

    def shards(rows: int) -> list[Shard]:
        return [Shard(url=f"f{i}", size=1, version="v", row_groups=(0, 1), rows=rows)
                for i in range(5)]

    assert default_shards_in_flight(shards(1024), 256, gpus=True) == 4
    assert default_shards_in_flight(shards(2048), 256, gpus=True) == 2  # 8 batches
    assert default_shards_in_flight(shards(100_000), 256, gpus=True) == 2
    assert default_shards_in_flight(shards(1024), 256, gpus=False) == 2
    assert default_shards_in_flight([], 256, gpus=True) == 2
