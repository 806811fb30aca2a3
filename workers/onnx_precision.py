"""What numeric types an ONNX model carries, and a float32 -> float16/bfloat16 conversion of it.

TensorRT 11 builds only strongly typed networks: the model itself must say which tensors are
FP16/BF16 (and INT8/FP8 arrive as QuantizeLinear/DequantizeLinear pairs), and ONNX Runtime's
CUDA provider runs FP16/BF16 only from a model that carries them. `model_types` tells the plan
builder what a model already carries; `convert_float` rewrites an FP32 model to run in FP16 or
BF16 while its inputs and outputs stay FP32, so the same Parquet columns feed it.

The conversion is onnxconverter-common's `float16` converter (maintained with ONNX Runtime; pure
Python on onnx) with `keep_io_types`, its clamping of weights to FP16's range, and an op block
list that keeps in FP32 what overflows or loses its result in FP16. Three passes before it fix
what it gets wrong on exported models: every node gets a unique name (it names its Casts after
nodes, so unnamed nodes collided), `Constant` nodes become initializers (it rounds Constants
even where they feed an FP32-only input such as Resize's scales), and an initializer read both
by a blocked node and by a converted one is split in two. Why this converter and not NVIDIA
ModelOpt's AutoCast: docs/tensorrt.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.errors import MissingDependencyError, SpecError

LOW_TYPES: dict[str, int] = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_FLOAT_NAMES: dict[int, str] = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16",
                                TensorProto.BFLOAT16: "bf16"}
_QUANT_NAMES: dict[int, str] = {TensorProto.INT8: "int8", TensorProto.UINT8: "int8",
                                TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.FLOAT8E5M2: "fp8"}
# Operators kept in FP32 besides the converter's own list (which has Resize, Upsample, TopK,
# NonMaxSuppression, RoiAlign, Range, CumSum, Min, Max and the ai.onnx.ml operators): those
# whose result overflows FP16's 65504 or loses its small terms there. Reductions sum many
# values (a sum of squares of values around 300 is already past it); Pow squares; Exp(12) is
# 162755; Log and Sqrt read those sums; Softmax and the normalizations compute statistics.
# Consecutive blocked nodes stay FP32 between them (the converter drops the Cast pairs).
FP32_OPS: frozenset[str] = frozenset({
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "Pow", "Exp", "Log", "Sqrt", "Reciprocal", "Softmax",
    "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "LpNormalization", "MeanVarianceNormalization", "Einsum",
})
# Weights are clamped into [-MAX, -MIN] u {0} u [MIN, MAX] for FP16 (the converter's own
# defaults): an additive attention mask of finfo(float32).min becomes -10000, which still zeroes
# a softmax term and, unlike -inf, gives no NaN from 0 * mask; LayerNorm's 1e-12 becomes 1e-7
# instead of 0. BF16 has FP32's range and needs no clamping.
FP16_MAX_FINITE = 1e4
FP16_MIN_POSITIVE = 1e-7
# Bump when the passes around the converter change what a conversion produces: plan
# fingerprints include it (with the converter's version), so plans converted before a fix are
# not reused after it.
CONVERSION_REVISION = 2
# Most operators accept bfloat16 only from opset 22 on (Conv, Relu, ...): bf16 conversion first
# upgrades older models with ONNX's version converter, which keeps their semantics.
BF16_OPSET = 22
# A model metadata key naming (comma-separated) nodes that `convert_float` leaves in float32
# (the converter's node block list): the runner's own appended nodes whose float32 arithmetic
# the host would otherwise do (embedding pooling, see workers.onnx_pooling). Only models the
# runner rewrote carry it, so CONVERSION_REVISION stays: no earlier conversion changes.
FP32_NODES_KEY = "trt_batch_runner.fp32_nodes"
# Attributes that name an element type to produce.
_DTYPE_ATTRS = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "EyeLike": "dtype",
                "Multinomial": "dtype", "Bernoulli": "dtype"}
_MODELOPT_HINT = ("python -m modelopt.onnx.autocast --onnx_path MODEL.onnx "
                  "--low_precision_type {precision} --keep_io_types")


@dataclass(frozen=True)
class ModelTypes:
    """The numeric types a model's graph carries."""

    floats: frozenset[str]      # subset of {"fp32", "fp16", "bf16"}
    quantized: frozenset[str]   # subset of {"int8", "fp8"}: QuantizeLinear output types
    subgraphs: bool             # If/Loop/Scan bodies (the converter does not rewrite them)
    #: float types of the weights (initializers and Constant tensors); None: not known
    weights: frozenset[str] | None = None

    def carries(self, precision: str) -> bool:
        """True when the model already holds tensors of `precision` (so TensorRT must keep them)."""
        if precision in ("int8", "fp8"):
            return precision in self.quantized
        return precision in self.floats

    def computes_in(self, precision: str) -> bool:
        """True when the model's float weights are all in `precision` ("fp16" or "bf16").

        A model converted offline (FP32 I/O, FP16 weights) computes in FP16 and is built as it
        is; one FP16 tensor in an FP32 model is not an FP16 model, and still needs converting.
        """
        if precision not in self.floats:
            return False
        if self.weights:
            return self.weights == {precision}
        return self.floats == {precision}


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
    weights: set[str] = set()
    subgraphs = False
    for graph in iter_graphs(proto.graph):
        subgraphs = subgraphs or graph is not proto.graph
        elem_types: dict[str, int] = {}
        for init in graph.initializer:
            elem_types[init.name] = init.data_type
            if init.data_type in _FLOAT_NAMES:
                weights.add(_FLOAT_NAMES[init.data_type])
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type"):
                elem_types.setdefault(value.name, value.type.tensor_type.elem_type)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        elem_types[node.output[0]] = attr.t.data_type
                        if attr.t.data_type in _FLOAT_NAMES:
                            weights.add(_FLOAT_NAMES[attr.t.data_type])
                    elif attr.name in ("value_float", "value_floats"):
                        elem_types[node.output[0]] = TensorProto.FLOAT
                        weights.add("fp32")
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
    return ModelTypes(frozenset(floats), frozenset(quantized), subgraphs, frozenset(weights))


def converter_version() -> str:
    """The converter and the revision of our passes around it, for plan fingerprints."""
    try:
        version = metadata.version("onnxconverter-common")
    except metadata.PackageNotFoundError:
        version = "missing"
    return f"onnxconverter-common {version}; passes r{CONVERSION_REVISION}"


def _import_converter() -> object:
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise MissingDependencyError(
            f"converting a model to fp16/bf16 needs onnxconverter-common ({exc}); pip install "
            "onnxconverter-common (it comes with the project's dependencies), or pass a model "
            "that already carries fp16/bf16, or use --precision fp32") from exc
    return float16


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
            f"it offline with NVIDIA ModelOpt ({_MODELOPT_HINT.format(precision='bf16')})") from exc


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: the converter names the Casts it adds after their node."""
    taken = {node.name for node in graph.node if node.name}
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{index}"
        name, n = base, 0
        while name in taken or name in seen:
            n += 1
            name = f"{base}_{n}"
        node.name = name
        seen.add(name)


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The float tensor a Constant node holds, named after its output; None for other kinds."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            tensor = TensorProto()
            tensor.CopyFrom(attr.t)
        elif attr.name == "value_float":
            tensor = numpy_helper.from_array(np.array(attr.f, np.float32))
        elif attr.name == "value_floats":
            tensor = numpy_helper.from_array(np.array(list(attr.floats), np.float32))
        else:
            continue
        if tensor.data_type not in _FLOAT_NAMES:
            return None
        tensor.name = node.output[0]
        return tensor
    return None


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Float Constant nodes become initializers of the same name.

    The converter rounds every Constant node's tensor to FP16, even where it feeds an input that
    must stay FP32 (Resize's scales: 4/3 became 1.333, and 3 pixels resized to 3); initializers
    that feed a blocked node it leaves alone.
    """
    kept = []
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and not node.domain else None
        if tensor is None:
            kept.append(node)
        else:
            graph.initializer.append(tensor)
    del graph.node[:]
    graph.node.extend(kept)
    # A value_info for an initializer (the version converter writes them) would be retyped to
    # FP16 by the converter even where the initializer stays FP32.
    names = {init.name for init in graph.initializer}
    infos = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _split_shared_initializers(graph: onnx.GraphProto, blocked: frozenset[str]) -> None:
    """An FP32 initializer read by a blocked node and by a converted one gets a copy per side.

    The converter keeps every input of a blocked node FP32, so a shared one would reach the
    converted node as FP32, and the model would not type-check.
    """
    inits = {init.name: init for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    readers: dict[str, set[bool]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, set()).add(node.op_type in blocked)
    for name, kinds in readers.items():
        if kinds != {True, False}:
            continue
        copy = TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = _unique(f"{name}__fp32", graph)
        graph.initializer.append(copy)
        for node in graph.node:
            if node.op_type in blocked:
                for i, input_name in enumerate(node.input):
                    if input_name == name:
                        node.input[i] = copy.name


def _unique(name: str, graph: onnx.GraphProto) -> str:
    used = {init.name for init in graph.initializer} | {v.name for v in graph.input}
    used.update(out for node in graph.node for out in node.output)
    candidate, n = name, 0
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def _retarget_float_casts(graph: onnx.GraphProto) -> None:
    """Casts to FLOAT whose output the converter retyped to FLOAT16 cast to FLOAT16 instead.

    A model's own `Cast(to=FLOAT)` (an int64 attention mask made float) would otherwise feed
    FP32 into converted nodes, and the model would not type-check.
    """
    low = {v.name for v in graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in low:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16


def _restore_output_types(graph: onnx.GraphProto, float_outputs: set[str]) -> None:
    """Outputs that were FLOAT are FLOAT again.

    With `keep_io_types`, an output produced by a blocked node (Resize) still came out FP16:
    the converter's Cast back to FP16 after the node replaced its Cast to FP32.
    """
    producers = {out: node for node in graph.node for out in node.output}
    for value in graph.output:
        if value.name not in float_outputs or value.type.tensor_type.elem_type == TensorProto.FLOAT:
            continue
        value.type.tensor_type.elem_type = TensorProto.FLOAT
        node = producers.get(value.name)
        if node is not None and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = TensorProto.FLOAT
            continue
        inner = _unique(f"{value.name}__low", graph)
        for producer in graph.node:
            for i, out in enumerate(producer.output):
                if out == value.name:
                    producer.output[i] = inner
        graph.node.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT,
                                           name=_unique(f"{value.name}__cast_out", graph)))


def _retype_to_bf16(graph: onnx.GraphProto, originals: dict[str, np.ndarray]) -> None:
    """The FP16 conversion's graph in BF16: types retyped, weights rounded from the FP32 originals.

    BF16 has FP32's range, so weights are only clamped to BF16's largest finite value:
    finfo(float32).min (an attention mask) rounds to -inf in BF16, and 0 * -inf is NaN.
    """
    import ml_dtypes  # onnx depends on it; numpy has no bfloat16 of its own

    limit = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)

    def low(array: np.ndarray) -> np.ndarray:
        finite = np.isfinite(array)
        clamped = np.where(finite, np.clip(array, -limit, limit), array)
        return np.asarray(clamped, np.float32).astype(ml_dtypes.bfloat16)

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            source = originals[init.name] if init.name in originals else numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(low(np.asarray(source, np.float32)), init.name))
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == _DTYPE_ATTRS.get(node.op_type) and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(
                    low(numpy_helper.to_array(attr.t).astype(np.float32)), attr.t.name))


def _fp32_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes the model's metadata (`FP32_NODES_KEY`) keeps in float32."""
    value = next((p.value for p in proto.metadata_props if p.key == FP32_NODES_KEY), "")
    return sorted({name for name in value.split(",") if name})


def convert_float(model: bytes | onnx.ModelProto, precision: str, source: str = "model") -> bytes:
    """The model with its float32 computation in `precision` ("fp16" or "bf16"), I/O kept float32.

    Float32 weights and activations become `precision`, except around the operators of
    `FP32_OPS` and the converter's own block list, which compute in FP32 between Casts; FP32
    graph inputs and outputs keep their type, so the converted model is fed and read exactly
    like the original. FP16 weights are clamped to +-1e4 and small magnitudes to 1e-7. For bf16
    the model is first upgraded to opset 22, where most operators accept bfloat16. Models with
    control-flow subgraphs or external weights are refused (the error says how to convert them
    offline). A model that already carries some FP16 tensors is converted too. Nodes the
    model's metadata names under `FP32_NODES_KEY` stay FP32 as well.
    """
    if precision not in LOW_TYPES:
        raise SpecError(f"convert_float precision must be one of {sorted(LOW_TYPES)}, "
                        f"got {precision!r}")
    proto = onnx.ModelProto()
    proto.CopyFrom(_load(model, source))
    if model_types(proto, source).subgraphs:
        raise SpecError(
            f"{source} has control-flow subgraphs (If/Loop/Scan), which the built-in {precision} "
            f"conversion does not rewrite; convert it offline with NVIDIA ModelOpt "
            f"({_MODELOPT_HINT.format(precision=precision)}) and pass the converted model, or use "
            "--precision fp32")
    if any(init.data_location == TensorProto.EXTERNAL for init in proto.graph.initializer):
        raise SpecError(f"{source} keeps weights in external files; load them first "
                        "(onnx.load(path)) so they can be converted")
    float16 = _import_converter()
    if precision == "bf16":
        proto = _upgrade_opset(proto, BF16_OPSET, source)
    graph = proto.graph
    _name_nodes(graph)
    _constants_to_initializers(graph)
    blocked = FP32_OPS | frozenset(float16.DEFAULT_OP_BLOCK_LIST)  # type: ignore[attr-defined]
    _split_shared_initializers(graph, blocked)
    originals = {init.name: numpy_helper.to_array(init) for init in graph.initializer
                 if init.data_type == TensorProto.FLOAT}
    float_outputs = {v.name for v in graph.output
                     if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    try:
        with warnings.catch_warnings():
            # It warns once per clamped weight tensor; the clamping is documented.
            warnings.simplefilter("ignore", UserWarning)
            converted: onnx.ModelProto = float16.convert_float_to_float16(  # type: ignore[attr-defined]
                proto, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX_FINITE,
                keep_io_types=True, op_block_list=sorted(blocked),
                node_block_list=_fp32_nodes(proto), check_fp16_ready=False)
        _retarget_float_casts(converted.graph)
        _restore_output_types(converted.graph, float_outputs)
        if precision == "bf16":
            _retype_to_bf16(converted.graph, originals)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # onnx raises InferenceError / ValidationError, the converter others
        raise SpecError(
            f"the built-in {precision} conversion of {source} failed or produced an invalid model "
            f"({exc.__class__.__name__}: {exc}); convert it offline with NVIDIA ModelOpt "
            f"({_MODELOPT_HINT.format(precision=precision)}) and pass that model, or use "
            "--precision fp32") from exc
    return converted.SerializeToString()
