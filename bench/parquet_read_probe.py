"""Where Parquet tensor reading spends its time: file access, memory pool and threads.

    python -m bench.parquet_read_probe FILE.parquet [--threads 1,4,8,12,16] [--rows 2400]

Reads every row group of FILE (columns img, uid) and prints rows/s per variant: through an
fsspec file object (what the runner does), through pyarrow's own file (memory-mapped), from
bytes already in memory (decoding alone), and with each memory pool.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def rate(path: str, threads: int, opener: Callable[[], pq.ParquetFile]) -> float:
    meta = pq.read_metadata(path)
    groups = list(range(meta.num_row_groups))

    def read(i: int) -> int:
        table = opener().read_row_group(i, columns=["img", "uid"], use_threads=False)
        table.column("img").combine_chunks().storage.flatten().to_numpy()
        return int(table.num_rows)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        rows = sum(pool.map(read, groups))
    return rows / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--threads", default="1,4,8,12,16")
    parser.add_argument("--rows", type=int, default=2400,
                        help="if FILE does not exist, write this many random images to it")
    args = parser.parse_args()
    if not os.path.exists(args.path):
        from bench.gpu_pipeline import write_images

        write_images(Path(args.path), args.rows, 400, seed=0)
    threads = [int(t) for t in args.threads.split(",")]
    fs = fsspec.filesystem("file")
    with open(args.path, "rb") as f:
        data = f.read()
    openers: dict[str, Callable[[], pq.ParquetFile]] = {
        "fsspec": lambda: pq.ParquetFile(fs.open(args.path, "rb")),
        "native-mmap": lambda: pq.ParquetFile(args.path, memory_map=True),
        "in-memory": lambda: pq.ParquetFile(pa.BufferReader(data)),
    }
    pools = {"default": pa.default_memory_pool()}
    for name in ("jemalloc", "mimalloc", "system"):
        with contextlib.suppress(NotImplementedError, AttributeError):
            pools[name] = getattr(pa, f"{name}_memory_pool")()
    print(f"pyarrow {pa.__version__}, default pool {pa.default_memory_pool().backend_name}")
    for pool_name, pool in pools.items():
        pa.set_memory_pool(pool)
        for opener_name, opener in openers.items():
            if pool_name != "default" and opener_name == "native-mmap":
                continue
            rates = [rate(args.path, n, opener) for n in threads]
            print(f"pool {pool_name:8s} {opener_name:12s} "
                  + "  ".join(f"{n}t {r:6.0f}" for n, r in zip(threads, rates, strict=True)),
                  flush=True)


if __name__ == "__main__":
    main()
