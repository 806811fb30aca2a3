"""cluster.yaml stays a launcher config that gives GPU actors what the job needs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_has_gpu_workers_that_install_the_runner() -> None:
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [name for name, node in nodes.items() if node["resources"].get("GPU")]
    assert len(gpu_types) >= 2  # a heterogeneous cluster: one plan per compute capability
    assert any(".[s3,tensorrt]" in cmd for cmd in config["setup_commands"])
