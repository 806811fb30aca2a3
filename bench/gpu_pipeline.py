"""GPU pipeline benchmark: engine alone vs the actor pipeline from Parquet to Parquet, K = 1, 2, 3.

Run on a machine with a CUDA GPU and onnxruntime-gpu:

    python -m bench.gpu_pipeline --out bench/results

In one run it writes random images (float32 3x224x224) to Parquet on local disk, in each layout
of `--layout`: `tensor` (a fixed-shape tensor column, which Parquet stores as a list of floats
that Arrow decodes value by value) and `binary` (a fixed_size_binary column holding each row's
raw bytes, `workers.convert.tensor_to_binary_column`, which decodes as a memcpy). The same
images go into every layout. For each MODEL:MATH pair of `--runs` (ResNet-style CNNs with random
weights and batch norm folded into the convolutions; ONNX Runtime's default TF32 convolutions, or
strict FP32) it reports:

- (a) engine only: the same ONNX Runtime CUDA sessions, inputs already on the device, batches
  back to back (one stream, and two streams alternating; the faster is the baseline);
- (b) the actor pipeline (`workers.pipeline.process_shard`) from Parquet to a committed Parquet
  part, for each layout, with K = 1, 2, 3 slots in flight and each C of `--concurrent` (batches
  executing at once, C <= K), after the slots' warm-up and a warm-up shard: one shard alone,
  and (b') the same rows as 4 shards, `--passes` times over, two shards in flight
  at once (as an actor with two calls in flight runs them: the next shard reads ahead and takes
  the slots as the last one's batches finish);
- (c) = (b)/(a), and the per-stage seconds and GPU busy fraction of every (b) run;
- correctness: every K's output for a shard with a partial last batch, written over poisoned
  (NaN) buffers, against ONNX Runtime on the CPU (relative error, every element written).

Reading alone (row groups decoded and converted, no GPU) is measured with 1 to R threads for each
layout, so the table says when the host, not the GPU, is the limit. A table is printed last; everything
is also written as JSON and a log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

from bench.runlog import RunLog
from workers import cuda
from workers.backends.base import BackendConfig
from workers.backends.onnxruntime import OnnxRuntimeBackend, OrtCudaSlot, import_onnxruntime
from workers.convert import column_to_tensor, tensor_to_binary_column
from workers.pipeline import process_shard
from workers.rowgroups import RowGroupReader
from workers.slots import SlotPool
from workers.storage import file_version, filesystem
from workers.types import Shard, ShardResult, WorkerConfig

IMAGE = (3, 224, 224)
CLASSES = 1000
#: How the image column is stored: a fixed-shape tensor, or each row's raw bytes.
LAYOUTS = ("tensor", "binary")
#: Bottleneck blocks per stage of the ResNet-style models.
MODELS: dict[str, tuple[int, ...]] = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3),
                                      "resnet152": (3, 8, 36, 3)}


# The model ------------------------------------------------------------------------------------
def resnet(blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64, classes: int = CLASSES,
           seed: int = 0, image: tuple[int, int, int] | None = None) -> bytes:
    """A ResNet-50-shaped CNN (bottleneck blocks) with random He-initialised weights.

    `image` is the input's row shape (default `IMAGE`, 3x224x224).
    Batch norm is folded into each convolution's bias, as exporters do for inference. Each
    residual branch's last convolution is scaled down so activations stay O(1) through the
    depth with random weights (no training to keep them in range).
    """
    image = image or IMAGE
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def name(prefix: str) -> str:
        count[0] += 1
        return f"{prefix}{count[0]}"

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True,
             gain: float = 1.0) -> str:
        w, b, y = name("w"), name("b"), name("conv")
        std = gain * math.sqrt(2.0 / (cin * k * k))
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32), w))
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(cout) * 0.01).astype(np.float32), b))
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        if not relu:
            return y
        r = name("relu")
        nodes.append(helper.make_node("Relu", [y], [r]))
        return r

    # Input normalisation, as exported image models start: (x - mean) / std.
    inits.append(numpy_helper.from_array(np.full((1, image[0], 1, 1), 0.5, np.float32), "mean"))
    inits.append(numpy_helper.from_array(np.full((1, image[0], 1, 1), 1 / 0.29, np.float32),
                                         "inv_std"))
    nodes.append(helper.make_node("Sub", ["image", "mean"], ["centered"]))
    nodes.append(helper.make_node("Mul", ["centered", "inv_std"], ["normalized"]))
    x = conv("normalized", image[0], width, 7, stride=2)
    pooled = name("pool")
    nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = pooled, width
    for stage, repeats in enumerate(blocks):
        mid = width * 2 ** stage
        cout = mid * 4
        for i in range(repeats):
            stride = 2 if (i == 0 and stage > 0) else 1
            branch = conv(x, cin, mid, 1)
            branch = conv(branch, mid, mid, 3, stride=stride)
            branch = conv(branch, mid, cout, 1, relu=False, gain=0.3)
            shortcut = x if (i > 0) else conv(x, cin, cout, 1, stride=stride, relu=False)
            added, out = name("add"), name("relu")
            nodes.append(helper.make_node("Add", [branch, shortcut], [added]))
            nodes.append(helper.make_node("Relu", [added], [out]))
            x, cin = out, cout
    gap, flat = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    nodes.append(helper.make_node("Flatten", [gap], [flat], axis=1))
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((cin, classes)) / math.sqrt(cin)).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"]))
    graph = helper.make_graph(
        nodes, "resnet_bench",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="bench.gpu_pipeline")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def model_flops(blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64,
                image: tuple[int, int, int] | None = None) -> float:
    """Multiply-adds x 2 of one image through `resnet` (convolutions and the classifier)."""
    image = image or IMAGE
    h = image[1] // 2
    flops = 2 * image[0] * width * 49 * h * h
    h //= 2
    cin = width
    for stage, repeats in enumerate(blocks):
        mid = width * 2 ** stage
        cout = mid * 4
        for i in range(repeats):
            stride = 2 if (i == 0 and stage > 0) else 1
            flops += 2 * cin * mid * h * h
            h //= stride
            flops += 2 * mid * mid * 9 * h * h + 2 * mid * cout * h * h
            if i == 0:
                flops += 2 * cin * cout * h * h
            cin = cout
    return float(flops + 2 * cin * CLASSES)


# Data -----------------------------------------------------------------------------------------
def image_column(images: np.ndarray, layout: str) -> pa.Array:
    """The images as a fixed-shape tensor column, or as one fixed_size_binary value per row."""
    if layout == "binary":
        return tensor_to_binary_column(images)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(images)


def write_images(paths: dict[str, Path], rows: int, row_group: int, seed: int,
                 start: int = 0, image: tuple[int, int, int] | None = None) -> dict[str, Shard]:
    """`rows` random images (uniform [0,1) float32) and a uid, the same in every layout's file.

    `paths` maps a layout (`LAYOUTS`) to its file; `image` is the row shape (default `IMAGE`).
    The binary column is written without dictionary encoding: each value is a whole image, so
    a dictionary would only cost time.
    """
    image = image or IMAGE
    rng = np.random.default_rng(seed)
    writers = {}
    for layout, path in paths.items():
        image_type = (pa.binary(4 * math.prod(image)) if layout == "binary"
                      else pa.fixed_shape_tensor(pa.float32(), list(image)))
        schema = pa.schema([("uid", pa.int64()), ("img", image_type)])
        writers[layout] = pq.ParquetWriter(
            path, schema, compression="snappy",
            use_dictionary=["uid"] if layout == "binary" else True)
    try:
        for offset in range(0, rows, row_group):
            n = min(row_group, rows - offset)
            images = rng.random((n, *image), dtype=np.float32)
            uid = pa.array(np.arange(start + offset, start + offset + n), pa.int64())
            for layout, writer in writers.items():
                writer.write_table(pa.table({"uid": uid, "img": image_column(images, layout)},
                                            schema=writer.schema))
    finally:
        for writer in writers.values():
            writer.close()
    shards = {}
    for layout, path in paths.items():
        fs, p = filesystem(str(path))
        info = fs.info(p)
        meta = pq.read_metadata(path)
        shards[layout] = Shard(url=fs.unstrip_protocol(p), size=int(info["size"]),
                               version=file_version(info), row_groups=(0, meta.num_row_groups),
                               rows=meta.num_rows)
    return shards


def read_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    images = column_to_tensor("img", table.column("img"),
                              _image_meta()).astype(np.float32, copy=False)
    return table.column("uid").to_numpy(), images


def _image_meta() -> Any:
    from workers.tensors import TensorMeta

    return TensorMeta("image", np.dtype(np.float32), (None, *IMAGE))


# Measurements ---------------------------------------------------------------------------------
def engine_only(backend: OnnxRuntimeBackend, batch: int, iters: int, streams: int,
                repeats: int) -> dict[str, Any]:
    """Rows/s of back-to-back executions on device-resident inputs, over `streams` slots."""
    slots: list[OrtCudaSlot] = []
    for _ in range(streams):
        slot = backend.open_slot(batch)
        assert isinstance(slot, OrtCudaSlot)
        slots.append(slot)
    try:
        rng = np.random.default_rng(1)
        for slot in slots:
            slot.host_inputs["image"][:] = rng.random((batch, *IMAGE), dtype=np.float32)
            slot.submit(batch)  # copies the inputs in (and warms the session up)
            slot.wait()
        for _ in range(2):  # further warm-up: algorithm caches, arena growth
            for slot in slots:
                slot.execute(batch)
        for slot in slots:
            slot.stream.synchronize()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(iters):
                slots[i % streams].execute(batch)
            for slot in slots:
                slot.stream.synchronize()
            rates.append(iters * batch / (time.perf_counter() - t0))
        return {"streams": streams, "rows_per_s": statistics.median(rates),
                "runs": rates, "iters": iters, "batch": batch}
    finally:
        for slot in slots:
            slot.close()


def read_only(shard: Shard, readers: int, max_rows: int = 4800) -> dict[str, Any]:
    """Rows/s of reading and converting the shard's first row groups alone (no GPU)."""
    meta = _image_meta()
    footer = pq.read_metadata(filesystem(shard.url)[1])
    groups = [footer.row_group(i).num_rows for i in range(footer.num_row_groups)]
    stop, rows_in = 0, 0
    while stop < len(groups) and rows_in < max_rows:
        rows_in += groups[stop]
        stop += 1
    shard = replace(shard, row_groups=(0, stop), rows=rows_in)

    def convert(table: pa.Table) -> tuple[dict[str, np.ndarray], pa.Table]:
        return {"image": column_to_tensor("img", table.column("img"), meta)}, table.select(["uid"])

    t0 = time.perf_counter()
    rows = 0
    with RowGroupReader(shard, ["img", "uid"], convert, threads=readers) as reader:
        for _, kept, _, _ in reader:
            rows += kept.num_rows
    seconds = time.perf_counter() - t0
    return {"readers": readers, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def poison(pool: SlotPool) -> None:
    """NaN in every slot's output buffers, host and device: an unwritten element shows."""
    for slot in pool.slots:
        assert isinstance(slot, OrtCudaSlot)
        for _, host, _, device in slot._outputs:
            host[...] = np.nan
            device.memset_async(0xFF, slot.stream)  # all-ones bits: a float32 NaN
        slot.stream.synchronize()


def config_for(out: Path, batch: int, slots: int, readers: int,
               concurrent: int = 2) -> WorkerConfig:
    return WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cuda"),
                        output_url=str(out), bindings=(("image", "img"),), keep=("uid",),
                        batch_size=batch, slots=slots, readers=readers,
                        concurrent_batches=concurrent)


def check_part(result: ShardResult, uid: np.ndarray,
               reference: np.ndarray | None = None) -> dict[str, Any]:
    """Rows, order and completeness of a part; relative error against `reference` if given."""
    table = pq.read_table(result.part_url)
    logits = np.stack(table.column("logits").combine_chunks().to_numpy_ndarray())
    out: dict[str, Any] = {
        "rows": table.num_rows,
        "uid_in_order": bool(np.array_equal(table.column("uid").to_numpy(), uid)),
        "nan_elements": int(np.isnan(logits).sum()),
        "elements": int(logits.size),
    }
    if reference is not None:
        diff = logits.astype(np.float64) - reference
        out["rel_error"] = float(np.linalg.norm(diff) / np.linalg.norm(reference))
        # Random images give similar logits; the rows' deviations from the mean row are what
        # tells one image from another, so their error is the stricter check.
        centered = reference - reference.mean(axis=0)
        out["rel_error_centered"] = float(np.linalg.norm(diff - diff.mean(axis=0))
                                          / np.linalg.norm(centered))
        out["max_abs_error"] = float(np.abs(diff).max())
    return out


def stage_summary(result: ShardResult) -> dict[str, float]:
    t = result.times
    return {"read": t.read, "convert": t.convert, "h2d": t.h2d, "compute": t.compute,
            "d2h": t.d2h, "write": t.write, "host_infer": t.infer, "commit": t.commit,
            "total": t.total, "gpu_busy": t.gpu_busy, "gpu_busy_fraction": t.gpu_busy_fraction,
            "first_batch": t.first_batch, "submit": t.submit}


def run_mode(model_name: str, math_mode: str, model: bytes, datasets: dict[str, dict[str, Shard]],
             layout_parts: dict[str, list[Shard]], reference: np.ndarray, check_uid: np.ndarray,
             args: argparse.Namespace, work: Path, log: Any) -> dict[str, Any]:
    """Engine only, then the pipeline at every K for every layout, for one model in one math mode.

    `datasets` maps each layout to its `main`, `warm` and `check` shards, `layout_parts` to the
    main file cut into shards for the shards-in-flight runs.
    """
    options = {"use_tf32": "1" if math_mode == "tf32" else "0"}
    result: dict[str, Any] = {"model": model_name, "gflops": model_flops(MODELS[model_name]) / 1e9,
                              "math": math_mode, "cuda_options": options}
    math_mode = f"{model_name}/{math_mode}"  # the log's label
    backend = OnnxRuntimeBackend(model, BackendConfig(device="cuda"), cuda_options=options)
    backend.load()
    try:
        log(f"[{math_mode}] providers {backend.providers}")
        engine = [engine_only(backend, args.batch, args.engine_iters, streams, args.repeats)
                  for streams in (1, 2)]
        for e in engine:
            log(f"[{math_mode}] engine only, {e['streams']} stream(s): "
                f"{e['rows_per_s']:.0f} rows/s (runs {[round(r) for r in e['runs']]})")
        result["engine"] = engine
        if args.engine_sustained_iters:
            # Two streams again, for about as long as a shards-in-flight run: the GPU's clocks
            # under sustained load, against the short runs' (a). Reported, not the baseline.
            sustained = engine_only(backend, args.batch, args.engine_sustained_iters, 2, 1)
            result["engine_sustained"] = sustained
            log(f"[{math_mode}] engine only, sustained ({args.engine_sustained_iters} batches): "
                f"{sustained['rows_per_s']:.0f} rows/s")
        baseline = max(e["rows_per_s"] for e in engine)
        result["engine_rows_per_s"] = baseline
        pipelines = []
        # Batches executing at once: every value of --concurrent up to K (more is the same as K).
        settings = [(k, c) for k in args.slots for c in args.concurrent if c <= k]
        for (k, concurrent), layout in itertools.product(settings, datasets):
            data, parts = datasets[layout], layout_parts[layout]
            label = f"{math_mode} {layout} C={concurrent}"
            with SlotPool(backend, k, args.batch, concurrent) as pool:
                log(f"[{label}] K={k}: slots warmed up in {pool.warm_up():.2f} s")
                out = work / f"out-k{k}"
                config = config_for(out, args.batch, k, args.readers, concurrent)
                process_shard(data["warm"], config, backend, slots=pool)  # warm-up
                runs: list[dict[str, Any]] = []
                for r in range(args.single_repeats):
                    shutil.rmtree(out, ignore_errors=True)
                    poison(pool)
                    res = process_shard(data["main"], config, backend, slots=pool)
                    check = check_part(res, np.arange(data["main"].rows))
                    runs.append({"rows_per_s": res.rows / res.times.total,
                                 "stages": stage_summary(res), "check": check})
                    log(f"[{label}] pipeline K={k} run {r}: "
                        f"{res.rows / res.times.total:.0f} rows/s, stages "
                        + json.dumps({s: round(v, 3) for s, v in stage_summary(res).items()})
                        + f", check {check}")
                # The same rows as consecutive shards, two in flight at a time, as an actor
                # with two calls in flight runs them: each reads ahead while the one before
                # it holds the slots (`SlotPool.turn`).
                stream_runs: list[dict[str, Any]] = []
                for r in range(args.repeats):
                    shutil.rmtree(out, ignore_errors=True)
                    poison(pool)
                    busy0 = pool.busy.seconds
                    if r == 0 and args.trace:
                        pool.trace = []
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(2, thread_name_prefix="call") as calls:
                        futures = [calls.submit(process_shard, shard, config, backend,
                                                slots=pool)
                                   for _ in range(args.passes) for shard in parts]
                        results = [f.result() for f in futures]
                    wall = time.perf_counter() - t0
                    rows = sum(res.rows for res in results)
                    # Each pass rewrites the same parts; the last pass's are the ones to check.
                    offsets = [sum(p.rows for p in parts[:i]) for i in range(len(parts))]
                    checks = [check_part(res, np.arange(shard.rows) + offset)
                              for res, shard, offset in zip(results[-len(parts):], parts,
                                                            offsets, strict=True)]
                    # The union of every batch's execution (the pool's, across shards).
                    busy = (pool.busy.seconds - busy0) / wall
                    if pool.trace is not None:
                        # Per batch: shard ticket, host submit and collect seconds, GPU start
                        # and end seconds (host and GPU clocks start about together).
                        result.setdefault("traces", []).append(
                            {"label": label, "slots": k, "batches": pool.trace})
                        pool.trace = None
                    stream_runs.append({"rows_per_s": rows / wall, "gpu_busy_fraction": busy,
                                        "first_batch": [res.times.first_batch for res in results],
                                        "checks": checks})
                    log(f"[{label}] pipeline K={k} {len(results)} shards ({rows} rows), "
                        f"2 in flight, run "
                        f"{r}: {rows / wall:.0f} rows/s, GPU busy {busy:.3f}, first batch s "
                        f"{[round(res.times.first_batch, 2) for res in results]}, "
                        f"checks {checks}")
                # Correctness: a shard ending in a partial batch, over poisoned buffers.
                shutil.rmtree(out, ignore_errors=True)
                poison(pool)
                res = process_shard(data["check"], config, backend, slots=pool)
                correctness = check_part(res, check_uid, reference)
                log(f"[{label}] correctness K={k}: {correctness}")
                shutil.rmtree(out, ignore_errors=True)
            median = statistics.median(r["rows_per_s"] for r in runs)
            stream = statistics.median(r["rows_per_s"] for r in stream_runs)
            pipelines.append({"layout": layout, "slots": k, "concurrent": concurrent,
                              "rows_per_s": median,
                              "ratio": median / baseline,
                              "runs": runs, "stream_rows_per_s": stream,
                              "stream_ratio": stream / baseline, "stream_runs": stream_runs,
                              "correctness": correctness})
        result["pipeline"] = pipelines
    finally:
        backend.close()
    return result


def table(results: dict[str, Any]) -> str:
    lines = [
        f"card: {results['device']['name']} (cc {results['device']['cc']}), "
        f"{results['host']['cpus']} CPUs; onnxruntime {results['onnxruntime']}; "
        f"batch {results['batch']}, shard {results['rows']} rows of float32 3x224x224 "
        f"in row groups of {results['row_group']}, {results['readers']} reading threads",
        *(f"read only, {layout} layout (Parquet on local disk -> model input, no GPU): "
          + ", ".join(f"{r['readers']} thread(s) {r['rows_per_s']:.0f} rows/s" for r in reads)
          for layout, reads in results["read_only"].items()),
        "",
        "| model | math | layout | K | C | (a) engine only rows/s | (b) pipeline, 1 shard, rows/s | "
        "(c) = (b)/(a) | GPU busy | first batch s | (b') pipeline, shards 2 in flight, rows/s | "
        "(c') = (b')/(a) | GPU busy | rel. error vs CPU | (centered) | all written |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in results["runs"]:
        for p in mode["pipeline"]:
            busy = statistics.median(r["stages"]["gpu_busy_fraction"] for r in p["runs"])
            first = statistics.median(r["stages"]["first_batch"] for r in p["runs"])
            c = p["correctness"]
            stream_busy = statistics.median(r["gpu_busy_fraction"] for r in p["stream_runs"])
            written = (c["nan_elements"] == 0 and c["uid_in_order"]
                       and all(r["check"]["nan_elements"] == 0 and r["check"]["uid_in_order"]
                               for r in p["runs"])
                       and all(x["nan_elements"] == 0 and x["uid_in_order"]
                               for r in p["stream_runs"] for x in r["checks"]))
            lines.append(f"| {mode['model']} ({mode['gflops']:.1f} GFLOP) | {mode['math']} | "
                         f"{p['layout']} | {p['slots']} | {p.get('concurrent', p['slots'])} | "
                         f"{mode['engine_rows_per_s']:.0f} | "
                         f"{p['rows_per_s']:.0f} | {p['ratio']:.3f} | {busy:.3f} | {first:.2f} | "
                         f"{p['stream_rows_per_s']:.0f} | {p['stream_ratio']:.3f} | "
                         f"{stream_busy:.3f} | "
                         f"{c['rel_error']:.2e} | {c['rel_error_centered']:.2e} | "
                         f"{'yes' if written else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"),
                        help="folder for the JSON and log (default $OUT or bench/results)")
    parser.add_argument("--work", default="/tmp/gpu_pipeline_bench",
                        help="local-disk folder for the Parquet data and parts")
    parser.add_argument("--rows", type=int, default=24576, help="rows in the timed shard")
    parser.add_argument("--row-group", type=int, default=400, help="rows per Parquet row group")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--slots", default="1,2,3", help="K values to run")
    parser.add_argument("--concurrent", default="2",
                        help="batches executing at once (SlotPool's `concurrent`) to run with "
                             "each K, comma-separated; values above K are skipped")
    parser.add_argument("--readers", type=int, default=12, help="reading threads per shard")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of the shards-in-flight measurement (median)")
    parser.add_argument("--single-repeats", type=int, default=1,
                        help="timed runs of the one-shard measurement (median)")
    parser.add_argument("--passes", type=int, default=3,
                        help="times the 4 shards go through the actor in the shards-in-flight run")
    parser.add_argument("--engine-iters", type=int, default=24)
    parser.add_argument("--engine-sustained-iters", type=int, default=0,
                        help="also time the engine alone over this many batches (as long as a "
                             "pipeline run), to see the GPU's sustained rate; 0: skip")
    parser.add_argument("--check-rows", type=int, default=300,
                        help="rows of the correctness shard (one partial last batch)")
    parser.add_argument("--runs", default="resnet50:tf32,resnet50:fp32",
                        help="MODEL:MATH pairs; MODEL in resnet50, resnet101, resnet152; "
                             "MATH tf32 (ONNX Runtime's default) or fp32 (strict)")
    parser.add_argument("--layout", default=",".join(LAYOUTS),
                        help="image column layouts to write and measure, comma-separated: "
                             "tensor (fixed-shape tensor), binary (each row's raw bytes)")
    parser.add_argument("--trace", action="store_true",
                        help="record every batch of the first shards-in-flight run (host submit "
                             "and collect times, GPU execution span) into the JSON")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    args = parser.parse_args(argv)
    args.slots = [int(k) for k in args.slots.split(",")]
    args.concurrent = [int(c) for c in args.concurrent.split(",")]
    args.layout = list(dict.fromkeys(x.strip() for x in args.layout.split(",") if x.strip()))
    unknown = [x for x in args.layout if x not in LAYOUTS]
    if unknown or not args.layout:
        parser.error(f"--layout takes {', '.join(LAYOUTS)} (comma-separated), got {unknown}")
    log = RunLog(Path(args.out), "gpu_pipeline", args.tag)

    ort = import_onnxruntime()
    if hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* wheels, if that is where they are
            ort.preload_dlls()
        except Exception as exc:  # the libraries may be on the loader's path instead
            print(f"onnxruntime.preload_dlls(): {exc}", flush=True)
    if cuda.device_count() == 0 or "CUDAExecutionProvider" not in ort.get_available_providers():
        log(f"needs a CUDA GPU and onnxruntime-gpu: {cuda.device_count()} device(s), "
            f"providers {ort.get_available_providers()}")
        return 2
    cuda.set_device(0)
    results: dict[str, Any] = {
        "command": " ".join([sys.executable, "-m", "bench.gpu_pipeline", *(argv or sys.argv[1:])]),
        "device": {"name": cuda.device_name(0), "cc": ".".join(map(str, cuda.compute_capability(0))),
                   "driver": cuda.driver_version()},
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "onnxruntime": ort.__version__, "batch": args.batch, "rows": args.rows,
        "row_group": args.row_group, "readers": args.readers, "layouts": args.layout,
    }
    log(f"device {results['device']}, host {results['host']}, onnxruntime {ort.__version__}")

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    paths = {name: {layout: work / f"{name}-{layout}.parquet" for layout in args.layout}
             for name in ("main", "warm", "check")}
    # Every layout's file holds the same images (one seed per file, each written once).
    written = {
        "main": write_images(paths["main"], args.rows, args.row_group, seed=10),
        "warm": write_images(paths["warm"], 4 * args.batch, args.row_group, seed=11),
        "check": write_images(paths["check"], args.check_rows, 100, seed=12),
    }
    datasets = {layout: {name: written[name][layout] for name in written}
                for layout in args.layout}
    # The main file again, cut into 4 shards of whole row groups, for the shards-in-flight runs.
    layout_parts: dict[str, list[Shard]] = {}
    for layout, data in datasets.items():
        groups = data["main"].row_groups[1]
        cuts = [round(i * groups / 4) for i in range(5)]
        footer = pq.read_metadata(paths["main"][layout])
        layout_parts[layout] = [
            replace(data["main"], row_groups=(a, b),
                    rows=sum(footer.row_group(g).num_rows for g in range(a, b)))
            for a, b in itertools.pairwise(cuts)]
    for layout in args.layout:
        size = sum(files[layout].stat().st_size for files in paths.values())
        log(f"data, {layout} layout: {size / 1e9:.2f} GB of Parquet")
    log(f"data written in {time.perf_counter() - t0:.1f} s")

    results["read_only"] = {}
    for layout, data in datasets.items():
        reads = [read_only(data["main"], n) for n in sorted({1, 4, 8, args.readers})]
        results["read_only"][layout] = reads
        for r in reads:
            log(f"read only, {layout} layout, {r['readers']} thread(s): "
                f"{r['rows_per_s']:.0f} rows/s")

    check_uid, check_images = read_images(paths["check"][args.layout[0]])

    results["runs"] = []
    references: dict[str, np.ndarray] = {}
    for run in args.runs.split(","):
        model_name, math_mode = run.split(":")
        model = resnet(MODELS[model_name])
        if model_name not in references:
            t0 = time.perf_counter()
            with OnnxRuntimeBackend(model, BackendConfig(device="cpu",
                                                         threads=os.cpu_count() or 1)) as cpu:
                references[model_name] = np.concatenate([
                    cpu.infer({"image": check_images[i:i + 32]})["logits"]
                    for i in range(0, len(check_images), 32)]).astype(np.float64)
            log(f"{model_name}: {len(model) / 1e6:.0f} MB; CPU reference for {len(check_uid)} "
                f"rows in {time.perf_counter() - t0:.1f} s")
        results["runs"].append(run_mode(model_name, math_mode, model, datasets, layout_parts,
                                        references[model_name], check_uid, args, work, log))
        log.path(".json").write_text(json.dumps(results, indent=1))
    text = table(results)
    log.path(".md").write_text(text + "\n")
    log("\n" + text)
    shutil.rmtree(work, ignore_errors=True)
    log.close()
    ok = all(p["correctness"]["rel_error"] <= 1e-3 and p["correctness"]["nan_elements"] == 0
             for mode in results["runs"] for p in mode["pipeline"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
