"""bench/gpu_scaling.py: GPU counts, line timestamps, and a CPU smoke run of the whole script."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.gpu_scaling import StampedLines, gpu_counts, make_input

REPO = Path(__file__).resolve().parents[1]


def test_gpu_counts_follow_the_host() -> None:
    assert gpu_counts([1, 2, 4, 8], 8) == [1, 2, 4, 8]
    assert gpu_counts([1, 2, 4, 8], 2) == [1, 2]
    assert gpu_counts([1, 2, 4, 8], 6) == [1, 2, 4, 6]
    assert gpu_counts([1, 2, 4, 8], 16) == [1, 2, 4, 8]
    assert gpu_counts([4, 1], 1) == [1]
    assert gpu_counts([1, 2], 0) == []


def test_stamped_lines_keep_whole_lines_in_order() -> None:
    echo = io.StringIO()
    stream = StampedLines(echo)
    stream.write("job: 4 file(s)\nwork")
    stream.write("ers: 2 x onnxruntime on cuda\ndone: 256 rows\n")
    assert [line for _, line in stream.lines] == ["job: 4 file(s)",
                                                  "workers: 2 x onnxruntime on cuda",
                                                  "done: 256 rows"]
    loaded, done = stream.first("workers:"), stream.first("done:")
    assert loaded is not None and done is not None and loaded <= done
    assert stream.first("failed:") is None
    assert echo.getvalue() == "job: 4 file(s)\nworkers: 2 x onnxruntime on cuda\ndone: 256 rows\n"


def test_input_is_one_file_and_its_links(tmp_path: Path) -> None:
    paths = make_input(tmp_path / "in", 3, 40, 16, "binary", (3, 8, 8))
    assert [p.name for p in paths] == ["images-0000.parquet", "images-0001.parquet",
                                       "images-0002.parquet"]
    tables = [pq.read_table(p) for p in paths]
    assert all(t.equals(tables[0]) for t in tables)
    assert tables[0].num_rows == 40 and tables[0].schema.field("img").type.byte_width == 768
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 3


@pytest.mark.ray
@pytest.mark.subprocess
def test_cpu_smoke_run_scales_a_job_over_one_and_two_actors(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_scaling", "--cpu", "--cpus", "2", "--out", str(out),
         "--work", str(tmp_path / "work"), "--tag", "smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "gpu_scaling_smoke.json").read_text())
    assert results["counts"] == [1, 2]
    assert [r["gpus"] for r in results["runs"]] == [1, 2]
    for run in results["runs"]:
        assert run["exit_code"] == 0 and run["rows"] == results["rows"] == 256
        assert run["rows_per_s"] > 0 and run["rows_per_s_loaded"] > 0
        assert len(run["workers"]) == run["gpus"]
        assert run["read_alone"]["rows"] == run["gpus"] * 64
    assert results["engine"]["rows_per_s"] > 0
    table = (out / "gpu_scaling_smoke.md").read_text()
    assert "| GPUs | job rows/s (after load) | efficiency |" in table
    assert table.splitlines()[-2].startswith("| 1 | ") and "| 1.000 |" in table.splitlines()[-2]
    assert not (tmp_path / "work").exists()
