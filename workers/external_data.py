"""External data of ONNX models: every reference found, checked, and read only from the model's
own directory.

An ONNX tensor may keep its bytes in a file named by its `location`; any tensor can (graph
initializers, sparse initializers, the tensor attributes of any node, Constant's `value`
included, in subgraphs and in model-local functions). A runtime resolves those names itself:
ONNX Runtime, given a model's bytes, against its working directory; TensorRT's parser against
the model file's directory. A model from elsewhere could so read any file the worker can.

So the runner resolves them instead. A location must be a plain relative path (no `..`, no
absolute path, no scheme, no glob or ORT memory-marker characters) inside the directory of a
model given by path or URI; a local file reached through a symlink must stay inside it too.
The driver reads the files there through fsspec and hands their bytes to the backend
(`ModelFiles`); a model given as bytes alone may name none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.errors import SpecError, StorageError
from workers.storage import filesystem, is_local, read_bytes

if TYPE_CHECKING:
    import onnx

# One path component of an external-data file: what exporters write (`model.onnx.data`,
# `onnx__MatMul_123`, `encoder.layer.0.weight`), nothing a filesystem, fsspec or ONNX Runtime
# gives a meaning (`:` schemes and drives, `*?[]` globs, `\\`, `~`, control characters).
_COMPONENT = re.compile(r"^[A-Za-z0-9_.+=@,% -]+$")


@dataclass(frozen=True)
class ExternalRef:
    """One tensor whose bytes live in an external file."""

    tensor: str
    location: str
    where: str  # "initializer 'w'", "Constant node 'c' in subgraph 'then'"


@dataclass(frozen=True)
class ModelFiles:
    """An ONNX model's bytes with the external-data files it names, as the driver read them."""

    model: bytes
    external: tuple[tuple[str, bytes], ...] = ()


def _load(model: bytes | onnx.ModelProto, source: str) -> onnx.ModelProto:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load_model_from_string(model)
    except Exception as exc:
        raise SpecError(f"{source} is not an ONNX model ({exc}); pass a .onnx file") from exc


def _located(tensor: Any, where: str) -> Iterator[ExternalRef]:
    import onnx

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        yield ExternalRef(tensor.name, entries.get("location", ""), where)


def _node_tensors(node: Any, scope: str) -> Iterator[ExternalRef]:
    import onnx

    label = f"{node.op_type} node" + (f" '{node.name}'" if node.name else "") + scope
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield from _located(attr.t, label)
        elif attr.type == onnx.AttributeProto.TENSORS:
            for tensor in attr.tensors:
                yield from _located(tensor, label)
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            yield from _located(attr.sparse_tensor.values, label)
            yield from _located(attr.sparse_tensor.indices, label)
        elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
            for sparse in attr.sparse_tensors:
                yield from _located(sparse.values, label)
                yield from _located(sparse.indices, label)
        elif attr.type == onnx.AttributeProto.GRAPH:
            yield from _graph_tensors(attr.g, f" in subgraph '{attr.g.name}'")
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for graph in attr.graphs:
                yield from _graph_tensors(graph, f" in subgraph '{graph.name}'")


def _graph_tensors(graph: Any, scope: str) -> Iterator[ExternalRef]:
    for tensor in graph.initializer:
        yield from _located(tensor, f"initializer '{tensor.name}'{scope}")
    for sparse in graph.sparse_initializer:
        where = f"sparse initializer '{sparse.values.name}'{scope}"
        yield from _located(sparse.values, where)
        yield from _located(sparse.indices, where)
    for node in graph.node:
        yield from _node_tensors(node, scope)


def find_external_data(model: bytes | onnx.ModelProto, source: str = "model"
                       ) -> list[ExternalRef]:
    """Every tensor of the model (graph, subgraphs, functions) whose bytes are external."""
    proto = _load(model, source)
    refs = list(_graph_tensors(proto.graph, ""))
    for function in proto.functions:
        for node in function.node:
            refs += _node_tensors(node, f" in function '{function.name}'")
    return refs


def _location_problem(location: str) -> str | None:
    """Why `location` is not a plain relative path inside the model's directory (None: it is)."""
    if not location:
        return "which is empty"
    if location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", location):
        return "which is not a relative path"
    parts = location.split("/")
    if ".." in parts:
        return "which leaves the model's directory"
    if any(not _COMPONENT.match(part) or part == "." for part in parts):
        return "which holds characters a file name here may not"
    return None


def _refused(source: str, ref: ExternalRef, why: str) -> SpecError:
    return SpecError(f"{source} keeps tensor '{ref.tensor}' ({ref.where}) in the external file "
                     f"'{ref.location}', {why}; external data must be files beside the model, "
                     "named by relative paths inside its directory: re-save it with "
                     "onnx.save_model(model, PATH, save_as_external_data=True, "
                     "location='NAME.data')")


def checked_locations(model: bytes | onnx.ModelProto, source: str = "model") -> list[str]:
    """The external files the model names (sorted, unique), each a plain relative path;
    SpecError naming the tensor for any other."""
    refs = find_external_data(model, source)
    for ref in refs:
        problem = _location_problem(ref.location)
        if problem:
            raise _refused(source, ref, problem)
    return sorted({ref.location for ref in refs})


def refuse_without_directory(model: bytes, source: str, given: Mapping[str, bytes]) -> None:
    """SpecError when a model given as bytes names an external file it was not given with."""
    for ref in find_external_data(model, source):
        if ref.location not in given:
            raise _refused(source, ref, "and it was given as bytes, with no directory to hold "
                                        "that file")


def model_directory(model_uri: str) -> str:
    """The directory of the model at `model_uri`, where its external files must be."""
    return model_uri.rsplit("/", 1)[0] if "/" in model_uri else "."


def check_model_directory(model: bytes, model_uri: str, storage_options: Mapping[str, Any]
                          | None = None, source: str | None = None) -> list[str]:
    """The external files of the model at `model_uri`, checked to stay inside its directory.

    Lexically for every store; on a local filesystem also after resolving symlinks. A model URI
    with a query string (a presigned URL) can name none: its files would need URLs of their own.
    """
    source = source or f"model '{model_uri}'"
    locations = checked_locations(model, source)
    if not locations:
        return []
    refs = {ref.location: ref for ref in find_external_data(model, source)}
    if "?" in model_uri.split("://", 1)[-1] and "://" in model_uri:
        raise _refused(source, refs[locations[0]], "and the model's URI has a query string (a "
                       "presigned URL?), so no file beside it can be named")
    for location in locations:
        resolved = _escapes(model_uri, location, storage_options)
        if resolved is not None:
            raise _refused(source, refs[location], f"which resolves to '{resolved}', outside "
                                                   "the model's directory")
    return locations


def _escapes(model_uri: str, location: str, storage_options: Mapping[str, Any] | None
             ) -> str | None:
    """Where a local external file really is, when symlinks take it out of the model's
    directory (None: it stays inside, or the store has no symlinks)."""
    fs, base = filesystem(model_directory(model_uri), storage_options)
    if not is_local(fs):
        return None
    root = os.path.realpath(base)
    resolved = os.path.realpath(os.path.join(base, location))
    return None if os.path.commonpath([root, resolved]) == root else resolved


def read_external_files(model_uri: str, locations: list[str],
                        storage_options: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The bytes of each external file (checked locations), read from the model's directory."""
    base = model_directory(model_uri)
    out = {}
    for location in locations:
        # Callers pass checked locations; checking again keeps this safe on its own.
        problem = _location_problem(location)
        resolved = None if problem else _escapes(model_uri, location, storage_options)
        if problem or resolved:
            why = problem or f"which resolves to '{resolved}', outside the model's directory"
            raise SpecError(f"model '{model_uri}' names the external file '{location}', {why}; "
                            "external data must be files beside the model")
        try:
            out[location] = read_bytes(f"{base}/{location}", storage_options)
        except StorageError as exc:
            raise StorageError(f"model '{model_uri}' keeps weights in '{location}', which cannot "
                               f"be read ({exc}); keep the external data files next to the model"
                               ) from exc
    return out
