"""The GPU job on the input layouts users store: engine alone, host ceiling, the job, Ray Data.

Run on a GPU machine with onnxruntime-gpu, ray, simplejpeg and nvImageCodec (see the README's
benchmark section for the command and shared/device/README.md for staging them):

    python -m bench.gpu_inputs --out bench/results
    python -m bench.gpu_inputs --cpu --out /tmp/inputs      # tiny sizes on the CPU: a smoke run

One model, a ResNet-50 (random weights, bench.gpu_pipeline.resnet) behind a uint8 NHWC
[N,224,224,3] input that it casts, transposes and normalizes in its own graph (the float32
binary layout feeds the same network's float32 NCHW input instead), batch 256. Layouts, each
a Parquet file of `--file-rows` rows written once and hard-linked as many times as the job
needs (reads come from the page cache):

- `jpeg224`: a binary column of JPEGs at the model's size (224x224, about 20 kB);
- `jpeg_photo`: JPEG photos larger than that (500x375, about 80 kB), resized to 224 and cropped;
- `uint8_tensor`: the decoded pixels as a uint8 fixed-shape tensor column (224,224,3), written
  with pyarrow's defaults (dictionary encoding, snappy), row groups of `--row-group`;
- `float32_binary`: normalized float32 NCHW pixels as a fixed_size_binary column.

For each layout:
- (a) the engine alone: ONNX Runtime's CUDA provider on two slots, inputs already on the GPU,
  batches back to back (medians of `--repeats`);
- (b) the host ceiling, with all CPUs and no model: JPEGs decoded by the actor's CPU
  decoder (`workers.images`, threads), by the GPU decoder alone (nvImageCodec and the fit
  kernel into a device buffer), and for photos by decode auto's path alone (libjpeg-turbo on
  the CPU threads into pinned memory, then the fit kernel); tensor columns read and converted
  by the actor's reader (`RowGroupReader`, one thread per CPU), and, to show Arrow's own limit,
  read whole row group at a time (the reader before `workers.reader.read_group`) and on one thread;
- (c) the whole job at default flags as a new process (`python -m jobs.relabel` for JPEGs,
  `python -m jobs.run` for tensors), on enough rows that its working phase takes about
  `--seconds`: rows/s from the first shard's start to the last commit (the manifest's shard
  times), and apart from that its fixed costs: process start to first shard, last commit to
  exit; the actors' GPU busy fraction, stage seconds and the summary's "limited by" line;
- (d) for `--ray-data` layouts: Ray Data's recipe (read_parquet -> map_batches(decode with
  Pillow, CPU tasks) -> map_batches(predict, num_gpus=1) -> write_parquet) and the job, both
  as whole processes on the same `--ray-data-rows` rows.

`--contention` also times the GPU decode beside the engine running back to back on the same GPU,
with the decoder's stream at high priority (the job's) and at the default, and the engine's rows/s
meanwhile: how the two share the GPU. `--variant FLAGS` runs each job again with FLAGS (repeat
it for more variants; leading `NAME=VALUE` words set the job's environment, e.g.
`--variant "TRT_BATCH_RUNNER_HELPER_NICE=0 --readers 8"`).

Targets (issue 12): (c) >= 0.85 x min((a), (b)) per layout; job >= 3x (d) for JPEG. A table is
printed last; a log, JSON and the table go to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

from bench.measure import NodeCpu, TreeMonitor
from bench.runlog import RunLog

REPO = str(Path(__file__).resolve().parent.parent)
LAYOUTS = ("jpeg224", "jpeg_photo", "uint8_tensor", "float32_binary")
JPEGS = ("jpeg224", "jpeg_photo")
BLOCKS = (3, 4, 6, 3)  # ResNet-50
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# The models ---------------------------------------------------------------------------------------
def float_model(size: int, blocks: tuple[int, ...]) -> bytes:
    """The ResNet with a float32 NCHW input `image` [N,3,size,size] (bench.gpu_pipeline.resnet)."""
    from bench.gpu_pipeline import resnet

    return resnet(blocks, image=(3, size, size))


def uint8_model(size: int, blocks: tuple[int, ...]) -> bytes:
    """The same network behind a uint8 NHWC input `image` [N,size,size,3]: Cast, Transpose and
    x / 255 in the graph, before the network's own (x - mean) / std."""
    model = onnx.load_from_string(float_model(size, blocks))
    graph = model.graph
    for node in graph.node:  # the network now reads the converted tensor
        node.input[:] = ["scaled" if name == "image" else name for name in node.input]
    prefix = [
        helper.make_node("Cast", ["image"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["as_float"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "inv255"], ["scaled"]),
    ]
    graph.initializer.append(numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255"))
    nodes = prefix + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                     ["N", size, size, 3]))
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


# The data ---------------------------------------------------------------------------------------
def photo(width: int, height: int, seed: int) -> np.ndarray:
    """Photo-like pixels: smooth colour fields plus texture (what a JPEG coder meets)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))
    noise = rng.integers(-20, 21, (height, width, 3))
    return np.clip(smooth.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _jpegs(width: int, height: int, seeds: range) -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for seed in seeds:
        buffer = io.BytesIO()
        Image.fromarray(photo(width, height, seed)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_file(layout: str, path: Path, rows: int, row_group: int, size: int,
               photo_size: tuple[int, int], first: int) -> dict[str, Any]:
    """One file of `layout`: uids `first..first+rows` and the image column (`jpeg` or `img`)."""
    from workers.convert import tensor_to_binary_column
    from workers.images import ImageDecoder

    uid = pa.array(np.arange(first, first + rows, dtype=np.int64))
    seeds = range(first, first + rows)
    if layout in JPEGS:
        width, height = (size, size) if layout == "jpeg224" else photo_size
        images = _jpegs(width, height, seeds)
        pq.write_table(pa.table({"uid": uid, "jpeg": pa.array(images, pa.binary())}), path,
                       row_group_size=row_group, use_dictionary=["uid"])
        row_bytes = float(np.mean([len(x) for x in images]))
    else:
        pixels, _ = ImageDecoder("RGB", (size, size), size).decode(_jpegs(size, size, seeds))
        if layout == "uint8_tensor":
            column = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels)
            # pyarrow's defaults: dictionary encoding, snappy, as a user's write_table gives.
            pq.write_table(pa.table({"uid": uid, "img": column}), path, row_group_size=row_group)
        else:
            normalized = ((pixels.astype(np.float32) / 255 - np.asarray(MEAN, np.float32))
                          / np.asarray(STD, np.float32)).transpose(0, 3, 1, 2)
            pq.write_table(pa.table({"uid": uid, "img": tensor_to_binary_column(normalized)}),
                           path, row_group_size=row_group, use_dictionary=["uid"])
        row_bytes = float(pixels[0].nbytes * (4 if layout == "float32_binary" else 1))
    return {"rows": rows, "bytes": path.stat().st_size, "row_bytes": row_bytes}


def write_layout(layout: str, folder: Path, files: int, rows: int, row_group: int, size: int,
                 photo_size: tuple[int, int]) -> dict[str, Any]:
    """`files` files of `rows` rows each, written at once by one process each."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{layout}-{i:03d}.parquet" for i in range(files)]
    with ProcessPoolExecutor(min(files, os.cpu_count() or 1)) as pool:
        done = list(pool.map(write_file, [layout] * files, paths, [rows] * files,
                             [row_group] * files, [size] * files, [photo_size] * files,
                             [i * rows for i in range(files)]))
    return {"layout": layout, "files": files, "rows": files * rows, "row_group": row_group,
            "file_bytes": sum(d["bytes"] for d in done),
            "row_bytes": float(np.mean([d["row_bytes"] for d in done])),
            "seconds": time.perf_counter() - t0, "paths": [str(p) for p in paths]}


def linked_input(sources: list[Path], folder: Path, files: int) -> Path:
    """A directory of `files` hard links to `sources`, in turn (read from the page cache)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i in range(files):
        target = folder / f"part-{i:05d}.parquet"
        try:
            os.link(sources[i % len(sources)], target)
        except OSError:
            shutil.copyfile(sources[i % len(sources)], target)
    return folder


# (a) the engine alone ---------------------------------------------------------------------------
def _engine_loop(model: bytes, batch: int, cpu: bool) -> tuple[Any, Callable[[], None],
                                                                   Callable[[], None],
                                                                   Callable[[], None]]:
    """The model's input meta, `run()` (one batch of inputs already in place: two CUDA slots
    alternating), `sync()` and `close()`."""
    from workers.backends.base import BackendConfig
    from workers.backends.onnxruntime import OnnxRuntimeBackend, OrtCudaSlot

    rng = np.random.default_rng(1)
    backend = OnnxRuntimeBackend(model, BackendConfig(device="cpu" if cpu else "cuda"))
    backend.load()
    meta = backend.inputs[0]
    shape = (batch, *(int(d) for d in meta.row_shape if d is not None))
    x = (rng.integers(0, 256, shape).astype(meta.dtype) if meta.dtype.kind == "u"
         else rng.standard_normal(shape).astype(meta.dtype))
    if cpu:
        return (meta, lambda: backend.infer({meta.name: x}) and None, lambda: None,
                backend.close)
    slots = [backend.open_slot(batch) for _ in range(2)]
    for slot in slots:
        assert isinstance(slot, OrtCudaSlot)
        slot.host_inputs[meta.name][:] = x
        slot.submit(batch)
        slot.wait()
    turn = [0]

    def run() -> None:
        slot = slots[turn[0] % 2]
        turn[0] += 1
        slot.execute(batch)  # type: ignore[attr-defined]

    def sync() -> None:
        for slot in slots:
            slot.stream.synchronize()

    def close() -> None:
        for slot in slots:
            slot.close()
        backend.close()
    return meta, run, sync, close


def engine_alone(model: bytes, batch: int, seconds: float, repeats: int, cpu: bool,
                 log: RunLog) -> dict[str, Any]:
    """Rows/s of back-to-back batches on inputs already in place (two CUDA slots alternating)."""
    meta, run, sync, close = _engine_loop(model, batch, cpu)
    try:
        for _ in range(4):  # warm-up: algorithm search, arena growth
            run()
        sync()
        rates = []
        for _ in range(repeats):
            t0, count = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                for _ in range(4):
                    run()
                count += 4
                sync()
            rates.append(count * batch / (time.perf_counter() - t0))
        result = {"rows_per_s": statistics.median(rates), "runs": rates}
        log(f"(a) engine alone, {meta.describe()}: {result['rows_per_s']:.0f} rows/s "
            f"(runs {[round(r) for r in rates]})")
        return result
    finally:
        close()


# (b) the host ceiling ---------------------------------------------------------------------------
def image_spec(size: int, decode: str, model_meta: Any) -> Any:
    from workers.preprocess import ImagePrep

    schema = pa.schema([("uid", pa.int64()), ("jpeg", pa.binary())])
    return ImagePrep(column="jpeg", decode=decode).resolve({model_meta.name: model_meta},
                                                           [model_meta.name], schema, "bench")


def _batches(table: pa.Table, batch: int) -> Iterator[pa.Table]:
    for lo in range(0, table.num_rows, batch):
        yield table.slice(lo, batch)


def jpeg_rows(paths: list[Path], rows: int) -> pa.Table:
    """The `jpeg` column of the first files, at least `rows` rows of it."""
    tables, have = [], 0
    for path in paths:
        tables.append(pq.read_table(path, columns=["jpeg"]))
        have += tables[-1].num_rows
        if have >= rows:
            break
    return pa.concat_tables(tables)


def cpu_decode_ceiling(paths: list[Path], meta: Any, size: int, batch: int, threads: int,
                       repeats: int, log: RunLog, label: str) -> dict[str, Any]:
    """Rows/s of the actor's CPU image decoding alone (its Preprocessor, `threads` threads)."""
    from workers.preprocess import Preprocessor

    table = jpeg_rows(paths, 4096)
    spec = image_spec(size, "cpu", meta)
    rates = []
    with Preprocessor([spec], {meta.name: meta}, threads) as prep:
        prep(table.slice(0, batch))  # warm-up (the processes, if any, start)
        for _ in range(repeats):
            t0 = time.perf_counter()
            rows = sum(prep(part).feeds[meta.name].shape[0] for part in _batches(table, batch))
            rates.append(rows / (time.perf_counter() - t0))
    result = {"rows_per_s": statistics.median(rates), "runs": rates, "threads": threads}
    log(f"(b) {label}: CPU decode, {threads} threads: {result['rows_per_s']:.0f} rows/s "
        f"(runs {[round(r) for r in rates]})")
    return result


class BenchSlot:
    """A stand-in device slot for the GPU decoder alone: a stream and one device input buffer."""

    def __init__(self, name: str, max_rows: int, row_bytes: int) -> None:
        from workers import cuda

        self.name, self.max_rows = name, max_rows
        self.stream = cuda.Stream()
        self.buffer = cuda.DeviceBuffer(max_rows * row_bytes)
        self.filled_inputs: frozenset[str] = frozenset()

    def device_input(self, name: str) -> int:
        return int(self.buffer.ptr)

    def close(self) -> None:
        self.buffer.close()
        self.stream.close()


def gpu_decode_ceiling(paths: list[Path], meta: Any, size: int, batch: int, threads: int,
                       repeats: int, log: RunLog, label: str, beside: bytes | None = None,
                       high_priority: bool = True, decode: str = "gpu") -> dict[str, Any]:
    """Rows/s of nvImageCodec and the fit kernel alone, into a device buffer (no model).

    `decode`: "gpu", nvImageCodec; "auto", what the job's default takes on these `threads`
    (libjpeg-turbo on the CPU threads into pinned memory, then the fit kernel: the host
    ceiling of decode auto for JPEGs larger than the model's size).

    `beside`: a model that runs back to back on the same GPU meanwhile (as the job's engine
    does), on default-priority streams; the decoder's stream has high priority (the job's) or,
    with `high_priority` off, the default. Its rows/s meanwhile are reported too.
    """
    from workers import cuda
    from workers.gpuimages import open_gpu_images
    from workers.images import ImageDecoder

    table = jpeg_rows(paths, 4096)
    spec = image_spec(size, decode, meta)
    images, how = open_gpu_images([spec], {meta.name: meta}, True, 0, threads)
    assert images is not None, how
    what_decodes = ("nvImageCodec" if images.decoder == "nvimgcodec"
                    else f"libjpeg-turbo on {threads} threads") + " + fit kernel"
    if not high_priority:
        images._stream.close()
        images._stream = cuda.Stream()
    # The actor's decoder has the preprocessing threads: decode auto's libjpeg-turbo rows run
    # on them (without, this ceiling ran them on one thread: 567 rows/s for photos).
    pool = ThreadPoolExecutor(threads, thread_name_prefix="prep") if threads > 1 else None
    cpu = ImageDecoder(spec.mode, spec.size, spec.resize, spec.draft, pool, threads,
                       max_pixels=spec.max_pixels)
    row_bytes = int(np.prod([d for d in meta.row_shape if d is not None])) * meta.dtype.itemsize
    slots = [BenchSlot(meta.name, batch, row_bytes) for _ in range(2)]
    engine_rows, stop, engine = [0], threading.Event(), None
    if beside is not None:
        _, run, sync, close = _engine_loop(beside, batch, False)

        def loop() -> None:
            try:
                while not stop.is_set():
                    for _ in range(2):
                        run()
                    sync()
                    engine_rows[0] += 2 * batch
            finally:
                close()
        for _ in range(4):
            run()
        sync()
        engine = threading.Thread(target=loop, daemon=True)
        engine.start()
    try:
        values = table.column("jpeg").to_pylist()
        rates, engine_rates = [], []
        for r in range(repeats + 1):
            t0, e0 = time.perf_counter(), engine_rows[0]
            for i, lo in enumerate(range(0, len(values), batch)):
                slot = slots[i % 2]
                slot.stream.synchronize()  # its last batch is done: it may be refilled
                part, bad = images.decode(meta.name, values[lo:lo + batch], cpu)
                assert not bad, bad
                images.fill(slot, meta.name, [part], len(part))  # type: ignore[arg-type]
                slot.filled_inputs = frozenset()
            for slot in slots:
                slot.stream.synchronize()
            if r:  # the first pass warms nvImageCodec and the kernel up
                elapsed = time.perf_counter() - t0
                rates.append(len(values) / elapsed)
                engine_rates.append((engine_rows[0] - e0) / elapsed)
        result: dict[str, Any] = {"rows_per_s": statistics.median(rates), "runs": rates,
                                  "gpu_rows": images.gpu_rows, "cpu_rows": images.cpu_rows}
        what = "alone"
        if beside is not None:
            result["engine_rows_per_s"] = statistics.median(engine_rates)
            what = (f"beside the engine ({result['engine_rows_per_s']:.0f} rows/s meanwhile), "
                    f"decode stream priority {'high' if high_priority else 'default'}")
        log(f"(b) {label}: {what_decodes} {what}: "
            f"{result['rows_per_s']:.0f} rows/s (runs {[round(x) for x in rates]}; rows decoded "
            f"on the GPU {images.gpu_rows}, on the CPU {images.cpu_rows})")
        return result
    finally:
        stop.set()
        if engine is not None:
            engine.join()
        for slot in slots:
            slot.close()
        images.close()
        if pool is not None:
            pool.shutdown()


def read_ceiling(paths: list[Path], meta: Any, threads: int, repeats: int, log: RunLog,
                 label: str, whole_groups: bool = False) -> dict[str, Any]:
    """Rows/s of reading and converting the files' row groups alone on `threads` threads.

    Every file's reader shares one pool of `threads` threads (as an actor's shards do), so all
    threads have row groups to read. `whole_groups`: each row group read whole
    (`read_row_group`), as the reader did before `workers.reader.read_group`.
    """
    from workers.convert import column_to_tensor
    from workers.rowgroups import ReadPool, RowGroupReader

    shards = [file_shard(p) for p in paths]

    def convert(table: pa.Table) -> tuple[dict[str, np.ndarray], pa.Table]:
        return {meta.name: column_to_tensor("img", table.column("img"), meta)}, table.select(["uid"])

    @contextlib.contextmanager
    def whole() -> Iterator[None]:
        import workers.rowgroups as rowgroups

        original = rowgroups.read_group
        rowgroups.read_group = (lambda parquet, index, columns:  # type: ignore[assignment]
                                parquet.read_row_group(index, columns=columns, use_threads=False))
        try:
            yield
        finally:
            rowgroups.read_group = original

    rates = []
    with whole() if whole_groups else contextlib.nullcontext():
        for _ in range(repeats):
            pool = ReadPool(threads)
            t0 = time.perf_counter()
            rows = 0
            readers = [RowGroupReader(shard, ["img", "uid"], convert, threads=threads,
                                      pool=pool, priority=i) for i, shard in enumerate(shards)]
            try:
                for reader in readers:
                    for _, kept, _, _ in reader:
                        rows += kept.num_rows
            finally:
                for reader in readers:
                    reader.close()
                pool.close()
            rates.append(rows / (time.perf_counter() - t0))
    result = {"rows_per_s": statistics.median(rates), "runs": rates, "threads": threads,
              "files": len(paths), "whole_row_groups": whole_groups}
    log(f"(b) {label}: read + convert alone, {threads} thread(s), {len(paths)} file(s)"
        f"{', whole row groups' if whole_groups else ''}: {result['rows_per_s']:.0f} rows/s "
        f"(runs {[round(r) for r in rates]})")
    return result


def file_shard(path: Path) -> Any:
    from workers.storage import file_version, filesystem
    from workers.types import Shard

    fs, p = filesystem(str(path))
    info = fs.info(p)
    meta = pq.read_metadata(path)
    return Shard(url=fs.unstrip_protocol(p), size=int(info["size"]), version=file_version(info),
                 row_groups=(0, meta.num_row_groups), rows=meta.num_rows)


# (c) the whole job ------------------------------------------------------------------------------
def job_command(layout: str, model: Path, data: Path, out: Path, cpu: bool,
                extra: list[str]) -> list[str]:
    if layout in JPEGS:
        command = [sys.executable, "-m", "jobs.relabel", "--image-column", "image=jpeg"]
    else:
        command = [sys.executable, "-m", "jobs.run", "--column", "image=img"]
    command += ["--model", str(model), "--input", str(data), "--output", str(out),
                "--keep", "uid", *extra]
    if cpu:
        command += ["--backend", "onnxruntime"]
    return command


def run_job_process(command: list[str], out: Path, log_path: Path, log: RunLog,
                    label: str, extra_env: dict[str, str] | None = None,
                    profile: tuple[float, float] | None = None) -> dict[str, Any]:
    """The job as a new process: its wall time, rows/s between first shard and last commit, fixed
    costs. `profile` (at, seconds): py-spy records every thread of its actors for `seconds`,
    `at` seconds after the start (`bench.pyspy_top`), into the log and the result."""
    from bench.pyspy_top import RecordLater

    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": os.pathsep.join(
        [REPO, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
    log(f"(c) {label}: {' '.join(command[1:])}")
    t_start = time.time()
    monitor = TreeMonitor(interval=1.0, tree_every=1).start()
    at, seconds = profile or (None, 0.0)
    spy = RecordLater(at, seconds, out.parent / f"pyspy-{label.split()[0]}")
    with open(log_path, "w") as stderr, NodeCpu() as node:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=stderr, stderr=stderr,
                              check=False).returncode
    t_end = time.time()
    usage = monitor.stop()
    threads = spy.result()
    if threads:
        log(f"(c) {label}: threads of the actors, from {at:.0f} s for {seconds:.0f} s (py-spy, "
            f"idle included):\n{threads}")
    text = log_path.read_text()
    manifest = json.loads((out / "_manifest.json").read_text()) if (out / "_manifest.json").exists() \
        else {}
    shards = [s for s in manifest.get("shards", []) if s.get("status") == "committed"]
    result: dict[str, Any] = {"exit_code": code, "wall_seconds": t_end - t_start,
                              "rows": manifest.get("rows", 0), "command": command[1:]}
    if code != 0 or not shards:
        result["error"] = text[-3000:]
        log(f"(c) {label}: exit code {code}; log tail:\n{text[-1500:]}")
        return result
    first = min(float(s["started_at"]) for s in shards)
    last = max(float(s["committed_at"]) for s in shards)
    rows = sum(int(s["rows"]) for s in shards)
    workers = manifest.get("workers", [])
    stages: dict[str, float] = {}
    for worker in workers:
        for stage, value in (worker.get("seconds") or {}).items():
            stages[stage] = round(stages.get(stage, 0.0) + float(value), 3)
    result.update({
        "rows": rows, "phase_seconds": last - first, "rows_per_s": rows / (last - first),
        "whole_process_rows_per_s": rows / (t_end - t_start),
        "start_seconds": first - t_start, "finish_seconds": t_end - last,
        "fixed_seconds": (first - t_start) + (t_end - last),
        "gpu_busy_fraction": [w.get("gpu_busy_fraction") for w in workers],
        "image_decode": [w.get("image_decode") for w in workers],
        "image_rows": [w.get("image_rows") for w in workers],
        "image_pinned": [w.get("image_pinned") for w in workers],
        "resources": {k: workers[0].get(k) for k in ("readers", "preprocess_threads")}
        if workers else {},
        "stages": stages, "limited_by": manifest.get("limited_by"),
        # Host-bound (near 1.0) or waiting (well below, with the GPU idle too)?
        "node_cpu_busy": node.busy(first, last), "cpus": os.cpu_count(),
        "cpu_seconds_by_process": usage.cpu_by_title,
        # Where the fixed costs went, by the driver's phases, and each worker's warm-up batch.
        "timings": manifest.get("timings"),
        "warmup_seconds": [w.get("warmup_seconds") for w in workers],
        "threads": threads,
        "summary": [line for line in text.splitlines()
                    if line.startswith(("job:", "workers:", "done:", "limited by:"))],
    })
    log(f"(c) {label}: {rows:,} rows, {result['rows_per_s']:.0f} rows/s over "
        f"{result['phase_seconds']:.1f} s (first shard to last commit); fixed costs "
        f"{result['start_seconds']:.1f} s before, {result['finish_seconds']:.1f} s after "
        f"(phases {result['timings']}, warm-up {result['warmup_seconds']}); GPU "
        f"busy {result['gpu_busy_fraction']}; image decode {result['image_decode']}; pinned "
        f"arenas {result['image_pinned']}; stages "
        f"{json.dumps(stages)}; {result['limited_by'] or 'no limited-by line'}; node CPUs "
        f"busy {result['node_cpu_busy']} of {result['cpus']} during the shards; CPU seconds "
        f"by process {json.dumps(result['cpu_seconds_by_process'])}")
    for line in result["summary"]:
        log(f"    {line}")
    return result


# (d) Ray Data's recipe --------------------------------------------------------------------------
def ray_data_main(model: str, data: str, out: str, size: int, batch: int, cpu: bool) -> None:
    """Runs in its own process: read_parquet -> map_batches(decode) -> map_batches(predict)."""
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False

    def decode(batch_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import io

        from PIL import Image

        out_ = np.empty((len(batch_["jpeg"]), size, size, 3), np.uint8)
        for i, data_ in enumerate(batch_["jpeg"]):
            image = Image.open(io.BytesIO(data_)).convert("RGB")
            w, h = image.size
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            image = image.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = round((nw - size) / 2), round((nh - size) / 2)
            out_[i] = np.asarray(image.crop((left, top, left + size, top + size)))
        return {"uid": batch_["uid"], "image": out_}

    class Predict:
        def __init__(self) -> None:
            import onnxruntime as ort

            providers = (["CPUExecutionProvider"] if cpu
                         else ["CUDAExecutionProvider", "CPUExecutionProvider"])
            self.session = ort.InferenceSession(model, providers=providers)

        def __call__(self, batch_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            logits = self.session.run(None, {"image": batch_["image"]})[0]
            top = np.argsort(-logits, axis=1)[:, :5]
            return {"uid": batch_["uid"], "label": top[:, 0], "top5": top}

    ds = ray.data.read_parquet(data, columns=["uid", "jpeg"])
    ds = ds.map_batches(decode, batch_format="numpy", batch_size=batch)
    ds = ds.map_batches(Predict, batch_format="numpy", batch_size=batch, concurrency=1,
                        num_gpus=0 if cpu else 1)
    ds.write_parquet(out)
    ray.shutdown()


def run_ray_data(model: Path, data: Path, out: Path, size: int, batch: int, cpu: bool,
                 log_path: Path, log: RunLog) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [REPO, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
    command = [sys.executable, "-m", "bench.gpu_inputs", "--ray-data-run", str(model), str(data),
               str(out), str(size), str(batch), "1" if cpu else "0"]
    t0 = time.time()
    with open(log_path, "w") as stderr:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=stderr, stderr=stderr,
                              check=False).returncode
    seconds = time.time() - t0
    rows = 0
    if code == 0:
        for part in out.glob("*.parquet"):
            rows += pq.read_metadata(part).num_rows
    result = {"exit_code": code, "rows": rows, "wall_seconds": seconds,
              "whole_process_rows_per_s": rows / seconds if rows else 0.0}
    if code != 0:
        result["error"] = log_path.read_text()[-3000:]
    log(f"(d) Ray Data: exit {code}, {rows:,} rows in {seconds:.1f} s = "
        f"{result['whole_process_rows_per_s']:.0f} rows/s (whole process)")
    return result


# The run ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_inputs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="", help="suffix of the output files' names")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--seconds", type=float, default=60.0,
                   help="target length of each job's working phase")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds this whole run may take (0: no limit); the jobs' phases "
                   "shrink to fit, and steps past it are skipped")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--files", type=int, default=16, help="distinct files per layout (written "
                   "at once, one process each); a job's input links to them in turn")
    p.add_argument("--file-rows", type=int, default=1024)
    p.add_argument("--row-group", type=int, default=256)
    p.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                   help="also run each layout's job with these job flags on the same rows "
                   "(e.g. '--shards-in-flight 2'; leading NAME=VALUE words: its environment), "
                   "in the same run: an A/B against the default; repeat for more")
    p.add_argument("--contention", action="store_true",
                   help="also time the GPU decode beside the engine, at each stream priority")
    p.add_argument("--ray-data", default="jpeg224", help="layouts with a Ray Data run (d)")
    p.add_argument("--ray-data-rows", type=int, default=32768)
    p.add_argument("--profile-at", type=float, default=None, metavar="SECONDS",
                   help="py-spy records the actors' threads of each layout's default job (c), "
                        "this many seconds after its first shard is expected to start")
    p.add_argument("--profile-seconds", type=float, default=8.0)
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (a smoke run)")
    p.add_argument("--ray-data-run", nargs=6, help=argparse.SUPPRESS)
    return p


def table(results: dict[str, Any]) -> str:
    variants = results.get("variants") or []
    lines = [f"{results['device']}, {results['host']['cpus']} CPUs; batch {results['batch']}; "
             f"ResNet-50, uint8 NHWC input (float32 NCHW for float32_binary)",
             "| layout | (a) engine | (b) host ceiling | (c) job | (c)/min(a,b) | GPU busy | "
             "fixed costs | (d) Ray Data | job/(d) | (c') variants |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layout in results["layouts"]:
        r = results["by_layout"].get(layout, {})
        a = (r.get("engine") or {}).get("rows_per_s")
        ceilings = {k: v.get("rows_per_s") for k, v in (r.get("ceiling") or {}).items()
                    if isinstance(v, dict) and v.get("rows_per_s") and k != "whole_row_groups"
                    and k != "one_thread"}
        b = max(ceilings.values()) if ceilings else None
        job = r.get("job") or {}
        c = job.get("rows_per_s")
        ratio = c / min(a, b) if c and a and b else None
        d = (r.get("ray_data") or {}).get("whole_process_rows_per_s")
        same = (r.get("job_same_rows") or {}).get("whole_process_rows_per_s")

        def fmt(v: float | None, spec: str = ",.0f") -> str:
            return format(v, spec) if v else "-"

        b_text = " / ".join(f"{fmt(v)} ({k})" for k, v in ceilings.items()) or "-"
        busy = job.get("gpu_busy_fraction") or []
        lines.append(
            f"| {layout} | {fmt(a)} | {b_text} | {fmt(c)} | {fmt(ratio, '.2f')} | "
            f"{', '.join(f'{x:.2f}' for x in busy if x is not None) or '-'} | "
            f"{fmt(job.get('start_seconds'), '.1f')} + {fmt(job.get('finish_seconds'), '.1f')} s"
            f" | {fmt(d)} | {fmt(same / d if same and d else None, '.2f')} | "
            f"{' / '.join(fmt(v.get('rows_per_s')) for v in r.get('job_variants', [])) or '-'} |")
    lines += [f"(c') variant {k + 1}: {v}" for k, v in enumerate(variants)]
    return "\n".join(lines)


def split_variant(text: str) -> tuple[dict[str, str], list[str]]:
    """A `--variant`'s leading NAME=VALUE words (the job's environment) and its job flags."""
    words = shlex.split(text)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ray_data_run:
        model, data, out, size, batch, cpu = args.ray_data_run
        ray_data_main(model, data, out, int(size), int(batch), cpu == "1")
        return 0
    began = time.perf_counter()
    log = RunLog(args.out, "gpu_inputs", args.tag)
    cpus = os.cpu_count() or 1
    size = 32 if args.cpu else 224
    photo_size = (72, 54) if args.cpu else (500, 375)
    blocks = (1, 1, 1, 1) if args.cpu else BLOCKS
    variants = [(text, *split_variant(text)) for text in args.variant]
    results: dict[str, Any] = {
        "command": "python -m bench.gpu_inputs " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        "host": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version()},
        "batch": args.batch, "layouts": [x for x in args.layouts.split(",") if x],
        "by_layout": {}, "device": "cpu", "variants": list(args.variant)}
    json_path = args.out / f"{log.stem}.json"

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1, default=str))

    def left() -> float:
        return args.budget - (time.perf_counter() - began) if args.budget else math.inf

    def step(label: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception:
            log(f"{label} failed:\n{traceback.format_exc()}")
            return {"error": traceback.format_exc()[-2000:]}
        finally:
            save()

    import onnxruntime
    import pyarrow

    versions = {"onnxruntime": onnxruntime.__version__, "pyarrow": pyarrow.__version__}
    for name in ("simplejpeg", "ray", "PIL"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    with contextlib.suppress(Exception):
        from nvidia import nvimgcodec
        versions["nvimgcodec"] = getattr(nvimgcodec, "__version__", "?")
    results["versions"] = versions
    if not args.cpu:
        from workers import cuda

        results["device"] = cuda.device_name(0)
    log(f"bench.gpu_inputs on {results['device']}, {cpus} CPUs; {versions}")
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_inputs_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = {"uint8": work / "resnet50_uint8_nhwc.onnx",
                  "float32": work / "resnet50_float32_nchw.onnx"}
        models["uint8"].write_bytes(uint8_model(size, blocks))
        models["float32"].write_bytes(float_model(size, blocks))
        from workers.tensors import describe_onnx

        metas = {k: describe_onnx(p.read_bytes()).inputs[0] for k, p in models.items()}
        # (a): one engine per input type, shared by the layouts that feed it.
        engines = {kind: step(f"(a) {kind}", engine_alone, models[kind].read_bytes(), args.batch,
                              0.5 if args.cpu else 2.0, args.repeats, args.cpu, log)
                   for kind in models}
        files: dict[str, list[Path]] = {}
        for layout in results["layouts"]:
            entry: dict[str, Any] = {}
            results["by_layout"][layout] = entry
            kind = "float32" if layout == "float32_binary" else "uint8"
            entry["engine"] = engines[kind]
            entry["data"] = step(f"data {layout}", write_layout, layout, work / f"data-{layout}",
                                 args.files, args.file_rows, args.row_group, size, photo_size)
            path = [Path(p) for p in entry["data"].get("paths", [])]
            files[layout] = path
            log(f"data {layout}: { {k: v for k, v in entry['data'].items() if k != 'paths'} }")
            ceiling: dict[str, Any] = {}
            entry["ceiling"] = ceiling
            meta = metas[kind]
            if layout in JPEGS:
                ceiling["cpu_decode"] = step(f"(b) {layout} cpu", cpu_decode_ceiling, path, meta,
                                             size, args.batch, cpus, args.repeats, log, layout)
                if not args.cpu:
                    ceiling["gpu_decode"] = step(f"(b) {layout} gpu", gpu_decode_ceiling, path,
                                                 meta, size, args.batch, cpus, args.repeats, log,
                                                 layout)
                    if layout == "jpeg_photo":  # decode auto's path for JPEGs above the size
                        ceiling["turbo_decode"] = step(
                            f"(b) {layout} turbo", gpu_decode_ceiling, path, meta, size,
                            args.batch, cpus, args.repeats, log, layout, decode="auto")
                    if args.contention:  # how decode and engine share the GPU, by priority
                        for high in (True, False):
                            ceiling[f"gpu_decode_beside_{'high' if high else 'default'}"] = step(
                                f"(b) {layout} gpu beside", gpu_decode_ceiling, path, meta, size,
                                args.batch, cpus, 1, log, layout, beside=models[kind].read_bytes(),
                                high_priority=high)
            else:
                ceiling["read"] = step(f"(b) {layout}", read_ceiling, path, meta, cpus,
                                       args.repeats, log, layout)
                ceiling["whole_row_groups"] = step(f"(b) {layout} whole", read_ceiling, path,
                                                   meta, cpus, 1, log, layout, whole_groups=True)
                ceiling["one_thread"] = step(f"(b) {layout} 1 thread", read_ceiling, path[:2],
                                             meta, 1, 1, log, layout)
        # (c): the jobs, each sized from its own limit to run about --seconds.
        pending = list(results["layouts"])
        ray_data = [x for x in args.ray_data.split(",") if x in results["layouts"]]
        reserve = 75.0 * len(ray_data) if not args.cpu else 0.0
        fixed = 12.0
        for index, layout in enumerate(pending):
            entry = results["by_layout"][layout]
            kind = "float32" if layout == "float32_binary" else "uint8"
            rates = [v.get("rows_per_s") for v in
                     [entry["engine"], *(entry["ceiling"].get(k) or {} for k in
                                         ("cpu_decode", "gpu_decode", "turbo_decode",
                                          "read"))]
                     if isinstance(v, dict) and v.get("rows_per_s")]
            # What the job can reach: the engine, or the best ceiling below it.
            engine = entry["engine"].get("rows_per_s") or 1000.0
            host = max([r for r in rates if r != engine], default=engine)
            expected = min(engine, host)
            # Fixed costs per job (Ray, actors, model load, warm-up): 12 s until one is measured.
            runs = 1 + len(variants)  # the default job, and the variants'
            share = (left() - reserve) / (len(pending) - index) / runs - fixed
            seconds = max(5.0, min(args.seconds, share))
            if share < 5.0:
                log(f"(c) {layout}: skipped, {left():.0f} s of the budget left")
                continue
            links = max(1, math.ceil(expected * seconds / args.file_rows))
            data = linked_input(files[layout], work / f"in-{layout}", links)
            out = work / f"out-{layout}"
            shutil.rmtree(out, ignore_errors=True)
            entry["job"] = step(f"(c) {layout}", run_job_process,
                                job_command(layout, models[kind], data, out, args.cpu, []), out,
                                work / f"job-{layout}.log", log, layout, None,
                                (fixed + args.profile_at, args.profile_seconds)
                                if args.profile_at is not None else None)
            shutil.rmtree(out, ignore_errors=True)
            entry["job_variants"] = []
            for k, (text, env, flags) in enumerate(variants):
                run = step(f"(c') {layout} {text}", run_job_process,
                           job_command(layout, models[kind], data, out, args.cpu, flags), out,
                           work / f"job-variant{k + 1}-{layout}.log", log, f"{layout} {text}",
                           env)
                run["flags"] = text
                entry["job_variants"].append(run)
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
            if entry["job"].get("fixed_seconds"):
                fixed = float(entry["job"]["fixed_seconds"]) + 1.0
        # (d): Ray Data's recipe and the job, whole processes, on the same rows.
        for layout in ray_data:
            if left() < 40:
                log(f"(d) {layout}: skipped, {left():.0f} s of the budget left")
                continue
            entry = results["by_layout"][layout]
            links = max(1, args.ray_data_rows // args.file_rows)
            data = linked_input(files[layout], work / f"in-rd-{layout}", links)
            out = work / f"out-rd-{layout}"
            shutil.rmtree(out, ignore_errors=True)
            entry["job_same_rows"] = step(f"(d) job {layout}", run_job_process,
                                          job_command(layout, models["uint8"], data, out,
                                                      args.cpu, []), out,
                                          work / f"job-rd-{layout}.log", log,
                                          f"{layout}, the Ray Data rows")
            shutil.rmtree(out, ignore_errors=True)
            entry["ray_data"] = step(f"(d) ray data {layout}", run_ray_data, models["uint8"],
                                     data, out, size, args.batch, args.cpu,
                                     work / f"raydata-{layout}.log", log)
            shutil.rmtree(out, ignore_errors=True)
        results["seconds"] = time.perf_counter() - began
        text = table(results)
        (args.out / f"{log.stem}.md").write_text(results["command"] + "\n\n" + text + "\n")
        save()
        log("\n" + text)
        # The jobs' own logs, for the per-stage detail.
        with open(args.out / f"{log.stem}_jobs.log", "w") as jobs:
            for path in sorted(work.glob("*.log")):
                jobs.write(f"===== {path.name}\n{path.read_text()[-20000:]}\n")
    finally:
        log.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
