"""Issue 17, point 8: what one row group and one config may cost is bounded before it is paid.

A 1.2 KB Parquet file decoded to 300 MiB in one row-group read (zeros under RLE/dictionary
encoding: the footer's compressed and uncompressed sizes are both tiny). A 529-byte YAML with
nested aliases took 10 s and 350 MB in `_freeze`. A YAML syntax error printed the offending
line, storage credentials included. (Images are bounded in workers/images.py.)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.driver import run_job
from jobs.spec import spec_from_args
from tests.faults.helpers import spec_for
from tests.models import two_input_table
from workers.errors import DataError, SpecError
from workers.reader import read_batches
from workers.rowgroups import RowGroupReader
from workers.storage import file_version
from workers.types import Shard

MiB = 1024 * 1024


def zeros_file(path: Path, rows: int) -> Shard:
    """One row group of `rows` float64 zeros: a few KB on disk, 8 bytes a row decoded."""
    pq.write_table(pa.table({"x": pa.array(np.zeros(rows))}), path, row_group_size=rows,
                   compression="zstd")
    info = {"size": os.path.getsize(path), "mtime": os.stat(path).st_mtime}
    from fsspec.implementations.local import LocalFileSystem

    info = LocalFileSystem().info(str(path))
    return Shard(url=str(path), size=int(info["size"]), version=file_version(info),
                 row_groups=(0, 1), rows=rows)


def test_a_row_group_that_decodes_past_the_limit_is_refused_before_it_is_read(
        tmp_path: Path) -> None:
    shard = zeros_file(tmp_path / "bomb.parquet", rows=2_000_000)  # 16 MB decoded
    assert shard.size < 64 * 1024  # and small on disk: that is the point
    expected = re.escape(
        f"'{shard.url}' row group 0 decodes to at least 15.3 MiB (2,000,000 rows of columns "
        "['x']), more than the limit of 4.0 MiB per row group; rewrite the file with smaller "
        "row groups, or raise --max-row-group-bytes if you trust it")
    with pytest.raises(DataError, match=expected):
        next(read_batches(shard, ["x"], 1024, max_row_group_bytes=4 * MiB))
    with pytest.raises(DataError, match=expected), \
            RowGroupReader(shard, ["x"], lambda t: ({}, t), threads=2,
                           max_row_group_bytes=4 * MiB) as reader:
        next(iter(reader))
    # Under the limit, the same file reads.
    assert sum(t.num_rows for t in read_batches(shard, ["x"], 500_000,
                                                max_row_group_bytes=32 * MiB)) == 2_000_000


def test_only_the_columns_read_count(tmp_path: Path) -> None:
    path = tmp_path / "wide.parquet"
    table = pa.table({"small": pa.array(np.arange(1000)),
                      "big": pa.array(np.zeros((1000, 2048)).tolist(),
                                      pa.list_(pa.float64()))})  # 16 MiB decoded
    pq.write_table(table, path)
    from fsspec.implementations.local import LocalFileSystem

    info = LocalFileSystem().info(str(path))
    shard = Shard(url=str(path), size=int(info["size"]), version=file_version(info),
                  row_groups=(0, 1), rows=1000)
    assert sum(t.num_rows for t in read_batches(shard, ["small"], 256,
                                                max_row_group_bytes=MiB)) == 1000
    with pytest.raises(DataError, match=r"row group 0 decodes to at least 15\.6 MiB"):
        next(read_batches(shard, ["small", "big"], 256, max_row_group_bytes=MiB))


@pytest.mark.ray
def test_the_job_fails_the_shard_naming_the_file_and_the_flag(
        ray_cluster: None, two_input_onnx: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(two_input_table(200, seed=1), data / "a.parquet", row_group_size=100)
    report = run_job(spec_for(str(two_input_onnx), str(data), str(tmp_path / "out"),
                              max_row_group_bytes="8KiB"))
    assert report.exit_code == 1 and report.committed == 0
    reasons = {f["reason"] for f in report.failed}
    assert all("more than the limit of 8.0 KiB per row group" in r and "a.parquet" in r
               and "--max-row-group-bytes" in r for r in reasons), reasons
    assert {f["kind"] for f in report.failed} == {"data"}


def test_max_row_group_bytes_setting() -> None:
    spec = spec_from_args(["--model", "m.onnx", "--input", "in", "--output", "out",
                           "--max-row-group-bytes", "2GiB"])
    assert spec.max_row_group_bytes == 2 * 1024 ** 3
    assert spec_from_args(["--model", "m", "--input", "i", "--output", "o"]
                          ).max_row_group_bytes == 512 * MiB
    with pytest.raises(SpecError, match="max_row_group_bytes must be a size in bytes such as"):
        spec_from_args(["--model", "m", "--input", "i", "--output", "o",
                        "--max-row-group-bytes", "lots"])


# -- the config file ------------------------------------------------------------------------

ALIAS_BOMB = """\
model: m.onnx
input: in
output: out
storage_options:
  a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


def test_a_yaml_alias_bomb_is_refused_naming_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(ALIAS_BOMB)
    assert path.stat().st_size < 600
    with pytest.raises(SpecError, match=re.escape(
            f"config '{path}' expands to more than 100,000 values through YAML aliases (*name); "
            "a job's settings need far fewer: write the values out, or remove the aliases")):
        spec_from_args(["--config", str(path)])


def test_a_yaml_alias_cycle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: m\ninput: i\noutput: o\nstorage_options: &s {loop: *s}\n")
    with pytest.raises(SpecError, match=re.escape(
            f"config '{path}' refers to itself through a YAML alias (storage_options.loop); "
            "settings cannot contain themselves: remove the alias")):
        spec_from_args(["--config", str(path)])


def test_an_oversized_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: m\ninput: i\noutput: o\n# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(SpecError, match=re.escape(
            f"config '{path}' is 1,048,607 bytes; a job config is at most 1,048,576 bytes")):
        spec_from_args(["--config", str(path)])


def test_a_syntax_error_names_the_place_but_prints_no_value(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: m\ninput: i\noutput: o\n"
                    "storage_options: {key: AKIAEXAMPLEKEY, secret: wJalrXUtnFEMI/K7MDENG\n"
                    "keep: [uid]\n")
    with pytest.raises(SpecError) as caught:
        spec_from_args(["--config", str(path)])
    message = str(caught.value)
    assert message.startswith(f"config '{path}' is not valid YAML: ")
    assert "line 5, column 5" in message
    assert "AKIAEXAMPLEKEY" not in message and "wJalrXUtnFEMI" not in message


def test_storage_option_values_stay_out_of_setting_errors(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"model": "m", "input": "i", "output": "o",
                                "storage_options": ["AKIAEXAMPLEKEY"]}))
    with pytest.raises(SpecError) as caught:
        spec_from_args(["--config", str(path)])
    assert "storage_options must be a JSON object, got list" in str(caught.value)
    assert "AKIAEXAMPLEKEY" not in str(caught.value)
