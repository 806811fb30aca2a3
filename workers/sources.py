"""A shard's rows as model inputs: read from storage, preprocessed in order, failed rows recorded.

Two ways in, one conversion: `pieces()` reads a shard on the calling thread (the CPU path, and
image-directory shards), `row_group_pieces(reader)` converts row groups that a `RowGroupReader`
decodes on several threads (the GPU path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from workers.convert import NullValueError
from workers.errors import DataError
from workers.images import read_image_files
from workers.outputs import carry_inputs
from workers.prefetch import ordered_map
from workers.preprocess import TASK_ROWS, Prepared, Preprocessor, tensor_preps
from workers.reader import read_batches
from workers.rowgroups import Piece, RowGroupReader
from workers.tensors import TensorMeta
from workers.types import Shard, StageTimes, WorkerConfig

if TYPE_CHECKING:
    from workers.gpuimages import GpuImages
    from workers.helpers import HelperProcesses

#: Failed rows listed per shard in the manifest; the count of all of them is always exact.
MAX_ROW_FAILURES = 1000
#: Rows of text tokenized at once (split over the preprocessing threads), at least
#: `TASK_ROWS` (the least rows a helper process is sent at once) per thread.
TEXT_ROWS = 2048


def text_rows(batch_size: int, threads: int) -> int:
    """Rows of text tokenized at once: `TEXT_ROWS`, at least a batch, and at least `TASK_ROWS`
    for each of the `threads` helpers."""
    return max(batch_size, TEXT_ROWS, TASK_ROWS * threads)


@dataclass
class _Prepared:
    """A table's preprocessed rows and kept columns, and when preparing it started and ended."""

    kept: pa.Table
    prepared: Prepared
    started: float
    finished: float


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
                                 images, processes, config.image_tables)
        #: The first `MAX_ROW_FAILURES` failed rows, and the count of all of them.
        self.failures: list[dict[str, Any]] = []
        self.rows_failed = 0
        #: Rows of the shard given to conversion so far (in order, by one thread).
        self.converted = 0
        self._lock = threading.Lock()

    def _prepare(self, table: pa.Table, offset: int) -> _Prepared:
        """`table` (the shard's rows from `offset`) preprocessed; no side effects, so several
        tables may be prepared at once (`_converted`: both paths convert through it).

        A null in a tensor column fails the shard naming the file, the shard row and the row's
        kept values, so the user can find it.
        """
        started = time.perf_counter()
        kept = table.select(list(self.config.keep))
        try:
            prepared = self.prep(table, offset)
        except NullValueError as exc:
            raise DataError(f"{self.shard.describe()}, row {offset + exc.row} of the "
                            f"shard (kept values: {key_text(kept, exc.row)}): {exc}") from None
        return _Prepared(kept, prepared, started, time.perf_counter())

    def _accept(self, done: _Prepared) -> Piece:
        """A prepared table as a piece, its failed rows recorded: in the shard's order."""
        kept, prepared = done.kept, done.prepared
        if prepared.failed:
            records = [{"key": row_key(kept, row), "column": column, "reason": reason}
                       for row, (column, reason) in sorted(prepared.failed.items())]
            with self._lock:
                self.rows_failed += len(records)
                self.failures.extend(records[:max(0, MAX_ROW_FAILURES - len(self.failures))])
            kept = kept.take(pa.array(prepared.good_rows()))
        return prepared.feeds, carry_inputs(kept, prepared.feeds, self.carry)

    def _converted(self, tables: Iterator[pa.Table]) -> Iterator[Piece]:
        """`tables` (the shard's rows, in order) converted, yielded in order without the pieces
        whose every row failed.

        Text on helper processes is prepared `prep.concurrency` tables at once, so the helpers
        always have the next table's rows queued: one table at a time, they would idle while
        its slowest helper finished and while it was gathered and padded. `times.convert` is
        the time some table was being prepared (the union of their spans), not their sum.
        """
        def offsets() -> Iterator[tuple[pa.Table, int]]:
            for table in tables:
                offset, self.converted = self.converted, self.converted + table.num_rows
                yield table, offset

        busy_until = 0.0
        for done in ordered_map(lambda item: self._prepare(*item), offsets(),
                                self.prep.concurrency):
            self.times.convert += max(0.0, done.finished - max(done.started, busy_until))
            busy_until = max(busy_until, done.finished)
            piece = self._accept(done)
            if piece[1].num_rows:  # every row of the table failed: nothing to infer
                yield piece

    @property
    def step(self) -> int:
        """Rows converted at once where inputs are much larger than their columns.

        Decoded images and token arrays are many times their column's size: convert those a
        batch at a time (text: `TEXT_ROWS` at a time, so its tokenizer threads get work
        enough), so a large row group never lives converted all at once.
        """
        if self.prep.token_pads:
            return text_rows(self.config.batch_size, self.prep.threads)
        return self.config.batch_size

    def pieces(self) -> Iterator[Piece]:
        """The shard read on this thread, a batch of rows at a time, converted."""
        shard, config = self.shard, self.config
        tables = (read_image_files(shard, config.columns, config.batch_size, config.storage)
                  if shard.files else
                  read_batches(shard, config.columns, self.step, config.storage,
                               max_row_group_bytes=config.max_row_group_bytes))

        def timed() -> Iterator[pa.Table]:
            while True:
                t0 = time.perf_counter()
                table = next(tables, None)
                self.times.read += time.perf_counter() - t0
                if table is None:
                    return
                yield table
        return self._converted(timed())

    def row_group_pieces(self, reader: RowGroupReader) -> Iterator[Piece]:
        """The row groups `reader` decodes on its threads, converted here, in order (so the
        records of skipped rows keep the shard's order)."""
        def tables() -> Iterator[pa.Table]:
            for _, table, read_seconds, _ in reader:
                self.times.read += read_seconds
                step = self.step if self.prep.expands else max(1, table.num_rows)
                for start in range(0, table.num_rows, step):
                    yield table.slice(start, step)
        return self._converted(tables())

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
