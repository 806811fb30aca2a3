"""Arrow columns to model-input arrays and model-output arrays back to Arrow columns.

Supported input columns: Arrow's fixed-shape tensor type, fixed-size lists (nested or flat,
reshaped to the input's row shape), variable lists whose rows all have the input's row size,
plain numeric columns for inputs with one element per row, and binary tensor columns
(`fixed_size_binary`, `binary`, `large_binary`: one value per row holding the row tensor's raw
bytes in the input's dtype, C order, little-endian; see `tensor_to_binary_column`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
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


def is_bytes_column(arrow_type: pa.DataType) -> bool:
    """True for the binary types that can hold one row tensor's raw bytes per value."""
    return (pa.types.is_fixed_size_binary(arrow_type) or pa.types.is_binary(arrow_type)
            or pa.types.is_large_binary(arrow_type))


def _bytes_row_shape(meta: TensorMeta, row_bytes: int) -> tuple[int, ...] | None:
    """The input's row shape for rows of `row_bytes` bytes; None if no such shape exists."""
    itemsize = meta.dtype.itemsize
    if row_bytes % itemsize:
        return None
    return _fill_dims(meta.row_shape, row_bytes // itemsize)


def _wanted_bytes(meta: TensorMeta) -> str:
    """`602112 bytes per row (150528 float32 values)`, or what a dynamic row shape allows."""
    itemsize = meta.dtype.itemsize
    if meta.row_size is not None:
        return (f"{meta.row_size * itemsize} bytes per row ({meta.row_size} {meta.dtype.name} "
                "values)")
    known = math.prod(d for d in meta.row_shape if d is not None)
    return f"a multiple of {known * itemsize} bytes per row ({meta.dtype.name} values)"


def _check_bytes_feed(column: str, arrow_type: pa.DataType, meta: TensorMeta) -> None:
    # Only a fixed width is known before reading; binary values are checked batch by batch.
    if not pa.types.is_fixed_size_binary(arrow_type):
        return
    width = arrow_type.byte_width
    if _bytes_row_shape(meta, width) is None:
        raise SpecError(f"column '{column}' is {arrow_type} ({width} bytes per row), but "
                        f"input '{meta.name}' of the model wants {meta.describe()}: "
                        f"{_wanted_bytes(meta)}; write each row's tensor as "
                        f"{meta.dtype.name} bytes in C order "
                        "(workers.convert.tensor_to_binary_column), or map the right column "
                        "with --column INPUT=COLUMN")


def check_feed(column: str, arrow_type: pa.DataType, meta: TensorMeta) -> None:
    """Raise SpecError unless a column of `arrow_type` can feed model input `meta`."""
    if is_bytes_column(arrow_type):
        _check_bytes_feed(column, arrow_type, meta)
        return
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


class NullValueError(DataError):
    """A tensor column holds a null; `row` is the first row holding one (of the array given),
    so the caller can name where it is (file, shard row, kept values)."""

    def __init__(self, message: str, column: str, row: int) -> None:
        super().__init__(message)
        self.column, self.row = column, row


def _first_null_row(array: pa.Array) -> int:
    """The first row of `array` with a null at any depth (a null row or a null value in it)."""
    values: pa.Array = array.storage if isinstance(array, pa.ExtensionArray) else array
    rows = np.arange(len(values))  # the row each element at this depth belongs to
    while not values.null_count:
        parents = pc.list_parent_indices(values).to_numpy()
        rows, values = rows[parents], values.flatten()
    return int(rows[pc.index(values.is_null(), True).as_py()])


def _flat_values(array: pa.Array, column: str) -> tuple[np.ndarray, list[int]]:
    """Flatten nested lists of one chunk; return values and the uniform per-row dims."""
    dims: list[int] = []
    values: pa.Array = array
    if isinstance(values, pa.ExtensionArray):
        values = values.storage
    while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type) \
            or pa.types.is_large_list(values.type) or pa.types.is_list_view(values.type):
        if values.null_count:
            raise NullValueError(f"column '{column}' has {values.null_count} null list value(s); "
                                 "fill or filter null rows before inference", column,
                                 _first_null_row(array))
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
        raise NullValueError(f"column '{column}' has {values.null_count} null value(s); "
                             "fill or filter nulls before inference", column,
                             _first_null_row(array))
    return values.to_numpy(zero_copy_only=False), dims


def _bytes_view(chunk: pa.Array, column: str, meta: TensorMeta) -> tuple[np.ndarray, int]:
    """One chunk of a binary tensor column as a flat array over its Arrow data buffer.

    No copy and no per-row work: a fixed-size binary chunk's values lie back to back, and so do
    a binary chunk's once its offsets show every value has the same length. Returns the values
    and the bytes per row.
    """
    if chunk.null_count:
        raise NullValueError(f"column '{column}' has {chunk.null_count} null value(s); "
                             "fill or filter null rows before inference", column,
                             _first_null_row(chunk))
    rows = len(chunk)
    buffers = chunk.buffers()
    if pa.types.is_fixed_size_binary(chunk.type):
        row_bytes = chunk.type.byte_width
        data, start = buffers[1], chunk.offset * row_bytes
    else:
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        size = np.dtype(offset_type).itemsize
        offsets = np.frombuffer(buffers[1], offset_type, count=rows + 1,
                                offset=chunk.offset * size)
        lengths = np.diff(offsets)
        # A fixed row shape fixes the length; a dynamic one only asks all rows to agree.
        expected = (meta.row_size * meta.dtype.itemsize if meta.row_size is not None
                    else int(lengths[0]))
        bad = np.flatnonzero(lengths != expected)
        if len(bad):
            first = int(bad[0])
            agree = (f", the same for every row (row 0 has {expected})"
                     if meta.row_size is None else "")
            raise DataError(
                f"column '{column}' has a value of {int(lengths[first])} bytes (row {first} of "
                f"the batch), but input '{meta.name}' of the model wants {meta.describe()}: "
                f"{_wanted_bytes(meta)}{agree}; each value must hold one row's tensor as "
                f"{meta.dtype.name} bytes in C order (workers.convert.tensor_to_binary_column); "
                "for encoded images (JPEG, PNG) use the image preprocessor (--image-column)")
        row_bytes = expected
        data, start = buffers[2], int(offsets[0])
    # The model input's dtype, stored little-endian whatever this host's byte order.
    dtype = meta.dtype.newbyteorder("<")
    values = np.frombuffer(data, dtype, count=rows * row_bytes // dtype.itemsize, offset=start)
    return values, row_bytes


def _bytes_to_tensor(column: str, chunks: list[pa.Array], rows: int,
                     meta: TensorMeta) -> np.ndarray:
    """A binary tensor column's chunks as one `[N, *row_shape]` array (a view if one chunk)."""
    parts: list[np.ndarray] = []
    row_bytes: int | None = None
    for start, chunk in _with_offsets(chunks):
        if not len(chunk):
            continue
        with _rows_from(start):
            values, width = _bytes_view(chunk, column, meta)
        if row_bytes is not None and width != row_bytes:
            raise DataError(f"column '{column}' changes row size within a batch ({row_bytes} "
                            f"then {width} bytes); every row must have the same size")
        row_bytes = width
        parts.append(values)
    if row_bytes is None:
        return np.empty((0, *(d or 0 for d in meta.row_shape)), meta.dtype)
    shape = _bytes_row_shape(meta, row_bytes)
    if shape is None:
        raise DataError(f"column '{column}' has {row_bytes} bytes per row, but input "
                        f"'{meta.name}' of the model wants {meta.describe()}: "
                        f"{_wanted_bytes(meta)}; write each row's tensor as "
                        f"{meta.dtype.name} bytes in C order "
                        "(workers.convert.tensor_to_binary_column)")
    flat = np.concatenate(parts) if len(parts) > 1 else parts[0]
    array = flat.reshape((rows, *shape))
    # A native-order, aligned array: consumers (numpy copies into pinned buffers, ONNX Runtime)
    # take it as it is. Arrow's buffers are aligned, so this copies only for sliced oddities.
    if array.dtype != meta.dtype or not array.flags.aligned:
        array = array.astype(meta.dtype)
    return array


def _with_offsets(chunks: list[pa.Array]) -> Iterator[tuple[int, pa.Array]]:
    """Each chunk with the row of the column it starts at."""
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


@contextlib.contextmanager
def _rows_from(start: int) -> Iterator[None]:
    """A NullValueError raised for a chunk starting at row `start`, made the column's row."""
    try:
        yield
    except NullValueError as exc:
        raise NullValueError(str(exc), exc.column, start + exc.row) from None


def column_to_tensor(column: str, data: pa.ChunkedArray | pa.Array, meta: TensorMeta) -> np.ndarray:
    """Convert one column of a batch to an `[N, *row_shape]` array of the input's dtype.

    Binary tensor columns come back as read-only views of the column's Arrow memory.
    """
    chunks = data.chunks if isinstance(data, pa.ChunkedArray) else [data]
    if is_bytes_column(data.type):
        return _bytes_to_tensor(column, list(chunks), len(data), meta)
    rows = len(data)
    parts: list[np.ndarray] = []
    row_dims: list[int] | None = None
    for start, chunk in _with_offsets(chunks):
        if not len(chunk):
            continue
        with _rows_from(start):
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


def tensor_to_binary_column(array: npt.ArrayLike, dtype: npt.DTypeLike | None = None) -> pa.Array:
    """An `[N, ...]` array as a `fixed_size_binary` column: each row's raw bytes, one value per row.

    The bytes are the row tensor in `dtype` (default: the array's; use the model input's), C
    order, little-endian: the layout `column_to_tensor` reads without decoding values. Write the
    column to Parquet without dictionary encoding (`use_dictionary=False`, or a list of the
    other columns): each value is a whole tensor, so a dictionary only costs time. No copy when
    the array is already C-contiguous, little-endian and of `dtype`.
    """
    values = np.asarray(array)
    if values.ndim == 0:
        raise DataError("tensor_to_binary_column needs an [N, ...] array with a row dimension, "
                        "got a scalar; pass one tensor per row")
    target = np.dtype(dtype if dtype is not None else values.dtype)
    if target.hasobject or target.kind not in "biuf":
        raise DataError(f"tensor_to_binary_column stores numeric tensors, got dtype {target}; "
                        "cast the array to the model input's dtype (float32, int64, ...)")
    values = np.ascontiguousarray(values, dtype=target.newbyteorder("<"))
    rows = values.shape[0]
    row_bytes = values.itemsize * math.prod(values.shape[1:])
    if row_bytes == 0:
        raise DataError(f"tensor_to_binary_column got rows of shape {values.shape[1:]}, which "
                        "hold no bytes; each row needs at least one element")
    return pa.Array.from_buffers(pa.binary(row_bytes), rows, [None, pa.py_buffer(values)])


def output_type(meta: TensorMeta) -> pa.DataType | None:
    """The Arrow type an output becomes, or None when its row shape is only known at run time."""
    if meta.row_size is None:
        return None
    value = pa.from_numpy_dtype(meta.dtype)
    if meta.row_size == 1:
        return value
    return pa.fixed_shape_tensor(value, [d for d in meta.row_shape if d is not None])
