"""One shard, start to commit: a short composition of the actor's parts.

`workers.sources` reads and converts the shard's rows, `workers.batching` cuts them into
batches, the engine runs them (synchronously on the CPU path below, K in flight on the GPU
path in `workers.slots`), `workers.outputs` builds each batch's output table, and
`workers.commit` writes the part and commits it only when complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from workers.backends.base import Backend, Batch
from workers.batching import exact_batches
from workers.commit import PartWriter
from workers.outputs import output_table
from workers.postprocess import Postprocessor
from workers.prefetch import Prefetcher
from workers.rowgroups import Piece, RowGroupReader
from workers.slots import SlotPool, run_slots
from workers.sources import MAX_ROW_FAILURES, ShardInputs
from workers.types import Shard, ShardResult, StageTimes, WorkerConfig

if TYPE_CHECKING:
    from workers.gpuimages import GpuImages

__all__ = ["MAX_ROW_FAILURES", "SlotPool", "process_shard"]

WriteOutputs = Callable[[pa.Table, Batch, int], None]


def _as_piece(table: pa.Table) -> Piece:
    """The reading threads' step: none (conversion happens in order, on the converting thread)."""
    return {}, table


def _run_sync(backend: Backend, pieces: Callable[[], Iterator[Piece]],
              write_outputs: WriteOutputs, config: WorkerConfig, times: StageTimes) -> int:
    """The CPU path: infer each batch in turn while the next is read and the last is written."""
    count = 0
    with Prefetcher(pieces, config.prefetch) as ahead, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as behind:
        pending: Future[None] | None = None
        for feeds, kept in ahead:
            t0 = time.perf_counter()
            outputs = backend.infer(feeds)
            times.infer += time.perf_counter() - t0
            if pending is not None:
                pending.result()
            # Postprocessing and the output table are built on the write thread, as on the GPU path.
            pending = behind.submit(write_outputs, kept, outputs, kept.num_rows)
            count += 1
        if pending is not None:
            pending.result()
    return count


def _run_on_slots(shard: Shard, config: WorkerConfig, pool: SlotPool, inputs: ShardInputs,
                  write_outputs: WriteOutputs, times: StageTimes,
                  images: GpuImages | None) -> int:
    """The GPU path: this shard's batches through `pool`, in its turn among the actor's shards."""
    ticket = pool.ticket()
    try:
        if shard.files:  # image files: one reading thread fetches them concurrently
            with pool.turn(ticket), Prefetcher(inputs.pieces, config.prefetch) as ahead:
                return run_slots(pool, exact_batches(iter(ahead), config.batch_size),
                                 write_outputs, times, time.perf_counter(),
                                 lambda: pool.done(ticket), ticket, images)
        # Reading starts now, on the threads the shard holding the slots leaves idle, so this
        # shard's batches are ready when its turn comes.
        reader = RowGroupReader(shard, config.columns, _as_piece, config.readers,
                                config.prefetch, config.storage,
                                pool=pool.read_pool(config.readers), priority=ticket,
                                max_row_group_bytes=config.max_row_group_bytes)
        with reader, pool.turn(ticket), \
                Prefetcher(lambda: inputs.row_group_pieces(reader), config.prefetch) as ahead:
            return run_slots(pool, exact_batches(iter(ahead), config.batch_size),
                             write_outputs, times, time.perf_counter(),
                             lambda: pool.done(ticket), ticket, images)
    finally:
        pool.done(ticket)


def process_shard(shard: Shard, config: WorkerConfig, backend: Backend, worker: str = "",
                  slots: SlotPool | None = None, images: GpuImages | None = None,
                  spool_dir: str | None = None) -> ShardResult:
    """Run one shard through `backend` and commit its part; raises on any failure, committing nothing.

    A backend with `uses_slots` runs with `config.slots` batches in flight, in `slots` when given
    (an actor keeps one pool for all its shards) or in a pool opened for this shard. `images`
    (GPU path only): the actor's GPU image decoding, for the image inputs it decodes.
    `spool_dir`: the actor's private spool for parts bound for an object store (see PartWriter).
    """
    started = time.perf_counter()
    started_at = time.time()
    times = StageTimes()
    post = Postprocessor(config.postprocess)
    images = images if backend.uses_slots else None
    inputs = ShardInputs(shard, config, backend.inputs, post.needs, times, images)
    writer = PartWriter(config.output_url, shard.part_name, config.storage, spool_dir=spool_dir)

    def write_outputs(kept: pa.Table, outputs: Batch, rows: int) -> None:
        table = output_table(kept, outputs, rows, post)
        t0 = time.perf_counter()
        writer.write(table)
        times.write += time.perf_counter() - t0

    count = 0
    try:
        if not backend.uses_slots:
            count = _run_sync(backend, inputs.pieces, write_outputs, config, times)
        elif slots is not None:
            count = _run_on_slots(shard, config, slots, inputs, write_outputs, times, images)
        else:
            with SlotPool(backend, config.slots, config.batch_size,
                          config.concurrent_batches) as pool:
                count = _run_on_slots(shard, config, pool, inputs, write_outputs, times, images)
        inputs.check_rows(writer.rows)
        t0 = time.perf_counter()
        size = writer.commit()
        times.commit = time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    finally:
        inputs.close()
    times.total = time.perf_counter() - started
    return ShardResult(shard_id=shard.id, rows=writer.rows, part_url=writer.url, part_bytes=size,
                       batches=count, worker=worker, times=times,
                       rows_failed=inputs.rows_failed, row_failures=inputs.failures,
                       started_at=started_at, committed_at=time.time())
