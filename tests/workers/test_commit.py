"""PartWriter's Parquet layout: floats written without a dictionary, everything else with one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.commit import PartWriter, dictionary_columns

DICTIONARY = {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}


def outputs_table(rng: np.random.Generator, rows: int) -> pa.Table:
    """Kept columns (ids, labels) beside model outputs of every float layout the runner writes."""
    emb = rng.standard_normal((rows, 8)).astype(np.float32)
    return pa.table({
        "id": pa.array(rng.integers(0, 5, rows)),
        "label": pa.array(rng.choice(["cat", "dog", "ünïcode"], rows)),
        "score": pa.array(rng.standard_normal(rows)),
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 8),
        "ragged": pa.array([list(rng.standard_normal(int(n))) for n in rng.integers(0, 4, rows)],
                           pa.list_(pa.float32())),
        "tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(
            rng.standard_normal((rows, 2, 3)).astype(np.float16)),
        "topk": pa.array([[int(a), int(b)] for a, b in rng.integers(0, 9, (rows, 2))],
                         pa.list_(pa.int64())),
    })


def encodings(path: Path) -> dict[str, set[str]]:
    meta = pq.read_metadata(path)
    found: dict[str, set[str]] = {}
    for group in range(meta.num_row_groups):
        for i in range(meta.num_columns):
            column = meta.row_group(group).column(i)
            found.setdefault(column.path_in_schema, set()).update(column.encodings)
    return found


def test_float_columns_skip_the_dictionary_and_others_keep_it(tmp_path: Path) -> None:
    rng = np.random.default_rng()
    table = outputs_table(rng, 300)
    writer = PartWriter(str(tmp_path), "part-a.parquet")
    writer.write(table.slice(0, 120))
    writer.write(table.slice(120))
    writer.commit()
    part = tmp_path / "part-a.parquet"

    assert pq.read_table(part).equals(table)
    found = encodings(part)
    floats = ["score", "emb.list.element", "ragged.list.element", "tensor.list.element"]
    for leaf in floats:
        assert not found[leaf] & DICTIONARY, (leaf, found[leaf])
    for leaf in ["id", "label", "topk.list.element"]:
        assert found[leaf] & DICTIONARY, (leaf, found[leaf])
    assert all(pq.read_metadata(part).row_group(0).column(i).compression == "ZSTD"
               for i in range(len(found)))


def test_dictionary_columns_names_nested_leaves() -> None:
    schema = pa.schema([
        ("key", pa.string()),
        ("m", pa.map_(pa.string(), pa.float32())),
        ("s", pa.struct([("x", pa.float64()), ("tag", pa.int32())])),
        ("half", pa.float16()),
    ])
    assert dictionary_columns(schema) == ["key", "m.key_value.key", "s.tag"]


def test_an_all_float_table_has_no_dictionary(tmp_path: Path) -> None:
    table = pa.table({"p": np.random.default_rng().random(50, dtype=np.float32)})
    writer = PartWriter(str(tmp_path), "part-b.parquet")
    writer.write(table)
    writer.commit()
    assert pq.read_table(tmp_path / "part-b.parquet").equals(table)
    assert not encodings(tmp_path / "part-b.parquet")["p"] & DICTIONARY
