from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.shards import BadFile, InputFile, cut_shards, list_input, read_footers
from tests.models import two_input_table, write_dataset
from workers.errors import SpecError


def _files(url: str) -> list[InputFile | BadFile]:
    fs, listing = list_input(url)
    return read_footers(fs, listing)


def test_directory_listing_skips_hidden_and_reads_footers(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=2, rows_per_file=250, row_group_rows=100)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".part.tmp").write_text("")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "x.parquet").write_text("")
    files = _files(str(tmp_path))
    assert [os.path.basename(f.url) for f in files] == ["data-000.parquet", "data-001.parquet"]
    first = files[0]
    assert isinstance(first, InputFile)
    assert first.row_group_rows == (100, 100, 50) and first.rows == 250
    assert first.schema.names == ["uid", "name", "img", "features"]


def test_glob_and_single_file(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=3, rows_per_file=10, row_group_rows=10)
    assert len(_files(str(tmp_path / "data-00[01].parquet"))) == 2
    assert len(_files(str(tmp_path / "data-002.parquet"))) == 1


def test_shards_are_whole_row_groups(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=2, rows_per_file=250, row_group_rows=100)
    files = [f for f in _files(str(tmp_path)) if isinstance(f, InputFile)]
    shards = cut_shards(files, rows_per_shard=150)
    assert [(os.path.basename(s.url), s.row_groups, s.rows) for s in shards] == [
        ("data-000.parquet", (0, 2), 200), ("data-000.parquet", (2, 3), 50),
        ("data-001.parquet", (0, 2), 200), ("data-001.parquet", (2, 3), 50)]
    assert sum(s.rows for s in shards) == 500
    assert len({s.id for s in shards}) == 4


def test_shard_ids_are_stable_and_change_with_the_file(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=1, rows_per_file=100, row_group_rows=50)
    ids = [s.id for s in cut_shards(_files(str(tmp_path)), 50)]  # type: ignore[arg-type]
    assert ids == [s.id for s in cut_shards(_files(str(tmp_path)), 50)]  # type: ignore[arg-type]
    time.sleep(0.01)  # a distinct mtime for the rewrite
    path = tmp_path / "data-000.parquet"
    pq.write_table(two_input_table(100, seed=99), path, row_group_size=50)
    os.utime(path, (time.time() + 5, time.time() + 5))
    changed = [s.id for s in cut_shards(_files(str(tmp_path)), 50)]  # type: ignore[arg-type]
    assert not set(changed) & set(ids)


def test_corrupt_file_becomes_a_bad_file(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=1, rows_per_file=10, row_group_rows=10)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    files = _files(str(tmp_path))
    bad = [f for f in files if isinstance(f, BadFile)]
    assert len(bad) == 1 and bad[0].url.endswith("broken.parquet")
    assert "not a readable Parquet file" in bad[0].reason


def test_empty_file_gives_no_shards(tmp_path: Path) -> None:
    pq.write_table(two_input_table(1).slice(0, 0), tmp_path / "empty.parquet")
    files = [f for f in _files(str(tmp_path)) if isinstance(f, InputFile)]
    assert files[0].rows == 0
    assert cut_shards(files, 10) == []


def test_nonexistent_input(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"input '.*nowhere' does not exist; check --input"):
        list_input(str(tmp_path / "nowhere"))


def test_directory_without_files(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS").write_text("")
    with pytest.raises(SpecError, match="holds no files; check --input"):
        list_input(str(tmp_path))


def test_balanced_shards_give_every_worker_several(tmp_path: Path) -> None:
    from jobs.shards import SHARDS_PER_WORKER, balanced_rows, balanced_shards

    # The case: 3 files on 2 workers, row groups of 250.
    write_dataset(str(tmp_path), files=3, rows_per_file=1000, row_group_rows=250)
    files = [f for f in _files(str(tmp_path)) if isinstance(f, InputFile)]
    assert balanced_rows(files, 2) == 3000 // (SHARDS_PER_WORKER * 2)
    shards, big = balanced_shards(files, 2)
    assert len(shards) >= SHARDS_PER_WORKER * 2 and not big
    assert all(s.rows <= 375 for s in shards) and sum(s.rows for s in shards) == 3000
    # One worker: shards of up to 750 rows, three row groups at most each.
    one, _ = balanced_shards(files, 1)
    assert [s.rows for s in one] == [750, 250] * 3
    # Shard ids depend only on the row groups they cover: a rerun gives the same shards.
    assert [s.id for s in balanced_shards(files, 2)[0]] == [s.id for s in shards]


def test_a_file_of_one_huge_row_group_stays_one_shard_and_is_named(tmp_path: Path) -> None:
    from jobs.shards import balanced_shards

    write_dataset(str(tmp_path), files=2, rows_per_file=800, row_group_rows=800)
    files = [f for f in _files(str(tmp_path)) if isinstance(f, InputFile)]
    shards, big = balanced_shards(files, 2)
    assert [s.rows for s in shards] == [800, 800]
    assert sorted(rows for _, rows in big) == [800, 800]
    assert all(url.endswith(".parquet") for url, _ in big)


def test_the_job_says_when_row_groups_keep_workers_idle(tmp_path: Path) -> None:
    from jobs.driver import PreparedJob, balance, shard_note
    from jobs.spec import JobSpec

    write_dataset(str(tmp_path), files=3, rows_per_file=900, row_group_rows=900)
    files = [f for f in _files(str(tmp_path)) if isinstance(f, InputFile)]
    spec = JobSpec(model="m", input=str(tmp_path), output=str(tmp_path / "out"))
    job = PreparedJob(spec=spec, model_bytes=b"", model=None, model_sha256="0",  # type: ignore[arg-type]
                      files=files, bad_files=[], shards=cut_shards(files, 100_000), bindings=())
    balanced = balance(job, 2, None)
    assert balanced.shard_target == 2700 // 8 and len(balanced.shards) == 3
    note = shard_note(balanced, 2)
    assert note.startswith("3 file(s) have row groups larger than the 337-row shards that would "
                           "keep 2 worker(s) busy (the largest: 900 rows in '")
    assert note.endswith("a row group is one shard at least, so its rows run on one worker: "
                         "write such files with smaller row groups")
    # A rerun of the same job keeps the cut its first run recorded, whatever the workers.
    again = balance(job, 8, {"job": job.identity["fingerprint"], "rows_per_shard": 337})
    assert again.shard_target == 337
    # rows_per_shard set: shards as the spec says, no note.
    fixed = balance(PreparedJob(**{**job.__dict__, "spec": JobSpec(
        model="m", input="i", output="o", rows_per_shard=50)}), 2, None)
    assert fixed.shard_target is None and shard_note(fixed, 2) == ""
