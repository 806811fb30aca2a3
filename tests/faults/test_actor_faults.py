"""Workers that die or fail mid-shard: the shard reruns elsewhere, every row exactly once."""

from __future__ import annotations

import io
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray

from jobs.driver import run_job
from tests.faults.helpers import (
    check_exactly_once,
    manifest,
    part_names,
    read_files,
    read_parts,
    spec_for,
)
from tests.faults.hooks import LOAD
from workers.errors import BackendError

pytestmark = [pytest.mark.faults, pytest.mark.ray]


def test_actor_sigkilled_mid_shard(controller: Any, two_input_onnx: Path, dataset: Path,
                                   tmp_path: Path) -> None:
    """SIGKILL a worker while its part is half written: the shard reruns on a new worker."""
    out = tmp_path / "out"
    ray.get(controller.arm.remote("block", times=1))
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_job, spec_for(str(two_input_onnx), str(dataset), str(out)),
                          io.StringIO())
        blocked = ray.get(controller.wait_blocked.remote(120), timeout=150)
        # Mid-shard: its rows so far are in a temporary file, and no part of it is visible.
        assert Path(blocked["tmp"]).stat().st_size > 0
        assert blocked["part"] not in part_names(str(out))
        visible = part_names(str(out))
        os.kill(blocked["pid"], signal.SIGKILL)
        report = job.result(timeout=300)

    assert report.exit_code == 0 and not report.failed
    assert report.committed + report.skipped == report.shards == 9
    check_exactly_once(two_input_onnx.read_bytes(), read_files(sorted(map(str, dataset.iterdir()))),
                       read_parts(str(out)))
    record = manifest(str(out))
    assert record["actors_replaced"] >= 1
    entry = next(s for s in record["shards"] if s["part"] == blocked["part"])
    assert entry["status"] == "committed" and entry["actor_deaths"] == 1
    # Every part seen while the worker was blocked was complete, and so is every part now.
    rows = {s["part"]: s["rows"] for s in record["shards"]}
    for name in set(visible) | set(part_names(str(out))):
        assert pq.read_metadata(out / name).num_rows == rows[name]
    assert sorted(part_names(str(out))) == sorted(rows)
    assert not (out / "_tmp").exists() and (out / "_SUCCESS").exists()


def test_shard_that_keeps_killing_its_worker(controller: Any, two_input_onnx: Path,
                                             dataset: Path, tmp_path: Path) -> None:
    """A shard whose worker dies on it every time (an out-of-memory row group, say) is given up
    after `max_actor_deaths` and reported as such; shards queued behind it are not blamed."""
    out = tmp_path / "out"
    ray.get(controller.arm.remote("die", match="data-001", times=None))
    spec = spec_for(str(two_input_onnx), str(dataset), str(out), rows_per_shard=500,
                    max_actor_deaths=2, shards_in_flight=2)
    report = run_job(spec, io.StringIO())

    assert report.exit_code == 1 and report.committed == 2
    (failure,) = report.failed
    assert failure["file"].endswith("data-001.parquet")
    assert failure["kind"] == "actor_died" and failure["actor_deaths"] == 2
    assert "its worker process died 2 times while processing it" in failure["reason"]
    assert not (out / "_SUCCESS").exists()
    record = manifest(str(out))
    assert [s["status"] for s in record["shards"]] == ["committed", "failed", "committed"]
    assert all(s.get("actor_deaths", 0) == 0 for s in record["shards"] if s["status"] == "committed")
    source = read_files([str(dataset / "data-000.parquet"), str(dataset / "data-002.parquet")])
    check_exactly_once(two_input_onnx.read_bytes(), source, read_parts(str(out)))


def test_transient_failures_are_retried_then_bounded(controller: Any, two_input_onnx: Path,
                                                     dataset: Path, tmp_path: Path) -> None:
    """A shard failing with a transient error is retried; one that keeps failing is given up
    after `max_retries` retries, naming the error, while the other shards commit."""
    out = tmp_path / "out"
    ray.get(controller.arm.remote("raise", match="data-000", times=1))
    ray.get(controller.arm.remote("raise", match="data-002", times=None))
    spec = spec_for(str(two_input_onnx), str(dataset), str(out), rows_per_shard=500,
                    max_retries=2)
    report = run_job(spec, io.StringIO())

    history = ray.get(controller.get_history.remote())
    assert len(report.failed) == 1, history
    (failure,) = report.failed
    assert failure["file"].endswith("data-002.parquet")
    assert failure["kind"] == "storage" and failure["attempts"] == 3
    assert "injected outage; still failing after 5 attempt(s)" in failure["reason"]
    record = manifest(str(out))
    first = next(s for s in record["shards"] if s["url"].endswith("data-000.parquet"))
    assert first["status"] == "committed" and first["errors"] == 1
    assert sum(h["action"] == "raise" and h["url"].endswith("data-002.parquet")
               for h in history) == 3
    source = read_files([str(dataset / "data-000.parquet"), str(dataset / "data-001.parquet")])
    check_exactly_once(two_input_onnx.read_bytes(), source, read_parts(str(out)))


def test_worker_dying_while_loading_is_replaced(controller: Any, two_input_onnx: Path,
                                                dataset: Path, tmp_path: Path) -> None:
    """A worker that dies while it loads the model (its node going away, say) is replaced."""
    out = tmp_path / "out"
    ray.get(controller.arm.remote("die", match=LOAD, times=1))
    report = run_job(spec_for(str(two_input_onnx), str(dataset), str(out)), io.StringIO())
    assert report.exit_code == 0 and report.committed == 9
    assert manifest(str(out))["actors_replaced"] >= 1
    check_exactly_once(two_input_onnx.read_bytes(), read_files(sorted(map(str, dataset.iterdir()))),
                       read_parts(str(out)))


def test_workers_that_keep_dying_while_loading_stop_the_job(controller: Any, two_input_onnx: Path,
                                                            dataset: Path, tmp_path: Path) -> None:
    ray.get(controller.arm.remote("die", match=LOAD, times=None))
    spec = spec_for(str(two_input_onnx), str(dataset), str(tmp_path / "out"), max_actor_deaths=2)
    with pytest.raises(BackendError, match=r"workers kept dying while loading the model \(2 "
                       r"times\): The actor died unexpectedly"):
        run_job(spec, io.StringIO())
    assert not (tmp_path / "out" / "_lock.json").exists()  # the lock was released
