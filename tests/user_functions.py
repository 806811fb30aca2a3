"""User functions the tests name by import path (`tests.user_functions:...`), as a user would
name theirs; Ray workers import them from the driver's working directory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def scale_features(table: pa.Table) -> np.ndarray:
    """Columns a and b as float32 [N, 2], b doubled."""
    a = table.column("a").to_numpy()
    b = table.column("b").to_numpy()
    return np.stack([a, 2.0 * b], axis=1).astype(np.float32)


def as_dict(table: pa.Table) -> dict[str, np.ndarray]:
    return {"x": scale_features(table)}


def wrong_shape(table: pa.Table) -> np.ndarray:
    return np.zeros((table.num_rows, 3), np.float32)


def wrong_rows(table: pa.Table) -> np.ndarray:
    return np.zeros((table.num_rows + 1, 2), np.float32)


def wrong_keys(table: pa.Table) -> dict[str, np.ndarray]:
    return {"y": scale_features(table)}


def strings(table: pa.Table) -> np.ndarray:
    return np.array([["a", "b"]] * table.num_rows)


def total(outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Postprocess: the row sum of the first output, and its row count as a list."""
    first = next(iter(outputs.values()))
    return {"total": first.reshape(len(first), -1).sum(axis=1).astype(np.float32),
            "count": [int(first.shape[1])] * len(first)}


def short(outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"total": np.zeros(1, np.float32)}


def not_a_dict(outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> list[int]:
    return [1, 2, 3]


NOT_CALLABLE = 3


#: The named actor `hold_second_batch` waits on (see tests/test_job.py's progress test).
GATE = ("progress-gate", "progress-test")
_batches = [0]


def hold_second_batch(outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]
                      ) -> dict[str, Any]:
    """Postprocess: the outputs as they are; this process's second batch first waits until the
    test opens its gate (a named Ray actor), so a shard stays half written while it looks."""
    import ray

    _batches[0] += 1
    if _batches[0] == 2:
        name, namespace = GATE
        ray.get(ray.get_actor(name, namespace=namespace).wait.remote(), timeout=120)
    return {"score": outputs["score"].reshape(-1)}
