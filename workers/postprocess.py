"""Postprocessors: model outputs -> typed Arrow columns (raw, argmax, topk, sigmoid, embedding, user).

Each kind is a frozen spec that crosses to the actors; the driver `resolve`s it against the model
(default output, class count against the labels file, pooling against the output's rank) before
any actor starts. In the actor a `Postprocessor` turns one batch's outputs into columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workers.convert import output_type, tensor_to_arrow
from workers.errors import DataError, SpecError
from workers.functions import is_function_target, load_function
from workers.tensors import TensorMeta

Batch = dict[str, np.ndarray]
POOLINGS = ("mean", "cls", "none")
DEFAULT_TOP_K = 5


def parse_labels(text: str, source: str) -> tuple[str, ...]:
    """Label names from a labels file: one per line, or a JSON list, or a JSON `id2label` mapping."""
    import json

    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise SpecError(f"labels file {source} looks like JSON but does not parse ({exc}); "
                            "write one label per line, a JSON list, or {\"id2label\": {...}}") from exc
        if isinstance(value, dict):
            value = value.get("id2label", value)
            if not isinstance(value, dict):
                raise SpecError(f"labels file {source}: id2label must map class ids to names")
            try:
                ids = sorted((int(k), str(v)) for k, v in value.items())
            except ValueError as exc:
                raise SpecError(f"labels file {source} maps non-integer ids ({exc}); use "
                                "{\"0\": \"name\", ...}") from exc
            if [i for i, _ in ids] != list(range(len(ids))):
                raise SpecError(f"labels file {source} maps ids {[i for i, _ in ids]}; they must "
                                f"be 0..{len(ids) - 1}, each once")
            return tuple(name for _, name in ids)
        return tuple(str(v) for v in value)
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SpecError(f"labels file {source} is empty; write one label per line, in class order")
    return tuple(lines)


def _check_output(name: str | None, kind: str, model_outputs: Mapping[str, TensorMeta]) -> TensorMeta:
    names = list(model_outputs)
    if name is None:
        return model_outputs[names[0]]
    if name not in model_outputs:
        raise SpecError(f"the {kind} postprocessor reads output '{name}', but the model's outputs "
                        f"are {names}; pass --model-output with one of those")
    return model_outputs[name]


def _classes(meta: TensorMeta, kind: str) -> int | None:
    """The class count of a `[N, C]` output (None when dynamic); other ranks are refused."""
    if len(meta.shape) != 2:
        raise SpecError(f"the {kind} postprocessor reads [N, classes] scores, but output "
                        f"'{meta.name}' is {meta.describe()}; pick a [N, C] output with "
                        "--model-output")
    if meta.dtype.kind != "f":
        raise SpecError(f"the {kind} postprocessor reads float scores, but output '{meta.name}' "
                        f"is {meta.describe()}")
    return meta.shape[1]


def _check_labels(spec: Any, meta: TensorMeta, classes: int | None) -> None:
    if spec.label_names and classes is not None and len(spec.label_names) != classes:
        raise SpecError(f"labels file '{spec.labels}' has {len(spec.label_names)} label(s), but "
                        f"output '{meta.name}' of the model has {classes} classes "
                        f"({meta.describe()}); give one label per class, in class order")


class _Spec:
    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]
        if "label_names" in out:  # the file is named; its content identified by a hash
            names = out.pop("label_names")
            out["labels_sha256"] = (hashlib.sha256("\n".join(names).encode()).hexdigest()
                                    if names else None)
        return out


@dataclass(frozen=True)
class RawPost(_Spec):
    """Model outputs as they are: one column per output (all outputs unless named)."""

    kind: ClassVar[str] = "raw"
    outputs: tuple[str, ...] = ()

    def resolve(self, model_outputs: Mapping[str, TensorMeta]) -> RawPost:
        unknown = [n for n in self.outputs if n not in model_outputs]
        if unknown:
            raise SpecError(f"the raw postprocessor names output(s) {unknown}, but the model's "
                            f"outputs are {list(model_outputs)}")
        return replace(self, outputs=self.outputs or tuple(model_outputs))

    def column_types(self, model_outputs: Mapping[str, TensorMeta]) -> dict[str, pa.DataType | None]:
        return {name: output_type(model_outputs[name]) for name in self.outputs}


@dataclass(frozen=True)
class ArgmaxPost(_Spec):
    """The best class of a `[N, C]` output: `label` (int32), `label_name` (string), `score` (float32).

    `score` is the class's softmax probability (`softmax=False`: the output's value as is).
    """

    kind: ClassVar[str] = "argmax"
    output: str | None = None
    labels: str | None = None
    label_names: tuple[str, ...] = field(default=(), repr=False)
    softmax: bool = True
    prefix: str = ""

    def resolve(self, model_outputs: Mapping[str, TensorMeta]) -> ArgmaxPost:
        meta = _check_output(self.output, self.kind, model_outputs)
        _check_labels(self, meta, _classes(meta, self.kind))
        return replace(self, output=meta.name)

    def column_types(self, model_outputs: Mapping[str, TensorMeta]) -> dict[str, pa.DataType | None]:
        p = self.prefix
        out: dict[str, pa.DataType | None] = {f"{p}label": pa.int32()}
        if self.label_names:
            out[f"{p}label_name"] = pa.string()
        out[f"{p}score"] = pa.float32()
        return out


@dataclass(frozen=True)
class TopKPost(_Spec):
    """The `k` best classes, best first: `topk_labels`, `topk_names`, `topk_scores` (fixed-size lists)."""

    kind: ClassVar[str] = "topk"
    output: str | None = None
    k: int | None = None
    labels: str | None = None
    label_names: tuple[str, ...] = field(default=(), repr=False)
    softmax: bool = True
    prefix: str = ""

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, int) or isinstance(self.k, bool)
                                   or self.k < 1):
            raise SpecError(f"topk k must be an integer >= 1, got {self.k!r}")

    def resolve(self, model_outputs: Mapping[str, TensorMeta]) -> TopKPost:
        meta = _check_output(self.output, self.kind, model_outputs)
        classes = _classes(meta, self.kind)
        _check_labels(self, meta, classes)
        k = self.k or (min(DEFAULT_TOP_K, classes) if classes else DEFAULT_TOP_K)
        if classes is not None and k > classes:
            raise SpecError(f"topk k={k} is more than the {classes} classes of output "
                            f"'{meta.name}'; pass --top-k {classes} or fewer")
        return replace(self, output=meta.name, k=k)

    def column_types(self, model_outputs: Mapping[str, TensorMeta]) -> dict[str, pa.DataType | None]:
        p, k = self.prefix, self.k or DEFAULT_TOP_K
        out: dict[str, pa.DataType | None] = {f"{p}topk_labels": pa.list_(pa.int32(), k)}
        if self.label_names:
            out[f"{p}topk_names"] = pa.list_(pa.string(), k)
        out[f"{p}topk_scores"] = pa.list_(pa.float32(), k)
        return out


@dataclass(frozen=True)
class SigmoidPost(_Spec):
    """Multi-label: every class whose sigmoid is >= `threshold`, as `labels`, `label_names`, `scores` lists."""

    kind: ClassVar[str] = "sigmoid"
    output: str | None = None
    threshold: float = 0.5
    labels: str | None = None
    label_names: tuple[str, ...] = field(default=(), repr=False)
    prefix: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int | float) or isinstance(self.threshold, bool) \
                or not 0.0 <= self.threshold <= 1.0:
            raise SpecError(f"sigmoid threshold must be a number in [0, 1], got {self.threshold!r}")

    def resolve(self, model_outputs: Mapping[str, TensorMeta]) -> SigmoidPost:
        meta = _check_output(self.output, self.kind, model_outputs)
        _check_labels(self, meta, _classes(meta, self.kind))
        return replace(self, output=meta.name)

    def column_types(self, model_outputs: Mapping[str, TensorMeta]) -> dict[str, pa.DataType | None]:
        p = self.prefix
        out: dict[str, pa.DataType | None] = {f"{p}labels": pa.list_(pa.int32())}
        if self.label_names:
            out[f"{p}label_names"] = pa.list_(pa.string())
        out[f"{p}scores"] = pa.list_(pa.float32())
        return out


@dataclass(frozen=True)
class EmbeddingPost(_Spec):
    """One vector per row: `[N, T, D]` pooled over the attention mask (`mean`) or the first token
    (`cls`), or a `[N, D]` output as it is (`none`); then L2-normalized unless `normalize=False`.
    Column `embedding`, fixed-size list of float32.
    """

    kind: ClassVar[str] = "embedding"
    output: str | None = None
    pooling: str = "mean"
    normalize: bool = True
    mask: str | None = "attention_mask"  # the model input holding the attention mask
    prefix: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise SpecError(f"embedding pooling must be one of {', '.join(POOLINGS)}, "
                            f"got {self.pooling!r}")

    def resolve(self, model_outputs: Mapping[str, TensorMeta],
                model_inputs: Mapping[str, TensorMeta] | None = None) -> EmbeddingPost:
        meta = _check_output(self.output, self.kind, model_outputs)
        want = 2 if self.pooling == "none" else 3
        if len(meta.shape) != want:
            fix = ("--pooling none (it is already one vector per row)" if len(meta.shape) == 2
                   else "--pooling mean or cls" if len(meta.shape) == 3 else "another output")
            raise SpecError(f"embedding pooling '{self.pooling}' reads a "
                            f"{'[N, D]' if want == 2 else '[N, T, D]'} output, but output "
                            f"'{meta.name}' is {meta.describe()}; use {fix}")
        if meta.dtype.kind != "f":
            raise SpecError(f"the embedding postprocessor reads float outputs, but output "
                            f"'{meta.name}' is {meta.describe()}")
        mask = self.mask
        if model_inputs is not None and mask is not None and mask not in model_inputs:
            if mask != "attention_mask":
                raise SpecError(f"embedding mask input '{mask}' is not one of the model's inputs "
                                f"{list(model_inputs)}; name the attention-mask input, or null")
            mask = None  # no mask: every token counts
        if self.pooling != "mean":
            mask = None
        return replace(self, output=meta.name, mask=mask)

    def column_types(self, model_outputs: Mapping[str, TensorMeta]) -> dict[str, pa.DataType | None]:
        meta = model_outputs[str(self.output)]
        width = meta.shape[-1]
        return {f"{self.prefix}embedding": pa.list_(pa.float32(), width) if width else None}


@dataclass(frozen=True)
class FunctionPost(_Spec):
    """A user function `module:function(outputs, inputs) -> {column: values}`.

    `outputs` and `inputs` are the batch's dicts of name -> numpy array; each returned value (a
    pyarrow array, a numpy array or a list) needs one entry per row.
    """

    kind: ClassVar[str] = "function"
    function: str

    def __post_init__(self) -> None:
        if not isinstance(self.function, str) or not is_function_target(self.function):
            raise SpecError(f"postprocess function {self.function!r} is not an import path; write "
                            "module.path:function")

    def resolve(self, model_outputs: Mapping[str, TensorMeta]) -> FunctionPost:
        load_function(self.function, "postprocess function")
        return self

    def column_types(self, model_outputs: Mapping[str, TensorMeta]) -> dict[str, pa.DataType | None]:
        return {}  # known only when it runs

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.function}


PostSpec = RawPost | ArgmaxPost | TopKPost | SigmoidPost | EmbeddingPost | FunctionPost
POST_KINDS: dict[str, type[PostSpec]] = {cls.kind: cls for cls in (
    RawPost, ArgmaxPost, TopKPost, SigmoidPost, EmbeddingPost, FunctionPost)}


# --- the math, vectorized over the batch ------------------------------------------------------


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, numerically stable, in float32 (float64 stays)."""
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings, unlike 1/(1+exp(-x))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `k` largest scores per row, best first; ties: lower index first."""
    classes = scores.shape[1]
    if k < classes:
        idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        idx.sort(axis=1)
    else:
        idx = np.broadcast_to(np.arange(classes), scores.shape).copy()
    values = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(values, order, axis=1)


def mean_pool(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of `[N, T, D]` over the tokens whose mask is 1 (all tokens without a mask), float32."""
    hidden = hidden.astype(np.float32, copy=False)
    if mask is None:
        return hidden.mean(axis=1)
    weights = mask.astype(np.float32, copy=False)
    summed = np.einsum("ntd,nt->nd", hidden, weights)
    counts = np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    return summed / counts


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (at least `eps`, as torch.nn.functional.normalize does)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def _fixed_list(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), value_type), width)


def _names(label_names: pa.Array, idx: np.ndarray) -> pa.Array:
    return pc.take(label_names, pa.array(idx.reshape(-1).astype(np.int64)))


class Postprocessor:
    """Runs resolved postprocessor specs over one batch's outputs; returns the output columns."""

    def __init__(self, specs: Sequence[PostSpec]) -> None:
        self.specs = tuple(specs) or (RawPost(),)
        self._names: dict[int, pa.Array] = {}
        self._functions: dict[int, Callable[..., Any]] = {}
        for i, spec in enumerate(self.specs):
            labels = getattr(spec, "label_names", ())
            path = getattr(spec, "labels", None)
            if not labels and path:
                from workers.storage import read_bytes

                labels = parse_labels(read_bytes(path).decode(), f"'{path}'")
            if labels:
                self._names[i] = pa.array(list(labels), pa.string())
            if isinstance(spec, FunctionPost):
                self._functions[i] = load_function(spec.function, "postprocess function")

    @property
    def needs(self) -> tuple[str, ...]:
        """Model inputs the postprocessors read besides the outputs (the attention mask)."""
        return tuple(dict.fromkeys(s.mask for s in self.specs
                                   if isinstance(s, EmbeddingPost) and s.mask))

    def __call__(self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                 rows: int) -> dict[str, pa.Array]:
        columns: dict[str, pa.Array] = {}
        for i, spec in enumerate(self.specs):
            made = self._apply(i, spec, outputs, inputs, rows)
            for name, array in made.items():
                if name in columns:
                    raise DataError(f"two postprocessors make column '{name}'; give one a prefix")
                columns[name] = array
        return columns

    def _output(self, outputs: Mapping[str, np.ndarray], name: str | None, kind: str,
                rows: int) -> np.ndarray:
        if name is None:
            name = next(iter(outputs))
        if name not in outputs:
            raise DataError(f"the {kind} postprocessor reads output '{name}', but the model "
                            f"returned {sorted(outputs)}")
        array = outputs[name]
        if array.ndim == 0 or array.shape[0] != rows:
            raise DataError(f"model output '{name}' has shape {list(array.shape)} for a batch of "
                            f"{rows} rows; the model must keep the batch dimension")
        return array

    def _scores(self, array: np.ndarray, name: str | None, kind: str, i: int) -> np.ndarray:
        if array.ndim != 2:
            raise DataError(f"the {kind} postprocessor reads [N, C] scores, but output '{name}' "
                            f"has shape {list(array.shape)}")
        names = self._names.get(i)
        if names is not None and len(names) != array.shape[1]:
            raise DataError(f"output '{name}' has {array.shape[1]} classes, but the labels file "
                            f"has {len(names)} labels; give one label per class")
        return array

    def _apply(self, i: int, spec: PostSpec, outputs: Mapping[str, np.ndarray],
               inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, pa.Array]:
        names = self._names.get(i)
        if isinstance(spec, RawPost):
            return {name: tensor_to_arrow(name, self._output(outputs, name, "raw", rows))
                    for name in (spec.outputs or tuple(outputs))}
        if isinstance(spec, FunctionPost):
            return self._function(i, spec, outputs, inputs, rows)
        output = spec.output or next(iter(outputs))
        array = self._output(outputs, output, spec.kind, rows)
        p = spec.prefix
        if isinstance(spec, ArgmaxPost | TopKPost):
            scores = self._scores(array, output, spec.kind, i)
            if spec.softmax:
                scores = softmax(scores)
            k = 1 if isinstance(spec, ArgmaxPost) else min(spec.k or DEFAULT_TOP_K, scores.shape[1])
            idx, best = top_k(scores, k)
            if isinstance(spec, ArgmaxPost):
                out = {f"{p}label": pa.array(idx[:, 0].astype(np.int32))}
                if names is not None:
                    out[f"{p}label_name"] = _names(names, idx[:, 0])
                out[f"{p}score"] = pa.array(best[:, 0].astype(np.float32))
                return out
            out = {f"{p}topk_labels": _fixed_list(idx.astype(np.int32), k, pa.int32())}
            if names is not None:
                out[f"{p}topk_names"] = pa.FixedSizeListArray.from_arrays(_names(names, idx), k)
            out[f"{p}topk_scores"] = _fixed_list(best.astype(np.float32), k, pa.float32())
            return out
        if isinstance(spec, SigmoidPost):
            probs = sigmoid(self._scores(array, output, spec.kind, i))
            hit = probs >= spec.threshold
            row_idx, cls_idx = np.nonzero(hit)  # row-major: grouped by row, classes ascending
            offsets = pa.array(np.concatenate([[0], np.cumsum(hit.sum(axis=1))]).astype(np.int32))
            out = {f"{p}labels": pa.ListArray.from_arrays(offsets, pa.array(cls_idx.astype(np.int32)))}
            if names is not None:
                out[f"{p}label_names"] = pa.ListArray.from_arrays(offsets, _names(names, cls_idx))
            out[f"{p}scores"] = pa.ListArray.from_arrays(
                offsets, pa.array(probs[row_idx, cls_idx].astype(np.float32)))
            return out
        # embedding
        if spec.pooling == "none":
            if array.ndim != 2:
                raise DataError(f"embedding pooling 'none' reads [N, D], but output "
                                f"'{output}' has shape {list(array.shape)}")
            vectors = array.astype(np.float32, copy=False)
        else:
            if array.ndim != 3:
                raise DataError(f"embedding pooling '{spec.pooling}' reads [N, T, D], but output "
                                f"'{output}' has shape {list(array.shape)}")
            if spec.pooling == "cls":
                vectors = array[:, 0].astype(np.float32)
            else:
                mask = inputs.get(spec.mask) if spec.mask else None
                if mask is not None and mask.shape != array.shape[:2]:
                    raise DataError(f"attention mask '{spec.mask}' has shape {list(mask.shape)}, "
                                    f"output '{output}' {list(array.shape)}; they must agree "
                                    "on [N, T]")
                vectors = mean_pool(array, mask)
        if spec.normalize:
            vectors = l2_normalize(vectors)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return {f"{p}embedding": _fixed_list(vectors, vectors.shape[1], pa.float32())}

    def _function(self, i: int, spec: FunctionPost, outputs: Mapping[str, np.ndarray],
                  inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, pa.Array]:
        result = self._functions[i](dict(outputs), dict(inputs))
        if not isinstance(result, Mapping):
            raise DataError(f"postprocess function '{spec.function}' returned "
                            f"{type(result).__name__}; return a dict of column name -> values")
        columns: dict[str, pa.Array] = {}
        for name, value in result.items():
            where = f"postprocess function '{spec.function}' column '{name}'"
            try:
                if isinstance(value, pa.ChunkedArray):
                    array = value.combine_chunks()
                elif isinstance(value, pa.Array):
                    array = value
                elif isinstance(value, np.ndarray):
                    array = (pa.array(value) if value.ndim == 1 or value.dtype == object
                             else tensor_to_arrow(str(name), value))
                else:
                    array = pa.array(value)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
                raise DataError(f"{where} cannot become an Arrow column ({exc}); return a "
                                "pyarrow array, a numpy array or a list") from exc
            if len(array) != rows:
                raise DataError(f"{where} has {len(array)} values for a batch of {rows} rows; "
                                "return one value per row")
            columns[str(name)] = array
        return columns

