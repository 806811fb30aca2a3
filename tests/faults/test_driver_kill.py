"""The driver SIGKILLed mid-job (`python -m jobs.run` in a subprocess, reading and writing the
S3 server through the fault proxy, which slows reads so the job is caught mid-way).

The driver and the local Ray it started are SIGKILLed (a lost driver machine); the rerun takes
over the dead job's lock at once (its process is gone), skips every committed
part without writing it again, and the output is exact. If the input changed in between, the
rerun removes the stale parts before writing new ones and the manifest says what changed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs.driver import JobReport, run_job
from jobs.output import PART_RE
from tests.faults.helpers import (
    check_exactly_once,
    cli_env,
    kill_marked,
    manifest,
    part_names,
    read_files,
    read_parts,
    spec_for,
    start_cli,
    wait_gone,
)
from tests.faults.proxy import Fault, FaultProxy, puts_of
from tests.models import two_input_model, two_input_table, write_dataset

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.s3, pytest.mark.subprocess]
SHARDS = 18


@pytest.fixture
def s3_job(s3_bucket: str, tmp_path: Path) -> dict[str, Any]:
    """3 files x 360 rows in row groups of 60 on S3: 18 shards of one row group each."""
    local = tmp_path / "data"
    write_dataset(str(local), files=3, rows_per_file=360, row_group_rows=60, seed=31)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(local) + "/", f"{s3_bucket}/table/", recursive=True)
    model = two_input_model(seed=9)
    fs.pipe(f"{s3_bucket}/models/m.onnx", model)
    return {"model": model, "model_url": f"{s3_bucket}/models/m.onnx", "local": local,
            "input": f"{s3_bucket}/table/", "output": f"{s3_bucket}/out", "bucket": s3_bucket}


def kill_mid_job(job: dict[str, Any], proxy: FaultProxy, parts: int) -> dict[str, dict[str, Any]]:
    """Run the job in a subprocess, SIGKILL its driver once `parts` parts are committed, wait
    for the Ray it started to go too; returns the parts then in OUTPUT with their info."""
    marker = uuid.uuid4().hex
    proxy.add(Fault("GET", "/table/data-", delay=0.15, times=None))  # slow reads: time to kill
    args = ["--model", job["model_url"], "--input", job["input"], "--output", job["output"],
            "--column", "image=img", "--column", "meta=features", "--keep", "uid",
            "--keep", "name", "--rows-per-shard", "60", "--batch-size", "32", "--workers", "2",
            "--backend", "onnxruntime", "--no-progress"]
    proc = start_cli(args, cli_env(AWS_ENDPOINT_URL=proxy.url, FAULTS_MARKER=marker))
    try:
        reached = proxy.wait_for(lambda log: len(puts_of(log, "/out/part-")) >= parts, 240)
        assert reached and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Its local Ray dies with it, but its workers can take many seconds to notice; kill
        # them now (only processes carrying this test's marker), as a lost machine would.
        kill_marked(marker)
        assert wait_gone(marker, 30), "the killed driver's Ray processes did not exit"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        kill_marked(marker)  # nothing is left by now, unless an assertion above failed
    proxy.clear()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = part_names(job["output"])
    assert parts <= len(names) < SHARDS, "the job finished before it could be killed"
    return {n: fs.info(f"{job['output']}/{n}") for n in names}


def rerun(job: dict[str, Any], proxy: FaultProxy) -> tuple[JobReport, str]:
    """The same job again, in this process, through the proxy (which logs what it writes)."""
    spec = spec_for(job["model_url"], job["input"], job["output"], rows_per_shard=60,
                    batch_size=32, storage_options=(("endpoint_url", proxy.url),))
    stream = io.StringIO()
    report = run_job(spec, stream)
    return report, stream.getvalue()


def test_rerun_after_driver_kill_is_exact(fault_ray: Any, proxy: FaultProxy,
                                          s3_job: dict[str, Any]) -> None:
    before = kill_mid_job(s3_job, proxy, parts=4)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert fs.exists(f"{s3_job['output']}/_lock.json")  # the dead driver's lock is left behind
    for name in before:  # every visible part is complete
        with fs.open(f"{s3_job['output']}/{name}") as f:
            assert pq.read_metadata(f).num_rows == 60

    report, log = rerun(s3_job, proxy)
    assert report.exit_code == 0 and report.skipped == len(before)
    assert report.committed + report.skipped == report.shards == SHARDS
    assert "its process" in log and "on this host has exited" in log
    # Committed parts were not written again: no PUT of them, same ETag and time.
    written = {r.path.rsplit("/", 1)[-1] for r in puts_of(proxy.requests, "/out/part-")}
    assert not written & set(before) and len(written) == SHARDS - len(before)
    fs.invalidate_cache()
    for name, info in before.items():
        now = fs.info(f"{s3_job['output']}/{name}")
        assert (now["ETag"], now["LastModified"]) == (info["ETag"], info["LastModified"])
    source = read_files(sorted(str(p) for p in s3_job["local"].iterdir()))
    check_exactly_once(s3_job["model"], source, read_parts(s3_job["output"]))
    record = manifest(s3_job["output"])
    assert record["lock"]["took_over"]["reason"].endswith("on this host has exited")
    assert record["shards_skipped"] == len(before) and not record["stale_parts_removed"]
    assert not fs.exists(f"{s3_job['output']}/_lock.json")


def test_input_changed_between_crash_and_rerun(fault_ray: Any, proxy: FaultProxy,
                                               s3_job: dict[str, Any]) -> None:
    before = kill_mid_job(s3_job, proxy, parts=4)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    record = json.loads(fs.cat_file(f"{s3_job['output']}/_inputs.json"))
    of_shard = {sid: url for url, f in record["files"].items() for sid in f["shards"]}

    def owner(part: str) -> str:
        match = PART_RE.match(part)
        assert match, part
        return of_shard[match.group(1)]

    # Rewrite a file that has committed parts, and add a file.
    changed = owner(sorted(before)[0])
    name = changed.rsplit("/", 1)[-1]
    stale = sorted(n for n in before if owner(n) == changed)
    pq.write_table(two_input_table(300, seed=77, start=100_000), s3_job["local"] / name,
                   row_group_size=60)
    pq.write_table(two_input_table(120, seed=78, start=200_000),
                   s3_job["local"] / "data-003.parquet", row_group_size=60)
    fs.put(str(s3_job["local"] / name), f"{s3_job['input']}{name}")
    fs.put(str(s3_job["local"] / "data-003.parquet"), f"{s3_job['input']}data-003.parquet")

    report, log = rerun(s3_job, proxy)
    assert report.exit_code == 0, report.failed
    result = manifest(s3_job["output"])
    changes = result["input_changes"]
    assert changes["previous_run_recorded"] is True
    assert [c["file"] for c in changes["rewritten"]] == [changed]
    assert changes["added"] == [f"{s3_job['input']}data-003.parquet"]
    assert changes["removed"] == []
    assert sorted(p["part"] for p in result["stale_parts_removed"]) == stale
    assert {p["reason"] for p in result["stale_parts_removed"]} == {"its file was rewritten"}
    assert (f"input changed since the last run: 1 file(s) added, 1 file(s) rewritten, "
            f"{len(stale)} stale part(s) removed") in log
    # The stale parts were deleted before the first new part was written.
    log = proxy.requests
    deletes = [i for i, r in enumerate(log)  # s3fs deletes objects in bulk: POST /bucket?delete
               if ((r.method == "POST" and r.path.endswith("?delete"))
                   or (r.method == "DELETE" and "/out/part-" in r.path)) and r.status < 300]
    first_put = min(i for i, r in enumerate(log) if r.method == "PUT" and "/out/part-" in r.path)
    assert deletes and max(deletes) < first_put
    # Old parts of the changed file are gone, the others were kept, the output is exact.
    after = set(part_names(s3_job["output"]))
    assert not after & set(stale) and set(before) - set(stale) <= after
    source = read_files(sorted(str(p) for p in s3_job["local"].glob("data-*.parquet")))
    assert source.num_rows == 2 * 360 + 300 + 120
    check_exactly_once(s3_job["model"], source, read_parts(s3_job["output"]))
