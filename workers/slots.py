"""The GPU path: K device slots shared by an actor's shards, and the loop that keeps them busy.

While the GPU copies and executes the batches in the slots, the host reads and converts the
next batch and writes finished ones.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from workers.backends.base import Backend, Batch, DeviceSlot
from workers.batching import Shapes, TokenBudget
from workers.gputime import BusyTime, busy_seconds
from workers.rowgroups import Piece, ReadPool
from workers.types import StageTimes, WorkerConfig

#: Batches' outputs queued for the writing thread before the submitting thread waits for one.
WRITES_AHEAD = 4


class DeviceFill(Protocol):
    """Writes some inputs of a batch straight into a slot's device buffers (`workers.gpuimages`).

    Their feeds are whatever the fill understands (one object per row); `run_slots` hands it a
    batch's parts of each such input instead of copying them into the slot's pinned buffers.
    """

    inputs: frozenset[str]

    def fill(self, slot: DeviceSlot, name: str, parts: Sequence[np.ndarray], rows: int) -> None:
        """Enqueue, on `slot.stream`, the writes of input `name`'s `rows` rows (and its padding)."""


class SlotPool:
    """K device slots for batches of up to `max_rows` rows: opened once, reused for every shard.

    Buffers are sized for the largest batch, so a shard's last, shorter batch uses the same ones.
    With a `budget` (text), the model's token inputs have a width of their own per batch: the
    slots are sized for the largest of the budget's batches, and every batch runs at its own
    shape (no row padding, no width padding past its longest row).

    At most `concurrent` batches execute on the GPU at once: each submitted batch's execution
    waits on the GPU for the end of the one submitted `concurrent` batches before it, while its
    copy-in overlaps them. Two batches alternating keep a large model's GPU as busy as it gets
    (the next one's first kernels fill the last one's tail); letting every slot execute at once
    slows each batch down and delays the oldest, whose completion the host waits for to refill
    its slot. Small models whose batch leaves the GPU idle may gain from `concurrent` = K.
    """

    def __init__(self, backend: Backend, count: int, max_rows: int, concurrent: int = 2,
                 budget: TokenBudget | None = None) -> None:
        if count < 1:
            raise ValueError(f"SlotPool needs at least one slot, got {count}")
        if concurrent < 1:
            raise ValueError(f"SlotPool needs concurrent >= 1 (batches executing at once), "
                             f"got {concurrent}")
        self.max_rows = max_rows
        self.concurrent = concurrent
        #: Text: every input's shape in the largest batches (slots are sized for these), and
        #: the batches warm-up runs; None: one shape, `max_rows` rows of the inputs' rows.
        self.shapes: list[Shapes] | None = None
        self._warm_shapes: list[Shapes] = []
        if budget is not None and any(m.row_size is None for m in backend.inputs):
            self.shapes = budget.shapes(backend.inputs)
            self._warm_shapes = budget.shapes(backend.inputs, budget.warm_up())
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
                self.slots.append(backend.open_slot(max_rows) if self.shapes is None
                                  else backend.open_slot(max_rows, self.shapes))
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

    @staticmethod
    def fits(backend: Backend, budget: TokenBudget | None) -> bool:
        """True when slots can be sized for `backend`'s inputs: fixed rows, or token inputs
        whose widths `budget` bounds."""
        return all(m.row_size is not None or (budget is not None and m.name in budget.inputs)
                   for m in backend.inputs)

    @classmethod
    def for_job(cls, backend: Backend, config: WorkerConfig, budget: TokenBudget | None
                ) -> SlotPool:
        """The pool a job's config asks for (`fits` must hold)."""
        return cls(backend, config.slots, config.batch_size, config.concurrent_batches, budget)

    def warm_up(self) -> float:
        """Run one full batch of zeros through each slot in turn; returns the seconds it took.

        The first execution on a slot pays one-time costs (ONNX Runtime's cuDNN algorithm
        search and arena growth, TensorRT's lazy module loading) that would otherwise stall the
        first shard's first batches. Every batch the pipeline submits has `max_rows` rows (a
        short last batch is padded), so this is the only shape a slot ever plans for; with a
        token budget, the widest batch and the one of the most tokens (the arena then holds
        the largest at once). One slot at a time: the algorithm search times its candidates on
        the GPU, and slots searching at once would time them against each other's kernels.
        Call it before any shard takes the slots.
        """
        t0 = time.perf_counter()
        for slot in self.slots:
            if self.shapes is None:
                for host in slot.host_inputs.values():
                    host.fill(0)
                slot.submit(self.max_rows)
                slot.wait()
                continue
            for shapes in self._warm_shapes:
                for name, shape in shapes.items():
                    slot.input_view(name, shape).fill(0)
                slot.submit(next(iter(shapes.values()))[0], shapes=shapes)
                slot.wait()
        return time.perf_counter() - t0

    def submit(self, slot: DeviceSlot, rows: int, shapes: Shapes | None = None) -> None:
        """Submit `rows` of `slot` (at `shapes`), its execution after the batch `concurrent`
        submissions back."""
        with self._submit_lock:
            gate = self._recent[0] if len(self._recent) == self.concurrent else None
            after = None if gate is None or gate is slot else gate.executed
            if shapes is None:
                slot.submit(rows, after=after)
            else:
                slot.submit(rows, after=after, shapes=shapes)
            self._recent.append(slot)
            self.in_flight += 1

    def release(self, slot: DeviceSlot) -> None:
        """Give back a slot whose submitted batch was collected."""
        # Both under the submit lock: a shard that takes this slot from `free` submits on it
        # (and counts it again) only after the count dropped here. Counted the other way round,
        # `in_flight` could exceed the slots, and the shard holding them all would wait in
        # `run_slots` for another shard's slot that was not there (a deadlock at a shard
        # boundary; tests/workers/test_pipeline.py's text shards tokenizing ahead found it).
        with self._submit_lock:
            self.free.put(slot)
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


def run_slots(pool: SlotPool, batches: Iterator[list[Piece]],
               write_outputs: Callable[[pa.Table, Batch, int], None], times: StageTimes,
               started: float, submitted_all: Callable[[], None], ticket: int = -1,
               device_fill: DeviceFill | None = None) -> int:
    """The GPU path: keep every slot of `pool` busy; collect batches in submission order.

    `batches` comes from a producer thread (reading and converting); this thread only copies
    into pinned memory (or, for `device_fill`'s inputs, has it write the device buffers),
    submits, waits and hands finished batches to the writing thread.
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
        # Batches handed to the writing thread, oldest first: this thread waits on the oldest
        # only when `WRITES_AHEAD` are queued, so a slow write (a part's row group flushing)
        # does not hold up the next submission while the GPU drains.
        pending: deque[Future[None]] = deque()

        def collect() -> None:
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
            while len(pending) >= WRITES_AHEAD or (pending and pending[0].done()):
                pending.popleft().result()
            pending.append(behind.submit(write_outputs, kept, outputs, rows))

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
                    # Looked at again every so often, so this can never wait on a count that
                    # is out of date.
                    try:
                        return pool.free.get(timeout=0.05)
                    except queue.Empty:
                        continue
                if pool.free.empty():
                    collect()

        try:
            for pieces in batches:
                slot = take()
                t0 = time.perf_counter()
                rows = 0
                on_device: dict[str, list[np.ndarray]] = {}
                try:
                    shapes = None if pool.shapes is None else batch_shapes(pieces)
                    for feeds, kept in pieces:
                        n = kept.num_rows
                        for name, array in feeds.items():
                            if device_fill is not None and name in device_fill.inputs:
                                on_device.setdefault(name, []).append(array)
                                continue
                            host = (slot.host_inputs[name] if shapes is None
                                    else slot.input_view(name, shapes[name]))
                            np.copyto(host[rows:rows + n], array)
                        rows += n
                    if shapes is not None:
                        # Text: the batch runs at its own shape (its rows, its longest row).
                        t1 = time.perf_counter()
                        fill += t1 - t0
                        pool.submit(slot, rows, shapes)
                    else:
                        if rows < slot.max_rows:
                            # Pad a short (last) batch to the slot's full size: every batch then
                            # has one shape, so ONNX Runtime/cuDNN never re-plans for a new
                            # batch size and a fixed-batch TensorRT profile fits. Rows are
                            # independent; the padding's outputs are dropped in `collect`.
                            for host in slot.host_inputs.values():
                                host[rows:].fill(0)
                        for name, parts in on_device.items():
                            assert device_fill is not None
                            device_fill.fill(slot, name, parts, rows)
                        t1 = time.perf_counter()
                        fill += t1 - t0
                        pool.submit(slot, slot.max_rows)
                except BaseException:
                    slot.filled_inputs = frozenset()  # nothing of this batch was submitted
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
            while pending:
                pending.popleft().result()
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


def batch_shapes(pieces: list[Piece]) -> Shapes:
    """Every input's shape in the batch these pieces make (their rows, the first's row shape)."""
    rows = sum(kept.num_rows for _, kept in pieces)
    return {name: (rows, *array.shape[1:]) for name, array in pieces[0][0].items()}
