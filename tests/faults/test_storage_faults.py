"""Storage faults from the S3 server (through the fault proxy): transient ones are retried with
backoff, permanent ones fail at once with the storage's error named."""

from __future__ import annotations

import errno
import io
import json
import re
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.driver import run_job
from tests.faults.helpers import check_exactly_once, manifest, read_files, read_parts, spec_for
from tests.faults.proxy import Fault, FaultProxy, puts_of
from tests.models import two_input_model, two_input_table, write_dataset
from workers.commit import PartWriter
from workers.errors import DataError, StorageError, TransientStorageError
from workers.reader import ShardFile, read_batches
from workers.storage import (
    RetryPolicy,
    file_version,
    is_transient,
    read_bytes,
    retrying,
    write_bytes_atomic,
)
from workers.types import Shard

pytestmark = [pytest.mark.faults, pytest.mark.s3]
FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05)


def options(proxy: FaultProxy, **config: Any) -> dict[str, Any]:
    """s3fs through the proxy with botocore's own retries off, so faults reach our retries."""
    return {"endpoint_url": proxy.url, "skip_instance_cache": True,
            "config_kwargs": {"retries": {"total_max_attempts": 1}, **config}}


def put_table(bucket: str, key: str, table: pa.Table, row_group_rows: int) -> Shard:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file(f"{bucket}/{key}", buf.getvalue())
    info = fs.info(f"{bucket}/{key}")
    groups = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata.num_row_groups
    return Shard(url=f"{bucket}/{key}", size=int(info["size"]), version=file_version(info),
                 row_groups=(0, groups), rows=table.num_rows)


# -- the classification ---------------------------------------------------------------------

@pytest.mark.parametrize("exc, transient", [
    (OSError(errno.EREMOTEIO, "InternalError"), True),
    (OSError(errno.EBUSY, "SlowDown"), True),
    (TimeoutError("read timed out"), True),
    (ConnectionResetError("reset by peer"), True),
    (PermissionError("Access Denied"), False),
    (FileNotFoundError("NoSuchKey"), False),
    (OSError(errno.EINVAL, "InvalidArgument"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (ValueError("not storage"), False),
    (TransientStorageError("outage"), True),
    (StorageError("denied"), False),
])
def test_transient_or_permanent(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_missing_credentials_are_a_permanent_storage_error_that_says_where_they_come_from(
        ) -> None:
    """botocore's NoCredentialsError is no OSError: it used to escape as a 72-line traceback."""
    from botocore.exceptions import NoCredentialsError

    calls = []

    def sign() -> None:
        calls.append(1)
        raise NoCredentialsError()

    with pytest.raises(StorageError) as info:
        retrying("cannot read 's3://b/m.onnx'", sign, FAST)
    assert len(calls) == 1 and not isinstance(info.value, TransientStorageError)
    assert str(info.value).startswith("cannot read 's3://b/m.onnx': no credentials for it "
                                      "(NoCredentialsError: Unable to locate credentials); "
                                      "s3fs (botocore) looks in AWS_ACCESS_KEY_ID")


def test_retrying_gives_up_naming_the_error() -> None:
    calls = []

    def flaky() -> bytes:
        calls.append(1)
        raise OSError(errno.EREMOTEIO, "We encountered an internal error")

    with pytest.raises(TransientStorageError, match=r"cannot read 'x': OSError: \[Errno 121\] We "
                       r"encountered an internal error; still failing after 4 attempt\(s\)"):
        retrying("cannot read 'x'", flaky, FAST)
    assert len(calls) == 4


def test_permanent_error_is_not_retried() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(StorageError, match="cannot write 'y': permission denied") as info:
        retrying("cannot write 'y'", denied, FAST)
    assert not isinstance(info.value, TransientStorageError) and len(calls) == 1


def test_non_storage_errors_pass_through() -> None:
    with pytest.raises(ZeroDivisionError):
        retrying("cannot compute", lambda: 1 // 0, FAST)


# -- the storage layer over HTTP ---------------------------------------------------------------

def test_transient_faults_on_small_objects_are_retried(proxy: FaultProxy, s3_bucket: str) -> None:
    url = f"{s3_bucket}/small/_job.json"
    write_bytes_atomic(url, b'{"a": 1}')
    proxy.add(Fault("GET", "/small/_job.json", status=500, times=2))
    proxy.add(Fault("PUT", "/small/_job.json", status=503, code="SlowDown", times=7))
    assert read_bytes(url, options(proxy), FAST) == b'{"a": 1}'
    write_bytes_atomic(url, b'{"a": 2}', options(proxy), FAST)
    assert read_bytes(url) == b'{"a": 2}'
    assert [r.fault for r in proxy.requests if r.fault] == ["status 500"] * 2 + ["status 503"] * 7


def test_permanent_fault_fails_at_once(proxy: FaultProxy, s3_bucket: str) -> None:
    url = f"{s3_bucket}/denied/model.onnx"
    write_bytes_atomic(url, b"bytes")
    proxy.add(Fault("GET", "/denied/", status=403, code="AccessDenied", times=None))
    with pytest.raises(StorageError, match=f"cannot read '{url}': permission denied"):
        read_bytes(url, options(proxy), FAST)
    assert len([r for r in proxy.requests if r.status == 403]) == 1


def test_row_groups_reread_after_resets_and_cut_bodies(proxy: FaultProxy, s3_bucket: str
                                                       ) -> None:
    table = two_input_table(600, seed=4)
    shard = put_table(s3_bucket, "rg/a.parquet", table, row_group_rows=20)
    # Small reads, so row groups come in many requests: faults land mid-shard. More resets in
    # a row than s3fs retries on its own (5), then a body cut short, then a 500.
    proxy.add(Fault("GET", "/rg/a.parquet", reset=True, skip=3, times=6))
    proxy.add(Fault("GET", "/rg/a.parquet", truncate=True, skip=12, times=1))
    proxy.add(Fault("GET", "/rg/a.parquet", status=500, skip=16, times=1))
    storage = {**options(proxy), "default_block_size": 16 * 1024}
    got = pa.concat_tables(read_batches(shard, ["uid", "img"], 64, storage, FAST))
    assert got.column("uid").equals(table.column("uid"))
    assert got.column("img").equals(table.column("img"))
    assert {r.fault for r in proxy.requests if r.fault} == {"reset", "truncate", "status 500"}


def test_slow_response_past_the_read_timeout_is_retried(proxy: FaultProxy, s3_bucket: str
                                                         ) -> None:
    table = two_input_table(200, seed=5)
    shard = put_table(s3_bucket, "slow/a.parquet", table, row_group_rows=100)
    proxy.add(Fault("GET", "/slow/a.parquet", delay=3.0, skip=1, times=6))
    storage = options(proxy, read_timeout=1, connect_timeout=1)
    got = pa.concat_tables(read_batches(shard, ["uid"], 50, storage, FAST))
    assert got.column("uid").equals(table.column("uid"))
    assert sum(r.fault == "delay" for r in proxy.requests) >= 1


def test_corrupt_bytes_are_data_not_storage(s3_bucket: str) -> None:
    """Bytes that do not decode fail at once as DataError (no storage retry) naming the group."""
    table = two_input_table(400, seed=6)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=100, compression="zstd")
    data = bytearray(buf.getvalue())
    column = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(2).column(2)
    for i in range(column.data_page_offset, column.data_page_offset + 24):
        data[i] ^= 0xFF
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file(f"{s3_bucket}/bad/a.parquet", bytes(data))
    info = fs.info(f"{s3_bucket}/bad/a.parquet")
    shard = Shard(url=f"{s3_bucket}/bad/a.parquet", size=int(info["size"]),
                  version=file_version(info), row_groups=(0, 4), rows=400)
    with ShardFile(shard) as source:
        assert source.read_row_group(1, ["uid", "img"]).num_rows == 100
        with pytest.raises(DataError, match=r"a.parquet' has a corrupt row group 2 \(.*\); "
                           "replace or remove the file"):
            source.read_row_group(2, ["uid", "img"])


def test_commit_retried_and_denied(proxy: FaultProxy, s3_bucket: str) -> None:
    table = two_input_table(50, seed=7).select(["uid", "name"])
    proxy.add(Fault("PUT", "/parts/part-a.parquet", status=500, times=2))
    writer = PartWriter(f"{s3_bucket}/parts", "part-a.parquet", options(proxy), FAST)
    writer.write(table)
    writer.commit()
    assert pq.read_table(fsspec.open(f"{s3_bucket}/parts/part-a.parquet").open()).equals(table)

    proxy.add(Fault("PUT", "/parts/part-b.parquet", status=403, code="AccessDenied", times=None))
    writer = PartWriter(f"{s3_bucket}/parts", "part-b.parquet", options(proxy), FAST)
    writer.write(table)
    with pytest.raises(StorageError, match=f"cannot commit part '{s3_bucket}/parts/"
                       "part-b.parquet': permission denied"):
        writer.commit()
    writer.abort()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists(f"{s3_bucket}/parts/part-b.parquet")


# -- the whole job -----------------------------------------------------------------------------

@pytest.fixture
def s3_job(s3_bucket: str, tmp_path: Path) -> dict[str, Any]:
    local = tmp_path / "data"
    write_dataset(str(local), files=3, rows_per_file=500, row_group_rows=120, seed=21)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(local) + "/", f"{s3_bucket}/table/", recursive=True)
    model = two_input_model(seed=8)
    fs.pipe(f"{s3_bucket}/models/m.onnx", model)
    return {"model": model, "model_url": f"{s3_bucket}/models/m.onnx",
            "input": f"{s3_bucket}/table/", "local": local, "bucket": s3_bucket}


@pytest.mark.ray
def test_job_through_transient_faults_is_exact(fault_ray: Any, proxy: FaultProxy,
                                               s3_job: dict[str, Any]) -> None:
    """500s, dropped connections and slow answers on reads and part uploads: the job retries
    them and its output is exact."""
    proxy.add(Fault("GET", "/table/data-00", status=500, skip=3, times=4))
    proxy.add(Fault("GET", "/table/data-00", reset=True, skip=10, times=7))
    proxy.add(Fault("GET", "/table/data-00", delay=0.5, skip=5, times=6))
    proxy.add(Fault("PUT", r"/scored/part-", status=500, times=3))
    proxy.add(Fault("HEAD", "/table/data-001", status=503, code="ServiceUnavailable", times=2))
    out = f"{s3_job['bucket']}/scored"
    spec = spec_for(s3_job["model_url"], s3_job["input"], out,
                    storage_options=(("endpoint_url", proxy.url),
                                     ("config_kwargs", (("retries", (("total_max_attempts", 1),)),
                                                        ))))
    report = run_job(spec, io.StringIO())

    assert report.exit_code == 0 and report.committed == 9, report.failed
    injected = [r.fault for r in proxy.requests if r.fault]
    assert injected.count("status 500") == 7 and injected.count("reset") == 7
    assert injected.count("status 503") == 2 and injected.count("delay") == 6
    source = read_files(sorted(str(p) for p in s3_job["local"].iterdir()))
    check_exactly_once(s3_job["model"], source, read_parts(out))
    assert len(puts_of(proxy.requests, "/scored/part-")) == 9


@pytest.mark.ray
def test_job_with_permanent_faults_names_them(fault_ray: Any, proxy: FaultProxy,
                                              s3_job: dict[str, Any]) -> None:
    """An input file the job may not read and a part it may not write: those two shards fail
    at once (no retries), named with the storage error; the others commit."""
    out = f"{s3_job['bucket']}/scored"
    spec = spec_for(s3_job["model_url"], s3_job["input"], out, rows_per_shard=500,
                    storage_options=(("endpoint_url", proxy.url),))
    denied_part = next(s.part_name for s in _shards(spec) if s.url.endswith("data-002.parquet"))
    proxy.add(Fault("GET", "/table/data-001", status=403, code="AccessDenied", skip=2,
                    times=None))
    proxy.add(Fault("PUT", denied_part, status=403, code="AccessDenied", times=None))
    report = run_job(spec, io.StringIO())

    assert report.exit_code == 1 and report.committed == 1
    reasons = {f["file"].rsplit("/", 1)[-1]: f for f in report.failed}
    assert set(reasons) == {"data-001.parquet", "data-002.parquet"}
    # The footer or the first row group, whichever request the denial hit first.
    assert re.match(r"cannot read (the footer|row group 0) of 's3://.*/table/data-001.parquet': "
                    r"permission denied \(injected by the test proxy\); check the credentials",
                    reasons["data-001.parquet"]["reason"]), reasons["data-001.parquet"]["reason"]
    assert reasons["data-002.parquet"]["reason"].startswith(
        f"cannot commit part 's3://{out[5:]}/{denied_part}': permission denied")
    assert all(f["kind"] == "storage" and f["attempts"] == 1 for f in report.failed)
    record = manifest(out)
    assert json.dumps(record["failures"]).count("permission denied") == 2
    check_exactly_once(s3_job["model"], read_files([str(s3_job["local"] / "data-000.parquet")]),
                       read_parts(out))


def _shards(spec: Any) -> list[Shard]:
    from jobs.driver import prepare

    return list(prepare(spec).shards)
