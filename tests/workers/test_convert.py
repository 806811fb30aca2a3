from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from workers.convert import check_feed, column_to_tensor, output_type, tensor_to_arrow
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
