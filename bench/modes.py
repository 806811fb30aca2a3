"""The three ways the benchmark runs one job: engine only, this runner's job, and Ray Data.

All three use the same ONNX model, ONNX Runtime on the CPU with the same threads per worker,
the same batch size and the same number of workers (Ray actors of one CPU each).
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

MODES = ("engine", "job", "raydata")
LABELS = {"engine": "(a) engine only", "job": "(b) this runner", "raydata": "(c) Ray Data"}


@dataclass
class RunResult:
    """One timed run: rows processed and the wall seconds from submission to the last commit."""

    rows: int
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


# (a) engine only ------------------------------------------------------------------------------

class EngineWorker:
    """One worker's backend over batches already in memory: the ceiling for the pipeline."""

    def __init__(self, model: bytes, threads: int) -> None:
        from workers.backends import BackendConfig, create_backend

        self.backend = create_backend("onnxruntime", model, BackendConfig(threads=threads)).load()
        self.batches: list[dict[str, np.ndarray]] = []

    def preload(self, files: Sequence[str], bindings: Mapping[str, str], batch_size: int,
                max_rows: int) -> int:
        """Read and convert up to `max_rows` rows of `files` into batches; returns rows held."""
        from workers.convert import column_to_tensor

        metas = {m.name: m for m in self.backend.inputs}
        held = 0
        for path in files:
            for record_batch in pq.ParquetFile(path).iter_batches(
                    batch_size=batch_size, columns=list(bindings.values())):
                if held >= max_rows:
                    return held
                self.batches.append({name: column_to_tensor(column, record_batch.column(column),
                                                            metas[name])
                                     for name, column in bindings.items()})
                held += record_batch.num_rows
        return held

    def run(self, rows: int) -> tuple[int, float, float, float]:
        """Infer batches (cycling through those held) until `rows` rows.

        Returns (rows, start, end, cpu seconds of this process meanwhile).
        """
        start = time.time()  # wall clock: compared across the workers' processes
        cpu = time.process_time()
        done = 0
        while done < rows:
            for batch in self.batches:
                count = min(next(iter(batch.values())).shape[0], rows - done)
                self.backend.infer({name: array[:count] for name, array in batch.items()})
                done += count
                if done >= rows:
                    break
        return done, start, time.time(), time.process_time() - cpu


def run_engine(model: bytes, files: Sequence[str], file_rows: Sequence[int],
               bindings: Mapping[str, str], batch_size: int, workers: int, threads: int,
               max_preload_rows: int) -> RunResult:
    """(a): `workers` actors each infer their share of the rows on preloaded batches, together."""
    remote: Any = ray.remote(num_cpus=threads)(EngineWorker)
    actors: list[Any] = [remote.remote(model, threads) for _ in range(workers)]
    shares = [list(range(i, len(files), workers)) for i in range(workers)]
    try:
        ray.get([a.preload.remote([files[j] for j in share], bindings, batch_size,
                                  max_preload_rows) for a, share in zip(actors, shares, strict=True)])
        results = ray.get([a.run.remote(sum(file_rows[j] for j in share))
                           for a, share in zip(actors, shares, strict=True)])
    finally:
        for actor in actors:
            ray.kill(actor)
    rows = sum(r[0] for r in results)
    seconds = max(r[2] for r in results) - min(r[1] for r in results)
    return RunResult(rows, seconds, {"per_worker": [{"rows": r[0], "seconds": r[2] - r[1]}
                                                    for r in results],
                                     "cpu_seconds": sum(r[3] for r in results)})


# (b) this runner's job --------------------------------------------------------------------------

def run_runner_job(model_path: str, input_url: str, output_url: str, inputs: Sequence[str],
                   batch_size: int, workers: int, threads: int,
                   rows_per_shard: int | None = None) -> RunResult:
    """(b): the job from spec to manifest, storage to storage, as `python -m jobs.run` runs it."""
    from jobs.driver import run_job
    from jobs.spec import spec_from_settings

    settings: dict[str, Any] = {
        "model": model_path, "input": input_url, "output": output_url,
        "columns": {name: name for name in inputs}, "keep": ["uid"],
        "batch_size": batch_size, "workers": workers, "cpus_per_worker": threads,
        "backend": "onnxruntime", "progress": False,
    }
    if rows_per_shard:
        settings["rows_per_shard"] = rows_per_shard
    spec = spec_from_settings(settings)
    log = io.StringIO()
    start = time.perf_counter()
    report = run_job(spec, stream=log)
    seconds = time.perf_counter() - start
    if report.exit_code != 0:
        raise RuntimeError(f"the benchmark job failed:\n{log.getvalue()}")
    stages: dict[str, float] = {}
    busy = []
    for worker in report.manifest.get("workers", []):
        for stage, value in worker.get("seconds", {}).items():
            stages[stage] = stages.get(stage, 0.0) + float(value)
        busy.append(float(worker.get("seconds", {}).get("total", 0.0)))
    # Wall time outside the busiest worker's shards: prepare, actor start and model load,
    # scheduling gaps, shutdown and the manifest.
    return RunResult(report.rows, seconds, {"stages": stages, "shards": report.shards,
                                            "worker_busy_s": busy,
                                            "outside_shards_s": seconds - max(busy, default=0)})


# (c) Ray Data, as its batch-inference guide writes it -------------------------------------------

class OnnxPredictor:
    """The model loaded once per actor in `__init__`, called on numpy batches."""

    def __init__(self, model_path: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, {name: batch[name] for name in self.inputs})
        return {"uid": batch["uid"], **dict(zip(self.outputs, values, strict=True))}


def run_ray_data(model_path: str, input_url: str, output_url: str, inputs: Sequence[str],
                 batch_size: int, workers: int, threads: int) -> RunResult:
    """(c): read_parquet -> map_batches(callable class, fixed actor pool, numpy) -> write_parquet.

    `s3://` URLs go through pyarrow's own S3 filesystem, which finds the endpoint and
    credentials in the AWS_* environment, as Ray Data does by default.
    """
    start = time.perf_counter()
    ds = ray.data.read_parquet(input_url, columns=["uid", *inputs])
    ds = ds.map_batches(OnnxPredictor, fn_constructor_args=(model_path, threads),
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
                        batch_size=batch_size, batch_format="numpy")
    ds.write_parquet(output_url)
    seconds = time.perf_counter() - start
    return RunResult(0, seconds)


def output_rows(output_url: str) -> int:
    """Rows in the Parquet files directly under `output_url` (footers only)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output_url)
    total = 0
    for path in fs.ls(root.rstrip("/"), detail=False, refresh=True):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith(("_", ".")):
            with fs.open(path, "rb") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
    return total
