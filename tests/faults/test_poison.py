"""Poison data: each bad input is processed correctly or named in the manifest with its reason,
while every other shard commits; `max_failed_shards` decides the exit code."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.driver import run_job
from tests.faults.helpers import check_exactly_once, manifest, read_parts, spec_for
from tests.models import two_input_table

pytestmark = [pytest.mark.faults, pytest.mark.ray]


def with_variable_features(table: pa.Table, width: int) -> pa.Table:
    """`features` as list<double> of `width` values per row (a row group of the wrong shape)."""
    values = np.random.default_rng(width).standard_normal((table.num_rows, width))
    column = pa.array(list(values), type=pa.list_(pa.float64()))
    return table.set_column(table.schema.get_field_index("features"), "features", column)


def common(table: pa.Table) -> pa.Table:
    """The columns the check needs, with `features` as list<double> so all files concatenate."""
    features = table.column("features").cast(pa.list_(pa.float64()))
    return pa.table({"uid": table.column("uid"), "name": table.column("name"),
                     "img": table.column("img"), "features": features})


@pytest.fixture
def poisoned(tmp_path: Path) -> dict[str, Any]:
    """Good files and one of each kind of poison; returns the rows that must come out."""
    data = tmp_path / "data"
    data.mkdir()
    expected = []

    good = two_input_table(500, seed=1, start=0)
    pq.write_table(good, data / "data-000.parquet", row_group_size=100)
    expected.append(common(good))

    # NaN and inf in both inputs: they pass through to the outputs, nothing crashes.
    special = two_input_table(500, seed=2, start=1000)
    img = special.column("img").combine_chunks().to_numpy_ndarray().copy()
    img[::7, 0, 0, 0] = np.nan
    img[3::11, 1, 2, 3] = np.inf
    feats = np.stack(special.column("features").to_numpy(zero_copy_only=False)).copy()
    feats[5::13, 4] = -np.inf
    special = special.set_column(2, "img", pa.FixedShapeTensorArray.from_numpy_ndarray(img))
    special = special.set_column(3, "features",
                                 pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), 8))
    pq.write_table(special, data / "data-001.parquet", row_group_size=100)
    expected.append(common(special))

    # A corrupt row group (1 of 5): its shard (row groups 0-1) fails, the others commit.
    corrupt = two_input_table(500, seed=3, start=2000)
    path = data / "data-002.parquet"
    pq.write_table(corrupt, path, row_group_size=100)
    raw = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(1).column(2).data_page_offset
    for i in range(page + 2, page + 18):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    expected.append(common(corrupt.slice(200)))

    # A row group whose values have the wrong shape (7 features per row instead of 8).
    shaped = two_input_table(400, seed=4, start=3000)
    with pq.ParquetWriter(data / "data-003.parquet",
                          with_variable_features(shaped.slice(0, 200), 8).schema) as writer:
        writer.write_table(with_variable_features(shaped.slice(0, 200), 8))
        writer.write_table(with_variable_features(shaped.slice(200, 200), 7))
    expected.append(common(with_variable_features(shaped.slice(0, 200), 8)))

    (data / "data-004.parquet").write_bytes(b"")  # an empty file
    pq.write_table(good.slice(0, 0), data / "data-005.parquet")  # zero rows
    (data / "garbage.parquet").write_bytes(b"PAR1" + np.random.default_rng(6).bytes(500) + b"PAR1")
    # A schema that differs (no `features`), first in listing order: it must not decide the
    # job's schema, it fails alone.
    pq.write_table(two_input_table(50, seed=7, start=9000).drop_columns(["features"]),
                   data / "a-odd.parquet")
    return {"data": data, "expected": pa.concat_tables(expected)}


def test_poison_data(fault_ray: Any, two_input_onnx: Path, poisoned: dict[str, Any],
                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = poisoned["data"]
    spec = spec_for(str(two_input_onnx), str(data), str(out), rows_per_shard=200, max_retries=2)
    report = run_job(spec, io.StringIO())

    reasons = {(f["file"].rsplit("/", 1)[-1], tuple(f.get("row_groups") or ())): f
               for f in report.failed}
    assert set(reasons) == {("a-odd.parquet", ()), ("data-004.parquet", ()),
                            ("garbage.parquet", ()), ("data-002.parquet", (0, 2)),
                            ("data-003.parquet", (1, 2))}
    assert reasons["a-odd.parquet", ()]["reason"] == "schema differs: no column(s) ['features']"
    assert reasons["data-004.parquet", ()]["reason"] == ("not a readable Parquet file (0 bytes, "
                                                         "too small)")
    assert reasons["garbage.parquet", ()]["reason"].startswith("not a readable Parquet file")
    assert {reasons[k]["kind"] for k in [("a-odd.parquet", ()), ("data-004.parquet", ()),
                                         ("garbage.parquet", ())]} == {"bad_file"}
    broken = reasons["data-002.parquet", (0, 2)]
    assert "data-002.parquet' has a corrupt row group 1 (" in broken["reason"]
    assert broken["reason"].endswith("; replace or remove the file")
    shape = reasons["data-003.parquet", (1, 2)]
    assert shape["reason"] == ("column 'features' has 7 values per row (dims [7]), but input "
                               "'meta' wants float32 [N,8]")
    # Bad data fails the same way every time: tried once, not retried.
    assert broken["kind"] == shape["kind"] == "data"
    assert broken["attempts"] == shape["attempts"] == 1
    assert report.exit_code == 1 and not (out / "_SUCCESS").exists()

    result = read_parts(str(out))
    check_exactly_once(two_input_onnx.read_bytes(), poisoned["expected"], result)
    logits = result.sort_by("uid").column("logits").combine_chunks().to_numpy_ndarray()
    uids = result.sort_by("uid").column("uid").to_numpy()
    special = (uids >= 1000) & (uids < 1500)
    assert not np.isfinite(logits[special]).all()  # NaN and inf came through...
    assert np.isfinite(logits[~special]).all()  # ...and only where the inputs had them
    record = manifest(str(out))
    files = {s["url"].rsplit("/", 1)[-1] for s in record["shards"]}
    assert "data-005.parquet" not in files  # zero rows: no shard, no failure
    assert record["rows"] == poisoned["expected"].num_rows

    # Five failures allowed: the rerun skips what committed, fails the same five, exits 0.
    again = run_job(spec_for(str(two_input_onnx), str(data), str(out), rows_per_shard=200,
                             max_failed_shards=5), io.StringIO())
    assert again.exit_code == 0 and again.committed == 0 and len(again.failed) == 5
    assert again.skipped == report.committed
    stricter = run_job(spec_for(str(two_input_onnx), str(data), str(out), rows_per_shard=200,
                                max_failed_shards=4), io.StringIO())
    assert stricter.exit_code == 1
