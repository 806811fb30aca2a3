"""bench/: the dataset generator, and a smoke run of bench/e2e.py at tiny sizes (no timings checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.datagen import DataShape, write_dataset

REPO = Path(__file__).resolve().parents[1]


def test_datagen_writes_rows_files_and_row_groups(tmp_path: Path) -> None:
    shape = DataShape(rows=1003, files=3, row_group_rows=128, image=(2, 4, 4), features=5, seed=7)
    urls = write_dataset(str(tmp_path / "data"), shape)
    assert len(urls) == 3
    tables = [pq.read_table(u.removeprefix("file://")) for u in urls]
    assert [t.num_rows for t in tables] == [335, 334, 334]
    assert pq.ParquetFile(urls[0].removeprefix("file://")).metadata.num_row_groups == 3
    uids = np.concatenate([t.column("uid").to_numpy() for t in tables])
    assert (uids == np.arange(1003)).all()
    image = tables[0].column("image").combine_chunks().to_numpy_ndarray()
    assert image.shape == (335, 2, 4, 4) and image.dtype == np.float32
    assert image.std() > 0.5  # random values, not zeros
    features = tables[2].column("features").combine_chunks().to_numpy_ndarray()
    assert features.shape == (334, 5)


def test_datagen_rejects_more_files_than_rows() -> None:
    with pytest.raises(ValueError, match=r"files \(4\) must be <= rows \(3\)"):
        DataShape(rows=3, files=4)


@pytest.mark.subprocess
@pytest.mark.ray
@pytest.mark.s3
def test_e2e_bench_runs_every_mode_on_local_files_and_s3(tmp_path: Path) -> None:
    pytest.importorskip("pandas", reason="Ray Data, the benchmark's baseline, needs pandas: "
                        "pip install 'ray[data]'")
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--models", "small", "--rows-small", "600",
         "--files", "2", "--row-group-rows", "100", "--batch-size", "64", "--workers", "1",
         "--repeats", "1", "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
         "--tag", "smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "(b)/(a) =" in proc.stdout and "(b)/(c) =" in proc.stdout
    [raw] = results.glob("e2e-*-smoke.json")
    runs = json.loads(raw.read_text())["results"]
    assert sorted((r["mode"], r["storage"]) for r in runs) == [
        ("engine", "-"), ("job", "local"), ("job", "s3"), ("raydata", "local"), ("raydata", "s3")]
    assert all(r["rows"] == 600 and r["rows_per_s"] > 0 for r in runs)
    assert all(r["first_output_s"] is not None for r in runs if r["mode"] != "engine")
    assert (results / raw.name.replace(".json", ".txt")).exists()


def test_text_host_bench_measures_every_stage_against_its_baseline(tmp_path: Path) -> None:
    """bench/text_host.py at a tiny size: every row of its table, each group's baseline first
    (no timings checked), on the job's own code with the null engine."""
    from bench.text_host import measure, prepare, table

    job = prepare(tmp_path, 600, None, 1)
    results = measure(job, repeats=1)
    groups = [r["group"] for r in results]
    assert groups == ["shard, null engine"] * 2 + ["read + tokenize", "length batching"] + \
        ["shard, simulated GPU"] * 2 + ["postprocess + output table"] * 2 + \
        ["Parquet write (zstd)"] * 2
    assert all(r["seconds"] > 0 and r["rows"] == 600 for r in results)
    lines = table(results).splitlines()
    assert len(lines) == 2 + len(results)
    first = {}
    for r, line in zip(results, lines[2:], strict=True):
        first.setdefault(r["group"], line.rsplit("|", 2)[1].strip())
    assert set(first.values()) == {"1.00"}
    # The job's real parts ran: the graph variant's engine returns [N, D] only.
    from workers.tensors import describe_onnx

    graph_model = job["graph"][1]
    assert [len(m.shape) for m in describe_onnx(graph_model).outputs] == [2]
    assert pq.read_table(tmp_path / "out").num_rows == 600


def test_pyspy_top_shares_each_threads_samples_by_leaf_and_our_nearest_frame() -> None:
    from bench.pyspy_top import RecordLater, summarize

    raw = "\n".join([
        "thread (11): feed;Thread.run (threading.py:982);submit (/r/workers/slots.py:10);"
        "Condition.wait (threading.py:331) 30",
        "thread (11): feed;Thread.run (threading.py:982);submit (/r/workers/slots.py:12);"
        "run_with_iobinding (onnxruntime/session.py:5) 10",
        "thread (12): MainThread;<module> (x.py:1) 5",
        "garbage line",
    ])
    text = summarize(raw)
    assert text.splitlines()[0] == "feed (11): 40 samples"
    assert "75.0%  Condition.wait <- submit (slots.py)" in text
    assert "25.0%  run_with_iobinding <- submit (slots.py)" in text
    assert "MainThread (12): 5 samples" in text
    assert RecordLater(None, 1.0, Path("/nonexistent")).result() == ""


def test_node_cpu_busy_is_the_busy_share_between_two_times() -> None:
    from bench.measure import NodeCpu

    node = NodeCpu()
    node.samples = [(100.0, 10.0, 100.0), (101.0, 40.0, 200.0), (102.0, 140.0, 300.0)]
    assert node.busy(100.0, 102.0) == 0.65
    assert node.busy(101.0, 102.0) == 1.0
    assert node.busy(105.0, 106.0) is None
