"""TensorRT optimization profiles for text jobs, from token lengths sampled from the input.

A text model's inputs are `[N, L]` with both dims dynamic; its plan needs profiles covering
every batch the job cuts (`workers.batching.TokenBudget`), and runs fastest near each profile's
`opt` shape. The driver tokenizes a sample of the input (the first row group of a few files,
read through fsspec) to learn the lengths before the plan is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.batching import token_budget
from workers.preprocess import TextPrep
from workers.reader import sample_column
from workers.tensors import TensorMeta
from workers.text import TextEncoder
from workers.types import Shard, WorkerConfig

#: Files sampled, and rows tokenized from each (its first row group, at most this many rows).
SAMPLE_FILES = 4
SAMPLE_ROWS = 4096


def sample_lengths(shards: list[Shard], spec: TextPrep, storage: dict[str, Any]) -> np.ndarray:
    """Token counts of up to `SAMPLE_ROWS` rows from the first row group of a few files."""
    encoder = TextEncoder(spec.tokenizer_json, f"'{spec.tokenizer}'",
                          spec.max_length or 512, spec.truncation)
    lengths = [encoder.encode_ragged(texts.fill_null("").to_pylist()).lengths
               for texts in sample_column(shards, spec.column, storage, SAMPLE_FILES,
                                          SAMPLE_ROWS)]
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def text_profiles(config: WorkerConfig, inputs: tuple[TensorMeta, ...], shards: list[Shard]
                  ) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]
                             ] | None:
    """(batch profiles, width profiles) for a text job's plan, or None for other jobs."""
    budget = token_budget(config, inputs)
    texts = [p for p in config.preprocess if isinstance(p, TextPrep)]
    if budget is None or not texts:
        return None
    return budget.profiles(sample_lengths(shards, texts[0], config.storage))
