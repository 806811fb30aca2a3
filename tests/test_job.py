"""The job end to end on a local Ray cluster: local files and the S3 server, resume, conflicts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.driver import run_job
from jobs.spec import JobSpec
from tests.models import two_input_model, write_dataset
from workers.errors import OutputConflictError, SpecError

pytestmark = pytest.mark.ray


def spec_for(model: str, data: str, out: str, **kw: object) -> JobSpec:
    settings: dict[str, object] = dict(
        model=model, input=data, output=out, columns=(("image", "img"), ("meta", "features")),
        keep=("uid", "name"), batch_size=64, rows_per_shard=240, backend="onnxruntime",
        workers=2, progress=False)
    settings.update(kw)
    return JobSpec(**settings)  # type: ignore[arg-type]


def read_output(url: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    parts = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    return ds.dataset(parts, filesystem=fs, format="parquet").to_table()


def read_input(url: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(url)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table()


def check_exact(model: bytes, source: pa.Table, result: pa.Table) -> None:
    """One output row per input row, kept columns unchanged, outputs equal to ONNX Runtime's."""
    assert result.num_rows == source.num_rows
    source, result = source.sort_by("uid"), result.sort_by("uid")
    assert result.column("uid").equals(source.column("uid"))
    assert result.column("name").equals(source.column("name"))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    image = source.column("img").combine_chunks().to_numpy_ndarray()
    meta = np.stack(source.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    logits, score = session.run(["logits", "score"], {"image": image, "meta": meta})
    got_logits = result.column("logits").combine_chunks().to_numpy_ndarray()
    assert isinstance(result.schema.field("logits").type, pa.FixedShapeTensorType)
    assert result.schema.field("score").type == pa.float32()
    assert np.abs(got_logits - logits).max() <= 1e-4
    assert np.abs(result.column("score").to_numpy() - score[:, 0]).max() <= 1e-4


def test_local_job_exact(ray_cluster: None, two_input_onnx: Path, dataset: Path, tmp_path: Path
                         ) -> None:
    out = tmp_path / "out"
    report = run_job(spec_for(str(two_input_onnx), str(dataset), str(out)))
    assert report.exit_code == 0 and report.committed == report.shards == 9 and not report.failed
    check_exact(two_input_onnx.read_bytes(), read_input(str(dataset)), read_output(str(out)))
    names = sorted(p.name for p in out.iterdir())
    assert "_SUCCESS" in names and "_manifest.json" in names
    assert not [n for n in names if not (n.startswith("part-") or n.startswith("_"))]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 1500 and manifest["shards_committed"] == 9
    assert manifest["model"]["sha256"] and manifest["backend"] == "onnxruntime"
    assert {s["status"] for s in manifest["shards"]} == {"committed"}
    assert sum(w["rows"] for w in manifest["workers"]) == 1500


GPU_TIMES = {"h2d", "compute", "d2h", "gpu_busy", "first_batch", "submit"}


def test_output_directory_reads_in_input_order(ray_cluster: None, two_input_onnx: Path,
                                               tmp_path: Path) -> None:
    """Part names sort as the input does (file, then row group), so any reader of the
    directory gets the input's rows in the input's order; and the CPU path's manifest carries
    no GPU timings."""
    data = tmp_path / "data"
    write_dataset(str(data), files=12, rows_per_file=240, row_group_rows=60, seed=4)
    out = tmp_path / "out"
    report = run_job(spec_for(str(two_input_onnx), str(data), str(out), rows_per_shard=120))
    assert report.exit_code == 0 and report.committed == 24
    assert pq.read_table(out).column("uid").to_pylist() == list(range(12 * 240))
    manifest = json.loads((out / "_manifest.json").read_text())
    for entry in manifest["shards"]:
        assert not GPU_TIMES & set(entry["seconds"]), entry["seconds"]
    for worker in manifest["workers"]:
        assert not GPU_TIMES & set(worker["seconds"])
        assert not {"slots", "gpu_busy_seconds", "gpu_busy_fraction", "warmup_seconds"} & \
            set(worker)


def test_parts_named_by_an_earlier_version_are_kept_and_renamed(
        ray_cluster: None, two_input_onnx: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = spec_for(str(two_input_onnx), str(dataset), str(out))
    run_job(spec)
    current = sorted(p.name for p in out.glob("part-*.parquet"))
    for name in current[:5]:  # the old scheme: part-<shard id>.parquet
        (out / name).rename(out / f"part-{name.rsplit('-', 1)[-1]}")
    (out / current[-1]).unlink()
    report = run_job(spec)
    assert (report.skipped, report.committed) == (8, 1)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == current
    assert pq.read_table(out).column("uid").to_pylist() == list(range(1500))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["parts_renamed"]) == 5


def test_the_pool_reports_rows_of_a_shard_before_it_commits(ray_cluster: None,
                                                            two_input_onnx: Path,
                                                            tmp_path: Path) -> None:
    """Rows written by an actor reach the driver while the shard runs (the bar used to sit at
    0% until a whole shard committed); a CPU actor runs one shard call at a time, so the
    driver reads its counts through a concurrency group of their own."""
    import asyncio

    import ray

    from jobs.driver import prepare, worker_config
    from jobs.paths import resolve_paths
    from jobs.pool import PoolConfig, ShardPool
    from jobs.resources import worker_resources
    from tests.user_functions import GATE

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self) -> None:
            self.event = asyncio.Event()

        async def wait(self) -> None:
            await self.event.wait()

        def open(self) -> None:
            self.event.set()

    gate = Gate.options(name=GATE[0], namespace=GATE[1]).remote()
    data = tmp_path / "data"
    write_dataset(str(data), files=1, rows_per_file=480, row_group_rows=480, seed=6)
    spec = resolve_paths(spec_for(str(two_input_onnx), str(data), str(tmp_path / "out"),
                                  batch_size=64, rows_per_shard=480,
                                  postprocess=("tests.user_functions:hold_second_batch",)))
    job = prepare(spec)
    assert len(job.shards) == 1
    pool = ShardPool(PoolConfig(workers=1, num_gpus=0, num_cpus=1, shards_in_flight=1,
                                max_retries=0),
                     worker_config(spec, job, "onnxruntime",
                                   worker_resources(ray.nodes(), 1, None, None)),
                     ray.put(job.model_bytes))
    seen: list[tuple[int, int]] = []
    done: list[int] = []

    keys: set[str] = set()

    def on_progress(running: dict[str, int]) -> None:
        rows = sum(running.values())
        keys.update(running)
        seen.append((rows, len(done)))
        if rows and not done:
            gate.open.remote()

    try:
        pool.start(1)
        outcome = pool.run(job.shards, lambda r, f: done.append(1), on_progress=on_progress,
                           tick_seconds=0.2)
    finally:
        pool.shutdown()
        ray.kill(gate)
    assert len(outcome.results) == 1, outcome.failures
    assert (64, 0) in seen  # the first batch, while the shard was still running
    assert keys == {job.shards[0].id}  # counted per shard, so a finished one counts once


def test_rerun_skips_committed_parts(ray_cluster: None, two_input_onnx: Path, dataset: Path,
                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = spec_for(str(two_input_onnx), str(dataset), str(out))
    run_job(spec)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    victims = sorted(before)[:3]
    for name in victims:
        (out / name).unlink()
    report = run_job(spec)
    assert (report.skipped, report.committed) == (6, 3)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sorted(after) == sorted(before)
    assert all(after[n] == before[n] for n in before if n not in victims)
    check_exact(two_input_onnx.read_bytes(), read_input(str(dataset)), read_output(str(out)))


def test_other_job_into_same_output_is_refused(ray_cluster: None, two_input_onnx: Path,
                                               dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_job(spec_for(str(two_input_onnx), str(dataset), str(out)))
    other_model = tmp_path / "other.onnx"
    other_model.write_bytes(two_input_model(seed=42))
    with pytest.raises(OutputConflictError, match=r"already holds 9 part\(s\) of another job .*"
                       r"choose another --output, or pass --overwrite"):
        run_job(spec_for(str(other_model), str(dataset), str(out)))
    report = run_job(spec_for(str(other_model), str(dataset), str(out), overwrite=True))
    assert report.committed == 9 and report.skipped == 0
    check_exact(other_model.read_bytes(), read_input(str(dataset)), read_output(str(out)))


def test_fp16_on_a_cpu_cluster_fails_before_any_actor(ray_cluster: None, two_input_onnx: Path,
                                                     dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SpecError, match=re.escape(
            "precision fp16 with ONNX Runtime needs its CUDA provider, and this runs on the CPU "
            "provider")):
        run_job(spec_for(str(two_input_onnx), str(dataset), str(out), precision="fp16"))
    assert not list(out.glob("part-*"))


def test_corrupt_file_among_good_ones(ray_cluster: None, two_input_onnx: Path, dataset: Path,
                                      tmp_path: Path) -> None:
    (dataset / "data-001.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    out = tmp_path / "out"
    report = run_job(spec_for(str(two_input_onnx), str(dataset), str(out)))
    assert report.exit_code == 1 and report.committed == 6
    assert [f["file"].rsplit("/", 1)[-1] for f in report.failed] == ["data-001.parquet"]
    assert "not a readable Parquet file" in report.failed[0]["reason"]
    assert not (out / "_SUCCESS").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["failures"][0]["file"].endswith("data-001.parquet")
    source = pa.concat_tables(read_input(str(dataset / f"data-00{i}.parquet")) for i in (0, 2))
    check_exact(two_input_onnx.read_bytes(), source, read_output(str(out)))


@pytest.mark.s3
def test_s3_model_input_output(ray_cluster: None, s3_bucket: str, tmp_path: Path) -> None:
    """Model, input and output on the S3 server on 127.0.0.1, reached over HTTP by s3fs."""
    fs = fsspec.filesystem("s3")
    local = tmp_path / "data"
    write_dataset(str(local), files=2, rows_per_file=300, row_group_rows=100, seed=5)
    fs.put(str(local) + "/", f"{s3_bucket}/table/", recursive=True)
    model = two_input_model(seed=8)
    fs.pipe(f"{s3_bucket}/models/m.onnx", model)
    out = f"{s3_bucket}/scored"
    report = run_job(spec_for(f"{s3_bucket}/models/m.onnx", f"{s3_bucket}/table/", out,
                              rows_per_shard=200))
    assert report.exit_code == 0 and report.committed == 4
    check_exact(model, read_input(f"{s3_bucket}/table/"), read_output(out))
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(out))
    assert "_SUCCESS" in names and "_manifest.json" in names
    assert not [n for n in names if n.startswith("part-") and not n.endswith(".parquet")]
    rerun = run_job(spec_for(f"{s3_bucket}/models/m.onnx", f"{s3_bucket}/table/", out,
                             rows_per_shard=200))
    assert (rerun.skipped, rerun.committed) == (4, 0)


@pytest.mark.subprocess
def test_gpu_actors_with_overlapping_calls(two_input_onnx: Path, dataset: Path, tmp_path: Path
                                           ) -> None:
    """A cluster that declares GPUs: actors take num_gpus=1 and run queued calls concurrently;
    a synchronous backend (ONNX Runtime without a CUDA provider here) still runs one shard at a
    time, and the output is exact."""
    import subprocess
    import sys

    out = tmp_path / "out"
    script = (
        "import ray, sys; from jobs.driver import run_job; from tests.test_job import spec_for\n"
        "ray.init(address='local', num_cpus=2, num_gpus=2, include_dashboard=False)\n"
        f"r = run_job(spec_for({str(two_input_onnx)!r}, {str(dataset)!r}, {str(out)!r}, "
        "workers=None, shards_in_flight=3))\n"
        "sys.exit(r.exit_code)\n")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(repo)
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "workers: 2 x onnxruntime" in result.stderr
    check_exact(two_input_onnx.read_bytes(), read_input(str(dataset)), read_output(str(out)))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sum(w["shards"] for w in manifest["workers"]) == 9
