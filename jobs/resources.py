"""What each actor gets from the cluster: its CPUs (Ray's reservation) and the threads they run.

A GPU actor's host side (Parquet decoding, image decoding, tokenizing) must keep its GPU fed, and
it can use every CPU its node offers per GPU: by default each GPU actor reserves the CPUs of its
node divided by the node's GPUs (the fewest over the GPU nodes, so every GPU's actor fits), and
runs that many reading and preprocessing threads. On a CPU-only cluster an actor takes one CPU
(one actor per CPU). Flags override each part: `--cpus-per-worker`, `--readers`,
`--preprocess-threads`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerResources:
    """Per actor: CPUs reserved in Ray, reading threads, preprocessing threads; GPUs or not."""

    cpus: int
    readers: int
    preprocess_threads: int
    gpus: int
    #: Actors when --workers is not given: one per GPU, else one per `cpus` CPUs.
    default_workers: int

    def describe(self) -> str:
        return (f"{self.cpus} CPU(s) per worker, {self.readers} reader(s), "
                f"{self.preprocess_threads} preprocessing thread(s)")


def cpus_per_gpu(nodes: Sequence[Mapping[str, Any]]) -> int | None:
    """The fewest CPUs per GPU over the alive nodes that have GPUs (None: no GPU node).

    `nodes` is `ray.nodes()`: dicts with `Alive` and `Resources` ({"CPU": 16.0, "GPU": 1.0}).
    """
    shares = [int(float(n["Resources"].get("CPU", 0)) // float(n["Resources"]["GPU"]))
              for n in nodes
              if n.get("Alive", True) and float(n.get("Resources", {}).get("GPU", 0)) >= 1]
    return max(1, min(shares)) if shares else None


def worker_resources(nodes: Sequence[Mapping[str, Any]], cpus_per_worker: int | None = None,
                     readers: int | None = None, preprocess_threads: int | None = None
                     ) -> WorkerResources:
    """Each actor's resources on a cluster of `nodes` (`ray.nodes()`); given values win."""
    total = {"CPU": 0.0, "GPU": 0.0}
    for node in nodes:
        if node.get("Alive", True):
            for key in total:
                total[key] += float(node.get("Resources", {}).get(key, 0))
    gpus = int(total["GPU"])
    share = cpus_per_gpu(nodes) if gpus else None
    cpus = cpus_per_worker or share or 1
    return WorkerResources(
        cpus=cpus,
        # The CPU path reads on one thread; readers only matter on GPU actors.
        readers=readers or (cpus if gpus else 1),
        preprocess_threads=preprocess_threads or cpus,
        gpus=gpus,
        default_workers=gpus if gpus else max(1, int(total["CPU"]) // cpus))
