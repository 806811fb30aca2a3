"""The shard pipeline: CPU path, and the K-slots-in-flight GPU path driven by a CPU slot backend.

`ThreadSlotBackend` runs real ONNX Runtime (CPU) inference behind the `DeviceSlot` interface:
each slot owns preallocated host input and output buffers and runs its batch on its own thread,
so batches finish out of order and the pipeline's in-order collection, buffer reuse and partial
last batch are exercised with real numbers, without a GPU. Opened with `shapes` (text models),
a slot's input buffers are flat and sized for the largest of them, and every batch runs at the
shape it was submitted with, as the GPU slots do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.models import two_input_model, write_dataset
from workers.backends.base import BackendConfig, Batch, DeviceSlot, Shapes
from workers.backends.onnxruntime import OnnxRuntimeBackend
from workers.errors import BackendError, DataError
from workers.gputime import BusyTime, busy_seconds
from workers.pipeline import process_shard
from workers.slots import SlotPool
from workers.storage import file_version, filesystem
from workers.types import Shard, StageTimes, WorkerConfig


def whole_file_shard(path: str) -> Shard:
    fs, p = filesystem(path)
    info = fs.info(p)
    meta = pq.read_metadata(path)
    return Shard(url=fs.unstrip_protocol(p), size=int(info["size"]), version=file_version(info),
                 row_groups=(0, meta.num_row_groups), rows=meta.num_rows)


class ThreadSlot(DeviceSlot):
    """A slot whose batch runs on its own thread; finishes in whatever order the threads do."""

    def __init__(self, backend: ThreadSlotBackend, max_rows: int,
                 shapes: list[Shapes] | None = None) -> None:
        self.backend = backend
        self.max_rows = max_rows
        self.opened_for = shapes
        # Garbage in unused buffer space, so a batch that read past its own rows would show.
        if shapes is None:
            self.host_inputs = {m.name: np.full((max_rows, *m.row_shape), _junk(m.dtype),
                                                m.dtype) for m in backend.inputs}
        else:
            self.host_inputs = {m.name: np.full(max(int(np.prod(s[m.name])) for s in shapes),
                                                _junk(m.dtype), m.dtype) for m in backend.inputs}
        self.host_outputs: dict[str, np.ndarray] = (
            {m.name: np.full((max_rows, *m.row_shape), np.nan, m.dtype) for m in backend.outputs}
            if shapes is None else {})
        self._future: Future[int] | None = None
        self.submitted: list[int] = []
        self.filled: list[frozenset[str]] = []
        #: The shapes each batch was submitted with (None: the slot's fixed shape).
        self.shapes: list[Shapes | None] = []
        self.closed = False

    def _run(self, rows: int, shapes: Shapes | None, future: Future[int]) -> None:
        try:
            feeds = ({name: host[:rows].copy() for name, host in self.host_inputs.items()}
                     if shapes is None else
                     {name: self.input_view(name, shape).copy() for name, shape in shapes.items()})
            outputs = OnnxRuntimeBackend._infer(self.backend, feeds)
            if shapes is None:
                for name, value in outputs.items():
                    self.host_outputs[name][:rows] = value
            else:
                self.host_outputs = outputs
            future.set_result(rows)
        except BaseException as exc:
            future.set_exception(exc)

    def submit(self, rows: int, after: object = None, shapes: Shapes | None = None) -> None:
        assert self._future is None, "submit before the previous batch was collected"
        assert 0 < rows <= self.max_rows
        assert (shapes is None) == (self.opened_for is None), "a batch of the wrong kind"
        if shapes is not None:
            assert all(shape[0] == rows for shape in shapes.values())
        if self.backend.fail_at is not None and self.backend.submits == self.backend.fail_at:
            raise BackendError("injected failure")
        self.backend.submits += 1
        self.backend.submitters.append(threading.current_thread().name)
        # A device fill (tests/workers/test_preprocess.py's CpuFill) wrote these into the host
        # buffers this fake slot computes from; a real slot skips their copies.
        self.filled.append(self._take_filled())
        self.submitted.append(rows)
        self.shapes.append(dict(shapes) if shapes is not None else None)
        future: Future[int] = Future()
        threading.Thread(target=self._run, args=(rows, shapes, future)).start()
        self._future = future

    def wait(self) -> Batch:
        assert self._future is not None, "wait without a submitted batch"
        rows = self._future.result()
        self._future = None
        return {name: host[:rows] for name, host in self.host_outputs.items()}

    def close(self) -> None:
        self.closed = True


class ThreadSlotBackend(OnnxRuntimeBackend):
    """ONNX Runtime on the CPU, run through device slots."""

    name: ClassVar[str] = "thread-slots"
    supports_slots: ClassVar[bool] = True

    def __init__(self, model: bytes, fail_at: int | None = None) -> None:
        super().__init__(model, BackendConfig(device="cpu"))
        self.opened: list[ThreadSlot] = []
        self.submits = 0
        self.submitters: list[str] = []
        self.fail_at = fail_at

    @property
    def uses_slots(self) -> bool:
        return True

    def open_slot(self, max_rows: int, shapes: list[Shapes] | None = None) -> DeviceSlot:
        slot = ThreadSlot(self, max_rows, shapes)
        self.opened.append(slot)
        return slot

    def _infer(self, batch: Batch) -> Batch:
        raise AssertionError("the slot path must not call infer()")


def _junk(dtype: np.dtype) -> object:
    return np.nan if dtype.kind == "f" else np.iinfo(dtype).max


@pytest.fixture(scope="module")
def model() -> bytes:
    return two_input_model(seed=21)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """One file of 500 rows in row groups of 120: batches of 64 end with a partial one of 52."""
    write_dataset(str(tmp_path / "in"), files=1, rows_per_file=500, row_group_rows=120, seed=4)
    return tmp_path / "in" / "data-000.parquet"


def worker_config(out: Path, **kwargs: object) -> WorkerConfig:
    return WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
                        output_url=str(out), bindings=(("image", "img"), ("meta", "features")),
                        keep=("uid",), batch_size=64, **kwargs)  # type: ignore[arg-type]


def expected(model: bytes, path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    image = np.stack(table.column("img").combine_chunks().to_numpy_ndarray())
    meta = np.asarray(table.column("features").to_pylist(), dtype=np.float32)
    with OnnxRuntimeBackend(model, BackendConfig(device="cpu")) as backend:
        out = backend.infer({"image": image.astype(np.float32), "meta": meta})
    return {"uid": table.column("uid").to_numpy(), **out}


def check_part(part_url: str, want: dict[str, np.ndarray]) -> None:
    part = pq.read_table(part_url)
    np.testing.assert_array_equal(part.column("uid").to_numpy(), want["uid"])
    logits = np.stack(part.column("logits").combine_chunks().to_numpy_ndarray())
    np.testing.assert_allclose(logits, want["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(part.column("score").to_numpy(), want["score"].reshape(-1),
                               rtol=1e-5, atol=1e-4)


def test_cpu_path_unchanged(model: bytes, data: Path, tmp_path: Path) -> None:
    with OnnxRuntimeBackend(model, BackendConfig(device="cpu")) as backend:
        assert not backend.uses_slots
        result = process_shard(whole_file_shard(str(data)), worker_config(tmp_path / "out"),
                               backend)
    assert (result.rows, result.batches) == (500, 8)
    assert result.times.gpu_busy == 0 and result.times.h2d == 0
    check_part(result.part_url, expected(model, data))


@pytest.mark.parametrize(("slots", "readers"), [(1, 1), (2, 4), (3, 2)])
def test_slots_keep_order_reuse_buffers_and_run_partial_batch(
        model: bytes, data: Path, tmp_path: Path, slots: int, readers: int) -> None:
    backend = ThreadSlotBackend(model)
    with backend:
        result = process_shard(whole_file_shard(str(data)),
                               worker_config(tmp_path / "out", slots=slots, readers=readers),
                               backend)
    # K slots opened once, each used for several batches; the last batch holds 500 - 7 * 64
    # rows and is padded to the slot's 64 (one shape for every batch), its padding dropped.
    assert len(backend.opened) == slots
    assert all(slot.closed for slot in backend.opened)
    submitted = sorted(rows for slot in backend.opened for rows in slot.submitted)
    assert submitted == [64] * 8
    assert all(slot.submitted for slot in backend.opened)
    assert (result.rows, result.batches) == (500, 8)
    check_part(result.part_url, expected(model, data))


def test_pool_is_reused_across_shards(model: bytes, tmp_path: Path) -> None:
    paths = write_dataset(str(tmp_path / "in"), files=3, rows_per_file=150, row_group_rows=50,
                          seed=8)
    backend = ThreadSlotBackend(model)
    with backend, SlotPool(backend, 2, 64) as pool:
        for i, path in enumerate(paths):
            result = process_shard(whole_file_shard(path), worker_config(tmp_path / "out"),
                                   backend, slots=pool)
            check_part(result.part_url, expected(model, Path(path)))
            assert len(backend.opened) == 2, f"shard {i} opened new slots"
        assert not any(slot.closed for slot in backend.opened)
    assert all(slot.closed for slot in backend.opened)


def test_worker_load_opens_and_warms_every_slot_before_the_first_shard(
        model: bytes, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.actor

    backend = ThreadSlotBackend(model)
    monkeypatch.setattr(workers.actor, "create_backend", lambda *args: backend)
    worker = workers.actor.ShardWorker(worker_config(tmp_path / "out", slots=3), model)
    try:
        worker.load()
        # Every slot ran one full-size batch (zeros) at load, one slot after another.
        assert [slot.submitted for slot in backend.opened] == [[64], [64], [64]]
        assert all(slot._future is None for slot in backend.opened), "a warm-up batch left in flight"
        assert worker.stats()["warmup_seconds"] >= 0
        worker.load()  # idempotent: no new slots, no second warm-up
        assert len(backend.opened) == 3 and backend.submits == 3
        result = worker.process(whole_file_shard(str(data)))
        assert len(backend.opened) == 3, "the shard opened slots of its own"
        assert backend.submits == 3 + 8
        check_part(result.part_url, expected(model, data))
        stats = worker.stats()
        assert stats["working_seconds"] > 0 and stats["shards"] == 1
        assert stats["working_seconds"] <= result.times.total + 0.5
    finally:
        worker.close()
    assert all(slot.closed for slot in backend.opened)


def test_worker_load_failure_in_warm_up_closes_the_slots(
        model: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.actor

    backend = ThreadSlotBackend(model, fail_at=1)
    monkeypatch.setattr(workers.actor, "create_backend", lambda *args: backend)
    worker = workers.actor.ShardWorker(worker_config(tmp_path / "out", slots=2), model)
    with pytest.raises(BackendError, match="injected failure"):
        worker.load()
    assert worker.slots is None
    assert len(backend.opened) == 2 and all(slot.closed for slot in backend.opened)
    worker.close()


class HeldSlot(ThreadSlot):
    """A ThreadSlot whose n-th submission (over the backend) runs once `gates[n]` is set."""

    backend: HoldBackend

    def submit(self, rows: int, after: object = None, shapes: Shapes | None = None) -> None:
        self.number = self.backend.submits
        super().submit(rows, after, shapes)

    def _run(self, rows: int, shapes: Shapes | None, future: Future[int]) -> None:
        self.backend.gates[self.number].wait(10)
        super()._run(rows, shapes, future)


class HoldBackend(ThreadSlotBackend):
    def __init__(self, model: bytes) -> None:
        super().__init__(model)
        self.gates = [threading.Event() for _ in range(64)]

    def open_slot(self, max_rows: int, shapes: list[Shapes] | None = None) -> DeviceSlot:
        slot = HeldSlot(self, max_rows)
        self.opened.append(slot)
        return slot


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_next_shard_takes_a_slot_the_previous_shard_frees_before_its_own_first_finishes(
        model: bytes, data: Path, tmp_path: Path) -> None:
    backend = HoldBackend(model)
    with backend, SlotPool(backend, 2, 64) as pool:
        # The previous shard's last batch (submission 0) holds one slot.
        previous = pool.free.get()
        pool.submit(previous, 64)
        with ThreadPoolExecutor(1) as call:
            future = call.submit(process_shard, whole_file_shard(str(data)),
                                 worker_config(tmp_path / "out", slots=2), backend, slots=pool)
            # This shard's first batch (submission 1) takes the other slot and is held.
            assert wait_until(lambda: backend.submits == 2)
            # The previous shard's batch finishes and is collected: its slot must go to this
            # shard's second batch now, not after this shard's own first batch finishes.
            backend.gates[0].set()
            previous.wait()
            pool.release(previous)
            assert wait_until(lambda: backend.submits == 3, 5), \
                "the shard waited on its own first batch instead of taking the freed slot"
            assert not backend.gates[1].is_set()
            for gate in backend.gates:
                gate.set()
            result = future.result(timeout=30)
    check_part(result.part_url, expected(model, data))
    assert pool.in_flight == 0


def test_slot_failure_commits_nothing_and_leaves_pool_usable(
        model: bytes, data: Path, tmp_path: Path) -> None:
    backend = ThreadSlotBackend(model, fail_at=3)
    shard = whole_file_shard(str(data))
    out = tmp_path / "out"
    with backend, SlotPool(backend, 2, 64) as pool:
        with pytest.raises(BackendError, match="injected failure"):
            process_shard(shard, worker_config(out), backend, slots=pool)
        assert not (out / shard.part_name).exists()
        backend.fail_at = None
        result = process_shard(shard, worker_config(out), backend, slots=pool)
    check_part(result.part_url, expected(model, data))


def test_data_error_in_a_later_batch_drains_slots(model: bytes, tmp_path: Path) -> None:
    """A bad row group mid-shard: the error surfaces and no slot keeps a batch in flight."""
    import pyarrow as pa

    path = tmp_path / "bad.parquet"
    write_dataset(str(tmp_path / "src"), files=1, rows_per_file=200, row_group_rows=100, seed=1)
    table = pq.read_table(tmp_path / "src" / "data-000.parquet")
    features = table.column("features").combine_chunks()
    nulls = pa.array([None if i >= 150 else row for i, row in enumerate(features.to_pylist())],
                     type=features.type)
    table = table.set_column(table.schema.get_field_index("features"), "features", nulls)
    pq.write_table(table, path, row_group_size=100)
    backend = ThreadSlotBackend(model)
    with backend, SlotPool(backend, 3, 64) as pool:
        # pyarrow 26 reads the nulls and conversion rejects them; pyarrow 25 fails the read.
        with pytest.raises(DataError, match=r"column 'features'|corrupt row group 1"):
            process_shard(whole_file_shard(str(path)), worker_config(tmp_path / "out"), backend,
                          slots=pool)
        assert all(slot._future is None for slot in backend.opened)


@pytest.mark.parametrize("path", ["cpu", "slots"])
def test_on_rows_reports_every_batch_as_it_is_written(model: bytes, data: Path, tmp_path: Path,
                                                     path: str) -> None:
    """The driver's bar moves per batch, not per committed shard."""
    seen: list[tuple[int, bool]] = []
    shard = whole_file_shard(str(data))
    config = worker_config(tmp_path / "out")

    def on_rows(rows: int) -> None:
        seen.append((rows, (tmp_path / "out" / shard.part_name).exists()))

    if path == "cpu":
        with OnnxRuntimeBackend(model, BackendConfig(device="cpu")) as cpu:
            result = process_shard(shard, config, cpu, on_rows=on_rows)
    else:
        backend = ThreadSlotBackend(model)
        with backend, SlotPool(backend, 2, 64) as pool:
            result = process_shard(shard, config, backend, slots=pool, on_rows=on_rows)
    assert [rows for rows, _ in seen] == [64] * 7 + [52]
    assert not any(committed for _, committed in seen)  # reported before the part commits
    assert result.rows == sum(rows for rows, _ in seen) == 500


@pytest.mark.parametrize("path", ["cpu", "slots"])
@pytest.mark.parametrize(("column", "inner"), [("img", False), ("features", True)])
def test_a_null_names_the_file_the_row_and_the_kept_values(
        model: bytes, tmp_path: Path, path: str, column: str, inner: bool) -> None:
    """A null tensor row (or one null value inside a row) fails the shard naming where it is."""
    import pyarrow as pa

    write_dataset(str(tmp_path / "src"), files=1, rows_per_file=500, row_group_rows=120, seed=2)
    table = pq.read_table(tmp_path / "src" / "data-000.parquet")
    values = table.column(column).combine_chunks()
    storage = values.storage if isinstance(values, pa.ExtensionArray) else values
    rows = storage.to_pylist()
    if inner:
        rows[317] = [None if i == 3 else v for i, v in enumerate(rows[317])]
    else:
        rows[317] = None
    broken = pa.array(rows, type=storage.type)
    if isinstance(values, pa.ExtensionArray):
        broken = pa.ExtensionArray.from_storage(values.type, broken)
    table = table.set_column(table.schema.get_field_index(column), column, broken)
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=120)
    whole = whole_file_shard(str(tmp_path / "f.parquet"))
    shard = Shard(url=whole.url, size=whole.size, version=whole.version, row_groups=(2, 5),
                  rows=260)
    config = worker_config(tmp_path / "out")
    with pytest.raises(DataError) as info:
        if path == "cpu":
            with OnnxRuntimeBackend(model, BackendConfig(device="cpu")) as cpu:
                process_shard(shard, config, cpu)
        else:
            backend = ThreadSlotBackend(model)
            with backend, SlotPool(backend, 2, 64) as pool:
                process_shard(shard, config, backend, slots=pool)
    what = "1 null list value(s)" if not inner else "1 null value(s)"
    assert str(info.value).startswith(
        f"{whole.url} row groups 2-4, row 77 of the shard (kept values: uid=317): column "
        f"'{column}' has {what}")
    assert not (tmp_path / "out" / shard.part_name).exists()


def test_worker_config_rejects_zero_slots(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"WorkerConfig\.slots must be >= 1"):
        worker_config(tmp_path, slots=0)


def test_worker_config_rejects_zero_readers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"WorkerConfig\.readers must be >= 1"):
        worker_config(tmp_path, readers=0)


def test_slot_pool_rejects_zero_slots(model: bytes) -> None:
    with ThreadSlotBackend(model) as backend, \
            pytest.raises(ValueError, match="at least one slot, got 0"):
        SlotPool(backend, 0, 8)


def test_cpu_onnxruntime_has_no_slots(model: bytes) -> None:
    with OnnxRuntimeBackend(model, BackendConfig(device="cpu")) as backend, \
            pytest.raises(BackendError, match="runs on the CPU here, so it has no device slots"):
        backend.open_slot(8)


class GateSlot(DeviceSlot):
    """Records, per submission, the slot whose execution it was told to wait for."""

    def __init__(self, name: str, log: list[tuple[str, str | None]]) -> None:
        self.name = name
        self.max_rows = 4
        self.host_inputs = {}
        self.log = log

    @property
    def executed(self) -> str:
        return self.name  # stands for the slot's "executed" event

    def submit(self, rows: int, after: object = None, shapes: Shapes | None = None) -> None:
        self.log.append((self.name, None if after is None else str(after)))

    def wait(self) -> Batch:
        return {}

    def close(self) -> None:
        pass


class GateBackend(ThreadSlotBackend):
    def __init__(self, model: bytes) -> None:
        super().__init__(model)
        self.log: list[tuple[str, str | None]] = []
        self.gates: list[GateSlot] = []

    def open_slot(self, max_rows: int, shapes: list[Shapes] | None = None) -> DeviceSlot:
        self.gates.append(GateSlot(f"s{len(self.gates)}", self.log))
        return self.gates[-1]


@pytest.mark.parametrize(("concurrent", "gates"), [
    # Submissions s0 s1 s2 s0 s1 s2 s0: each waits for the execution `concurrent` submissions
    # back; a slot never waits for itself (its own stream already orders it).
    (1, [None, "s0", "s1", "s2", "s0", "s1", "s2"]),
    (2, [None, None, "s0", "s1", "s2", "s0", "s1"]),
    (3, [None, None, None, None, None, None, None]),
])
def test_pool_bounds_batches_executing_at_once(
        model: bytes, concurrent: int, gates: list[str | None]) -> None:
    backend = GateBackend(model)
    with backend, SlotPool(backend, 3, 4, concurrent=concurrent) as pool:
        for i in range(7):
            pool.submit(backend.gates[i % 3], 4)
    assert [slot for slot, _ in backend.log] == ["s0", "s1", "s2"] * 2 + ["s0"]
    assert [after for _, after in backend.log] == gates


def test_pool_refuses_zero_concurrent(model: bytes) -> None:
    with pytest.raises(ValueError, match="concurrent >= 1"):
        SlotPool(ThreadSlotBackend(model), 2, 4, concurrent=0)


def test_busy_seconds_counts_overlaps_once() -> None:
    assert busy_seconds([]) == 0
    assert busy_seconds([(0.0, 1.0), (2.0, 3.0)]) == pytest.approx(2.0)
    assert busy_seconds([(0.0, 2.0), (1.0, 3.0), (1.5, 2.5)]) == pytest.approx(3.0)
    assert busy_seconds([(4.0, 5.0), (0.0, 1.0), (0.5, 0.7)]) == pytest.approx(2.0)


def test_busy_time_is_the_union_of_spans_in_bounded_memory() -> None:
    rng = np.random.default_rng(5)
    busy = BusyTime(horizon=5.0, keep=16)
    spans = []
    # 2000 batches of 0.1 s from two shards at once: overlapping, slightly out of order, with
    # idle gaps now and then.
    t = 0.0
    for i in range(2000):
        t += 0.1 if i % 50 else 0.7
        span = (t - 0.1 - rng.uniform(0, 0.03), t + rng.uniform(0, 0.03))
        spans.append(span)
    for i in range(len(spans)):
        busy.add(*spans[i ^ 1])  # neighbours swapped: collected out of order
    assert busy.seconds == pytest.approx(busy_seconds(spans), rel=1e-9)
    assert busy.pending <= 2 * (5.0 / 0.1 + 16), "old spans were not folded into the total"


def test_stage_times_busy_fraction() -> None:
    times = StageTimes(total=4.0, gpu_busy=3.0)
    assert times.gpu_busy_fraction == pytest.approx(0.75)
    assert StageTimes().gpu_busy_fraction == 0.0


def test_shards_take_turns_on_a_shared_pool(model: bytes, tmp_path: Path) -> None:
    """Two shards at once (an actor with two calls in flight): both right, GPU phases whole."""
    paths = write_dataset(str(tmp_path / "in"), files=2, rows_per_file=300, row_group_rows=70,
                          seed=5)
    backend = ThreadSlotBackend(model)
    results: dict[str, object] = {}

    def run(path: str) -> None:
        try:
            results[path] = process_shard(whole_file_shard(path), worker_config(tmp_path / "out"),
                                          backend, slots=pool)
        except BaseException as exc:  # reported below, in the test's thread
            results[path] = exc

    with backend, SlotPool(backend, 2, 64) as pool:
        threads = [threading.Thread(target=run, args=(p,), name=f"shard-{i}")
                   for i, p in enumerate(paths)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for path in paths:
        result = results[path]
        assert not isinstance(result, BaseException), result
        check_part(result.part_url, expected(model, Path(path)))  # type: ignore[attr-defined]
    # Each shard's batches went to the slots in one unbroken run.
    runs = [name for i, name in enumerate(backend.submitters)
            if i == 0 or backend.submitters[i - 1] != name]
    assert sorted(runs) == ["shard-0", "shard-1"]


def test_pool_turns_follow_tickets_and_skip_forfeited_ones(model: bytes) -> None:
    with ThreadSlotBackend(model) as backend, SlotPool(backend, 1, 8) as pool:
        first, second, third = pool.ticket(), pool.ticket(), pool.ticket()
        pool.done(second)  # its shard failed before its turn
        order = []
        with pool.turn(first):
            order.append(first)
        with pool.turn(third):  # would wait forever if the forfeited ticket blocked it
            order.append(third)
        pool.done(third)  # idempotent
        assert order == [0, 2]
        assert pool.ticket() == 3


class _Done:
    def __init__(self) -> None:
        self.waits = 0

    def synchronize(self) -> None:
        self.waits += 1


class _Timer:
    def __init__(self) -> None:
        self.done = _Done()


class ProtocolSlot(DeviceSlot):
    """A timed slot that only keeps the submit/wait protocol of `DeviceSlot`'s helpers."""

    def __init__(self) -> None:
        self.max_rows = 8
        self.host_inputs = {}
        self.timer = _Timer()

    def submit(self, rows: int, after: object = None, shapes: Shapes | None = None) -> None:
        self._check_submit(rows)
        self._rows = rows

    def wait(self) -> Batch:
        return {"rows": np.arange(self._wait_rows())}

    def close(self) -> None:
        pass


def test_device_slot_protocol_messages() -> None:
    slot = ProtocolSlot()
    with pytest.raises(BackendError, match="wait\\(\\) on a slot with no batch submitted; "
                                           "call submit\\(\\) first"):
        slot.wait()
    for rows in (0, 9):
        with pytest.raises(BackendError, match=f"a batch of {rows} rows does not fit a device "
                                               "slot of 8 rows; keep batches within the batch "
                                               "size"):
            slot.submit(rows)
    slot.submit(5)
    with pytest.raises(BackendError, match="submit\\(\\) on a slot whose batch was not "
                                           "collected; call wait\\(\\) first"):
        slot.submit(3)
    assert len(slot.wait()["rows"]) == 5 and slot.timer.done.waits == 1
    slot.submit(8)  # collected: the slot takes the next batch
    assert len(slot.wait()["rows"]) == 8


# --- text: sorted batches at their own shapes -------------------------------------------------


@pytest.fixture(scope="module")
def text_job() -> tuple[str, bytes]:
    """A WordPiece tokenizer and a small encoder whose token axis is dynamic ("sequence")."""
    from examples.reviews import encoder_model, make_tokenizer, review_texts

    tokenizer = make_tokenizer(review_texts(600, seed=2), vocab_size=500)
    model = encoder_model(tokenizer.get_vocab_size(), hidden=16, heads=2, layers=1, ffn=32,
                          max_positions=64, seed=6)
    return tokenizer.to_str(), model.SerializeToString()


def text_rows(count: int) -> list[str]:
    from examples.reviews import review_texts

    texts = review_texts(count, seed=21)
    texts[3] = ""  # [CLS] [SEP] only
    texts[10] = " ".join(texts[:40])  # far over max_length: truncated
    texts[11] = "Grüße aus Köln — 東京の天気は晴れ 😀, naïve café crème brûlée"
    texts[50] = ""
    return texts


def text_config(out: Path, tokenizer_json: str, **kwargs: object) -> WorkerConfig:
    from workers.postprocess import EmbeddingPost
    from workers.preprocess import TextPrep

    spec = TextPrep(column="review", tokenizer="t.json", tokenizer_json=tokenizer_json,
                    max_length=48, nulls="fill")
    return WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
                        output_url=str(out), bindings=(), keep=("uid",), batch_size=16,
                        preprocess=(spec,), max_batch_tokens=160,
                        postprocess=(EmbeddingPost(output="last_hidden_state"),),
                        **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["sync", "slots"])
def test_text_runs_sorted_at_its_own_shapes_and_comes_back_in_input_order(
        path: str, text_job: tuple[str, bytes], tmp_path: Path) -> None:
    import pyarrow as pa

    tokenizer_json, model_bytes = text_job
    texts = text_rows(230)
    texts[77] = None  # type: ignore[call-overload]  # a null, filled with ""
    source = tmp_path / "text.parquet"
    pq.write_table(pa.table({"uid": np.arange(230) * 3, "review": texts}), source,
                   row_group_size=60)
    shard = whole_file_shard(str(source))

    def run(out: str, path: str, **kwargs: object) -> tuple[pq.ParquetFile, object]:
        backend = (ThreadSlotBackend(model_bytes) if path == "slots"
                   else OnnxRuntimeBackend(model_bytes, BackendConfig(device="cpu")))
        with backend:
            result = process_shard(shard, text_config(tmp_path / out, tokenizer_json, **kwargs),
                                   backend)
        return pq.read_table(result.part_url), backend

    # Windows of 100 rows (three here), batches of at most 16 rows and 160 padded tokens.
    part, backend = run("sorted", path, sort_window=100)
    # The unsorted run: windows of one batch, the batches of input order.
    plain, _ = run("plain", "sync", sort_window=16)
    assert part.column_names == ["uid", "embedding"]
    np.testing.assert_array_equal(part.column("uid").to_numpy(), np.arange(230) * 3)
    got = np.stack(part.column("embedding").to_numpy(zero_copy_only=False))
    want = np.stack(plain.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if path == "slots":
        assert isinstance(backend, ThreadSlotBackend)
        # Slots sized for the largest batches; every batch submitted at its own shape.
        shapes = [s for slot in backend.opened for s in slot.shapes if s is not None]
        assert sum(s["input_ids"][0] for s in shapes) == 230
        widths = {s["input_ids"][1] for s in shapes}
        assert len(widths) > 2 and max(widths) == 48 and all(w % 8 == 0 for w in widths)
        for s in shapes:
            rows, width = s["input_ids"]
            assert s["attention_mask"] == s["token_type_ids"] == (rows, width)
            assert rows <= 16 and (rows * width <= 160 or rows == 1)
        assert all(slot.opened_for is not None for slot in backend.opened)


def test_text_on_slots_warms_up_at_the_largest_batches(text_job: tuple[str, bytes],
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.actor

    tokenizer_json, model_bytes = text_job
    backend = ThreadSlotBackend(model_bytes)
    monkeypatch.setattr(workers.actor, "create_backend", lambda *args: backend)
    worker = workers.actor.ShardWorker(text_config(tmp_path, tokenizer_json, slots=2), model_bytes)
    try:
        worker.load()
        # The widest batch (3 rows of 48 tokens) and the one of the most tokens (4 x 40; of
        # equal ones, the widest).
        for slot in backend.opened:
            assert [s["input_ids"] for s in slot.shapes if s] == [(3, 48), (4, 40)]
            assert len(slot.host_inputs["input_ids"]) == 160  # the most tokens any batch has
    finally:
        worker.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_text_shards_tokenize_ahead_of_their_turn_on_a_shared_pool(
        threads: int, text_job: tuple[str, bytes], tmp_path: Path) -> None:
    """Three text shards at once (an actor's shards in flight): each tokenizes before its turn
    on the slots, on the actor's helper processes when it has some; all right, in order."""
    import pyarrow as pa

    from workers.batching import token_budget
    from workers.helpers import HelperProcesses

    tokenizer_json, model_bytes = text_job
    paths = []
    for i in range(3):
        texts = text_rows(400)
        path = tmp_path / f"text-{i}.parquet"
        pq.write_table(pa.table({"uid": np.arange(400) + 1000 * i, "review": texts}), path,
                       row_group_size=50)
        paths.append(str(path))
    backend = ThreadSlotBackend(model_bytes)
    config = text_config(tmp_path / "out", tokenizer_json, sort_window=64,
                         preprocess_threads=threads)
    plain = text_config(tmp_path / "plain", tokenizer_json, sort_window=16)
    results: dict[str, object] = {}
    helpers = HelperProcesses(threads)

    def run(path: str) -> None:
        try:
            results[path] = process_shard(whole_file_shard(path), config, backend, slots=pool,
                                          processes=helpers)
        except BaseException as exc:  # reported below, in the test's thread
            results[path] = exc

    try:
        with backend, SlotPool.for_job(backend, config, token_budget(config, backend.inputs)
                                       ) as pool, ThreadPoolExecutor(3) as shards:
            list(shards.map(run, paths))
    finally:
        helpers.close()
    with OnnxRuntimeBackend(model_bytes, BackendConfig(device="cpu")) as cpu:
        for i, path in enumerate(paths):
            result = results[path]
            assert not isinstance(result, BaseException), result
            part = pq.read_table(result.part_url)  # type: ignore[attr-defined]
            want = pq.read_table(process_shard(whole_file_shard(path), plain, cpu).part_url)
            np.testing.assert_array_equal(part.column("uid").to_numpy(),
                                          np.arange(400) + 1000 * i)
            np.testing.assert_allclose(
                np.stack(part.column("embedding").to_numpy(zero_copy_only=False)),
                np.stack(want.column("embedding").to_numpy(zero_copy_only=False)),
                rtol=1e-5, atol=1e-5)


def test_text_tables_tokenized_at_once_give_the_pieces_of_one_at_a_time(
        text_job: tuple[str, bytes], tmp_path: Path) -> None:
    """Text on helper processes is prepared several tables at once (`Preprocessor.concurrency`):
    the pieces, their order and the time counted as converting match one table at a time."""
    import time

    import pyarrow as pa

    from workers.backends.onnxruntime import OnnxRuntimeBackend as Cpu
    from workers.helpers import HelperProcesses
    from workers.pipeline import _as_piece
    from workers.preprocess import CONCURRENT_TABLES
    from workers.rowgroups import RowGroupReader
    from workers.sources import ShardInputs
    from workers.types import StageTimes

    tokenizer_json, model_bytes = text_job
    texts: list[str | None] = list(text_rows(600))
    texts[77] = None  # filled as ""
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"uid": np.arange(600), "review": texts}), path, row_group_size=40)
    config = text_config(tmp_path / "out", tokenizer_json, preprocess_threads=2)
    helpers = HelperProcesses(2)
    runs = {}
    try:
        with Cpu(model_bytes, BackendConfig(device="cpu")) as backend:
            for depth in (1, CONCURRENT_TABLES):
                times = StageTimes()
                inputs = ShardInputs(whole_file_shard(str(path)), config, backend.inputs, (),
                                     times, processes=helpers)
                assert inputs.prep.concurrency == CONCURRENT_TABLES
                inputs.prep.concurrency = depth
                t0 = time.perf_counter()
                try:
                    with RowGroupReader(inputs.shard, config.columns, _as_piece, 2) as reader:
                        runs[depth] = list(inputs.row_group_pieces(reader))
                finally:
                    inputs.close()
                assert 0 < times.convert <= time.perf_counter() - t0
                assert inputs.converted == 600
    finally:
        helpers.close()
    serial, concurrent = runs[1], runs[CONCURRENT_TABLES]
    assert len(serial) == len(concurrent) == 15
    for (feeds_a, kept_a), (feeds_b, kept_b) in zip(serial, concurrent, strict=True):
        assert kept_a.equals(kept_b)
        assert sorted(feeds_a) == sorted(feeds_b)
        for name in feeds_a:
            np.testing.assert_array_equal(feeds_a[name], feeds_b[name])
    assert np.concatenate([k.column("uid").to_numpy() for _, k in concurrent]).tolist() == \
        list(range(600))


def test_images_decoded_two_batches_at_once_give_the_pieces_and_failures_of_one_at_a_time(
        tmp_path: Path) -> None:
    """CPU-decoded images are prepared `image_tables` batches at once: the pieces, their order,
    the bad rows left out and their records match one batch at a time."""
    import pyarrow as pa
    from PIL import Image

    from tests.workers.test_preprocess import encode, meta, resolved_image
    from workers.pipeline import _as_piece
    from workers.rowgroups import RowGroupReader
    from workers.sched import IMAGE_TABLES
    from workers.sources import ShardInputs

    rng = np.random.default_rng(5)
    images = [encode(Image.fromarray(rng.integers(0, 256, (20 + i % 7, 24, 3), np.uint8)),
                     "JPEG" if i % 3 else "PNG") for i in range(90)]
    images[31] = b"not an image"
    images[64] = images[64][:40]  # truncated
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"uid": np.arange(90), "jpeg": pa.array(images, pa.binary())}), path,
                   row_group_size=30)
    pixels = meta("pixels", np.float32, None, 3, 16, 16)
    spec = resolved_image({"pixels": pixels}, on_error="skip")
    runs = {}
    for tables in (1, IMAGE_TABLES):
        config = WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
                              output_url=str(tmp_path / "out"), bindings=(), keep=("uid",),
                              batch_size=8, preprocess=(spec,), preprocess_threads=3,
                              image_tables=tables)
        inputs = ShardInputs(whole_file_shard(str(path)), config, [pixels], (), StageTimes())
        try:
            assert inputs.prep.concurrency == tables
            with RowGroupReader(inputs.shard, config.columns, _as_piece, 2) as reader:
                pieces = list(inputs.row_group_pieces(reader))
        finally:
            inputs.close()
        runs[tables] = pieces, inputs.failures, inputs.rows_failed
    (serial, failed_a, count_a), (concurrent, failed_b, count_b) = runs[1], runs[IMAGE_TABLES]
    assert IMAGE_TABLES > 1
    assert count_a == count_b == 2 and failed_a == failed_b
    assert [f["key"]["uid"] for f in failed_b] == [31, 64]
    # Pillow's message without the address of its buffer, which would differ run to run.
    assert failed_b[0]["reason"] == ("cannot decode image (UnidentifiedImageError: cannot "
                                     "identify image file)")
    assert len(serial) == len(concurrent) == 12  # 30-row groups, 8-row steps
    for (feeds_a, kept_a), (feeds_b, kept_b) in zip(serial, concurrent, strict=True):
        assert kept_a.equals(kept_b)
        np.testing.assert_array_equal(feeds_a["pixels"], feeds_b["pixels"])
    assert np.concatenate([k.column("uid").to_numpy() for _, k in concurrent]).tolist() == \
        [u for u in range(90) if u not in (31, 64)]


def test_images_on_nvimagecodec_or_one_thread_are_prepared_one_batch_at_a_time() -> None:
    from tests.workers.test_preprocess import meta, resolved_image
    from workers.preprocess import FunctionPrep, Preprocessor

    pixels = meta("pixels", np.float32, None, 3, 16, 16)
    spec = resolved_image({"pixels": pixels})
    with Preprocessor([spec], {"pixels": pixels}, threads=1, image_tables=2) as prep:
        assert prep.concurrency == 1  # no decoding threads: nothing to overlap

    class OneDecoder:  # what Preprocessor reads of a GpuImages on nvImageCodec
        decoder = "nvimgcodec"
        inputs = frozenset({"pixels"})

    with Preprocessor([spec], {"pixels": pixels}, threads=2, images=OneDecoder(),  # type: ignore[arg-type]
                      image_tables=2) as prep:
        assert prep.concurrency == 1  # nvImageCodec keeps one decoder
    extra = meta("extra", np.float32, None, 2)
    function = FunctionPrep(function="tests.user_functions:as_dict", columns=("c", "d"),
                            inputs=("extra",))
    with Preprocessor([spec, function], {"pixels": pixels, "extra": extra}, threads=2,
                      image_tables=2) as prep:
        assert prep.concurrency == 1  # user functions may not be thread-safe


def test_only_text_with_helper_processes_is_prepared_several_tables_at_once(
        text_job: tuple[str, bytes], tmp_path: Path) -> None:
    from workers.preprocess import CONCURRENT_TABLES, Preprocessor, TensorPrep
    from workers.tensors import TensorMeta

    tokenizer_json, _ = text_job
    metas = {n: TensorMeta(n, np.dtype(np.int64), (None, None))
             for n in ("input_ids", "attention_mask", "token_type_ids")}
    (text,) = text_config(tmp_path, tokenizer_json).preprocess
    with Preprocessor([text], metas, threads=2) as prep:
        assert prep.concurrency == CONCURRENT_TABLES
    with Preprocessor([text], metas, threads=1) as prep:  # no helpers: nothing to overlap
        assert prep.concurrency == 1
    with Preprocessor([TensorPrep(column="ids", input="input_ids")], metas, threads=2) as prep:
        assert prep.concurrency == 1  # no text: converted as it is read


def test_an_actor_given_the_drivers_description_neither_parses_the_model_nor_imports_onnx(
        tmp_path: Path) -> None:
    """The driver describes and checks the model once (`BackendConfig.model_io`): an actor's
    backend then loads without `describe_onnx`, so it never imports `onnx` (0.3-1.5 s)."""
    import subprocess
    import sys

    model = two_input_model()
    script = f"""
import sys
from pathlib import Path
import numpy as np
from workers.backends.onnxruntime import OnnxRuntimeBackend
from workers.backends.base import BackendConfig
from workers.tensors import TensorMeta
io = ((TensorMeta("image", np.dtype(np.float32), (None, 3, 4, 4)),
       TensorMeta("meta", np.dtype(np.float32), (None, 8))),
      (TensorMeta("logits", np.dtype(np.float32), (None, 5)),
       TensorMeta("score", np.dtype(np.float32), (None, 1))))
model = Path({str(tmp_path / "m.onnx")!r}).read_bytes()
with OnnxRuntimeBackend(model, BackendConfig(device="cpu", model_io=io)) as backend:
    out = backend.infer({{"image": np.zeros((2, 3, 4, 4), np.float32),
                          "meta": np.zeros((2, 8), np.float32)}})
    assert [m.name for m in backend.outputs] == ["logits", "score"], backend.outputs
    assert out["logits"].shape == (2, 5) and out["score"].shape == (2, 1), out
assert "onnx" not in sys.modules, "the backend imported onnx"
print("ok")
"""
    (tmp_path / "m.onnx").write_bytes(model)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
