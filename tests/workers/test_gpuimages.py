"""GPU image decoding (`workers.gpuimages`) against the CPU path, where a GPU is present.

Marked `gpu`: each test needs a CUDA device and nvImageCodec (`pip install '.[gpu]'`), the
pipeline test also onnxruntime-gpu; they skip, saying why, elsewhere. What they record (maximum
pixel difference, label agreement) is printed, so a run's log keeps the numbers.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers import cuda
from workers.images import ImageDecoder
from workers.preprocess import ImagePrep, Preprocessor
from workers.tensors import TensorMeta

HAS_GPU = cuda.device_count() > 0


def _has_nvimgcodec() -> bool:
    try:  # find_spec imports the parent package, and `nvidia` is absent on most CPU machines
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:
        return False


HAS_NVIMGCODEC = _has_nvimgcodec()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible to this process"),
    pytest.mark.skipif(not HAS_NVIMGCODEC, reason="nvImageCodec is not installed "
                                                  "(pip install '.[gpu]')"),
]


class DeviceBatch:
    """A stand-in slot for `GpuImages.fill`: a stream and a device buffer for one input."""

    def __init__(self, meta: TensorMeta, max_rows: int) -> None:
        self.meta, self.max_rows = meta, max_rows
        self.shape = (max_rows, *(int(d) for d in meta.row_shape if d is not None))
        self.stream = cuda.Stream()
        self.buffer = cuda.DeviceBuffer(int(np.prod(self.shape)) * meta.dtype.itemsize)
        self.filled_inputs: frozenset[str] = frozenset()

    def device_input(self, name: str) -> int:
        return int(self.buffer.ptr)

    def download(self, rows: int) -> np.ndarray:
        host = cuda.PinnedBuffer(self.buffer.nbytes)
        try:
            cuda.copy_dtoh_async(host.ptr, self.buffer.ptr, self.buffer.nbytes, self.stream)
            self.stream.synchronize()
            return host.view(self.meta.dtype, self.shape)[:rows].copy()
        finally:
            host.close()

    def close(self) -> None:
        self.buffer.close()
        self.stream.close()


def resolve(meta: TensorMeta, **kwargs: Any) -> ImagePrep:
    schema = pa.schema([("image", pa.binary())])
    return ImagePrep(column="image", **kwargs).resolve({meta.name: meta}, [meta.name], schema,
                                                       "test")


def gpu_pixels(spec: ImagePrep, meta: TensorMeta, values: list[bytes | None], batch: int = 256,
               threads: int = 4) -> tuple[np.ndarray, dict[int, str], dict[str, int]]:
    """The GPU path's model input for `values`: decode, fit kernel, downloaded. With decode
    auto and `FAST_THREADS` threads the CPU decodes (libjpeg-turbo) and the kernel resizes."""
    from concurrent.futures import ThreadPoolExecutor

    from workers.gpuimages import open_gpu_images

    images, how = open_gpu_images([spec], {meta.name: meta}, True, 0, threads)
    assert images is not None, how
    pool = ThreadPoolExecutor(threads)
    cpu = ImageDecoder(spec.mode or "RGB", spec.size or (0, 0), spec.resize or 0, spec.draft,
                       pool=pool, threads=threads, max_pixels=spec.max_pixels)
    slot = DeviceBatch(meta, batch)
    out, bad = [], {}
    try:
        for lo in range(0, len(values), batch):
            part, failed = images.decode(meta.name, values[lo:lo + batch], cpu)
            bad.update({lo + k: v for k, v in failed.items()})
            kept = [x for i, x in enumerate(part) if i not in failed]
            good = np.empty(len(kept), dtype=object)
            for j, item in enumerate(kept):
                good[j] = item
            images.fill(slot, meta.name, [good], len(good))  # type: ignore[arg-type]
            assert slot.filled_inputs == {meta.name}
            slot.filled_inputs = frozenset()
            out.append(slot.download(len(good)))
        return np.concatenate(out), bad, {"gpu": images.gpu_rows, "cpu": images.cpu_rows}
    finally:
        pool.shutdown()
        slot.close()
        images.close()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """examples.digits' images (PNG and JPEG) and its CNN, trained here (fewer epochs)."""
    pytest.importorskip("sklearn", reason="examples.digits needs scikit-learn")
    from examples.digits import cnn_model, draw_digits, preprocess, train_cnn

    encoded, _, labels = draw_digits(seed=0)
    pixels = preprocess(encoded)
    params = train_cnn(pixels[:, 0], labels, epochs=6, seed=0)
    path = tmp_path_factory.mktemp("digits") / "cnn.onnx"
    path.write_bytes(cnn_model(params).SerializeToString())
    return {"encoded": list(encoded), "labels": labels, "model": path}


def top1(model: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels.astype(np.float32)})[0].argmax(axis=1)


def test_gpu_decode_matches_the_cpu_decode_and_the_labels(digits: dict[str, Any]) -> None:
    from examples.digits import MEAN, SIZE, STD

    meta = TensorMeta("pixels", np.dtype(np.float32), (None, 3, SIZE, SIZE))
    values: list[bytes | None] = list(digits["encoded"])
    results = {}
    for draft in (False, True):
        spec = resolve(meta, mean=MEAN, std=STD, draft=draft, decode="cpu")
        with Preprocessor([spec], {meta.name: meta}, threads=4) as prep:
            cpu = prep(pa.table({"image": pa.array(values, pa.binary())})).feeds["pixels"]
        gpu, bad, rows = gpu_pixels(resolve(meta, mean=MEAN, std=STD, decode="gpu"), meta,
                                    values)
        assert not bad and gpu.shape == cpu.shape
        # In 0..255 levels: pixels = (level / 255 - 0.5) / 0.5.
        diff = np.abs(gpu.astype(np.float64) - cpu) * 0.5 * 255
        labels_cpu, labels_gpu = top1(digits["model"], cpu), top1(digits["model"], gpu)
        results[draft] = {"max_levels": float(diff.max()), "mean_levels": float(diff.mean()),
                          "same_top1": float((labels_cpu == labels_gpu).mean()),
                          "accuracy_cpu": float((labels_cpu == digits["labels"]).mean()),
                          "accuracy_gpu": float((labels_gpu == digits["labels"]).mean()),
                          "rows": rows}
        print(f"GPU vs CPU decode (CPU draft={draft}): {results[draft]}")
    # The PNGs (two thirds) decode on the CPU either way; the JPEGs on the GPU, whose IDCT and
    # chroma upsampling differ from libjpeg's by a few levels.
    assert results[False]["rows"]["gpu"] > 0 and results[False]["rows"]["cpu"] > 0
    assert results[False]["max_levels"] <= 24 and results[False]["mean_levels"] < 1.0
    assert results[False]["same_top1"] >= 0.995 and results[True]["same_top1"] >= 0.99


def test_decode_auto_on_threads_enough_decodes_on_the_cpu_for_the_kernel() -> None:
    """With decode auto and `FAST_THREADS` CPU threads every JPEG decodes with libjpeg-turbo
    into pinned memory (HostImage) and nvImageCodec is not opened; on fewer threads, or with
    decode gpu, nvImageCodec decodes them (DeviceImage). Rows stay in order."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from workers.gpuimages import DeviceImage, HostImage, open_gpu_images
    from workers.images import FAST_THREADS

    rng = np.random.default_rng(5)
    meta = TensorMeta("x", np.dtype(np.uint8), (None, 32, 32, 3))

    def jpeg(w: int, h: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buffer, "JPEG")
        return buffer.getvalue()

    values = [jpeg(32, 32) if i % 2 else jpeg(64, 48) for i in range(12)]
    for decode, threads, kind in (("auto", FAST_THREADS, HostImage), ("auto", 4, DeviceImage),
                                  ("gpu", FAST_THREADS, DeviceImage)):
        images, how = open_gpu_images([resolve(meta, decode=decode)], {meta.name: meta}, True, 0,
                                      threads)
        assert images is not None, how
        assert how.startswith("cpu+gpu") == (kind is HostImage), how
        try:
            with ThreadPoolExecutor(threads) as pool:
                cpu = ImageDecoder("RGB", (32, 32), 32, pool=pool, threads=threads)
                part, bad = images.decode(meta.name, values, cpu)
            assert not bad and (images.gpu_rows, images.cpu_rows) == (12, 0)
            assert all(isinstance(item, kind) for item in part)
            if kind is HostImage:
                for i, item in enumerate(part):
                    assert item.original == ((32, 32) if i % 2 else (64, 48))
        finally:
            images.close()


def assert_within_a_level(meta: TensorMeta, spec: ImagePrep, source: np.ndarray, w: int,
                          h: int, got: np.ndarray) -> None:
    """`got` (one row the kernel wrote) is `fit_reference` of `source`, decoded from a `w` x `h`
    JPEG, within a level (normalized with mean 0.4, std 0.3 for float inputs)."""
    from workers.gpuimages import fit_reference, fit_row

    assert spec.size is not None and spec.resize is not None
    want = fit_reference(source, *fit_row(w, h, spec.size, spec.resize), spec.size,
                         1 if spec.mode == "L" else 3).astype(np.float64)
    if meta.dtype.kind == "f":
        want = (want / 255 - 0.4) / 0.3
        have = got.transpose(1, 2, 0).astype(np.float64)
        assert np.abs(have - want).max() <= 1 / 255 / 0.3 + 2e-3
    else:
        assert np.abs(got.astype(np.float64) - want).max() <= 1


def check_turbo_path(meta: TensorMeta, values: list[bytes | None], kwargs: dict[str, Any],
                     shape: tuple[int, ...]) -> None:
    """decode auto on `FAST_THREADS` threads: libjpeg-turbo's decode (at its DCT scale) through
    the kernel gives `fit_reference` of that decode, within a level."""
    import simplejpeg

    from workers.images import FAST_THREADS, dct_factor

    spec = resolve(meta, decode="auto", **kwargs)
    got, bad, rows = gpu_pixels(spec, meta, values, threads=FAST_THREADS)
    assert not bad and rows["gpu"] == len(values) and got.shape == shape
    assert spec.size is not None and spec.resize is not None
    for i, data in enumerate(values):
        assert data is not None
        h, w = simplejpeg.decode_jpeg_header(data)[:2]
        factor = dct_factor(w, h, spec.resize)
        source = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // factor) if factor > 1
                                        else 0, min_width=-(-w // factor) if factor > 1 else 0)
        assert_within_a_level(meta, spec, source, w, h, got[i])
    print(f"libjpeg-turbo + kernel: {len(values)} rows within a level of fit_reference")


def test_the_kernel_computes_its_reference_on_the_decoded_images() -> None:
    from PIL import Image

    from workers.gpuimages import import_nvimgcodec

    nv = import_nvimgcodec()
    rng = np.random.default_rng(5)
    values: list[bytes | None] = []
    for w, h in [(500, 375), (224, 224), (37, 91), (300, 200)]:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            buffer, format="JPEG", quality=92)
        values.append(buffer.getvalue())
    for meta, kwargs in [(TensorMeta("x", np.dtype(np.uint8), (None, 224, 224, 3)), {}),
                         (TensorMeta("x", np.dtype(np.float16), (None, 1, 64, 48)),
                          {"mean": (0.4,), "std": (0.3,)})]:
        spec = resolve(meta, decode="gpu", **kwargs)
        got, bad, rows = gpu_pixels(spec, meta, values)
        assert not bad and rows["gpu"] == len(values)
        check_turbo_path(meta, values, kwargs, got.shape)
        decoder = nv.Decoder(device_id=0)
        params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                 sample_format=nv.SampleFormat.I_RGB)
        for i, data in enumerate(values):
            image = decoder.decode(nv.CodeStream(data), params=params)
            source = np.asarray(image.cpu())
            h, w = source.shape[:2]
            assert spec.size is not None and spec.resize is not None
            assert_within_a_level(meta, spec, source, w, h, got[i])


def test_gpu_decode_through_the_slot_pipeline_keeps_rows_and_bad_images(
        digits: dict[str, Any], tmp_path: Path) -> None:
    from examples.digits import MEAN, STD
    from workers.backends.base import BackendConfig
    from workers.backends.onnxruntime import OnnxRuntimeBackend, cuda_provider_available
    from workers.gpuimages import open_gpu_images
    from workers.images import FAST_THREADS
    from workers.pipeline import process_shard
    from workers.postprocess import ArgmaxPost
    from workers.slots import SlotPool
    from workers.storage import file_version, filesystem
    from workers.types import Shard, WorkerConfig

    if not cuda_provider_available():
        pytest.skip("needs onnxruntime-gpu (ONNX Runtime's CUDA provider)")
    values: list[bytes | None] = list(digits["encoded"][:700])
    values[13] = values[14][: len(values[14] or b"") // 3]  # truncated (a PNG or a JPEG)
    values[200] = None
    values[401] = b"\xff\xd8\xff not a jpeg"
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"uid": np.arange(len(values)), "image": pa.array(values, pa.binary())}),
                   path, row_group_size=96)
    fs, p = filesystem(str(path))
    info = fs.info(p)
    shard = Shard(url=fs.unstrip_protocol(p), size=int(info["size"]), version=file_version(info),
                  row_groups=(0, pq.read_metadata(path).num_row_groups), rows=len(values))
    model = digits["model"].read_bytes()
    parts = {}
    with OnnxRuntimeBackend(model, BackendConfig(device="cuda")) as backend:
        metas = {m.name: m for m in backend.inputs}
        for decode in ("cpu", "gpu", "auto"):
            spec = resolve(metas["pixels"], mean=MEAN, std=STD, on_error="skip", draft=False,
                           decode="auto" if decode == "auto" else decode)
            threads = FAST_THREADS if decode == "auto" else 4
            config = WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(),
                                  output_url=str(tmp_path / decode), bindings=(), keep=("uid",),
                                  batch_size=64, preprocess=(spec,),
                                  postprocess=(ArgmaxPost(output="logits"),),
                                  preprocess_threads=threads)
            images, how = open_gpu_images(config.preprocess, metas, True, 0, threads)
            assert how.split(" ")[0] == {"cpu": "cpu", "gpu": "gpu", "auto": "cpu+gpu"}[decode]
            try:
                with SlotPool(backend, 3, 64) as pool:
                    result = process_shard(shard, config, backend, slots=pool, images=images)
            finally:
                if images is not None:
                    images.close()
            assert result.rows_failed == 3
            assert [f["key"]["uid"] for f in result.row_failures] == [13, 200, 401]
            parts[decode] = (result, pq.read_table(result.part_url))
    cpu, cpu_table = parts["cpu"]
    for decode in ("gpu", "auto"):
        gpu, gpu_table = parts[decode]
        assert [f["reason"] for f in cpu.row_failures] == [f["reason"] for f in gpu.row_failures]
        np.testing.assert_array_equal(cpu_table.column("uid").to_numpy(),
                                      gpu_table.column("uid").to_numpy())
        same = float(np.mean(cpu_table.column("label").to_numpy()
                             == gpu_table.column("label").to_numpy()))
        print(f"slot pipeline, decode {decode} vs CPU decode: same labels {same:.4f} of "
              f"{gpu.rows} rows")
        assert same >= 0.99
