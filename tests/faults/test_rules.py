"""The rules behind the fault handling, without Ray: which errors are retried, how deaths are
reported, and how a rerun tells what changed in its input."""

from __future__ import annotations

import pytest
from ray.exceptions import OutOfMemoryError, RayActorError

from jobs.output import diff_inputs, inputs_record
from jobs.pool import death_reason, failure_kind, is_retryable
from workers.errors import (
    BackendError,
    DataError,
    MissingDependencyError,
    SpecError,
    StorageError,
    TransientStorageError,
)
from workers.types import Shard

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("exc, kind, retry", [
    (DataError("corrupt row group"), "data", False),
    (StorageError("permission denied"), "storage", False),
    (TransientStorageError("still failing after 5 attempt(s)"), "storage", True),
    (SpecError("bad column"), "spec", False),
    (MissingDependencyError("pip install"), "spec", False),
    (BackendError("ONNX Runtime failed on a batch"), "backend", True),
    (RuntimeError("a bug"), "error", True),
])
def test_which_errors_are_retried(exc: BaseException, kind: str, retry: bool) -> None:
    assert failure_kind(exc) == kind
    assert is_retryable(exc) is retry


def test_death_reasons_name_the_cause() -> None:
    oom = death_reason(3, OutOfMemoryError("Task was killed due to the node running low on "
                                           "memory.\nMemory on the node was 95%"))
    assert oom.startswith("Ray's memory monitor killed its worker 3 times while processing it "
                          "(out of memory); lower --batch-size or --shards-in-flight")
    assert oom.endswith("last: Task was killed due to the node running low on memory.")
    died = death_reason(2, RayActorError())
    assert died.startswith("its worker process died 2 times while processing it (killed, out of "
                           "memory, a crash in the backend, or its node was lost); last: ")


def shard(url: str, version: str, start: int, stop: int, size: int = 100) -> Shard:
    return Shard(url=url, size=size, version=version, row_groups=(start, stop), rows=10)


def test_rewritten_added_removed_files_and_stale_parts() -> None:
    old = [shard("s3://b/a", "v1", 0, 1), shard("s3://b/a", "v1", 1, 2), shard("s3://b/c", "v1", 0, 1)]
    previous = inputs_record("job", [("s3://b/a", 100, "v1"), ("s3://b/c", 100, "v1")], old)
    new = [shard("s3://b/a", "v2", 0, 1), shard("s3://b/a", "v2", 1, 2), shard("s3://b/d", "v1", 0, 1)]
    current = inputs_record("job", [("s3://b/a", 100, "v2"), ("s3://b/d", 100, "v1")], new)
    committed = {s.id: s.part_name for s in old}
    changes = diff_inputs(previous, current, committed)

    assert changes.known and bool(changes)
    assert changes.added == ["s3://b/d"] and changes.removed == ["s3://b/c"]
    assert changes.rewritten == [{"file": "s3://b/a", "before": {"size": 100, "version": "v1"},
                                  "after": {"size": 100, "version": "v2"}}]
    assert sorted((p["part"], p["reason"]) for p in changes.stale) == sorted([
        (old[0].part_name, "its file was rewritten"), (old[1].part_name, "its file was rewritten"),
        (old[2].part_name, "its file is no longer in the input")])
    assert changes.summary() == ("1 file(s) added, 1 file(s) rewritten, 1 file(s) removed, "
                                 "3 stale part(s) removed")


def test_parts_of_current_shards_are_kept_and_recuts_named() -> None:
    old = [shard("s3://b/a", "v1", 0, 2)]
    new = [shard("s3://b/a", "v1", 0, 1), shard("s3://b/a", "v1", 1, 2)]
    previous = inputs_record("job", [("s3://b/a", 100, "v1")], old)
    current = inputs_record("job", [("s3://b/a", 100, "v1")], new)
    changes = diff_inputs(previous, current, {old[0].id: old[0].part_name,
                                              new[0].id: new[0].part_name})
    assert not changes.added and not changes.rewritten and not changes.removed
    assert changes.stale == [{"part": old[0].part_name, "file": "s3://b/a",
                              "reason": "its file was cut into different shards "
                                        "(rows_per_shard changed?)"}]


def test_without_a_record_only_parts_of_current_shards_are_kept() -> None:
    new = [shard("s3://b/a", "v1", 0, 1)]
    current = inputs_record("job", [("s3://b/a", 100, "v1")], new)
    unknown = "0" * 24
    for previous in (None, inputs_record("another job", [("s3://b/a", 100, "v0")], [])):
        changes = diff_inputs(previous, current, {new[0].id: new[0].part_name,
                                                  unknown: f"part-{unknown}.parquet"})
        assert not changes.known and not changes.added and not changes.rewritten
        assert changes.stale == [{"part": f"part-{unknown}.parquet", "file": None,
                                  "reason": "not a shard of the current input (no record of "
                                            "which file it came from)"}]


def test_no_change_is_falsy() -> None:
    new = [shard("s3://b/a", "v1", 0, 1)]
    record = inputs_record("job", [("s3://b/a", 100, "v1")], new)
    changes = diff_inputs(record, record, {new[0].id: new[0].part_name})
    assert not changes and changes.summary() == ""
