"""`--precision` on ONNX Runtime: fp16/bf16 through the same conversion as TensorRT, on CUDA.

The CPU provider is refused (it computes FP16 graphs in FP32). Tests marked `gpu` run the
models of `tests.precision_models` on ONNX Runtime's CUDA provider, whose kernels compute in
FP16/BF16 (`test_cuda_computes_in_fp16` shows it), against the FP32 model on the CPU; they skip,
saying why, where there is no GPU or no onnxruntime-gpu.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.models import two_input_model
from tests.precision_models import MODELS
from tests.workers.test_onnx_precision import TOLERANCE, qdq_model, relative_error, run_fp32
from workers.backends import BackendConfig, create_backend
from workers.backends.onnxruntime import check_precision, cuda_provider_available
from workers.errors import SpecError
from workers.onnx_precision import model_types


def _gpu_reason() -> str | None:
    from workers import cuda

    try:
        count = cuda.device_count()
    except Exception as exc:  # a driver problem is a reason to skip here, reported as such
        return f"CUDA is unusable here: {exc}"
    if count < 1:
        return "no CUDA device visible to this process"
    if not cuda_provider_available():
        return "ONNX Runtime has no CUDA provider here (pip install onnxruntime-gpu)"
    return None


GPU_REASON = _gpu_reason()
needs_ort_cuda = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")

CPU_REFUSAL = ("precision fp16 with ONNX Runtime needs its CUDA provider, and this runs on the "
               "CPU provider, which computes fp16 models in fp32 behind inserted Casts (neither "
               "fp16 nor faster); run on GPU nodes with onnxruntime-gpu (pip install '.[gpu]'), "
               "or use --precision fp32")


# Everywhere ------------------------------------------------------------------------------------
def test_cpu_provider_refuses_fp16() -> None:
    backend = create_backend("onnxruntime", two_input_model(),
                             BackendConfig(device="cpu", precision="fp16"))
    with pytest.raises(SpecError, match=re.escape(CPU_REFUSAL)):
        backend.load()
    with pytest.raises(SpecError, match="precision bf16 with ONNX Runtime needs its CUDA provider"):
        check_precision("bf16", "cpu", model_types(two_input_model()))


def test_int8_needs_qdq_nodes_then_runs_them_as_they_are() -> None:
    with pytest.raises(SpecError, match=re.escape(
            "precision int8 needs a model with explicit quantization (QuantizeLinear/"
            "DequantizeLinear nodes producing int8), and the model has none; quantize it with "
            "NVIDIA ModelOpt")):
        create_backend("onnxruntime", two_input_model(),
                       BackendConfig(device="cpu", precision="int8")).load()
    model = qdq_model(TensorProto.INT8, 17)
    x = np.random.default_rng(1).uniform(-4, 4, (8, 4)).astype(np.float32)
    with create_backend("onnxruntime", model, BackendConfig(device="cpu", precision="int8")) as b:
        got = b.infer({"x": x})["y"]
    np.testing.assert_array_equal(got, run_fp32(model, {"x": x})[0])


def test_fp32_loads_the_model_unchanged() -> None:
    model = two_input_model()
    with create_backend("onnxruntime", model, BackendConfig(device="cpu")) as backend:
        assert backend._session_model is model  # type: ignore[attr-defined]


def test_fp16_of_a_model_with_external_weights_is_refused_clearly() -> None:
    """The conversion reads inline weights only; a model whose weights the driver read from
    files beside it is refused, naming the fix (the check runs before any provider is made)."""
    from tests.security.test_external_data import initializer_model
    from workers.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(initializer_model("w.bin"), BackendConfig(precision="fp16"),
                                 external_data={"w.bin": np.ones(4, np.float32).tobytes()})
    with pytest.raises(SpecError, match=re.escape(
            "--precision fp16 on ONNX Runtime converts the model, and this one keeps its weights "
            "in external files, which the conversion does not read; save the model with its "
            "weights inline")):
        backend._precision_model("cuda")


# On a GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_ort_cuda
def test_cuda_computes_in_fp16() -> None:
    """Exp(12) is inf in FP16: the CUDA provider shows it, where the CPU provider gave 162754.8."""
    nodes = [helper.make_node("Exp", ["x"], ["e"]),
             helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "exp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CUDAExecutionProvider"])
    y, = session.run(None, {"x": np.array([12.0, 1.0], np.float16)})
    assert np.isinf(y[0]) and y[1] == pytest.approx(np.e, rel=1e-3)


@pytest.mark.gpu
@needs_ort_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_precision_models_on_cuda(name: str, precision: str) -> None:
    make_model, make_inputs = MODELS[name]
    model = make_model()
    feed = make_inputs(16, seed=7)
    want = run_fp32(model, feed)
    config = BackendConfig(device="cuda", precision=precision)
    with create_backend("onnxruntime", model, config) as backend:
        assert backend.device == "cuda"  # type: ignore[attr-defined]
        assert model_types(backend._session_model).computes_in(precision)  # type: ignore[attr-defined]
        got = backend.infer(feed)
        # The same batch through a device slot (its own session on its own stream).
        slot = backend.open_slot(16)
        try:
            for key, value in feed.items():
                np.copyto(slot.host_inputs[key], value)
            slot.submit(16)
            slotted = {k: v.copy() for k, v in slot.wait().items()}
        finally:
            slot.close()
    names = [meta.name for meta in backend.outputs]
    for out, reference in zip(names, want, strict=True):
        assert relative_error(got[out], reference) <= TOLERANCE[precision], (name, out)
        np.testing.assert_array_equal(slotted[out], got[out])
