"""Benchmark models built with onnx.helper (random weights): a small MLP and a heavier CNN.

Both read the same columns (`image` [N,C,H,W] and `features` [N,F], float32) and write
`logits` [N,classes]; the small one is a single layer (pipeline overhead dominates), the CNN
is three 3x3 convolutions, global pooling and a classifier (compute dominates).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS = ("small", "cnn")


def _finish(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str,
            image: tuple[int, int, int], features: int, classes: int,
            use_features: bool) -> bytes:
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *image])]
    if use_features:
        inputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                                    ["N", features]))
    graph = helper.make_graph(
        nodes, name, inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="bench.models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def small_model(image: tuple[int, int, int] = (3, 32, 32), features: int = 16, classes: int = 10,
                seed: int = 0) -> bytes:
    """image + features -> logits through one linear layer: a few FLOPs per input byte."""
    rng = np.random.default_rng(seed)
    flat = math.prod(image)
    scale = 1.0 / math.sqrt(flat + features)
    inits = [
        numpy_helper.from_array((rng.standard_normal((flat, classes)) * scale).astype(np.float32),
                                "w_image"),
        numpy_helper.from_array((rng.standard_normal((features, classes)) * scale)
                                .astype(np.float32), "w_features"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_image"], ["a"]),
        helper.make_node("MatMul", ["features", "w_features"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "bias"], ["logits"]),
    ]
    return _finish(nodes, inits, "bench_small", image, features, classes, use_features=True)


def cnn_model(image: tuple[int, int, int] = (3, 32, 32), classes: int = 10,
              widths: tuple[int, ...] = (64, 128, 256), seed: int = 0) -> bytes:
    """image -> logits through 3x3 conv + ReLU blocks (stride 2 after the first), pooling, Gemm.

    At 3x32x32 with the default widths it is about 40M multiply-adds per row, the size of a
    CIFAR ResNet-20.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    previous, channels = "image", image[0]
    for i, width in enumerate(widths):
        w = rng.standard_normal((width, channels, 3, 3)) * math.sqrt(2.0 / (channels * 9))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"conv{i}.w"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"conv{i}.b")]
        nodes += [
            helper.make_node("Conv", [previous, f"conv{i}.w", f"conv{i}.b"], [f"conv{i}"],
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                             strides=[1, 1] if i == 0 else [2, 2]),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
        ]
        previous, channels = f"relu{i}", width
    w_fc = rng.standard_normal((classes, channels)) / math.sqrt(channels)
    inits += [numpy_helper.from_array(w_fc.astype(np.float32), "fc.w"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    return _finish(nodes, inits, "bench_cnn", image, 0, classes, use_features=False)


def build_model(name: str, image: tuple[int, int, int], features: int) -> bytes:
    """The model called `name` (one of MODELS) for images of shape `image`."""
    if name == "small":
        return small_model(image, features)
    if name == "cnn":
        return cnn_model(image)
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")


def model_inputs(name: str) -> tuple[str, ...]:
    """Columns (named like the model inputs) that model `name` reads."""
    return ("image", "features") if name == "small" else ("image",)
