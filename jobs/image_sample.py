"""Which image inputs hold JPEGs already at the model's size, from a sample of the input.

With `--image-decode auto`, a GPU actor decodes such a column on its CPUs (libjpeg-turbo, with
nothing to resize, outpaces the engine on 8 or more threads) and leaves the GPU to the engine;
other JPEGs decode on its CPU threads for the GPU's resize kernel, or with nvImageCodec
(`workers.gpuimages.open_gpu_images`). The driver reads the
first row group of a few files, the image column only, to tell.
"""

from __future__ import annotations

from typing import Any

from workers.images import jpegs_at_size
from workers.preprocess import ImagePrep
from workers.reader import sample_column
from workers.types import Shard, WorkerConfig

#: Files sampled, and images looked at in each (from its first row group).
SAMPLE_FILES = 2
SAMPLE_ROWS = 64


def sample_images(shards: list[Shard], column: str, storage: dict[str, Any]) -> list[bytes | None]:
    """Up to `SAMPLE_ROWS` values of `column` from the first row group of a few files."""
    return [value for array in sample_column(shards, column, storage, SAMPLE_FILES, SAMPLE_ROWS)
            for value in array.to_pylist()]


def at_size_images(config: WorkerConfig, shards: list[Shard]) -> tuple[str, ...]:
    """The model inputs of `--image-decode auto` image columns whose sample is all JPEGs whose
    shorter side is already the model's resize (image files in directories are not sampled)."""
    found = []
    for spec in config.preprocess:
        if isinstance(spec, ImagePrep) and spec.decode == "auto" and spec.input and \
                spec.resize and jpegs_at_size(sample_images(shards, spec.column, config.storage),
                                              spec.resize):
            found.append(spec.input)
    return tuple(found)
