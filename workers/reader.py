"""Reading a shard's row groups straight from storage, as tables of exactly `batch_size` rows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import DataError
from workers.storage import file_version, filesystem, storage_errors
from workers.types import Shard


def _check_unchanged(shard: Shard, info: Mapping[str, Any]) -> None:
    size, version = int(info.get("size") or 0), file_version(info)
    if size != shard.size or version != shard.version:
        raise DataError(
            f"'{shard.url}' changed after the job listed it (size {shard.size} -> {size}, "
            f"{shard.version or 'no version'} -> {version or 'no version'}); "
            "rerun the job to process the new contents"
        )


def read_batches(shard: Shard, columns: list[str], batch_size: int,
                 storage_options: Mapping[str, Any] | None = None) -> Iterator[pa.Table]:
    """Yield the shard's rows (only `columns`) in order, as tables of `batch_size` rows (last may be short)."""
    fs, path = filesystem(shard.url, storage_options)
    with storage_errors(f"cannot read '{shard.url}'"):
        _check_unchanged(shard, fs.info(path))
        handle = fs.open(path, "rb")
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"'{shard.url}' is not a readable Parquet file ({exc}); "
                            "replace or remove the file") from exc
        names = set(parquet.schema_arrow.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"'{shard.url}' has no column(s) {missing} (it has "
                            f"{sorted(names)}); every input file needs the same schema")
        start, stop = shard.row_groups
        pending: list[pa.RecordBatch] = []
        buffered = 0
        try:
            for record_batch in parquet.iter_batches(batch_size=batch_size,
                                                     row_groups=list(range(start, stop)),
                                                     columns=columns, use_threads=False):
                pending.append(record_batch)
                buffered += record_batch.num_rows
                while buffered >= batch_size:
                    table = pa.Table.from_batches(pending).combine_chunks()
                    yield table.slice(0, batch_size)
                    rest = table.slice(batch_size)
                    pending, buffered = rest.to_batches(), rest.num_rows
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"'{shard.url}' has a corrupt row group in {start}-{stop - 1} "
                            f"({exc}); replace or remove the file") from exc
        if buffered:
            yield pa.Table.from_batches(pending).combine_chunks()
