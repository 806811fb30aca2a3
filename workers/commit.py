"""Writing one part so it appears only complete: temp file + rename, or one upload."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workers.storage import DEFAULT_RETRY, RetryPolicy, filesystem, is_local, retrying

TMP_DIR = "_tmp"  # under the output; the leading underscore keeps Parquet readers out
#: The names of the temporary files PartWriter makes (`part-<position>-<row group>-<shard
#: id>.parquet.<uuid>`, or `part-<shard id>.parquet.<uuid>` of earlier versions): the only names
#: in `_tmp` the runner may remove; anything else there is someone else's.
TMP_PART_RE = re.compile(r"^part-(?:\d+-\d+-)?[0-9a-f]{24}\.parquet\.[0-9a-f]{32}$")


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet leaf columns of `schema` to dictionary-encode: all but the floating-point ones.

    Floats (plain, in lists, fixed-size lists, tensors or structs) are model outputs that
    seldom repeat, so a dictionary is built, found useless and dropped for every page: measured
    on 100k rows of a 384-wide float32 embedding with zstd, 0.66 s against 0.54 s, for the same
    bytes. Ids, keys and labels repeat and keep it. The leaf paths (`emb.list.element`) come
    from the Parquet schema pyarrow writes for `schema` (an empty file in memory), so nested
    names follow pyarrow's own rules.
    """
    sink = pa.BufferOutputStream()
    pq.ParquetWriter(sink, schema).close()
    leaves = pq.read_metadata(pa.BufferReader(sink.getvalue())).schema
    return [leaves.column(i).path for i in range(len(leaves))
            if not _is_float(leaves.column(i))]


def _is_float(column: pq.ColumnSchema) -> bool:
    return (column.physical_type in ("FLOAT", "DOUBLE")
            or str(column.logical_type) == "Float16")


def tmp_part_name(name: str) -> str:
    """A fresh temporary name for part `name` (matches `TMP_PART_RE`)."""
    return f"{name}.{uuid.uuid4().hex}"


class PartWriter:
    """Streams tables into a Parquet file that becomes `OUTPUT/name` only on `commit()`.

    On a local filesystem the file is written in `OUTPUT/_tmp` (renamed into place); for an
    object store it is spooled to a local file and uploaded once. `spool_dir`: the private
    directory to spool in (an actor's `workers.spool.Spool`); None: a private directory made
    for this part alone (mode 0700, as `tempfile.mkdtemp` makes them) and removed with it.
    """

    def __init__(self, output_url: str, name: str,
                 storage_options: Mapping[str, Any] | None = None,
                 policy: RetryPolicy = DEFAULT_RETRY, spool_dir: str | None = None) -> None:
        self.policy = policy
        self.fs, root = filesystem(output_url, storage_options)
        self.final_path = f"{root.rstrip('/')}/{name}"
        self.url = self.fs.unstrip_protocol(self.final_path)
        self._own_dir: str | None = None
        if is_local(self.fs):
            # Same directory tree as the final file, so the rename is atomic.
            tmp_dir = os.path.join(root, TMP_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
        elif spool_dir is not None:
            tmp_dir = spool_dir
        else:
            # Never the shared temporary directory itself: the rows are the job's output.
            tmp_dir = self._own_dir = tempfile.mkdtemp(prefix="trt-batch-runner-part-")
        self.tmp_path = os.path.join(tmp_dir, tmp_part_name(name))
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append a table (one row group per call)."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp_path, table.schema, compression="zstd",
                                            use_dictionary=dictionary_columns(table.schema))
        self._writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> int:
        """Make the part visible, complete; returns its size in bytes."""
        if self._writer is None:
            raise ValueError("PartWriter.commit() before any write: a part needs a schema")
        self._writer.close()
        self._writer = None
        size = os.path.getsize(self.tmp_path)

        def publish() -> None:
            if is_local(self.fs):
                os.replace(self.tmp_path, self.final_path)
            else:
                # A single PUT, or a multipart upload completed in one call: all or nothing.
                # Retrying it is safe: the part's name and bytes are the same every time.
                self.fs.put_file(self.tmp_path, self.final_path)

        retrying(f"cannot commit part '{self.url}'", publish, self.policy)
        self._drop_tmp()
        return size

    def _drop_tmp(self) -> None:
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def abort(self) -> None:
        """Drop the temporary file; the final part, if an earlier attempt made one, stays."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
        self._drop_tmp()
