"""The job from spec to manifest: validate, shard, claim the output, run the pool, commit."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO, cast

import pyarrow as pa
import ray

from jobs.image_sample import at_size_images
from jobs.lease import OutputLock
from jobs.limits import limited_by
from jobs.output import (
    INPUTS_FILE,
    JOB_FILE,
    MANIFEST_FILE,
    SUCCESS_FILE,
    OutputDir,
    diff_inputs,
    fingerprint,
    inputs_record,
    is_record_of,
)
from jobs.paths import resolve_paths
from jobs.plan_share import GpuNode, choose_backend, probe_gpu_nodes, share_plans
from jobs.plan_signing import load_signer
from jobs.pool import PoolConfig, ShardFailure, ShardPool
from jobs.processing import (
    Processing,
    check_preprocess_schema,
    pool_embeddings_in_graph,
    resolve_processing,
)
from jobs.progress import Progress
from jobs.resources import WorkerResources, worker_resources
from jobs.shards import (
    SHARDS_PER_WORKER,
    BadFile,
    InputFile,
    balanced_rows,
    balanced_shards,
    cut_file_shards,
    cut_shards,
    is_image_listing,
    list_image_files,
    list_input,
    read_footers,
    select_files,
)
from jobs.spec import JobSpec
from jobs.text_profiles import text_profiles
from jobs.validate import check_keep, resolve_bindings, schema_problem
from workers import sched
from workers.backends import BackendConfig
from workers.errors import ClusterError, SpecError, StorageError
from workers.external_data import ModelFiles, check_model_directory, read_external_files
from workers.images import IMAGE_DIR_SCHEMA, IMAGE_EXTENSIONS
from workers.plan_build import BuildConfig
from workers.preprocess import ImagePrep, TensorPrep, TextPrep
from workers.redact import RedactingStream, redact
from workers.storage import probe, read_bytes
from workers.tensors import ModelInfo, describe_onnx
from workers.types import FileRef, Shard, ShardResult, WorkerConfig

#: Shards cut before the workers are known (and files per shard of an image directory).
DEFAULT_ROWS_PER_SHARD = 100_000
DEFAULT_FILES_PER_SHARD = 1000

#: Failures the summary prints one per line; the manifest lists every one.
SUMMARY_FAILURES = 10


@dataclass
class JobReport:
    """What the job did; `exit_code` is 0 when failures are within `max_failed_shards`."""

    output: str
    shards: int
    committed: int
    skipped: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    backend: str = ""
    exit_code: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedJob:
    """Everything known before any actor starts."""

    spec: JobSpec
    model_bytes: bytes  # what the engines run (the file's bytes, or their rewrite: see below)
    model: ModelInfo
    model_sha256: str  # of the model file, as the user has it
    files: list[InputFile]
    bad_files: list[BadFile]
    shards: list[Shard]
    bindings: tuple[tuple[str, str], ...]
    #: Resolved pre- and postprocessing (None: the bindings as tensors, raw outputs).
    processing: Processing | None = None
    #: Files of the input the job does not read: not of `--file-extensions` (Parquet), or not
    #: images (an image directory).
    skipped_files: tuple[str, ...] = ()
    #: Balanced shards: the rows (or files) per shard they were cut for, and the files whose
    #: row groups are larger than that (url, rows of the largest); None: cut as the spec says.
    shard_target: int | None = None
    big_row_groups: tuple[tuple[str, int], ...] = ()
    #: Where embedding pooling runs: a line for the log ('' when nothing pools), and, when the
    #: graph pools, the manifest's record of the rewrite (`model_bytes` is the rewritten model)
    #: and the file's own model and processing, which pool on the host (`pooled_on_host`).
    pooling_note: str = ""
    graph_pooling: dict[str, Any] | None = None
    host_pooling: tuple[bytes, ModelInfo, Processing] | None = None

    @property
    def keep(self) -> tuple[str, ...]:
        """Kept columns; an image directory's `path` is always among them."""
        return self.processing.keep if self.processing else self.spec.keep

    @property
    def file_count(self) -> int:
        return len(self.files) or sum(len(s.files) for s in self.shards)

    @property
    def identity(self) -> dict[str, Any]:
        """What makes two runs the same job (so parts of one can be reused by the other)."""
        # URIs without credentials: a presigned URL's signature changes between runs of the
        # same job, and this identity is written to OUTPUT.
        key: dict[str, Any] = {
            "model_sha256": self.model_sha256,
            "input": redact(self.spec.input),
            "bindings": [list(b) for b in self.bindings],
            "keep": list(self.keep),
            "precision": self.spec.precision,
        }
        if self.processing is not None and not self.processing.is_default:
            key["processing"] = self.processing.to_json()
        if self.graph_pooling is not None:  # the rewrite's bytes vary with the onnx package
            key["graph_pooling"] = {k: v for k, v in self.graph_pooling.items()
                                    if k != "model_sha256"}
        if self.spec.weights:
            from jobs.caffe import converter_version

            # model_sha256 is the converted model's: it covers the prototxt, the weights and
            # what the converter made of them; the converter is named for the record.
            key["converted_by"] = converter_version()
        return {"fingerprint": fingerprint(key), "model": redact(self.spec.model), **key}

    def pooled_on_host(self, why: str) -> PreparedJob:
        """This job with its embedding pooled on the host, from the model file as it is."""
        if self.host_pooling is None or self.graph_pooling is None:
            return self
        model_bytes, model, processing = self.host_pooling
        note = (f"{self.graph_pooling['pooling']} pooling of output "
                f"'{self.graph_pooling['hidden']}' runs on the host: {why}")
        return replace(self, model_bytes=model_bytes, model=model, processing=processing,
                       pooling_note=note, graph_pooling=None, host_pooling=None)


def as_earlier_run(job: PreparedJob, previous: dict[str, Any] | None) -> PreparedJob:
    """`job` pooling where the earlier run of it that OUTPUT records (`previous`, its
    `_job.json`) pooled, so a resumed job's parts are all computed alike.

    A run that pooled on the host (one started before pooling moved into the graph) has the
    identity of `job.pooled_on_host`; its parts stay, and the rest of the job pools on the
    host too. Any other earlier run is left to `OutputDir.check`.
    """
    if job.graph_pooling is None or not previous:
        return job
    host = job.pooled_on_host("the output holds an earlier run of this job that pooled there, "
                              "so the rest of it pools alike (write to a new --output to pool "
                              "in the graph)")
    return host if is_record_of(previous, host.identity) else job


def load_model(spec: JobSpec) -> tuple[bytes, ModelInfo]:
    """The model's ONNX bytes (a Caffe model converted here, once) and its description; its
    external-data references checked to stay in its directory (see workers.external_data),
    before anything reads them."""
    try:
        data = read_bytes(spec.model, spec.storage)
    except StorageError as exc:
        raise SpecError(f"model '{spec.model}' cannot be read ({exc}); check --model") from exc
    source = f"model '{spec.model}'"
    if spec.weights:
        from jobs.caffe import convert_caffe

        try:
            weights = read_bytes(spec.weights, spec.storage)
        except StorageError as exc:
            raise SpecError(f"weights '{spec.weights}' cannot be read ({exc}); check "
                            "--weights") from exc
        source = f"Caffe model '{spec.model}' with weights '{spec.weights}'"
        data = convert_caffe(data, weights, source)
    info = describe_onnx(data, source=source)
    check_model_directory(data, spec.model, spec.storage)
    return data, info


def onnx_model_files(spec: JobSpec, model_bytes: bytes) -> bytes | ModelFiles:
    """What ONNX Runtime actors get: the model's bytes, with its external files when it has
    them (read here, from the model's directory, so actors never open files the model names)."""
    locations = check_model_directory(model_bytes, spec.model, spec.storage)
    if not locations:
        return model_bytes
    files = read_external_files(spec.model, locations, spec.storage)
    return ModelFiles(model=model_bytes, external=tuple(sorted(files.items())))


def prepare(spec: JobSpec) -> PreparedJob:
    """Load the model's metadata, list and shard the input, check every column binding."""
    if spec.backend != "onnxruntime":
        load_signer(spec.plan_key_file)  # an unreadable or short plan key fails before Ray starts
    model_bytes, model = load_model(spec)
    fs, listing = list_input(spec.input, spec.storage)
    if spec.input_format == "images" or (spec.input_format == "auto"
                                         and is_image_listing(listing)):
        return _prepare_images(spec, model_bytes, model, fs, listing)
    listing, others = select_files(fs, spec.input, listing, spec.file_extensions)
    footers = read_footers(fs, listing)
    files = [f for f in footers if isinstance(f, InputFile)]
    bad = [f for f in footers if isinstance(f, BadFile)]
    if not files:
        reasons = "; ".join(f"'{b.url}': {b.reason}" for b in bad[:3])
        raise SpecError(f"input '{spec.input}' has no readable Parquet file ({reasons})")
    processing = _reference_processing(spec, model, files)
    bindings = processing.bindings
    good = []
    for f in files:
        problem = (schema_problem(bindings, processing.keep, model, f.schema)
                   or check_preprocess_schema(processing.preprocess, model, f.schema,
                                              f"input '{f.url}'"))
        if problem:
            bad.append(BadFile(f.url, problem))
        else:
            good.append(f)
    return PreparedJob(spec=spec, files=good, bad_files=bad,
                       shards=cut_shards(good, spec.rows_per_shard or DEFAULT_ROWS_PER_SHARD),
                       bindings=bindings, skipped_files=tuple(others),
                       **_model_fields(spec, model_bytes, model, processing))


def _model_fields(spec: JobSpec, model_bytes: bytes, model: ModelInfo,
                  processing: Processing) -> dict[str, Any]:
    """The PreparedJob fields that describe the model run: with embedding pooling moved into
    its graph where it can be. The rewritten bytes are what the plan cache key and the actors
    see; the job's identity is the file's hash and where the pooling runs."""
    pooling = pool_embeddings_in_graph(model_bytes, processing)
    fields: dict[str, Any] = {"model_bytes": model_bytes, "model": model,
                              "processing": processing,
                              "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
                              "pooling_note": pooling.note}
    if pooling.pooled is None:
        return fields
    rewritten = pooling.pooled.model_bytes
    return {**fields, "model_bytes": rewritten, "processing": pooling.processing,
            "model": describe_onnx(rewritten, source=f"model '{spec.model}' (pooling in its graph)"),
            "graph_pooling": {"hidden": pooling.pooled.source, "pooling": pooling.pooled.pooling,
                              "mask": pooling.pooled.mask, "output": pooling.pooled.output,
                              "model_sha256": hashlib.sha256(rewritten).hexdigest()},
            "host_pooling": (model_bytes, model, processing)}


def _reference_processing(spec: JobSpec, model: ModelInfo, files: list[InputFile]) -> Processing:
    """Bindings and processing checked against the first file whose schema fits the spec.

    So one file with a different schema (poison data) fails alone, named in the manifest,
    instead of failing the whole job; a spec that fits no file raises the first file's error.
    """
    first: SpecError | None = None
    tried: list[Any] = []
    for f in files:
        if any(f.schema.equals(t) for t in tried):
            continue
        tried.append(f.schema)
        source = f"input '{f.url}'"
        try:
            processing = resolve_processing(spec, model, f.schema, source, resolve_bindings)
            check_keep(processing.keep, model, f.schema, source, processing.output_columns)
        except SpecError as exc:
            first = first or exc
            continue
        return processing
    assert first is not None  # `files` is never empty here
    raise first


def _prepare_images(spec: JobSpec, model_bytes: bytes, model: ModelInfo, fs: Any,
                    listing: dict[str, dict[str, Any]]) -> PreparedJob:
    """An image directory: one row per file (columns path, image), shards of files."""
    images, others = list_image_files(fs, listing)
    if not images:
        raise SpecError(f"input '{spec.input}' holds no image files ({', '.join(IMAGE_EXTENSIONS)}"
                        "); check --input, or pass --input-format parquet")
    source = f"image directory '{spec.input}'"
    processing = resolve_processing(spec, model, IMAGE_DIR_SCHEMA, source, resolve_bindings,
                                    images_input=True)
    check_keep(processing.keep, model, IMAGE_DIR_SCHEMA, source, processing.output_columns)
    return PreparedJob(spec=spec, files=[], bad_files=[],
                       shards=cut_file_shards(images,
                                              spec.rows_per_shard or DEFAULT_FILES_PER_SHARD),
                       bindings=processing.bindings, skipped_files=tuple(others),
                       **_model_fields(spec, model_bytes, model, processing))


def balance(job: PreparedJob, workers: int, previous: dict[str, Any] | None,
            earlier: Iterable[str] = ()) -> PreparedJob:
    """`job` with shards balanced over `workers` (at least `SHARDS_PER_WORKER` each), unless
    the spec sets rows_per_shard; a rerun keeps the cut its earlier run recorded, so the
    parts it committed stay valid whatever the cluster's size now. `earlier`: fingerprints
    the same job had in an earlier version's records (`OutputDir.earlier_fingerprints`)."""
    if job.spec.rows_per_shard is not None:
        return job
    target = None
    if previous and previous.get("job") in {job.identity["fingerprint"], *earlier}:
        recorded = previous.get("rows_per_shard")
        target = recorded if isinstance(recorded, int) and recorded > 0 else None
    if not job.files:  # an image directory: files per shard
        images: list[FileRef] = [f for s in job.shards for f in s.files]
        per = target or max(1, min(DEFAULT_FILES_PER_SHARD,
                                   len(images) // (SHARDS_PER_WORKER * workers)))
        return replace(job, shards=cut_file_shards(images, per), shard_target=per)
    rows = target or balanced_rows(job.files, workers)
    shards, big = balanced_shards(job.files, workers, rows)
    return replace(job, shards=shards, shard_target=rows, big_row_groups=tuple(big))


def shard_note(job: PreparedJob, workers: int) -> str:
    """Why a balanced job has fewer shards than its workers want (row groups too big), or ''."""
    if not job.big_row_groups or len(job.shards) >= SHARDS_PER_WORKER * workers:
        return ""
    url, rows = max(job.big_row_groups, key=lambda b: b[1])
    return (f"{len(job.big_row_groups)} file(s) have row groups larger than the "
            f"{job.shard_target:,}-row shards that would keep {workers} worker(s) busy (the "
            f"largest: {rows:,} rows in '{url}'); a row group is one shard at least, so its "
            "rows run on one worker: write such files with smaller row groups")


# Ray 2.59+ (token authentication); older Rays have no such error to catch.
_AUTHENTICATION_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(ray.exceptions, "AuthenticationError", None),) if cls is not None)
_TOKEN_FIX = ("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the cluster's token> (the one `ray "
              "start` was given, or ~/.ray/auth_token on the head), as for `ray job submit`; "
              "see the README's 'Running on a cluster'")


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local Ray."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(log_to_driver=True)
        except _AUTHENTICATION_ERRORS as exc:
            first = str(getattr(exc, "message", "") or exc).strip().splitlines()[0]
            raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: it uses "
                               f"token authentication and this process has no token ({first}); "
                               f"{_TOKEN_FIX}") from None
        except ConnectionError as exc:
            # A wrong token looks like this too: Ray retries, then reports no connection.
            raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={address} ({exc}); "
                               "check that it is running (`ray status`), and if it uses token "
                               f"authentication, {_TOKEN_FIX}") from None
    else:
        # "local": a new Ray in this process, never a cluster some other `ray start` left running.
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


def stop_ray() -> None:
    """`ray.shutdown()`, a second sooner for a Ray this process started.

    Ray stops its processes one kind at a time, the GCS before the autoscaler's monitor, whose
    SIGTERM handler then tries to report to the stopped GCS until Ray kills it a second later
    (`Node._kill_process_type` waits 1 s). A local Ray has no autoscaler (no nodes to add or
    take down), so its monitor is killed first; connected to a cluster, this process started
    no processes and `ray.shutdown()` only disconnects.
    """
    from ray._private import ray_constants
    from ray._private import worker as ray_worker

    node = ray_worker._global_node  # None once shut down; not the head when connected
    monitors: list[Any] = (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
                           if node is not None and node.head else [])
    for info in monitors:
        if info.process.poll() is None:
            info.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                info.process.wait(timeout=1.0)  # what Ray would wait (reaped, not a zombie)
    ray.shutdown()


def gpu_nodes_for(requested: str) -> list[GpuNode]:
    """The GPU nodes' facts (one probe task each), when the backend could be TensorRT."""
    if requested == "onnxruntime" or not ray.cluster_resources().get("GPU", 0):
        return []
    return probe_gpu_nodes()


def resolve_backend(requested: str, nodes: Sequence[GpuNode] | None = None,
                    build: BuildConfig | None = None) -> str:
    """`auto` -> the best backend the cluster can run; an impossible request fails here.

    `nodes`: the GPU nodes' probed facts (probed here when not given); `build`: the plans the
    job would build (lean-only nodes run only version-compatible ones).
    """
    return choose_backend(requested, gpu_nodes_for(requested) if nodes is None else nodes, build)


def check_onnxruntime_precision(spec: JobSpec, job: PreparedJob) -> None:
    """Refuse, before any actor starts, a precision ONNX Runtime cannot run on this cluster.

    Actors run on the CUDA provider where the cluster has GPUs (an actor whose node lacks
    onnxruntime-gpu still refuses fp16/bf16 when it loads), else on the CPU provider.
    """
    if spec.precision == "fp32":
        return
    from workers.backends.onnxruntime import check_precision
    from workers.onnx_precision import model_types

    device = "cuda" if ray.cluster_resources().get("GPU", 0) else "cpu"
    source = f"model '{spec.model}'"
    check_precision(spec.precision, device, model_types(job.model_bytes, source), source)


def plugins_of(spec: JobSpec) -> tuple[tuple[str, str], ...]:
    """(uri, sha256) of each --plugins library, read once here; the fingerprint holds them."""
    from workers.plugins import digest_plugins

    return digest_plugins(spec.plugins, spec.storage) if spec.plugins else ()


def _worker_resources(spec: JobSpec) -> WorkerResources:
    """Each actor's CPUs and threads on this cluster (`jobs.resources`), the spec's values first."""
    return worker_resources(ray.nodes(), spec.cpus_per_worker, spec.readers,
                            spec.preprocess_threads)


def default_shards_in_flight(shards: Sequence[Shard], batch_size: int, gpus: bool) -> int:
    """Shards queued per actor when `--shards-in-flight` is not given.

    A GPU actor runs its shards in turn on its slots while the next ones read ahead. When a
    shard is only a few batches long, the GPU finishes it before a replacement sent after it
    committed has read its first batch, so short shards get more company: enough queued to hold
    about 16 batches, from 2 up to 4 (each queued shard holds its row groups read ahead).
    """
    if not gpus or not shards:
        return 2
    rows = sorted(s.rows for s in shards)[len(shards) // 2]
    batches = max(1, math.ceil(rows / max(1, batch_size)))
    return max(2, min(4, math.ceil(16 / batches)))


def batch_rows(spec: JobSpec, job: PreparedJob, resources: WorkerResources) -> int:
    """Rows per batch for this job on this cluster (`JobSpec.batch_rows`)."""
    from workers.preprocess import tokenizes

    text = job.processing is not None and tokenizes(job.processing.preprocess)
    return spec.batch_rows(bool(resources.gpus), text)


def _pool_config(spec: JobSpec, todo: Sequence[Shard], resources: WorkerResources,
                 batch_size: int) -> PoolConfig:
    workers = max(1, min(spec.workers or resources.default_workers, len(todo)))
    in_flight = spec.shards_in_flight or default_shards_in_flight(todo, batch_size,
                                                                  bool(resources.gpus))
    return PoolConfig(workers=workers, num_gpus=1 if resources.gpus else 0,
                      num_cpus=resources.cpus, shards_in_flight=in_flight,
                      max_retries=spec.max_retries, max_actor_deaths=spec.max_actor_deaths)


def worker_config(spec: JobSpec, job: PreparedJob, backend: str,
                  resources: WorkerResources) -> WorkerConfig:
    """What every actor of this job is given."""
    switch_interval_ms, nice = sched.from_env()
    return WorkerConfig(
        backend=backend,
        # TensorRT host code is allowed per plan, for trusted ones only (PlanRefs.host_code);
        # so is leaving the --plugins libraries to a plan that carries them.
        backend_config=BackendConfig(threads=resources.cpus, precision=spec.precision,
                                     plugins=plugins_of(spec),
                                     storage_options=spec.storage_options,
                                     plugins_in_plan=(backend == "tensorrt"
                                                      and spec.version_compatible
                                                      and bool(spec.plugins)),
                                     # The graph the actors get (job.model_bytes), described
                                     # and checked here once.
                                     model_io=(job.model.inputs, job.model.outputs)),
        output_url=spec.output, bindings=job.bindings, keep=job.keep,
        batch_size=batch_rows(spec, job, resources), storage_options=spec.storage_options,
        slots=spec.slots, readers=resources.readers,
        concurrent_batches=spec.concurrent_batches,
        preprocess=job.processing.preprocess if job.processing else (),
        postprocess=job.processing.postprocess if job.processing else (),
        preprocess_threads=resources.preprocess_threads,
        max_row_group_bytes=spec.max_row_group_bytes,
        max_batch_tokens=spec.max_batch_tokens, sort_window=spec.sort_window,
        switch_interval_ms=switch_interval_ms, helper_nice=nice,
        image_tables=sched.image_tables_from_env())


def probe_paths(spec: JobSpec) -> None:
    """Check every store the job names, in seconds: no credentials or a dead endpoint is one
    line before anything starts, not minutes of every layer's retries (`workers.storage.probe`).
    """
    named = [("model", spec.model), ("weights", spec.weights), ("input", spec.input),
             ("output", spec.output), ("plan-cache", spec.plan_cache),
             *(("plugins", uri) for uri in spec.plugins)]
    for flag, url in named:
        if url:
            probe(url, flag, spec.storage)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_job(spec: JobSpec, stream: TextIO | None = None,
            prepared: PreparedJob | None = None) -> JobReport:
    """Run a job to the end; raises RunnerError only for problems found before work starts.

    `prepared`: what `prepare(spec)` returned, when the caller has it already (or a variant
    of it, as `PreparedJob.pooled_on_host`).
    """
    # Every line the job prints passes through here: URIs in it lose their credentials.
    stream = cast(TextIO, RedactingStream(stream or sys.stderr))
    started, started_at = time.monotonic(), _now()
    spec = resolve_paths(spec)  # one spelling of every path, for the identity and the manifest
    probe_paths(spec)
    job = prepared or prepare(spec)
    phases = {"prepare": time.monotonic() - started}
    out = OutputDir(spec.output, spec.storage)
    out.require_directory()
    job = as_earlier_run(job, out.read_json(JOB_FILE))
    lock = OutputLock(spec.output, spec.storage, timeout=spec.lock_timeout,
                      job=job.identity["fingerprint"])
    lock.acquire(takeover=spec.takeover)  # one job at a time writes OUTPUT
    if lock.took_over is not None:
        holder, why = lock.took_over
        print(f"lock: took over the lock on {spec.output} from {holder.describe(time.time())} "
              f"({why})", file=stream, flush=True)
    try:
        out.check(job.identity, spec.overwrite)  # refuse another job's output before Ray starts
        return _run_locked(spec, job, out, lock, stream, started, started_at, phases)
    finally:
        lock.release()


def _run_locked(spec: JobSpec, job: PreparedJob, out: OutputDir, lock: OutputLock,
                stream: TextIO, started: float, started_at: str,
                startup: dict[str, float]) -> JobReport:
    """The job while it holds OUTPUT's lock: claim, run the shards, write the manifest."""
    mark = time.monotonic()
    init_ray()
    startup["ray_init"] = time.monotonic() - mark
    gpu_nodes = gpu_nodes_for(spec.backend)
    # Before the output is touched or GPUs reserved.
    backend = resolve_backend(spec.backend, gpu_nodes, spec.build_config())
    if backend == "onnxruntime":
        check_onnxruntime_precision(spec, job)
    resources = _worker_resources(spec)
    workers = spec.workers or resources.default_workers
    before = out.read_json(INPUTS_FILE)
    job = balance(job, workers, before, out.earlier_fingerprints)
    committed = out.claim(job.identity, spec.overwrite)
    out.clear_tmp()
    todo = [s for s in job.shards if s.id not in committed]
    skipped = [s for s in job.shards if s.id in committed]
    current = {s.id for s in job.shards}
    # What changed in the input since the run that committed these parts. Parts of shards that
    # are gone (a file rewritten or removed) are removed now, before any new part is written,
    # so OUTPUT never holds parts of two versions of a file.
    record = inputs_record(job.identity["fingerprint"],
                           [(f.url, f.size, f.version) for f in job.files], job.shards)
    if job.shard_target is not None:
        record["rows_per_shard"] = job.shard_target  # a rerun cuts the same shards
    changes = diff_inputs(before, record, committed, earlier=out.earlier_fingerprints)
    out.remove([p["part"] for p in changes.stale])
    # Parts named by an earlier version, or before a file added ahead of theirs moved their
    # file's position, take their input-order names (kept, not recomputed).
    renamed = out.align_parts(job.shards)
    committed = {sid: name for sid, name in committed.items() if sid in current}
    out.write_json(INPUTS_FILE, record)
    if changes:
        print(f"input changed since the last run: {changes.summary()}", file=stream, flush=True)
    if renamed:
        print(f"output: renamed {len(renamed)} committed part(s) to their input-order names",
              file=stream, flush=True)
    print(job_line(job, len(skipped), len(todo)), file=stream, flush=True)
    note = shard_note(job, workers)
    if note:
        print(f"shards: {note}", file=stream, flush=True)
    for prep in job.processing.preprocess if job.processing else ():
        if isinstance(prep, TextPrep):
            print(f"text '{prep.column}': {prep.limits_text()}", file=stream, flush=True)
    if job.pooling_note:
        print(f"embedding: {job.pooling_note}", file=stream, flush=True)
    try:  # failed rows of shards committed by an earlier run are carried into this manifest
        previous = {e.get("id"): e for e in (out.read_json(MANIFEST_FILE) or {}).get("shards", [])
                    if isinstance(e, dict)}
    except StorageError:
        previous = {}

    outcome = None
    worker_info: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    in_flight: int | None = None  # shards queued per actor, as resolved
    batch_size = batch_rows(spec, job, resources)
    if todo:
        pool_config = _pool_config(spec, todo, resources, batch_size)
        in_flight = pool_config.shards_in_flight
        config = worker_config(spec, job, backend, resources)
        if resources.gpus:
            at_size = at_size_images(config, todo)
            config = replace(config, at_size_images=at_size)
            for name in at_size:
                print(f"images for input '{name}': JPEGs at the model's size in the sample, "
                      "decoded on the CPU where actors have 8+ threads (--image-decode gpu "
                      "decodes them on the GPU)", file=stream, flush=True)
        model_ref: Any
        mark = time.monotonic()
        if backend == "tensorrt":
            # One plan per GPU type, each put in the object store once; actors pick theirs.
            # Text: profiles for the widths the job's batches have, from a sample of the input.
            text = text_profiles(config, job.model.inputs, todo)
            shared = share_plans(job.model_bytes, job.model, spec.model, spec, gpu_nodes, stream,
                                 build=spec.build_config(text))
            model_ref, plans = shared.refs, shared.plans
        else:
            model_ref = ray.put(onnx_model_files(spec, job.model_bytes))
        startup["plan"] = time.monotonic() - mark
        mark = time.monotonic()
        pool = ShardPool(pool_config, config, model_ref, is_committed=out.has_part)
        worker_info = pool.start(pool_config.workers)
        startup["actors"] = time.monotonic() - mark
        print(f"workers: {pool_config.workers} x {worker_info['backend']} on "
              f"{worker_info['device']}, {resources.describe()}, "
              f"batches of {config.batch_size} rows, "
              f"{pool_config.shards_in_flight} shard(s) in flight each", file=stream, flush=True)
        progress = Progress(sum(s.rows for s in todo), len(todo), live=spec.progress,
                            stream=stream)

        def on_result(result: ShardResult | None, failure: ShardFailure | None) -> None:
            if result is not None:
                # Rows a preprocessor dropped count as processed: the bar's total has them.
                progress.update(rows=result.rows + result.rows_failed, shards=1,
                                shard_id=result.shard_id)
            elif failure is not None:
                progress.update(failed=1, shard_id=failure.shard.id)

        def on_tick() -> None:
            lock.check()  # stop if another job took OUTPUT over
            progress.render()

        try:
            outcome = pool.run(todo, on_result, on_tick=on_tick, on_progress=progress.running)
            mark = time.monotonic()
            outcome.worker_stats = pool.stats()
        finally:
            progress.close()
            pool.shutdown()
        startup["pool_stop"] = time.monotonic() - mark

    results = outcome.results if outcome else {}
    failures = outcome.failures if outcome else {}
    # A worker of an earlier run that outlived its driver may have committed a part of a shard
    # that is no longer in the input after the sweep above: sweep again, so parts match shards.
    late = sorted(name for sid, name in out.committed().items() if sid not in current)
    out.remove(late)
    changes.stale += [{"part": name, "file": None, "reason": "committed by a worker of an earlier "
                       "run after this run started"} for name in late]
    failed: list[dict[str, Any]] = [{"file": b.url, "shard": None, "reason": b.reason,
                                     "kind": "bad_file"}
                                    for b in job.bad_files]
    failed += [{"file": f.shard.url, "shard": f.shard.id,
                **({"files": len(f.shard.files)} if f.shard.files
                   else {"row_groups": list(f.shard.row_groups)}),
                "reason": f.reason, "kind": f.kind, "attempts": f.attempts,
                "actor_deaths": f.actor_deaths}
               for f in failures.values()]
    seconds = time.monotonic() - started
    gpu = bool(worker_info.get("slots"))  # the CPU path measures no copies or GPU time
    shard_rows = []
    for s in job.shards:
        entry: dict[str, Any] = {**s.to_json(), "part": s.part_name}
        if s.id in results:
            r = results[s.id]
            entry.update(status="committed", worker=r.worker, seconds=r.times.to_json(gpu),
                         bytes=r.part_bytes, started_at=round(r.started_at, 3),
                         committed_at=round(r.committed_at, 3))
            if outcome and (outcome.errors.get(s.id) or outcome.deaths.get(s.id)):
                # Committed in the end, after retries: say so, the part is still exactly once.
                entry.update(errors=outcome.errors.get(s.id, 0),
                             actor_deaths=outcome.deaths.get(s.id, 0))
            if r.rows_failed:
                entry.update(rows_failed=r.rows_failed, row_failures=r.row_failures)
        elif s.id in committed:
            entry["status"] = "skipped"
            before = previous.get(s.id) or {}
            if before.get("rows_failed"):
                entry.update(rows_failed=before["rows_failed"],
                             row_failures=before.get("row_failures", []))
        else:
            entry.update(status="failed", part=None,
                         reason=failures[s.id].reason if s.id in failures else "not run")
        shard_rows.append(entry)
    # Rows written: a done shard's rows less those preprocessing left out (on_error: skip).
    done_rows = sum(s.rows - int(e.get("rows_failed", 0)) for s, e in zip(job.shards, shard_rows,
                                                                          strict=True)
                    if e["status"] != "failed")
    manifest = {
        "job": job.identity, "spec": spec.to_json(), "backend": backend, "plans": plans,
        "shards_in_flight": in_flight, "batch_size": batch_size,
        "model": {"uri": spec.model, "sha256": job.model_sha256,
                  "inputs": [m.to_json() for m in job.model.inputs],
                  "outputs": [m.to_json() for m in job.model.outputs],
                  **({"graph_pooling": job.graph_pooling} if job.graph_pooling else {})},
        "started": started_at, "finished": _now(), "seconds": round(seconds, 3),
        "rows": done_rows, "shards_total": len(job.shards), "shards_committed": len(results),
        # Rows of done shards that preprocessing failed (on_error: skip): not in the parts.
        "rows_failed": sum(int(e.get("rows_failed", 0)) for e in shard_rows),
        "shards_skipped": len(skipped), "shards_failed": len(failures),
        "failures": failed, "files_skipped": list(job.skipped_files),
        "stale_parts_removed": changes.stale,
        "parts_renamed": [{"from": a, "to": b} for a, b in renamed],
        "foreign_files_removed": out.foreign_removed,
        "input_changes": changes.to_json(), "lock": lock.to_json(),
        "workers": outcome.worker_stats if outcome else [],
        "actors_replaced": outcome.actors_replaced if outcome else 0,
        "shards": shard_rows,
    }
    manifest["limited_by"] = limited_by(outcome.worker_stats if outcome else [],
                                        *_limit_context(job))
    manifest["timings"] = job_timings(startup, results.values(), started)
    lock.check()  # a job that lost its lock must not write the manifest or _SUCCESS
    out.clear_tmp()
    out.write_json(MANIFEST_FILE, manifest)
    complete = not failed
    if complete:
        out.write_json(SUCCESS_FILE, {"finished": manifest["finished"], "rows": done_rows})
    exit_code = 0 if len(failed) <= spec.max_failed_shards else 1
    report = JobReport(output=spec.output, shards=len(job.shards), committed=len(results),
                       skipped=len(skipped), failed=failed, rows=done_rows, seconds=seconds,
                       backend=backend, exit_code=exit_code, manifest=manifest)
    print(summary(report), file=stream, flush=True)
    return report


def job_line(job: PreparedJob, skipped: int, todo: int) -> str:
    """What the job is about to do: files, rows, shards, and the files it will not read."""
    line = (f"job: {job.file_count} file(s), {sum(s.rows for s in job.shards):,} rows in "
            f"{len(job.shards)} shard(s); {skipped} already committed (skipped), {todo} to run")
    if job.bad_files:
        line += f"; {len(job.bad_files)} unreadable file(s)"
    if job.skipped_files:
        kinds = ("images" if any(s.files for s in job.shards)
                 else " or ".join(f".{e}" for e in job.spec.file_extensions))
        line += f"; {len(job.skipped_files)} other file(s) skipped (not {kinds})"
    return line


def _limit_context(job: PreparedJob) -> tuple[str, list[str]]:
    """What the convert stage does in this job, and its tensor inputs read from list columns."""
    specs = job.processing.preprocess if job.processing else ()
    convert_is = ("decoding images" if any(isinstance(p, ImagePrep) for p in specs)
                  else "tokenizing text" if any(isinstance(p, TextPrep) for p in specs)
                  else "converting columns")
    schema = job.files[0].schema if job.files else None
    columns = [column for _, column in job.bindings]
    columns += [p.column for p in specs if isinstance(p, TensorPrep) and p.column not in columns]
    listed = []
    if schema is not None:
        for column in columns:
            index = schema.get_field_index(column)
            kind = schema.field(index).type if index >= 0 else None
            if kind is not None and (isinstance(kind, pa.FixedShapeTensorType)
                                     or pa.types.is_fixed_size_list(kind)
                                     or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
                listed.append(column)
    return convert_is, listed


def job_timings(phases: dict[str, float], results: Any, started: float) -> dict[str, float]:
    """Where the job's time went: its fixed costs by phase, and the shard phase from the first
    shard's start to the last shard's commit (wall clock, as the actors saw it)."""
    out = {name: round(seconds, 3) for name, seconds in phases.items()}
    spans = [(r.started_at, r.committed_at) for r in results if r.committed_at]
    if spans:
        first = min(a for a, _ in spans)
        last = max(b for _, b in spans)
        now_wall, now = time.time(), time.monotonic()
        out["shards"] = round(last - first, 3)
        # `started` is monotonic; the actors' times are wall clock: convert through now.
        out["before_first_shard"] = round(first - (now_wall - (now - started)), 3)
        out["after_last_commit"] = round(now_wall - last, 3)
    return out


def summary(report: JobReport) -> str:
    """The job's last lines: rows written, shards (and unreadable files) counted apart, and at
    most `SUMMARY_FAILURES` failures, the rest left to the manifest."""
    files = sum(1 for f in report.failed if f.get("kind") == "bad_file")
    lines = [f"done: {report.rows:,} rows in {report.seconds:.1f}s; shards: {report.committed} "
             f"committed, {report.skipped} skipped (already committed), "
             f"{len(report.failed) - files} failed"
             + (f"; files: {files:,} unreadable" if files else "")
             + f"; backend {report.backend}; output {report.output}"]
    if report.manifest.get("limited_by"):
        lines.append(report.manifest["limited_by"])
    if report.manifest.get("rows_failed"):
        lines.append(f"rows left out: {report.manifest['rows_failed']:,} row(s) failed "
                     "preprocessing; _manifest.json lists them under row_failures")
    for f in report.failed[:SUMMARY_FAILURES]:
        where = f"{f['file']}" + (f" row groups {f['row_groups'][0]}-{f['row_groups'][1] - 1}"
                                  if f.get("row_groups") else "")
        lines.append(f"failed: {where}: {f['reason']}")
    if len(report.failed) > SUMMARY_FAILURES:
        lines.append(f"... and {len(report.failed) - SUMMARY_FAILURES:,} more, see "
                     f"{report.output.rstrip('/')}/{MANIFEST_FILE}")
    return "\n".join(lines)
