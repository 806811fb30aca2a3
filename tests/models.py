"""Real ONNX models built with onnx.helper (random weights), and Parquet data to feed them."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper


def _save(model: onnx.ModelProto, path: str | None) -> bytes:
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    if path:
        with open(path, "wb") as f:
            f.write(data)
    return data


def two_input_model(path: str | None = None, seed: int = 0, image: tuple[int, ...] = (3, 4, 4),
                    features: int = 8, classes: int = 5) -> bytes:
    """image [N,*image] float32 + meta [N,features] float32 -> logits [N,classes], score [N,1]."""
    rng = np.random.default_rng(seed)
    flat = int(np.prod(image))
    w1 = rng.standard_normal((flat, classes)).astype(np.float32)
    w2 = rng.standard_normal((features, classes)).astype(np.float32)
    b = rng.standard_normal(classes).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w1"], ["a"]),
        helper.make_node("MatMul", ["meta", "w2"], ["m"]),
        helper.make_node("Add", ["a", "m"], ["am"]),
        helper.make_node("Add", ["am", "b"], ["logits"]),
        helper.make_node("ReduceSum", ["logits", "axes"], ["score"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes, "two_input",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *image]),
         helper.make_tensor_value_info("meta", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="tests.models")
    model.ir_version = 8
    return _save(model, path)


def two_input_table(rows: int, seed: int = 0, image: tuple[int, ...] = (3, 4, 4),
                    features: int = 8, start: int = 0) -> pa.Table:
    """uid, name, img (fixed-shape tensor float32), features (fixed-size list float64)."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((rows, *image)).astype(np.float32)
    feats = rng.standard_normal((rows, features))
    return pa.table({
        "uid": pa.array(np.arange(start, start + rows, dtype=np.int64)),
        "name": pa.array([f"row-{i}" for i in range(start, start + rows)]),
        "img": pa.FixedShapeTensorArray.from_numpy_ndarray(img),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), features),
    })


def write_dataset(directory: str, files: int, rows_per_file: int, row_group_rows: int,
                  seed: int = 0, **kwargs: object) -> list[str]:
    """Write `files` Parquet files of the two-input table; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(files):
        table = two_input_table(rows_per_file, seed=seed + i, start=i * rows_per_file,
                                **kwargs)  # type: ignore[arg-type]
        path = os.path.join(directory, f"data-{i:03d}.parquet")
        pq.write_table(table, path, row_group_size=row_group_rows)
        paths.append(path)
    return paths


def chain_model(path: str | None = None, width: int = 256, depth: int = 24, seed: int = 0) -> bytes:
    """x [N,width] -> y [N,width] through `depth` MatMul+Tanh layers: compute that takes real time."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="tests.models")
    model.ir_version = 8
    return _save(model, path)


def chain_table(rows: int, width: int = 256, seed: int = 0, start: int = 0) -> pa.Table:
    """uid + x (fixed-size list float32 of `width`)."""
    x = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    return pa.table({"uid": pa.array(np.arange(start, start + rows, dtype=np.int64)),
                     "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width)})
