"""Model type detection and the FP32 -> FP16/BF16 conversion both engines run.

Converted models are computed with ONNX's reference evaluator, which runs every operator in
numpy at the tensors' own types: float16 arithmetic rounds and overflows as FP16 does (Exp(12)
is inf), and bfloat16 goes through ml_dtypes. ONNX Runtime's CPU provider cannot serve as that
reference: it computes most FP16 operators in FP32 behind Casts (`test_the_reference_is_fp16`).
The FP32 original, run by ONNX Runtime, is what the results are compared with. The same models
run on ONNX Runtime's CUDA provider in tests/backends/test_onnxruntime_precision.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tests.models import two_input_model
from tests.precision_models import (
    MODELS,
    attention_inputs,
    attention_model,
    large_values_inputs,
    large_values_model,
    resize_inputs,
    resize_model,
    shared_constant_model,
)
from workers.errors import SpecError
from workers.onnx_precision import (
    CONVERSION_REVISION,
    FP16_MAX_FINITE,
    convert_float,
    converter_version,
    model_types,
)

# Largest error relative to the output's largest magnitude, per precision (FP16 has 11
# significant bits, BF16 8; the models chain a handful of rounded operations).
TOLERANCE = {"fp16": 3e-3, "bf16": 3e-2}


def conv_resize_model() -> bytes:
    """Conv -> Relu -> Resize(scales) + ConstantOfShape: exercises fp32-only inputs and constants."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Resize", ["r", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Shape", ["up"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["fill"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Add", ["up", "fill"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv_resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def qdq_model(zero_point_type: int, opset: int) -> bytes:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul: explicit quantization."""
    if zero_point_type == TensorProto.INT8:
        zero = numpy_helper.from_array(np.array(0, np.int8), "zp")
    else:
        zero = numpy_helper.from_array(np.array(0, ml_dtypes.float8_e4m3fn), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"]),
             helper.make_node("MatMul", ["dq", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.array(0.05, np.float32), "scale"), zero,
         numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model.SerializeToString()


def if_model() -> bytes:
    """A model with an If node: a control-flow subgraph."""
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(
        nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
                      helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def run_fp32(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feed)]


def run_low(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The converted model computed at its own types (numpy float16, ml_dtypes bfloat16)."""
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feed)]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.isfinite(got).all(), "NaN or inf in the converted model's output"
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))


def initializer_types(model: bytes) -> dict[str, int]:
    return {i.name: i.data_type for i in onnx.load_model_from_string(model).graph.initializer}


# Types ---------------------------------------------------------------------------------------
def test_model_types() -> None:
    plain = model_types(two_input_model())
    assert plain.floats == {"fp32"} and not plain.quantized and not plain.subgraphs
    assert plain.weights == {"fp32"}
    assert model_types(qdq_model(TensorProto.INT8, 17)).quantized == {"int8"}
    assert model_types(qdq_model(TensorProto.FLOAT8E4M3FN, 19)).quantized == {"fp8"}
    assert model_types(if_model()).subgraphs
    converted = model_types(convert_float(two_input_model(), "fp16"))
    assert converted.carries("fp16") and converted.computes_in("fp16")
    assert not plain.computes_in("fp16")


def test_one_fp16_tensor_does_not_make_an_fp16_model() -> None:
    proto = onnx.load_model_from_string(two_input_model())
    proto.graph.node.extend([helper.make_node("Cast", ["logits"], ["half"], to=TensorProto.FLOAT16),
                             helper.make_node("Cast", ["half"], ["again"], to=TensorProto.FLOAT)])
    proto.graph.output.append(helper.make_tensor_value_info("again", TensorProto.FLOAT, ["N", 5]))
    types = model_types(proto)
    assert types.carries("fp16") and not types.computes_in("fp16")
    # ... and converting it (the FP32 weights) is allowed.
    assert initializer_types(convert_float(proto, "fp16"))["w1"] == TensorProto.FLOAT16


# The reference -------------------------------------------------------------------------------
def test_the_reference_is_fp16() -> None:
    """Exp(12) overflows FP16; ONNX Runtime's CPU provider does not show it, numpy float16 does."""
    nodes = [helper.make_node("Exp", ["x"], ["e"]),
             helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "exp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    x = np.array([12.0, 1.0], np.float16)
    on_cpu, = run_fp32(data, {"x": x})
    assert on_cpu[0] == pytest.approx(162754.8, rel=1e-6)  # computed in FP32
    with np.errstate(over="ignore"):
        assert np.isinf(run_low(data, {"x": x})[0][0])


# Every model, both precisions ----------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_models_compute_in_low_precision_and_match_fp32(name: str, precision: str) -> None:
    make_model, make_inputs = MODELS[name]
    model = make_model()
    converted = convert_float(model, precision)
    proto = onnx.load_model_from_string(converted)
    onnx.checker.check_model(proto, full_check=True)
    # I/O keep their types, so the same columns feed the converted model.
    original = onnx.load_model_from_string(model)
    assert ([(v.name, v.type.tensor_type.elem_type) for v in [*proto.graph.input, *proto.graph.output]]
            == [(v.name, v.type.tensor_type.elem_type)
                for v in [*original.graph.input, *original.graph.output]])
    low = LOW_TYPE[precision]
    assert any(t == low for t in initializer_types(converted).values()) or name == "large_values"
    feed = make_inputs(7, seed=5)
    for got, want in zip(run_low(converted, feed), run_fp32(model, feed), strict=True):
        assert relative_error(got, want) <= TOLERANCE[precision], name


LOW_TYPE = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def test_constant_resize_scales_stay_fp32() -> None:
    """4/3 in FP16 is 1.333: 3 pixels would resize to 3, not 4."""
    converted = convert_float(resize_model(), "fp16")
    proto = onnx.load_model_from_string(converted)
    scales = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}["scales"]
    assert scales.dtype == np.float32 and scales[2] == np.float32(4 / 3)
    got, = run_low(converted, resize_inputs(2, seed=1))
    assert got.shape == (2, 4, 4, 4)


def test_attention_mask_and_layernorm_epsilon_are_clamped_not_infinite() -> None:
    converted = convert_float(attention_model(), "fp16")
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load_model_from_string(converted)
               .graph.initializer}
    assert weights["fmin"].dtype == np.float16 and weights["fmin"] == -FP16_MAX_FINITE
    assert weights["eps"] > 0
    # Rows with padding are the ones 0 * -inf turned into NaN.
    feed = attention_inputs(9, seed=2)
    assert (feed["mask"] == 0).any()
    got, = run_low(converted, feed)
    assert np.isfinite(got).all()
    bf16 = {i.name: numpy_helper.to_array(i) for i in onnx.load_model_from_string(
        convert_float(attention_model(), "bf16")).graph.initializer}
    # finfo(float32).min rounds to -inf in BF16: clamped to BF16's largest finite value.
    assert np.isfinite(bf16["fmin"].astype(np.float32)) and bf16["fmin"] < -1e38


def test_shared_unnamed_constant_and_unnamed_nodes() -> None:
    model = shared_constant_model()
    assert not any(n.name for n in onnx.load_model_from_string(model).graph.node
                   if n.op_type in ("Resize", "Constant"))
    converted = convert_float(model, "fp16")
    proto = onnx.load_model_from_string(converted)
    names = [n.name for n in proto.graph.node]
    assert len(names) == len(set(names)) and all(names)
    types = initializer_types(converted)
    # The Resize nodes read an FP32 copy; the Mul reads the FP16 original.
    assert types["scales"] == TensorProto.FLOAT16 and types["scales__fp32"] == TensorProto.FLOAT


def test_large_intermediate_values_are_computed_in_fp32() -> None:
    """Squares of ~300 and Exp(12) pass FP16's 65504; the reductions around them stay FP32."""
    model = large_values_model()
    converted = onnx.shape_inference.infer_shapes(
        onnx.load_model_from_string(convert_float(model, "fp16")))
    elem = {v.name: v.type.tensor_type.elem_type for v in converted.graph.value_info}
    for node in converted.graph.node:
        if node.op_type in ("Pow", "ReduceSum", "Exp", "Log", "Sqrt"):
            assert elem.get(node.output[0], TensorProto.FLOAT) == TensorProto.FLOAT, node.name
    feed = large_values_inputs(6, seed=3)
    assert np.abs(feed["x"] * 40).max() ** 2 > 65504
    for got, want in zip(run_low(converted.SerializeToString(), feed), run_fp32(model, feed),
                         strict=True):
        assert relative_error(got, want) <= TOLERANCE["fp16"]


@pytest.mark.parametrize("make_model", [two_input_model, conv_resize_model])
def test_onnxruntime_cpu_still_runs_converted_models(make_model: Callable[[], bytes]) -> None:
    model = make_model()
    converted = convert_float(model, "fp16")
    rng = np.random.default_rng(8)
    if make_model is two_input_model:
        feed = {"image": rng.standard_normal((9, 3, 4, 4)).astype(np.float32),
                "meta": rng.standard_normal((9, 8)).astype(np.float32)}
    else:
        feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for got, want in zip(run_fp32(converted, feed), run_fp32(model, feed), strict=True):
        assert relative_error(got, want) <= TOLERANCE["fp16"]


def test_bf16_conversion_upgrades_the_opset() -> None:
    proto = onnx.load_model_from_string(convert_float(conv_resize_model(), "bf16"))
    onnx.checker.check_model(proto, full_check=True)
    # Conv and Relu take bfloat16 only from opset 22: the model was upgraded to it.
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [22]
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert types["w"] == TensorProto.BFLOAT16 and types["scales"] == TensorProto.FLOAT
    weights = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))
    assert weights.dtype == ml_dtypes.bfloat16


def test_converter_version_names_the_converter_and_our_passes() -> None:
    from importlib import metadata

    assert converter_version() == (f"onnxconverter-common {metadata.version('onnxconverter-common')}"
                                   f"; passes r{CONVERSION_REVISION}")


# Refusals ------------------------------------------------------------------------------------
def test_conversion_refuses_subgraphs_and_names_modelopt() -> None:
    with pytest.raises(SpecError, match=re.escape(
            "model has control-flow subgraphs (If/Loop/Scan), which the built-in fp16 conversion "
            "does not rewrite; convert it offline with NVIDIA ModelOpt (python -m "
            "modelopt.onnx.autocast --onnx_path MODEL.onnx --low_precision_type fp16 "
            "--keep_io_types)")):
        convert_float(if_model(), "fp16")


def test_conversion_refuses_other_precisions_and_non_models() -> None:
    with pytest.raises(SpecError, match=r"precision must be one of \['bf16', 'fp16'\], got 'int8'"):
        convert_float(two_input_model(), "int8")
    with pytest.raises(SpecError, match="model is not an ONNX model"):
        convert_float(b"\x00not a model", "fp16")
