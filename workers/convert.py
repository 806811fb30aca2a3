"""Arrow columns to model-input arrays and model-output arrays back to Arrow columns.

Supported input columns: Arrow's fixed-shape tensor type, fixed-size lists (nested or flat,
reshaped to the input's row shape), variable lists whose rows all have the input's row size, and
plain numeric columns for inputs with one element per row.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import DataError, SpecError
from workers.tensors import TensorMeta


def _value_type(arrow_type: pa.DataType) -> tuple[pa.DataType, tuple[int | None, ...]]:
    """Innermost value type and the per-row dims the type fixes (None where lists vary)."""
    dims: list[int | None] = []
    t = arrow_type
    if isinstance(t, pa.FixedShapeTensorType):
        return t.value_type, tuple(t.shape)
    while True:
        if pa.types.is_fixed_size_list(t):
            dims.append(t.list_size)
            t = t.value_type
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
            dims.append(None)
            t = t.value_type
        else:
            return t, tuple(dims)


def _kind_can_feed(value_type: pa.DataType, dtype: np.dtype) -> bool:
    if pa.types.is_boolean(value_type):
        return dtype.kind in "biuf"
    if pa.types.is_integer(value_type):
        return dtype.kind in "iuf"
    if pa.types.is_floating(value_type):
        return dtype.kind == "f"
    return False


def check_feed(column: str, arrow_type: pa.DataType, meta: TensorMeta) -> None:
    """Raise SpecError unless a column of `arrow_type` can feed model input `meta`."""
    value_type, dims = _value_type(arrow_type)
    wants = f"input '{meta.name}' of the model wants {meta.describe()}"
    if not _kind_can_feed(value_type, meta.dtype):
        hint = ("use a tensor, list or numeric column, or a preprocessor for text and images"
                if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)
                        or pa.types.is_boolean(value_type))
                else f"cast the column to {meta.dtype.name}")
        raise SpecError(f"column '{column}' is {arrow_type}, but {wants}; {hint}")
    row_shape = meta.row_shape
    if not dims:
        if row_shape and math.prod(d if d is not None else 0 for d in row_shape) != 1:
            raise SpecError(f"column '{column}' is {arrow_type} (one value per row), but {wants}; "
                            "store each row's tensor as a fixed-shape tensor or list column")
        return
    if all(d is not None for d in dims) and meta.row_size is not None:
        have = math.prod(d for d in dims if d is not None)
        if have != meta.row_size:
            raise SpecError(f"column '{column}' is {arrow_type} ({have} values per row), "
                            f"but {wants} ({meta.row_size} values per row); "
                            "map the right column with --column INPUT=COLUMN")


def _fill_dims(shape: tuple[int | None, ...], size: int) -> tuple[int, ...] | None:
    """Resolve one dynamic dim of a row shape from the element count; None if impossible."""
    known = math.prod(d for d in shape if d is not None)
    unknown = [i for i, d in enumerate(shape) if d is None]
    if not unknown:
        return tuple(d for d in shape if d is not None) if known == size else None
    if len(unknown) > 1 or known == 0 or size % known:
        return None
    return tuple(size // known if d is None else d for d in shape)


def _flat_values(array: pa.Array, column: str) -> tuple[np.ndarray, list[int]]:
    """Flatten nested lists of one chunk; return values and the uniform per-row dims."""
    dims: list[int] = []
    values: pa.Array = array
    if isinstance(values, pa.ExtensionArray):
        values = values.storage
    while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type) \
            or pa.types.is_large_list(values.type) or pa.types.is_list_view(values.type):
        if values.null_count:
            raise DataError(f"column '{column}' has {values.null_count} null list value(s); "
                            "fill or filter null rows before inference")
        if pa.types.is_fixed_size_list(values.type):
            dims.append(values.type.list_size)
        else:
            lengths = pc.list_value_length(values)
            lo, hi = (pc.min(lengths).as_py(), pc.max(lengths).as_py()) if len(values) else (0, 0)
            if lo != hi:
                raise DataError(f"column '{column}' has rows of different lengths ({lo} to {hi}); "
                                "every row must have the same number of values")
            dims.append(lo or 0)
        values = values.flatten()
    if values.null_count:
        raise DataError(f"column '{column}' has {values.null_count} null value(s); "
                        "fill or filter nulls before inference")
    return values.to_numpy(zero_copy_only=False), dims


def column_to_tensor(column: str, data: pa.ChunkedArray | pa.Array, meta: TensorMeta) -> np.ndarray:
    """Convert one column of a batch to an `[N, *row_shape]` array of the input's dtype."""
    chunks = data.chunks if isinstance(data, pa.ChunkedArray) else [data]
    rows = len(data)
    parts: list[np.ndarray] = []
    row_dims: list[int] | None = None
    for chunk in chunks:
        if not len(chunk):
            continue
        values, dims = _flat_values(chunk, column)
        if row_dims is not None and dims != row_dims:
            raise DataError(f"column '{column}' changes row shape within a batch "
                            f"({row_dims} then {dims})")
        row_dims = dims
        parts.append(values)
    flat = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.empty(0))
    per_row = flat.size // rows if rows else 0
    shape = _fill_dims(meta.row_shape, per_row) if rows else tuple(d or 0 for d in meta.row_shape)
    if shape is None or (rows and flat.size != rows * per_row):
        raise DataError(f"column '{column}' has {per_row} values per row (dims {row_dims}), "
                        f"but input '{meta.name}' wants {meta.describe()}")
    return np.ascontiguousarray(flat.reshape((rows, *shape)), dtype=meta.dtype)


def tensor_to_arrow(name: str, array: np.ndarray) -> pa.Array:
    """Turn an `[N, ...]` output into a plain numeric column (one value per row) or a tensor column."""
    if array.ndim == 0:
        raise DataError(f"model output '{name}' is a scalar; outputs need a batch dimension")
    rows = array.shape[0]
    row_shape = array.shape[1:]
    if math.prod(row_shape) == 1:
        return pa.array(array.reshape(rows))
    flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(row_shape))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(flat.type, list(row_shape)), storage)


def output_type(meta: TensorMeta) -> pa.DataType | None:
    """The Arrow type an output becomes, or None when its row shape is only known at run time."""
    if meta.row_size is None:
        return None
    value = pa.from_numpy_dtype(meta.dtype)
    if meta.row_size == 1:
        return value
    return pa.fixed_shape_tensor(value, [d for d in meta.row_shape if d is not None])
