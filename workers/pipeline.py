"""One shard, start to commit: read and convert ahead on a thread, infer, write behind on a thread.

On a backend that runs on a GPU stream (`backend.uses_slots`), K batches are in flight at once,
each in its own device slot (stream, pinned host and device buffers): while the GPU copies and
executes them, the host reads and converts the next batch and writes finished ones.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa

from workers.backends.base import Backend, Batch, DeviceSlot
from workers.commit import PartWriter
from workers.errors import DataError
from workers.images import read_image_files
from workers.postprocess import Postprocessor
from workers.preprocess import Preprocessor, tensor_preps
from workers.reader import read_batches
from workers.rowgroups import Piece, ReadPool, RowGroupReader, exact_batches
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


#: Kept columns named with this prefix carry model inputs a postprocessor reads (the attention
#: mask) alongside their rows, through either inference path; they never reach the part.
CARRY_PREFIX = "__input__:"


def carry_inputs(kept: pa.Table, feeds: Batch, names: tuple[str, ...]) -> pa.Table:
    """`kept` plus the model inputs `names` as hidden tensor columns (see `CARRY_PREFIX`)."""
    for name in names:
        if name in feeds:
            kept = kept.append_column(f"{CARRY_PREFIX}{name}",
                                      pa.FixedShapeTensorArray.from_numpy_ndarray(feeds[name]))
    return kept


def output_table(kept: pa.Table, outputs: Batch, rows: int,
                 post: Postprocessor | None = None) -> pa.Table:
    """Kept columns followed by the postprocessors' columns (default: one per model output)."""
    carried = [name for name in kept.column_names if name.startswith(CARRY_PREFIX)]
    inputs = {name[len(CARRY_PREFIX):]: kept.column(name).combine_chunks().to_numpy_ndarray()
              for name in carried}
    kept = kept.drop_columns(carried)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise DataError(f"model output '{name}' has {array.shape[0] if array.ndim else 0} rows "
                            f"for a batch of {rows}; the model must keep the batch dimension")
    columns = dict(zip(kept.column_names, kept.columns, strict=True))
    for name, array in (post or Postprocessor(())).__call__(outputs, inputs, rows).items():
        if name in columns:
            raise DataError(f"postprocessor column '{name}' has the name of a kept column; "
                            "keep a different column or give the postprocessor a prefix")
        columns[name] = array
    return pa.table(columns)


class SlotPool:
    """K device slots for batches of up to `max_rows` rows: opened once, reused for every shard.

    Buffers are sized for the largest batch, so a shard's last, shorter batch uses the same ones.

    At most `concurrent` batches execute on the GPU at once: each submitted batch's execution
    waits on the GPU for the end of the one submitted `concurrent` batches before it, while its
    copy-in overlaps them. Two batches alternating keep a large model's GPU as busy as it gets
    (the next one's first kernels fill the last one's tail); letting every slot execute at once
    slows each batch down and delays the oldest, whose completion the host waits for to refill
    its slot. Small models whose batch leaves the GPU idle may gain from `concurrent` = K.
    """

    def __init__(self, backend: Backend, count: int, max_rows: int, concurrent: int = 2) -> None:
        if count < 1:
            raise ValueError(f"SlotPool needs at least one slot, got {count}")
        if concurrent < 1:
            raise ValueError(f"SlotPool needs concurrent >= 1 (batches executing at once), "
                             f"got {concurrent}")
        self.max_rows = max_rows
        self.concurrent = concurrent
        # The slots of the last `concurrent` submissions, oldest first (for `submit`).
        self._recent: deque[DeviceSlot] = deque(maxlen=concurrent)
        self._submit_lock = threading.Lock()
        #: Batches submitted through `submit` and not yet `release`d, over every shard.
        self.in_flight = 0
        self.slots: list[DeviceSlot] = []
        #: Slots no batch is using; a shard takes one per batch and puts it back once collected.
        self.free: queue.Queue[DeviceSlot] = queue.Queue()
        self.timed = False
        # Shards take turns on the slots in ticket order, so a shard that arrives while another
        # runs (an actor with two calls in flight) reads ahead, then starts the moment it ends.
        self._turns = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._forfeited: set[int] = set()
        self._read_pool: ReadPool | None = None
        try:
            for _ in range(count):
                self.slots.append(backend.open_slot(max_rows))
                self.free.put(self.slots[-1])
            self.timed = all(slot.timer is not None for slot in self.slots)
            #: Origin of every batch's execution span (None: untimed slots), and the union of
            #: the spans of every shard: the time the GPU had at least one batch executing.
            self.clock = self._new_clock()
            self.busy = BusyTime()
            #: Set to a list to record every batch: (ticket, host seconds at submit and at
            #: collect, GPU execution start and end), host times from `clock_host`, GPU times
            #: from `clock`. For benchmarks; None (off) by default.
            self.trace: list[tuple[int, float, float, float, float]] | None = None
            self.clock_host = time.perf_counter()
        except BaseException:
            self.close()
            raise

    def warm_up(self) -> float:
        """Run one full batch of zeros through each slot in turn; returns the seconds it took.

        The first execution on a slot pays one-time costs (ONNX Runtime's cuDNN algorithm
        search and arena growth, TensorRT's lazy module loading) that would otherwise stall the
        first shard's first batches. Every batch the pipeline submits has `max_rows` rows (a
        short last batch is padded), so this is the only shape a slot ever plans for. One slot
        at a time: the algorithm search times its candidates on the GPU, and slots searching at
        once would time them against each other's kernels. Call it before any shard takes the
        slots.
        """
        t0 = time.perf_counter()
        for slot in self.slots:
            for host in slot.host_inputs.values():
                host.fill(0)
            slot.submit(self.max_rows)
            slot.wait()
        return time.perf_counter() - t0

    def submit(self, slot: DeviceSlot, rows: int) -> None:
        """Submit `rows` of `slot`, its execution after the batch `concurrent` submissions back."""
        with self._submit_lock:
            gate = self._recent[0] if len(self._recent) == self.concurrent else None
            slot.submit(rows, after=None if gate is None or gate is slot else gate.executed)
            self._recent.append(slot)
            self.in_flight += 1

    def release(self, slot: DeviceSlot) -> None:
        """Give back a slot whose submitted batch was collected."""
        # Put first: a shard that sees the count drop must find the slot (see `_run_slots`).
        self.free.put(slot)
        with self._submit_lock:
            self.in_flight -= 1

    def ticket(self) -> int:
        """A place in the queue for the slots; every ticket must end in `done`."""
        with self._turns:
            self._next_ticket += 1
            return self._next_ticket - 1

    @contextlib.contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        """Wait until every earlier ticket is done, then hold the slots until the block ends."""
        with self._turns:
            self._turns.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            self.done(ticket)

    def done(self, ticket: int) -> None:
        """Give up `ticket` (its shard finished or failed); idempotent."""
        with self._turns:
            if ticket < self._serving:
                return
            self._forfeited.add(ticket)
            while self._serving in self._forfeited:
                self._forfeited.remove(self._serving)
                self._serving += 1
            self._turns.notify_all()

    def _new_clock(self) -> Any:
        """A timing event recorded now, the origin of execution spans (None untimed)."""
        if not self.timed:
            return None
        from workers import cuda

        clock = cuda.Event(timing=True)
        clock.record(0)  # the legacy stream: recorded as soon as the GPU reaches it, i.e. now
        return clock

    def read_pool(self, threads: int) -> ReadPool:
        """The reading threads every shard on these slots shares (made on first use)."""
        with self._turns:
            if self._read_pool is None:
                self._read_pool = ReadPool(threads)
            return self._read_pool

    def close(self) -> None:
        """Close every slot (each waits for its stream first) and the reading threads."""
        errors: list[BaseException] = []
        if self._read_pool is not None:
            self._read_pool.close()
            self._read_pool = None
        clock, self.clock = getattr(self, "clock", None), None
        if clock is not None:
            clock.close()
        while self.slots:
            try:
                self.slots.pop().close()
            except Exception as exc:  # close the rest, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> SlotPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_piece(table: pa.Table) -> Piece:
    """The reading threads' step: none (conversion happens in order, on the converting thread)."""
    return {}, table


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of `[start, end)` spans: time at least one batch was executing."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class BusyTime:
    """The union length of `[start, end)` spans added over a long run, in bounded memory.

    Spans arrive about in time order (batches are collected within seconds of each other), so
    merged intervals that ended `horizon` seconds before the latest start are folded into a
    total and forgotten.
    """

    def __init__(self, horizon: float = 60.0, keep: int = 256) -> None:
        self.horizon = horizon
        self.keep = keep
        self._lock = threading.Lock()
        self._settled = 0.0
        self._open: list[tuple[float, float]] = []
        self._latest = float("-inf")
        # Settle again once the list doubles: amortized O(log n) per span even when many spans
        # stay within the horizon (small batches with gaps between them).
        self._limit = keep

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._open.append((start, end))
            self._latest = max(self._latest, start)
            if len(self._open) > self._limit:
                self._settle()
                self._limit = max(self.keep, 2 * len(self._open))

    def _settle(self) -> None:
        merged: list[tuple[float, float]] = []
        for start, end in sorted(self._open):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        cutoff = self._latest - self.horizon
        self._settled += sum(end - start for start, end in merged if end < cutoff)
        self._open = [span for span in merged if span[1] >= cutoff]

    @property
    def seconds(self) -> float:
        with self._lock:
            return self._settled + busy_seconds(self._open)

    @property
    def pending(self) -> int:
        """Spans held unmerged (for tests: memory stays bounded)."""
        return len(self._open)


Batches = Callable[[], Iterator[tuple[Batch, pa.Table]]]


def _run_sync(backend: Backend, batches: Batches,
              write_outputs: Callable[[pa.Table, Batch, int], None], config: WorkerConfig,
              times: StageTimes) -> int:
    """The CPU path: infer each batch in turn while the next is read and the last is written."""
    count = 0
    with Prefetcher(batches, config.prefetch) as ahead, \
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


def _run_slots(pool: SlotPool, batches: Iterator[list[Piece]],
               write_outputs: Callable[[pa.Table, Batch, int], None], times: StageTimes,
               started: float, submitted_all: Callable[[], None], ticket: int = -1) -> int:
    """The GPU path: keep every slot of `pool` busy; collect batches in submission order.

    `batches` comes from a producer thread (reading and converting); this thread only copies
    into pinned memory, submits, waits and hands finished batches to the writing thread.
    Slots come from the pool's free queue: after its last submission the shard calls
    `submitted_all` (ending its turn), and the next shard fills each slot this one collects
    while its last batches still run, so the GPU does not drain between shards.
    """
    in_flight: deque[tuple[DeviceSlot, pa.Table, int, float]] = deque()
    spans: list[tuple[float, float]] = []
    count = 0
    fill = 0.0
    clock = pool.clock

    with ThreadPoolExecutor(1, thread_name_prefix="write") as behind:
        pending: Future[None] | None = None

        def collect() -> None:
            nonlocal pending
            slot, kept, rows, submitted_at = in_flight.popleft()
            try:
                t0 = time.perf_counter()
                views = slot.wait()
                times.infer += time.perf_counter() - t0
                for stage, seconds in slot.stage_seconds().items():
                    setattr(times, stage, getattr(times, stage) + seconds)
                if clock is not None:
                    span = slot.timer.compute_span(clock)
                    spans.append(span)
                    pool.busy.add(*span)
                    if pool.trace is not None:
                        pool.trace.append((ticket, submitted_at - pool.clock_host,
                                           time.perf_counter() - pool.clock_host, *span))
                # The views alias the slot's pinned buffers, which its next batch overwrites.
                outputs = {name: np.array(view[:rows]) for name, view in views.items()}
            finally:
                pool.release(slot)
            if pending is not None:
                pending.result()
            pending = behind.submit(write_outputs, kept, outputs, rows)

        def take() -> DeviceSlot:
            while True:
                try:
                    return pool.free.get_nowait()
                except queue.Empty:
                    pass
                if not in_flight or pool.in_flight > len(in_flight):
                    # The previous shard's last batches, submitted before any of ours, hold the
                    # other slots: the first of them to finish frees one, sooner than our own
                    # oldest would (waiting on ours left the GPU idle at each shard boundary).
                    return pool.free.get()
                if pool.free.empty():
                    collect()

        try:
            for pieces in batches:
                slot = take()
                t0 = time.perf_counter()
                rows = 0
                try:
                    for feeds, kept in pieces:
                        n = kept.num_rows
                        for name, array in feeds.items():
                            np.copyto(slot.host_inputs[name][rows:rows + n], array)
                        rows += n
                    if rows < slot.max_rows:
                        # Pad a short (last) batch to the slot's full size: every batch then has
                        # one shape, so ONNX Runtime/cuDNN never re-plans for a new batch size
                        # and a fixed-batch TensorRT profile fits. Rows are independent; the
                        # padding's outputs are dropped in `collect`.
                        for host in slot.host_inputs.values():
                            host[rows:].fill(0)
                    t1 = time.perf_counter()
                    fill += t1 - t0
                    pool.submit(slot, slot.max_rows)
                except BaseException:
                    pool.free.put(slot)
                    raise
                if not count:
                    times.first_batch = t1 - started
                submitted = time.perf_counter() - t1
                times.submit += submitted
                times.infer += submitted
                kept = pieces[0][1] if len(pieces) == 1 else \
                    pa.concat_tables([kept for _, kept in pieces])
                in_flight.append((slot, kept, rows, t1))
                count += 1
            submitted_all()
            while in_flight:
                collect()
            if pending is not None:
                pending.result()
            # Copying into pinned memory counts as conversion; added once the producer, which
            # adds its own conversion time, has finished.
            times.convert += fill
        finally:
            # After a failure, leave no batch in flight: the pool's slots serve the next shard.
            while in_flight:
                slot = in_flight.popleft()[0]
                # The failure already propagating is the one to report.
                with contextlib.suppress(Exception):
                    slot.wait()
                pool.release(slot)
    times.gpu_busy += busy_seconds(spans)
    return count


def process_shard(shard: Shard, config: WorkerConfig, backend: Backend, worker: str = "",
                  slots: SlotPool | None = None, spool_dir: str | None = None) -> ShardResult:
    """Run one shard through `backend` and commit its part; raises on any failure, committing nothing.

    A backend with `uses_slots` runs with `config.slots` batches in flight, in `slots` when given
    (an actor keeps one pool for all its shards) or in a pool opened for this shard.
    `spool_dir`: the actor's private spool for parts bound for an object store (see PartWriter).
    """
    started = time.perf_counter()
    times = StageTimes()
    metas = {meta.name: meta for meta in backend.inputs}
    prep = Preprocessor(config.preprocess or tensor_preps(config.bindings), metas,
                        config.preprocess_threads)
    post = Postprocessor(config.postprocess)
    failures: list[dict[str, Any]] = []
    failures_lock = threading.Lock()
    rows_failed = 0

    def convert(table: pa.Table) -> Piece:
        """Model inputs and kept columns of a table; both paths convert through here.

        Rows a preprocessor failed (bad images, with on_error=skip) are dropped from both and
        recorded with their kept columns' values, which identify them.
        """
        nonlocal rows_failed
        prepared = prep(table)
        kept = table.select(list(config.keep))
        if prepared.failed:
            records = [{"key": _key(kept, row), "column": column, "reason": reason}
                       for row, (column, reason) in sorted(prepared.failed.items())]
            with failures_lock:
                rows_failed += len(records)
                failures.extend(records[:max(0, MAX_ROW_FAILURES - len(failures))])
            kept = kept.take(pa.array(prepared.good_rows()))
        return prepared.feeds, carry_inputs(kept, prepared.feeds, post.needs)

    def batches() -> Iterator[tuple[Batch, pa.Table]]:
        tables = (read_image_files(shard, config.columns, config.batch_size, config.storage)
                  if shard.files else
                  read_batches(shard, config.columns, config.batch_size, config.storage,
                               max_row_group_bytes=config.max_row_group_bytes))
        while True:
            t0 = time.perf_counter()
            table = next(tables, None)
            t1 = time.perf_counter()
            times.read += t1 - t0
            if table is None:
                return
            piece = convert(table)
            times.convert += time.perf_counter() - t1
            if piece[1].num_rows:  # every row of the table failed: nothing to infer
                yield piece

    def write(table: pa.Table) -> None:
        t0 = time.perf_counter()
        writer.write(table)
        times.write += time.perf_counter() - t0

    def write_outputs(kept: pa.Table, outputs: Batch, rows: int) -> None:
        write(output_table(kept, outputs, rows, post))

    def row_groups(reader: RowGroupReader) -> Iterator[Piece]:
        # Row groups decode in parallel; conversion runs here, on one thread and in order, so
        # its side effects (skipped rows' records) keep the shard's order.
        for _, table, read_seconds, _ in reader:
            times.read += read_seconds
            # Decoded images and token arrays are many times their column's size: convert those
            # a batch at a time, so a large row group never lives decoded all at once.
            step = config.batch_size if prep.expands else max(1, table.num_rows)
            for start in range(0, table.num_rows, step):
                t0 = time.perf_counter()
                piece = convert(table.slice(start, step))
                times.convert += time.perf_counter() - t0
                if piece[1].num_rows:  # every row of the table failed: nothing to infer
                    yield piece

    writer = PartWriter(config.output_url, shard.part_name, config.storage, spool_dir=spool_dir)
    count = 0
    try:
        if backend.uses_slots:
            pool = slots if slots is not None else SlotPool(backend, config.slots,
                                                            config.batch_size,
                                                            config.concurrent_batches)
            ticket = pool.ticket()
            try:
                if shard.files:  # image files: one reading thread fetches them concurrently
                    with pool.turn(ticket), Prefetcher(batches, config.prefetch) as ahead:
                        count = _run_slots(pool, exact_batches(iter(ahead), config.batch_size),
                                           write_outputs, times, time.perf_counter(),
                                           lambda: pool.done(ticket), ticket)
                else:
                    # Reading starts now, on the threads the shard holding the slots leaves
                    # idle, so this shard's batches are ready when its turn comes.
                    reader = RowGroupReader(shard, config.columns, _as_piece, config.readers,
                                            config.prefetch, config.storage,
                                            pool=pool.read_pool(config.readers), priority=ticket,
                                            max_row_group_bytes=config.max_row_group_bytes)
                    with reader, pool.turn(ticket), \
                            Prefetcher(lambda: row_groups(reader), config.prefetch) as ahead:
                        count = _run_slots(pool, exact_batches(iter(ahead), config.batch_size),
                                           write_outputs, times, time.perf_counter(),
                                           lambda: pool.done(ticket), ticket)
            finally:
                pool.done(ticket)
                if slots is None:
                    pool.close()
        else:
            count = _run_sync(backend, batches, write_outputs, config, times)
        if rows_failed and not writer.rows:
            first = failures[0]
            raise DataError(f"every row of {shard.describe()} failed preprocessing (column "
                            f"'{first['column']}': {first['reason']}); check the column and "
                            "the preprocessor's settings")
        # Rows that failed preprocessing are not in the part (the manifest lists them).
        if writer.rows + rows_failed != shard.rows:
            raise DataError(f"{shard.describe()} gave {writer.rows} rows"
                            + (f" and {rows_failed} failed row(s)" if rows_failed else "")
                            + f", its footer says {shard.rows}; the file may have changed or "
                            "be corrupt")
        t0 = time.perf_counter()
        size = writer.commit()
        times.commit = time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    finally:
        prep.close()
    times.total = time.perf_counter() - started
    return ShardResult(shard_id=shard.id, rows=writer.rows, part_url=writer.url, part_bytes=size,
                       batches=count, worker=worker, times=times, rows_failed=rows_failed,
                       row_failures=failures)


#: Failed rows listed per shard in the manifest; the count of all of them is always exact.
MAX_ROW_FAILURES = 1000


def _key(kept: pa.Table, row: int) -> dict[str, Any]:
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
