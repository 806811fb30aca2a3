"""A batch's output table: kept columns, then the postprocessors' columns (default: every output)."""

from __future__ import annotations

import pyarrow as pa

from workers.backends.base import Batch
from workers.errors import DataError
from workers.postprocess import Postprocessor

#: Kept columns named with this prefix carry model inputs a postprocessor reads (the attention
#: mask) alongside their rows, through either inference path; they never reach the part.
CARRY_PREFIX = "__input__:"


def carry_inputs(kept: pa.Table, feeds: Batch, names: tuple[str, ...]) -> pa.Table:
    """`kept` plus the model inputs `names` as hidden tensor columns (see `CARRY_PREFIX`)."""
    for name in names:
        if name in feeds:
            kept = kept.append_column(f"{CARRY_PREFIX}{name}",
                                      pa.FixedShapeTensorArray.from_numpy_ndarray(feeds[name]))
    return kept


def output_table(kept: pa.Table, outputs: Batch, rows: int,
                 post: Postprocessor | None = None) -> pa.Table:
    """Kept columns followed by the postprocessors' columns (default: one per model output)."""
    carried = [name for name in kept.column_names if name.startswith(CARRY_PREFIX)]
    inputs = {name[len(CARRY_PREFIX):]: kept.column(name).combine_chunks().to_numpy_ndarray()
              for name in carried}
    kept = kept.drop_columns(carried)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise DataError(f"model output '{name}' has {array.shape[0] if array.ndim else 0} rows "
                            f"for a batch of {rows}; the model must keep the batch dimension")
    columns = dict(zip(kept.column_names, kept.columns, strict=True))
    for name, array in (post or Postprocessor(())).__call__(outputs, inputs, rows).items():
        if name in columns:
            raise DataError(f"postprocessor column '{name}' has the name of a kept column; "
                            "keep a different column or give the postprocessor a prefix")
        columns[name] = array
    return pa.table(columns)
