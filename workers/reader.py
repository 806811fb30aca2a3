"""Reading a shard's row groups from storage, as tables of exactly `batch_size` rows.

Storage failures are retried (`workers.storage.retrying`); bytes that do not decode are a
DataError, never retried. pyarrow reports both as OSError, so the file object handed to pyarrow
remembers what the storage raised, and only that counts as a storage failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import DataError
from workers.storage import DEFAULT_RETRY, RetryPolicy, file_version, filesystem, retrying
from workers.types import DEFAULT_MAX_ROW_GROUP_BYTES, Shard

T = TypeVar("T")

# Bytes per value in memory of Parquet's physical types (BYTE_ARRAY: its offset; FIXED_LEN_BYTE_
# ARRAY: its length, from the schema).
_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12,
           "BYTE_ARRAY": 4}


def _leaves(kind: pa.DataType) -> int:
    """Parquet leaf columns an Arrow type is stored as."""
    if isinstance(kind, pa.ExtensionType):
        return _leaves(kind.storage_type)
    if isinstance(kind, pa.DictionaryType):
        return _leaves(kind.value_type)
    if pa.types.is_struct(kind):
        return sum(_leaves(kind.field(i).type) for i in range(kind.num_fields)) or 1
    if pa.types.is_map(kind):
        return _leaves(kind.key_type) + _leaves(kind.item_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaves(kind.value_type)
    return 1


def _leaf_owners(metadata: pq.FileMetaData) -> list[str]:
    """The top-level column each Parquet leaf column belongs to, in the footer's order."""
    owners: list[str] = []
    try:
        for field in metadata.schema.to_arrow_schema():
            owners += [field.name] * _leaves(field.type)
    except (pa.ArrowException, ValueError):
        owners = []
    if len(owners) != metadata.num_columns:  # a type this count does not know: use the paths
        owners = [metadata.schema.column(i).path.split(".", 1)[0]
                  for i in range(metadata.num_columns)]
    return owners


def row_group_bytes(metadata: pq.FileMetaData, index: int, columns: list[str]) -> int:
    """At least what row group `index` decodes to in memory for `columns`, from the footer alone.

    Per leaf column the larger of its uncompressed size and its value count times the value's
    width: RLE and dictionary encoding make a column of zeros a few bytes uncompressed, while
    every value still takes its width once decoded. Strings and binaries count their offsets
    only (their lengths are not in the footer), so the check after decoding covers them.
    """
    group = metadata.row_group(index)
    wanted = set(columns)
    total = 0
    for i, owner in enumerate(_leaf_owners(metadata)):
        if owner not in wanted:
            continue
        chunk = group.column(i)
        physical = chunk.physical_type
        width = (metadata.schema.column(i).length if physical == "FIXED_LEN_BYTE_ARRAY"
                 else _WIDTHS.get(physical, 1))
        total += max(int(chunk.total_uncompressed_size), int(chunk.num_values) * max(1, width))
    return total


def row_group_too_large(url: str, index: int, size: int, rows: int, columns: list[str],
                        limit: int, decoded: bool = False) -> DataError:
    from workers.plan_build import plan_nbytes_text

    what = "decoded to" if decoded else "decodes to at least"
    return DataError(
        f"'{url}' row group {index} {what} {plan_nbytes_text(size)} ({rows:,} rows of columns "
        f"{sorted(columns)}), more than the limit of {plan_nbytes_text(limit)} per row group; "
        "rewrite the file with smaller row groups, or raise --max-row-group-bytes if you trust it")


def check_row_group(url: str, metadata: pq.FileMetaData, index: int, columns: list[str],
                    limit: int) -> None:
    """DataError before reading when row group `index` would decode past `limit` bytes."""
    size = row_group_bytes(metadata, index, columns)
    if size > limit:
        raise row_group_too_large(url, index, size, metadata.row_group(index).num_rows, columns,
                                  limit)


def check_decoded(url: str, index: int, table: pa.Table, columns: list[str], limit: int) -> None:
    """DataError when a row group read turned out larger than `limit` (strings, binaries)."""
    if table.nbytes > limit:
        raise row_group_too_large(url, index, table.nbytes, table.num_rows, columns, limit,
                                  decoded=True)


#: Values per read of a row group with list or tensor columns. Arrow decodes those into buffers
#: it grows as it reads (reallocating and copying them, uint8 values as int32), so a row group
#: of 1024 RGB images at 224 px read whole regrows a 600 MB buffer; read about 4M values at a
#: time, the buffers stay small and in cache: 2x the rows/s per core for uint8 and float32
#: tensor columns (docs/tensor-columns.md). Flat columns (binary tensors) read whole: faster.
LIST_READ_VALUES = 1 << 22


def nested_read_rows(metadata: pq.FileMetaData, index: int, columns: list[str]) -> int | None:
    """Rows per read of row group `index` when `columns` hold lists or tensors, else None (whole)."""
    group = metadata.row_group(index)
    wanted = set(columns)
    nested = 0
    for j in range(group.num_columns):
        chunk = group.column(j)
        if (chunk.path_in_schema.split(".", 1)[0] in wanted
                and metadata.schema.column(j).max_repetition_level > 0):
            nested += chunk.num_values
    if not nested or not group.num_rows:
        return None
    per_row = max(1, nested // group.num_rows)
    rows = max(1, LIST_READ_VALUES // per_row)
    return rows if rows < group.num_rows else None


def read_group(parquet: pq.ParquetFile, index: int, columns: list[str]) -> pa.Table:
    """Row group `index` (only `columns`), list and tensor columns read a few rows at a time."""
    rows = nested_read_rows(parquet.metadata, index, columns)
    if rows is None:
        return parquet.read_row_group(index, columns=columns, use_threads=False)
    batches = list(parquet.iter_batches(batch_size=rows, row_groups=[index], columns=columns,
                                        use_threads=False))
    if not batches:
        return parquet.read_row_group(index, columns=columns, use_threads=False)
    return pa.Table.from_batches(batches)


def _one_line(exc: BaseException) -> str:
    """pyarrow's message on one line, without the control bytes a corrupt page may put in it."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(exc)).split())


def _check_unchanged(shard: Shard, info: Mapping[str, Any]) -> None:
    size, version = int(info.get("size") or 0), file_version(info)
    if size != shard.size or version != shard.version:
        raise DataError(
            f"'{shard.url}' changed after the job listed it (size {shard.size} -> {size}, "
            f"{shard.version or 'no version'} -> {version or 'no version'}); "
            "rerun the job to process the new contents"
        )


class _TrackedFile:
    """A file object that remembers the last exception its storage raised."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.error: BaseException | None = None

    def _track(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except BaseException as exc:
            self.error = exc
            raise

    def read(self, size: int = -1) -> bytes:
        return self._track(lambda: self._handle.read(size))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._track(lambda: self._handle.seek(offset, whence))

    def tell(self) -> int:
        return int(self._handle.tell())

    def close(self) -> None:
        self._handle.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class ShardFile:
    """One input file opened for a shard: checked unchanged, footer read once, row groups
    read with retries. Use as a context manager."""

    def __init__(self, shard: Shard, storage_options: Mapping[str, Any] | None = None,
                 policy: RetryPolicy = DEFAULT_RETRY) -> None:
        self.shard = shard
        self.policy = policy
        self.fs, self.path = filesystem(shard.url, storage_options)
        self._handle: _TrackedFile | None = None
        self._parquet: pq.ParquetFile | None = None
        info = retrying(f"cannot read '{shard.url}'", lambda: self.fs.info(self.path), policy)
        _check_unchanged(shard, info)
        self.metadata: pq.FileMetaData = self._call(
            f"cannot read the footer of '{shard.url}'", lambda p: p.metadata,
            lambda exc: f"'{shard.url}' is not a readable Parquet file ({_one_line(exc)}); "
                        "replace or remove the file")
        self.schema: pa.Schema = self.metadata.schema.to_arrow_schema()

    def _open(self) -> pq.ParquetFile:
        if self._parquet is None:
            self._handle = _TrackedFile(self.fs.open(self.path, "rb"))
            # A reopened file reuses the footer read the first time.
            metadata = getattr(self, "metadata", None)
            self._parquet = pq.ParquetFile(self._handle, metadata=metadata)
        return self._parquet

    def _drop(self) -> None:
        """Close the handle after a storage failure, so the next attempt starts clean."""
        handle, self._handle, self._parquet = self._handle, None, None
        if handle is not None:
            # The connection may already be broken; the next attempt opens a new one anyway.
            with contextlib.suppress(Exception):
                handle.close()

    def _call(self, action: str, read: Callable[[pq.ParquetFile], T],
              corrupt: Callable[[BaseException], str]) -> T:
        """`read(parquet)` with retries of storage failures; undecodable bytes -> DataError."""

        def attempt() -> T:
            try:
                parquet = self._open()
                assert self._handle is not None
                self._handle.error = None
                return read(parquet)
            except DataError:
                raise
            except Exception as exc:
                handle = self._handle
                if handle is None or handle.error is not None:
                    # The storage failed (opening, or under pyarrow): retried as storage.
                    self._drop()
                    raise (handle.error if handle is not None and handle.error is not None
                           else exc) from None
                if isinstance(exc, pa.ArrowException | OSError | ValueError):
                    raise DataError(corrupt(exc)) from exc
                raise

        return retrying(action, attempt, self.policy)

    def check_columns(self, columns: list[str]) -> None:
        """Raise DataError naming the columns this file lacks."""
        names = set(self.schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"'{self.shard.url}' has no column(s) {missing} (it has "
                            f"{sorted(names)}); every input file needs the same schema")

    def read_row_group(self, index: int, columns: list[str],
                       max_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES) -> pa.Table:
        """Row group `index` (only `columns`), read with retries; DataError, before reading,
        when its footer says it decodes past `max_bytes`."""
        check_row_group(self.shard.url, self.metadata, index, columns, max_bytes)
        table = self._call(
            f"cannot read row group {index} of '{self.shard.url}'",
            lambda p: read_group(p, index, columns),
            lambda exc: f"'{self.shard.url}' has a corrupt row group {index} "
                        f"({_one_line(exc)}); "
                        "replace or remove the file")
        check_decoded(self.shard.url, index, table, columns, max_bytes)
        return table

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_batches(shard: Shard, columns: list[str], batch_size: int,
                 storage_options: Mapping[str, Any] | None = None,
                 policy: RetryPolicy = DEFAULT_RETRY,
                 max_row_group_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES) -> Iterator[pa.Table]:
    """Yield the shard's rows (only `columns`) in order, as tables of `batch_size` rows (last may be short).

    Reads one row group at a time, so a storage failure retries one row group, not the shard.
    A row group that would decode past `max_row_group_bytes` is a DataError, before it is read.
    """
    with ShardFile(shard, storage_options, policy) as source:
        source.check_columns(columns)
        start, stop = shard.row_groups
        carry: pa.Table | None = None  # fewer than batch_size rows left from earlier groups
        for index in range(start, stop):
            group = source.read_row_group(index, columns, max_row_group_bytes)
            # Zero-copy: the carried rows and the new group become chunks of one table.
            table = group if carry is None else pa.concat_tables([carry, group])
            offset = 0
            while table.num_rows - offset >= batch_size:
                yield table.slice(offset, batch_size).combine_chunks()
                offset += batch_size
            carry = table.slice(offset) if offset < table.num_rows else None
        if carry is not None:
            yield carry.combine_chunks()


def sample_column(shards: Sequence[Shard], column: str, storage: dict[str, Any], files: int,
                  rows: int) -> list[pa.Array]:
    """The first `rows` values of `column` in the first row group of up to `files` Parquet
    files of `shards` (one array each): what the driver samples of its input."""
    seen: set[str] = set()
    arrays = []
    for shard in shards:
        if shard.url in seen or shard.files or len(seen) >= files:
            continue
        seen.add(shard.url)
        file = ShardFile(shard, storage)
        try:
            table = file.read_row_group(shard.row_groups[0], [column])
        finally:
            file.close()
        arrays.append(table.column(column).slice(0, rows).combine_chunks())
    return arrays
