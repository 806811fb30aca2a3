"""The job's last lines: rows written, shards and files counted apart, long failure lists cut."""

from __future__ import annotations

from typing import Any

from jobs.driver import JobReport, summary


def report(failed: list[dict[str, Any]], **kw: Any) -> JobReport:
    settings: dict[str, Any] = dict(output="/out", shards=9, committed=6, skipped=1,
                                    failed=failed, rows=1797, seconds=3.25, backend="onnxruntime",
                                    exit_code=1)
    settings.update(kw)
    return JobReport(**settings)


def bad_file(i: int) -> dict[str, Any]:
    return {"file": f"/in/img-{i:04d}.png", "shard": None, "kind": "bad_file",
            "reason": "not a readable Parquet file (no PAR1 magic at its end)"}


def bad_shard(i: int) -> dict[str, Any]:
    return {"file": f"/in/f{i}.parquet", "shard": f"{i:024x}", "row_groups": [2, 4],
            "kind": "data", "reason": "column 'x' has 1 null value(s)"}


def test_files_are_not_counted_as_shards() -> None:
    text = summary(report([bad_file(0), bad_shard(1)]))
    first = text.splitlines()[0]
    assert first == ("done: 1,797 rows in 3.2s; shards: 6 committed, 1 skipped (already "
                     "committed), 1 failed; files: 1 unreadable; backend onnxruntime; "
                     "output /out")
    assert text.splitlines()[1:] == [
        "failed: /in/img-0000.png: not a readable Parquet file (no PAR1 magic at its end)",
        "failed: /in/f1.parquet row groups 2-3: column 'x' has 1 null value(s)"]


def test_a_long_failure_list_is_cut_and_points_at_the_manifest() -> None:
    text = summary(report([bad_file(i) for i in range(1802)], committed=0, skipped=0))
    lines = text.splitlines()
    assert lines[0].startswith("done: 1,797 rows in 3.2s; shards: 0 committed, 0 skipped "
                               "(already committed), 0 failed; files: 1,802 unreadable;")
    assert len([line for line in lines if line.startswith("failed: ")]) == 10
    assert lines[-1] == "... and 1,792 more, see /out/_manifest.json"


def test_rows_left_out_by_preprocessing_are_not_done_rows() -> None:
    text = summary(report([], rows=1797, manifest={"rows_failed": 1}, exit_code=0))
    assert text.splitlines() == [
        "done: 1,797 rows in 3.2s; shards: 6 committed, 1 skipped (already committed), "
        "0 failed; backend onnxruntime; output /out",
        "rows left out: 1 row(s) failed preprocessing; _manifest.json lists them under "
        "row_failures"]
