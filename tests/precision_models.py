"""Real ONNX models that FP16/BF16 conversion gets wrong when done naively, with their inputs.

Each is what an exporter produces for a common model part (random weights, fixed seeds):

- `resize_model`: PyTorch's `F.interpolate(scale_factor=4/3)` export: the Resize scales are
  held in a `Constant` node. Rounded to FP16, 4/3 becomes 1.333, and 3 pixels resize to 3, not 4.
- `attention_model`: a Hugging Face encoder block: the additive attention mask
  `(1 - mask) * finfo(float32).min`, softmax attention, and a decomposed LayerNorm
  (ReduceMean, Sub, Pow, Sqrt, Div) with epsilon 1e-12. Unclamped, finfo.min becomes -inf and
  `0 * -inf` makes every output NaN; epsilon 1e-12 becomes 0.
- `shared_constant_model`: unnamed nodes, and one unnamed `Constant` read by an FP32-only input
  (Resize scales) and by an ordinary op, and two unnamed Resize nodes.
- `large_values_model`: intermediate values past FP16's 65504: an L2 norm of values around 300
  (their squares) and a log-sum-exp of values up to 12 (Exp(12) = 162754.8).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto]) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tests.precision_models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    """An unnamed Constant node (as exporters write them) producing `name`."""
    return helper.make_node("Constant", [], [name],
                            value=numpy_helper.from_array(np.asarray(value), f"{name}_value"))


def resize_model(seed: int = 0) -> bytes:
    """x [N,2,3,3] -> Conv -> Resize(scales 4/3 from a Constant, linear) -> y [N,4,4,4]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        _const("scales", np.array([1, 1, 4 / 3, 4 / 3], np.float32)),
        helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="linear", name="resize"),
    ]
    return _model(nodes, "resize",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
                  [numpy_helper.from_array(
                      rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.3, "w")])


def resize_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 2, 3, 3)).astype(np.float32)}


SEQ, DIM = 6, 8


def attention_model(seed: int = 0) -> bytes:
    """x [N,6,8] float32, mask [N,6] int64 (1 = token, 0 = padding) -> y [N,6,8] float32.

    One attention head with the HF extended mask, a residual, and LayerNorm as PyTorch
    exports it below opset 17 (eps 1e-12).
    """
    rng = np.random.default_rng(seed)
    weights = {n: (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
               for n in ("wq", "wk", "wv")}
    gamma = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(DIM)).astype(np.float32)
    nodes = [
        # extended_attention_mask = (1.0 - mask[:, None, :].float()) * finfo(float32).min
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        _const("mask_axes", np.array([1], np.int64)),
        helper.make_node("Unsqueeze", ["maskf", "mask_axes"], ["mask3"]),
        _const("one", np.array(1.0, np.float32)),
        helper.make_node("Sub", ["one", "mask3"], ["inverted"]),
        _const("fmin", np.array(np.finfo(np.float32).min, np.float32)),
        helper.make_node("Mul", ["inverted", "fmin"], ["ext"]),
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        _const("scale", np.array(1 / np.sqrt(DIM), np.float32)),
        helper.make_node("Mul", ["qk", "scale"], ["scores"]),
        helper.make_node("Add", ["scores", "ext"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["att"]),
        helper.make_node("Add", ["att", "x"], ["h"]),
        # LayerNorm, decomposed
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["h", "mean"], ["centered"]),
        _const("two", np.array(2.0, np.float32)),
        helper.make_node("Pow", ["centered", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        _const("eps", np.array(1e-12, np.float32)),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, "attention",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, DIM]),
                   helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", SEQ])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ, DIM])],
                  [*(numpy_helper.from_array(w, n) for n, w in weights.items()),
                   numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")])


def attention_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Token embeddings and a padding mask with 1-6 real tokens per row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, SEQ + 1, rows)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": rng.standard_normal((rows, SEQ, DIM)).astype(np.float32), "mask": mask}


def shared_constant_model(seed: int = 0) -> bytes:
    """x [N,2,3,3] -> two unnamed Resize nodes sharing one unnamed scales Constant, which an
    ordinary Mul also reads; y [N,2,4,4] = Resize(x) * bias + Resize(2x) * scales."""
    rng = np.random.default_rng(seed)
    nodes = [
        _const("scales", np.array([1, 1, 4 / 3, 4 / 3], np.float32)),
        helper.make_node("Resize", ["x", "", "scales"], ["up1"], mode="linear"),
        _const("two", np.array(2.0, np.float32)),
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Resize", ["x2", "", "scales"], ["up2"], mode="linear"),
        # The scales again, as an ordinary operand (broadcast over the last axis).
        helper.make_node("Mul", ["up2", "scales"], ["up2s"]),
        helper.make_node("Mul", ["up1", "bias"], ["up1b"]),
        helper.make_node("Add", ["up1b", "up2s"], ["y"]),
    ]
    return _model(nodes, "shared_constant",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])],
                  [numpy_helper.from_array(
                      (1 + 0.1 * rng.standard_normal((1, 2, 1, 1))).astype(np.float32), "bias")])


def shared_constant_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 2, 3, 3)).astype(np.float32)}


def large_values_model(seed: int = 0) -> bytes:
    """x [N,16] -> (norm) 40x / ||40x||_2 and (lse) log(sum(exp(12 * tanh(x)))): y [N,16], z [N,1].

    40x reaches ~300 and its squares ~90,000; 12 * tanh(x) reaches 12 and Exp(12) 162,755: past
    FP16's largest finite value (65,504), while every output is small.
    """
    del seed  # no weights: the values come from the input
    nodes = [
        _const("gain", np.array(40.0, np.float32)),
        helper.make_node("Mul", ["x", "gain"], ["big"]),
        _const("two", np.array(2.0, np.float32)),
        helper.make_node("Pow", ["big", "two"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes"], ["ss"], keepdims=1),
        helper.make_node("Sqrt", ["ss"], ["norm"]),
        helper.make_node("Div", ["big", "norm"], ["y"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        _const("twelve", np.array(12.0, np.float32)),
        helper.make_node("Mul", ["t", "twelve"], ["logits"]),
        helper.make_node("Exp", ["logits"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axes"], ["se"], keepdims=1),
        helper.make_node("Log", ["se"], ["z"]),
    ]
    return _model(nodes, "large_values",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]),
                   helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1])],
                  [numpy_helper.from_array(np.array([1], np.int64), "axes")])


def large_values_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Rows around 0 with one large value each (so tanh reaches 1 and 40x reaches ~300)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    x[np.arange(rows), rng.integers(0, 16, rows)] = rng.uniform(5, 7.5, rows).astype(np.float32)
    return {"x": x}


#: name -> (model builder, input builder)
MODELS = {
    "resize": (resize_model, resize_inputs),
    "attention": (attention_model, attention_inputs),
    "shared_constant": (shared_constant_model, shared_constant_inputs),
    "large_values": (large_values_model, large_values_inputs),
}
