"""What limited a GPU job, from the manifest's per-worker stage times: the summary's "limited by" line.

Each GPU worker records its GPU busy fraction (the time at least one batch executed, over its
working time) and the seconds of each host stage. A host stage's load is the share of the
working time its threads were busy: reading runs on `readers` threads, converting (decoding
images, tokenizing, copying into pinned memory) on one thread per shard that calls the
preprocessing threads, writing on one thread. When the GPU idled and a host stage was busy
nearly all the time, that stage was the limit, and the line says so and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Below this GPU busy fraction the job was held back by something other than the engine.
GPU_BUSY_LIMIT = 0.85
#: A host stage this loaded (share of the working time) is taken to be the limit.
STAGE_LOAD_LIMIT = 0.75


def stage_loads(worker: Mapping[str, Any]) -> dict[str, float]:
    """Per host stage, the share of the worker's working time its threads were busy."""
    working = float(worker.get("working_seconds") or 0.0)
    seconds = worker.get("seconds") or {}
    if working <= 0:
        return {}
    readers = max(1, int(worker.get("readers") or 1))
    return {"read": float(seconds.get("read", 0.0)) / (readers * working),
            "convert": float(seconds.get("convert", 0.0)) / working,
            "write": float(seconds.get("write", 0.0)) / working}


def gpu_decoded_most(worker: Mapping[str, Any]) -> bool:
    """True when the worker's GPU decoded most of its images (all, without row counts)."""
    if not str(worker.get("image_decode", "")).startswith("gpu"):
        return False
    rows = worker.get("image_rows") or {}
    return not rows or int(rows.get("gpu", 0)) >= int(rows.get("cpu", 0))


def limited_by(workers: Sequence[Mapping[str, Any]], convert_is: str = "converting columns",
               list_columns: Sequence[str] = ()) -> str | None:
    """The summary's line when reading, decoding or writing held the GPUs back, else None.

    `convert_is`: what the convert stage did in this job ("decoding images", ...).
    `list_columns`: tensor inputs read from list or fixed-shape tensor columns (Arrow decodes
    those value by value; a binary tensor column reads as a copy).
    """
    gpu = [w for w in workers if w.get("slots") and float(w.get("working_seconds") or 0) > 0]
    if not gpu:
        return None
    working = sum(float(w["working_seconds"]) for w in gpu)
    busy = sum(float(w.get("gpu_busy_seconds") or 0.0) for w in gpu) / working
    if busy >= GPU_BUSY_LIMIT:
        return None
    loads: dict[str, float] = {}
    for worker in gpu:
        for stage, load in stage_loads(worker).items():
            loads[stage] = max(loads.get(stage, 0.0), load)
    stage, load = max(loads.items(), key=lambda item: item[1])
    if load < STAGE_LOAD_LIMIT:
        return (f"limited by: not the host's stages (GPU busy {busy:.0%} of the workers' time; "
                f"read {loads['read']:.0%}, convert {loads['convert']:.0%}, write "
                f"{loads['write']:.0%} busy); see the manifest's per-shard seconds")
    threads = max(int(w.get("readers") or 1) for w in gpu)
    what = {"read": f"reading Parquet ({threads} reading thread(s) busy {load:.0%} of the time)",
            "convert": f"{convert_is} (busy {min(load, 1.0):.0%} of the time)",
            "write": f"writing parts (busy {min(load, 1.0):.0%} of the time)"}[stage]
    line = f"limited by: {what}; GPU busy {busy:.0%} of the workers' time"
    if stage == "read" and list_columns:
        line += (f"; column(s) {', '.join(repr(c) for c in list_columns)} are list or tensor "
                 "columns, which Arrow decodes value by value: store them as binary tensor "
                 "columns (fixed_size_binary, docs/tensor-columns.md) to read them as a copy")
    elif stage == "read":
        line += "; give each GPU more CPUs (--cpus-per-worker, --readers)"
    elif stage == "convert" and convert_is == "decoding images" and any(
            gpu_decoded_most(w) for w in gpu):
        # nvImageCodec shares the GPU with the engine: beside a ResNet-50 it decoded at half
        # its speed alone (bench/results/session25).
        line += ("; the GPU decoded them, beside the engine: decode on the CPU instead "
                 "(--image-decode cpu) where each GPU has CPUs enough, or give it more "
                 "(--cpus-per-worker, --preprocess-threads)")
    elif stage == "convert" and convert_is == "decoding images":
        line += ("; decode on the GPU (--image-decode gpu, pip install '.[gpu]') or give each "
                 "GPU more CPUs (--cpus-per-worker, --preprocess-threads)")
    elif stage == "convert":
        line += "; give each GPU more CPUs (--cpus-per-worker, --preprocess-threads)"
    return line
