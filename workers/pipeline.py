"""One shard, start to commit: a short composition of the actor's parts.

`workers.sources` reads and converts the shard's rows, `workers.batching` cuts them into
batches (text: sorted by length within a window, cut to a token budget, and put back in input
order before writing), the engine runs them (synchronously on the CPU path below, K in flight
on the GPU path in `workers.slots`), `workers.outputs` builds each batch's output table, and
`workers.commit` writes the part and commits it only when complete.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from workers.backends.base import Backend, Batch
from workers.batching import InputOrder, TokenBudget, exact_batches, length_batches, token_budget
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
    from workers.helpers import HelperProcesses

__all__ = ["MAX_ROW_FAILURES", "SlotPool", "process_shard"]

WriteOutputs = Callable[[pa.Table, Batch, int], None]


def _as_piece(table: pa.Table) -> Piece:
    """The reading threads' step: none (conversion happens in order, on the converting thread)."""
    return {}, table


@contextlib.contextmanager
def _batches(pieces: Callable[[], Iterator[Piece]], inputs: ShardInputs,
             budget: TokenBudget | None, config: WorkerConfig) -> Iterator[Iterator[list[Piece]]]:
    """The shard's batches, its pieces made on a background thread while the engine runs.

    Text batches are also cut there (sorting a window and gathering its rows is real work);
    exact batches are views of the pieces, cut on the consuming thread.
    """
    if budget is None:
        with Prefetcher(pieces, config.prefetch) as ahead:
            yield exact_batches(iter(ahead), config.batch_size)
    else:
        pads = inputs.prep.token_pads
        # Tokenizing runs on its own thread, up to two sort windows ahead: were it the thread
        # that sorts and cuts, it would tokenize the next window only once the engine had
        # taken this window's batches, and tokenizing and the engine would take turns.
        with Prefetcher(pieces, converted_ahead(budget, inputs.step)) as converted, \
                Prefetcher(lambda: length_batches(iter(converted), budget, pads),
                           config.prefetch) as ahead:
            yield iter(ahead)


def converted_ahead(budget: TokenBudget, step: int) -> int:
    """Converted text pieces (of `step` rows) kept ahead of the sorting: two windows' worth."""
    return max(2, -(-2 * budget.window // max(1, step)))


def _joined(pieces: list[Piece]) -> tuple[Batch, pa.Table]:
    """One batch's pieces as one set of inputs and one table of kept columns."""
    if len(pieces) == 1:
        return pieces[0]
    feeds = {name: np.concatenate([f[name] for f, _ in pieces]) for name in pieces[0][0]}
    return feeds, pa.concat_tables([kept for _, kept in pieces])


def _run_sync(backend: Backend, batches: Iterator[list[Piece]], write_outputs: WriteOutputs,
              times: StageTimes) -> int:
    """The CPU path: infer each batch in turn while the next is read and the last is written."""
    count = 0
    with ThreadPoolExecutor(1, thread_name_prefix="write") as behind:
        pending: Future[None] | None = None
        for pieces in batches:
            feeds, kept = _joined(pieces)
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
                  budget: TokenBudget | None, write_outputs: WriteOutputs,
                  times: StageTimes, images: GpuImages | None) -> int:
    """The GPU path: this shard's batches through `pool`, in its turn among the actor's shards."""
    ticket = pool.ticket()

    def run(batches: Iterator[list[Piece]]) -> int:
        return run_slots(pool, batches, write_outputs, times, time.perf_counter(),
                         lambda: pool.done(ticket), ticket, images)

    try:
        if shard.files:  # image files: one reading thread fetches them concurrently
            with pool.turn(ticket), _batches(inputs.pieces, inputs, budget, config) as batches:
                return run(batches)
        # Reading starts now, on the threads the shard holding the slots leaves idle, so this
        # shard's batches are ready when its turn comes.
        reader = RowGroupReader(shard, config.columns, _as_piece, config.readers,
                                config.prefetch, config.storage,
                                pool=pool.read_pool(config.readers), priority=ticket,
                                max_row_group_bytes=config.max_row_group_bytes)
        pieces = functools.partial(inputs.row_group_pieces, reader)
        if budget is not None:
            # Text: tokenizing starts now too (it needs no slot), so this shard's first
            # windows are sorted and cut when its turn comes; the GPU does not wait for them.
            with reader, _batches(pieces, inputs, budget, config) as batches, \
                    pool.turn(ticket):
                return run(batches)
        with reader, pool.turn(ticket), _batches(pieces, inputs, budget, config) as batches:
            return run(batches)
    finally:
        pool.done(ticket)


def process_shard(shard: Shard, config: WorkerConfig, backend: Backend, worker: str = "",
                  slots: SlotPool | None = None, images: GpuImages | None = None,
                  spool_dir: str | None = None, processes: HelperProcesses | None = None,
                  on_rows: Callable[[int], None] | None = None) -> ShardResult:
    """Run one shard through `backend` and commit its part; raises on any failure, committing nothing.

    A backend with `uses_slots` runs with `config.slots` batches in flight, in `slots` when given
    (an actor keeps one pool for all its shards) or in a pool opened for this shard. `images`
    (GPU path only): the actor's GPU image decoding, for the image inputs it decodes.
    `spool_dir`: the actor's private spool for parts bound for an object store (see PartWriter).
    `processes`: the actor's Pillow decoding processes, kept across shards (else the shard's own).
    `on_rows(n)` is called on the writing thread after each batch's `n` output rows are written
    (to the part's temporary file: they count as done only once the part commits).
    """
    started, started_at = time.perf_counter(), time.time()
    times = StageTimes()
    post = Postprocessor(config.postprocess)
    images = images if backend.uses_slots else None
    inputs = ShardInputs(shard, config, backend.inputs, post.needs, times, images, processes)
    writer = PartWriter(config.output_url, shard.part_name, config.storage, spool_dir=spool_dir)
    budget = token_budget(config, backend.inputs, gpu=backend.uses_slots)
    # Sorted batches are written back in input order.
    sink = InputOrder(writer.write) if budget is not None else None

    def write_outputs(kept: pa.Table, outputs: Batch, rows: int) -> None:
        table = output_table(kept, outputs, rows, post)
        t0 = time.perf_counter()
        (sink or writer.write)(table)
        times.write += time.perf_counter() - t0
        if on_rows is not None:
            on_rows(table.num_rows)

    count = 0
    try:
        if slots is None and backend.uses_slots and SlotPool.fits(backend, budget):
            with SlotPool.for_job(backend, config, budget) as pool:
                count = _run_on_slots(shard, config, pool, inputs, budget, write_outputs, times,
                                      images)
        elif slots is not None:
            count = _run_on_slots(shard, config, slots, inputs, budget, write_outputs, times,
                                  images)
        else:
            with _batches(inputs.pieces, inputs, budget, config) as batches:
                count = _run_sync(backend, batches, write_outputs, times)
        if sink is not None:
            sink.close()
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
