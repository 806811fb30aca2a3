"""One shard, start to commit: read and convert ahead on a thread, infer, write behind on a thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import pyarrow as pa

from workers.backends.base import Backend, Batch
from workers.commit import PartWriter
from workers.convert import column_to_tensor, tensor_to_arrow
from workers.errors import DataError
from workers.reader import read_batches
from workers.types import Shard, ShardResult, StageTimes, WorkerConfig

T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Runs an iterator on a background thread, at most `depth` items ahead of the consumer.

    The producer's exception is re-raised in the consumer at the point it happened; closing
    early stops the producer at its next item.
    """

    def __init__(self, make: Callable[[], Iterator[T]], depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True,
                                        name="prefetch")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[T]]) -> None:
        try:
            for item in make():
                if not self._put(item):
                    return
        except BaseException as exc:  # forwarded to the consumer
            self._put(exc)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_table(kept: pa.Table, outputs: Batch, rows: int) -> pa.Table:
    """Kept columns followed by one column per model output, row-aligned."""
    columns = dict(zip(kept.column_names, kept.columns, strict=True))
    for name, array in outputs.items():
        if array.shape[0] != rows:
            raise DataError(f"model output '{name}' has {array.shape[0]} rows for a batch of "
                            f"{rows}; the model must keep the batch dimension")
        columns[name] = tensor_to_arrow(name, array)
    return pa.table(columns)


def process_shard(shard: Shard, config: WorkerConfig, backend: Backend,
                  worker: str = "") -> ShardResult:
    """Run one shard through `backend` and commit its part; raises on any failure, committing nothing."""
    started = time.perf_counter()
    times = StageTimes()
    metas = {meta.name: meta for meta in backend.inputs}
    bindings = dict(config.bindings)

    def batches() -> Iterator[tuple[Batch, pa.Table]]:
        tables = read_batches(shard, config.columns, config.batch_size, config.storage)
        while True:
            t0 = time.perf_counter()
            table = next(tables, None)
            t1 = time.perf_counter()
            times.read += t1 - t0
            if table is None:
                return
            feeds = {name: column_to_tensor(column, table.column(column), metas[name])
                     for name, column in bindings.items()}
            kept = table.select(list(config.keep))
            times.convert += time.perf_counter() - t1
            yield feeds, kept

    def write(table: pa.Table) -> None:
        t0 = time.perf_counter()
        writer.write(table)
        times.write += time.perf_counter() - t0

    writer = PartWriter(config.output_url, shard.part_name, config.storage)
    count = 0
    try:
        with Prefetcher(batches, config.prefetch) as ahead, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as behind:
            pending: Future[None] | None = None
            for feeds, kept in ahead:
                t0 = time.perf_counter()
                outputs = backend.infer(feeds)
                times.infer += time.perf_counter() - t0
                table = output_table(kept, outputs, kept.num_rows)
                if pending is not None:
                    pending.result()
                pending = behind.submit(write, table)
                count += 1
            if pending is not None:
                pending.result()
        if writer.rows != shard.rows:
            raise DataError(f"{shard.describe()} gave {writer.rows} rows, its footer says "
                            f"{shard.rows}; the file may have changed or be corrupt")
        t0 = time.perf_counter()
        size = writer.commit()
        times.commit = time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    times.total = time.perf_counter() - started
    return ShardResult(shard_id=shard.id, rows=writer.rows, part_url=writer.url, part_bytes=size,
                       batches=count, worker=worker, times=times)
