"""What numeric types an ONNX model carries, and a float32 -> float16/bfloat16 conversion of it.

TensorRT 11 builds only strongly typed networks: the model itself must say which tensors are
FP16/BF16 (and INT8/FP8 arrive as QuantizeLinear/DequantizeLinear pairs). `model_types` tells the
plan builder what a model already carries; `convert_float` rewrites an FP32 model to run in
FP16 or BF16 while its inputs and outputs stay FP32, so the same Parquet columns feed it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.errors import SpecError

LOW_TYPES: dict[str, int] = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_FLOAT_NAMES: dict[int, str] = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16",
                                TensorProto.BFLOAT16: "bf16"}
_QUANT_NAMES: dict[int, str] = {TensorProto.INT8: "int8", TensorProto.UINT8: "int8",
                                TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.FLOAT8E5M2: "fp8"}
# Inputs that ONNX requires to be float32 whatever the data type (positions per operator), so
# they keep float32 (a Cast back is inserted when the producer was converted).
_FP32_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),            # roi, scales
    "Upsample": frozenset({1}),             # scales
    "NonMaxSuppression": frozenset({0, 1, 3, 4}),  # boxes, scores, thresholds: float only
}
# Operators whose float outputs ONNX fixes to float32 (none of the common ones today; kept as
# the place to add one).
_FP32_OUTPUT_OPS: frozenset[str] = frozenset()
# Most operators accept bfloat16 only from opset 22 on (Conv, Relu, ...): bf16 conversion first
# upgrades older models with ONNX's version converter, which keeps their semantics.
BF16_OPSET = 22
# A model metadata key naming (comma-separated) nodes that `convert_float` leaves in float32:
# the runner's own appended nodes whose float32 arithmetic the host would otherwise do
# (embedding pooling, see workers.onnx_pooling).
FP32_NODES_KEY = "trt_batch_runner.fp32_nodes"
# Attributes that name an element type to produce.
_DTYPE_ATTRS = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "EyeLike": "dtype",
                "Multinomial": "dtype", "Bernoulli": "dtype"}


@dataclass(frozen=True)
class ModelTypes:
    """The numeric types a model's graph carries."""

    floats: frozenset[str]      # subset of {"fp32", "fp16", "bf16"}
    quantized: frozenset[str]   # subset of {"int8", "fp8"}: QuantizeLinear output types
    subgraphs: bool             # If/Loop/Scan bodies (the converter does not rewrite them)

    def carries(self, precision: str) -> bool:
        """True when the model already holds tensors of `precision` (so TensorRT must keep them)."""
        if precision in ("int8", "fp8"):
            return precision in self.quantized
        return precision in self.floats


def _load(model: bytes | onnx.ModelProto, source: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf raises DecodeError, onnx ValueError/RuntimeError
        raise SpecError(f"{source} is not an ONNX model ({exc.__class__.__name__}: {exc}); "
                        "pass a .onnx file") from exc


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies) in it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def _quant_type(node: onnx.NodeProto, elem_types: dict[str, int]) -> int:
    """Element type a QuantizeLinear produces: its zero point's, its output_dtype, else uint8."""
    if len(node.input) > 2 and node.input[2] in elem_types:
        return elem_types[node.input[2]]
    for attr in node.attribute:
        if attr.name == "output_dtype" and attr.i:
            return int(attr.i)
    return TensorProto.UINT8


def model_types(model: bytes | onnx.ModelProto, source: str = "model") -> ModelTypes:
    """Float and quantized types present anywhere in the model (graph and subgraphs)."""
    proto = _load(model, source)
    floats: set[str] = set()
    quantized: set[str] = set()
    subgraphs = False
    for graph in iter_graphs(proto.graph):
        subgraphs = subgraphs or graph is not proto.graph
        elem_types: dict[str, int] = {}
        for init in graph.initializer:
            elem_types[init.name] = init.data_type
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type"):
                elem_types.setdefault(value.name, value.type.tensor_type.elem_type)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        elem_types[node.output[0]] = attr.t.data_type
        floats.update(_FLOAT_NAMES[t] for t in elem_types.values() if t in _FLOAT_NAMES)
        for node in graph.node:
            if node.op_type in _DTYPE_ATTRS:
                for attr in node.attribute:
                    if attr.name == _DTYPE_ATTRS[node.op_type] and attr.i in _FLOAT_NAMES:
                        floats.add(_FLOAT_NAMES[attr.i])
            if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
                qtype = _quant_type(node, elem_types)
                if qtype in _QUANT_NAMES:
                    quantized.add(_QUANT_NAMES[qtype])
    return ModelTypes(frozenset(floats), frozenset(quantized), subgraphs)


def _low_array(array: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        return array.astype(np.float16)
    import ml_dtypes  # onnx depends on it; numpy has no bfloat16 of its own

    return array.astype(ml_dtypes.bfloat16)


def _convert_tensor(tensor: TensorProto, precision: str) -> TensorProto:
    low = numpy_helper.from_array(_low_array(numpy_helper.to_array(tensor), precision),
                                  tensor.name)
    return low


def _upgrade_opset(proto: onnx.ModelProto, opset: int, source: str) -> onnx.ModelProto:
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return proto
    from onnx import version_converter

    try:
        return version_converter.convert_version(proto, opset)
    except Exception as exc:  # the converter raises RuntimeError/ConvertError per adapter
        raise SpecError(
            f"{source} uses opset {current}, and bfloat16 needs opset {opset}, which ONNX's version "
            f"converter could not reach ({exc}); re-export the model with opset {opset} or convert "
            "it with NVIDIA ModelOpt (python -m modelopt.onnx.autocast --onnx_path MODEL.onnx "
            "--low_precision_type bf16)") from exc


def _fp32_nodes(proto: onnx.ModelProto) -> frozenset[str]:
    """Names of the nodes the model's metadata (`FP32_NODES_KEY`) keeps in float32."""
    value = next((p.value for p in proto.metadata_props if p.key == FP32_NODES_KEY), "")
    return frozenset(name for name in value.split(",") if name)


def _kept_fp32(node: onnx.NodeProto, converted: set[str],
               out_rename: dict[str, str]) -> list[onnx.NodeProto]:
    """`node` left in float32 (its attributes and outputs as written), after a Cast back to
    float32 of each of its inputs that the conversion made low precision."""
    casts = []
    for i, name in enumerate(node.input):
        name = out_rename.get(name, name)  # a graph output's producer writes the renamed tensor
        if name in converted:
            back = f"{name}__fp32_for_{node.name}_{i}"
            casts.append(helper.make_node("Cast", [name], [back], to=TensorProto.FLOAT))
            name = back
        node.input[i] = name
    return [*casts, node]


def convert_float(model: bytes | onnx.ModelProto, precision: str, source: str = "model") -> bytes:
    """The model with its float32 computation in `precision` ("fp16" or "bf16"), I/O kept float32.

    Every float32 initializer, constant and intermediate tensor becomes `precision`; each float32
    graph input gets a Cast to `precision` and each float32 output a Cast back, so the converted
    model is fed and read exactly like the original. Inputs that ONNX requires to be float32
    (Resize scales, NonMaxSuppression boxes, ...) stay float32. For bf16 the model is first
    upgraded to opset 22, where most operators accept bfloat16. Nodes the model's metadata names
    under `FP32_NODES_KEY` stay float32 (their low-precision inputs are cast back). Models with
    control-flow subgraphs are refused: convert those offline (the error says how).
    """
    if precision not in LOW_TYPES:
        raise SpecError(f"convert_float precision must be one of {sorted(LOW_TYPES)}, "
                        f"got {precision!r}")
    proto = onnx.ModelProto()
    proto.CopyFrom(_load(model, source))
    if precision == "bf16":
        proto = _upgrade_opset(proto, BF16_OPSET, source)
    types = model_types(proto, source)
    if types.subgraphs:
        raise SpecError(
            f"{source} has control-flow subgraphs (If/Loop/Scan), which the built-in {precision} "
            f"conversion does not rewrite; convert it offline with NVIDIA ModelOpt "
            f"(python -m modelopt.onnx.autocast --onnx_path MODEL.onnx --low_precision_type "
            f"{precision}) and pass the converted model, or use --precision fp32")
    if any(init.data_location == TensorProto.EXTERNAL for init in proto.graph.initializer):
        raise SpecError(f"{source} keeps weights in external files; load them first "
                        "(onnx.load(path)) so they can be converted")
    low = LOW_TYPES[precision]
    graph = proto.graph

    # Tensors that must remain float32: those feeding float32-only operator inputs.
    fp32_uses: dict[str, int] = {}
    all_uses: dict[str, int] = {}
    for node in graph.node:
        keep = _FP32_INPUTS.get(node.op_type, frozenset())
        for i, name in enumerate(node.input):
            if name:
                all_uses[name] = all_uses.get(name, 0) + 1
                if i in keep:
                    fp32_uses[name] = fp32_uses.get(name, 0) + 1

    float_inits = {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    converted: set[str] = set()  # names whose values are now `low`
    new_inits = []
    for init in graph.initializer:
        # An initializer only ever read as a float32-only input stays float32.
        if init.name in float_inits and fp32_uses.get(init.name, 0) < all_uses.get(init.name, 0):
            new_inits.append(_convert_tensor(init, precision))
            converted.add(init.name)
        else:
            new_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)

    head: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    initializer_names = {init.name for init in graph.initializer}
    for value in graph.input:
        if value.name in initializer_names:
            continue
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{value.name}__{precision}"
            head.append(helper.make_node("Cast", [value.name], [inner], to=low,
                                         name=f"{value.name}__cast_in"))
            rename[value.name] = inner
            converted.add(inner)

    fp32_nodes = _fp32_nodes(proto)
    fp32_made = {name for node in graph.node if node.name in fp32_nodes for name in node.output}
    outputs = {value.name for value in graph.output
               if value.type.tensor_type.elem_type == TensorProto.FLOAT
               and value.name not in fp32_made}
    out_rename = {name: f"{name}__{precision}" for name in outputs}

    body: list[onnx.NodeProto] = []
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if node.name in fp32_nodes:
            body += _kept_fp32(new, converted, out_rename)
            continue
        keep = _FP32_INPUTS.get(node.op_type, frozenset())
        for i, name in enumerate(new.input):
            name = rename.get(name, out_rename.get(name, name))
            if i in keep and name in converted:
                back = f"{name}__fp32_for_{node.name or node.op_type}_{i}"
                body.append(helper.make_node("Cast", [name], [back], to=TensorProto.FLOAT))
                name = back
            new.input[i] = name
        for attr in new.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_convert_tensor(attr.t, precision))
            elif (attr.name == _DTYPE_ATTRS.get(new.op_type) and attr.i == TensorProto.FLOAT):
                attr.i = low
        for i, name in enumerate(new.output):
            if name in out_rename:
                new.output[i] = out_rename[name]
            if new.op_type not in _FP32_OUTPUT_OPS:
                converted.add(new.output[i])
        body.append(new)

    tail = [helper.make_node("Cast", [inner], [name], to=TensorProto.FLOAT,
                             name=f"{name}__cast_out")
            for name, inner in out_rename.items()]
    del graph.node[:]
    graph.node.extend(head + body + tail)
    # Intermediate float types changed; stale value_info would contradict the graph.
    kept_info = [v for v in graph.value_info
                 if v.type.tensor_type.elem_type not in (TensorProto.FLOAT, low)]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # onnx raises InferenceError / ValidationError
        raise SpecError(
            f"the built-in {precision} conversion of {source} produced an invalid model ({exc}); "
            f"convert it offline with NVIDIA ModelOpt (python -m modelopt.onnx.autocast "
            f"--onnx_path MODEL.onnx --low_precision_type {precision}) and pass that model"
        ) from exc
    return proto.SerializeToString()
