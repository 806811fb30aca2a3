"""Embedding pooling appended to an ONNX graph, so the engine returns `[N, D]`, not `[N, T, D]`.

An encoder's `last_hidden_state` is T times larger than the embedding made of it. Pooled on
the host, every batch copies it from the device, out of the slot's pinned buffer, and reduces
it on the CPU: measured on a 2-core host with an engine that takes no time, those steps cost
more than a second per 100k MiniLM rows, and they grow with the token count. Pooled in the
graph, the GPU does the reduction and only `[N, D]` leaves it.

The appended nodes compute what `workers.postprocess.mean_pool` computes on the host:
`sum(h * mask, tokens) / max(sum(mask, tokens), 1)` for `mean` (as sentence-transformers'
mean pooling; its clamp at 1e-9 gives the same result for 0/1 masks), the plain token mean for
`mean` without a mask, and the first token for `cls`. The sums run in float32 whatever the
output's dtype, as on the host (cls takes the first token, then casts it), and the model
names the appended nodes under `workers.onnx_precision.FP32_NODES_KEY`, so the conversion
to fp16 or bf16 (`--precision`) leaves them in float32. L2 normalization stays on the host:
it reads only `[N, D]`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

#: Default-domain opset from which the ops used take their axes as an input (not an attribute).
AXES_AS_INPUT = {"Unsqueeze": 13, "ReduceSum": 13, "ReduceMean": 18}
#: Below this opset `Max` does not broadcast (opset 8) and `Cast` takes a string `to` (opset 6).
MIN_OPSET = 8
FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
POOLED_SUFFIX = "_pooled"


@dataclass(frozen=True)
class PooledModel:
    """A model whose graph pools `source` into the `[N, D]` float32 output `output`."""

    model_bytes: bytes
    source: str
    output: str
    pooling: str
    mask: str | None

    def describe(self) -> str:
        over = f" over mask '{self.mask}'" if self.mask else ""
        return (f"{self.pooling} pooling of output '{self.source}'{over} runs in the model's graph "
                f"(output '{self.output}' [N, D])")


def pool_in_graph(model_bytes: bytes, source: str, pooling: str, mask: str | None,
                  keep: Collection[str] = ()) -> PooledModel | str:
    """The model with `source` ([N, T, D]) pooled in its graph, or why it cannot be (a reason
    the caller logs before pooling on the host).

    The graph's outputs become the pooled one, in `source`'s place, and those named in `keep`;
    the others are dropped, so the engine neither computes nor copies what nothing reads.
    """
    import onnx

    model = onnx.load_model_from_string(model_bytes)
    problem = _problem(model, model_bytes, source, pooling, mask, keep)
    if problem:
        return problem
    hidden = next(o for o in model.graph.output if o.name == source)
    names = _Names(model.graph)
    opset = _opset(model)
    pooled = names.fresh(f"{source}{POOLED_SUFFIX}")
    nodes = _Nodes(names, opset)
    is_float = hidden.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    if pooling == "cls":  # the first token, then the cast: [N, D] only is converted
        first = nodes.add("Gather", [source, nodes.const(np.array(0, np.int64))],
                          out=pooled if is_float else None, axis=1)
        if not is_float:
            nodes.add("Cast", [first], out=pooled, to=onnx.TensorProto.FLOAT)
        return _finish(model, hidden, nodes, PooledModel(b"", source, pooled, pooling, mask), keep)
    h = source if is_float else nodes.add("Cast", [source], to=onnx.TensorProto.FLOAT)
    if mask is None:
        nodes.reduce("ReduceMean", h, 1, keepdims=0, out=pooled)
    else:
        weights = nodes.add("Cast", [mask], to=onnx.TensorProto.FLOAT)
        summed = nodes.reduce("ReduceSum", nodes.add("Mul", [h, nodes.unsqueeze(weights, 2)]), 1,
                              keepdims=0)
        counts = nodes.add("Max", [nodes.reduce("ReduceSum", weights, 1, keepdims=1),
                                   nodes.const(np.array(1.0, np.float32))])
        nodes.add("Div", [summed, counts], out=pooled)
    return _finish(model, hidden, nodes, PooledModel(b"", source, pooled, pooling, mask), keep)


def _finish(model: Any, hidden: Any, nodes: _Nodes, pooled: PooledModel,
            keep: Collection[str]) -> PooledModel | str:
    """`pooled` with the model's bytes: the nodes appended, `[N, D]` in the hidden output's
    place (its batch and width dimensions, named or fixed, so dynamic axes stay dynamic)."""
    import onnx

    from workers.onnx_precision import FP32_NODES_KEY

    graph = model.graph
    graph.node.extend(nodes.made)
    # The sums stay float32 when a plan build converts the model to fp16/bf16: sums of up to
    # T tokens' values lose digits in fp16 and can overflow it, which the host's float32
    # pooling never does.
    names = ",".join(n.name for n in nodes.made)
    entry = next((p for p in model.metadata_props if p.key == FP32_NODES_KEY), None)
    if entry is None:
        entry = model.metadata_props.add(key=FP32_NODES_KEY, value=names)
    else:
        entry.value = ",".join(v for v in (entry.value, names) if v)
    dims = hidden.type.tensor_type.shape.dim
    value = onnx.helper.make_tensor_value_info(pooled.output, onnx.TensorProto.FLOAT, None)
    value.type.tensor_type.shape.dim.extend([dims[0], dims[2]])
    outputs = [value if o.name == pooled.source else o for o in graph.output
               if o.name == pooled.source or o.name in keep]
    del graph.output[:]
    graph.output.extend(outputs)
    data = model.SerializeToString(deterministic=True)
    try:
        onnx.checker.check_model(data)
    except onnx.checker.ValidationError as exc:  # the caller pools on the host instead
        return f"the rewritten graph does not pass the ONNX checker ({exc})"
    return replace(pooled, model_bytes=data)


def _problem(model: Any, model_bytes: bytes, source: str, pooling: str, mask: str | None,
             keep: Collection[str]) -> str | None:
    """Why `source` cannot be pooled in this graph, or None."""
    from workers.external_data import checked_locations

    graph = model.graph
    if pooling not in ("mean", "cls"):
        return f"pooling '{pooling}' is not done in the graph"
    if checked_locations(model_bytes, "model"):
        return "the model keeps tensors in external data files"
    opset = _opset(model)
    if opset < MIN_OPSET:
        return f"the model's opset {opset} is older than {MIN_OPSET}"
    if source in keep:
        return f"another postprocessor reads output '{source}' as it is"
    hidden = next((o for o in graph.output if o.name == source), None)
    if hidden is None:
        return f"'{source}' is not an output of the graph"
    tensor = hidden.type.tensor_type
    if tensor.elem_type not in FLOAT_TYPES:
        return f"output '{source}' is not a float tensor"
    if not tensor.HasField("shape") or len(tensor.shape.dim) != 3:
        rank = len(tensor.shape.dim) if tensor.HasField("shape") else "unknown"
        return f"output '{source}' has rank {rank}, not 3 ([N, T, D])"
    if mask is not None:
        initializers = {i.name for i in graph.initializer}
        found = next((i for i in graph.input if i.name == mask and i.name not in initializers),
                     None)
        if found is None:
            return f"the attention mask '{mask}' is not an input of the graph"
        shape = found.type.tensor_type.shape
        if len(shape.dim) != 2:
            return f"the attention mask '{mask}' has rank {len(shape.dim)}, not 2 ([N, T])"
    return None


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class _Names:
    """Names unused anywhere in the graph, for the appended nodes and values."""

    def __init__(self, graph: Any) -> None:
        self.taken = {v.name for v in (*graph.input, *graph.output, *graph.value_info,
                                       *graph.initializer)}
        for node in graph.node:
            self.taken.update(node.input)
            self.taken.update(node.output)
            self.taken.add(node.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


class _Nodes:
    """Appended nodes, written for the model's opset (attribute or input axes)."""

    def __init__(self, names: _Names, opset: int) -> None:
        self.names = names
        self.opset = opset
        self.made: list[Any] = []

    def add(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        import onnx

        out = out or self.names.fresh(f"pool/{op}")
        self.made.append(onnx.helper.make_node(op, inputs, [out],
                                               name=self.names.fresh(f"pool/{op}_node"), **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        from onnx import numpy_helper

        return self.add("Constant", [], value=numpy_helper.from_array(value))

    def _axes(self, op: str, inputs: list[str], axis: int, out: str | None,
              **attrs: Any) -> str:
        if self.opset >= AXES_AS_INPUT[op]:
            return self.add(op, [*inputs, self.const(np.array([axis], np.int64))], out, **attrs)
        return self.add(op, inputs, out, axes=[axis], **attrs)

    def unsqueeze(self, x: str, axis: int) -> str:
        return self._axes("Unsqueeze", [x], axis, None)

    def reduce(self, op: str, x: str, axis: int, keepdims: int, out: str | None = None) -> str:
        return self._axes(op, [x], axis, out, keepdims=keepdims)
