"""Checks a spec against the model and the input schema before any actor starts."""

from __future__ import annotations

from collections.abc import Collection

import pyarrow as pa

from workers.convert import check_feed
from workers.errors import SpecError
from workers.tensors import ModelInfo


def resolve_bindings(column_map: dict[str, str], model: ModelInfo, schema: pa.Schema,
                     source: str, fed: Collection[str] = ()) -> tuple[tuple[str, str], ...]:
    """(model input, column) for every model input, each checked to exist and fit the input.

    Inputs in `fed` are fed by a preprocessor instead, and get no binding.
    """
    input_names = [meta.name for meta in model.inputs]
    unknown = sorted(set(column_map) - set(input_names))
    if unknown:
        raise SpecError(f"--column maps {unknown}, but the model's inputs are {input_names}; "
                        "use --column INPUT=COLUMN with one of those inputs")
    bindings = []
    for meta in model.inputs:
        if meta.name in fed:
            continue
        column = column_map.get(meta.name, meta.name)
        index = schema.get_field_index(column)
        if index < 0:
            how = "mapped by --column" if meta.name in column_map else "of the same name"
            raise SpecError(f"column '{column}' (for model input '{meta.name}', {how}) is not in "
                            f"{source}; its columns are {schema.names}; "
                            f"map it with --column {meta.name}=COLUMN")
        check_feed(column, schema.field(index).type, meta)
        bindings.append((meta.name, column))
    return tuple(bindings)


def check_keep(keep: tuple[str, ...], model: ModelInfo, schema: pa.Schema, source: str,
               output_columns: Collection[str] | None = None) -> None:
    """Every kept column exists and none collides with an output column (default: the outputs')."""
    for column in keep:
        if schema.get_field_index(column) < 0:
            raise SpecError(f"--keep column '{column}' is not in {source}; "
                            f"its columns are {schema.names}")
    outputs = (set(output_columns) if output_columns is not None
               else {meta.name for meta in model.outputs})
    clash = sorted(outputs & set(keep))
    if clash:
        raise SpecError(f"--keep column(s) {clash} have the same name as model output(s); "
                        "outputs become columns of those names, so keep a different column")
    if len(set(keep)) != len(keep):
        raise SpecError(f"--keep names a column more than once: {list(keep)}")


def schema_problem(bindings: tuple[tuple[str, str], ...], keep: tuple[str, ...],
                   model: ModelInfo, schema: pa.Schema) -> str | None:
    """Why a file with `schema` cannot be processed with these bindings, or None if it can."""
    metas = {meta.name: meta for meta in model.inputs}
    needed = [column for _, column in bindings] + list(keep)
    missing = [c for c in dict.fromkeys(needed) if schema.get_field_index(c) < 0]
    if missing:
        return f"schema differs: no column(s) {missing}"
    for name, column in bindings:
        try:
            check_feed(column, schema.field(column).type, metas[name])
        except SpecError as exc:
            return f"schema differs: {exc}"
    return None
