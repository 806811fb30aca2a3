from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.convert import (
    check_feed,
    column_to_tensor,
    output_type,
    tensor_to_arrow,
    tensor_to_binary_column,
)
from workers.errors import DataError, SpecError
from workers.tensors import TensorMeta

rng = np.random.default_rng(7)
IMAGE = TensorMeta("x", np.dtype(np.float32), (None, 3, 4, 4))


def test_fixed_shape_tensor_column() -> None:
    data = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(data)
    check_feed("img", column.type, IMAGE)
    np.testing.assert_array_equal(column_to_tensor("img", column, IMAGE), data)


def test_flat_fixed_size_list_reshaped_and_cast() -> None:
    data = rng.standard_normal((5, 48))
    column = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), 48)
    check_feed("flat", column.type, IMAGE)
    got = column_to_tensor("flat", column, IMAGE)
    assert got.dtype == np.float32 and got.shape == (5, 3, 4, 4)
    np.testing.assert_allclose(got.reshape(5, 48), data.astype(np.float32))


def test_nested_variable_lists() -> None:
    meta = TensorMeta("m", np.dtype(np.float32), (None, 2, 3))
    rows = [rng.standard_normal((2, 3)).tolist() for _ in range(4)]
    column = pa.array(rows, type=pa.list_(pa.list_(pa.float64())))
    check_feed("nested", column.type, meta)
    np.testing.assert_allclose(column_to_tensor("nested", column, meta), np.array(rows), rtol=1e-6)


def test_chunked_column_and_slices() -> None:
    data = rng.standard_normal((10, 48)).astype(np.float32)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), 48)
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 7)])
    np.testing.assert_array_equal(column_to_tensor("c", chunked, IMAGE).reshape(10, 48), data)
    np.testing.assert_array_equal(column_to_tensor("c", arr.slice(4, 2), IMAGE).reshape(2, 48),
                                  data[4:6])


def test_plain_numeric_column_for_one_element_input() -> None:
    meta = TensorMeta("s", np.dtype(np.float32), (None, 1))
    column = pa.array(np.arange(5, dtype=np.int32))
    check_feed("n", column.type, meta)
    np.testing.assert_array_equal(column_to_tensor("n", column, meta), np.arange(5).reshape(5, 1))


def test_dynamic_dim_filled_from_data() -> None:
    meta = TensorMeta("tokens", np.dtype(np.int64), (None, None))
    column = pa.array([[1, 2, 3], [4, 5, 6]], type=pa.list_(pa.int32()))
    got = column_to_tensor("t", column, meta)
    assert got.dtype == np.int64 and got.shape == (2, 3)


def test_wrong_element_count_is_a_spec_error() -> None:
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(40)), 20)
    with pytest.raises(SpecError, match=r"column 'flat' is fixed_size_list<item: double>\[20\] "
                       r"\(20 values per row\), but input 'x' of the model wants float32 \[N,3,4,4\]"):
        check_feed("flat", column.type, IMAGE)


def test_string_column_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"column 'name' is string, but input 'x'.*preprocessor"):
        check_feed("name", pa.string(), IMAGE)


def test_float_column_cannot_feed_int_input() -> None:
    meta = TensorMeta("ids", np.dtype(np.int64), (None, 4))
    with pytest.raises(SpecError, match="cast the column to int64"):
        check_feed("f", pa.list_(pa.float32(), 4), meta)


def test_scalar_column_for_tensor_input() -> None:
    with pytest.raises(SpecError, match=r"column 'v' is double \(one value per row\)"):
        check_feed("v", pa.float64(), IMAGE)


def test_ragged_rows_are_a_data_error() -> None:
    meta = TensorMeta("m", np.dtype(np.float32), (None, 3))
    column = pa.array([[1.0, 2.0, 3.0], [1.0, 2.0]])
    with pytest.raises(DataError, match="column 'r' has rows of different lengths \\(2 to 3\\)"):
        column_to_tensor("r", column, meta)


def test_null_rows_are_a_data_error() -> None:
    meta = TensorMeta("m", np.dtype(np.float32), (None, 2))
    column = pa.array([[1.0, 2.0], None], type=pa.list_(pa.float64(), 2))
    with pytest.raises(DataError, match="column 'n' has 1 null list value"):
        column_to_tensor("n", column, meta)


def test_nan_and_inf_pass_through() -> None:
    meta = TensorMeta("m", np.dtype(np.float32), (None, 2))
    column = pa.array([[np.nan, np.inf], [-np.inf, 1.0]], type=pa.list_(pa.float64(), 2))
    got = column_to_tensor("n", column, meta)
    assert np.isnan(got[0, 0]) and np.isinf(got[0, 1]) and got[1, 1] == 1.0


def test_outputs_become_plain_or_tensor_columns() -> None:
    scores = rng.standard_normal((4, 1)).astype(np.float32)
    plain = tensor_to_arrow("score", scores)
    assert plain.type == pa.float32()
    np.testing.assert_array_equal(plain.to_numpy(), scores[:, 0])
    logits = rng.standard_normal((4, 2, 3)).astype(np.float32)
    tensor = tensor_to_arrow("logits", logits)
    assert isinstance(tensor.type, pa.FixedShapeTensorType) and tensor.type.shape == [2, 3]
    np.testing.assert_array_equal(tensor.to_numpy_ndarray(), logits)
    assert output_type(TensorMeta("l", np.dtype(np.float32), (None, 2, 3))) == tensor.type


# --- binary tensor columns: one value per row holding the row tensor's raw bytes ---------------


def binary_of(data: np.ndarray, large: bool = False) -> pa.Array:
    """A `binary` (or `large_binary`) column whose values are `data`'s rows as raw bytes."""
    rows = [row.tobytes() for row in data]
    return pa.array(rows, pa.large_binary() if large else pa.binary())


def test_fixed_size_binary_column_round_trip() -> None:
    data = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    column = tensor_to_binary_column(data)
    assert column.type == pa.binary(3 * 4 * 4 * 4)
    check_feed("img", column.type, IMAGE)
    got = column_to_tensor("img", column, IMAGE)
    assert got.dtype == np.float32 and got.shape == (6, 3, 4, 4)
    np.testing.assert_array_equal(got, data)
    # A view of the column's own memory, not a copy.
    assert np.shares_memory(got, np.frombuffer(column.buffers()[1], np.uint8))


def test_binary_and_large_binary_columns_round_trip() -> None:
    data = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
    for large in (False, True):
        column = binary_of(data, large)
        check_feed("img", column.type, IMAGE)  # any length passes here; batches are checked
        np.testing.assert_array_equal(column_to_tensor("img", column, IMAGE), data)


def test_binary_tensor_columns_through_parquet(tmp_path: Path) -> None:
    data = rng.integers(-2**40, 2**40, size=(7, 2, 3), dtype=np.int64)
    meta = TensorMeta("ids", np.dtype(np.int64), (None, 2, 3))
    table = pa.table({"fixed": tensor_to_binary_column(data), "plain": binary_of(data)})
    pq.write_table(table, tmp_path / "t.parquet", use_dictionary=False)
    back = pq.read_table(tmp_path / "t.parquet")
    for name in ("fixed", "plain"):
        check_feed(name, back.schema.field(name).type, meta)
        np.testing.assert_array_equal(column_to_tensor(name, back.column(name), meta), data)


def test_binary_tensor_columns_sliced_and_chunked() -> None:
    data = rng.standard_normal((10, 48)).astype(np.float32)
    for column in (tensor_to_binary_column(data), binary_of(data)):
        chunked = pa.chunked_array([column.slice(0, 3), column.slice(3, 0), column.slice(3, 7)])
        np.testing.assert_array_equal(column_to_tensor("c", chunked, IMAGE).reshape(10, 48), data)
        np.testing.assert_array_equal(
            column_to_tensor("c", column.slice(4, 2), IMAGE).reshape(2, 48), data[4:6])
        sliced = pa.chunked_array([column.slice(7, 3), column.slice(1, 2)])
        np.testing.assert_array_equal(column_to_tensor("c", sliced, IMAGE).reshape(5, 48),
                                      data[[7, 8, 9, 1, 2]])
        empty = column_to_tensor("c", column.slice(0, 0), IMAGE)
        assert empty.shape == (0, 3, 4, 4) and empty.dtype == np.float32


def test_binary_column_fills_a_dynamic_dim() -> None:
    meta = TensorMeta("tokens", np.dtype(np.int32), (None, None))
    data = rng.integers(0, 1000, size=(4, 9), dtype=np.int32)
    for column in (tensor_to_binary_column(data), binary_of(data)):
        check_feed("t", column.type, meta)
        np.testing.assert_array_equal(column_to_tensor("t", column, meta), data)


def test_binary_helper_casts_and_stores_little_endian() -> None:
    data = rng.standard_normal((3, 2, 2))
    column = tensor_to_binary_column(data.astype(">f8"), dtype=np.float32)
    assert column.type == pa.binary(16)
    assert column[0].as_py() == data[0].astype("<f4").tobytes()
    np.testing.assert_array_equal(
        column_to_tensor("x", column, TensorMeta("x", np.dtype(np.float32), (None, 2, 2))),
        data.astype(np.float32))


def test_binary_helper_rejects_bad_arrays() -> None:
    with pytest.raises(DataError, match=r"tensor_to_binary_column needs an \[N, \.\.\.\] array"):
        tensor_to_binary_column(np.float32(1.0))
    with pytest.raises(DataError, match=r"stores numeric tensors, got dtype <U1; cast the array"):
        tensor_to_binary_column(np.array([["a"], ["b"]]))
    with pytest.raises(DataError, match=r"rows of shape \(0,\), which hold no bytes"):
        tensor_to_binary_column(np.zeros((3, 0), np.float32))


def test_fixed_size_binary_of_the_wrong_width_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=(
            r"column 'img' is fixed_size_binary\[96\] \(96 bytes per row\), but input 'x' of the "
            r"model wants float32 \[N,3,4,4\]: 192 bytes per row \(48 float32 values\); write "
            r"each row's tensor as float32 bytes in C order "
            r"\(workers.convert.tensor_to_binary_column\), or map the right column")):
        check_feed("img", pa.binary(96), IMAGE)
    dynamic = TensorMeta("t", np.dtype(np.int64), (None, 4, None))
    with pytest.raises(SpecError, match=r"wants int64 \[N,4,\?\]: a multiple of 32 bytes per row"):
        check_feed("t", pa.binary(20), dynamic)
    check_feed("t", pa.binary(64), dynamic)


def test_binary_value_of_the_wrong_length_is_a_data_error() -> None:
    data = rng.standard_normal((4, 48)).astype(np.float32)
    values = [row.tobytes() for row in data]
    values[2] = values[2][:100]
    with pytest.raises(DataError, match=(
            r"column 'img' has a value of 100 bytes \(row 2 of the batch\), but input 'x' of the "
            r"model wants float32 \[N,3,4,4\]: 192 bytes per row \(48 float32 values\); each "
            r"value must hold one row's tensor as float32 bytes in C order.*image preprocessor")):
        column_to_tensor("img", pa.array(values, pa.binary()), IMAGE)
    meta = TensorMeta("t", np.dtype(np.float32), (None, None))
    with pytest.raises(DataError, match=r"column 't' has a value of 100 bytes \(row 2 of the "
                       r"batch\).*the same for every row \(row 0 has 192\)"):
        column_to_tensor("t", pa.array(values, pa.binary()), meta)
    odd = pa.array([b"\x00" * 6] * 2, pa.binary())
    with pytest.raises(DataError, match=r"column 't' has 6 bytes per row, but input 't' of the "
                       r"model wants float32 \[N,\?\]: a multiple of 4 bytes per row"):
        column_to_tensor("t", odd, meta)
    chunked = pa.chunked_array([pa.array([b"\x00" * 8], pa.binary()),
                                pa.array([b"\x00" * 12], pa.binary())])
    with pytest.raises(DataError, match=r"column 't' changes row size within a batch "
                       r"\(8 then 12 bytes\)"):
        column_to_tensor("t", chunked, meta)


def test_null_binary_values_are_a_data_error() -> None:
    data = rng.standard_normal((3, 48)).astype(np.float32)
    plain = pa.array([data[0].tobytes(), None, data[2].tobytes()], pa.binary())
    fixed = pa.array([data[0].tobytes(), None, data[2].tobytes()], pa.binary(192))
    for column in (plain, fixed):
        with pytest.raises(DataError, match=r"column 'img' has 1 null value\(s\); fill or filter"):
            column_to_tensor("img", column, IMAGE)


@pytest.mark.parametrize("slots", [0, 2])
def test_binary_columns_through_the_shard_pipeline(tmp_path: Path, slots: int) -> None:
    """The same rows as tensor/list columns and as binary columns give the same part."""
    from tests.models import two_input_model, two_input_table
    from tests.workers.test_pipeline import ThreadSlotBackend, whole_file_shard
    from workers.backends.base import BackendConfig
    from workers.backends.onnxruntime import OnnxRuntimeBackend
    from workers.pipeline import process_shard
    from workers.types import WorkerConfig

    model = two_input_model(seed=5)
    table = two_input_table(230, seed=6)
    image = table.column("img").combine_chunks().to_numpy_ndarray()
    features = np.asarray(table.column("features").to_pylist())
    binary = pa.table({"uid": table.column("uid"), "img": tensor_to_binary_column(image),
                       "features": tensor_to_binary_column(features, np.float32)
                       .cast(pa.large_binary())})
    parts = {}
    for name, data in (("tensor", table), ("binary", binary)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(data, path, row_group_size=100, use_dictionary=["uid"])
        config = WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
                              output_url=str(tmp_path / name), keep=("uid",), batch_size=64,
                              bindings=(("image", "img"), ("meta", "features")),
                              slots=max(1, slots), readers=2)
        backend = (ThreadSlotBackend(model) if slots
                   else OnnxRuntimeBackend(model, BackendConfig(device="cpu")))
        with backend:
            result = process_shard(whole_file_shard(str(path)), config, backend)
        assert (result.rows, result.batches) == (230, 4)
        parts[name] = pq.read_table(result.part_url)
    assert parts["binary"].equals(parts["tensor"])
