"""A shard's rows as model inputs: read from storage, preprocessed in order, failed rows recorded.

Two ways in, one conversion: `pieces()` reads a shard on the calling thread (the CPU path, and
image-directory shards), `row_group_pieces(reader)` converts row groups that a `RowGroupReader`
decodes on several threads (the GPU path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from workers.convert import NullValueError
from workers.errors import DataError
from workers.images import read_image_files
from workers.outputs import carry_inputs
from workers.preprocess import Preprocessor, tensor_preps
from workers.reader import read_batches
from workers.rowgroups import Piece, RowGroupReader
from workers.tensors import TensorMeta
from workers.types import Shard, StageTimes, WorkerConfig

if TYPE_CHECKING:
    from workers.gpuimages import GpuImages
    from workers.helpers import HelperProcesses

#: Failed rows listed per shard in the manifest; the count of all of them is always exact.
MAX_ROW_FAILURES = 1000
#: Rows of text tokenized at once (split over the preprocessing threads).
TEXT_ROWS = 2048


class ShardInputs:
    """Converts a shard's tables into `(model inputs, kept columns)` pieces; close it when done.

    Rows a preprocessor failed (bad images, with on_error=skip) are dropped from both and
    recorded with their kept columns' values, which identify them. `carry` names model inputs
    a postprocessor reads, carried beside the kept columns (`workers.outputs.carry_inputs`).
    `images`: the actor's GPU image decoding (the inputs it decodes become device fills).
    `processes`: the actor's Pillow decoding processes (else the Preprocessor starts its own).
    """

    def __init__(self, shard: Shard, config: WorkerConfig, metas: Sequence[TensorMeta],
                 carry: tuple[str, ...], times: StageTimes, images: GpuImages | None = None,
                 processes: HelperProcesses | None = None) -> None:
        self.shard = shard
        self.config = config
        self.carry = carry
        self.times = times
        self.prep = Preprocessor(config.preprocess or tensor_preps(config.bindings),
                                 {meta.name: meta for meta in metas}, config.preprocess_threads,
                                 images, processes)
        #: The first `MAX_ROW_FAILURES` failed rows, and the count of all of them.
        self.failures: list[dict[str, Any]] = []
        self.rows_failed = 0
        #: Rows of the shard converted so far: both paths convert in order, on one thread.
        self.converted = 0
        self._lock = threading.Lock()

    def convert(self, table: pa.Table) -> Piece:
        """Model inputs and kept columns of `table`; both paths convert through here.

        A null in a tensor column fails the shard naming the file, the shard row and the row's
        kept values, so the user can find it.
        """
        kept = table.select(list(self.config.keep))
        try:
            prepared = self.prep(table, self.converted)
        except NullValueError as exc:
            raise DataError(f"{self.shard.describe()}, row {self.converted + exc.row} of the "
                            f"shard (kept values: {key_text(kept, exc.row)}): {exc}") from None
        self.converted += table.num_rows
        if prepared.failed:
            records = [{"key": row_key(kept, row), "column": column, "reason": reason}
                       for row, (column, reason) in sorted(prepared.failed.items())]
            with self._lock:
                self.rows_failed += len(records)
                self.failures.extend(records[:max(0, MAX_ROW_FAILURES - len(self.failures))])
            kept = kept.take(pa.array(prepared.good_rows()))
        return prepared.feeds, carry_inputs(kept, prepared.feeds, self.carry)

    @property
    def step(self) -> int:
        """Rows converted at once where inputs are much larger than their columns.

        Decoded images and token arrays are many times their column's size: convert those a
        batch at a time (text: `TEXT_ROWS` at a time, so its tokenizer threads get work
        enough), so a large row group never lives converted all at once.
        """
        return max(self.config.batch_size, TEXT_ROWS) if self.prep.token_pads else \
            self.config.batch_size

    def pieces(self) -> Iterator[Piece]:
        """The shard read on this thread, a batch of rows at a time, converted."""
        shard, config = self.shard, self.config
        tables = (read_image_files(shard, config.columns, config.batch_size, config.storage)
                  if shard.files else
                  read_batches(shard, config.columns, self.step, config.storage,
                               max_row_group_bytes=config.max_row_group_bytes))
        while True:
            t0 = time.perf_counter()
            table = next(tables, None)
            t1 = time.perf_counter()
            self.times.read += t1 - t0
            if table is None:
                return
            piece = self.convert(table)
            self.times.convert += time.perf_counter() - t1
            if piece[1].num_rows:  # every row of the table failed: nothing to infer
                yield piece

    def row_group_pieces(self, reader: RowGroupReader) -> Iterator[Piece]:
        """The row groups `reader` decodes on its threads, converted here, in order.

        Conversion runs on one thread and in order, so its side effects (skipped rows' records)
        keep the shard's order.
        """
        for _, table, read_seconds, _ in reader:
            self.times.read += read_seconds
            step = self.step if self.prep.expands else max(1, table.num_rows)
            for start in range(0, table.num_rows, step):
                t0 = time.perf_counter()
                piece = self.convert(table.slice(start, step))
                self.times.convert += time.perf_counter() - t0
                if piece[1].num_rows:  # every row of the table failed: nothing to infer
                    yield piece

    def check_rows(self, written: int) -> None:
        """Raise DataError unless the rows written and failed add up to the shard's rows."""
        if self.rows_failed and not written:
            first = self.failures[0]
            raise DataError(f"every row of {self.shard.describe()} failed preprocessing (column "
                            f"'{first['column']}': {first['reason']}); check the column and "
                            "the preprocessor's settings")
        # Rows that failed preprocessing are not in the part (the manifest lists them).
        if written + self.rows_failed != self.shard.rows:
            raise DataError(f"{self.shard.describe()} gave {written} rows"
                            + (f" and {self.rows_failed} failed row(s)" if self.rows_failed
                               else "")
                            + f", its footer says {self.shard.rows}; the file may have changed "
                            "or be corrupt")

    def close(self) -> None:
        self.prep.close()


def key_text(kept: pa.Table, row: int) -> str:
    """`uid=317, name=row-317`, or how to get such values when the job keeps no column."""
    key = row_key(kept, row)
    return ", ".join(f"{k}={v}" for k, v in key.items()) if key else \
        "none; --keep an id column to name rows"


def row_key(kept: pa.Table, row: int) -> dict[str, Any]:
    """A row's kept values, for the manifest: scalars as they are, anything big summarized."""
    key: dict[str, Any] = {}
    for name in kept.column_names:
        value = kept.column(name)[row].as_py()
        if isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        elif not isinstance(value, str | int | float | bool | type(None)):
            value = repr(value)[:200]
        key[name] = value
    return key
