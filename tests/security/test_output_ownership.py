"""Issue 17, point 5: the runner deletes only its own files in OUTPUT and mixes no one else's in.

`OUTPUT/_tmp` used to be deleted recursively on every run (a user's `_tmp/important.txt`
vanished), and Parquet files another tool left in OUTPUT (Spark's `part-00000-...`) passed the
conflict check and ended up beside the runner's parts under `_SUCCESS`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.driver import run_job
from jobs.output import OutputDir
from tests.faults.helpers import spec_for
from workers.errors import OutputConflictError

SPARK_PART = "part-00000-3f1c2b7e-8d2a-4d33-9d65-0a1b2c3d4e5f-c000.snappy.parquet"


def test_clear_tmp_removes_only_the_runners_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_tmp" / "notes").mkdir(parents=True)
    (out / "_tmp" / "important.txt").write_text("the user's")
    (out / "_tmp" / "notes" / "more.txt").write_text("the user's too")
    ours = out / "_tmp" / f"part-{'a' * 24}.parquet.{'b' * 32}"
    ours.write_bytes(b"PAR1 half a part")
    json_tmp = out / f"._manifest.json.{'c' * 32}.tmp"
    json_tmp.write_text("{")
    OutputDir(str(out)).clear_tmp()
    assert (out / "_tmp" / "important.txt").read_text() == "the user's"
    assert (out / "_tmp" / "notes" / "more.txt").exists()
    assert not ours.exists() and not json_tmp.exists()


def test_clear_tmp_removes_its_directory_once_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / f"part-{'a' * 24}.parquet.{'b' * 32}").write_bytes(b"PAR1")
    OutputDir(str(out)).clear_tmp()
    assert not (out / "_tmp").exists()


def foreign_parquet(out: Path) -> list[str]:
    """Parquet files other tools write into a directory: Spark's parts, a partition directory."""
    table = pa.table({"uid": pa.array([10_000, 10_001], pa.int64())})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / SPARK_PART)
    (out / "dt=2026-11-25").mkdir()
    pq.write_table(table, out / "dt=2026-11-25" / "data.parquet")
    # Names Parquet readers skip are not mixed in, so they may stay.
    (out / "_spark_metadata").mkdir()
    pq.write_table(table, out / "_spark_metadata" / "x.parquet")
    pq.write_table(table, out / ".hidden.parquet")
    return [SPARK_PART, "dt=2026-11-25/data.parquet"]


def test_check_names_parquet_files_the_runner_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    foreign_parquet(out)
    identity = {"fingerprint": "f" * 64}
    with pytest.raises(OutputConflictError, match=re.escape(
            f"output '{out}' holds 2 Parquet file(s) this runner did not write "
            f"(dt=2026-11-25/data.parquet, {SPARK_PART}); a reader of the output would read them "
            "with the job's parts: choose another --output, or pass --overwrite to remove them")):
        OutputDir(str(out)).check(identity, overwrite=False)


@pytest.mark.ray
def test_job_keeps_the_users_tmp_files(ray_cluster: None, two_input_onnx: Path, dataset: Path,
                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "important.txt").write_text("keep me")
    report = run_job(spec_for(str(two_input_onnx), str(dataset), str(out)))
    assert report.exit_code == 0
    assert (out / "_tmp" / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "_tmp").iterdir()) == ["important.txt"]


@pytest.mark.ray
def test_job_refuses_foreign_parquet_unless_overwrite(ray_cluster: None, two_input_onnx: Path,
                                                      dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    names = foreign_parquet(out)
    with pytest.raises(OutputConflictError, match=r"holds 2 Parquet file\(s\) this runner did not"):
        run_job(spec_for(str(two_input_onnx), str(dataset), str(out)))
    assert not (out / "_SUCCESS").exists()
    report = run_job(spec_for(str(two_input_onnx), str(dataset), str(out), overwrite=True))
    assert report.exit_code == 0
    for name in names:
        assert not (out / name).exists()
    assert (out / "_spark_metadata" / "x.parquet").exists()  # readers skip it; not ours to remove
    # Everything a reader of OUTPUT sees is the job's: 1500 rows, none of Spark's uids.
    table = ds.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 1500 and 10_000 not in table.column("uid").to_pylist()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sorted(manifest["foreign_files_removed"]) == sorted(names)
