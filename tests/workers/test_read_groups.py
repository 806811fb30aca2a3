"""Row groups with list and tensor columns read a few rows at a time (`workers.reader.read_group`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.convert import tensor_to_binary_column
from workers.reader import LIST_READ_VALUES, nested_read_rows, read_group


def test_tensor_columns_read_in_batches_binary_and_flat_ones_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 128, 128, 3), dtype=np.uint8)  # 49,152 values a row
    table = pa.table({"uid": np.arange(300),
                      "img": pa.FixedShapeTensorArray.from_numpy_ndarray(images),
                      "raw": tensor_to_binary_column(images),
                      "tags": pa.array([[i, i + 1] for i in range(300)])})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=300)
    parquet = pq.ParquetFile(path)
    rows = nested_read_rows(parquet.metadata, 0, ["img", "uid"])
    assert rows == LIST_READ_VALUES // (128 * 128 * 3) < 300
    assert nested_read_rows(parquet.metadata, 0, ["raw", "uid"]) is None
    assert nested_read_rows(parquet.metadata, 0, ["tags"]) is None  # 2 values a row: whole
    for columns in (["img", "uid"], ["uid", "img", "tags"], ["raw"]):
        got = read_group(parquet, 0, columns)
        assert got.column_names == columns
        assert got.equals(parquet.read_row_group(0, columns=columns))
    assert len(read_group(parquet, 0, ["img"]).column("img").chunks) == -(-300 // rows)
