"""TensorRT: plan builds, the backend contract, device slots, compatibility options, CLI, job.

Marked `tensorrt`: these run wherever `tensorrt` imports with a CUDA GPU, and are skipped,
saying why, everywhere else (CI has neither). Plans are built at fixture time from the real
ONNX models of `tests.models`; results are compared with numpy and ONNX Runtime on the CPU.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from tests.backends.contract import CONTRACT_SEED, BackendContract, reference
from tests.models import two_input_model
from workers.backends import BackendConfig, create_backend
from workers.backends.base import Backend
from workers.errors import BackendError, MissingDependencyError, SpecError
from workers.plan_build import BuildConfig, BuildResult, build_plan


def _unavailable() -> str | None:
    from workers.backends.tensorrt import import_tensorrt

    try:
        import_tensorrt(builder=True)
    except MissingDependencyError:
        return "TensorRT is not installed (no tensorrt package with a Builder)"
    from workers import cuda

    if cuda.device_count() < 1:
        return "TensorRT is installed, but no CUDA GPU is visible to this process"
    return None


REASON = _unavailable()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
MAX_BATCH = 64


def capability() -> tuple[int, int]:
    from workers import cuda

    return cuda.compute_capability(0)


def batch(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((rows, 3, 4, 4)).astype(np.float32),
            "meta": rng.standard_normal((rows, 8)).astype(np.float32)}


def close_to(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tolerance: float) -> None:
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        scale = max(float(np.abs(value).max()), 1.0)
        assert float(np.abs(got[name] - value).max()) <= tolerance * scale, name


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return two_input_model(seed=CONTRACT_SEED)


@pytest.fixture(scope="module")
def fp32_plan(model_bytes: bytes) -> BuildResult:
    return build_plan(model_bytes, BuildConfig.for_batch(MAX_BATCH))


class TestTensorRTContract(BackendContract):
    """The contract every backend runs, over an FP32 plan (TF32 off: FP32 accuracy)."""

    tolerance = 1e-4

    @pytest.fixture
    def backend(self, fp32_plan: BuildResult) -> Iterator[Backend]:
        with create_backend("tensorrt", fp32_plan.plan) as backend:
            yield backend


def test_build_result_describes_the_plan(fp32_plan: BuildResult) -> None:
    import tensorrt

    assert fp32_plan.tensorrt == tensorrt.__version__
    assert fp32_plan.capability == capability()
    assert [m.name for m in fp32_plan.inputs] == ["image", "meta"]
    assert [m.shape for m in fp32_plan.outputs] == [(None, 5), (None, 1)]
    assert fp32_plan.timing_cache and len(fp32_plan.plan) > 0
    assert "TF32 off" in fp32_plan.precision_how


def test_backend_metadata_and_limits(fp32_plan: BuildResult) -> None:
    with create_backend("tensorrt", fp32_plan.plan) as backend:
        assert backend.uses_slots and backend.max_rows == MAX_BATCH  # type: ignore[attr-defined]
        with pytest.raises(BackendError, match=re.escape(
                f"the plan runs at most {MAX_BATCH} rows per batch (its optimization profile), "
                f"and a slot of {MAX_BATCH + 1} was asked for")):
            backend.open_slot(MAX_BATCH + 1)


def test_batches_larger_than_the_profile_run_in_pieces(fp32_plan: BuildResult,
                                                       model_bytes: bytes) -> None:
    data = batch(2 * MAX_BATCH + 13, seed=4)
    with create_backend("tensorrt", fp32_plan.plan) as backend:
        got = backend.infer(data)
    close_to(got, reference(model_bytes, data["image"], data["meta"]), 1e-4)


def test_slots_keep_batches_in_flight(fp32_plan: BuildResult, model_bytes: bytes) -> None:
    batches = [batch(rows, seed=rows) for rows in (32, 32, 17)]
    with create_backend("tensorrt", fp32_plan.plan) as backend:
        slots = [backend.open_slot(32) for _ in range(2)]
        try:
            results = []
            # Two in flight (the second's execution waiting for the first's, as SlotPool
            # orders them), then reuse the first slot for the partial third batch.
            for slot, data in zip(slots, batches[:2], strict=True):
                for name, array in data.items():
                    np.copyto(slot.host_inputs[name][: len(array)], array)
                slot.submit(len(data["image"]),
                            after=None if slot is slots[0] else slots[0].executed)
            for slot in slots:
                results.append({k: v.copy() for k, v in slot.wait().items()})
            third = batches[2]
            for name, array in third.items():
                np.copyto(slots[0].host_inputs[name][: len(array)], array)
            slots[0].submit(17)
            results.append({k: v.copy() for k, v in slots[0].wait().items()})
            assert set(slots[0].stage_seconds()) == {"h2d", "compute", "d2h"}
            with pytest.raises(BackendError, match="wait\\(\\) on a slot with no batch submitted"):
                slots[0].wait()
            with pytest.raises(BackendError, match="a batch of 33 rows does not fit a device "
                                                   "slot of 32 rows"):
                slots[1].submit(33)
        finally:
            for slot in slots:
                slot.close()
                slot.close()  # idempotent
    for data, got in zip(batches, results, strict=True):
        close_to(got, reference(model_bytes, data["image"], data["meta"]), 1e-4)


def test_pipeline_runs_a_shard_through_slots(fp32_plan: BuildResult, model_bytes: bytes,
                                             tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from tests.models import write_dataset
    from tests.workers.test_pipeline import whole_file_shard, worker_config
    from workers.pipeline import process_shard

    path = write_dataset(str(tmp_path / "in"), files=1, rows_per_file=500, row_group_rows=120,
                         seed=2)[0]
    shard = whole_file_shard(path)
    with create_backend("onnxruntime", model_bytes, BackendConfig(device="cpu")) as cpu:
        want = pq.read_table(process_shard(shard, worker_config(tmp_path / "cpu"), cpu).part_url)
    with create_backend("tensorrt", fp32_plan.plan) as gpu:
        result = process_shard(shard, worker_config(tmp_path / "gpu", slots=3), gpu)
    got = pq.read_table(result.part_url)
    assert got.column("uid").equals(want.column("uid"))
    a = np.stack(got.column("logits").combine_chunks().to_numpy_ndarray())
    b = np.stack(want.column("logits").combine_chunks().to_numpy_ndarray())
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


def test_fp16_plan(model_bytes: bytes) -> None:
    result = build_plan(model_bytes, BuildConfig.for_batch(MAX_BATCH, precision="fp16"))
    assert "BuilderFlag.FP16" in result.precision_how or "converted to fp16" in result.precision_how
    assert [m.dtype for m in result.inputs] == [np.float32, np.float32]  # I/O stays FP32
    data = batch(40, seed=9)
    with create_backend("tensorrt", result.plan) as backend:
        close_to(backend.infer(data), reference(model_bytes, data["image"], data["meta"]), 1e-2)


def test_bf16_plan(model_bytes: bytes) -> None:
    if capability() < (8, 0):
        with pytest.raises(SpecError, match=r"precision bf16 needs compute capability 8\.0"):
            build_plan(model_bytes, BuildConfig.for_batch(MAX_BATCH, precision="bf16"))
        return
    result = build_plan(model_bytes, BuildConfig.for_batch(MAX_BATCH, precision="bf16"))
    data = batch(40, seed=10)
    with create_backend("tensorrt", result.plan) as backend:
        close_to(backend.infer(data), reference(model_bytes, data["image"], data["meta"]), 5e-2)


def test_int8_from_qdq_nodes() -> None:
    from tests.workers.test_onnx_precision import qdq_model

    model = qdq_model(TensorProto.INT8, 17)
    result = build_plan(model, BuildConfig.for_batch(16, precision="int8"))
    assert "Q/DQ" in result.precision_how
    x = np.random.default_rng(1).uniform(-4, 4, (16, 4)).astype(np.float32)
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with create_backend("tensorrt", result.plan) as backend:
        got = backend.infer({"x": x})["y"]
    assert np.abs(got - want).max() <= 0.05 * 4  # one quantization step per input element


def test_hardware_compatible_plan(model_bytes: bytes) -> None:
    if capability() < (8, 0):
        pytest.skip("AMPERE_PLUS plans need an Ampere or newer GPU")
    result = build_plan(model_bytes, BuildConfig.for_batch(16, hardware_compatible=True))
    data = batch(16, seed=11)
    with create_backend("tensorrt", result.plan) as backend:
        close_to(backend.infer(data), reference(model_bytes, data["image"], data["meta"]), 1e-4)


def test_version_compatible_plan_loads_with_host_code_allowed(model_bytes: bytes) -> None:
    result = build_plan(model_bytes, BuildConfig.for_batch(16, version_compatible=True))
    data = batch(16, seed=12)
    config = BackendConfig(engine_host_code_allowed=True)
    with create_backend("tensorrt", result.plan, config) as backend:
        close_to(backend.infer(data), reference(model_bytes, data["image"], data["meta"]), 1e-4)


def test_fixed_batch_plan_pads_partial_batches(tmp_path: Path) -> None:
    from tests.test_plan_cli import model_with

    model = model_with([("x", [8, 5])])
    result = build_plan(model, BuildConfig.for_batch(8))
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    with create_backend("tensorrt", result.plan) as backend:
        got = backend.infer({"x": x})["x_out"]
    np.testing.assert_array_equal(got, np.maximum(x, 0))


def test_parser_errors_name_the_unsupported_node() -> None:
    from onnx import helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_node"),
             helper.make_node("Mystery", ["r"], ["y"], name="mystery_node", domain="com.example")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(SpecError, match=r"TensorRT cannot parse model \(\d+ error\(s\)\):\n"
                                        r"  node 1 'mystery_node' \(Mystery\): .*\[") as info:
        build_plan(model.SerializeToString(), BuildConfig.for_batch(4))
    assert str(info.value).endswith(
        "or run with --backend onnxruntime; an operator TensorRT has no importer for (Mystery) may "
        "be a plugin layer: load its library with --plugins LIB")


def efficient_nms_model(boxes: int = 8, classes: int = 3, keep: int = 4) -> bytes:
    """boxes [N,B,4] + scores [N,B,C] -> TensorRT's standard EfficientNMS_TRT plugin layer."""
    from onnx import helper

    node = helper.make_node(
        "EfficientNMS_TRT", ["boxes", "scores"],
        ["num_detections", "detection_boxes", "detection_scores", "detection_classes"],
        name="nms", plugin_version="1", background_class=-1, max_output_boxes=keep,
        score_threshold=0.05, iou_threshold=0.5, score_activation=0, box_coding=0)
    graph = helper.make_graph(
        [node], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", boxes, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", boxes, classes])],
        [helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["N", 1]),
         helper.make_tensor_value_info("detection_boxes", TensorProto.FLOAT, ["N", keep, 4]),
         helper.make_tensor_value_info("detection_scores", TensorProto.FLOAT, ["N", keep]),
         helper.make_tensor_value_info("detection_classes", TensorProto.INT32, ["N", keep])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_standard_plugin_layer_parses_and_runs() -> None:
    """EfficientNMS_TRT comes from libnvinfer_plugin: registered by init_libnvinfer_plugins."""
    result = build_plan(efficient_nms_model(), BuildConfig.for_batch(4))
    rng = np.random.default_rng(5)
    # Eight disjoint boxes, three classes: NMS (per class) suppresses nothing, so the four
    # detections are the four best (box, class) scores.
    corners = np.arange(8, dtype=np.float32)[:, None] * 10
    boxes = np.concatenate([corners, corners, corners + 5, corners + 5], axis=1)
    batch_boxes = np.repeat(boxes[None], 2, axis=0)
    scores = rng.uniform(0.1, 1.0, (2, 8, 3)).astype(np.float32)
    with create_backend("tensorrt", result.plan) as backend:
        out = backend.infer({"boxes": batch_boxes, "scores": scores})
    for n in range(2):
        assert int(out["num_detections"][n, 0]) == 4
        best = np.sort(scores[n].ravel())[::-1][:4]
        np.testing.assert_allclose(out["detection_scores"][n], best, rtol=1e-5)


def test_timing_cache_is_reused(model_bytes: bytes, fp32_plan: BuildResult) -> None:
    """Loaded, not merely unrejected: with a logger per object the warnings were always empty."""
    assert fp32_plan.timing_cache and not fp32_plan.timing_cache_loaded
    again = build_plan(model_bytes, BuildConfig.for_batch(MAX_BATCH),
                       timing_cache=fp32_plan.timing_cache)
    assert again.plan and again.timing_cache_loaded
    assert not any("timing cache ignored" in w for w in again.warnings)
    corrupt = build_plan(model_bytes, BuildConfig.for_batch(MAX_BATCH),
                         timing_cache=b"\x00" * 64)
    assert not corrupt.timing_cache_loaded
    assert any("timing cache ignored" in w for w in corrupt.warnings)


def test_tensorrt_errors_are_reported_after_other_objects_lived(fp32_plan: BuildResult) -> None:
    """TensorRT keeps the process's first logger: later loads must still see their errors."""
    with create_backend("tensorrt", fp32_plan.plan):
        pass  # a Runtime (and the module's builds before it) lived in this process
    broken = fp32_plan.plan[: len(fp32_plan.plan) // 2]
    with pytest.raises(BackendError, match="could not deserialize the plan") as info:
        create_backend("tensorrt", broken).load()
    assert "no error was logged" not in str(info.value)


def test_several_profiles_and_batches_below_a_minimum(model_bytes: bytes) -> None:
    config = BuildConfig(profiles=((1, 4, 8), (16, 32, 64)))
    result = build_plan(model_bytes, config)
    with create_backend("tensorrt", result.plan) as backend:
        assert backend.max_rows == 64  # type: ignore[attr-defined]
        slot = backend.open_slot(64)
        try:
            # 12 rows fit no profile: they run padded to 16 on the second.
            for rows in (3, 8, 12, 40, 64, 1):
                data = batch(rows, seed=100 + rows)
                for name, array in data.items():
                    np.copyto(slot.host_inputs[name][:rows], array)
                slot.submit(rows)
                close_to({k: v.copy() for k, v in slot.wait().items()},
                         reference(model_bytes, data["image"], data["meta"]), 1e-4)
        finally:
            slot.close()
        data = batch(150, seed=7)  # infer() splits past the largest profile
        close_to(backend.infer(data), reference(model_bytes, data["image"], data["meta"]), 1e-4)


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("fp16", 3e-2)])
def test_embedding_pooled_in_the_graph_at_each_batch_width(precision: str,
                                                            tolerance: float) -> None:
    """An encoder with its mean pooling in the graph (`workers.onnx_pooling`) builds with text
    profiles, and at every batch shape returns what host pooling makes of the hidden states."""
    from examples.reviews import encoder_model
    from workers.onnx_pooling import PooledModel, pool_in_graph
    from workers.postprocess import mean_pool

    encoder = encoder_model(300, seed=4).SerializeToString()
    pooled = pool_in_graph(encoder, "last_hidden_state", "mean", "attention_mask")
    assert isinstance(pooled, PooledModel), pooled
    result = build_plan(pooled.model_bytes, BuildConfig(precision=precision,
                                                        profiles=((1, 32, 64),),
                                                        lengths=((8, 32, 64),)))
    session = ort.InferenceSession(encoder, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    with create_backend("tensorrt", result.plan) as backend:
        assert [m.name for m in backend.outputs] == ["last_hidden_state_pooled"]
        for rows, width in ((5, 8), (33, 40), (64, 64), (1, 24)):
            lengths = rng.integers(1, width + 1, rows)
            mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
            feeds = {"input_ids": rng.integers(0, 300, (rows, width)), "attention_mask": mask,
                     "token_type_ids": np.zeros((rows, width), np.int64)}
            hidden = session.run(["last_hidden_state"], feeds)[0]
            got = backend.infer(feeds)
            close_to(got, {"last_hidden_state_pooled": mean_pool(hidden, mask)}, tolerance)


def test_a_second_gpu(model_bytes: bytes) -> None:
    from workers import cuda

    if cuda.device_count() < 2:
        pytest.skip("needs two GPUs (device_id 1)")
    result = build_plan(model_bytes, BuildConfig.for_batch(16), device=1)
    data = batch(16, seed=13)
    with create_backend("tensorrt", result.plan, BackendConfig(device_id=1)) as backend:
        close_to(backend.infer(data), reference(model_bytes, data["image"], data["meta"]), 1e-4)
        slot = backend.open_slot(16)
        try:
            for name, array in data.items():
                np.copyto(slot.host_inputs[name], array)
            slot.submit(16)
            close_to({k: v.copy() for k, v in slot.wait().items()},
                     reference(model_bytes, data["image"], data["meta"]), 1e-4)
        finally:
            slot.close()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["resize", "attention", "shared_constant", "large_values"])
def test_precision_on_realistic_graphs(name: str, precision: str) -> None:
    """Constant-held Resize scales, an HF attention mask with LayerNorm, a shared constant and
    values past FP16's range, built at the requested precision on this TensorRT."""
    from tests.precision_models import MODELS
    from tests.workers.test_onnx_precision import TOLERANCE, relative_error, run_fp32

    if precision == "bf16" and capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0+")
    make_model, make_inputs = MODELS[name]
    model = make_model()
    result = build_plan(model, BuildConfig.for_batch(16, precision=precision))
    feed = make_inputs(16, seed=9)
    with create_backend("tensorrt", result.plan) as backend:
        got = backend.infer(feed)
        names = [m.name for m in backend.outputs]
    for out, want in zip(names, run_fp32(model, feed), strict=True):
        assert relative_error(got[out], want) <= 2 * TOLERANCE[precision], (name, out)


def test_cli_build_and_inspect_layers(tmp_path: Path, model_bytes: bytes) -> None:
    from jobs.plan import main

    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes)
    plan = tmp_path / "m.plan"
    out = io.StringIO()
    assert main(["build", str(model), "-o", str(plan), "--max-batch", "16", "--detailed",
                 "--timing-cache", str(tmp_path / "timing.cache")], out) == 0
    assert out.getvalue().startswith(f"built {plan} (")
    sidecar = json.loads((tmp_path / "m.plan.json").read_text())
    assert sidecar["key"]["build"]["profiles"] == [[1, 16, 16]]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    out = io.StringIO()
    assert main(["inspect", str(plan), "--layers"], out) == 0
    text = out.getvalue()
    assert "  image  float32 [?,3,4,4]" in text and re.search(r"layers \([1-9]\d*\):", text)
    out = io.StringIO()
    assert main(["inspect", str(plan), "--json"], out) == 0
    summary = json.loads(out.getvalue())
    assert summary["inputs"][0]["profile"] == [[[1, 3, 4, 4], [16, 3, 4, 4], [16, 3, 4, 4]]]


@pytest.mark.ray
def test_job_builds_once_then_uses_the_cache(ray_cluster: None, tmp_path: Path, dataset: Path,
                                             model_bytes: bytes) -> None:
    from jobs.driver import run_job
    from jobs.spec import JobSpec
    from tests.test_job import read_input, read_output

    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes)
    cache = str(tmp_path / "plans")

    def spec(out: str) -> JobSpec:
        return JobSpec(model=str(model), input=str(dataset), output=out,
                       columns=(("image", "img"), ("meta", "features")), keep=("uid",),
                       batch_size=64, rows_per_shard=240, backend="tensorrt", workers=1,
                       plan_cache=cache, progress=False)

    first = run_job(spec(str(tmp_path / "out1")))
    assert first.exit_code == 0 and first.backend == "tensorrt"
    plans = first.manifest["plans"]
    assert [p["source"] for p in plans.values()] == ["built"]
    second = run_job(spec(str(tmp_path / "out2")))
    assert [p["source"] for p in second.manifest["plans"].values()] == ["cache"]
    source, result = read_input(str(dataset)).sort_by("uid"), read_output(str(tmp_path / "out2"))
    result = result.sort_by("uid")
    image = source.column("img").combine_chunks().to_numpy_ndarray()
    meta = np.stack(source.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    want = reference(model_bytes, image, meta)["logits"]
    got = result.column("logits").combine_chunks().to_numpy_ndarray()
    assert np.abs(got - want).max() <= 1e-4 * max(float(np.abs(want).max()), 1.0)


PLUGIN_SOURCE = Path(__file__).parent / "plugins" / "add_scalar.cu"


def tensorrt_include() -> str | None:
    """A directory holding TensorRT's headers (NvInferRuntime.h), if this machine has one."""
    import os

    candidates = [os.environ.get("TENSORRT_INCLUDE_DIR"), "/usr/include/x86_64-linux-gnu",
                  "/usr/include/aarch64-linux-gnu", "/usr/include", "/usr/local/tensorrt/include",
                  "/opt/tensorrt/include"]
    return next((c for c in candidates if c and (Path(c) / "NvInferRuntime.h").is_file()), None)


def test_a_plugin_library_built_from_cuda_source(tmp_path: Path) -> None:
    """--plugins end to end: a library compiled here, loaded by the build and by the backend."""
    import shutil
    import subprocess

    from onnx import helper

    from workers.plugins import digest_plugins

    nvcc, include = shutil.which("nvcc"), tensorrt_include()
    if nvcc is None or include is None:
        pytest.skip("needs nvcc and TensorRT's headers (set TENSORRT_INCLUDE_DIR)")
    lib = tmp_path / "libadd_scalar.so"
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-I", include, str(PLUGIN_SOURCE),
                    "-o", str(lib)], check=True, timeout=300)
    node = helper.make_node("AddScalarPlugin", ["x"], ["y"], name="add", scalar=2.5,
                            plugin_version="1")
    graph = helper.make_graph([node], "plugin",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    plugins = digest_plugins([str(lib)])
    result = build_plan(model.SerializeToString(), BuildConfig.for_batch(8, plugins=plugins))
    x = np.random.default_rng(6).standard_normal((5, 6)).astype(np.float32)
    # The same process loaded the library for the build: the backend must not load it twice.
    with create_backend("tensorrt", result.plan, BackendConfig(plugins=plugins)) as backend:
        np.testing.assert_allclose(backend.infer({"x": x})["y"], x + 2.5, rtol=1e-6)
