"""Tensor metadata (`TensorMeta`) and ONNX model descriptions, without any inference engine."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from workers.errors import SpecError

Dim = int | None  # None: dynamic (symbolic or -1)


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of one model input or output; `None` dims are dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    #: The ONNX graph's name of each dimension (`dim_param`, e.g. "sequence"), None where it
    #: has none; tensors sharing a name have that dimension's size in common.
    dim_names: tuple[str | None, ...] = field(default=(), compare=False)

    @property
    def row_shape(self) -> tuple[Dim, ...]:
        """Shape of one row: the shape without its leading batch dimension."""
        return self.shape[1:]

    @property
    def row_size(self) -> int | None:
        """Elements in one row, or None when a non-batch dim is dynamic."""
        if any(d is None for d in self.row_shape):
            return None
        return math.prod(d for d in self.row_shape if d is not None)

    def describe(self) -> str:
        """`float32 [N,3,32,32]`: the form error messages use."""
        dims = ["N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(self.shape)]
        return f"{self.dtype.name} [{','.join(dims)}]"

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}


def resolve_shape(meta: TensorMeta, inputs: Sequence[TensorMeta],
                  shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """`meta`'s shape when the inputs have `shapes`, or None when a dynamic dim is not one of
    theirs: fixed dims as they are, the first (batch) dim the inputs', named dims the size of
    an input dim of the same name."""
    sizes: dict[str, int] = {}
    for other in inputs:
        for name, size in zip(other.dim_names, shapes.get(other.name, ()), strict=False):
            if name is not None:
                sizes.setdefault(name, size)
    rows = next(iter(shapes.values()))[0] if shapes else None
    out: list[int] = []
    for axis, dim in enumerate(meta.shape):
        name = meta.dim_names[axis] if axis < len(meta.dim_names) else None
        if dim is not None:
            out.append(dim)
        elif name is not None and name in sizes:
            out.append(sizes[name])
        elif axis == 0 and rows is not None:
            out.append(rows)
        else:
            return None
    return tuple(out)


@dataclass(frozen=True)
class ModelInfo:
    """What `onnx` says about a model: metadata and graph inputs/outputs."""

    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    #: The position-embedding table's rows and name, when the model has one it can be told by:
    #: the most tokens one row can have.
    positions: tuple[int, str] | None = None


def position_table(graph: object) -> tuple[int, str] | None:
    """(rows, name) of the graph's position-embedding table, or None if it has none it can tell.

    A table is a 2-D initializer that a Gather reads with indices that are not a graph input
    (word and token-type tables are gathered by input ids); one whose name says "pos" wins.
    """
    inputs = {v.name for v in graph.input}  # type: ignore[attr-defined]
    tables = {init.name: tuple(init.dims) for init in graph.initializer  # type: ignore[attr-defined]
              if len(init.dims) == 2}
    found: dict[str, int] = {}
    for node in graph.node:  # type: ignore[attr-defined]
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables \
                and node.input[1] not in inputs:
            found[node.input[0]] = int(tables[node.input[0]][0])
    named = [n for n in found if "pos" in n.lower()]
    if len(named) == 1:
        return found[named[0]], f"its position embedding '{named[0]}' has {found[named[0]]} rows"
    if len(found) == 1:
        name, rows = next(iter(found.items()))
        return rows, f"its position embedding '{name}' has {rows} rows"
    return None


def _onnx_dtype(elem_type: int, where: str) -> np.dtype:
    import onnx.helper

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError) as exc:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "undefined"
        raise SpecError(
            f"{where} has element type {name}, which the runner cannot feed or read; "
            "export the model with float, int or bool tensors"
        ) from exc


def _value_info_meta(value_info: object, kind: str) -> TensorMeta:
    name = value_info.name  # type: ignore[attr-defined]
    ttype = value_info.type  # type: ignore[attr-defined]
    if ttype.WhichOneof("value") != "tensor_type":
        raise SpecError(
            f"model {kind} '{name}' is not a tensor ({ttype.WhichOneof('value')}); "
            "only tensor inputs and outputs are supported"
        )
    tensor = ttype.tensor_type
    dtype = _onnx_dtype(tensor.elem_type, f"model {kind} '{name}'")
    dims: list[Dim] = []
    names: list[str | None] = []
    if tensor.HasField("shape"):
        for d in tensor.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
            names.append(d.dim_param or None)
    return TensorMeta(name=name, dtype=dtype, shape=tuple(dims), dim_names=tuple(names))


def describe_onnx(model_bytes: bytes, source: str = "model") -> ModelInfo:
    """Parse ONNX bytes and describe the graph's real inputs (initializers excluded) and outputs."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(model_bytes)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise SpecError(
            f"{source} is not an ONNX model ({exc.__class__.__name__}: {exc}); "
            "pass a .onnx file exported by torch.onnx, tf2onnx or skl2onnx"
        ) from exc
    graph = model.graph
    if not graph.output:
        raise SpecError(f"{source} is not an ONNX model (its graph has no outputs); "
                        "pass a .onnx file exported by torch.onnx, tf2onnx or skl2onnx")
    initializers = {init.name for init in graph.initializer}
    inputs = tuple(_value_info_meta(v, "input") for v in graph.input if v.name not in initializers)
    outputs = tuple(_value_info_meta(v, "output") for v in graph.output)
    for meta in inputs + outputs:
        if not meta.shape:
            raise SpecError(
                f"model tensor '{meta.name}' has no shape (a scalar or unknown rank); the runner "
                "feeds batches, so every input and output needs a leading batch dimension"
            )
    return ModelInfo(
        ir_version=model.ir_version,
        opsets={op.domain or "ai.onnx": op.version for op in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=inputs,
        outputs=outputs,
        positions=position_table(graph),
    )
