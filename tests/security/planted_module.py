"""A module a config from elsewhere names as a user function: importing it runs its top level.

It records that by appending a line to the file `$PLANTED_IMPORT_MARKER` (the tests'
stand-in for whatever code a foreign module would run).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

_marker = os.environ.get("PLANTED_IMPORT_MARKER")
if _marker:
    with open(_marker, "a") as f:
        f.write(f"imported by pid {os.getpid()}\n")


def prep(table: pa.Table) -> np.ndarray:
    return np.zeros((table.num_rows, 8), np.float32)


def post(outputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    return {"zero": np.zeros(rows, np.float32)}
