"""Multi-GPU scaling of a whole job on one host: rows/s with 1, 2, 4, 8 actors, one per GPU.

Run from the repository root (Ray's workers import `bench` from there), on a GPU host with
onnxruntime-gpu and ray installed:

    python -m bench.gpu_scaling --out bench/results
    python -m bench.gpu_scaling --cpu --out /tmp/scaling    # tiny sizes, CPU actors: a smoke run

It starts a local Ray with every GPU of the host (or uses the Ray this process already
initialized), writes random float32 3x224x224 images to Parquet on local disk, and saves the
heavier benchmark model (`--model`, default the ResNet-152-style CNN of `bench.gpu_pipeline`,
23 GFLOP per image). One file is written; the others are hard links to it, so a large input
costs one file's writing, and reads come from the page cache (as in `bench.gpu_pipeline`). For
every GPU count N of `--gpus` that `ray.cluster_resources()` offers (plus the host's own count):

- (job) `jobs.driver.run_job` from the Parquet files to Parquet parts with N actors (one GPU
  each, ONNX Runtime's CUDA provider, `--slots` batches in flight, `--readers` reading threads):
  rows/s over the whole job, and after the actors loaded (from the driver's `workers:` line to
  its `done:` line), which the efficiency uses; and the actors' GPU busy fractions;
- (read) reading alone: N Ray tasks at once, each reading and converting `--read-files` of the
  files through the actor's reading path (`RowGroupReader`, `--readers` threads, no GPU): the
  rows/s this host can feed N actors;
- (engine) the engine alone, once, on one GPU: back-to-back batches on device-resident inputs
  (`bench.gpu_pipeline.engine_only`), times N: the rows/s N GPUs can compute.

The table gives rows/s per N, efficiency = rows/s(N) / (N x rows/s(1)), both ceilings, and the
lower one: the limit the job ran into. Everything also goes to JSON and a log under `--out`.

The lent GPU machine has no Ray: stage `ray` and its dependencies as `shared/device/README.md`
says, next to onnxruntime-gpu.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.gpu_pipeline import IMAGE, LAYOUTS, MODELS, engine_only, model_flops, resnet, write_images
from bench.runlog import RunLog
from workers.backends.base import BackendConfig
from workers.backends.onnxruntime import OnnxRuntimeBackend
from workers.convert import column_to_tensor
from workers.rowgroups import RowGroupReader
from workers.storage import file_version, filesystem
from workers.tensors import TensorMeta
from workers.types import Shard

#: `--cpu`: a tiny model and tiny images, so the whole run takes seconds on CPU actors.
CPU_IMAGE = (3, 32, 32)
CPU_BLOCKS = (1, 1, 1, 1)


class StampedLines(io.StringIO):
    """A text stream that keeps each line with the time it was written, and echoes it."""

    def __init__(self, *echo: TextIO) -> None:
        super().__init__()
        self.echo = echo
        self.lines: list[tuple[float, str]] = []
        self._partial = ""

    def write(self, text: str) -> int:
        now = time.perf_counter()
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        for line in done:
            self.lines.append((now, line))
            for stream in self.echo:
                stream.write(line + "\n")
        for stream in self.echo:
            stream.flush()
        return len(text)

    def first(self, prefix: str) -> float | None:
        """When the first line starting with `prefix` was written, if one was."""
        return next((t for t, line in self.lines if line.startswith(prefix)), None)


def file_shard(path: Path) -> Shard:
    """The whole file as one shard."""
    fs, p = filesystem(str(path))
    info = fs.info(p)
    meta = pq.read_metadata(path)
    return Shard(url=fs.unstrip_protocol(p), size=int(info["size"]), version=file_version(info),
                 row_groups=(0, meta.num_row_groups), rows=meta.num_rows)


def make_input(folder: Path, files: int, rows: int, row_group: int, layout: str,
               image: tuple[int, int, int]) -> list[Path]:
    """`files` Parquet files of `rows` random images: one written, the rest hard links to it."""
    folder.mkdir(parents=True)
    first = folder / "images-0000.parquet"
    write_images({layout: first}, rows, row_group, seed=20, image=image)
    paths = [first]
    for i in range(1, files):
        path = folder / f"images-{i:04d}.parquet"
        try:
            os.link(first, path)
        except OSError:  # a filesystem without hard links: copy
            shutil.copyfile(first, path)
        paths.append(path)
    return paths


def read_files(paths: list[str], readers: int, image: tuple[int, int, int]) -> dict[str, float]:
    """Read and convert whole files through the actor's reading path; rows and wall-clock span."""
    meta = TensorMeta("image", np.dtype(np.float32), (None, *image))

    def convert(table: pa.Table) -> tuple[dict[str, np.ndarray], pa.Table]:
        return {"image": column_to_tensor("img", table.column("img"), meta)}, table.select(["uid"])

    start = time.time()  # wall clock: the driver compares spans of several processes
    rows = 0
    for path in paths:
        with RowGroupReader(file_shard(Path(path)), ["img", "uid"], convert,
                            threads=readers) as reader:
            for _, kept, _, _ in reader:
                rows += kept.num_rows
    return {"rows": rows, "start": start, "end": time.time()}


def engine_alone(model: bytes, batch: int, iters: int, repeats: int, cpu: bool,
                 image: tuple[int, int, int]) -> dict[str, Any]:
    """Rows/s of one engine alone: ORT CUDA on one GPU (two streams), or ORT on one CPU."""
    if not cpu:
        from workers import cuda

        cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES leaves this task one GPU
        backend = OnnxRuntimeBackend(model, BackendConfig(device="cuda"))
        backend.load()
        try:
            return engine_only(backend, batch, iters, streams=2, repeats=repeats)
        finally:
            backend.close()
    with OnnxRuntimeBackend(model, BackendConfig(device="cpu", threads=1)) as cpu_backend:
        x = np.random.default_rng(1).random((batch, *image), dtype=np.float32)
        cpu_backend.infer({"image": x})  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                cpu_backend.infer({"image": x})
            rates.append(iters * batch / (time.perf_counter() - t0))
    return {"streams": 1, "rows_per_s": statistics.median(rates), "runs": rates, "iters": iters,
            "batch": batch}


class FileReader:
    """A Ray actor that reads files as an actor of the job would, with no GPU work."""

    def ready(self) -> bool:
        return True

    def read(self, paths: list[str], readers: int,
             image: tuple[int, int, int]) -> dict[str, float]:
        return read_files(paths, readers, image)


def read_alone(paths: list[Path], tasks: int, files_each: int, readers: int,
               image: tuple[int, int, int]) -> dict[str, Any]:
    """Rows/s of `tasks` Ray actors reading at once, each `files_each` files of its own."""
    import ray

    # Actors, started and ready before any reads, so that every reader starts at once (fresh
    # task workers would start one after another and stretch the span).
    reader: Any = ray.remote(num_cpus=1, num_gpus=0)(FileReader)
    actors: list[Any] = [reader.remote() for _ in range(tasks)]
    try:
        ray.get([a.ready.remote() for a in actors])
        shares = [[str(paths[(t * files_each + i) % len(paths)]) for i in range(files_each)]
                  for t in range(tasks)]
        spans = ray.get([a.read.remote(share, readers, image)
                         for a, share in zip(actors, shares, strict=True)])
    finally:
        for actor in actors:
            ray.kill(actor)
    rows = sum(int(s["rows"]) for s in spans)
    seconds = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    return {"tasks": tasks, "readers": readers, "rows": rows, "seconds": seconds,
            "rows_per_s": rows / seconds,
            "per_task_rows_per_s": [s["rows"] / (s["end"] - s["start"]) for s in spans]}


def run_scaled_job(n: int, model_path: Path, data: Path, out: Path, args: argparse.Namespace,
                   *echo: TextIO) -> dict[str, Any]:
    """The job with `n` actors; rows/s over the whole job and after the actors loaded."""
    from jobs.driver import run_job
    from jobs.spec import JobSpec

    spec = JobSpec(model=str(model_path), input=str(data), output=str(out),
                   columns=(("image", "img"),), keep=("uid",), batch_size=args.batch,
                   workers=n, rows_per_shard=args.rows_per_shard, backend=args.backend,
                   slots=args.slots, readers=args.readers, cpus_per_worker=args.cpus_per_worker,
                   progress=False)
    stream = StampedLines(*echo)
    t0 = time.perf_counter()
    report = run_job(spec, stream=stream)
    wall = time.perf_counter() - t0
    loaded, done = stream.first("workers:"), stream.first("done:")
    busy = [float(w.get("gpu_busy_fraction", 0.0)) for w in report.manifest.get("workers", [])]
    result = {
        "gpus": n, "rows": report.rows, "seconds": wall, "rows_per_s": report.rows / wall,
        "exit_code": report.exit_code, "failed": report.failed, "backend": report.backend,
        "load_seconds": (loaded - t0) if loaded is not None else None,
        "gpu_busy_fractions": busy,
        "workers": report.manifest.get("workers", []),
    }
    if loaded is not None and done is not None and done > loaded:
        result["rows_per_s_loaded"] = report.rows / (done - loaded)
    return result


def gpu_counts(wanted: list[int], available: int) -> list[int]:
    """The wanted counts the host has, plus all of its GPUs when that is fewer than the most wanted.

    A host of 6 GPUs runs 1, 2, 4 and 6 of 1, 2, 4, 8.
    """
    counts = sorted({n for n in wanted if 1 <= n <= available})
    if 1 <= available < max(wanted, default=0) and available not in counts:
        counts.append(available)
    return counts


def table(results: dict[str, Any]) -> str:
    """The scaling table, one row per GPU count."""
    lines = [
        f"{results['host']['gpus']} x {results['device']} ({results['host']['cpus']} CPUs); "
        f"model {results['model']} ({results['gflops']:.1f} GFLOP/row), {results['layout']} "
        f"column, {results['rows']} rows in {results['files']} files, batch {results['batch']}, "
        f"K={results['slots']} slots, {results['readers']} readers per actor; engine alone on "
        f"one {'CPU' if results['cpu'] else 'GPU'}: {results['engine']['rows_per_s']:.0f} rows/s",
        "",
        "| GPUs | job rows/s (after load) | efficiency | job rows/s (whole job) | efficiency "
        "(whole) | GPU busy (median actor) | read alone rows/s | N x engine alone rows/s | "
        "limit | job / limit | all rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = results["runs"]
    base = runs[0] if runs and runs[0]["gpus"] == 1 else None
    for r in runs:
        n = r["gpus"]
        loaded = r.get("rows_per_s_loaded")
        eff = (f"{loaded / (n * base['rows_per_s_loaded']):.3f}"
               if base and loaded and base.get("rows_per_s_loaded") else "-")
        eff_wall = f"{r['rows_per_s'] / (n * base['rows_per_s']):.3f}" if base else "-"
        read = r["read_alone"]["rows_per_s"]
        compute = n * results["engine"]["rows_per_s"]
        limit, ceiling = ("read", read) if read < compute else ("engine", compute)
        busy = statistics.median(r["gpu_busy_fractions"]) if r["gpu_busy_fractions"] else 0.0
        rate = loaded or r["rows_per_s"]
        complete = r["exit_code"] == 0 and r["rows"] == results["rows"]
        lines.append(f"| {n} | {loaded or 0:.0f} | {eff} | {r['rows_per_s']:.0f} | {eff_wall} | "
                     f"{busy:.3f} | {read:.0f} | {compute:.0f} | {limit} | "
                     f"{rate / ceiling:.3f} | {'yes' if complete else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"),
                        help="folder for the JSON, table and log (default $OUT or bench/results)")
    parser.add_argument("--work", default="/tmp/gpu_scaling_bench",
                        help="local-disk folder for the Parquet input and the jobs' output")
    parser.add_argument("--cpu", action="store_true",
                        help="tiny sizes on CPU actors (no GPU needed): tests the whole run")
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU (actor) counts to run")
    parser.add_argument("--model", default="resnet152", choices=sorted(MODELS))
    parser.add_argument("--layout", default="binary", choices=LAYOUTS,
                        help="image column: binary (each row's raw bytes) or tensor")
    parser.add_argument("--files", type=int, default=64, help="input files (one shard each)")
    parser.add_argument("--rows-per-file", type=int, default=2048)
    parser.add_argument("--row-group", type=int, default=256, help="rows per Parquet row group")
    parser.add_argument("--rows-per-shard", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--slots", type=int, default=3, help="batches in flight per actor")
    parser.add_argument("--readers", type=int, default=8, help="reading threads per actor")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--backend", default="onnxruntime",
                        choices=("onnxruntime", "tensorrt", "auto"))
    parser.add_argument("--read-files", type=int, default=8,
                        help="files each reading task reads in the read-alone measurement")
    parser.add_argument("--engine-iters", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="engine-alone timed runs (median)")
    parser.add_argument("--cpus", type=int, default=2, help="--cpu: CPUs of the local Ray")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    args = parser.parse_args(argv)
    if args.cpu:
        # Small enough for CI's two cores; shapes as the GPU run has them, scaled down.
        args.backend = "onnxruntime"
        for name, value in (("files", 4), ("rows_per_file", 64), ("row_group", 32),
                            ("batch", 16), ("slots", 1), ("readers", 1), ("read_files", 1),
                            ("engine_iters", 2), ("repeats", 1)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    image = CPU_IMAGE if args.cpu else IMAGE
    blocks = CPU_BLOCKS if args.cpu else MODELS[args.model]
    width = 8 if args.cpu else 64
    log = RunLog(Path(args.out), "gpu_scaling", args.tag)

    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        # A Ray of our own (address="local"), never one another process started.
        resources = {"num_cpus": args.cpus, "num_gpus": 0} if args.cpu else {}
        ray.init(address="local", include_dashboard=False, log_to_driver=not args.cpu,
                 **resources)
    try:
        cluster = ray.cluster_resources()
        if args.cpu:
            available = int(cluster.get("CPU", 1)) // args.cpus_per_worker
        else:
            available = int(cluster.get("GPU", 0))
            if available == 0:
                log(f"no GPU in this Ray cluster ({cluster}); run with --cpu for a CPU smoke run")
                return 2
        counts = gpu_counts([int(n) for n in args.gpus.split(",")], available)
        results: dict[str, Any] = {
            "command": " ".join([sys.executable, "-m", "bench.gpu_scaling",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "cpu": args.cpu, "device": "CPU" if args.cpu else "GPU",
            "host": {"cpus": os.cpu_count(), "gpus": available,
                     "python": platform.python_version(), "ray": ray.__version__},
            "model": "tiny" if args.cpu else args.model,
            "gflops": model_flops(blocks, width, image) / 1e9, "layout": args.layout,
            "files": args.files, "rows": args.files * args.rows_per_file, "batch": args.batch,
            "slots": args.slots, "readers": args.readers, "counts": counts,
        }
        if not args.cpu:
            from workers import cuda

            results["device"] = cuda.device_name(0) if cuda.device_count() else "GPU"
        log(f"ray: {cluster}; counts {counts}")

        work = Path(args.work)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        paths = make_input(work / "input", args.files, args.rows_per_file, args.row_group,
                           args.layout, image)
        model_path = work / "model.onnx"
        model_path.write_bytes(resnet(blocks, width=width, classes=10 if args.cpu else 1000,
                                      image=image))
        log(f"input: {args.files} files x {args.rows_per_file} rows ({args.layout} column, "
            f"{paths[0].stat().st_size / 1e9:.2f} GB each, hard links), model "
            f"{model_path.stat().st_size / 1e6:.0f} MB, in {time.perf_counter() - t0:.1f} s")

        # The engine alone, on one GPU; its worker exits afterwards, freeing the GPU's memory.
        engine_task = ray.remote(num_gpus=0 if args.cpu else 1, num_cpus=1,
                                 max_calls=1)(engine_alone)
        results["engine"] = ray.get(engine_task.remote(
            model_path.read_bytes(), args.batch, args.engine_iters, args.repeats, args.cpu,
            image))
        log(f"engine alone: {results['engine']['rows_per_s']:.0f} rows/s")

        results["runs"] = []
        for n in counts:
            read = read_alone(paths, n, args.read_files, args.readers, image)
            log(f"N={n}: read alone, {n} task(s) x {args.readers} thread(s): "
                f"{read['rows_per_s']:.0f} rows/s")
            job_out = work / f"out-{n}"
            run = run_scaled_job(n, model_path, work / "input", job_out, args, sys.stdout,
                                 log.file)
            run["read_alone"] = read
            results["runs"].append(run)
            log(f"N={n}: job {run['rows']} rows in {run['seconds']:.1f} s, "
                f"{run['rows_per_s']:.0f} rows/s whole job, "
                f"{run.get('rows_per_s_loaded', 0):.0f} rows/s after load "
                f"(load {run['load_seconds'] or 0:.1f} s), GPU busy "
                f"{[round(b, 3) for b in run['gpu_busy_fractions']]}, exit {run['exit_code']}")
            shutil.rmtree(job_out, ignore_errors=True)
            log.path(".json").write_text(json.dumps(results, indent=1, default=str))
        text = table(results)
        log.path(".md").write_text(text + "\n")
        log("\n" + text)
        shutil.rmtree(work, ignore_errors=True)
        ok = all(r["exit_code"] == 0 and r["rows"] == results["rows"] for r in results["runs"])
        return 0 if ok else 1
    finally:
        if started_ray:
            ray.shutdown()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
