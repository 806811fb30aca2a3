"""End-to-end benchmark: this runner's job against the engine alone and against Ray Data.

    python -m bench.e2e                          # both models, local files and S3 (moto), 3 repeats
    python -m bench.e2e --scaling 1,2,3,4        # rows/s and efficiency by number of workers

Every mode runs in this one process tree (one local Ray cluster), on the same data, model,
backend (ONNX Runtime, CPU), batch size, workers and ONNX Runtime threads per worker:

  (a) engine only: the backend on preloaded batches, no I/O;
  (b) this runner: `jobs.driver.run_job`, Parquet on storage to Parquet parts on storage;
  (c) Ray Data: read_parquet -> map_batches(callable class, actor pool, numpy) -> write_parquet.

Modes alternate within each repeat (the order rotates between repeats) and the table shows
medians, so load from other processes on the machine hits every mode alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/e2e.py` as well as `python -m bench.e2e`
    sys.path.insert(0, REPO)

import ray  # noqa: E402

from bench.datagen import DataShape, parse_image, write_dataset  # noqa: E402
from bench.measure import MiB, TreeMonitor, first_part_probe  # noqa: E402
from bench.models import MODELS, build_model, model_inputs  # noqa: E402
from bench.modes import (  # noqa: E402
    LABELS,
    MODES,
    RunResult,
    output_rows,
    run_engine,
    run_ray_data,
    run_runner_job,
)
from bench.profile import Profiler  # noqa: E402
from bench.profile import summary as profile_summary  # noqa: E402
from bench.s3server import S3Server  # noqa: E402

STORAGES = ("local", "s3")


@dataclass
class Measurement:
    """One timed run of one mode on one model and storage."""

    model: str
    mode: str
    storage: str
    workers: int
    repeat: int
    rows: int
    seconds: float
    rows_per_s: float
    peak_mib: float | None
    first_output_s: float | None
    cpu_s_per_1k_rows: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dataset:
    """One model's input, generated locally and (for S3 runs) uploaded."""

    shape: DataShape
    local: str
    files: list[str]
    s3: str | None = None


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want integers >= 1, got {text!r}")
    return values


def parse_choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"want a comma-separated subset of "
                                             f"{','.join(allowed)}, got {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=parse_choices(MODELS), default=list(MODELS))
    p.add_argument("--storages", type=parse_choices(STORAGES), default=list(STORAGES))
    p.add_argument("--modes", type=parse_choices(MODES), default=None,
                   help="default: engine,job,raydata (with --scaling: engine,job)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="actors per mode (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime threads and Ray CPUs per worker (default 1)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rows-small", type=int, default=160_000,
                   help="rows of the small model's dataset")
    p.add_argument("--rows-cnn", type=int, default=64_000, help="rows of the CNN's dataset")
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--row-group-rows", type=int, default=1024)
    p.add_argument("--image", type=parse_image, default=(3, 32, 32), metavar="C,H,W")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--rows-per-shard", type=int, default=None,
                   help="runner's target rows per shard (default: the runner's default)")
    p.add_argument("--max-preload-rows", type=int, default=16_384,
                   help="(a) holds at most this many rows per worker and cycles through them")
    p.add_argument("--scaling", type=parse_ints, default=None, metavar="N,N,...",
                   help="instead of the comparison: the CNN on local files with each number of "
                   "workers, modes from --modes (default engine,job)")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray cluster (default: workers + 2, so Ray Data "
                   "has CPU slots for its read and write tasks beside the actors)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="record every Ray worker with py-spy (raw stacks under DIR) and print "
                   "where the time went; profiling slows the runs it records")
    p.add_argument("--workdir", default=None,
                   help="where datasets are generated (reused when the shape matches); "
                   "default: a temporary directory, removed at the end")
    p.add_argument("--results-dir", default=os.path.join(REPO, "bench", "results"),
                   help="where the raw JSON and the printed report go ('' to skip)")
    p.add_argument("--tag", default="", help="added to the result file names")
    return p


# data --------------------------------------------------------------------------------------------

def prepare_data(workdir: str, model: str, shape: DataShape) -> Dataset:
    """Generate the model's dataset under `workdir`, or reuse one of the same shape."""
    local = os.path.join(workdir, f"data-{model}")
    marker = os.path.join(local, "_shape.json")
    wanted = json.dumps(asdict(shape), sort_keys=True)
    files = sorted(os.path.join(local, n) for n in os.listdir(local)
                   if n.endswith(".parquet")) if os.path.isdir(local) else []
    current = None
    if os.path.exists(marker):
        with open(marker) as f:
            current = f.read()
    if current != wanted or len(files) != shape.files:
        shutil.rmtree(local, ignore_errors=True)
        write_dataset(local, shape)
        with open(marker, "w") as f:
            f.write(wanted)
        files = sorted(os.path.join(local, n) for n in os.listdir(local) if n.endswith(".parquet"))
    return Dataset(shape=shape, local=local, files=files)


def upload(dataset: Dataset, bucket: str, model: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    target = f"{bucket}/data-{model}"
    for path in dataset.files:
        fs.put_file(path, f"{target}/{os.path.basename(path)}")
    dataset.s3 = target


def remove_output(url: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


# one run ------------------------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    workdir: str
    models: dict[str, tuple[str, bytes]]  # name -> (path, bytes)
    data: dict[str, Dataset]
    s3: S3Server | None = None
    bucket: str | None = None
    exclude_pids: tuple[int, ...] = ()


def run_case(ctx: Context, model: str, mode: str, storage: str, workers: int,
             repeat: int) -> Measurement:
    """Run one mode once, measured; checks that every row came out."""
    args = ctx.args
    dataset = ctx.data[model]
    model_path, model_bytes = ctx.models[model]
    inputs = model_inputs(model)
    expected = dataset.shape.rows
    if storage == "s3":
        assert ctx.bucket is not None and dataset.s3 is not None
        input_url, output_url = dataset.s3, f"{ctx.bucket}/out-{uuid.uuid4().hex[:8]}"
    else:
        input_url = dataset.local
        output_url = os.path.join(ctx.workdir, f"out-{uuid.uuid4().hex[:8]}")
    probe = first_part_probe(output_url) if mode != "engine" else None
    profiler = None
    if args.profile:
        profiler = Profiler(args.profile, f"{model}-{mode}-{storage}-x{workers}-r{repeat}",
                            exclude=ctx.exclude_pids)
        profiler.poll()
    monitor = TreeMonitor(exclude=ctx.exclude_pids, interval=0.2 if storage == "local" else 0.5,
                          tree_every=5 if storage == "local" else 2,
                          first_output=probe,
                          on_sample=profiler.poll if profiler else None).start()
    result: RunResult
    try:
        if mode == "engine":
            result = run_engine(model_bytes, dataset.files, dataset.shape.file_rows(),
                                {n: n for n in inputs}, args.batch_size, workers, args.threads,
                                args.max_preload_rows)
        elif mode == "job":
            result = run_runner_job(model_path, input_url, output_url, inputs, args.batch_size,
                                    workers, args.threads, args.rows_per_shard)
        else:
            result = run_ray_data(model_path, input_url, output_url, inputs, args.batch_size,
                                  workers, args.threads)
    finally:
        usage = monitor.stop()
        profile = profile_summary(profiler.stop()) if profiler is not None else None
    if profile is not None:
        result.detail["profile"] = profile
    result.detail["monitor_cpu_s"] = round(usage.monitor_cpu_s, 3)
    if storage == "s3" and mode != "engine":
        result.detail["s3_server_cpu_s"] = round(usage.excluded_cpu_s, 2)
    result.detail["cpu_by_process"] = usage.cpu_by_title
    try:
        rows = result.rows if mode == "engine" else output_rows(output_url)
    finally:
        if mode != "engine":
            remove_output(output_url)
    if rows != expected:
        raise RuntimeError(f"{LABELS[mode]} on {model}/{storage} wrote {rows} rows, "
                           f"expected {expected}")
    return Measurement(
        model=model, mode=mode, storage=storage if mode != "engine" else "-", workers=workers,
        repeat=repeat, rows=rows, seconds=round(result.seconds, 3),
        rows_per_s=round(rows / result.seconds, 1),
        peak_mib=round(usage.peak_bytes / MiB, 1) if mode != "engine" else None,
        first_output_s=round(usage.first_output_s, 2) if usage.first_output_s is not None
        else None,
        # (a) counts the CPU of its inference loops only: its tree also loaded the batches.
        cpu_s_per_1k_rows=round(result.detail.get("cpu_seconds", usage.cpu_seconds) / rows * 1000,
                                4),
        detail=result.detail)


# reporting ----------------------------------------------------------------------------------------

def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def comparison_table(results: list[Measurement]) -> str:
    """Medians per model, storage and mode, then (b)/(a) and (b)/(c) as medians of paired ratios."""
    lines = []
    header = (f"{'model':<6} {'storage':<7} {'mode':<17} {'rows/s':>9} {'range':>17} "
              f"{'peak MiB':>9} {'1st out s':>9} {'CPU s/1k':>8}")
    lines += [header, "-" * len(header)]
    ratios: list[str] = []
    for model in dict.fromkeys(m.model for m in results):
        engine = [m for m in results if m.model == model and m.mode == "engine"]
        for storage in dict.fromkeys(m.storage for m in results if m.storage != "-"):
            rows_of = {mode: [m for m in results if m.model == model and m.mode == mode
                              and m.storage in (storage, "-")] for mode in MODES}
            for mode in MODES:
                runs = rows_of[mode]
                if not runs:
                    continue
                rates = [m.rows_per_s for m in runs]
                lines.append(
                    f"{model:<6} {storage:<7} {LABELS[mode]:<17} {_median(rates):>9,.0f} "
                    f"{f'{min(rates):,.0f}-{max(rates):,.0f}':>17} "
                    f"{_fmt(_median([m.peak_mib for m in runs]), ',.0f'):>9} "
                    f"{_fmt(_median([m.first_output_s for m in runs]), '.1f'):>9} "
                    f"{_fmt(_median([m.cpu_s_per_1k_rows for m in runs]), '.2f'):>8}")
            job = {m.repeat: m.rows_per_s for m in rows_of["job"]}
            # The job's rate inside its shards: rows over the busiest worker's time in them,
            # leaving out actor start, model load and the manifest.
            in_shards = {m.repeat: m.rows / max(m.detail["worker_busy_s"])
                         for m in rows_of["job"] if m.detail.get("worker_busy_s")}
            parts = []
            for mine, other, name in ((job, "engine", "(b)/(a)"), (job, "raydata", "(b)/(c)"),
                                      (in_shards, "engine", "(b) in shards/(a)")):
                base = {m.repeat: m.rows_per_s for m in (engine if other == "engine"
                                                         else rows_of[other])}
                paired = [mine[r] / base[r] for r in mine if r in base and base[r] > 0]
                if paired:
                    parts.append(f"{name} = {statistics.median(paired):.2f} "
                                 f"[{min(paired):.2f}-{max(paired):.2f}]")
            if parts:
                ratios.append(f"{model:<6} {storage:<7} " + ", ".join(parts))
            servers = {mode: _median([m.detail.get("s3_server_cpu_s") for m in rows_of[mode]])
                       for mode in ("job", "raydata")}
            if any(v is not None for v in servers.values()):
                ratios.append(f"{'':<14} S3 server CPU per run: " + ", ".join(
                    f"{LABELS[mode][:3]} {v:.1f}s" for mode, v in servers.items()
                    if v is not None))
        lines.append("")
    if ratios:
        lines += ["ratios of rows/s (median of per-repeat ratios [min-max]):", *ratios]
    return "\n".join(lines)


def stage_table(results: list[Measurement]) -> str:
    """Where (b)'s workers spent their time: per-stage seconds summed over workers, medians."""
    lines = []
    for key in dict.fromkeys((m.model, m.storage) for m in results if m.mode == "job"):
        runs = [m for m in results if (m.model, m.storage) == key and m.mode == "job"]
        stages: dict[str, list[float]] = {}
        for m in runs:
            for stage, value in m.detail.get("stages", {}).items():
                stages.setdefault(stage, []).append(value)
        shown = {s: statistics.median(v) for s, v in stages.items() if max(v) > 0}
        total = shown.get("total") or 1.0
        outside = _median([m.detail.get("outside_shards_s") for m in runs])
        server = _median([m.detail.get("s3_server_cpu_s") for m in runs])
        lines.append(f"{key[0]:<6} {key[1]:<7} " + "  ".join(
            f"{s} {v:.1f}s ({100 * v / total:.0f}%)" for s, v in shown.items())
            + f"; wall outside shards (start, load, manifest) {_fmt(outside, '.1f')}s"
            + (f"; S3 server CPU {server:.1f}s" if server is not None else ""))
    return "\n".join(lines)


def scaling_table(results: list[Measurement]) -> str:
    """Rows/s by workers; efficiency = rate(N) / (N/N0 x rate(N0)) against the fewest workers."""
    lines = [f"{'mode':<17} {'workers':>7} {'rows/s':>9} {'range':>17} {'efficiency':>10} "
             f"{'(b)/(a)':>8}"]
    lines.append("-" * len(lines[0]))
    for mode in dict.fromkeys(m.mode for m in results):
        by_n = {n: [m for m in results if m.mode == mode and m.workers == n]
                for n in sorted({m.workers for m in results if m.mode == mode})}
        base_n = min(by_n)
        base = statistics.median(m.rows_per_s for m in by_n[base_n])
        for n, runs in by_n.items():
            rates = [m.rows_per_s for m in runs]
            rate = statistics.median(rates)
            ratio = None
            if mode == "job":
                engine = {m.repeat: m.rows_per_s for m in results
                          if m.mode == "engine" and m.workers == n}
                paired = [m.rows_per_s / engine[m.repeat] for m in runs if m.repeat in engine]
                ratio = statistics.median(paired) if paired else None
            lines.append(f"{LABELS[mode]:<17} {n:>7} {rate:>9,.0f} "
                         f"{f'{min(rates):,.0f}-{max(rates):,.0f}':>17} "
                         f"{rate / (base * n / base_n):>10.2f} {_fmt(ratio, '.2f'):>8}")
        lines.append("")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy
    import onnxruntime
    import psutil
    import pyarrow

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total
                                                                  / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__, "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "commit": commit,
    }


# main ---------------------------------------------------------------------------------------------

def schedule(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """One repeat's runs as (model, mode, storage, workers), before rotation."""
    if args.scaling:
        modes = args.modes or ["engine", "job"]
        return [("cnn", mode, "local", n) for n in args.scaling for mode in modes]
    runs = []
    for model in args.models:
        for mode in args.modes or MODES:
            for storage in (["-"] if mode == "engine" else args.storages):
                runs.append((model, mode, storage, args.workers))
    return runs


def run(args: argparse.Namespace, log: Callable[[str], None]) -> list[Measurement]:
    """Prepare data and storage, start Ray, run the schedule `repeats` times, rotated."""
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-e2e-")
    os.makedirs(workdir, exist_ok=True)
    models = sorted({"cnn"} if args.scaling else set(args.models))
    needs_s3 = (not args.scaling and "s3" in args.storages
                and any(mode != "engine" for mode in args.modes or MODES))
    ctx = Context(args=args, workdir=workdir, models={}, data={})
    server = S3Server() if needs_s3 else None
    try:
        for name in models:
            onnx_bytes = build_model(name, args.image, args.features)
            path = os.path.join(workdir, f"{name}.onnx")
            with open(path, "wb") as f:
                f.write(onnx_bytes)
            ctx.models[name] = (path, onnx_bytes)
            shape = DataShape(rows=args.rows_small if name == "small" else args.rows_cnn,
                              files=args.files, row_group_rows=args.row_group_rows,
                              image=args.image, features=args.features)
            ctx.data[name] = prepare_data(workdir, name, shape)
            log(f"data: {name}: {shape.rows:,} rows x {shape.row_bytes:,} B in {shape.files} "
                f"files ({sum(os.path.getsize(p) for p in ctx.data[name].files) / MiB:,.0f} MiB)")
        if server is not None:
            server.__enter__()
            ctx.s3, ctx.exclude_pids = server, (server.pid,)
            ctx.bucket = server.new_bucket()
            for name in models:
                upload(ctx.data[name], ctx.bucket, name)
            log(f"s3: moto on {server.endpoint}, data uploaded to {ctx.bucket}")
        # Workers import bench/, jobs/ and workers/ from the repository, like this driver.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [REPO, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
        most = max(args.scaling) if args.scaling else args.workers
        # address="local": a cluster of our own, even where `ray start` runs one on this machine
        # (which a bare ray.init() would join).
        ray.init(address="local", num_cpus=args.ray_cpus or most * args.threads + 2,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        plan = schedule(args)
        if any(mode == "raydata" for _, mode, _, _ in plan):
            # Imported only when used: Ray Data needs pandas (pip install 'ray[data]').
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        results: list[Measurement] = []
        for repeat in range(args.repeats):
            shift = repeat % len(plan)
            for model, mode, storage, workers in plan[shift:] + plan[:shift]:
                m = run_case(ctx, model, mode, "local" if storage == "-" else storage, workers,
                             repeat)
                results.append(m)
                log(f"repeat {repeat + 1}/{args.repeats}: {model:<5} {m.storage:<5} "
                    f"{LABELS[mode]:<17} x{workers}: {m.rows:,} rows in {m.seconds:.1f}s = "
                    f"{m.rows_per_s:,.0f} rows/s; peak {_fmt(m.peak_mib, ',.0f')} MiB; "
                    f"first output {_fmt(m.first_output_s, '.1f')}s; "
                    f"CPU {m.cpu_s_per_1k_rows:.2f} s/1k rows")
        return results
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if server is not None:
            server.__exit__(None, None, None)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m bench.e2e " + " ".join(sys.argv[1:] if argv is None else argv)
    started = dt.datetime.now(dt.timezone.utc)
    info = machine()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"bench: {command}\nmachine: {info['cpu']}, {info['cores']} cores, "
        f"{info['memory_gib']} GiB; load average {info['load_average']}")
    results = run(args, log)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    sizes = [(m, args.rows_small if m == "small" else args.rows_cnn)
             for m in (["cnn"] if args.scaling else args.models)]
    profiles = "\n".join(f"--- {m.model} {m.storage} {LABELS[m.mode]} x{m.workers} repeat "
                         f"{m.repeat + 1}\n{m.detail['profile']}"
                         for m in results if m.detail.get("profile"))
    if args.scaling:
        body = scaling_table(results)
    else:
        body = comparison_table(results) + "\n\n(b) worker time by stage (medians, " \
            "summed over workers):\n" + stage_table(results)
    report = (f"{command}\n{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; "
              f"ray {info['ray']}, onnxruntime {info['onnxruntime']}, pyarrow {info['pyarrow']}; "
              f"commit {info['commit']}; load average before {info['load_average']}, after "
              f"{info['load_average_after']}\n"
              f"workers {args.workers if not args.scaling else args.scaling}, batch "
              f"{args.batch_size}, {args.threads} ORT thread(s) per worker, {args.repeats} "
              f"repeats, medians\n"
              f"data: {', '.join(f'{m} {r:,} rows' for m, r in sizes)} of image "
              f"{'x'.join(map(str, args.image))} + {args.features} features (float32), "
              f"{args.files} files, row groups of {args.row_group_rows:,}\n\n{body}\n"
              + (f"\npy-spy profiles (samples of every Ray worker; profiled runs are slower):\n"
                 f"{profiles}\n" if profiles else ""))
    print(report)
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = os.path.join(args.results_dir, f"{'scaling' if args.scaling else 'e2e'}-"
                            f"{started:%Y%m%d-%H%M%S}{'-' + args.tag if args.tag else ''}")
        with open(stem + ".json", "w") as f:
            json.dump({"command": command, "started": started.isoformat(timespec="seconds"),
                       "machine": info, "args": {k: v for k, v in vars(args).items()},
                       "results": [asdict(m) for m in results]}, f, indent=1, default=str)
        with open(stem + ".txt", "w") as f:
            f.write(report)
        log(f"results: {stem}.json, {stem}.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
