"""Reading a shard's row groups on several threads at once, handed out in order as exact batches.

The GPU path uses this: one thread decoding Parquet cannot keep up with a GPU fed large tensors,
and pyarrow's decoder releases the GIL, so row groups decode in parallel. Each thread reads
through its own `ShardFile` (file handles are not safe to share), with its retries, or, for
local files, through its own native pyarrow file.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, wait
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import DataError, StorageError
from workers.reader import ShardFile, check_decoded, check_row_group, read_group
from workers.storage import is_local
from workers.types import DEFAULT_MAX_ROW_GROUP_BYTES, Shard

T = TypeVar("T")
Batch = dict[str, np.ndarray]
#: One row group (or part of one) after conversion: model inputs and the columns to keep.
Piece = tuple[Batch, pa.Table]
#: A converted row group with the seconds its thread spent reading and converting it.
Converted = tuple[Batch, pa.Table, float, float]


class ReadPool:
    """Threads that read row groups for every shard of an actor, the earliest shard first.

    Tasks run in order of their priority `(shard ticket, row group)`, so a shard waiting for
    the GPU reads only with threads the running shard leaves idle, and reading flows from one
    shard into the next as if they were one.
    """

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"ReadPool needs at least one thread, got {threads}")
        self.threads = threads
        self._heap: list[tuple[tuple[int, int], int, Future[Any], Callable[[], Any]]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"read-{i}", daemon=True)
                         for i in range(threads)]
        for worker in self._workers:
            worker.start()

    def submit(self, priority: tuple[int, int], call: Callable[[], T]) -> Future[T]:
        """Run `call` on a reading thread once no task of a lower `priority` is waiting."""
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("ReadPool is closed")
            heapq.heappush(self._heap, (priority, next(self._order), future, call))
            self._ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._heap) or self._closed)
                if not self._heap:
                    return
                _, _, future, call = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(call())
            except BaseException as exc:  # delivered to whoever waits on the future
                future.set_exception(exc)

    def close(self) -> None:
        """Drop queued tasks, let running ones finish, stop the threads."""
        with self._ready:
            self._closed = True
            queued, self._heap = self._heap, []
            self._ready.notify_all()
        for _, _, future, _ in queued:
            future.cancel()
        for worker in self._workers:
            worker.join()


class RowGroupReader:
    """Reads and converts a shard's row groups on `threads` threads, at most `ahead` in waiting.

    Reading starts at construction. Iterating yields `(feeds, kept, read_seconds,
    convert_seconds)` per row group, in order; an error in any row group is raised where that
    row group would have been yielded. `window` (default `threads + ahead`) caps the row groups
    read but not yet consumed. With `pool` (shared by an actor's shards) the reads run there at
    `priority`; without, on threads of the reader's own. A row group that would decode past
    `max_row_group_bytes` is a DataError raised in its place, before it is read.
    """

    def __init__(self, shard: Shard, columns: list[str], convert: Callable[[pa.Table], Piece],
                 threads: int = 4, ahead: int = 2,
                 storage_options: Mapping[str, Any] | None = None,
                 window: int | None = None, pool: ReadPool | None = None,
                 priority: int = 0,
                 max_row_group_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES) -> None:
        if threads < 1:
            raise ValueError(f"RowGroupReader needs at least one thread, got {threads}")
        self._priority = priority
        self.max_row_group_bytes = max_row_group_bytes
        self.shard = shard
        self.columns = columns
        self._convert = convert
        self._storage = storage_options
        self.full_window = threads + max(0, ahead)
        self._window = max(1, min(window or self.full_window, self.full_window))
        start, stop = shard.row_groups
        self._indices = iter(range(start, stop))
        self._pending: deque[Future[Converted]] = deque()
        self._local = threading.local()
        self._files: list[ShardFile | pq.ParquetFile] = []
        self._lock = threading.Lock()
        # Checks the file is unchanged and has the columns before any thread starts.
        first = ShardFile(shard, storage_options)
        self._files.append(first)
        try:
            first.check_columns(columns)
        except BaseException:
            first.close()
            raise
        self._local.file = first
        self._metadata = first.metadata
        # Local files: pyarrow reads them natively (see `_read_local`); the first file
        # already checked that the file is the one the job listed.
        self._path: str | None = first.path if is_local(first.fs) else None
        self._own_pool = pool is None
        self._pool = pool if pool is not None else ReadPool(threads)
        self._fill()

    def _file(self) -> ShardFile:
        file: ShardFile | None = getattr(self._local, "file", None)
        if file is None:
            # File handles are not safe to share between threads: one per reading thread.
            file = ShardFile(self.shard, self._storage)
            with self._lock:
                self._files.append(file)
            self._local.file = file
        return file

    def _read_local(self, index: int) -> pa.Table:
        """A row group of a local file through pyarrow's own file reads (no Python I/O).

        Reading through a Python file object copies every column chunk into a fresh Python
        bytes object under the GIL; on the GPU path that was a fifth of the reading time.
        """
        parquet: pq.ParquetFile | None = getattr(self._local, "native", None)
        check_row_group(self.shard.url, self._metadata, index, self.columns,
                        self.max_row_group_bytes)
        try:
            if parquet is None:
                parquet = pq.ParquetFile(self._path, metadata=self._metadata)
                with self._lock:
                    self._files.append(parquet)
                self._local.native = parquet
            table = read_group(parquet, index, self.columns)
        except FileNotFoundError as exc:
            raise StorageError(f"cannot read row group {index} of '{self.shard.url}': "
                               f"not found ({exc})") from exc
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"'{self.shard.url}' has a corrupt row group {index} ({exc}); "
                            "replace or remove the file") from exc
        check_decoded(self.shard.url, index, table, self.columns, self.max_row_group_bytes)
        return table

    def _read(self, index: int) -> Converted:
        t0 = time.perf_counter()
        if self._path is not None:
            table = self._read_local(index)
        else:
            table = self._file().read_row_group(index, self.columns, self.max_row_group_bytes)
        t1 = time.perf_counter()
        feeds, kept = self._convert(table)
        return feeds, kept, t1 - t0, time.perf_counter() - t1

    def _fill(self) -> None:
        while len(self._pending) < self._window:
            index = next(self._indices, None)
            if index is None:
                return
            self._pending.append(self._pool.submit((self._priority, index),
                                                   functools.partial(self._read, index)))

    def __iter__(self) -> Iterator[Converted]:
        while self._pending:
            result = self._pending.popleft().result()
            self._fill()
            yield result

    def close(self) -> None:
        """Stop reading (queued row groups are dropped), then close every thread's file."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            if self._own_pool:
                pool.close()
            else:  # a shared pool: drop this shard's queued reads, wait for its running ones
                for future in self._pending:
                    future.cancel()
                wait(self._pending)
            self._pending.clear()
        with self._lock:
            files, self._files = self._files, []
        for file in files:
            file.close()

    def __enter__(self) -> RowGroupReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
