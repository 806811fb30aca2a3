"""The CUDA layer (workers/cuda.py) and ONNX Runtime's CUDA device slot.

Status checking and the no-GPU answers run everywhere; tests marked `gpu` need a CUDA device
(and, for the slot, onnxruntime-gpu) and skip, saying why, where there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.models import two_input_model, write_dataset
from workers import cuda
from workers.backends.base import BackendConfig
from workers.backends.onnxruntime import OnnxRuntimeBackend, cuda_provider_available
from workers.errors import BackendError
from workers.pipeline import process_shard
from workers.slots import SlotPool

rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")

HAS_GPU = cuda.device_count() > 0
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible to this process")
needs_ort_cuda = pytest.mark.skipif(
    not (HAS_GPU and cuda_provider_available()),
    reason="needs a CUDA device and onnxruntime-gpu (ONNX Runtime's CUDA provider)")


# Everywhere --------------------------------------------------------------------------------
def test_check_returns_values() -> None:
    ok = rt.cudaError_t.cudaSuccess
    assert cuda.check((ok,)) is None
    assert cuda.check((ok, 7)) == 7
    assert cuda.check((ok, 1, 2)) == (1, 2)


def test_check_names_the_call_and_cuda_error() -> None:
    with pytest.raises(cuda.CudaError, match=r"cudaMalloc\(64\) failed: cudaErrorMemoryAllocation "
                                             r"\(out of memory\)") as info:
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(64)")
    assert info.value.code == int(rt.cudaError_t.cudaErrorMemoryAllocation)
    assert isinstance(info.value, BackendError)


def test_device_count_is_zero_or_more() -> None:
    assert cuda.device_count() >= 0


def test_a_driver_too_old_for_the_runtime_is_named() -> None:
    """A CUDA 12 driver under cuda-python 13 is not 'no GPU': the message says what to install."""
    assert cuda.driver_mismatch(13000, 12040) == (
        "the NVIDIA driver supports CUDA up to 12.4, and cuda-python loads the CUDA 13.0 runtime; "
        "install the packages for CUDA 12 (pip install '.[tensorrt-cu12]' or "
        "'cuda-python>=12,<13'), or update the driver")
    assert cuda.driver_mismatch(13000, 0) is None  # no driver at all: no GPU here
    assert cuda.driver_mismatch(12060, 13000) is None  # a newer driver runs older runtimes


@pytest.mark.skipif(HAS_GPU, reason="checks the answer on a machine without a GPU")
def test_without_gpu_set_device_says_how_many() -> None:
    with pytest.raises(cuda.CudaError, match="CUDA device 0 does not exist: this process sees 0"):
        cuda.set_device(0)


@pytest.mark.skipif(HAS_GPU, reason="checks the answer on a machine without a GPU")
def test_without_gpu_a_stream_fails_clearly() -> None:
    with pytest.raises(cuda.CudaError, match="cudaStreamCreateWithFlags failed: cudaError"):
        cuda.Stream()


def test_buffers_reject_empty_sizes() -> None:
    with pytest.raises(ValueError, match="DeviceBuffer needs a positive size, got 0 bytes"):
        cuda.DeviceBuffer(0)
    with pytest.raises(ValueError, match="PinnedBuffer needs a positive size, got -1 bytes"):
        cuda.PinnedBuffer(-1)


# On a GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
def test_device_facts() -> None:
    cuda.set_device(0)
    major, minor = cuda.compute_capability(0)
    assert major >= 5 and minor >= 0
    assert cuda.device_name(0)
    free, total = cuda.memory_info()
    assert 0 < free <= total
    with pytest.raises(cuda.CudaError, match=f"CUDA device {cuda.device_count()} does not exist"):
        cuda.compute_capability(cuda.device_count())


@pytest.mark.gpu
@needs_gpu
def test_round_trip_through_the_device_on_a_stream() -> None:
    cuda.set_device(0)
    rng = np.random.default_rng()
    data = rng.standard_normal((257, 3, 5)).astype(np.float32)
    nbytes = data.nbytes
    with cuda.Stream() as stream, cuda.PinnedBuffer(nbytes) as src, \
            cuda.PinnedBuffer(nbytes) as dst, cuda.DeviceBuffer(nbytes) as a, \
            cuda.DeviceBuffer(nbytes) as b, cuda.Event() as done:
        src.view(np.float32, data.shape)[:] = data
        out = dst.view(np.float32, data.shape)
        out[:] = np.nan  # poison: every element must be written back
        cuda.copy_htod_async(a.ptr, src.ptr, nbytes, stream)
        cuda.copy_dtod_async(b.ptr, a.ptr, nbytes, stream)
        cuda.copy_dtoh_async(dst.ptr, b.ptr, nbytes, stream.handle)
        done.record(stream)
        done.synchronize()
        assert done.query()
        np.testing.assert_array_equal(out, data)


@pytest.mark.gpu
@needs_gpu
def test_a_high_priority_stream_has_the_devices_greatest_priority() -> None:
    cuda.set_device(0)
    _least, greatest = cuda.check(cuda.runtime().cudaDeviceGetStreamPriorityRange())
    with cuda.Stream(high_priority=True) as high, cuda.Stream() as plain:
        assert (high.priority, plain.priority) == (greatest, 0)
        assert greatest < 0  # every GPU since Kepler has priorities


@pytest.mark.gpu
@needs_gpu
def test_events_time_work_and_memset_writes() -> None:
    cuda.set_device(0)
    nbytes = 64 << 20
    with cuda.Stream() as stream, cuda.DeviceBuffer(nbytes) as buf, \
            cuda.PinnedBuffer(nbytes) as host, cuda.SlotTimer() as timer:
        timer.mark(0, stream)
        buf.memset_async(7, stream)
        timer.mark(1, stream)
        cuda.copy_dtoh_async(host.ptr, buf.ptr, nbytes, stream)
        timer.mark(2, stream)
        timer.mark(3, stream)
        stream.synchronize()
        seconds = timer.stage_seconds()
        assert set(seconds) == {"h2d", "compute", "d2h"}
        assert seconds["compute"] > 0  # the 64 MiB copy takes measurable time
        assert np.all(host.view(np.uint8, (nbytes,)) == 7)


@pytest.mark.gpu
@needs_gpu
def test_closed_resources_refuse_use_and_close_is_idempotent() -> None:
    cuda.set_device(0)
    stream = cuda.Stream()
    stream.close()
    stream.close()
    with pytest.raises(cuda.CudaError, match="Stream is closed"):
        stream.synchronize()
    pinned = cuda.PinnedBuffer(16)
    with pytest.raises(ValueError, match=r"needs 32 bytes; the pinned buffer has 16"):
        pinned.view(np.float32, (8,))
    pinned.close()
    with pytest.raises(cuda.CudaError, match="PinnedBuffer is closed"):
        pinned.view(np.uint8, (4,))


@pytest.mark.gpu
@needs_gpu
def test_device_out_of_memory_says_what_to_lower() -> None:
    cuda.set_device(0)
    _, total = cuda.memory_info()
    with pytest.raises(cuda.CudaError, match=r"cudaMalloc.*failed: cudaErrorMemoryAllocation.*"
                                             r"lower the batch size"):
        cuda.DeviceBuffer(total * 4)


# ONNX Runtime's CUDA slot --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> bytes:
    return two_input_model(seed=31)


@pytest.mark.gpu
@needs_ort_cuda
@pytest.mark.parametrize("rows", [1, 37, 64])
def test_ort_cuda_slot_matches_cpu(model: bytes, rows: int) -> None:
    rng = np.random.default_rng()
    batch = {"image": rng.standard_normal((rows, 3, 4, 4)).astype(np.float32),
             "meta": rng.standard_normal((rows, 8)).astype(np.float32)}
    with OnnxRuntimeBackend(model, BackendConfig(device="cpu")) as cpu:
        want = cpu.infer(batch)
    with OnnxRuntimeBackend(model, BackendConfig(device="cuda")) as gpu:
        assert gpu.uses_slots
        slot = gpu.open_slot(64)
        try:
            for value in slot.host_outputs.values():  # type: ignore[attr-defined]
                value[:] = np.nan
            for name, value in batch.items():
                slot.host_inputs[name][:rows] = value
            slot.submit(rows)
            # Copies: the views alias pinned memory that close() frees.
            got = {name: view.copy() for name, view in slot.wait().items()}
            with pytest.raises(BackendError, match="no batch submitted"):
                slot.wait()
            with pytest.raises(BackendError, match="does not fit a device slot of 64 rows"):
                slot.submit(65)
            assert all(v >= 0 for v in slot.stage_seconds().values())
        finally:
            slot.close()
    for name, value in want.items():
        assert got[name].shape == value.shape
        assert np.isfinite(got[name]).all()
        err = np.linalg.norm(got[name] - value) / np.linalg.norm(value)
        assert err < 1e-3, f"{name}: relative error {err}"


@pytest.mark.gpu
@needs_ort_cuda
@pytest.mark.parametrize("concurrent", [1, 2, 3])
def test_ort_cuda_pipeline_matches_cpu(model: bytes, tmp_path: Path, concurrent: int) -> None:
    import pyarrow.parquet as pq

    from tests.workers.test_pipeline import whole_file_shard, worker_config

    path = write_dataset(str(tmp_path / "in"), files=1, rows_per_file=500, row_group_rows=120,
                         seed=2)[0]
    shard = whole_file_shard(path)
    with OnnxRuntimeBackend(model, BackendConfig(device="cpu")) as cpu:
        want = pq.read_table(process_shard(shard, worker_config(tmp_path / "cpu"), cpu).part_url)
    config = worker_config(tmp_path / "gpu", slots=3)
    with OnnxRuntimeBackend(model, BackendConfig(device="cuda")) as gpu, \
            SlotPool(gpu, 3, config.batch_size, concurrent=concurrent) as pool:
        pool.trace = []
        result = process_shard(shard, config, gpu, slots=pool)
        pool_busy = pool.busy.seconds
        trace = pool.trace
    got = pq.read_table(result.part_url)
    assert got.column("uid").equals(want.column("uid"))
    a = np.stack(got.column("logits").combine_chunks().to_numpy_ndarray())
    b = np.stack(want.column("logits").combine_chunks().to_numpy_ndarray())
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3
    assert result.times.compute > 0 and result.times.h2d > 0
    assert 0 < result.times.gpu_busy <= result.times.total
    assert pool_busy == pytest.approx(result.times.gpu_busy)  # one shard: the same union
    assert len(trace) == result.batches
    submits = [t[1] for t in trace]
    assert submits == sorted(submits)
    assert all(collected >= submitted and end >= start
               for _, submitted, collected, start, end in trace)
    if concurrent == 1:  # executions one after another: they end in submission order
        ends = [t[4] for t in trace]
        assert ends == sorted(ends)


@pytest.mark.gpu
@needs_ort_cuda
def test_ort_cuda_text_runs_each_batch_at_its_own_shape(tmp_path: Path) -> None:
    """Sorted text batches on ONNX Runtime's CUDA slots (IOBinding on views of the slots'
    buffers, one shape per batch) give the CPU's embeddings, in input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from examples.reviews import encoder_model, make_tokenizer, review_texts
    from tests.workers.test_pipeline import text_config, text_rows, whole_file_shard
    from workers.batching import token_budget

    tokenizer = make_tokenizer(review_texts(600, seed=2), vocab_size=500)
    model_bytes = encoder_model(tokenizer.get_vocab_size(), hidden=32, heads=4, layers=2,
                                ffn=64, max_positions=64, seed=6).SerializeToString()
    source = tmp_path / "text.parquet"
    pq.write_table(pa.table({"uid": np.arange(300), "review": text_rows(300)}), source,
                   row_group_size=70)
    shard = whole_file_shard(str(source))
    with OnnxRuntimeBackend(model_bytes, BackendConfig(device="cpu")) as cpu:
        want = pq.read_table(process_shard(
            shard, text_config(tmp_path / "cpu", tokenizer.to_str()), cpu).part_url)
    config = text_config(tmp_path / "gpu", tokenizer.to_str(), slots=3, sort_window=128)
    with OnnxRuntimeBackend(model_bytes, BackendConfig(device="cuda")) as gpu:
        budget = token_budget(config, gpu.inputs)
        assert gpu.uses_slots and SlotPool.fits(gpu, budget)
        with SlotPool.for_job(gpu, config, budget) as pool:
            assert pool.shapes is not None
            pool.warm_up()
            pool.trace = []
            result = process_shard(shard, config, gpu, slots=pool)
            batches = len(pool.trace)
    got = pq.read_table(result.part_url)
    assert got.column("uid").equals(want.column("uid"))
    a = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(want.column("embedding").to_numpy(zero_copy_only=False))
    assert np.abs(a - b).max() < 1e-3
    assert batches == result.batches > 300 // 16
    assert result.times.gpu_busy > 0
