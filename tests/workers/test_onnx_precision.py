"""Model type detection and the FP32 -> FP16/BF16 conversion TensorRT 11 builds rely on.

The converted models are run with ONNX Runtime on the CPU (FP16) and compared with the FP32
original; BF16 models, which ONNX Runtime's CPU provider cannot run, are checked structurally.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.models import two_input_model
from workers.errors import SpecError
from workers.onnx_precision import convert_float, model_types


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


def run(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feed)]


def test_model_types() -> None:
    plain = model_types(two_input_model())
    assert plain.floats == {"fp32"} and not plain.quantized and not plain.subgraphs
    assert model_types(qdq_model(TensorProto.INT8, 17)).quantized == {"int8"}
    assert model_types(qdq_model(TensorProto.FLOAT8E4M3FN, 19)).quantized == {"fp8"}
    assert model_types(if_model()).subgraphs
    assert model_types(convert_float(two_input_model(), "fp16")).carries("fp16")


def test_fp16_conversion_matches_fp32_and_keeps_io_types() -> None:
    model = two_input_model(seed=4)
    converted = convert_float(model, "fp16")
    proto = onnx.load_model_from_string(converted)
    assert {i.name: i.data_type for i in proto.graph.initializer}["w1"] == TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT
               for v in [*proto.graph.input, *proto.graph.output])
    rng = np.random.default_rng(8)
    feed = {"image": rng.standard_normal((9, 3, 4, 4)).astype(np.float32),
            "meta": rng.standard_normal((9, 8)).astype(np.float32)}
    for want, got in zip(run(model, feed), run(converted, feed), strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 2e-3 * max(np.abs(want).max(), 1.0)


def test_fp32_only_inputs_stay_fp32() -> None:
    model = conv_resize_model()
    proto = onnx.load_model_from_string(convert_float(model, "fp16"))
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert types == {"w": TensorProto.FLOAT16, "scales": TensorProto.FLOAT}
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want, = run(model, {"x": x})
    got, = run(proto.SerializeToString(), {"x": x})
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def test_bf16_conversion_is_a_valid_model() -> None:
    proto = onnx.load_model_from_string(convert_float(conv_resize_model(), "bf16"))
    onnx.checker.check_model(proto, full_check=True)
    # Conv and Relu take bfloat16 only from opset 22: the model was upgraded to it.
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [22]
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert types == {"w": TensorProto.BFLOAT16, "scales": TensorProto.FLOAT}
    fill = next(n for n in proto.graph.node if n.op_type == "ConstantOfShape")
    assert fill.attribute[0].t.data_type == TensorProto.BFLOAT16
    weights = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))
    assert weights.dtype == ml_dtypes.bfloat16


def test_conversion_refuses_subgraphs_and_names_modelopt() -> None:
    with pytest.raises(SpecError, match=re.escape(
            "model has control-flow subgraphs (If/Loop/Scan), which the built-in fp16 conversion "
            "does not rewrite; convert it offline with NVIDIA ModelOpt (python -m "
            "modelopt.onnx.autocast --onnx_path MODEL.onnx --low_precision_type fp16)")):
        convert_float(if_model(), "fp16")


def test_conversion_refuses_other_precisions_and_non_models() -> None:
    with pytest.raises(SpecError, match=r"precision must be one of \['bf16', 'fp16'\], got 'int8'"):
        convert_float(two_input_model(), "int8")
    with pytest.raises(SpecError, match="model is not an ONNX model"):
        convert_float(b"\x00not a model", "fp16")
