"""Benchmark dataset: N rows of `uid`, `image` [C,H,W] and `features` [F] tensors in Parquet files.

    python bench/datagen.py --output DIR --rows 100000 --files 8 --row-group-rows 2048

Tensors use Arrow's canonical fixed-shape tensor type, which both this runner and Ray Data
read as `[N, ...]` arrays without per-row Python objects. Files are written to a local
directory or any fsspec URL; each file is generated from its own seed, so a dataset is the same
whatever the number of files generated before it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class DataShape:
    """How many rows, in how many files and row groups, with which tensor shapes."""

    rows: int
    files: int = 8
    row_group_rows: int = 2048
    image: tuple[int, int, int] = (3, 32, 32)
    features: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rows", "files", "row_group_rows", "features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.files > self.rows:
            raise ValueError(f"files ({self.files}) must be <= rows ({self.rows})")

    def file_rows(self) -> list[int]:
        """Rows per file: as even as possible, the first files taking the remainder."""
        base, extra = divmod(self.rows, self.files)
        return [base + (1 if i < extra else 0) for i in range(self.files)]

    @property
    def row_bytes(self) -> int:
        """Bytes of tensor data per row (float32 image and features, int64 uid)."""
        return 4 * (int(np.prod(self.image)) + self.features) + 8


def make_table(rows: int, start: int, shape: DataShape, seed: int) -> pa.Table:
    """`rows` rows with uids from `start`: random float32 tensors (incompressible, like pixels)."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((rows, *shape.image), dtype=np.float32)
    features = rng.standard_normal((rows, shape.features), dtype=np.float32)
    return pa.table({
        "uid": pa.array(np.arange(start, start + rows, dtype=np.int64)),
        "image": pa.FixedShapeTensorArray.from_numpy_ndarray(image),
        "features": pa.FixedShapeTensorArray.from_numpy_ndarray(features),
    })


def write_dataset(output: str, shape: DataShape) -> list[str]:
    """Write the dataset as `data-00000.parquet`, ... under `output`; returns the file URLs."""
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    urls = []
    start = 0
    for index, rows in enumerate(shape.file_rows()):
        path = f"{root.rstrip('/')}/data-{index:05d}.parquet"
        with fs.open(path, "wb") as handle, pq.ParquetWriter(
                handle, make_table(1, 0, shape, 0).schema) as writer:
            # Generate a row group at a time so memory stays at one row group per file.
            for offset in range(0, rows, shape.row_group_rows):
                count = min(shape.row_group_rows, rows - offset)
                writer.write_table(make_table(count, start + offset, shape,
                                              seed=shape.seed * 1_000_003 + index * 1009 + offset),
                                   row_group_size=shape.row_group_rows)
        start += rows
        urls.append(fs.unstrip_protocol(path))
    return urls


def parse_image(text: str) -> tuple[int, int, int]:
    """'3,32,32' -> (3, 32, 32)."""
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--image wants C,H,W such as 3,32,32, got {text!r}"
                                         ) from exc
    return c, h, w


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/datagen.py", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, metavar="URI", help="directory (any fsspec URL)")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--row-group-rows", type=int, default=2048)
    p.add_argument("--image", type=parse_image, default=(3, 32, 32), metavar="C,H,W")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shape = DataShape(rows=args.rows, files=args.files, row_group_rows=args.row_group_rows,
                      image=args.image, features=args.features, seed=args.seed)
    urls = write_dataset(args.output, shape)
    fs, _ = fsspec.core.url_to_fs(args.output)
    size = sum(fs.size(u) for u in urls)
    print(f"wrote {shape.rows:,} rows in {len(urls)} file(s) to {args.output} "
          f"({size / 2**20:,.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
